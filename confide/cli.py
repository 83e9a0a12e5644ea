"""`confide`: the one command-line interface. Each command is a thin shell over library calls.

Errors are translated here once: a ConfideError prints its message and exits with its exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from confide import __version__
from confide.errors import ConfideError

console = Console(stderr=True)
app = typer.Typer(no_args_is_help=True, add_completion=False, help="Confide data clean room.")
pki_app = typer.Typer(no_args_is_help=True, help="Deployment PKI: CA, certificates, identity keys.")
app.add_typer(pki_app, name="pki")


@app.command()
def version() -> None:
    """Print the Confide version."""
    typer.echo(__version__)


@pki_app.command("init")
def pki_init(
    dir: Path = typer.Option(..., "--dir", help="Directory to create the PKI in"),
    party: list[str] = typer.Option(
        [], "--party", help="NAME:ROLE for each party (role brand or partner); repeatable"
    ),
    host: list[str] = typer.Option(
        [], "--host", help="Host name or IP for the certificates' SANs (default localhost, 127.0.0.1, ::1)"
    ),
) -> None:
    """Create a deployment CA and issue the coordinator and each party an identity."""
    from confide import pki
    from confide.errors import ValidationError

    parties = []
    for p in party:
        if ":" not in p:
            raise ValidationError(f"--party {p!r}: expected NAME:ROLE, e.g. brand:brand")
        name, role = p.split(":", 1)
        parties.append((name, role))
    out = pki.init(dir, parties, tuple(host) if host else None)
    for d in out:
        console.print(f"issued [bold]{d.name}[/bold] -> {d}")


@pki_app.command("issue")
def pki_issue(
    dir: Path = typer.Option(..., "--dir", help="The PKI directory (holding ca/)"),
    name: str = typer.Option(..., "--name"),
    role: str = typer.Option(..., "--role", help="brand or partner"),
    host: list[str] = typer.Option([], "--host"),
) -> None:
    """Issue an identity for one more party."""
    from confide import pki

    out = pki.issue(dir, name, role, **({"hosts": tuple(host)} if host else {}))
    console.print(f"issued [bold]{name}[/bold] -> {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Directory for data, deployment and report"),
    scale: float = typer.Option(1.0, "--scale", min=0.05, help="Data size multiplier (1.0 = 5,000 brand members, 15,000 partner people)"),
    seed: int = typer.Option(42, "--seed"),
) -> None:
    """Run the end-to-end demo: three services with mTLS, synthetic data, agreement, every job."""
    from confide.demo import demo as run_demo

    run_demo(out, scale=scale, seed=seed)


# (module, attribute, name): command groups of the product packages, mounted at start-up.
_GROUPS = [
    ("coordinator.cli", "app", "coordinator"),
    ("party_node.cli", "app", "node"),
    ("psi.cli", "app", "psi"),
    ("federated.cli", "app", "train"),
    ("consent.cli", "app", "consent"),
    ("consent.audit_cli", "app", "audit"),
]


def _register_subcommands() -> None:
    # Imported here, not at module import, so `confide version` stays fast.
    import importlib

    for module, attr, name in _GROUPS:
        app.add_typer(getattr(importlib.import_module(module), attr), name=name)
    from party_node.synth_cli import synth

    app.command("synth")(synth)


def main(argv: Optional[list[str]] = None) -> None:
    _register_subcommands()
    try:
        rc = app(args=argv, standalone_mode=False)
    except ConfideError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", None) or getattr(exc, "code", 0) or 0
        sys.exit(code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)
