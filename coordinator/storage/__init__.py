"""Coordinator storage: models and migrations."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import MetaData
from sqlalchemy.engine import Engine

from confide import db

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def metadatas() -> list[MetaData]:
    """Every metadata whose tables live in the coordinator database."""
    from consent.audit_storage import AuditBase
    from coordinator.storage.models import CoordinatorBase

    return [CoordinatorBase.metadata, AuditBase.metadata]


def ensure_schema(engine: Engine) -> None:
    """Migrate the coordinator database to the newest schema."""
    db.upgrade(engine, MIGRATIONS)
