"""Alembic environment of a node database (node tables, dataset catalog, consent, audit).

Dataset content tables (`ds_*`) are created at ingest with each dataset's declared schema and
are not managed here.
"""

from alembic import context

from confide.db import run_migrations_env
from party_node.storage import metadatas
from party_node.storage.base import DATA_TABLE_PREFIX


def include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    return not (type_ == "table" and name and name.startswith(DATA_TABLE_PREFIX))


run_migrations_env(context, metadatas(), include_object)
