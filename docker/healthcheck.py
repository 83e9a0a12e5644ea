"""Container health check for a Confide service: GET /health over mutual TLS.

    python docker/healthcheck.py [CONFIG]     (default: /etc/confide/config.yaml)

The service's settings are loaded exactly as the service loads them (YAML file, then
`CONFIDE_COORDINATOR_*` / `CONFIDE_NODE_*` environment variables), so the check follows the
configured port, TLS switch and PKI directory. A plain `curl` cannot pass: the services
require a client certificate from the deployment CA, so the check presents the service's own.

Exit status 0 when the service answers `{"status": "ok"}` as the expected service, 1 otherwise
(with the reason on stderr, which `docker inspect` shows).
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.request
from pathlib import Path

import yaml

from confide.settings import CoordinatorSettings, NodeSettings, ServiceSettings, load_settings

DEFAULT_CONFIG = Path("/etc/confide/config.yaml")


def _settings(config: Path) -> tuple[str, ServiceSettings]:
    raw = yaml.safe_load(config.read_text()) or {}
    name = os.environ.get("CONFIDE_NODE_NAME") or raw.get("name") or "coordinator"
    # Only the coordinator may be called "coordinator" (confide.pki enforces it).
    if name == "coordinator" and "coordinator_url" not in raw:
        return "coordinator", load_settings(CoordinatorSettings, config)
    return "node", load_settings(NodeSettings, config)


def check(config: Path, timeout: float = 4.0) -> str:
    """Return a one-line description of the healthy service; raise on any problem."""
    kind, settings = _settings(config)
    # The check talks to its own listener, so it connects over loopback when the service
    # listens on every interface.
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    if settings.tls:
        pki = Path(settings.pki_dir)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
        # The chain is still verified against the deployment CA; the host name is not,
        # because the loopback address need not be among the certificate's names.
        ctx.check_hostname = False
        ctx.load_cert_chain(str(pki / "cert.pem"), str(pki / "tls.key"))
        url = f"https://{host}:{settings.port}/health"
    else:
        ctx = None
        url = f"http://{host}:{settings.port}/health"
    with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
        body = json.loads(resp.read())
    if body.get("status") != "ok" or body.get("service") != kind:
        raise RuntimeError(f"unexpected health answer from {url}: {body}")
    if kind == "node" and body.get("name") != settings.name:
        raise RuntimeError(f"{url} is node {body.get('name')!r}, expected {settings.name!r}")
    return f"{kind} {settings.name} healthy at {url}"


def main(argv: list[str]) -> int:
    config = Path(argv[1]) if len(argv) > 1 else DEFAULT_CONFIG
    try:
        print(check(config))
        return 0
    except Exception as exc:  # any failure means unhealthy; say why
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
