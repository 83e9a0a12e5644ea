"""Node storage: SQLAlchemy models and Alembic migrations of a party node's database."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import MetaData
from sqlalchemy.engine import Engine

from confide import db

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def metadatas() -> list[MetaData]:
    """Every metadata whose tables live in the node database (node, datasets, consent, audit)."""
    from party_node.storage import models  # noqa: F401  (registers node tables)
    from party_node.storage.base import NodeBase

    found = [NodeBase.metadata]
    try:
        import party_node.datasets  # noqa: F401  (dataset catalog on NodeBase)
    except ImportError:
        pass
    for mod, attr in (("consent.models", "ConsentBase"), ("consent.audit_storage", "AuditBase")):
        try:
            module = __import__(mod, fromlist=[attr])
            found.append(getattr(module, attr).metadata)
        except (ImportError, AttributeError):
            pass
    return found


def ensure_schema(engine: Engine) -> None:
    """Migrate the node database to the newest schema."""
    db.upgrade(engine, MIGRATIONS)
