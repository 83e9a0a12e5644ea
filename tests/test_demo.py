"""The end-to-end demo (what `make demo` runs), at a small scale: every stage, the report built
from the jobs' own numbers, the partner's value visible, no raw identifier in the report."""

from __future__ import annotations

import csv
import json
from html import unescape
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_demo_runs_every_stage_and_reports_the_partners_value(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "confide", "demo", "--scale", "0.3", "--seed", "42", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = unescape((out / "report.html").read_text())
    for title in ("Registry", "Ingest", "Consent", "Agreement", "Job: dataset-stats", "Job: overlap",
                  "Job: match", "Job: profile", "Job: train", "Job: score", "New leads: the follow-up list",
                  "New leads: 90 days later", "The partner's value"):
        assert title in html, title

    facts = json.loads((out / "facts.json").read_text())
    truth = json.loads((out / "data" / "ground_truth.json").read_text())
    train, score = facts["train"], facts["score"]
    # Training: the rows really used, and the held-out comparison the brand sees.
    assert 50 <= train["rows"] <= train["matched_rows"] <= truth["rows"]["brand_leads"]
    assert train["train_rows"] + train["test_rows"] == train["rows"]
    assert 0.5 < train["guest_only"]["auc"] < train["joint"]["auc"] < 1.0, train
    assert train["joint"]["lift_top_decile"] > 1.0
    # The synth's ground truth (pooled plaintext) says the partner's signals add signal too.
    assert truth["lead_scoring_auc_model_features"]["with_partner"] > truth["lead_scoring_auc_model_features"]["brand_only"]

    # Scoring the new leads: every lead accounted for, the counts tie together.
    new_leads = rows(out / "data" / "brand_new_leads.csv")
    assert score["leads"] == len(new_leads)
    assert score["scored"] + score["not_scored"] == score["leads"]
    assert score["not_scored"] == sum(score["denied"].values()) > 0  # refusals and opt-outs exist
    jointly = score["scored"] - score["partner_missing"]
    assert jointly == score["partner_contributed"] > 0 and score["partner_missing"] > 0
    assert jointly <= truth["new_leads"]["in_partner"]  # only leads the partner knows get its part
    realised = score["realised"]
    assert realised["all"]["leads"] == score["scored"]
    assert realised["joint"]["leads"] + realised["partner_missing"]["leads"] == score["scored"]
    outcomes = {r["lead_id"]: r["converted"] for r in rows(out / "data" / "brand_new_leads_outcomes.csv")}
    assert realised["all"]["converted"] <= sum(v == "1" for v in outcomes.values())

    # The report shows the jobs' numbers (not made-up ones).
    assert f"{train['joint']['auc']:.3f}" in html and f"{train['guest_only']['auc']:.3f}" in html
    assert f"{score['partner_missing']:,}" in html and f"{score['not_scored']:,}" in html
    for name in ("brand_members", "brand_leads"):
        phones = [r["phone"] for r in rows(out / "data" / f"{name}.csv")[:200] if r["phone"]]
        assert phones and not any(p in html for p in phones)
    leads_phones = [r["phone"] for r in new_leads[:200] if r["phone"]]
    assert not any(p in html for p in leads_phones)
