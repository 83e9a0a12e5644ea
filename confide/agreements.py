"""Collaboration agreements: the signed contract every job step is checked against.

An agreement version is a `AgreementSpec` (parties and roles, purposes, identifier types and
columns each party contributes, allowed jobs and outputs, k_min, DP budget, expiry, impact
assessment references). Its digest is the SHA-256 of the canonical JSON of
`{"agreement_id", "version", "spec"}`. Every party signs the digest at its own node; the
coordinator counter-signs once all have. Nodes check all of it locally before each step
(`verify_signed`) and never take the coordinator's word for it.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from confide.canonical import canonical_json, digest
from confide.errors import AgreementError, ValidationError

SIGN_DOMAIN = b"confide-agreement-v1\n"
IDENTIFIER_TYPES = ("phone", "email", "openid", "unionid", "platform_id", "phone_md5", "phone_sha256")
# Job types the platform knows; an agreement may allow any subset. Later capabilities add theirs.
JOB_TYPES = ("dataset-stats", "overlap", "match", "profile", "train", "score", "lookalike", "train-horizontal")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_PURPOSE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


class IdentifierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str
    column: str
    type: Literal["phone", "email", "openid", "unionid", "platform_id", "phone_md5", "phone_sha256"]


class PartySpec(BaseModel):
    """One party's place in the agreement."""

    model_config = ConfigDict(extra="forbid")
    name: str
    role: Literal["label_holder", "feature_holder"]
    datasets: list[str] = Field(default_factory=list, description="Datasets this party contributes")
    identifiers: list[IdentifierSpec] = Field(default_factory=list)
    columns: dict[str, list[str]] = Field(
        default_factory=dict, description="dataset -> feature/label columns contributed"
    )
    impact_assessment: str = Field(min_length=1, description="Reference to the party's PIPL Art. 55 assessment")


class JobRule(BaseModel):
    """A job the agreement allows, for which purpose, with which outputs."""

    model_config = ConfigDict(extra="forbid")
    type: str
    purpose: str
    outputs: list[str] = Field(default_factory=list)
    requester: str | None = Field(default=None, description="Party allowed to request it (default: any)")

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in JOB_TYPES:
            raise ValueError(f"unknown job type {v!r}; one of {', '.join(JOB_TYPES)}")
        return v


class AgreementSpec(BaseModel):
    """What the parties agree to. Any change makes a new version."""

    model_config = ConfigDict(extra="forbid")
    agreement_id: str
    title: str = Field(min_length=1, max_length=200)
    parties: list[PartySpec] = Field(min_length=2)
    purposes: list[str] = Field(min_length=1)
    allowed_jobs: list[JobRule] = Field(min_length=1)
    k_min: int = Field(default=50, ge=1)
    dp_epsilon: float | None = Field(default=None, gt=0)
    expires_at: dt.datetime

    @field_validator("agreement_id")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError("agreement_id: 1-64 of a-z 0-9 _ . - starting with a letter or digit")
        return v

    @field_validator("purposes")
    @classmethod
    def _purposes(cls, v: list[str]) -> list[str]:
        for p in v:
            if not _PURPOSE.match(p):
                raise ValueError(f"purpose {p!r} is not a dotted key such as 'modeling.lead_scoring'")
        return v

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, v: dt.datetime) -> dt.datetime:
        if v.tzinfo is None:
            raise ValueError("expires_at needs a timezone (e.g. 2027-06-30T00:00:00Z)")
        return v.astimezone(dt.timezone.utc)

    @model_validator(mode="after")
    def _consistent(self) -> "AgreementSpec":
        names = [p.name for p in self.parties]
        if len(set(names)) != len(names):
            raise ValueError("a party is listed twice")
        if sum(p.role == "label_holder" for p in self.parties) != 1:
            raise ValueError("exactly one party must be the label holder")
        for rule in self.allowed_jobs:
            if not any(rule.purpose == p or rule.purpose.startswith(p + ".") for p in self.purposes):
                raise ValueError(f"job {rule.type!r} uses purpose {rule.purpose!r} not in the agreement's purposes")
            if rule.requester is not None and rule.requester not in names:
                raise ValueError(f"job {rule.type!r} requester {rule.requester!r} is not a party")
        for p in self.parties:
            for ident in p.identifiers:
                if ident.dataset not in p.datasets:
                    raise ValueError(f"{p.name}: identifier dataset {ident.dataset!r} not in its datasets")
            for ds in p.columns:
                if ds not in p.datasets:
                    raise ValueError(f"{p.name}: columns given for dataset {ds!r} not in its datasets")
        return self

    def party(self, name: str) -> PartySpec:
        for p in self.parties:
            if p.name == name:
                return p
        raise AgreementError(f"{name!r} is not a party to agreement {self.agreement_id!r}")

    def rule(self, job_type: str) -> JobRule:
        for r in self.allowed_jobs:
            if r.type == job_type:
                return r
        raise AgreementError(f"agreement {self.agreement_id!r} does not allow {job_type!r} jobs")


