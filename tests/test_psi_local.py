"""`confide psi local`: both roles in separate processes over real wire bytes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from typer.testing import CliRunner

from psi.cli import app
from psi.local import run_local
from psi.messages import Mode


def _csv(path: Path, column: str, values: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["member_id", column])
        for i, v in enumerate(values):
            w.writerow([i, v])
    return path


def test_cli_local_json(tmp_path: Path) -> None:
    a = _csv(tmp_path / "a.csv", "phone", [f"138 0000 {i:04d}" for i in range(300)] + ["bad"])
    b = _csv(tmp_path / "b.csv", "mobile", [f"+86 1380000{i:04d}" for i in range(200, 500)])
    res = CliRunner().invoke(app, ["local", "--left", str(a), "--right", str(b), "--id", "phone",
                                   "--right-column", "mobile", "--workers", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["intersection_size"] == 100
    assert out["bytes"] > 32 * 600 and out["seconds"] > 0 and out["peak_rss_mb"] > 0
    assert out["left"]["invalid"] == 1


def test_run_local_match_in_memory() -> None:
    r = run_local([f"x{i}" for i in range(50)], [f"x{i}" for i in range(25, 80)],
                  id_type="openid", mode=Mode.match, workers=1)
    assert r.intersection_size == 25
    assert r.left["matched_rows"] == 25 and r.right["matched_rows"] == 25
