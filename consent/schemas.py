"""Typed messages of the consent service (pydantic): what the REST API, the CLI and the importer
accept and return. They are not the table models (`consent.models`).

Times: ISO 8601; a time without a zone is taken as UTC. Every model forbids unknown fields so a
misspelt field fails loudly instead of being dropped.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Action = Literal["granted", "refused", "withdrawn", "expired"]
# Where a consent decision was collected.
Channel = Literal["wechat_miniprogram", "app", "store", "call_centre", "web", "import", "coordinator"]
# PIPL Art. 13 bases (consent first; the others are recorded for completeness).
LegalBasis = Literal[
    "consent",
    "contract",
    "hr_management",
    "legal_obligation",
    "vital_interest",
    "news_reporting",
    "public_disclosed",
    "public_interest",
]
ContactChannel = Literal["sms", "wecom", "email", "app_push"]
NEGATIVE_ACTIONS = ("refused", "withdrawn")
MAX_BATCH = 10_000  # default largest batch one API call may record

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$"


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """`value` as an aware UTC datetime (a naive value is taken as UTC)."""
    if value is None:
        return None
    tz = value.tzinfo
    if tz is dt.timezone.utc:
        return value
    if tz is None or not value.utcoffset():
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConsentEventIn(_Model):
    """One consent decision. `subject` is the node's row key (e.g. member_id); `identifier` an
    optional raw identifier (e.g. phone), stored only encrypted."""

    event_id: str = Field(pattern=_ID, description="Unique id; recording it again is a no-op")
    subject: str = Field(min_length=1, max_length=256)
    identifier: str | None = Field(default=None, max_length=256)
    purpose: str = Field(min_length=1, max_length=128)
    recipient: str | None = Field(default=None, max_length=64, description="Party the consent names")
    action: Action
    legal_basis: LegalBasis = "consent"
    channel: Channel
    notice_version: str | None = Field(default=None, max_length=64)
    valid_from: dt.datetime | None = Field(default=None, description="Default: received_at")
    valid_until: dt.datetime | None = None
    actor: str | None = Field(default=None, max_length=128, description="Default: subject (API) or import")
    received_at: dt.datetime | None = Field(default=None, description="Default: now")

    # No Python validators here: imports validate 10^6 of these and each validator call costs
    # more than pydantic's own parsing. The store normalises times to UTC, treats blank text as
    # absent and checks valid_until > valid_from (naming the field) when it records the event.


class ConsentEventBatchIn(_Model):
    events: list[ConsentEventIn] = Field(min_length=1)


class ConsentEventOut(_Model):
    event_id: str
    subject_ref: str
    purpose: str
    recipient: str | None
    action: Action
    legal_basis: str
    channel: str
    notice_version: str | None
    valid_from: dt.datetime
    valid_until: dt.datetime | None
    actor: str
    received_at: dt.datetime
    content_hash: str
    identifier: str | None = Field(default=None, description="Decrypted (access requests only)")
    identifier_erased: bool = False


class RecordResult(_Model):
    recorded: int = Field(description="Events newly recorded")
    duplicates: int = Field(description="Events already held with identical content (no-ops)")
    event_ids: list[str] = Field(default_factory=list, description="Newly recorded (small batches)")
    hook_errors: list[str] = Field(default_factory=list)


class StateEntry(_Model):
    purpose: str
    recipient: str | None
    action: Action
    event_id: str
    notice_version: str | None
    valid_from: dt.datetime
    valid_until: dt.datetime | None


class TimeWindow(_Model):
    days: list[int] = Field(default_factory=lambda: list(range(7)), description="0=Monday .. 6=Sunday")
    start: dt.time
    end: dt.time = Field(description="May be before start: the window then runs over midnight")

    @field_validator("days")
    @classmethod
    def _days(cls, v: list[int]) -> list[int]:
        if not v or any(d < 0 or d > 6 for d in v):
            raise ValueError("days must be a non-empty list of 0 (Monday) .. 6 (Sunday)")
        return sorted(set(v))

    @model_validator(mode="after")
    def _nonempty(self) -> "TimeWindow":
        if self.start == self.end:
            raise ValueError("start and end must differ")
        return self


class FrequencyCap(_Model):
    max_messages: int = Field(ge=0, le=1000)
    per: Literal["day", "week", "month"]


class PreferencesIn(_Model):
    channels: dict[ContactChannel, bool] = Field(default_factory=dict, description="Opt-in per channel")
    time_windows: list[TimeWindow] = Field(default_factory=list, max_length=20)
    frequency_cap: FrequencyCap | None = None
    topics: list[str] = Field(default_factory=list, max_length=100)
    no_personalised_marketing: bool = Field(
        default=False, description="PIPL Art. 24 opt-out: removes the subject from personalised purposes"
    )
    channel: Channel = Field(default="web", description="Where the change was made")
    actor: str | None = Field(default=None, max_length=128)


class PreferencesOut(_Model):
    subject_ref: str
    channels: dict[str, bool]
    time_windows: list[TimeWindow]
    frequency_cap: FrequencyCap | None
    topics: list[str]
    no_personalised_marketing: bool
    updated_at: dt.datetime | None


class PreferenceChangeOut(_Model):
    changed_at: dt.datetime
    actor: str
    channel: str
    snapshot: dict[str, Any]


class SubjectState(_Model):
    subject_ref: str
    erased: bool
    entries: list[StateEntry]
    preferences: PreferencesOut | None


class UsageOut(_Model):
    job_id: str
    purpose: str
    recipient: str | None
    agreement_id: str | None
    at: dt.datetime
    subjects_count: int


class TombstoneOut(_Model):
    subject_ref: str
    erased_at: dt.datetime
    request_ref: str
    detail: dict[str, Any]


class AccessReport(_Model):
    """Everything held about a subject (data-subject access request)."""

    subject_ref: str
    erased: bool
    tombstone: TombstoneOut | None
    events: list[ConsentEventOut]
    state: list[StateEntry]
    preferences: PreferencesOut | None
    preference_history: list[PreferenceChangeOut]
    usage: list[UsageOut]


class ErasureIn(_Model):
    request_ref: str | None = Field(default=None, max_length=128, description="The request's reference")


class NoticePurpose(_Model):
    purpose: str = Field(min_length=1, max_length=128)
    recipients: list[str] = Field(default_factory=list)
    data_categories: list[str] = Field(default_factory=list)


class NoticeIn(_Model):
    """One version of a privacy notice. Versions are immutable once registered."""

    notice: str = Field(pattern=_ID, description="The notice family, e.g. member-privacy")
    version: str = Field(pattern=_ID, description="Unique version id, e.g. member-privacy/2026-03")
    published_at: dt.datetime
    purposes: list[NoticePurpose] = Field(min_length=1)
    text: str = ""

    @field_validator("published_at")
    @classmethod
    def _utc(cls, v: dt.datetime) -> dt.datetime:
        out = as_utc(v)
        assert out is not None
        return out


class NoticeOut(NoticeIn):
    content_hash: str
    recipients: list[str]
    data_categories: list[str]


class CheckIn(_Model):
    subjects: list[str] = Field(max_length=1_000_000)
    purpose: str
    recipient: str | None = None
    at: dt.datetime | None = None


class CheckOut(_Model):
    purpose: str
    recipient: str | None
    at: dt.datetime
    allowed: list[str]
    evidence: dict[str, str]
    denied_counts: dict[str, int]
    allowed_count: int
    denied_count: int


class RemoteWithdrawalIn(_Model):
    """A withdrawal forwarded by the coordinator from the party whose data subject withdrew."""

    event_id: str = Field(pattern=_ID, description="The originating withdrawal's id")
    subject: str = Field(min_length=1, max_length=256, description="This node's row key for the subject")
    purpose: str
    from_party: str = Field(min_length=1, max_length=64)
    at: dt.datetime | None = None


# Purposes under which subjects may be contacted: `deliverable` refuses others.
CONTACT_PURPOSE_ROOTS = ("activation", "marketing")


class DeliverableIn(_Model):
    """Which of these subjects may be contacted now, on this channel, about this topic."""

    subjects: list[str] = Field(max_length=1_000_000)
    purpose: str = Field(description="An activation.* or marketing.* purpose")
    channel: ContactChannel
    topic: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_.\-]*$")
    recipient: str | None = Field(default=None, description="Party the delivery goes through, if any")
    at: dt.datetime | None = Field(default=None, description="Default: now")
    record: bool = Field(default=True, description="Record a contact for each deliverable subject")
    job_ref: str | None = Field(default=None, max_length=128, pattern=_ID, description="The campaign or job")


class DeliverableOut(_Model):
    purpose: str
    channel: str
    topic: str
    recipient: str | None
    at: dt.datetime
    deliverable: list[str]
    deliverable_count: int
    denied_counts: dict[str, int]
    recorded: int
