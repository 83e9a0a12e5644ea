"""Coordinator API in-process (no sockets): registry, agreement versions and signatures, job rules."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from confide import agreements as ag
from confide import pki
from confide.errors import AgreementError, AuthenticationError, Conflict, NotFound, PermissionDenied, ValidationError
from confide.settings import CoordinatorSettings
from coordinator.app import create_app
from tests.helpers import inprocess_client, job_request, spec


@pytest.fixture(params=["sqlite", "postgresql"])
def coord(request: pytest.FixtureRequest, pki_dir: Path, tmp_path: Path) -> Iterator[tuple]:
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_url")
    settings = CoordinatorSettings(pki_dir=pki_dir / "coordinator", data_dir=tmp_path, tls=False, database_url=url)
    app = create_app(settings, run_orchestrator=False)
    with TestClient(app) as tc:
        yield app, tc


def client(coord, pki_dir: Path, who: str):  # type: ignore[no-untyped-def]
    app, tc = coord
    return inprocess_client(app, tc, pki_dir, who, "coordinator")


def register(coord, pki_dir: Path, who: str) -> dict:  # type: ignore[no-untyped-def]
    ident = pki.load_identity(pki_dir / who)
    return client(coord, pki_dir, who).post("/v1/parties", {
        "name": who, "role": ident.role, "endpoint": f"https://{who}.example:8401", "cert_pem": ident.cert_pem.decode()})


def sign(coord, pki_dir: Path, who: str, doc: dict) -> dict:  # type: ignore[no-untyped-def]
    ident = pki.load_identity(pki_dir / who)
    sig = ag.sign(ident.signing_key, doc["agreement_id"], doc["version"], doc["digest"], who)
    return client(coord, pki_dir, who).post(
        f"/v1/agreements/{doc['agreement_id']}/versions/{doc['version']}/signatures",
        {"digest": doc["digest"], "signature": sig})


def active_agreement(coord, pki_dir: Path, **kw) -> dict:  # type: ignore[no-untyped-def]
    for p in ("brand", "partner"):
        register(coord, pki_dir, p)
    doc = client(coord, pki_dir, "brand").post("/v1/agreements", {"spec": spec(**kw)})
    sign(coord, pki_dir, "brand", doc)
    return sign(coord, pki_dir, "partner", doc)


def test_registration_binds_certificate(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    out = register(coord, pki_dir, "brand")
    assert out["role"] == "brand"
    assert out["identity_key"] == pki.load_identity(pki_dir / "brand").public_key.public_bytes_raw().hex()
    listed = client(coord, pki_dir, "brand").get("/v1/parties")
    assert [p["name"] for p in listed] == ["brand"]


def test_registration_with_someone_elses_certificate_is_refused(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    partner = pki.load_identity(pki_dir / "partner")
    with pytest.raises(AuthenticationError, match="must be signed by the party"):
        client(coord, pki_dir, "brand").post("/v1/parties", {
            "name": "partner", "role": "partner", "endpoint": "https://x:1", "cert_pem": partner.cert_pem.decode()})


def test_registration_with_rogue_ca_certificate_is_refused(coord, pki_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pki.init(tmp_path / "rogue", [("brand", "brand")])
    rogue = (tmp_path / "rogue" / "brand" / "cert.pem").read_text()
    with pytest.raises(AuthenticationError, match="not issued by this deployment's CA"):
        client(coord, pki_dir, "brand").post("/v1/parties", {
            "name": "brand", "role": "brand", "endpoint": "https://x:1", "cert_pem": rogue})


def test_unregistered_party_is_unknown(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AuthenticationError, match="unknown party 'partner'"):
        client(coord, pki_dir, "partner").get("/v1/agreements")


def test_agreement_becomes_active_only_when_all_signed(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    for p in ("brand", "partner"):
        register(coord, pki_dir, p)
    doc = client(coord, pki_dir, "brand").post("/v1/agreements", {"spec": spec()})
    assert (doc["version"], doc["status"]) == (1, "proposed")
    after_brand = sign(coord, pki_dir, "brand", doc)
    assert after_brand["status"] == "proposed" and after_brand["coordinator_signature"] is None
    # A job cannot run on an agreement that is not fully signed.
    with pytest.raises(NotFound, match="version 2|v2|not found"):
        client(coord, pki_dir, "brand").post("/v1/jobs", job_request(pki_dir, "brand", "dataset-stats", version=2))
    with pytest.raises(AgreementError, match="is proposed, not active"):
        client(coord, pki_dir, "brand").post("/v1/jobs", job_request(pki_dir, "brand", "dataset-stats"))
    done = sign(coord, pki_dir, "partner", doc)
    assert done["status"] == "active"
    keys = {n: pki.load_identity(pki_dir / n).public_key for n in ("brand", "partner", "coordinator")}
    ag.verify_signed(ag.SignedAgreement.model_validate(done), keys)


def test_signatures_are_checked(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    for p in ("brand", "partner"):
        register(coord, pki_dir, p)
    doc = client(coord, pki_dir, "brand").post("/v1/agreements", {"spec": spec()})
    brand = pki.load_identity(pki_dir / "brand")
    forged = ag.sign(brand.signing_key, doc["agreement_id"], 1, doc["digest"], "partner")
    with pytest.raises(AgreementError, match="bad signature from 'partner'"):
        client(coord, pki_dir, "partner").post("/v1/agreements/coffee-2026/versions/1/signatures",
                                               {"digest": doc["digest"], "signature": forged})
    with pytest.raises(AgreementError, match="not this version's"):
        client(coord, pki_dir, "partner").post("/v1/agreements/coffee-2026/versions/1/signatures",
                                               {"digest": "0" * 64, "signature": forged})
    sign(coord, pki_dir, "brand", doc)
    with pytest.raises(Conflict, match="already signed"):
        sign(coord, pki_dir, "brand", doc)


def test_any_change_is_a_new_version_needing_all_signatures(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    v1 = active_agreement(coord, pki_dir)
    v2 = client(coord, pki_dir, "brand").post("/v1/agreements", {"spec": spec(k_min=100)})
    assert (v2["version"], v2["status"]) == (2, "proposed")
    assert v2["digest"] != v1["digest"]
    # v1 stays in force until v2 is fully signed; then v1 is superseded.
    job = client(coord, pki_dir, "brand").post("/v1/jobs", job_request(pki_dir, "brand", "dataset-stats"))
    assert job["version"] == 1
    sign(coord, pki_dir, "brand", v2)
    sign(coord, pki_dir, "partner", v2)
    v1_now = client(coord, pki_dir, "brand").get("/v1/agreements/coffee-2026/versions/1")
    assert v1_now["status"] == "superseded"
    with pytest.raises(AgreementError, match="superseded, not active"):
        client(coord, pki_dir, "brand").post("/v1/jobs", job_request(pki_dir, "brand", "dataset-stats"))


def test_only_brands_propose_and_only_parties_see(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    for p in ("brand", "partner", "partner2"):
        register(coord, pki_dir, p)
    with pytest.raises(PermissionDenied, match="only a brand"):
        client(coord, pki_dir, "partner").post("/v1/agreements", {"spec": spec()})
    client(coord, pki_dir, "brand").post("/v1/agreements", {"spec": spec()})
    assert client(coord, pki_dir, "partner2").get("/v1/agreements") == []
    with pytest.raises(AgreementError, match="not a party"):
        client(coord, pki_dir, "partner2").get("/v1/agreements/coffee-2026/versions/1")


def test_job_rules(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    active_agreement(coord, pki_dir)
    c = client(coord, pki_dir, "brand")
    with pytest.raises(AgreementError, match="does not allow 'match'"):
        c.post("/v1/jobs", job_request(pki_dir, "brand", "match"))
    with pytest.raises(AgreementError, match="does not allow 'exfiltrate'"):
        c.post("/v1/jobs", job_request(pki_dir, "brand", "exfiltrate"))
    with pytest.raises(ValidationError, match="takes no parameters"):
        c.post("/v1/jobs", job_request(pki_dir, "brand", "dataset-stats", params={"rows": True}))
    job = c.post("/v1/jobs", job_request(pki_dir, "brand", "dataset-stats"))
    assert job["status"] == "pending"
    register(coord, pki_dir, "partner2")
    with pytest.raises(NotFound):
        client(coord, pki_dir, "partner2").get(f"/v1/jobs/{job['id']}")
    cancelled = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled["status"] == "cancelled"
    with pytest.raises(Conflict, match="already cancelled"):
        c.post(f"/v1/jobs/{job['id']}/cancel")


def test_jobs_need_the_requesters_own_mandate(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The coordinator creates a job only from the requester's signature on exactly that job,
    keeps the mandate with the job, and runs one mandate as one job."""
    active_agreement(coord, pki_dir)
    c = client(coord, pki_dir, "brand")
    body = job_request(pki_dir, "brand", "dataset-stats")
    with pytest.raises(ValidationError, match="signed mandate"):
        c.post("/v1/jobs", {k: v for k, v in body.items() if k != "mandate"})
    # signed with the partner's key but claiming the brand asked
    forged = job_request(pki_dir, "partner", "dataset-stats")
    forged["mandate"]["mandate"]["requester"] = "brand"
    with pytest.raises(PermissionDenied, match="not signed by 'brand'"):
        c.post("/v1/jobs", dict(body, mandate=forged["mandate"]))
    # the partner's genuine mandate presented by the brand
    with pytest.raises(PermissionDenied, match="requester 'brand' differs"):
        c.post("/v1/jobs", dict(body, mandate=job_request(pki_dir, "partner", "dataset-stats")["mandate"]))
    # parameters or type other than the signed ones
    with pytest.raises(PermissionDenied, match="params differ"):
        c.post("/v1/jobs", dict(body, params={"rows": True}))
    with pytest.raises(PermissionDenied, match="type 'overlap' differs"):
        c.post("/v1/jobs", dict(body, type="overlap"))
    # a signature over altered content
    altered = job_request(pki_dir, "brand", "dataset-stats")
    altered["mandate"]["mandate"]["params"] = {"rows": True}
    with pytest.raises(PermissionDenied, match="not signed by 'brand'"):
        c.post("/v1/jobs", dict(altered, params={"rows": True}))
    with pytest.raises(ValidationError, match="mandate.mandate.job_id"):
        bad = job_request(pki_dir, "brand", "dataset-stats")
        bad["mandate"]["mandate"]["job_id"] = "job-1"
        c.post("/v1/jobs", bad)
    job = c.post("/v1/jobs", body)
    assert job["id"] == body["mandate"]["mandate"]["job_id"]
    with pytest.raises(Conflict, match="a mandate starts one job"):
        c.post("/v1/jobs", body)
    app, _ = coord
    from confide.db import session_scope
    from coordinator.storage.models import Job

    with session_scope(app.state.coordinator.factory) as s:
        assert s.get(Job, job["id"]).mandate == body["mandate"]


