"""Coordinator tables: registry, agreement versions and signatures, jobs and their steps."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class CoordinatorBase(DeclarativeBase):
    type_annotation_map = {dt.datetime: DateTime(timezone=True)}


class Party(CoordinatorBase):
    __tablename__ = "parties"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    role: Mapped[str] = mapped_column(String(20))
    endpoint: Mapped[str] = mapped_column(String(300))
    cert_pem: Mapped[str] = mapped_column(Text)
    identity_key: Mapped[str] = mapped_column(String(64), doc="Ed25519 public key, hex")
    box_key: Mapped[str] = mapped_column(String(64), doc="X25519 public key, hex")
    fingerprint: Mapped[str] = mapped_column(String(64))
    registered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    rekey_fingerprint: Mapped[str | None] = mapped_column(
        String(64), default=None,
        doc="a certificate with other keys that the coordinator's operator approved for this party (used once)",
    )
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None, doc="set: its certificate is revoked")
    revoked_reason: Mapped[str | None] = mapped_column(String(200), default=None)


class AgreementVersion(CoordinatorBase):
    __tablename__ = "agreement_versions"

    agreement_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    spec: Mapped[dict] = mapped_column(JSON)
    digest: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), doc="proposed | active | superseded")
    proposer: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    coordinator_signature: Mapped[str | None] = mapped_column(String(100), default=None)

    signatures: Mapped[list["AgreementSignature"]] = relationship(
        back_populates="agreement", cascade="all, delete-orphan", lazy="selectin"
    )


class AgreementSignature(CoordinatorBase):
    __tablename__ = "agreement_signatures"
    __table_args__ = (
        ForeignKeyConstraint(
            ["agreement_id", "version"], ["agreement_versions.agreement_id", "agreement_versions.version"]
        ),
    )

    agreement_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    party: Mapped[str] = mapped_column(String(40), primary_key=True)
    signature: Mapped[str] = mapped_column(String(100))
    signed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    agreement: Mapped[AgreementVersion] = relationship(back_populates="signatures")


class Job(CoordinatorBase):
    __tablename__ = "jobs"
    __table_args__ = (
        ForeignKeyConstraint(
            ["agreement_id", "version"], ["agreement_versions.agreement_id", "agreement_versions.version"]
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    type: Mapped[str] = mapped_column(String(40))
    agreement_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    requester: Mapped[str] = mapped_column(String(40))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20), index=True, doc="pending|running|succeeded|failed|cancelled")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    result: Mapped[dict | None] = mapped_column(JSON, default=None)
    mandate: Mapped[dict | None] = mapped_column(
        JSON, default=None, doc="the requester's signed job mandate, forwarded to every node (confide/mandate.py)"
    )

    steps: Mapped[list["JobStep"]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="JobStep.seq", lazy="selectin"
    )


class JobStep(CoordinatorBase):
    __tablename__ = "job_steps"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    stage: Mapped[int] = mapped_column(Integer, doc="steps of one stage run in parallel")
    name: Mapped[str] = mapped_column(String(80))
    party: Mapped[str | None] = mapped_column(String(40), doc="node that runs it; None = coordinator")
    status: Mapped[str] = mapped_column(String(20), doc="pending|dispatched|succeeded|failed|cancelled")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_contact_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    result: Mapped[dict | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)

    job: Mapped[Job] = relationship(back_populates="steps")


class Event(CoordinatorBase):
    """The coordinator's own record of decisions (registrations, signatures, refusals, job transitions)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(60))
    actor: Mapped[str | None] = mapped_column(String(40))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


class RelayMessage(CoordinatorBase):
    """An end-to-end encrypted party-to-party payload in transit. The coordinator sees sizes only;
    messages are deleted when their job ends."""

    __tablename__ = "relay_messages"
    __table_args__ = (UniqueConstraint("job_id", "channel", "sender", "recipient", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    channel: Mapped[str] = mapped_column(String(60))
    sender: Mapped[str] = mapped_column(String(40))
    recipient: Mapped[str] = mapped_column(String(40))
    seq: Mapped[int] = mapped_column(Integer)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ArbiterSnapshot(CoordinatorBase):
    """The vertical-training arbiter's state after a completed epoch, for resuming after a node
    restart. It holds the job's Paillier private key, so it is stored sealed (AES-GCM under a key
    derived from the coordinator's identity key, `coordinator.arbiter.seal_snapshot`). Deleted
    when the training session ends."""

    __tablename__ = "arbiter_snapshots"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True, doc="completed epochs")
    rows: Mapped[int] = mapped_column(Integer, doc="training rows (the arbiter role is rebuilt with it)")
    sealed: Mapped[bytes] = mapped_column(LargeBinary, doc="12-byte nonce + AES-GCM ciphertext")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ArbiterKeyRecord(CoordinatorBase):
    """An agreement's Paillier key for the vertical-training arbiter (`coordinator.arbiter_keys`):
    the public modulus in clear (parties fetch it ahead of jobs to precompute obfuscators), the
    private half sealed (AES-GCM under a key derived from the coordinator's identity key)."""

    __tablename__ = "arbiter_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    agreement_id: Mapped[str] = mapped_column(String(64), index=True)
    key_bits: Mapped[int] = mapped_column(Integer)
    n: Mapped[str] = mapped_column(Text, doc="the public modulus, decimal")
    sealed: Mapped[bytes] = mapped_column(LargeBinary, doc="12-byte nonce + AES-GCM ciphertext of {n, p, q}")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
