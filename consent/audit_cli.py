"""`confide audit ...`: verify the node's Merkle audit log, sign its head, print proofs.

Thin shells over `consent.audit`. `verify` exits 0 when the log is consistent with every head
given, 1 when it is not (naming the first bad entry); usage and configuration errors use the
exit codes of `confide.errors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from confide.errors import ConfigurationError, ValidationError

app = typer.Typer(help="The node's tamper-evident audit log: verify, sign heads, proofs.", no_args_is_help=True)

VERIFY_FAILED_EXIT = 1


def _engine(url: str) -> Engine:
    from confide.db import make_engine

    return make_engine(url)


def _guard(fn: Any) -> Any:
    """Turn a database without the audit tables into a clear configuration error."""
    try:
        return fn()
    except SQLAlchemyError as exc:
        raise ConfigurationError(
            f"cannot read the audit log ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "is the database URL right and the node schema migrated?"
        ) from exc


def load_heads(path: Path) -> list[Any]:
    """Heads from a JSON list, ``{"heads": [...]}``, one head object, or JSON lines."""
    from consent.audit import SignedTreeHead

    try:
        raw = path.read_text()
    except FileNotFoundError as exc:
        raise ValidationError(f"heads file not found: {path}", field="heads") from exc
    try:
        doc: Any = json.loads(raw)
    except json.JSONDecodeError:
        try:
            doc = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{path} is neither JSON nor JSON lines: {exc}", field="heads") from exc
    if isinstance(doc, dict) and "heads" in doc:
        doc = doc["heads"]
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise ValidationError(f"{path} must hold a list of tree heads", field="heads")
    heads = []
    for i, d in enumerate(doc):
        try:
            heads.append(SignedTreeHead.from_dict(d))
        except ValidationError as exc:
            raise ValidationError(f"{path}: head #{i}: {exc.message}", field="heads") from exc
    return heads


def _public_key(public_key: Optional[str], cert: Optional[Path], ca: Optional[Path]) -> tuple[Any, Optional[str]]:
    """The verifying key, and the certificate's name when it came from one."""
    from confide import pki
    from consent.audit import _public_key as parse_key

    if (public_key is None) == (cert is None):
        raise ValidationError("give exactly one of --public-key HEX or --cert cert.pem", field="public_key")
    if public_key is not None:
        return parse_key(public_key.strip()), None
    assert cert is not None
    ca_path = ca or cert.parent / "ca.pem"
    try:
        info = pki.verify_certificate(cert.read_bytes(), ca_path.read_bytes())
    except FileNotFoundError as exc:
        raise ValidationError(f"cannot read {exc.filename} (use --ca to name the CA certificate)",
                              field="cert") from exc
    return info.identity_public, info.name


@app.command("verify")
def verify(
    database_url: str = typer.Option(..., "--database-url", help="SQLAlchemy URL of the node database"),
    heads: Optional[Path] = typer.Option(None, "--heads", help="JSON file of signed tree heads to check against"),
    peer_db: Optional[str] = typer.Option(
        None, "--peer-database-url", help="Also check the heads a peer kept for this log (its audit_peer_heads)"
    ),
    public_key: Optional[str] = typer.Option(None, "--public-key", help="The log's Ed25519 identity key, hex"),
    cert: Optional[Path] = typer.Option(None, "--cert", help="The node's certificate (its identity key is used)"),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate for --cert (default: ca.pem beside it)"),
    log_name: Optional[str] = typer.Option(None, "--log", help="Log name (default: from --cert or the heads)"),
    json_out: bool = typer.Option(False, "--json", help="Print the full report as JSON"),
) -> None:
    """Prove the log was not altered, truncated or rewritten since the given heads.

    Exit 0 with a summary when the log matches every head; exit 1 naming the first bad entry
    (or, for history rewritten with fresh hashes, the range it lies in) otherwise.
    """
    from consent.audit import AuditLog, HeadStore, verify_log

    if heads is None and peer_db is None:
        raise ValidationError("give --heads FILE and/or --peer-database-url URL", field="heads")
    key, cert_name = _public_key(public_key, cert, ca)
    given = load_heads(heads) if heads is not None else []
    name = log_name or cert_name or (given[0].log if given else None)
    if not name:
        raise ValidationError("name the log with --log (or give --cert or a non-empty heads file)", field="log")
    if peer_db is not None:
        peer = _engine(peer_db)
        try:
            given += _guard(lambda: HeadStore(peer).heads(name))
        finally:
            peer.dispose()
    engine = _engine(database_url)
    try:
        report = _guard(lambda: verify_log(AuditLog(engine, None, name), given, key))
    finally:
        engine.dispose()
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(report.summary())
        for p in report.problems[1:6]:
            typer.echo(f"  also: {p.message}")
    if not report.ok:
        raise typer.Exit(VERIFY_FAILED_EXIT)


