"""Coordinator storage: models and migrations."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import Engine

from confide import db

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def ensure_schema(engine: Engine) -> None:
    """Migrate the coordinator database to the newest schema."""
    db.upgrade(engine, MIGRATIONS)
