"""Settings precedence, the CLI's error translation, and the services' public meta endpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from confide.errors import ConfigurationError
from confide.settings import CoordinatorSettings, NodeSettings, load_settings
from coordinator.app import create_app


def test_precedence_overrides_env_file_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text("name: brand\npki_dir: /pki/brand\nport: 9001\nhost: 0.0.0.0\n")
    s = load_settings(NodeSettings, cfg)
    assert (s.name, s.port, s.host, s.tls) == ("brand", 9001, "0.0.0.0", True)
    monkeypatch.setenv("CONFIDE_NODE_PORT", "9002")
    assert load_settings(NodeSettings, cfg).port == 9002
    assert load_settings(NodeSettings, cfg, port=9003).port == 9003


def test_bad_settings_name_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pki_dir: /x\nport: 99999\n")
    with pytest.raises(ConfigurationError, match="port"):
        load_settings(CoordinatorSettings, cfg)
    cfg.write_text("pki_dir: /x\nbogus: 1\n")
    with pytest.raises(ConfigurationError, match="bogus"):
        load_settings(CoordinatorSettings, cfg)
    with pytest.raises(ConfigurationError, match="not found"):
        load_settings(CoordinatorSettings, tmp_path / "missing.yaml")
    cfg.write_text("pki_dir: [unclosed\n")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_settings(CoordinatorSettings, cfg)


def test_sqlite_is_the_default_database(tmp_path: Path) -> None:
    s = NodeSettings(name="brand", pki_dir=tmp_path, data_dir=tmp_path / "d")
    assert s.resolved_database_url("node.db") == f"sqlite:///{(tmp_path / 'd' / 'node.db').resolve()}"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "confide", *args], capture_output=True, text=True, timeout=120)


def test_cli_pki_init_and_error_exit_codes(tmp_path: Path) -> None:
    ok = run_cli("pki", "init", "--dir", str(tmp_path / "p"), "--party", "brand:brand", "--party", "dmp:partner")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "p" / "dmp" / "identity.key").exists()
    again = run_cli("pki", "init", "--dir", str(tmp_path / "p"))
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = run_cli("pki", "issue", "--dir", str(tmp_path / "p"), "--name", "x", "--role", "retailer")
    assert bad.returncode == 2 and "invalid role" in bad.stderr
    usage = run_cli("pki", "init", "--party", "brand:brand")
    assert usage.returncode == 2 and "--dir" in usage.stderr


def test_health_version_and_openapi(pki_dir: Path, tmp_path: Path) -> None:
    app = create_app(CoordinatorSettings(pki_dir=pki_dir / "coordinator", data_dir=tmp_path, tls=False),
                     run_orchestrator=False)
    with TestClient(app) as tc:
        assert tc.get("/health").json()["status"] == "ok"
        v = tc.get("/version").json()
        assert v["service"] == "coordinator" and v["version"]
        paths = tc.get("/openapi.json").json()["paths"]
        assert "/v1/agreements" in paths and "/v1/jobs" in paths
        assert tc.get("/docs").status_code == 200
