"""Alembic environment of the coordinator database."""

from alembic import context
from sqlalchemy import create_engine

from coordinator.storage import metadatas

# Coordinator tables, and the parties' signed audit tree heads it keeps (audit_peer_heads).
target_metadata = metadatas()


def render_item(type_, obj, autogen_context):  # type: ignore[no-untyped-def]
    """Render custom column types as their storage type, so migrations never import app code."""
    from sqlalchemy.types import TypeDecorator

    if type_ == "type" and isinstance(obj, TypeDecorator):
        autogen_context.imports.add("import sqlalchemy as sa")
        return "sa." + repr(obj.impl)
    return False


def run() -> None:
    conn = context.config.attributes.get("connection")
    if conn is None:
        engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
        with engine.begin() as conn:
            _run(conn)
        return
    _run(conn)


def _run(conn) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=conn, target_metadata=target_metadata, compare_type=True, render_item=render_item,
                      render_as_batch=conn.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


run()
