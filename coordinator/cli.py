"""`confide coordinator ...` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Run and operate the coordinator.")


@app.command("serve")
def serve(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML settings file"),
    pki_dir: Optional[Path] = typer.Option(None, "--pki-dir", help="The coordinator's PKI directory"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    database_url: Optional[str] = typer.Option(None, "--database-url"),
    host: Optional[str] = typer.Option(None, "--host"),
    port: Optional[int] = typer.Option(None, "--port"),
    no_tls: bool = typer.Option(False, "--no-tls", help="Plain HTTP (tests only; signatures still required)"),
) -> None:
    """Serve the coordinator API (registry, agreements, jobs) with mutual TLS."""
    from confide import pki
    from confide.serve import serve as run
    from confide.settings import CoordinatorSettings, load_settings
    from coordinator.app import create_app

    settings = load_settings(
        CoordinatorSettings, config, pki_dir=pki_dir, data_dir=data_dir, database_url=database_url,
        host=host, port=port, tls=False if no_tls else None,
    )
    identity = pki.load_identity(settings.pki_dir)
    run(create_app(settings, identity=identity), settings, identity)



def _on_database(config: Path | None, database_url: str | None, data_dir: Path | None, pki_dir: Path | None,
                 change: Any) -> None:
    """Run `change(session)` in one transaction on the coordinator's database (the operator's
    registry commands; the service may be running)."""
    from rich.console import Console

    from confide.db import make_engine, session_factory, session_scope
    from confide.errors import ConfideError
    from confide.settings import CoordinatorSettings, load_settings
    from coordinator.storage import ensure_schema

    try:
        settings = load_settings(CoordinatorSettings, config, database_url=database_url, data_dir=data_dir,
                                 pki_dir=pki_dir)
        engine = make_engine(settings.resolved_database_url("coordinator.db"))
        try:
            ensure_schema(engine)
            with session_scope(session_factory(engine)) as s:
                change(s)
        finally:
            engine.dispose()
    except ConfideError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc.message}")
        raise SystemExit(exc.exit_code) from exc


CONFIG_OPT = typer.Option(None, "--config", help="YAML settings file")
DB_OPT = typer.Option(None, "--database-url")
DATA_OPT = typer.Option(None, "--data-dir")
PKI_OPT = typer.Option(None, "--pki-dir", help="The coordinator's PKI directory")


@app.command("approve-rekey")
def approve_rekey(
    name: str = typer.Argument(..., help="The party whose keys change"),
    fingerprint: str = typer.Option(..., "--fingerprint", help="SHA-256 fingerprint of its new certificate"),
    config: Optional[Path] = CONFIG_OPT, database_url: Optional[str] = DB_OPT,
    data_dir: Optional[Path] = DATA_OPT, pki_dir: Optional[Path] = PKI_OPT,
) -> None:
    """Let a registered party re-register once with a certificate carrying new keys.

    Keys are pinned at a party's first registration; a certificate with other keys (a rotation,
    or a replacement after a leak or a revocation) is accepted only after the coordinator's
    operator has checked its fingerprint out of band with the party and approved it here."""
    from rich.console import Console

    from coordinator import service

    fp = fingerprint.strip().lower().replace(":", "")
    _on_database(config, database_url, data_dir, pki_dir, lambda s: service.approve_rekey(s, name, fp))
    Console().print(f"{name} may now register once with certificate {fp}")


@app.command("revoke")
def revoke(
    name: str = typer.Argument(..., help="The party whose certificate is revoked"),
    reason: str = typer.Option(..., "--reason", help="Why (kept in the audit trail, shown to the party)"),
    config: Optional[Path] = CONFIG_OPT, database_url: Optional[str] = DB_OPT,
    data_dir: Optional[Path] = DATA_OPT, pki_dir: Optional[Path] = PKI_OPT,
) -> None:
    """Revoke a party's certificate (e.g. its keys leaked): the coordinator refuses its requests,
    its re-registration with the same keys and new jobs of its agreements, and drops it from the
    registry the nodes refresh from. It comes back only with new keys (`approve-rekey`)."""
    from rich.console import Console

    from coordinator import service

    _on_database(config, database_url, data_dir, pki_dir, lambda s: service.revoke_party(s, name, reason))
    Console().print(f"{name}'s certificate is revoked")
