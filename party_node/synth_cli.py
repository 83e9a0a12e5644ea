"""`confide synth`: generate realistic synthetic brand and partner datasets.

A thin shell over `party_node.synth.generate`. `synth` is a plain function with Typer option
defaults so the main CLI registers it with `app.command("synth")(synth)`; `app` runs it alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from confide.errors import ValidationError


def synth(
    out: Path = typer.Option(..., "--out", help="Directory to write the datasets into (created if missing)"),
    members: int = typer.Option(20_000, "--members", help="Brand members"),
    partner_factor: float = typer.Option(3.0, "--partner-factor", help="Partner population = members x this"),
    leads: Optional[int] = typer.Option(None, "--leads", help="Brand leads (default members / 4)"),
    new_leads: Optional[int] = typer.Option(None, "--new-leads", help="Fresh leads to score, no outcome yet (default leads / 10)"),
    overlap: float = typer.Option(0.35, "--overlap", help="Share of members the partner also knows"),
    lead_overlap: Optional[float] = typer.Option(None, "--lead-overlap",
                                                 help="Share of non-member leads the partner also knows (default --overlap)"),
    seed: int = typer.Option(42, "--seed", help="Random seed; same seed => identical files"),
    fmt: str = typer.Option("csv", "--format", help="csv or parquet"),
    brand_name: str = typer.Option("brand", "--brand-name", help="The brand party's name"),
    partner_name: str = typer.Option("partner", "--partner-name", help="The partner party's name"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
) -> None:
    """Generate deterministic synthetic data for a brand and a partner, with planted ground truth."""
    from party_node.synth import generate

    try:
        summary = generate(out, members=members, partner_factor=partner_factor, leads=leads,
                           overlap=overlap, seed=seed, fmt=fmt, brand_name=brand_name,
                           partner_name=partner_name, new_leads=new_leads, lead_overlap=lead_overlap)
    except ValidationError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc.message}")
        # SystemExit, not typer.Exit: under `confide.cli.main` (standalone_mode=False) click
        # returns a typer.Exit's code instead of exiting, which would end the process with 0.
        raise SystemExit(exc.exit_code) from exc
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    console = Console()
    files = Table(title=f"confide synth -> {summary['out_dir']} ({summary['format']}, seed {summary['seed']})")
    files.add_column("dataset")
    files.add_column("rows", justify="right")
    files.add_column("file")
    for name, info in summary["files"].items():
        files.add_row(name, f"{info['rows']:,}" if "rows" in info else "", Path(info["path"]).name)
    console.print(files)

    ov, em = summary["overlap"], summary["expected_matches"]
    truth = Table(title="planted ground truth")
    truth.add_column("measure")
    truth.add_column("value", justify="right")
    truth.add_row("members also at partner", f"{ov['members_in_partner']:,} ({ov['members_fraction']:.1%})")
    truth.add_row("leads also at partner", f"{ov['leads_in_partner']:,} ({ov['leads_fraction']:.1%})")
    for ident in ("phone", "email", "unionid", "openid", "any"):
        truth.add_row(f"  members matchable by {ident}", f"{em['brand_members'][ident]:,}")
    truth.add_row("high-value member rate", f"{summary['labels']['high_value_rate']:.1%}")
    truth.add_row("lead conversion rate", f"{summary['labels']['lead_conversion_rate']:.1%}")
    auc = summary["lead_scoring_auc"]
    model = summary["lead_scoring_auc_model_features"]
    for key, label, src in (("brand_only", "lead AUC, brand features only", auc),
                            ("with_partner", "lead AUC, with partner features", auc),
                            ("brand_only", "  same, the demo model's brand features", model),
                            ("with_partner", "  same, with the demo model's partner features", model),
                            ("oracle", "lead AUC, planted propensity (ceiling)", auc)):
        truth.add_row(label, "n/a" if src[key] is None else f"{src[key]:.3f}")
    new = summary["new_leads"]
    truth.add_row("new leads (to score) / also at partner", f"{new['rows']:,} / {new['in_partner']:,}")
    for side, rates in summary["consent_action_rates"].items():
        truth.add_row(f"{side} consent granted / refused / withdrawn",
                      f"{rates['granted']:.0%} / {rates['refused']:.0%} / {rates['withdrawn']:.0%}")
    console.print(truth)
    if auc["brand_only"] is None:
        console.print(f"[yellow]note:[/yellow] {auc['note']}")


app = typer.Typer(add_completion=False, help="Generate synthetic brand and partner datasets.")
app.command("synth")(synth)

if __name__ == "__main__":
    app()
