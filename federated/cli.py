"""`confide train`: vertical federated training.

    confide train local --guest G.csv --host H.csv [--host H2.csv] --id id --label y
                        [--test-fraction 0.2] [--seed 42] [--loss irls|taylor] [--json]

A thin shell over `federated.local.run_local`; errors are ConfideErrors and map to exit codes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from confide.errors import ConfideError

app = typer.Typer(help="Vertical federated training (brand labels + partner features).", no_args_is_help=True)


@app.command("local")
def local(
    guest: Path = typer.Option(..., "--guest", help="Guest (brand) CSV: id, label and features"),
    host: list[Path] = typer.Option(..., "--host", help="Host (partner) CSV: id and features; repeat for more hosts"),
    id_col: str = typer.Option("id", "--id", help="Join column present in every file"),
    label: str = typer.Option("y", "--label", help="0/1 label column of the guest file"),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of matched rows held out"),
    seed: int = typer.Option(42, "--seed", help="Split and mini-batch seed (shared by all parties)"),
    key_bits: int = typer.Option(2048, "--key-bits", help="Paillier key size (>= 2048)"),
    batch_size: int = typer.Option(4096, "--batch-size", help="Rows per mini-batch (0: full batch)"),
    max_epochs: int = typer.Option(30, "--max-epochs"),
    loss: str = typer.Option("irls", "--loss", help="irls (second order at the guest's own LR) or taylor (FATE)"),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", help="default: 1.0 for irls, 0.3 for taylor"),
    l2: float = typer.Option(0.0, "--l2", help="L2 penalty"),
    tol: float = typer.Option(1e-4, "--tol", help="Early stopping: minimum loss change per epoch"),
    k_min: int = typer.Option(50, "--k-min", help="Minimum rows per batch and in total"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes per party (default: all cores)"),
    precompute: bool = typer.Option(False, "--precompute-obfuscators",
                                    help="Parties compute their r^n for the arbiter key before training starts, as "
                                         "nodes with an idle-time stock do; both phases are timed"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Run guest, host(s) and arbiter as separate local processes with the real protocol and
    print held-out metrics of the federated model beside the guest-only model."""
    from federated.local import run_local
    from federated.roles import TrainConfig

    try:
        cfg = TrainConfig(key_bits=key_bits, batch_size=batch_size, max_epochs=max_epochs, loss=loss,
                          learning_rate=learning_rate, l2=l2, tol=tol, k_min=k_min, seed=seed)
        report = run_local(guest, host, id_col=id_col, label=label, test_fraction=test_fraction, seed=seed,
                           config=cfg, workers=workers, precompute=precompute)
    except ConfideError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc.message}")
        raise SystemExit(exc.exit_code) from exc
    except ValueError as exc:  # pydantic validation of the options
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise SystemExit(2) from exc
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    t = Table(title=f"held-out ({report['test_rows']:,} rows), {report['key_bits']}-bit Paillier")
    t.add_column("metric")
    t.add_column("federated", justify="right")
    t.add_column("guest only", justify="right")
    for k in ("auc", "ks", "pr_auc", "lift_top_decile", "brier", "ece"):
        t.add_row(k, f"{report[k]:.4f}", f"{report['guest_only'][k]:.4f}")
    t.add_row("auc, guest alone with exact LR", "", f"{report['guest_only_exact_lr_auc']:.4f}")
    t.add_row("loss", report["loss"], "")
    Console().print(t)
    Console().print(
        f"{report['epochs']} epochs ({report['stop_reason']}), {report['seconds_per_epoch']:.2f} s/epoch, "
        f"setup {report['setup_seconds']:.1f} s, wall {report['wall_seconds']:.1f} s"
    )
    if precompute:
        Console().print(f"obfuscators precomputed in {report['precompute_seconds']:.1f} s (guest), then "
                        f"{report['wall_after_precompute_seconds']:.1f} s to the trained model")
