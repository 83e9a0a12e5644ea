"""Alembic environment of the coordinator database."""

from alembic import context

from confide.db import run_migrations_env
from coordinator.storage import metadatas

# Coordinator tables, and the parties' signed audit tree heads it keeps (audit_peer_heads).
run_migrations_env(context, metadatas())
