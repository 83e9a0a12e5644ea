"""Wire schemas of the coordinator API (separate from the table models)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    role: str
    endpoint: str = Field(max_length=300, pattern=r"^https?://")
    cert_pem: str = Field(max_length=20000)


class PartyOut(BaseModel):
    name: str
    role: str
    endpoint: str
    cert_pem: str
    identity_key: str
    box_key: str
    fingerprint: str
    registered_at: dt.datetime


class ProposeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: dict[str, Any]


class SignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    digest: str = Field(min_length=64, max_length=64)
    signature: str = Field(max_length=200)


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    agreement_id: str
    version: int | None = Field(default=None, description="Default: the active version")
    params: dict[str, Any] = Field(default_factory=dict)
    mandate: dict[str, Any] | None = Field(
        default=None,
        description="The requester's signed job mandate (confide/mandate.py); required. The job takes its id.",
    )


class StepOut(BaseModel):
    seq: int
    stage: int
    name: str
    party: str | None
    status: str
    attempt: int
    dispatched_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    result: dict[str, Any] | None


class JobOut(BaseModel):
    id: str
    type: str
    agreement_id: str
    version: int
    requester: str
    params: dict[str, Any]
    status: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    result: dict[str, Any] | None
    steps: list[StepOut]
