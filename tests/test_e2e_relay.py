"""End-to-end encrypted relay: the coordinator stores opaque bytes; parties detect any tampering."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from confide import e2e, pki
from confide.errors import Conflict, NotFound, PermissionDenied, ProtocolError
from confide.settings import CoordinatorSettings
from coordinator.app import create_app
from tests.helpers import inprocess_client, job_request
from tests.test_coordinator import active_agreement


def _ids(pki_dir: Path) -> dict[str, pki.Identity]:
    return {n: pki.load_identity(pki_dir / n) for n in ("brand", "partner", "partner2")}


def _seal(ids, payload: bytes = b"blinded points", seq: int = 0, to: str = "partner") -> bytes:  # type: ignore[no-untyped-def]
    return e2e.seal(payload, sender="brand", sender_key=ids["brand"].signing_key, recipient=to,
                    recipient_box=ids[to].box_key.public_key(), job_id="job-1", channel="psi", seq=seq)


def _open(ids, env: bytes, seq: int = 0, job: str = "job-1", me: str = "partner") -> bytes:  # type: ignore[no-untyped-def]
    return e2e.open_sealed(env, sender="brand", sender_identity=ids["brand"].public_key, recipient=me,
                           recipient_box=ids[me].box_key, job_id=job, channel="psi", seq=seq)


def test_round_trip_and_ciphertext_hides_payload(pki_dir: Path) -> None:
    ids = _ids(pki_dir)
    secret = b"13800138000" * 20
    env = _seal(ids, secret)
    assert b"13800138000" not in env
    assert _open(ids, env) == secret


def test_tampering_misrouting_and_reordering_are_detected(pki_dir: Path) -> None:
    ids = _ids(pki_dir)
    env = _seal(ids)
    flipped = env[:-1] + bytes([env[-1] ^ 1])
    with pytest.raises(ProtocolError):
        _open(ids, flipped)
    with pytest.raises(ProtocolError):
        _open(ids, env, seq=1)  # replayed at another position
    with pytest.raises(ProtocolError):
        _open(ids, env, job="job-2")  # replayed into another job
    env2 = _seal(ids, to="partner2")
    with pytest.raises(ProtocolError):
        _open(ids, env2, me="partner")  # not addressed to us
    with pytest.raises(ProtocolError, match="truncated"):
        _open(ids, env[:20])


def test_coordinator_relay_rules(pki_dir: Path, tmp_path: Path) -> None:
    settings = CoordinatorSettings(pki_dir=pki_dir / "coordinator", data_dir=tmp_path, tls=False)
    app = create_app(settings, run_orchestrator=False)
    with TestClient(app) as tc:
        coord = (app, tc)
        active_agreement(coord, pki_dir)
        brand = inprocess_client(app, tc, pki_dir, "brand", "coordinator")
        partner = inprocess_client(app, tc, pki_dir, "partner", "coordinator")
        job = brand.post("/v1/jobs", job_request(pki_dir, "brand", "dataset-stats"))
        env = _seal(_ids(pki_dir))
        path = f"/v1/relay/{job['id']}/psi/partner/0"
        assert brand.request("PUT", path, content=env, content_type="application/octet-stream") == {"bytes": len(env)}
        with pytest.raises(Conflict, match="already sent"):
            brand.request("PUT", path, content=env, content_type="application/octet-stream")
        got = partner.request("GET", f"/v1/relay/{job['id']}/psi/brand/0", raw=True)
        assert got == env and _open(_ids(pki_dir), got) == b"blinded points"
        with pytest.raises(NotFound):
            partner.request("GET", f"/v1/relay/{job['id']}/psi/brand/1", raw=True)
        with pytest.raises(PermissionDenied, match="not another party"):
            brand.request("PUT", f"/v1/relay/{job['id']}/psi/partner2/0", content=env,
                          content_type="application/octet-stream")
        brand.post(f"/v1/jobs/{job['id']}/cancel")
        with pytest.raises(NotFound):  # purged when the job ended
            partner.request("GET", f"/v1/relay/{job['id']}/psi/brand/0", raw=True)
        with pytest.raises(Conflict, match="is cancelled"):
            brand.request("PUT", f"/v1/relay/{job['id']}/psi/partner/1", content=env,
                          content_type="application/octet-stream")
