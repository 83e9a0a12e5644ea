"""`confide consent ...`: thin commands over the consent store.

Every command takes --database-url (default: SQLite `node.db` in --data-dir), --key-file (the
node's consent secret, default `consent.key` in --data-dir, created on first use) and --party
(a party consent may name as recipient; repeatable; recipients named by registered notices are
known too). Audit entries go to the database's Merkle audit log (`consent.audit`, log "local"). Errors are ConfideErrors; `confide.cli.main` turns them into messages and exit codes.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Any, Optional

import typer

from confide.errors import ConfigurationError, ValidationError
from consent import reports
from consent.importer import import_file, read_notices
from consent.store import ConsentStore, load_or_create_secret

app = typer.Typer(no_args_is_help=True, help="Consent and preferences: import, check, report.")
notice_app = typer.Typer(no_args_is_help=True, help="Privacy notice versions.")
app.add_typer(notice_app, name="notice")

_DB = typer.Option(None, "--database-url", help="SQLAlchemy URL (default sqlite:///<data-dir>/node.db)")
_DATA = typer.Option(Path("var"), "--data-dir", help="The node's data directory")
_KEY = typer.Option(None, "--key-file", help="Consent secret (default <data-dir>/consent.key)")
_PARTY = typer.Option([], "--party", help="A known recipient party; repeatable")


def open_store(database_url: Optional[str], data_dir: Path, key_file: Optional[Path], parties: list[str]) -> ConsentStore:
    """The store the commands work on, in the node's database brought to the newest node
    schema by the node's own migrations (the same ones `confide node serve` runs), so a
    database the CLI touched and a node database are identical."""
    from confide.db import make_engine

    data_dir = Path(data_dir)
    if database_url is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        database_url = f"sqlite:///{(data_dir / 'node.db').resolve()}"
    engine = make_engine(database_url)
    migrate_node_database(engine)
    secret = load_or_create_secret(key_file or data_dir / "consent.key")
    return ConsentStore(engine, secret_key=secret, recipients=parties, audit=_audit_log(engine))


def migrate_node_database(engine: Any) -> None:
    """Run the node migrations on `engine`'s database. Refuses (ConfigurationError) a database
    that holds consent or audit tables but no migration history: it was made some other way
    (e.g. `create_all`) and may differ from the node schema."""
    from sqlalchemy import inspect

    from party_node.storage import ensure_schema

    tables = set(inspect(engine).get_table_names())
    ours = {t for t in tables if t.startswith(("consent_", "audit_"))}
    if ours and "alembic_version" not in tables:
        raise ConfigurationError(
            f"database {engine.url.render_as_string(hide_password=True)} holds consent/audit tables "
            f"({', '.join(sorted(ours)[:3])}, ...) that the node migrations did not create; point --database-url "
            "at the node's database or at a new one (it will be migrated)"
        )
    ensure_schema(engine)


def _audit_log(engine: object) -> object:
    """The node's Merkle audit log in the same database (gate calls and imports are audited
    from the CLI too)."""
    from consent.audit import AuditLog

    return AuditLog(engine, None, "local")  # type: ignore[arg-type]


@app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="CSV or JSONL of consent events (optionally .gz)"),
    notices: Optional[Path] = typer.Option(None, "--notices", help="YAML/JSON notice versions to register first"),
    database_url: Optional[str] = _DB,
    data_dir: Path = _DATA,
    key_file: Optional[Path] = _KEY,
    party: list[str] = _PARTY,
) -> None:
    """Import consent events; idempotent by event_id (re-importing changes nothing)."""
    store = open_store(database_url, data_dir, key_file, party)
    if notices is not None:
        for n in read_notices(notices):
            store.register_notice(n)
    result = import_file(store, file)
    typer.echo(json.dumps({"recorded": result.recorded, "duplicates": result.duplicates}))


@notice_app.command("add")
def notice_add(
    file: Path = typer.Argument(..., help="YAML/JSON holding one notice version or a list"),
    database_url: Optional[str] = _DB,
    data_dir: Path = _DATA,
    key_file: Optional[Path] = _KEY,
    party: list[str] = _PARTY,
) -> None:
    """Register notice versions (immutable: other content under an existing version fails)."""
    store = open_store(database_url, data_dir, key_file, party)
    for n in read_notices(file):
        out = store.register_notice(n)
        typer.echo(f"{out.version} {out.content_hash}")


@app.command("check")
def check_cmd(
    subjects: Path = typer.Option(..., "--subjects", help="One subject per line, or a CSV (column 'subject' or the first)"),
    purpose: str = typer.Option(..., "--purpose"),
    recipient: Optional[str] = typer.Option(None, "--recipient"),
    at: Optional[str] = typer.Option(None, "--at", help="ISO time (default now)"),
    as_json: bool = typer.Option(False, "--json", help="Print the decision as JSON"),
    database_url: Optional[str] = _DB,
    data_dir: Path = _DATA,
    key_file: Optional[Path] = _KEY,
    party: list[str] = _PARTY,
) -> None:
    """Ask the gate which subjects may be processed for PURPOSE (audited)."""
    when = _parse_time(at, "--at") if at else dt.datetime.now(dt.timezone.utc)
    subject_list = _read_subjects(subjects)
    store = open_store(database_url, data_dir, key_file, party)
    d = store.allowed(subject_list, purpose, recipient, when)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "purpose": d.purpose,
                    "recipient": d.recipient,
                    "at": d.at.isoformat(),
                    "allowed": d.allowed,
                    "evidence": d.evidence,
                    "allowed_count": d.allowed_count,
                    "denied_count": d.denied_count,
                    "denied_counts": d.denied_counts,
                }
            )
        )
    else:
        typer.echo(f"allowed {d.allowed_count} of {len(subject_list)} for {purpose}" + (f" with {recipient}" if recipient else ""))
        for reason, n in d.denied_counts.items():
            typer.echo(f"  denied {n}: {reason}")


@app.command("deliverable")
def deliverable_cmd(
    subjects: Path = typer.Option(..., "--subjects", help="One subject per line, or a CSV (column 'subject' or the first)"),
    purpose: str = typer.Option(..., "--purpose", help="An activation.* or marketing.* purpose"),
    channel: str = typer.Option(..., "--channel", help="sms, wecom, email or app_push"),
    topic: str = typer.Option(..., "--topic", help="The message's content topic"),
    recipient: Optional[str] = typer.Option(None, "--recipient", help="Party the delivery goes through"),
    at: Optional[str] = typer.Option(None, "--at", help="ISO time (default now)"),
    job_ref: Optional[str] = typer.Option(None, "--job-ref", help="The campaign or job"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Do not record the contacts"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
    database_url: Optional[str] = _DB,
    data_dir: Path = _DATA,
    key_file: Optional[Path] = _KEY,
    party: list[str] = _PARTY,
) -> None:
    """Which subjects an activation job may contact now (consent and preferences; audited)."""
    when = _parse_time(at, "--at") if at else dt.datetime.now(dt.timezone.utc)
    subject_list = _read_subjects(subjects)
    store = open_store(database_url, data_dir, key_file, party)
    out = store.deliverable(subject_list, purpose, channel, topic, when, recipient=recipient,
                            record=not dry_run, job_ref=job_ref)
    if as_json:
        typer.echo(out.model_dump_json())
    else:
        typer.echo(f"deliverable {out.deliverable_count} of {len(set(subject_list))} on {channel} about {topic}"
                   + ("" if dry_run else f" ({out.recorded} contacts recorded)"))
        for reason, n in out.denied_counts.items():
            typer.echo(f"  denied {n}: {reason}")


@app.command("purge")
def purge_cmd(
    database_url: Optional[str] = _DB,
    data_dir: Path = _DATA,
    key_file: Optional[Path] = _KEY,
    party: list[str] = _PARTY,
) -> None:
    """Reduce consent records older than the retention period (CONFIDE_CONSENT_RETENTION_DAYS,
    at least 1096 days): drop encrypted identifiers of superseded events, delete old gate-call
    and contact rows. Evidence hashes and current rules stay. Audited."""
    store = open_store(database_url, data_dir, key_file, party)
    typer.echo(json.dumps(store.purge()))


@app.command("report")
def report_cmd(
    kind: str = typer.Option("coverage", "--kind", help="coverage or processing"),
    fmt: str = typer.Option("json", "--format", help="json or csv"),
    out: Optional[Path] = typer.Option(None, "--out", help="Write here instead of stdout"),
    periods: int = typer.Option(12, "--periods", help="Coverage: monthly points in time"),
    database_url: Optional[str] = _DB,
    data_dir: Path = _DATA,
    key_file: Optional[Path] = _KEY,
    party: list[str] = _PARTY,
) -> None:
    """Compliance reports: consent coverage over time, or the record of processing activities."""
    if kind not in ("coverage", "processing"):
        raise ValidationError(f"--kind: expected coverage or processing, not {kind!r}", field="kind")
    if fmt not in ("json", "csv"):
        raise ValidationError(f"--format: expected json or csv, not {fmt!r}", field="format")
    store = open_store(database_url, data_dir, key_file, party)
    if kind == "coverage":
        rows, cols = reports.coverage(store, periods=periods), reports.COVERAGE_COLUMNS
    else:
        rows, cols = reports.processing_activities(store), reports.PROCESSING_COLUMNS
    text = reports.to_csv(rows, cols) if fmt == "csv" else reports.to_json(rows)
    if out is not None:
        out.write_text(text, encoding="utf-8")
    else:
        typer.echo(text)


def _parse_time(value: str, field: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(f"{field}: {value!r} is not an ISO 8601 time", field=field) from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _read_subjects(path: Path) -> list[str]:
    if not path.is_file():
        raise ValidationError(f"--subjects: {path} does not exist", field="subjects")
    with path.open(encoding="utf-8", newline="") as fh:
        if path.suffix.lower() == ".csv":
            rows = list(csv.reader(fh))
            if not rows:
                return []
            header = [h.strip() for h in rows[0]]
            col = header.index("subject") if "subject" in header else 0
            return [r[col].strip() for r in rows[1:] if r and r[col].strip()]
        return [line.strip() for line in fh if line.strip()]
