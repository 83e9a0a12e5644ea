"""Job mandates: the requester's own signature on the job it asks for.

A node must not have to take the coordinator's word that a party asked for a job. The
requesting node therefore signs a *mandate* — job id, requester, agreement id and version, job
type, parameters, time of issue — with its Ed25519 identity key. The coordinator checks it,
keeps it with the job and forwards it with every step; each node checks it again against the
requester's key from a certificate the node verified against its own CA, and recomputes the
job's validated parameters from the mandate's, so the coordinator can neither invent a job, nor
alter its parameters, nor run one mandate as several jobs (the job id is inside the signature).

What it does not stop: the coordinator re-dispatching the steps of a job that was mandated (a
resume looks the same), or sitting on a mandate and starting it later — nodes refuse mandates
older than their `mandate_max_age_s` when they first see the job.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import uuid
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict, Field, ValidationError as PydanticValidationError, field_validator

from confide.canonical import canonical_json
from confide.errors import PermissionDenied, ValidationError

DOMAIN = b"confide/job-mandate/v1\x00"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class Mandate(BaseModel):
    """What the requester signs. Every field is bound by the signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    requester: str = Field(min_length=1, max_length=40)
    agreement_id: str = Field(min_length=1, max_length=64)
    version: int = Field(ge=1)
    type: str = Field(min_length=1, max_length=40)
    params: dict[str, Any] = Field(default_factory=dict)
    issued_at: dt.datetime

    @field_validator("job_id")
    @classmethod
    def _uuid4(cls, v: str) -> str:
        if not _UUID.match(v):
            raise ValueError("job_id must be a lower-case UUID")
        return v

    @field_validator("issued_at")
    @classmethod
    def _aware(cls, v: dt.datetime) -> dt.datetime:
        if v.tzinfo is None:
            raise ValueError("issued_at needs a time zone")
        return v.astimezone(dt.timezone.utc)

    def signing_bytes(self) -> bytes:
        return DOMAIN + canonical_json(self.model_dump(mode="json"))


class SignedMandate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mandate: Mandate
    signature: str = Field(min_length=1, max_length=200)


def issue(
    key: ed25519.Ed25519PrivateKey,
    *,
    requester: str,
    agreement_id: str,
    version: int,
    type_: str,
    params: dict[str, Any] | None = None,
    job_id: str | None = None,
    at: dt.datetime | None = None,
) -> dict[str, Any]:
    """A signed mandate as JSON (what travels in `CreateJobRequest.mandate`)."""
    m = Mandate(
        job_id=job_id or str(uuid.uuid4()),
        requester=requester,
        agreement_id=agreement_id,
        version=version,
        type=type_,
        params=params or {},
        issued_at=at or dt.datetime.now(dt.timezone.utc),
    )
    sig = base64.b64encode(key.sign(m.signing_bytes())).decode()
    return SignedMandate(mandate=m, signature=sig).model_dump(mode="json")


def parse(data: object) -> SignedMandate:
    """Parse a signed mandate; ValidationError naming the field otherwise."""
    if not isinstance(data, dict):
        raise ValidationError("a job needs the requester's signed mandate", field="mandate")
    try:
        return SignedMandate.model_validate(data)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ValidationError(f"mandate.{where}: {err['msg']}", field="mandate") from None


def verify(data: object, key: ed25519.Ed25519PublicKey | None, requester: str) -> Mandate:
    """Check that the mandate is `requester`'s and its signature verifies with `requester`'s
    verified identity key `key`: PermissionDenied if not (or no key is known), ValidationError
    if it is malformed."""
    signed = parse(data)
    if signed.mandate.requester != requester:
        raise PermissionDenied(
            f"job {signed.mandate.job_id}: requester {requester!r} differs from the mandate's "
            f"({signed.mandate.requester!r})"
        )
    if key is None:
        raise PermissionDenied(f"no verified identity key for requester {signed.mandate.requester!r}")
    try:
        raw = base64.b64decode(signed.signature, validate=True)
        key.verify(raw, signed.mandate.signing_bytes())
    except (InvalidSignature, ValueError):
        raise PermissionDenied(
            f"the mandate of job {signed.mandate.job_id} is not signed by {signed.mandate.requester!r}"
        ) from None
    return signed.mandate


def check_matches(m: Mandate, *, requester: str, agreement_id: str, version: int, type_: str) -> None:
    """The job as presented must be the job the mandate names; PermissionDenied naming the
    first difference."""
    for name, have, want in (
        ("requester", requester, m.requester),
        ("agreement_id", agreement_id, m.agreement_id),
        ("version", version, m.version),
        ("type", type_, m.type),
    ):
        if have != want:
            raise PermissionDenied(f"job {m.job_id}: {name} {have!r} differs from the requester's mandate ({want!r})")
