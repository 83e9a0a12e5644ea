"""Coordinator use cases: registry, agreements, jobs. Each function takes an explicit session."""

from __future__ import annotations

import re

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from confide import agreements as ag
from confide import mandate as job_mandate
from confide import pki
from confide.errors import AgreementError, Conflict, NotFound, PermissionDenied, ValidationError
from confide.pki import Identity
from coordinator.jobtypes import job_type
from coordinator.storage.models import AgreementSignature, AgreementVersion, Event, Job, Party, utcnow


def record(session: Session, kind: str, actor: str | None, **detail: Any) -> None:
    session.add(Event(kind=kind, actor=actor, detail=detail))


# --- registry ---------------------------------------------------------------------------


def register_party(session: Session, ca_pem: bytes, info: pki.CertInfo, endpoint: str, cert_pem: str) -> Party:
    """Insert or update a party from its CA-verified certificate."""
    if info.role not in ("brand", "partner"):
        raise PermissionDenied(f"certificate role {info.role!r} cannot register as a party")
    party = session.get(Party, info.name)
    fields = dict(
        role=info.role,
        endpoint=endpoint.rstrip("/"),
        cert_pem=cert_pem,
        identity_key=info.identity_public_hex,
        box_key=pki.raw_public(info.box_public).hex(),
        fingerprint=info.fingerprint,
    )
    if party is None:
        party = Party(name=info.name, **fields)
        session.add(party)
        record(session, "party.registered", info.name, role=info.role, endpoint=endpoint, fingerprint=info.fingerprint)
    else:
        rekey = party.identity_key != fields["identity_key"] or party.box_key != fields["box_key"]
        if party.revoked_at is not None and not (rekey and party.rekey_fingerprint == info.fingerprint):
            raise PermissionDenied(
                f"party {info.name!r}: its certificate was revoked ({party.revoked_reason or 'no reason given'}); "
                f"it may register again only with new keys the coordinator operator approved: "
                f"confide coordinator approve-rekey {info.name} --fingerprint <new certificate>"
            )
        if rekey and party.rekey_fingerprint != info.fingerprint:
            # Keys are pinned at first registration: any CA-valid certificate for the name (an
            # old one, or one minted by whoever holds the CA key) must not silently replace them.
            raise Conflict(
                f"party {info.name!r} is registered with other keys (certificate {party.fingerprint[:16]}...); "
                f"replacing them needs the coordinator operator's approval: "
                f"confide coordinator approve-rekey {info.name} --fingerprint {info.fingerprint}"
            )
        changed = {k: v for k, v in fields.items() if getattr(party, k) != v}
        for k, v in changed.items():
            setattr(party, k, v)
        party.updated_at = utcnow()
        if rekey:
            party.rekey_fingerprint = None
            party.revoked_at = party.revoked_reason = None
            record(session, "party.rekeyed", info.name, fingerprint=info.fingerprint)
        elif changed:
            record(session, "party.updated", info.name, fields=sorted(changed))
    session.flush()
    return party


def approve_rekey(session: Session, name: str, fingerprint: str, operator: str = "coordinator-operator") -> Party:
    """Let `name` re-register once with the certificate of this SHA-256 fingerprint and new keys."""
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise ValidationError("fingerprint: the certificate's SHA-256 fingerprint, 64 lowercase hex digits",
                              field="fingerprint")
    party = get_party(session, name)
    if party.fingerprint == fingerprint:
        raise Conflict(f"party {name!r} is already registered with that certificate")
    party.rekey_fingerprint = fingerprint
    record(session, "party.rekey_approved", operator, party=name, fingerprint=fingerprint)
    session.flush()
    return party


def revoke_party(session: Session, name: str, reason: str, operator: str = "coordinator-operator") -> Party:
    """Revoke a party's current certificate: the coordinator refuses its requests and its
    re-registration with the same keys, and leaves it out of the registry it serves the nodes
    (which drop it at their next refresh). New keys need `approve_rekey`."""
    reason = reason.strip()
    if not 1 <= len(reason) <= 200:
        raise ValidationError("reason: 1 to 200 characters", field="reason")
    party = get_party(session, name)
    if party.revoked_at is not None:
        raise Conflict(f"party {name!r} is already revoked (since {party.revoked_at.isoformat()})")
    party.revoked_at, party.revoked_reason, party.rekey_fingerprint = utcnow(), reason, None
    record(session, "party.revoked", operator, party=name, fingerprint=party.fingerprint, reason=reason)
    session.flush()
    return party


