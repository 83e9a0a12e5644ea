"""Test helpers: signed in-process clients and agreement specs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from confide import pki
from confide.transport import ServiceClient


def inprocess_client(app: FastAPI, test_client: TestClient, pki_dir: Path, as_party: str, peer: str) -> ServiceClient:
    """A signed client to an in-process app (no sockets): same signatures as over mTLS."""
    ident = pki.load_identity(pki_dir / as_party)
    return ServiceClient(ident, peer, "http://testserver", transport=test_client._transport)  # type: ignore[attr-defined]


def spec(
    agreement_id: str = "coffee-2026",
    *,
    parties: tuple[str, ...] = ("brand", "partner"),
    jobs: tuple[str, ...] = ("dataset-stats",),
    expires_in: dt.timedelta = dt.timedelta(days=90),
    datasets: dict[str, list[str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    datasets = datasets or {}
    return {
        "agreement_id": agreement_id,
        "title": "Coffee members x app-interest partner",
        "parties": [
            {
                "name": p,
                "role": "label_holder" if i == 0 else "feature_holder",
                "datasets": datasets.get(p, []),
                "impact_assessment": f"PIA-{p}-2026-01",
            }
            for i, p in enumerate(parties)
        ],
        "purposes": ["audience", "modeling.lead_scoring"],
        "allowed_jobs": [{"type": j, "purpose": "audience.overlap", "outputs": ["counts"]} for j in jobs],
        "k_min": 50,
        "expires_at": (dt.datetime.now(dt.timezone.utc) + expires_in).isoformat(),
        **extra,
    }


def job_request(pki_dir: Path, party: str, type_: str, agreement_id: str = "coffee-2026", version: int = 1,
                params: dict[str, Any] | None = None, **mandate_kw: Any) -> dict[str, Any]:
    """A `POST /v1/jobs` body carrying `party`'s signed mandate for it (what a node sends)."""
    from confide import mandate

    ident = pki.load_identity(pki_dir / party)
    m = mandate.issue(ident.signing_key, requester=party, agreement_id=agreement_id, version=version,
                      type_=type_, params=params or {}, **mandate_kw)
    return {"type": type_, "agreement_id": agreement_id, "version": version, "params": params or {}, "mandate": m}
