"""Settings, built once and passed down (no configuration is read at import time).

Sources in order of precedence: explicit overrides (CLI flags, tests) > environment variables
(`CONFIDE_NODE_*`, `CONFIDE_COORDINATOR_*`) > a YAML config file > defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import Field, ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from confide.errors import ConfigurationError


class ServiceSettings(BaseSettings):
    """What the coordinator and a node have in common."""

    model_config = SettingsConfigDict(extra="forbid")

    name: str = Field(description="This service's name; must match the CN of its certificate")
    pki_dir: Path = Field(description="Directory holding cert.pem, tls.key, identity.key, box.key, ca.pem")
    data_dir: Path = Field(default=Path("var"), description="Where the service keeps its files")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file in data_dir"
    )
    host: str = Field(default="127.0.0.1", description="Interface to listen on")
    port: int = Field(default=8400, ge=0, le=65535)
    tls: bool = Field(default=True, description="Serve with mutual TLS (turn off only in tests)")
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="Largest request body")
    max_clock_skew_s: float = Field(default=300.0, gt=0, description="Allowed request timestamp skew")
    log_level: str = Field(default="info")

    def resolved_database_url(self, filename: str) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.data_dir / filename).resolve()}"


class CoordinatorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CONFIDE_COORDINATOR_", extra="forbid")

    name: str = "coordinator"
    step_deadline_s: float = Field(
        default=120.0, gt=0, description="How long a job step may stay unreachable/unfinished before the job fails"
    )
    poll_interval_s: float = Field(default=0.5, gt=0, description="How often running jobs are advanced")
    arbiter_key_max_age_s: float = Field(
        default=7 * 86_400.0, ge=60,
        description="An agreement's arbiter (Paillier) key is used by its training jobs for this long, then rotated",
    )


class NodeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CONFIDE_NODE_", extra="forbid")

    port: int = Field(default=8401, ge=0, le=65535)
    coordinator_url: str = Field(default="https://127.0.0.1:8400", description="Base URL of the coordinator")
    public_url: str | None = Field(
        default=None, description="URL the coordinator uses to reach this node (default from host/port)"
    )
    test_step_delay_s: float = Field(
        default=0.0, ge=0, description="TEST ONLY: sleep this long inside each job step (used by crash tests)"
    )
    mandate_max_age_s: float = Field(
        default=86_400.0, gt=0,
        description="Refuse a job whose requester's mandate is older than this when the node first sees it",
    )
    registry_refresh_s: float = Field(
        default=60.0, ge=0,
        description="How often the node refreshes peers' certificates from the coordinator (0 = only on demand); "
                    "a revoked party is dropped at the next refresh",
    )
    obfuscator_stock: int = Field(
        default=0, ge=0, le=10_000_000,
        description="Paillier obfuscators to compute ahead, while idle, per arbiter key of this node's training "
                    "agreements (0 = off; 512 bytes each at 2048 bits; ~2 per training row for a brand, ~1 for a partner)",
    )
    obfuscator_key_bits: int = Field(default=2048, ge=1024, le=4096, description="Arbiter key size to stock for")
    obfuscator_workers: int | None = Field(
        default=None, ge=1, description="Processes filling the stock at the lowest CPU priority (default: all cores)"
    )
    obfuscator_refresh_s: float = Field(
        default=300.0, gt=0, description="How often the stock asks the coordinator for new or rotated arbiter keys"
    )

    def endpoint(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
    """Build settings from a YAML file, the environment and explicit overrides."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigurationError(f"config file not found: {config_file}") from exc
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"config file {config_file} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"config file {config_file} must hold a mapping")
        file_values = loaded
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        # Environment beats the file; explicit overrides beat both.
        merged = _env_over_file(cls, file_values)
        return cls(**(merged | values))
    except PydanticValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid {cls.__name__}: {errs}") from exc


def _env_over_file(cls: type[ServiceSettings], file_values: dict[str, Any]) -> dict[str, Any]:
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    out = dict(file_values)
    for field in cls.model_fields:
        env = os.environ.get(prefix + field.upper())
        if env is not None:
            out[field] = env
    return out
