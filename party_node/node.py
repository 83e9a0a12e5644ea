"""A party node's runtime: identity, database, coordinator link, peer keys, audit, steps.

The node trusts only its own CA and its own records: other parties' identity keys come from
certificates it checks against the CA itself, and every job step is checked against an
agreement this node signed, fully signed by everyone and counter-signed, not expired.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import httpx
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from confide import agreements as ag
from confide import mandate as job_mandate
from confide import pki
from confide.canonical import canonical_json
from confide.auth import RequestVerifier
from confide.db import make_engine, session_factory, session_scope
from confide.errors import AgreementError, ConfideError, Conflict, NotFound, PermissionDenied, ValidationError
from confide.pki import Identity
from confide.settings import NodeSettings
from confide.transport import ServiceClient
from party_node.audit import NodeAudit
from party_node.steps import PRIVATE, StepContext, executor_for
from party_node.storage import ensure_schema
from party_node.storage.models import PsiMatch, SignedAgreementRecord, StepRecord, utcnow

log = logging.getLogger("confide.node")


class Node:
    def __init__(
        self,
        settings: NodeSettings,
        identity: Identity | None = None,
        coordinator_transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity or pki.load_identity(settings.pki_dir)
        if self.identity.name != settings.name:
            raise ValidationError(
                f"node is configured as {settings.name!r} but its certificate names {self.identity.name!r}"
            )
        if self.identity.role not in ("brand", "partner"):
            raise ValidationError(f"identity {self.identity.name!r} has role {self.identity.role!r}, not a party")
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(settings.resolved_database_url("node.db"))
        ensure_schema(self.engine)
        self.factory: sessionmaker[Session] = session_factory(self.engine)
        self.audit = NodeAudit(self.factory, self.identity)
        from consent.store import ConsentStore, load_or_create_secret

        # The consent gate every job calls before data moves; its secret never leaves the node.
        self.consent = ConsentStore(
            self.factory,
            secret_key=load_or_create_secret(settings.data_dir / "consent.key"),
            recipients=(),
            audit=self.audit,
        )
        self._coordinator_transport = coordinator_transport
        self._certs: dict[str, pki.CertInfo] = {}
        self._last_refresh = -1e9
        self._publish_lock = threading.Lock()
        self._keys_lock = threading.Lock()
        self.verifier = RequestVerifier(self.identity.name, self._resolve, max_skew_s=settings.max_clock_skew_s)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="step")
        self._running: dict[tuple[str, str], threading.Event] = {}
        self._recover()
        self.consent.add_withdrawal_hook(self._on_withdrawal)
        from party_node.obfuscator_stock import ObfuscatorStock

        # Paillier obfuscators for the agreements' arbiter keys, computed while idle (off at 0).
        self.obfuscators = ObfuscatorStock(self, capacity=settings.obfuscator_stock,
                                           key_bits=settings.obfuscator_key_bits,
                                           workers=settings.obfuscator_workers,
                                           refresh_s=settings.obfuscator_refresh_s)
        self.obfuscators.start()
        # Refresh the peers' certificates now and then, so a revocation at the coordinator
        # reaches this node without waiting for an unknown sender.
        self._stop_refresh = threading.Event()
        if settings.registry_refresh_s > 0:
            threading.Thread(target=self._refresh_loop, name="registry-refresh", daemon=True).start()

    # -- peers and keys ------------------------------------------------------------------------
    def coordinator(self) -> ServiceClient:
        return ServiceClient(
            self.identity, "coordinator", self.settings.coordinator_url, transport=self._coordinator_transport
        )

    def _resolve(self, name: str):  # type: ignore[no-untyped-def]
        if name == self.identity.name:
            return self.identity.public_key, "self"
        key = self.key_of(name, refresh_ok=True, quiet=True)
        if key is None:
            return None
        return key, ("coordinator" if name == "coordinator" else "party")

    def key_of(self, name: str, *, refresh_ok: bool = True, quiet: bool = False) -> ed25519.Ed25519PublicKey | None:
        """Identity key of `name`, from a certificate this node verified against its CA."""
        info = self.cert_of(name, refresh_ok=refresh_ok, quiet=quiet)
        return None if info is None else info.identity_public

    def cert_of(self, name: str, *, refresh_ok: bool = True, quiet: bool = False) -> pki.CertInfo | None:
        """What the CA-verified certificate of `name` binds (identity and box keys)."""
        with self._keys_lock:
            if name in self._certs:
                return self._certs[name]
        if not refresh_ok or (quiet and time.monotonic() - self._last_refresh < 2.0):
            return None  # an unknown sender must not make us hammer the coordinator
        try:
            self.refresh_keys()
        except ConfideError as exc:
            if not quiet:
                raise
            log.warning("could not refresh peer keys: %s", exc.message)
        with self._keys_lock:
            return self._certs.get(name)

    def refresh_keys(self) -> None:
        self._last_refresh = time.monotonic()
        with self.coordinator() as c:
            coord_cert = c.get("/v1/identity")["cert_pem"]
            info = pki.verify_certificate(coord_cert, self.identity.ca_pem)
            if info.name != "coordinator" or info.role != "coordinator":
                raise AgreementError("the coordinator presented a certificate that is not the coordinator's")
            certs = {"coordinator": info}
            try:
                parties = c.get("/v1/parties")
            except ConfideError:
                parties = None  # not registered yet (or the listing failed): keep what we know
        for p in parties or []:
            try:
                pinfo = pki.verify_certificate(p["cert_pem"], self.identity.ca_pem)
            except ConfideError:
                log.warning("registry entry %s has a certificate our CA did not issue; ignored", p.get("name"))
                continue
            if pinfo.name == p["name"]:
                certs[pinfo.name] = pinfo
        if parties is None:
            with self._keys_lock:
                self._certs.update(certs)
            return
        with self._keys_lock:
            # The registry is the truth: a party it no longer lists (revoked) is dropped here too.
            dropped = sorted(set(self._certs) - set(certs))
            self._certs = certs
        if dropped:
            log.warning("peers no longer in the coordinator's registry (revoked?), dropped: %s", dropped)
        # Consent may name any other registered party as recipient.
        self.consent.recipients = frozenset(n for n in certs if n not in ("coordinator", self.identity.name))

    def _refresh_loop(self) -> None:
        while not self._stop_refresh.wait(self.settings.registry_refresh_s):
            if not self._certs:
                continue  # nothing learnt yet (not registered): the first use fetches
            try:
                self.refresh_keys()
            except ConfideError as exc:
                log.warning("could not refresh peer keys: %s", exc.message)

    def verified_keys(self, names: list[str]) -> dict[str, ed25519.Ed25519PublicKey]:
        out: dict[str, ed25519.Ed25519PublicKey] = {}
        for n in names:
            k = self.key_of(n)
            if k is not None:
                out[n] = k
        return out

    # -- registration and agreements -------------------------------------------------------------
    def register(self) -> dict[str, Any]:
        body = {
            "name": self.identity.name,
            "role": self.identity.role,
            "endpoint": self.settings.endpoint(),
            "cert_pem": self.identity.cert_pem.decode(),
        }
        with self.coordinator() as c:
            out = c.post("/v1/parties", body)
        self.audit.append("node.registered", {"coordinator": self.settings.coordinator_url, "endpoint": body["endpoint"]})
        self.refresh_keys()
        return out

    def sign_agreement(self, agreement_id: str, version: int, *, expect_digest: str | None = None) -> dict[str, Any]:
        """Review and sign an agreement version at this node.

        The node fetches the version, recomputes its digest, checks it names this node and is not
        expired, records its signature locally, then sends it to the coordinator.
        """
        with self.coordinator() as c:
            doc = ag.SignedAgreement.model_validate(c.get(f"/v1/agreements/{agreement_id}/versions/{version}"))
        digest = ag.spec_digest(doc.agreement_id, doc.version, doc.spec)
        if digest != doc.digest:
            raise AgreementError("the coordinator served an agreement whose content does not match its digest")
        if expect_digest is not None and expect_digest != digest:
            raise AgreementError(f"agreement digest is {digest}, not the reviewed {expect_digest}")
        me = doc.spec.party(self.identity.name)
        if doc.spec.expires_at <= dt.datetime.now(dt.timezone.utc):
            raise AgreementError(f"agreement {agreement_id} v{version} has already expired")
        if doc.status != "proposed":
            raise Conflict(f"agreement {agreement_id} v{version} is {doc.status}; nothing to sign")
        self._check_own_datasets(me)
        sig = ag.sign(self.identity.signing_key, agreement_id, version, digest, self.identity.name)
        with session_scope(self.factory) as s:
            if s.get(SignedAgreementRecord, (agreement_id, version)) is None:
                s.add(SignedAgreementRecord(agreement_id=agreement_id, version=version, digest=digest,
                                            spec=doc.spec.model_dump(mode="json"), signature=sig))
            self.audit.append("agreement.signed", {"agreement_id": agreement_id, "version": version, "digest": digest},
                              session=s)
        with self.coordinator() as c:
            signed = c.post(f"/v1/agreements/{agreement_id}/versions/{version}/signatures",
                            {"digest": digest, "signature": sig})
        if signed.get("status") == "active":
            self.obfuscators.refresh_now()  # a new training agreement: stock its arbiter key
        return signed

    def _check_own_datasets(self, me: ag.PartySpec) -> None:
        """Refuse to sign for datasets/columns this node does not hold."""
        try:
            from party_node import datasets as ds
        except ImportError:
            return
        with session_scope(self.factory) as s:
            for name in me.datasets:
                try:
                    info = ds.describe(s, name)
                except NotFound:
                    raise ValidationError(f"agreement names dataset {name!r}, which this node does not hold") from None
                have = {c["column"] for c in info["columns"]}
                wanted = set(me.columns.get(name, [])) | {i.column for i in me.identifiers if i.dataset == name}
                missing = sorted(wanted - have)
                if missing:
                    raise ValidationError(f"agreement names columns {missing} not in dataset {name!r}")

    def check_agreement(self, doc_data: dict[str, Any], job_type: str, requester: str) -> ag.SignedAgreement:
        """Everything a node checks before a job step; raises AgreementError/PermissionDenied."""
        doc = ag.SignedAgreement.model_validate(doc_data)
        with session_scope(self.factory) as s:
            mine = s.get(SignedAgreementRecord, (doc.agreement_id, doc.version))
            if mine is None or mine.digest != doc.digest:
                raise AgreementError(f"this node never signed agreement {doc.agreement_id} v{doc.version} as presented")
            newer = s.scalars(
                select(SignedAgreementRecord.version).where(
                    SignedAgreementRecord.agreement_id == doc.agreement_id,
                    SignedAgreementRecord.version > doc.version,
                    SignedAgreementRecord.active_document.is_not(None),
                )
            ).first()
            if newer is not None:
                raise AgreementError(f"agreement {doc.agreement_id} v{doc.version} was superseded by v{newer}")
        names = [p.name for p in doc.spec.parties] + ["coordinator"]
        ag.verify_signed(doc, self.verified_keys(names))
        doc.spec.party(self.identity.name)
        doc.spec.party(requester)
        rule = doc.spec.rule(job_type)
        if rule.requester is not None and rule.requester != requester:
            raise PermissionDenied(f"{requester!r} may not request {job_type!r} under {doc.agreement_id}")
        with session_scope(self.factory) as s:
            rec = s.get(SignedAgreementRecord, (doc.agreement_id, doc.version))
            assert rec is not None
            if rec.active_document is None:
                rec.active_document = doc.model_dump(mode="json")
                rec.activated_seen_at = utcnow()
        return doc

    def check_mandate(self, data: object, job_id: str, job_type: str, requester: str,
                      doc: ag.SignedAgreement, params: dict[str, Any]) -> None:
        """The requester itself, not only the coordinator, must have asked for exactly this job:
        its signed mandate names this job id, agreement version and type, and the job's
        parameters are what validating the mandate's parameters gives. A mandate is fresh when
        the node first sees its job (re-dispatched steps of a known job are resumes)."""
        from coordinator.jobtypes import job_type as job_type_of

        m = job_mandate.verify(data, self.verified_keys([requester]).get(requester), requester)
        job_mandate.check_matches(m, requester=requester, agreement_id=doc.agreement_id,
                                  version=doc.version, type_=job_type)
        if m.job_id != job_id:
            raise PermissionDenied(f"the mandate is for job {m.job_id}, not {job_id}")
        if canonical_json(job_type_of(job_type).validate_params(doc.spec, dict(m.params))) != canonical_json(params):
            raise PermissionDenied(f"job {job_id}: parameters differ from the requester's mandate")
        with session_scope(self.factory) as s:
            known = s.scalars(select(StepRecord.step).where(StepRecord.job_id == job_id)).first() is not None
        if not known:
            age = (utcnow() - m.issued_at).total_seconds()
            if age > self.settings.mandate_max_age_s:
                raise PermissionDenied(f"the mandate of job {job_id} was issued {age:.0f} s ago; "
                                       f"this node accepts mandates up to {self.settings.mandate_max_age_s:.0f} s old")
            if age < -300:
                raise PermissionDenied(f"the mandate of job {job_id} is dated in the future")

    def create_job(self, type_: str, agreement_id: str, version: int | None, params: dict[str, Any]) -> Any:
        """Ask the coordinator for a job, with this node's signed mandate for it (the active
        agreement version unless one is named)."""
        if version is None:
            with self.coordinator() as c:
                docs = c.get("/v1/agreements")
            active = [d["version"] for d in docs if d["agreement_id"] == agreement_id and d["status"] == "active"]
            if not active:
                raise NotFound(f"agreement {agreement_id!r} has no active version")
            version = max(active)
        signed = job_mandate.issue(self.identity.signing_key, requester=self.identity.name,
                                   agreement_id=agreement_id, version=version, type_=type_, params=params)
        body = {"type": type_, "agreement_id": agreement_id, "version": version, "params": params, "mandate": signed}
        with self.coordinator() as c:
            out = c.post("/v1/jobs", body)
        self.audit.append("job.requested", {"job_id": signed["mandate"]["job_id"], "job_type": type_,
                                             "agreement_id": agreement_id, "version": version})
        return out

    # -- job steps ---------------------------------------------------------------------------------
    def _recover(self) -> None:
        """After a restart, steps that were running are marked interrupted; the coordinator re-runs them."""
        with session_scope(self.factory) as s:
            for rec in s.scalars(select(StepRecord).where(StepRecord.status == "running")):
                rec.status = "interrupted"
                rec.error = "node restarted during the step"
                self.audit.append("step.interrupted", {"job_id": rec.job_id, "step": rec.step}, session=s)

    def start_step(self, body: dict[str, Any], coordinator_name: str) -> dict[str, Any]:
        job_id, step, job_type = body["job_id"], body["step"], body["job_type"]
        requester, params = body["requester"], body.get("params") or {}
        try:
            doc = self.check_agreement(body["agreement"], job_type, requester)
            self.check_mandate(body.get("mandate"), job_id, job_type, requester, doc, params)
            run = executor_for(job_type)
        except ConfideError as exc:
            self.audit.append("step.refused", {"job_id": job_id, "step": step, "job_type": job_type,
                                               "reason": exc.message})
            raise
        with session_scope(self.factory) as s:
            rec = s.get(StepRecord, (job_id, step))
            if rec is not None and rec.status in ("running", "succeeded", "failed"):
                return self.step_status(job_id, step)
            if rec is None:
                rec = StepRecord(job_id=job_id, step=step, job_type=job_type, agreement_id=doc.agreement_id,
                                 version=doc.version, requester=requester, params=params, status="running",
                                 attempt=int(body.get("attempt", 1)))
                s.add(rec)
            else:  # interrupted or cancelled before: run again
                rec.status, rec.error, rec.result, rec.private_result = "running", None, None, None
                rec.attempt = int(body.get("attempt", rec.attempt + 1))
                rec.started_at, rec.finished_at = utcnow(), None
            self.audit.append("step.started", {"job_id": job_id, "step": step, "job_type": job_type,
                                               "agreement_id": doc.agreement_id, "version": doc.version}, session=s)
        cancel = threading.Event()
        self._running[(job_id, step)] = cancel
        ctx = StepContext(node=self, job_id=job_id, step=step, agreement=doc, params=params,
                          requester=requester, cancelled=cancel, job_type=job_type)
        self.pool.submit(self._run_step, ctx, run)
        return {"status": "running"}

    def _run_step(self, ctx: StepContext, run: Callable[[StepContext], dict[str, Any]]) -> None:
        try:
            if self.settings.test_step_delay_s:
                ctx.cancelled.wait(self.settings.test_step_delay_s)
            result = run(ctx)
            status, error = "succeeded", None
        except ConfideError as exc:
            result, status, error = None, "failed", exc.message
        except Exception as exc:  # a bug must still end the step cleanly
            log.exception("step %s/%s crashed", ctx.job_id, ctx.step)
            result, status, error = None, "failed", f"internal error: {type(exc).__name__}"
        finally:
            self._running.pop((ctx.job_id, ctx.step), None)
        if ctx.cancelled.is_set():
            status, result, error = "cancelled", None, "cancelled"
        private = result.pop(PRIVATE, None) if isinstance(result, dict) else None
        with session_scope(self.factory) as s:
            rec = s.get(StepRecord, (ctx.job_id, ctx.step))
            if rec is None:
                return
            rec.status, rec.result, rec.error, rec.finished_at = status, result, error, utcnow()
            rec.private_result = private
            self.audit.append(f"step.{status}", {"job_id": ctx.job_id, "step": ctx.step,
                                                 **({"error": error} if error else {})}, session=s)
        self.publish_head_soon()

    def step_status(self, job_id: str, step: str) -> dict[str, Any]:
        with session_scope(self.factory) as s:
            rec = s.get(StepRecord, (job_id, step))
            if rec is None:
                raise NotFound(f"no step {step!r} of job {job_id!r} at this node")
            return {"status": rec.status, "attempt": rec.attempt, "result": rec.result, "error": rec.error}

    def private_results(self, job_id: str) -> dict[str, Any]:
        """Results of a job's steps at this node that only this party's operator may see."""
        with session_scope(self.factory) as s:
            rows = s.scalars(select(StepRecord).where(StepRecord.job_id == job_id))
            return {r.step: r.private_result for r in rows if r.private_result is not None}

    def cancel_step(self, job_id: str, step: str) -> dict[str, Any]:
        ev = self._running.get((job_id, step))
        if ev is not None:
            ev.set()
        return self.step_status(job_id, step)

    # -- withdrawals ---------------------------------------------------------------------------
    def _on_withdrawal(self, subject: str, purpose: str, recipient: str | None) -> None:
        """A subject withdrew (or refused, or opted out): purge what this node derived from them
        for collaborations, and tell each recipient party, through the coordinator, to exclude
        the matching record from now on (it learns only the join keys it already holds)."""
        with session_scope(self.factory) as s:
            rows = list(s.scalars(select(PsiMatch).where(PsiMatch.row_key == subject)))
            by_agreement: dict[str, list[str]] = {}
            for r in rows:
                by_agreement.setdefault(r.agreement_id, []).append(r.join_key)
            affected = {a: ag.AgreementSpec.model_validate(rec.spec) for a in by_agreement
                        for rec in [s.scalars(select(SignedAgreementRecord).where(
                            SignedAgreementRecord.agreement_id == a).order_by(
                            SignedAgreementRecord.version.desc())).first()] if rec is not None}
            purge = [r for r in rows if _covers(purpose, affected.get(r.agreement_id))]
            for r in purge:
                s.delete(r)
            ref = self.consent.subject_ref(subject)
            self.audit.append("consent.withdrawal_applied", {"subject_ref": ref, "purpose": purpose,
                                                             "recipient": recipient, "purged_matches": len(purge)},
                              session=s)
        if recipient is None:
            return
        keys = [k for a, ks in by_agreement.items() if a in affected and
                recipient in {p.name for p in affected[a].parties} for k in ks]
        if not keys:
            return
        with self.coordinator() as c:
            c.post("/v1/withdrawals", {"recipient": recipient, "purpose": purpose, "join_keys": keys,
                                       "event_id": f"{ref}:{purpose}:{len(keys)}"})
        self.audit.append("consent.withdrawal_forwarded", {"subject_ref": ref, "recipient": recipient,
                                                           "purpose": purpose, "join_keys": len(keys)})

    def apply_remote_withdrawal(self, from_party: str, purpose: str, join_keys: list[str], event_id: str) -> dict[str, Any]:
        """Recipient side: exclude our rows matched to `from_party`'s withdrawn subject."""
        with session_scope(self.factory) as s:
            rows = list(s.scalars(select(PsiMatch).where(PsiMatch.join_key.in_(join_keys))))
            agreements = {r.agreement_id for r in rows}
            purposes = set()
            for a in agreements:
                rec = s.scalars(select(SignedAgreementRecord).where(SignedAgreementRecord.agreement_id == a)
                                .order_by(SignedAgreementRecord.version.desc())).first()
                if rec is not None and from_party in {p["name"] for p in rec.spec["parties"]}:
                    purposes.update(rec.spec["purposes"])
            subjects = sorted({r.row_key for r in rows if r.agreement_id in agreements})
        excluded = 0
        for subject in subjects:
            for p in sorted(purposes | {purpose}):
                self.consent.record_remote_withdrawal(subject, p, from_party, event_id=f"{event_id}:{p}")
            excluded += 1
        self.audit.append("consent.remote_withdrawal", {"from_party": from_party, "purpose": purpose,
                                                        "join_keys": len(join_keys), "subjects_excluded": excluded})
        return {"subjects_excluded": excluded}

    def publish_head(self) -> dict[str, Any]:
        """Sign the audit log's current head and hand it to the coordinator, with a consistency
        proof from the last head it keeps; it passes the head on to the other parties."""
        from consent.audit import SignedTreeHead  # noqa: F401

        log_ = self.audit.log
        if log_ is None:
            raise ValidationError("this node has no Merkle audit log")
        with self._publish_lock:
            with self.coordinator() as c:
                kept = c.get(f"/v1/audit/heads/{self.identity.name}/latest")["size"]
                head = log_.sign_head()
                if head.size < kept:
                    raise AgreementError(f"the coordinator keeps a head of size {kept}, larger than this log "
                                         f"({head.size}): the log was truncated")
                # Same size as kept: the store compares roots itself; a proof must start below it.
                proof = log_.consistency_proof(kept, head.size).to_dict() if 0 < kept < head.size else None
                return c.post("/v1/audit/heads", {"head": head.to_dict(), "proof": proof})

    def publish_head_soon(self) -> None:
        def run() -> None:
            try:
                self.publish_head()
            except Exception as exc:  # noqa: BLE001 - the next publication catches up
                log.warning("could not publish the audit head: %s", exc)

        threading.Thread(target=run, name="publish-head", daemon=True).start()

    def keep_peer_head(self, head_data: dict[str, Any]) -> dict[str, Any]:
        """Keep another party's signed tree head (verified with its CA-certified identity key)."""
        from consent.audit import HeadStore, SignedTreeHead

        head = SignedTreeHead.from_dict(head_data)
        key = self.key_of(head.log)
        if key is None or head.signer != head.log:
            raise AgreementError(f"no verified identity for the log {head.log!r}")
        HeadStore(self.factory).add(head, key)
        return {"kept": True, "log": head.log, "size": head.size}

    def close(self) -> None:
        self._stop_refresh.set()
        self.obfuscators.close()
        for ev in list(self._running.values()):
            ev.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()


def _covers(purpose: str, spec: "ag.AgreementSpec | None") -> bool:
    """Whether a withdrawn `purpose` touches an agreement (same, parent or child of one of its
    purposes, or any sharing with another party)."""
    if spec is None:
        return True
    if purpose.startswith("sharing"):
        return True
    return any(p == purpose or p.startswith(purpose + ".") or purpose.startswith(p + ".") for p in spec.purposes)
