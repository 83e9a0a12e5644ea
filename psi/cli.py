"""`confide psi …`: thin commands over the PSI library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from psi.messages import Mode
from psi.normalize import parse_id_type

app = typer.Typer(no_args_is_help=True, help="Private set intersection.")


@app.callback()
def _group() -> None:
    """Private set intersection: overlap, matching and profiles without sharing identifiers."""


@app.command("local")
def local(
    left: Path = typer.Option(..., "--left", help="CSV of the requesting party (learns the result)"),
    right: Path = typer.Option(..., "--right", help="CSV of the responding party"),
    id: str = typer.Option("phone", "--id", help="Identifier type: phone, email, openid, unionid, platform_id, phone_md5, phone_sha256"),
    mode: str = typer.Option("cardinality", "--mode", help="cardinality or match"),
    left_column: Optional[str] = typer.Option(None, "--left-column", help="Column in --left (default: the id type's name)"),
    right_column: Optional[str] = typer.Option(None, "--right-column", help="Column in --right (default: the id type's name)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Blinding processes per party (default: all cores)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Run both PSI roles on this machine in separate processes over real serialised messages;
    print the intersection size, wall seconds, bytes exchanged and peak memory."""
    from confide.errors import ValidationError
    from psi.local import run_local

    t = parse_id_type(id)
    if mode not in (Mode.cardinality.value, Mode.match.value):
        raise ValidationError(f"--mode {mode!r}: expected cardinality or match")
    res = run_local(
        left, right, id_type=t.value, mode=Mode(mode),
        left_column=left_column, right_column=right_column, workers=workers,
    )
    if as_json:
        typer.echo(json.dumps(res.to_json()))
        return
    typer.echo(f"intersection size   {res.intersection_size}")
    if res.mode == Mode.match.value:
        typer.echo(f"matched rows        left {res.left['matched_rows']}, right {res.right['matched_rows']}")
    typer.echo(f"invalid identifiers left {res.left['invalid']}, right {res.right['invalid']}")
    typer.echo(f"wall seconds        {res.seconds:.2f}")
    typer.echo(f"bytes exchanged     {res.bytes}")
    typer.echo(f"peak RSS (MB)       {res.peak_rss_mb:.1f}")