def test_bad_bodies_get_clear_400s(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    register(coord, pki_dir, "brand")
    register(coord, pki_dir, "partner")
    c = client(coord, pki_dir, "brand")
    with pytest.raises(ValidationError, match="invalid agreement: .*k_min"):
        c.post("/v1/agreements", {"spec": spec(k_min=-1)})
    with pytest.raises(ValidationError, match="expires_at is in the past"):
        c.post("/v1/agreements", {"spec": spec(expires_in=-dt.timedelta(days=1))})
    with pytest.raises(ValidationError, match="agreement_id: Field required"):
        c.post("/v1/jobs", {"type": "dataset-stats"})


def test_oversized_body_is_refused(pki_dir: Path, tmp_path: Path) -> None:
    settings = CoordinatorSettings(pki_dir=pki_dir / "coordinator", data_dir=tmp_path, tls=False, max_body_bytes=2048)
    app = create_app(settings, run_orchestrator=False)
    with TestClient(app) as tc:
        r = tc.post("/v1/agreements", content=b"x" * 5000)
        assert r.status_code == 413 and "too large" in r.json()["message"]


def test_keys_are_pinned_at_registration_and_change_only_with_the_operators_approval(  # type: ignore[no-untyped-def]
        coord, pki_dir: Path, tmp_path: Path) -> None:
    import shutil

    from coordinator import service
    from confide.db import session_scope

    first = register(coord, pki_dir, "brand")
    assert register(coord, pki_dir, "brand")["identity_key"] == first["identity_key"]  # same keys: fine
    # A new certificate for "brand" with fresh keys, from the same CA (a rotation — or a CA-key
    # holder minting one): refused until the coordinator's operator approves its fingerprint.
    other = tmp_path / "other"
    shutil.copytree(pki_dir / "ca", other / "ca")
    pki.issue(other, "brand", "brand")
    new = pki.load_identity(other / "brand")
    fp = pki.verify_certificate(new.cert_pem, new.ca_pem).fingerprint
    body = {"name": "brand", "role": "brand", "endpoint": "https://brand.example:8401", "cert_pem": new.cert_pem.decode()}
    app, tc = coord
    new_client = inprocess_client(app, tc, other, "brand", "coordinator")
    with pytest.raises(Conflict, match=f"approval: confide coordinator approve-rekey brand --fingerprint {fp}"):
        new_client.post("/v1/parties", body)
    assert client(coord, pki_dir, "brand").get("/v1/parties")[0]["identity_key"] == first["identity_key"]
    factory = app.state.coordinator.factory
    with session_scope(factory) as s:
        with pytest.raises(ValidationError, match="64 lowercase hex"):
            service.approve_rekey(s, "brand", "abc")
        with pytest.raises(NotFound):
            service.approve_rekey(s, "nobody", fp)
        service.approve_rekey(s, "brand", fp)
    rekeyed = new_client.post("/v1/parties", body)
    assert rekeyed["identity_key"] == new.public_key.public_bytes_raw().hex() != first["identity_key"]
    # The old key no longer authenticates; the approval was for one registration only.
    with pytest.raises(AuthenticationError):
        client(coord, pki_dir, "brand").get("/v1/parties")
    with pytest.raises(Conflict, match="approve-rekey"):
        client(coord, pki_dir, "brand").post("/v1/parties", {**body, "cert_pem": pki.load_identity(pki_dir / "brand").cert_pem.decode()})


def test_approve_rekey_cli(pki_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from sqlalchemy import create_engine, text

    settings = CoordinatorSettings(pki_dir=pki_dir / "coordinator", data_dir=tmp_path, tls=False)
    app = create_app(settings, run_orchestrator=False)
    with TestClient(app) as tc:
        register((app, tc), pki_dir, "partner")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "confide", "coordinator", "approve-rekey", *args,
                               "--data-dir", str(tmp_path), "--pki-dir", str(pki_dir / "coordinator")],
                              capture_output=True, text=True, timeout=120)

    bad = cli("partner", "--fingerprint", "not-hex")
    assert bad.returncode == 2 and "64 lowercase hex" in bad.stderr
    missing = cli("partner9", "--fingerprint", "ab" * 32)
    assert missing.returncode != 0 and "partner9" in missing.stderr
    ok = cli("partner", "--fingerprint", "AB:" * 31 + "AB")
    assert ok.returncode == 0, ok.stderr
    eng = create_engine(f"sqlite:///{tmp_path / 'coordinator.db'}")
    with eng.connect() as conn:
        row = conn.execute(text("select rekey_fingerprint from parties where name = 'partner'")).one()
        kinds = [r[0] for r in conn.execute(text("select kind from events"))]
    eng.dispose()
    assert row[0] == "ab" * 32 and "party.rekey_approved" in kinds