def _append_head(path: Path, head: dict[str, Any]) -> None:
    existing: list[Any] = []
    if path.exists() and path.read_text().strip():
        doc = json.loads(path.read_text())
        existing = doc["heads"] if isinstance(doc, dict) and "heads" in doc else doc if isinstance(doc, list) else [doc]
    existing.append(head)
    path.write_text(json.dumps(existing, indent=2) + "\n")


@app.command("head")
def head(
    database_url: str = typer.Option(..., "--database-url", help="SQLAlchemy URL of the node database"),
    identity: Path = typer.Option(..., "--identity", help="The node's PKI directory (identity.key, cert.pem)"),
    log_name: Optional[str] = typer.Option(None, "--log", help="Log name (default: the identity's name)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also append the head to this JSON list file"),
) -> None:
    """Sign the current tree head with the node's identity key; print it as JSON."""
    from confide import pki
    from consent.audit import AuditLog

    ident = pki.load_identity(identity)
    engine = _engine(database_url)
    try:
        sth = _guard(lambda: AuditLog(engine, ident, log_name or ident.name).sign_head())
    finally:
        engine.dispose()
    if out is not None:
        _append_head(out, sth.to_dict())
    typer.echo(json.dumps(sth.to_dict(), indent=2))


@app.command("proof")
def proof(
    database_url: str = typer.Option(..., "--database-url", help="SQLAlchemy URL of the node database"),
    seq: int = typer.Option(..., "--seq", help="The entry to prove"),
    size: Optional[int] = typer.Option(None, "--size", help="Tree size to prove against (default: current)"),
) -> None:
    """Print entry SEQ with its inclusion proof and the root it proves against, as JSON."""
    from consent.audit import AuditLog

    engine = _engine(database_url)
    try:
        log = AuditLog(engine, None, "local")

        def _do() -> dict[str, Any]:
            p = log.inclusion_proof(seq, size)
            e = log.entry(seq)
            return {
                "entry": {"seq": e.seq, "kind": e.kind, "at": e.at, "payload": e.payload},
                "proof": p.to_dict(),
                "root": log.root(p.size).hex(),
            }

        doc = _guard(_do)
    finally:
        engine.dispose()
    typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))


@app.command("consistency")
def consistency(
    database_url: str = typer.Option(..., "--database-url", help="SQLAlchemy URL of the node database"),
    old: int = typer.Option(..., "--old", help="Size of the older tree"),
    new: Optional[int] = typer.Option(None, "--new", help="Size of the newer tree (default: current)"),
) -> None:
    """Print a consistency proof between two tree sizes, with both roots, as JSON."""
    from consent.audit import AuditLog

    engine = _engine(database_url)
    try:
        log = AuditLog(engine, None, "local")

        def _do() -> dict[str, Any]:
            p = log.consistency_proof(old, new)
            return {"proof": p.to_dict(), "old_root": log.root(p.old_size).hex(),
                    "new_root": log.root(p.new_size).hex()}

        doc = _guard(_do)
    finally:
        engine.dispose()
    typer.echo(json.dumps(doc, indent=2))


@app.command("prune")
def prune(
    database_url: str = typer.Option(..., "--database-url", help="SQLAlchemy URL of the node database"),
    retention_days: Optional[int] = typer.Option(
        None, "--retention-days", help="Override CONFIDE_AUDIT_RETENTION_DAYS (>= 1096)"
    ),
) -> None:
    """Blank the payloads of entries older than the retention period (hashes stay verifiable)."""
    from pydantic import ValidationError as PydanticValidationError

    from consent.audit import AuditLog, AuditSettings

    try:
        settings = AuditSettings(**({"retention_days": retention_days} if retention_days is not None else {}))
    except PydanticValidationError as exc:
        raise ValidationError(f"invalid retention: {exc.errors()[0]['msg']}", field="retention_days") from exc
    engine = _engine(database_url)
    try:
        log = AuditLog(engine, None, "local", settings=settings)
        n = _guard(log.prune_payloads)
        cutoff = log.retention_cutoff()
    finally:
        engine.dispose()
    typer.echo(f"pruned the payloads of {n} entries recorded before {cutoff} "
               f"(retention {settings.retention_days} days)")
