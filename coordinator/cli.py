"""`confide coordinator ...` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
