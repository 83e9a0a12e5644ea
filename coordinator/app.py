"""The coordinator service: registry, agreements, jobs. Built by `create_app(settings)`."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from confide import __version__, pki
from confide import mandate as job_mandate
from confide.auth import H_SENDER, Peer, RequestVerifier
from confide.db import make_engine, session_factory, session_scope
from confide.errors import AuthenticationError, PermissionDenied, ValidationError
from confide.pki import Identity
from confide.settings import CoordinatorSettings
from confide.transport import ServiceClient
from confide.web import BodyLimitMiddleware, authenticate, install_error_handlers, meta_router, require
from coordinator import arbiter_keys, relay, service
from coordinator.jobtypes import known_types
from coordinator.orchestrator import Orchestrator
from coordinator.schemas import CreateJobRequest, JobOut, PartyOut, ProposeRequest, RegisterRequest, SignRequest
from coordinator.storage import ensure_schema
from coordinator.storage.models import Job, Party

log = logging.getLogger("confide.coordinator")
PARTY = require("brand", "partner")


class Coordinator:
    """Everything the routes need, built once from settings."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        identity: Identity | None = None,
        node_transport: Callable[[str], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity or pki.load_identity(settings.pki_dir)
        if self.identity.name != "coordinator":
            raise ValidationError(f"identity in {settings.pki_dir} is {self.identity.name!r}, not the coordinator")
        self.engine = make_engine(settings.resolved_database_url("coordinator.db"))
        ensure_schema(self.engine)
        self.factory: sessionmaker[Session] = session_factory(self.engine)
        self.verifier = RequestVerifier("coordinator", self._resolve, max_skew_s=settings.max_clock_skew_s)
        self._node_transport = node_transport
        self.orchestrator = Orchestrator(
            self.factory,
            self.node_client,
            step_deadline_s=settings.step_deadline_s,
            poll_interval_s=settings.poll_interval_s,
        )
        self.orchestrator.coordinator = self

    def _resolve(self, name: str):  # type: ignore[no-untyped-def]
        with session_scope(self.factory) as s:
            party = s.get(Party, name)
            if party is None:
                return None
            if party.revoked_at is not None:
                raise AuthenticationError(f"party {name!r} is revoked: {party.revoked_reason}", sender=name)
            from cryptography.hazmat.primitives.asymmetric import ed25519

            return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(party.identity_key)), party.role

    def forward_head(self, parties: list[str], head: dict[str, Any]) -> None:
        """Best effort, in the background: a node that misses a head gets the next one."""
        import threading

        def run() -> None:
            for party in parties:
                try:
                    with self.node_client(party) as c:
                        c.post("/v1/audit/peer-heads", {"head": head})
                except Exception as exc:  # noqa: BLE001 - logged, never fatal
                    log.warning("could not forward %s's tree head to %s: %s", head.get("log"), party, exc)

        threading.Thread(target=run, name="head-forward", daemon=True).start()

    def node_client(self, party: str) -> ServiceClient:
        with session_scope(self.factory) as s:
            endpoint = service.get_party(s, party).endpoint
        transport = self._node_transport(party) if self._node_transport else None
        return ServiceClient(self.identity, party, endpoint, transport=transport, timeout=15.0)