def get_party(session: Session, name: str) -> Party:
    party = session.get(Party, name)
    if party is None:
        raise NotFound(f"party {name!r} is not registered")
    return party


# --- agreements -------------------------------------------------------------------------


def to_signed(av: AgreementVersion) -> ag.SignedAgreement:
    return ag.SignedAgreement(
        agreement_id=av.agreement_id,
        version=av.version,
        digest=av.digest,
        spec=ag.AgreementSpec.model_validate(av.spec),
        status=av.status,
        signatures={s.party: s.signature for s in av.signatures},
        coordinator_signature=av.coordinator_signature,
    )


def propose(session: Session, proposer: str, spec_data: dict[str, Any]) -> AgreementVersion:
    """A brand proposes an agreement (or a new version of one). Every party must be registered."""
    spec = ag.parse_spec(spec_data)
    me = get_party(session, proposer)
    if me.role != "brand":
        raise PermissionDenied("only a brand may propose a collaboration agreement")
    spec.party(proposer)  # the proposer must be in it
    for p in spec.parties:
        get_party(session, p.name)
    if spec.expires_at <= dt.datetime.now(dt.timezone.utc):
        raise ValidationError("expires_at is in the past", field="expires_at")
    latest = session.scalars(
        select(AgreementVersion)
        .where(AgreementVersion.agreement_id == spec.agreement_id)
        .order_by(AgreementVersion.version.desc())
        .limit(1)
    ).first()
    if latest is not None and latest.proposer != proposer:
        raise PermissionDenied(f"agreement {spec.agreement_id!r} belongs to {latest.proposer!r}")
    version = 1 if latest is None else latest.version + 1
    av = AgreementVersion(
        agreement_id=spec.agreement_id,
        version=version,
        spec=spec.model_dump(mode="json"),
        digest=ag.spec_digest(spec.agreement_id, version, spec),
        status="proposed",
        proposer=proposer,
    )
    session.add(av)
    # A newer proposal makes an older, not-yet-active proposal moot.
    if latest is not None and latest.status == "proposed":
        latest.status = "superseded"
    record(session, "agreement.proposed", proposer, agreement_id=spec.agreement_id, version=version, digest=av.digest)
    return av


def get_version(session: Session, agreement_id: str, version: int | None = None) -> AgreementVersion:
    q = select(AgreementVersion).where(AgreementVersion.agreement_id == agreement_id)
    if version is None:
        q = q.where(AgreementVersion.status == "active")
    else:
        q = q.where(AgreementVersion.version == version)
    av = session.scalars(q.order_by(AgreementVersion.version.desc()).limit(1)).first()
    if av is None:
        what = f"version {version}" if version is not None else "an active version"
        raise NotFound(f"agreement {agreement_id!r} has no {what}")
    return av


def list_for(session: Session, party: str) -> list[AgreementVersion]:
    rows = session.scalars(select(AgreementVersion).order_by(AgreementVersion.agreement_id, AgreementVersion.version))
    return [av for av in rows if any(p["name"] == party for p in av.spec["parties"])]


