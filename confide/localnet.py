"""A local deployment: coordinator and party nodes as separate processes on loopback, mTLS.

Used by the demo and by the integration tests. Each service gets a YAML config file in the
work directory, its own data directory and database, and a free port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from confide import pki
from confide.errors import ConfigurationError, RemoteError
from confide.transport import ServiceClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    name: str
    kind: str  # coordinator | node
    config: Path
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


class LocalNet:
    def __init__(
        self,
        workdir: Path,
        parties: list[tuple[str, str]],
        *,
        database_urls: dict[str, str] | None = None,
        coordinator_settings: dict[str, Any] | None = None,
        node_settings: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.pki_dir = self.workdir / "pki"
        self.parties = parties
        if not (self.pki_dir / "ca" / "ca.pem").exists():
            pki.init(self.pki_dir, parties)
        db_urls = database_urls or {}
        self.services: dict[str, Service] = {}
        cport = free_port()
        self._write("coordinator", "coordinator", cport, {
            "pki_dir": str(self.pki_dir / "coordinator"),
            "data_dir": str(self.workdir / "coordinator"),
            **({"database_url": db_urls["coordinator"]} if "coordinator" in db_urls else {}),
            **(coordinator_settings or {}),
        })
        for name, _role in parties:
            port = free_port()
            self._write(name, "node", port, {
                "name": name,
                "pki_dir": str(self.pki_dir / name),
                "data_dir": str(self.workdir / name),
                "coordinator_url": f"https://127.0.0.1:{cport}",
                **({"database_url": db_urls[name]} if name in db_urls else {}),
                **((node_settings or {}).get(name, {})),
            })

    def _write(self, name: str, kind: str, port: int, values: dict[str, Any]) -> None:
        cfg = self.workdir / f"{name}.yaml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        values = {"host": "127.0.0.1", "port": port, "log_level": "warning", **values}
        cfg.write_text(yaml.safe_dump(values, sort_keys=True))
        self.services[name] = Service(name, kind, cfg, port, self.workdir / f"{name}.log")

    def config(self, name: str) -> Path:
        return self.services[name].config

    # -- processes -------------------------------------------------------------------------------
    def start(self, name: str, wait: bool = True, extra_env: dict[str, str] | None = None) -> None:
        svc = self.services[name]
        if svc.proc is not None and svc.proc.poll() is None:
            return
        group = "coordinator" if svc.kind == "coordinator" else "node"
        env = dict(os.environ, **(extra_env or {}))
        log = open(svc.log, "ab")
        svc.proc = subprocess.Popen(
            [sys.executable, "-m", "confide", group, "serve", "--config", str(svc.config)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_healthy(name)

    def start_all(self) -> None:
        self.start("coordinator", wait=False)
        for name, _ in self.parties:
            self.start(name, wait=False)
        for name in self.services:
            self.wait_healthy(name)

    def wait_healthy(self, name: str, timeout: float = 60.0) -> None:
        svc = self.services[name]
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if svc.proc is not None and svc.proc.poll() is not None:
                raise ConfigurationError(f"{name} exited with {svc.proc.returncode}; see {svc.log}:\n{self.tail(name)}")
            try:
                with self.client(name) as c:
                    c.get("/health")
                return
            except RemoteError as exc:
                last = exc
                time.sleep(0.2)
        raise ConfigurationError(f"{name} not healthy after {timeout:.0f}s: {last}\n{self.tail(name)}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        svc = self.services[name]
        if svc.proc is not None and svc.proc.poll() is None:
            os.killpg(svc.proc.pid, sig)
            svc.proc.wait(timeout=30)
        svc.proc = None

    def stop_all(self) -> None:
        for name in list(self.services):
            try:
                self.kill(name, signal.SIGTERM)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.kill(name, signal.SIGKILL)

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(self.services[name].log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # -- clients ---------------------------------------------------------------------------------
    def client(self, name: str, as_party: str | None = None) -> ServiceClient:
        """A signed mTLS client to service `name`, acting as `as_party` (default: itself)."""
        ident = pki.load_identity(self.pki_dir / (as_party or name))
        return ServiceClient(ident, name, self.services[name].url, timeout=120)

    def __enter__(self) -> "LocalNet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