def create_app(
    settings: CoordinatorSettings,
    *,
    identity: Identity | None = None,
    node_transport: Callable[[str], Any] | None = None,
    run_orchestrator: bool = True,
) -> FastAPI:
    coord = Coordinator(settings, identity, node_transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if run_orchestrator:
            coord.orchestrator.start()
        yield
        coord.orchestrator.stop()
        coord.engine.dispose()

    app = FastAPI(title="Confide coordinator", version=__version__, lifespan=lifespan)
    app.state.coordinator = coord
    app.state.verifier = coord.verifier
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    install_error_handlers(app)

    def _parties() -> dict[str, int]:
        with session_scope(coord.factory) as s:
            return {"parties": len(list(s.scalars(select(Party.name))))}

    app.include_router(meta_router("coordinator", _parties))

    @app.get("/v1/identity")
    def identity_info() -> dict[str, str]:
        """The coordinator's certificate (public); nodes check it against their CA."""
        return {"name": "coordinator", "cert_pem": coord.identity.cert_pem.decode()}

    @app.get("/v1/job-types")
    def job_types() -> dict[str, list[str]]:
        return {"job_types": known_types()}

    # -- registry --------------------------------------------------------------------------
    @app.post("/v1/parties", response_model=PartyOut)
    async def register(request: Request) -> Any:
        """Register (or update) a party. Authenticated by the identity key in its certificate."""
        raw = await request.body()
        try:
            body = RegisterRequest.model_validate(json.loads(raw or b"{}"))
        except Exception as exc:
            raise ValidationError(f"invalid registration: {exc}") from exc
        info = pki.verify_certificate(body.cert_pem, coord.identity.ca_pem)
        if info.name != body.name or info.role != body.role:
            raise AuthenticationError(
                f"certificate is for {info.name!r} ({info.role}), not {body.name!r} ({body.role})"
            )
        if request.headers.get(H_SENDER) != info.name:
            raise AuthenticationError("registration must be signed by the party it registers")
        await authenticate(request, coord.verifier, key_override=(info.identity_public, info.role))
        with session_scope(coord.factory) as s:
            party = service.register_party(s, coord.identity.ca_pem, info, body.endpoint, body.cert_pem)
            return PartyOut.model_validate(party, from_attributes=True)

    @app.get("/v1/parties", response_model=list[PartyOut])
    def parties(peer: Peer = Depends(PARTY)) -> Any:
        with session_scope(coord.factory) as s:
            rows = s.scalars(select(Party).where(Party.revoked_at.is_(None)).order_by(Party.name))
            return [PartyOut.model_validate(p, from_attributes=True) for p in rows]

    # -- agreements ------------------------------------------------------------------------
    @app.post("/v1/agreements")
    def propose(body: ProposeRequest, peer: Peer = Depends(PARTY)) -> Any:
        with session_scope(coord.factory) as s:
            av = service.propose(s, peer.name, body.spec)
            s.flush()
            return service.to_signed(av).model_dump(mode="json")

    @app.get("/v1/agreements")
    def agreements(peer: Peer = Depends(PARTY)) -> Any:
        with session_scope(coord.factory) as s:
            return [service.to_signed(av).model_dump(mode="json") for av in service.list_for(s, peer.name)]

    @app.get("/v1/agreements/{agreement_id}/versions/{version}")
    def agreement(agreement_id: str, version: int, peer: Peer = Depends(PARTY)) -> Any:
        with session_scope(coord.factory) as s:
            av = service.get_version(s, agreement_id, version)
            doc = service.to_signed(av)
            doc.spec.party(peer.name)
            return doc.model_dump(mode="json")

    @app.post("/v1/agreements/{agreement_id}/versions/{version}/signatures")
    def sign(agreement_id: str, version: int, body: SignRequest, peer: Peer = Depends(PARTY)) -> Any:
        with session_scope(coord.factory) as s:
            av = service.add_signature(s, coord.identity, peer.name, agreement_id, version, body.digest, body.signature)
            s.flush()
            return service.to_signed(av).model_dump(mode="json")

    @app.get("/v1/agreements/{agreement_id}/arbiter-key")
    def arbiter_key(agreement_id: str, bits: int = 2048, peer: Peer = Depends(PARTY)) -> Any:
        """The public half of the agreement's current arbiter key (parties precompute
        obfuscators for it while idle; `coordinator.arbiter_keys`)."""
        return arbiter_keys.published(coord, peer.name, agreement_id, bits)

    # -- jobs --------------------------------------------------------------------------------
    def job_out(job: Job) -> JobOut:
        return JobOut.model_validate(job, from_attributes=True)

    @app.post("/v1/jobs", response_model=JobOut, status_code=201)
    def create_job(body: CreateJobRequest, peer: Peer = Depends(PARTY)) -> Any:
        with session_scope(coord.factory) as s:
            resolved = coord._resolve(peer.name)
            signed = job_mandate.verify(body.mandate, resolved[0] if resolved else None, peer.name)
            job = service.create_job(s, peer.name, body.type, body.agreement_id, body.version, body.params,
                                     mandate=signed, mandate_doc=body.mandate)
            s.flush()
            s.refresh(job)
            out = job_out(job)
            coord.orchestrator.wake()
            return out

    @app.get("/v1/jobs/{job_id}", response_model=JobOut)
    def get_job(job_id: str, peer: Peer = Depends(PARTY)) -> Any:
        with session_scope(coord.factory) as s:
            return job_out(service.get_job(s, job_id, peer.name))

    @app.get("/v1/jobs", response_model=list[JobOut])
    def list_jobs(peer: Peer = Depends(PARTY)) -> Any:
        with session_scope(coord.factory) as s:
            mine = {av.agreement_id for av in service.list_for(s, peer.name)}
            jobs = s.scalars(select(Job).where(Job.agreement_id.in_(mine)).order_by(Job.created_at)) if mine else []
            return [job_out(j) for j in jobs]

    # -- audit tree heads --------------------------------------------------------------------
    @app.get("/v1/audit/heads/{log}/latest")
    def latest_head(log: str, peer: Peer = Depends(PARTY)) -> dict[str, Any]:
        """The largest head of `log` the coordinator keeps (a node proves consistency from it)."""
        from consent.audit import HeadStore

        head = HeadStore(coord.factory).latest(log)
        return {"log": log, "size": head.size if head else 0, "root": head.root if head else None}

    @app.post("/v1/audit/heads")
    def receive_head(body: dict[str, Any], peer: Peer = Depends(PARTY)) -> dict[str, Any]:
        """Keep a party's signed tree head (checked against its last one) and pass it to every
        party that shares an agreement with it, so none can later rewrite its log unnoticed."""
        from consent.audit import ConsistencyProof, HeadStore, SignedTreeHead

        head = SignedTreeHead.from_dict(body.get("head") or {})
        if head.log != peer.name or head.signer != peer.name:
            raise AuthenticationError(f"{peer.name!r} may only publish heads of its own log")
        proof = ConsistencyProof.from_dict(body["proof"]) if body.get("proof") else None
        key, _role = coord._resolve(peer.name)
        HeadStore(coord.factory).add(head, key, proof=proof)
        with session_scope(coord.factory) as s:
            others = sorted({p["name"] for av in service.list_for(s, peer.name) for p in av.spec["parties"]}
                            - {peer.name})
            service.record(s, "audit.head_received", peer.name, size=head.size, root=head.root)
        coord.forward_head(others, head.to_dict())
        return {"kept": True, "forwarded_to": others}

    # -- per-recipient withdrawals (PIPL Art. 23) ---------------------------------------------
    @app.post("/v1/withdrawals")
    def forward_withdrawal(body: dict[str, Any], peer: Peer = Depends(PARTY)) -> dict[str, Any]:
        """Pass a subject's withdrawal to the recipient party's node, as join keys both sides hold
        from an earlier match; the coordinator sees opaque keys only."""
        recipient = str(body.get("recipient", ""))
        keys = body.get("join_keys") or []
        if not isinstance(keys, list) or not keys or len(keys) > 100_000:
            raise ValidationError("join_keys must be a non-empty list (at most 100,000)", field="join_keys")
        with session_scope(coord.factory) as s:
            shared = any(recipient in {p["name"] for p in av.spec["parties"]} for av in service.list_for(s, peer.name))
            if not shared:
                raise PermissionDenied(f"{peer.name!r} shares no agreement with {recipient!r}")
            service.record(s, "withdrawal.forwarded", peer.name, recipient=recipient, keys=len(keys))
        with coord.node_client(recipient) as c:
            return c.post("/v1/withdrawals", {"from_party": peer.name, "purpose": body.get("purpose"),
                                              "join_keys": keys, "event_id": body.get("event_id")})

    # -- relay -------------------------------------------------------------------------------
    @app.put("/v1/relay/{job_id}/{channel}/{recipient}/{seq}")
    async def relay_put(job_id: str, channel: str, recipient: str, seq: int, request: Request,
                        peer: Peer = Depends(PARTY)) -> dict[str, int]:
        payload = await request.body()
        with session_scope(coord.factory) as s:
            return {"bytes": relay.put(s, job_id, channel, peer.name, recipient, seq, payload)}

    @app.get("/v1/relay/{job_id}/{channel}/{sender}/{seq}")
    def relay_get(job_id: str, channel: str, sender: str, seq: int, peer: Peer = Depends(PARTY)) -> Response:
        with session_scope(coord.factory) as s:
            data = relay.get(s, job_id, channel, sender, peer.name, seq)
        return Response(content=data, media_type="application/octet-stream")

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobOut)
    def cancel(job_id: str, peer: Peer = Depends(PARTY)) -> Any:
        with session_scope(coord.factory) as s:
            return job_out(service.cancel_job(s, job_id, peer.name))

    _mount_optional_routers(app, coord)
    return app


def _mount_optional_routers(app: FastAPI, coord: Coordinator) -> None:
    """Routers of capabilities that live in their own modules (e.g. the training arbiter)."""
    import importlib

    try:
        module = importlib.import_module("coordinator.arbiter")
    except ModuleNotFoundError as exc:
        if exc.name != "coordinator.arbiter":
            raise
        return
    app.include_router(module.arbiter_router(coord, PARTY))