def add_signature(
    session: Session, identity: Identity, party: str, agreement_id: str, version: int, digest: str, signature: str
) -> AgreementVersion:
    """Store a party's signature; when all parties have signed, counter-sign and activate."""
    av = get_version(session, agreement_id, version)
    spec = ag.AgreementSpec.model_validate(av.spec)
    spec.party(party)
    if av.status != "proposed":
        raise Conflict(f"agreement {agreement_id} v{version} is {av.status}; only proposed versions take signatures")
    if digest != av.digest:
        raise AgreementError(f"signature is for digest {digest[:12]}…, not this version's {av.digest[:12]}…")
    key = pki.verify_certificate(get_party(session, party).cert_pem, identity.ca_pem).identity_public
    if not ag.check_signature(key, agreement_id, version, digest, party, signature):
        record(session, "agreement.signature_refused", party, agreement_id=agreement_id, version=version)
        raise AgreementError(f"bad signature from {party!r} on agreement {agreement_id} v{version}")
    if any(s.party == party for s in av.signatures):
        raise Conflict(f"{party!r} already signed agreement {agreement_id} v{version}")
    av.signatures.append(AgreementSignature(party=party, signature=signature))
    record(session, "agreement.signed", party, agreement_id=agreement_id, version=version)
    if {s.party for s in av.signatures} >= {p.name for p in spec.parties}:
        av.coordinator_signature = ag.sign(identity.signing_key, agreement_id, version, av.digest, "coordinator")
        av.status = "active"
        av.activated_at = utcnow()
        for older in session.scalars(
            select(AgreementVersion).where(
                AgreementVersion.agreement_id == agreement_id,
                AgreementVersion.version < version,
                AgreementVersion.status.in_(("active", "proposed")),
            )
        ):
            older.status = "superseded"
        record(session, "agreement.activated", "coordinator", agreement_id=agreement_id, version=version)
    return av


# --- jobs -------------------------------------------------------------------------------


def create_job(
    session: Session,
    requester: str,
    type_: str,
    agreement_id: str,
    version: int | None,
    params: dict,
    *,
    mandate: "job_mandate.Mandate",
    mandate_doc: dict[str, Any] | None,
) -> Job:
    """Create a pending job against an active agreement version the requester is party to.

    `mandate` is the requester's signature on exactly this job (already verified against the
    requester's registered key); the job takes the mandate's id, and the request's fields must
    be the mandate's."""
    job_mandate.check_matches(mandate, requester=requester, agreement_id=agreement_id,
                              version=mandate.version if version is None else version, type_=type_)
    if params != mandate.params:
        raise PermissionDenied(f"job {mandate.job_id}: params differ from the requester's mandate")
    if session.get(Job, mandate.job_id) is not None:
        raise Conflict(f"job {mandate.job_id} exists already: a mandate starts one job")
    version = mandate.version
    av = get_version(session, agreement_id, version)
    if av.status != "active":
        raise AgreementError(f"agreement {agreement_id} v{av.version} is {av.status}, not active")
    spec = ag.AgreementSpec.model_validate(av.spec)
    if spec.expires_at <= dt.datetime.now(dt.timezone.utc):
        raise AgreementError(f"agreement {agreement_id} v{av.version} has expired")
    spec.party(requester)
    revoked = sorted(p.name for p in spec.parties
                     if (row := session.get(Party, p.name)) is not None and row.revoked_at is not None)
    if revoked:
        raise AgreementError(f"agreement {agreement_id}: the certificate of {', '.join(revoked)} is revoked; "
                             "no job runs with it until it has approved new keys")
    rule = spec.rule(type_)
    if rule.requester is not None and rule.requester != requester:
        raise PermissionDenied(f"only {rule.requester!r} may request {type_!r} jobs under {agreement_id}")
    clean = job_type(type_).validate_params(spec, params)
    job = Job(
        id=mandate.job_id,
        type=type_,
        agreement_id=agreement_id,
        version=av.version,
        requester=requester,
        params=clean,
        status="pending",
        mandate=mandate_doc,
    )
    session.add(job)
    record(session, "job.created", requester, job_id=job.id, type=type_, agreement_id=agreement_id, version=av.version)
    return job


def get_job(session: Session, job_id: str, party: str | None = None) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found")
    if party is not None:
        spec = ag.AgreementSpec.model_validate(get_version(session, job.agreement_id, job.version).spec)
        if party not in {p.name for p in spec.parties}:
            raise NotFound(f"job {job_id!r} not found")
    return job


def cancel_job(session: Session, job_id: str, party: str) -> Job:
    job = get_job(session, job_id, party)
    if job.status in ("succeeded", "failed", "cancelled"):
        raise Conflict(f"job {job_id} already {job.status}")
    job.status = "cancelled"
    job.finished_at = utcnow()
    job.error = f"cancelled by {party}"
    for st in job.steps:
        if st.status == "pending":
            st.status = "cancelled"
        elif st.status == "dispatched":
            st.status = "cancelling"  # the orchestrator tells the node to stop it
    from coordinator import relay

    relay.purge(session, job_id)
    record(session, "job.cancelled", party, job_id=job_id)
    return job
