"""Synthetic-data generator benchmark.

    python bench/synth_bench.py                       # 1M brand members, then the full run
    python bench/synth_bench.py --members 1000000 --full-members 0
    python bench/synth_bench.py --results bench/RESULTS.md   # also append a result section

Target (synth issue): 1M rows in <= 60 s on the 2-core bench machine. Two measurements:

1. *members*: draw the people, build the 1M-row `brand_members` table (messy identifiers,
   demographics, RFM and behaviour features) and write it as CSV — rows/s of that table.
2. *full*: `party_node.synth.generate` end to end for `--full-members` members (leads, a 3x
   partner population, consent events for both sides, the ground-truth AUC fits, all files) —
   seconds and rows/s over every row written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from party_node import synth  # noqa: E402


def bench_members(n: int, out: Path, seed: int, fmt: str) -> dict[str, object]:
    t0 = time.perf_counter()
    people = synth.make_people(n, seed)
    t1 = time.perf_counter()
    members = synth.brand_members(people, np.arange(n), seed)
    t2 = time.perf_counter()
    path = out / f"brand_members.{fmt}"
    synth.write_table(members.data, path, fmt)
    t3 = time.perf_counter()
    return {
        "rows": n, "seconds": round(t3 - t0, 2), "rows_per_s": round(n / (t3 - t0)),
        "people_s": round(t1 - t0, 2), "build_s": round(t2 - t1, 2), "write_s": round(t3 - t2, 2),
        "bytes": path.stat().st_size,
    }


def bench_full(members: int, out: Path, seed: int, fmt: str) -> dict[str, object]:
    t0 = time.perf_counter()
    summary = synth.generate(out, members=members, seed=seed, fmt=fmt)
    seconds = time.perf_counter() - t0
    rows = sum(summary["rows"].values())
    return {
        "members": members, "rows": summary["rows"], "total_rows": rows, "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "auc_brand_only": summary["lead_scoring_auc"]["brand_only"],
        "auc_with_partner": summary["lead_scoring_auc"]["with_partner"],
        "bytes": sum(p.stat().st_size for p in out.iterdir()),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 1),
    }


def results_section(result: dict[str, object]) -> str:
    m = result["members"]
    lines = [
        f"## synth — {result['date']}",
        "",
        f"Machine: {result['cpus']} cores (shared; 1-min load average {result['load_avg_1m']} at start), "
        f"Python {result['python']}, numpy {result['numpy']}; "
        f"`python bench/synth_bench.py --members {m['rows']} --full-members {result['full_members']} "
        f"--format {result['format']}`.",
        "",
        "| run | rows | seconds | rows/s |",
        "|---|---:|---:|---:|",
        f"| brand_members table (people + build + write {result['format']}) | {m['rows']:,} | {m['seconds']} "
        f"| {m['rows_per_s']:,} |",
    ]
    f = result.get("full")
    if f:
        lines.append(f"| full `generate` ({f['members']:,} members: members, leads, 3x partner, both consent "
                     f"logs, AUC fits) | {f['total_rows']:,} | {f['seconds']} | {f['rows_per_s']:,} |")
    lines.append("")
    lines.append(f"Members table breakdown: people {m['people_s']} s, build {m['build_s']} s, "
                 f"write {m['write_s']} s." + (f" Target 1M rows <= 60 s: {'met' if m['seconds'] <= 60 else 'NOT met'}."
                                              if m["rows"] >= 1_000_000 else ""))
    if f:
        lines.append(f"Full run: {f['bytes'] / 1e9:.1f} GB written, peak memory {f['peak_rss_gb']} GB.")
        rows = ", ".join(f"{k} {v:,}" for k, v in f["rows"].items())
        lines.append(f"Full run rows: {rows}. Lead AUC on the overlapped leads: brand only "
                     f"{f['auc_brand_only']}, with partner features {f['auc_with_partner']}.")
    return "\n".join(lines) + "\n"


def append_results(path: Path, section: str) -> None:
    """Append our section; other sections of the file stay as they are."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text + "\n" + section, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=1_000_000, help="rows of the members-table run")
    ap.add_argument("--full-members", type=int, default=1_000_000, help="members of the full run (0: skip)")
    ap.add_argument("--format", choices=synth.FORMATS, default="csv")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    ap.add_argument("--results", type=Path, default=None, help="append a markdown section to this file")
    args = ap.parse_args()

    scratch = args.out or Path(tempfile.mkdtemp(prefix="synth-bench-"))
    try:
        result: dict[str, object] = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "format": args.format, "full_members": args.full_members,
            # The bench machine is shared: record how busy it was.
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        (scratch / "members").mkdir(parents=True, exist_ok=True)
        result["members"] = bench_members(args.members, scratch / "members", args.seed, args.format)
        m = result["members"]
        print(f"brand_members: {m['rows']:,} rows in {m['seconds']} s = {m['rows_per_s']:,} rows/s", flush=True)
        if args.full_members > 0:
            result["full"] = bench_full(args.full_members, scratch / "full", args.seed, args.format)
            f = result["full"]
            print(f"full generate ({f['members']:,} members): {f['total_rows']:,} rows in {f['seconds']} s "
                  f"= {f['rows_per_s']:,} rows/s", flush=True)
        print(json.dumps(result, indent=2))
        if args.results:
            append_results(args.results, results_section(result))
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
