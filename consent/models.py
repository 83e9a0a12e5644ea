"""Tables of the consent store (SQLAlchemy, on their own declarative base `ConsentBase`).

Subjects appear only as keyed pseudonyms (`subject_ref`, HMAC-SHA256 truncated to 128 bits, hex); raw identifiers only
as AES-GCM ciphertext under a per-subject key (`consent_subject_keys`), so destroying that key
erases them. `recipient` is `""` when no recipient applies (so it can be part of keys).

`consent_events` is append-only: the record. `consent_state` is a projection of it (latest event
per subject, purpose and recipient), updated in the same transaction; it keeps its times as
integer microseconds since the epoch (UTC) so the gate can load and compare them in bulk.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

REF_LEN = 32  # hex of HMAC-SHA256 truncated to 128 bits


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stored as naive UTC on every backend; returned as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc)


class ConsentBase(DeclarativeBase):
    pass


class Notice(ConsentBase):
    """One immutable version of a privacy notice."""

    __tablename__ = "consent_notices"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    notice: Mapped[str] = mapped_column(String(64), index=True)  # the notice family
    published_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    content_hash: Mapped[str] = mapped_column(String(64))
    content: Mapped[dict[str, Any]] = mapped_column(JSON)  # purposes [{purpose, recipients, data_categories}], text
    recorded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ConsentEvent(ConsentBase):
    """A consent decision as received. Never updated or deleted."""

    __tablename__ = "consent_events"

    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    subject_ref: Mapped[str] = mapped_column(String(REF_LEN), index=True)
    purpose: Mapped[str] = mapped_column(String(128))
    recipient: Mapped[str] = mapped_column(String(64), default="")
    action: Mapped[str] = mapped_column(String(16))  # granted refused withdrawn expired
    legal_basis: Mapped[str] = mapped_column(String(32))
    channel: Mapped[str] = mapped_column(String(32))
    notice_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    valid_from: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    valid_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    actor: Mapped[str] = mapped_column(String(128))
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    identifier_ct: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    # The audit entry covering this event: sha256 over the content hashes of its batch.
    batch_id: Mapped[str] = mapped_column(String(16))


class ConsentState(ConsentBase):
    """Projection: the latest event per subject, purpose and recipient.

    Keyed purpose first so the gate reads a purpose family as one range of the key (on SQLite
    the table is clustered on it: WITHOUT ROWID)."""

    __tablename__ = "consent_state"

    purpose: Mapped[str] = mapped_column(String(128), primary_key=True)
    recipient: Mapped[str] = mapped_column(String(64), primary_key=True)
    # No index on subject_ref alone: per-subject reads go by primary key (see store._state_rows).
    subject_ref: Mapped[str] = mapped_column(String(REF_LEN), primary_key=True)
    action: Mapped[str] = mapped_column(String(16))
    event_id: Mapped[str] = mapped_column(String(128))
    notice_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    valid_from_us: Mapped[int] = mapped_column(BigInteger)
    valid_until_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    order_key: Mapped[str] = mapped_column(String(200))

    __table_args__ = {"sqlite_with_rowid": False}


class SubjectKey(ConsentBase):
    """The per-subject data key, wrapped with the node's key-wrapping key. Deleted on erasure."""

    __tablename__ = "consent_subject_keys"

    subject_ref: Mapped[str] = mapped_column(String(REF_LEN), primary_key=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Tombstone(ConsentBase):
    """What is left of an erased subject: the pseudonym, when, and what was destroyed."""

    __tablename__ = "consent_tombstones"

    subject_ref: Mapped[str] = mapped_column(String(REF_LEN), primary_key=True)
    erased_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    request_ref: Mapped[str] = mapped_column(String(128))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class Preferences(ConsentBase):
    """A subject's current contact preferences."""

    __tablename__ = "consent_preferences"

    subject_ref: Mapped[str] = mapped_column(String(REF_LEN), primary_key=True)
    channels: Mapped[dict[str, Any]] = mapped_column(JSON)
    time_windows: Mapped[list[Any]] = mapped_column(JSON)
    frequency_cap: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    topics: Mapped[list[Any]] = mapped_column(JSON)
    no_personalised: Mapped[bool] = mapped_column(Boolean, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class PreferenceChange(ConsentBase):
    """Append-only history of preference changes."""

    __tablename__ = "consent_preference_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject_ref: Mapped[str] = mapped_column(String(REF_LEN), index=True)
    changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(32))
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)


class UsageRecord(ConsentBase):
    """One processing activity: a job step that processed subjects for a purpose."""

    __tablename__ = "consent_usage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(128))
    purpose: Mapped[str] = mapped_column(String(128))
    recipient: Mapped[str] = mapped_column(String(64))
    agreement_id: Mapped[str] = mapped_column(String(128))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    subjects_count: Mapped[int] = mapped_column(Integer)

    __table_args__ = (UniqueConstraint("job_id", "purpose", "recipient", name="uq_consent_usage_job"),)


class UsageSubject(ConsentBase):
    """Which subjects a usage record processed (deleted on erasure; the count stays)."""

    __tablename__ = "consent_usage_subjects"

    usage_id: Mapped[int] = mapped_column(ForeignKey("consent_usage.id"), primary_key=True)
    subject_ref: Mapped[str] = mapped_column(String(REF_LEN), primary_key=True, index=True)


class GateCall(ConsentBase):
    """Counts of one gate decision (also sent to the audit log). Never identifiers."""

    __tablename__ = "consent_gate_calls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    purpose: Mapped[str] = mapped_column(String(128))
    recipient: Mapped[str] = mapped_column(String(64))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    decided_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    subjects: Mapped[int] = mapped_column(Integer)
    allowed: Mapped[int] = mapped_column(Integer)
    denied: Mapped[dict[str, int]] = mapped_column(JSON)
    note: Mapped[str] = mapped_column(Text, default="")


class ContactRecord(ConsentBase):
    """One message an activation job was cleared to send (contact history): what frequency
    caps count. Pseudonymous; deleted on erasure."""

    __tablename__ = "consent_contacts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True)
    subject_ref: Mapped[str] = mapped_column(String(REF_LEN))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    channel: Mapped[str] = mapped_column(String(16))
    topic: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(128))
    job_ref: Mapped[str] = mapped_column(String(128))

    __table_args__ = (Index("ix_consent_contacts_subject_at", "subject_ref", "at"),)


def ensure_tables(engine: Engine) -> None:
    """Create the consent tables that do not exist yet (tests, embedded use; nodes migrate)."""
    ConsentBase.metadata.create_all(engine)
