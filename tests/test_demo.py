"""The end-to-end demo (what `make demo` runs), at a small scale: every stage, report written,
no raw identifier in the report."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_writes_a_clean_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "confide", "demo", "--scale", "0.1", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = (out / "report.html").read_text()
    for title in ("Registry", "Ingest", "Consent", "Agreement", "Job: dataset-stats", "Job: overlap",
                  "Job: match", "Job: profile", "Job: train", "Job: score"):
        assert title in html, title
    with open(out / "data" / "brand_members.csv", newline="") as fh:
        phones = [row["phone"] for row, _ in zip(csv.DictReader(fh), range(200)) if row["phone"]]
    assert phones and not any(p in html for p in phones)