def parse_spec(data: object) -> AgreementSpec:
    """Validate an agreement spec from untrusted input; ValidationError names the fields."""
    from pydantic import ValidationError as PydanticError

    try:
        return AgreementSpec.model_validate(data)
    except PydanticError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise ValidationError(f"invalid agreement: {problems}") from exc


def spec_digest(agreement_id: str, version: int, spec: AgreementSpec) -> str:
    return digest({"agreement_id": agreement_id, "version": version, "spec": spec.model_dump(mode="json")})


def signing_bytes(agreement_id: str, version: int, digest_hex: str, signer: str) -> bytes:
    return SIGN_DOMAIN + canonical_json(
        {"agreement_id": agreement_id, "version": version, "digest": digest_hex, "signer": signer}
    )


def sign(key: ed25519.Ed25519PrivateKey, agreement_id: str, version: int, digest_hex: str, signer: str) -> str:
    return base64.b64encode(key.sign(signing_bytes(agreement_id, version, digest_hex, signer))).decode()


def check_signature(
    public: ed25519.Ed25519PublicKey, agreement_id: str, version: int, digest_hex: str, signer: str, sig_b64: str
) -> bool:
    try:
        public.verify(base64.b64decode(sig_b64), signing_bytes(agreement_id, version, digest_hex, signer))
        return True
    except (InvalidSignature, ValueError):
        return False


class SignedAgreement(BaseModel):
    """An agreement version with its signatures, as the coordinator serves it."""

    agreement_id: str
    version: int
    digest: str
    spec: AgreementSpec
    status: str
    signatures: dict[str, str] = Field(default_factory=dict)
    coordinator_signature: str | None = None


def verify_signed(
    doc: SignedAgreement,
    keys: dict[str, ed25519.Ed25519PublicKey],
    *,
    at: dt.datetime | None = None,
) -> None:
    """Check a signed agreement completely; raise AgreementError naming the first problem.

    `keys` maps party names (and "coordinator") to identity keys the caller verified itself
    (from CA-checked certificates).
    """
    want = spec_digest(doc.agreement_id, doc.version, doc.spec)
    if want != doc.digest:
        raise AgreementError(
            f"agreement {doc.agreement_id} v{doc.version}: content does not match its digest (tampered)"
        )
    for party in doc.spec.parties:
        sig = doc.signatures.get(party.name)
        if sig is None:
            raise AgreementError(f"agreement {doc.agreement_id} v{doc.version} is not signed by {party.name!r}")
        key = keys.get(party.name)
        if key is None:
            raise AgreementError(f"no verified identity key for party {party.name!r}")
        if not check_signature(key, doc.agreement_id, doc.version, doc.digest, party.name, sig):
            raise AgreementError(f"agreement {doc.agreement_id} v{doc.version}: bad signature of {party.name!r}")
    csig = doc.coordinator_signature
    ckey = keys.get("coordinator")
    if csig is None:
        raise AgreementError(f"agreement {doc.agreement_id} v{doc.version} lacks the coordinator's counter-signature")
    if ckey is None or not check_signature(ckey, doc.agreement_id, doc.version, doc.digest, "coordinator", csig):
        raise AgreementError(f"agreement {doc.agreement_id} v{doc.version}: bad coordinator counter-signature")
    now = at or dt.datetime.now(dt.timezone.utc)
    if doc.spec.expires_at <= now:
        raise AgreementError(
            f"agreement {doc.agreement_id} v{doc.version} expired at {doc.spec.expires_at.isoformat()}"
        )
