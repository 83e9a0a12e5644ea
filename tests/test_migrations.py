"""Models and migrations agree, on SQLite and on PostgreSQL, for the coordinator and the node."""

from __future__ import annotations

from confide import db
from coordinator.storage import ensure_schema as coordinator_schema
from coordinator.storage import metadatas as coordinator_metadatas
from party_node.storage import ensure_schema as node_schema
from party_node.storage import metadatas


def test_coordinator_models_match_migrations(db_url: str) -> None:
    engine = db.make_engine(db_url)
    coordinator_schema(engine)
    coordinator_schema(engine)  # idempotent
    assert db.schema_diff(engine, coordinator_metadatas()) == []
    engine.dispose()


def test_node_models_match_migrations(db_url: str) -> None:
    engine = db.make_engine(db_url)
    node_schema(engine)
    diff = db.schema_diff(engine, metadatas())
    assert diff == []
    engine.dispose()
