"""Database plumbing shared by the services: engines, sessions, migrations.

SQLite (embedded default) and PostgreSQL (by URL) are both first-class. Every write runs in
`session_scope`, one transaction that commits or rolls back as a whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from confide.errors import ConfigurationError


def make_engine(url: str, **kwargs: object) -> Engine:
    """An engine with sane defaults: WAL + foreign keys + busy timeout on SQLite."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)  # type: ignore[arg-type]

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            return engine
        return create_engine(url, pool_pre_ping=True, **kwargs)  # type: ignore[arg-type]
    except Exception as exc:  # bad URL, missing driver
        raise ConfigurationError(f"cannot use database URL {url!r}: {exc}") from exc


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(script_location: Path, url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, script_location: Path) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    from alembic import command

    cfg = alembic_config(script_location, engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def schema_diff(engine: Engine, metadata: MetaData | Sequence[MetaData]) -> list[object]:
    """Differences between the live schema and the models (empty when they agree)."""
    from alembic.migration import MigrationContext
    from alembic.autogenerate import compare_metadata

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))  # type: ignore[arg-type]


def run_migrations_env(context, target_metadata, include_object=None) -> None:  # type: ignore[no-untyped-def]
    """The body of every Alembic `env.py` here: use the caller's connection when given (so a
    service migrates inside its own transaction), render custom types as their storage types."""
    from sqlalchemy.types import TypeDecorator

    def render_item(type_, obj, autogen_context):  # type: ignore[no-untyped-def]
        # Migrations never import app code: a TypeDecorator is written as its storage type.
        if type_ == "type" and isinstance(obj, TypeDecorator):
            autogen_context.imports.add("import sqlalchemy as sa")
            return "sa." + repr(obj.impl)
        return False

    def run(conn) -> None:  # type: ignore[no-untyped-def]
        context.configure(connection=conn, target_metadata=target_metadata, compare_type=True,
                          render_item=render_item, include_object=include_object,
                          render_as_batch=conn.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()

    conn = context.config.attributes.get("connection")
    if conn is not None:
        run(conn)
        return
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        run(conn)
