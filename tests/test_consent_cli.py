"""`confide consent ...`: import, check, report, notice add (Typer CliRunner, SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from confide.db import make_engine
from confide.errors import ValidationError
from consent.audit import AuditLog
from consent.cli import app

NOTICE_YAML = """
notice: member
version: member/1
published_at: 2025-12-01T00:00:00Z
purposes:
  - purpose: modeling
    data_categories: [orders]
  - purpose: sharing.third_party
    recipients: [partner]
    data_categories: [phone]
"""
CSV = """event_id,subject,identifier,purpose,recipient,action,channel,notice_version,valid_from,valid_until,received_at
c1,m1,13800000001,modeling,,granted,store,member/1,,,2026-01-01T00:00:00Z
c2,m2,,modeling,,granted,call_centre,member/1,,2026-01-10T00:00:00Z,2026-01-01T00:00:00Z
c3,m3,,sharing.third_party,partner,granted,web,member/1,,,2026-01-01T00:00:00Z
c4,m1,,sharing.third_party,partner,refused,app,,,,2026-01-02T00:00:00Z
"""


@pytest.fixture
def env(tmp_path: Path) -> tuple[CliRunner, list[str], Path]:
    (tmp_path / "notice.yaml").write_text(NOTICE_YAML)
    (tmp_path / "events.csv").write_text(CSV)
    (tmp_path / "subjects.txt").write_text("m1\nm2\nm3\nm4\n")
    return CliRunner(), ["--data-dir", str(tmp_path / "var")], tmp_path


def test_import_is_idempotent_then_check_and_report(env: tuple[CliRunner, list[str], Path]) -> None:
    runner, common, d = env
    r = runner.invoke(app, ["import", str(d / "events.csv"), "--notices", str(d / "notice.yaml"), *common])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"recorded": 4, "duplicates": 0}
    r = runner.invoke(app, ["import", str(d / "events.csv"), *common])
    assert json.loads(r.output) == {"recorded": 0, "duplicates": 4}
    assert (d / "var" / "consent.key").stat().st_mode & 0o077 == 0  # secret not readable by others

    r = runner.invoke(app, ["check", "--subjects", str(d / "subjects.txt"), "--purpose", "modeling.lookalike",
                            "--at", "2026-01-05T00:00:00+00:00", "--json", *common])
    out = json.loads(r.output)
    assert out["allowed"] == ["m1", "m2"] and out["denied_counts"] == {"no_consent": 2}
    r = runner.invoke(app, ["check", "--subjects", str(d / "subjects.txt"), "--purpose", "sharing.third_party",
                            "--recipient", "partner", "--at", "2026-01-20", "--json", *common])
    out = json.loads(r.output)
    assert out["allowed"] == ["m3"] and out["denied_counts"] == {"no_consent": 2, "refused": 1}
    log = AuditLog(make_engine(f"sqlite:///{d / 'var' / 'node.db'}"), None, "local")
    last = log.entry(log.size() - 1)
    assert last.kind == "consent.gate" and last.payload is not None and last.payload["allowed"] == 1

    report = d / "coverage.csv"
    r = runner.invoke(app, ["report", "--format", "csv", "--out", str(report), "--periods", "1", *common])
    assert r.exit_code == 0, r.output
    lines = report.read_text().splitlines()
    assert lines[0].startswith("at,purpose,recipient") and len(lines) == 3  # header + 2 (purpose, recipient) rows


def test_errors_carry_the_field_and_exit_code(env: tuple[CliRunner, list[str], Path]) -> None:
    runner, common, d = env
    runner.invoke(app, ["notice", "add", str(d / "notice.yaml"), *common])
    bad = d / "bad.csv"
    bad.write_text(CSV.replace("c3,m3,,sharing.third_party,partner", "c3,m3,,sharing.third_party,acme"))
    r = runner.invoke(app, ["import", str(bad), *common])
    assert isinstance(r.exception, ValidationError) and r.exception.exit_code == 2
    assert "bad.csv line 4.recipient" in r.exception.message
    r = runner.invoke(app, ["check", "--subjects", str(d / "subjects.txt"), "--purpose", "nope", *common])
    assert isinstance(r.exception, ValidationError) and "purpose" in r.exception.message
    r = runner.invoke(app, ["report", "--kind", "everything", *common])
    assert isinstance(r.exception, ValidationError) and "--kind" in r.exception.message


def test_cli_database_is_the_node_schema_via_migrations(env: tuple[CliRunner, list[str], Path]) -> None:
    from sqlalchemy import inspect, text

    from confide import db
    from consent.models import ensure_tables
    from party_node.storage import metadatas

    runner, common, d = env
    r = runner.invoke(app, ["notice", "add", str(d / "notice.yaml"), *common])
    assert r.exit_code == 0, r.output
    engine = make_engine(f"sqlite:///{d / 'var' / 'node.db'}")
    assert db.schema_diff(engine, metadatas()) == []  # exactly what the node migrations make
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert "consent_contacts" in inspect(engine).get_table_names()
    # A database whose consent tables were made some other way is refused, not patched.
    other = make_engine(f"sqlite:///{d / 'adhoc.db'}")
    ensure_tables(other)
    r = runner.invoke(app, ["notice", "add", str(d / "notice.yaml"), "--database-url", f"sqlite:///{d / 'adhoc.db'}",
                            *common])
    assert r.exit_code != 0 and "node migrations did not create" in str(r.exception)


def test_deliverable_command_records_contacts_and_honours_the_cap(env: tuple[CliRunner, list[str], Path]) -> None:
    runner, common, d = env
    notice = NOTICE_YAML + "  - purpose: marketing\n    data_categories: [orders]\n"
    (d / "notice.yaml").write_text(notice)
    (d / "mkt.csv").write_text(CSV.splitlines()[0] + "\n"
                               "k1,m1,,marketing,,granted,app,member/1,,,2026-01-01T00:00:00Z\n"
                               "k2,m2,,marketing,,granted,app,member/1,,,2026-01-01T00:00:00Z\n")
    assert runner.invoke(app, ["import", str(d / "mkt.csv"), "--notices", str(d / "notice.yaml"), *common]).exit_code == 0
    from consent.cli import open_store

    store = open_store(None, d / "var", None, [])
    store.set_preferences("m2", {"channels": {"sms": True}, "frequency_cap": {"max_messages": 1, "per": "week"}})
    args = ["deliverable", "--subjects", str(d / "subjects.txt"), "--purpose", "marketing.general", "--channel", "sms",
            "--topic", "service", "--at", "2026-02-02T03:00:00+00:00", "--json", *common]
    first = json.loads(runner.invoke(app, args).output)
    assert first["deliverable"] == ["m1", "m2"] and first["recorded"] == 2
    assert first["denied_counts"] == {"no_consent": 2}
    second = json.loads(runner.invoke(app, args).output)
    assert second["deliverable"] == ["m1"] and second["denied_counts"] == {"frequency_cap": 1, "no_consent": 2}
    r = runner.invoke(app, [*args[:-len(common) - 1], "--dry-run", *common])
    assert r.exit_code == 0 and "deliverable 1 of 4 on sms about service" in r.output
    r = runner.invoke(app, [*args[:6], "fax", *args[7:]])
    assert isinstance(r.exception, ValidationError) and "channel" in r.exception.message