def test_a_revoked_party_is_refused_until_it_registers_operator_approved_new_keys(  # type: ignore[no-untyped-def]
        coord, pki_dir: Path, tmp_path: Path) -> None:
    import shutil

    from coordinator import service
    from confide.db import session_scope

    active_agreement(coord, pki_dir)
    app, tc = coord
    factory = app.state.coordinator.factory
    with session_scope(factory) as s:
        with pytest.raises(ValidationError, match="reason"):
            service.revoke_party(s, "partner", "   ")
        service.revoke_party(s, "partner", "identity key leaked")
    with pytest.raises(AuthenticationError, match="'partner' is revoked: identity key leaked"):
        client(coord, pki_dir, "partner").get("/v1/agreements")
    assert [p["name"] for p in client(coord, pki_dir, "brand").get("/v1/parties")] == ["brand"]
    with pytest.raises(AgreementError, match="partner is revoked"):
        client(coord, pki_dir, "brand").post("/v1/jobs", job_request(pki_dir, "brand", "dataset-stats"))
    with pytest.raises(PermissionDenied, match="revoked"):  # the same certificate cannot come back
        register(coord, pki_dir, "partner")
    with session_scope(factory) as s:
        with pytest.raises(Conflict, match="already revoked"):
            service.revoke_party(s, "partner", "again")
    # New keys, approved by the operator: the party is back, with them.
    other = tmp_path / "other"
    shutil.copytree(pki_dir / "ca", other / "ca")
    pki.issue(other, "partner", "partner")
    new = pki.load_identity(other / "partner")
    with session_scope(factory) as s:
        service.approve_rekey(s, "partner", pki.verify_certificate(new.cert_pem, new.ca_pem).fingerprint)
    inprocess_client(app, tc, other, "partner", "coordinator").post("/v1/parties", {
        "name": "partner", "role": "partner", "endpoint": "https://partner.example:8401",
        "cert_pem": new.cert_pem.decode()})
    assert [p["name"] for p in client(coord, pki_dir, "brand").get("/v1/parties")] == ["brand", "partner"]
    assert isinstance(inprocess_client(app, tc, other, "partner", "coordinator").get("/v1/agreements"), list)
    with pytest.raises(AuthenticationError, match="bad signature"):  # the leaked key is worthless now
        client(coord, pki_dir, "partner").get("/v1/agreements")
