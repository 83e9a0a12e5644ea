"""The party node service, built by `create_app(settings)`.

Two kinds of callers, both with signed requests over mutual TLS:
- the coordinator (`/v1/steps...`): runs job steps, each checked against the signed agreement;
- the node's own operator (`/v1/admin/...`), signing with the node's own identity key
  (the `confide node ...` CLI on the node's host).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from confide import __version__
from confide.auth import Peer
from confide.db import session_scope
from confide.pki import Identity
from confide.settings import NodeSettings
from confide.web import BodyLimitMiddleware, install_error_handlers, meta_router, require
from party_node.node import Node
from party_node.storage.models import SignedAgreementRecord, StepRecord

COORDINATOR = require("coordinator")
OPERATOR = require("self")


class StepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(max_length=36)
    step: str = Field(max_length=80)
    job_type: str = Field(max_length=40)
    requester: str = Field(max_length=40)
    attempt: int = Field(default=1, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    agreement: dict[str, Any]
    mandate: dict[str, Any] | None = Field(default=None, description="The requester's signed job mandate (required)")


class SignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    digest: str | None = Field(default=None, description="The digest the operator reviewed")


class JobBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    agreement_id: str
    version: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)


def create_app(
    settings: NodeSettings,
    *,
    identity: Identity | None = None,
    coordinator_transport: httpx.BaseTransport | None = None,
) -> FastAPI:
    node = Node(settings, identity, coordinator_transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        node.close()

    app = FastAPI(title=f"Confide party node ({node.identity.name})", version=__version__, lifespan=lifespan)
    app.state.node = node
    app.state.verifier = node.verifier
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    install_error_handlers(app)
    app.include_router(meta_router("node", lambda: {"name": node.identity.name, "role": node.identity.role}))

    from consent.api import consent_router

    # Consent and preferences: recorded by the party's own systems (signed as this node).
    app.include_router(consent_router(lambda: node.consent), prefix="/v1/consent", dependencies=[Depends(OPERATOR)])

    # -- coordinator-facing ---------------------------------------------------------------------
    @app.post("/v1/steps")
    def start_step(body: StepRequest, peer: Peer = Depends(COORDINATOR)) -> dict[str, Any]:
        return node.start_step(body.model_dump(), peer.name)

    @app.get("/v1/steps/{job_id}/{step}")
    def step_status(job_id: str, step: str, peer: Peer = Depends(COORDINATOR)) -> dict[str, Any]:
        return node.step_status(job_id, step)

    @app.delete("/v1/steps/{job_id}/{step}")
    def cancel_step(job_id: str, step: str, peer: Peer = Depends(COORDINATOR)) -> dict[str, Any]:
        return node.cancel_step(job_id, step)

    @app.post("/v1/audit/peer-heads")
    def peer_head(body: dict[str, Any], peer: Peer = Depends(COORDINATOR)) -> dict[str, Any]:
        return node.keep_peer_head(body.get("head") or {})

    @app.post("/v1/withdrawals")
    def remote_withdrawal(body: dict[str, Any], peer: Peer = Depends(COORDINATOR)) -> dict[str, Any]:
        try:
            return node.apply_remote_withdrawal(str(body["from_party"]), str(body["purpose"]),
                                                [str(k) for k in body["join_keys"]][:100_000], str(body["event_id"]))
        except KeyError as exc:
            from confide.errors import ValidationError

            raise ValidationError(f"withdrawal notice lacks {exc.args[0]!r}") from None

    # -- operator-facing -----------------------------------------------------------------------
    @app.post("/v1/admin/register")
    def register(peer: Peer = Depends(OPERATOR)) -> Any:
        return node.register()

    @app.post("/v1/admin/agreements")
    def propose(spec: dict[str, Any], peer: Peer = Depends(OPERATOR)) -> Any:
        with node.coordinator() as c:
            return c.post("/v1/agreements", {"spec": spec})

    @app.get("/v1/admin/agreements")
    def agreements(peer: Peer = Depends(OPERATOR)) -> Any:
        with node.coordinator() as c:
            docs = c.get("/v1/agreements")
        with session_scope(node.factory) as s:
            signed = {(r.agreement_id, r.version) for r in s.scalars(select(SignedAgreementRecord))}
        for d in docs:
            d["signed_by_me"] = (d["agreement_id"], d["version"]) in signed
        return docs

    @app.post("/v1/admin/agreements/{agreement_id}/versions/{version}/sign")
    def sign(agreement_id: str, version: int, body: SignBody, peer: Peer = Depends(OPERATOR)) -> Any:
        return node.sign_agreement(agreement_id, version, expect_digest=body.digest)

    @app.post("/v1/admin/jobs")
    def create_job(body: JobBody, peer: Peer = Depends(OPERATOR)) -> Any:
        return node.create_job(body.type, body.agreement_id, body.version, body.params)

    @app.get("/v1/admin/jobs/{job_id}")
    def get_job(job_id: str, peer: Peer = Depends(OPERATOR)) -> Any:
        with node.coordinator() as c:
            return c.get(f"/v1/jobs/{job_id}")

    @app.get("/v1/admin/jobs/{job_id}/private")
    def private_results(job_id: str, peer: Peer = Depends(OPERATOR)) -> Any:
        """What this node's steps of the job produced for this party alone (never sent to the coordinator)."""
        return node.private_results(job_id)

    @app.post("/v1/admin/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, peer: Peer = Depends(OPERATOR)) -> Any:
        with node.coordinator() as c:
            return c.post(f"/v1/jobs/{job_id}/cancel")

    @app.post("/v1/admin/audit/publish")
    def publish(peer: Peer = Depends(OPERATOR)) -> Any:
        return node.publish_head()

    @app.get("/v1/admin/steps")
    def steps(peer: Peer = Depends(OPERATOR)) -> Any:
        with session_scope(node.factory) as s:
            return [
                {"job_id": r.job_id, "step": r.step, "job_type": r.job_type, "status": r.status,
                 "attempt": r.attempt, "error": r.error}
                for r in s.scalars(select(StepRecord).order_by(StepRecord.started_at))
            ]

    @app.get("/v1/admin/obfuscators")
    def obfuscators(peer: Peer = Depends(OPERATOR)) -> Any:
        """The idle-time Paillier obfuscator stock: per arbiter key, how many are ready."""
        return node.obfuscators.status()

    @app.get("/v1/admin/datasets")
    def datasets(peer: Peer = Depends(OPERATOR)) -> Any:
        from party_node import datasets as ds

        with session_scope(node.factory) as s:
            return [ds.describe(s, d.name) for d in ds.list_datasets(s)]

    return app
