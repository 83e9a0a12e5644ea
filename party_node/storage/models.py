"""Node tables: the agreements this node signed, and its record of every job step it ran."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, DateTime, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from party_node.storage.base import NodeBase


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class SignedAgreementRecord(NodeBase):
    """An agreement version this node reviewed and signed (and, once active, the full document)."""

    __tablename__ = "node_agreements"

    agreement_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)
    signature: Mapped[str] = mapped_column(String(100))
    signed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    active_document: Mapped[dict | None] = mapped_column(JSON, default=None)
    activated_seen_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class StepRecord(NodeBase):
    """One job step as this node ran it; the coordinator polls it, a restart resumes from it."""

    __tablename__ = "node_job_steps"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    step: Mapped[str] = mapped_column(String(80), primary_key=True)
    job_type: Mapped[str] = mapped_column(String(40))
    agreement_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    requester: Mapped[str] = mapped_column(String(40))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20), doc="running|succeeded|failed|interrupted|cancelled")
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    result: Mapped[dict | None] = mapped_column(JSON, default=None, doc="what the coordinator may see")
    private_result: Mapped[dict | None] = mapped_column(
        JSON, default=None, doc="what only this party's operator may see (e.g. the overlap it requested)"
    )
    error: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class PsiMatch(NodeBase):
    """A row of this node matched by a PSI `match` job, with the opaque join key both sides share.

    Training and scoring jobs align rows across parties by these keys; nothing about
    non-matching rows is stored."""

    __tablename__ = "psi_matches"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    row_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    agreement_id: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(64))
    id_type: Mapped[str] = mapped_column(String(20))
    join_key: Mapped[str] = mapped_column(String(64), index=True)
