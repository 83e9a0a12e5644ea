"""Tables of the Merkle audit log, on their own declarative base.

The lead writes the Alembic migrations from these models; tests use
`AuditBase.metadata.create_all`. The log's correctness never depends on `audit_chunks` (a
cache of subtree hashes, rebuilt from `audit_leaves` whenever it is missing): `verify_log`
recomputes everything from the leaf content.

    audit_leaves      one row per leaf, `seq` 0, 1, 2, ... without gaps
    audit_chunks      hash of each complete aligned block of CHUNK leaves (cache)
    audit_tree_heads  heads this node signed over its own log
    audit_peer_heads  heads received from other parties' logs (kept as evidence)
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, DateTime, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Leaves per cached subtree (a power of two). Roots and proofs read at most n / CHUNK cached
# hashes plus fewer than CHUNK leaf hashes.
CHUNK_BITS = 10
CHUNK = 1 << CHUNK_BITS

# SQLite only auto-increments INTEGER PRIMARY KEY; BigInteger elsewhere.
_BigId = BigInteger().with_variant(Integer(), "sqlite")


class AuditBase(DeclarativeBase):
    """Declarative base of the audit tables (kept apart from the node and consent tables)."""


class AuditLeaf(AuditBase):
    """One log entry. `at` is ISO-8601 UTC text (`YYYY-MM-DDTHH:MM:SS.ffffffZ`), exactly the
    string that was hashed, so the leaf bytes do not depend on the database's datetime type.
    `payload_json` is the canonical JSON of the payload; NULL once pruned after retention
    (`leaf_hash` is kept, so the tree and every proof stay verifiable)."""

    __tablename__ = "audit_leaves"

    seq: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(64), nullable=False)
    at: Mapped[str] = mapped_column(String(32), nullable=False)
    payload_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)

    __table_args__ = (Index("ix_audit_leaves_at", "at"),)


class AuditChunk(AuditBase):
    """Cached root of leaves [idx * CHUNK, (idx + 1) * CHUNK); only complete blocks."""

    __tablename__ = "audit_chunks"

    idx: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)


class AuditTreeHead(AuditBase):
    """A head this node signed over its own log (`root`, `signature` hex)."""

    __tablename__ = "audit_tree_heads"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    log: Mapped[str] = mapped_column(String(64), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    root: Mapped[str] = mapped_column(String(64), nullable=False)
    signed_at: Mapped[str] = mapped_column(String(32), nullable=False)
    signature: Mapped[str] = mapped_column(String(128), nullable=False)
    signer: Mapped[str] = mapped_column(String(64), nullable=False)

    __table_args__ = (Index("ix_audit_tree_heads_log_size", "log", "size"),)


class AuditPeerHead(AuditBase):
    """A head received from another party's log, kept so that party cannot rewrite it later."""

    __tablename__ = "audit_peer_heads"

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    log: Mapped[str] = mapped_column(String(64), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    root: Mapped[str] = mapped_column(String(64), nullable=False)
    signed_at: Mapped[str] = mapped_column(String(32), nullable=False)
    signature: Mapped[str] = mapped_column(String(128), nullable=False)
    signer: Mapped[str] = mapped_column(String(64), nullable=False)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (Index("ix_audit_peer_heads_log_size", "log", "size"),)
