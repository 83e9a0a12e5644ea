"""The three services as real processes with mutual TLS: registration -> agreement signing ->
dataset-stats job, and the node's own refusal of anything outside a signed agreement."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
import sys
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from confide import agreements as ag
from confide import pki
from confide.errors import AgreementError, AuthenticationError, PermissionDenied, ValidationError
from confide.localnet import LocalNet
from tests.helpers import spec

pytestmark = pytest.mark.slow

MEMBERS = """member_id,phone,email,recency_days,tier,high_value
m1,13800138000,a@x.cn,3,gold,1
m2,+86 139 0000 0001,b@x.cn,10,silver,0
m3,0086-13700000002,,40,silver,0
"""
MEMBERS_SCHEMA = """dataset: members
key: member_id
identifiers:
  - {column: phone, type: phone}
  - {column: email, type: email}
features:
  - {column: recency_days, type: int}
  - {column: tier, type: category}
labels:
  - {column: high_value, type: binary}
"""
PEOPLE = "partner_id,phone,income_level,intent\n" + "".join(
    f"p{i},1380013{i:04d},{i % 5},{(i * 37) % 100 / 100}\n" for i in range(25)
)
PEOPLE_SCHEMA = """dataset: people
key: partner_id
identifiers:
  - {column: phone, type: phone}
features:
  - {column: income_level, type: category}
  - {column: intent, type: float}
"""


def setup_walk(net: LocalNet, work: Path) -> None:
    """Register both nodes, ingest their small datasets, and make `coffee-2026` active."""
    for party, data, schema, name in (("brand", MEMBERS, MEMBERS_SCHEMA, "members"),
                                      ("partner", PEOPLE, PEOPLE_SCHEMA, "people")):
        (work / f"{name}.csv").write_text(data)
        (work / f"{name}.schema.yaml").write_text(schema)
        confide("node", "register", "--config", str(net.config(party)))
        confide("node", "ingest", str(work / f"{name}.csv"), "--schema", str(work / f"{name}.schema.yaml"),
                "--config", str(net.config(party)))
    with net.client("brand") as c:
        doc = c.post("/v1/admin/agreements", spec(datasets={"brand": ["members"], "partner": ["people"]}))
        c.post("/v1/admin/agreements/coffee-2026/versions/1/sign", {"digest": doc["digest"]})
    with net.client("partner") as c:
        assert c.post("/v1/admin/agreements/coffee-2026/versions/1/sign", {})["status"] == "active"


def confide(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "confide", *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"confide {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_job(net: LocalNet, party: str, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    with net.client(party) as c:
        while True:
            job = c.get(f"/v1/admin/jobs/{job_id}")
            if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
                return job
            time.sleep(0.2)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNet]:
    work = tmp_path_factory.mktemp("net")
    with LocalNet(work, [("brand", "brand"), ("partner", "partner")],
                  coordinator_settings={"poll_interval_s": 0.1}) as n:
        n.start_all()
        yield n


@pytest.fixture(scope="module")
def active(net: LocalNet) -> dict:
    """Registration, data ingest, and an agreement proposed and signed at each node (via the CLI)."""
    w = net.workdir
    (w / "members.csv").write_text(MEMBERS)
    (w / "members.schema.yaml").write_text(MEMBERS_SCHEMA)
    (w / "people.csv").write_text(PEOPLE)
    (w / "people.schema.yaml").write_text(PEOPLE_SCHEMA)
    for party in ("brand", "partner"):
        out = confide("node", "register", "--config", str(net.config(party)), "--json")
        assert json.loads(out.stdout)["name"] == party
    confide("node", "ingest", str(w / "members.csv"), "--schema", str(w / "members.schema.yaml"),
            "--config", str(net.config("brand")))
    confide("node", "ingest", str(w / "people.csv"), "--schema", str(w / "people.schema.yaml"),
            "--config", str(net.config("partner")))
    agreement = spec("coffee-2026", datasets={"brand": ["members"], "partner": ["people"]})
    (w / "agreement.yaml").write_text(json.dumps(agreement))
    proposed = json.loads(confide("node", "agreement", "propose", str(w / "agreement.yaml"),
                                  "--config", str(net.config("brand")), "--json").stdout)
    assert proposed["status"] == "proposed"
    confide("node", "agreement", "sign", "coffee-2026", "--version", "1", "--digest", proposed["digest"],
            "--config", str(net.config("brand")))
    listed = json.loads(confide("node", "agreement", "list", "--config", str(net.config("partner")), "--json").stdout)
    assert listed[0]["digest"] == proposed["digest"] and listed[0]["signed_by_me"] is False
    signed = json.loads(confide("node", "agreement", "sign", "coffee-2026", "--version", "1",
                                "--config", str(net.config("partner")), "--json").stdout)
    assert signed["status"] == "active"
    return signed


def test_dataset_stats_job_end_to_end(net: LocalNet, active: dict) -> None:
    out = confide("node", "job", "create", "--type", "dataset-stats", "--agreement", "coffee-2026", "--wait",
                  "--json", "--config", str(net.config("brand")))
    job = json.loads(out.stdout)
    assert job["status"] == "succeeded", job
    assert [s["status"] for s in job["steps"]] == ["succeeded", "succeeded"]
    brand = job["result"]["parties"]["brand"]["datasets"][0]
    partner = job["result"]["parties"]["partner"]["datasets"][0]
    assert (brand["dataset"], brand["rows"]) == ("members", 3)
    assert (partner["dataset"], partner["rows"]) == ("people", 25)
    assert {c["column"]: c["role"] for c in brand["columns"]} == {
        "member_id": "key", "phone": "identifier", "email": "identifier", "recency_days": "feature",
        "tier": "feature", "high_value": "label"}
    # Row counts and schema only: no value of either dataset appears anywhere in the result.
    text = json.dumps(job["result"])
    for value in ("13800138000", "a@x.cn", "m1", "p3", "gold", "13800130003"):
        assert value not in text
    # The partner sees the same job (it is a party) through its own node.
    with net.client("partner") as c:
        assert c.get(f"/v1/admin/jobs/{job['id']}")["status"] == "succeeded"


def test_client_without_our_ca_certificate_cannot_connect(net: LocalNet, tmp_path: Path) -> None:
    pki.init(tmp_path / "rogue", [("brand", "brand")])
    rogue = tmp_path / "rogue" / "brand"
    ctx = ssl.create_default_context(cafile=str(net.pki_dir / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(rogue / "cert.pem"), str(rogue / "tls.key"))
    for name in ("coordinator", "brand"):
        with pytest.raises(httpx.HTTPError):
            httpx.get(net.services[name].url + "/health", verify=ctx, timeout=5)
        no_cert = ssl.create_default_context(cafile=str(net.pki_dir / "ca" / "ca.pem"))
        with pytest.raises(httpx.HTTPError):
            httpx.get(net.services[name].url + "/health", verify=no_cert, timeout=5)


def test_operator_routes_need_the_nodes_own_identity(net: LocalNet, active: dict) -> None:
    with net.client("brand", as_party="partner") as c:  # partner's valid cert and key, brand's node
        with pytest.raises(Exception) as err:
            c.get("/v1/admin/datasets")
    assert getattr(err.value, "status_code", None) in (401, 403)


def _mandate(pki_dir: Path, doc: dict, job_id: str, signer: str = "brand", **kw: Any) -> dict:
    from confide import mandate

    return mandate.issue(pki.load_identity(pki_dir / signer).signing_key, requester="brand",
                         agreement_id=doc["agreement_id"], version=doc["version"], type_="dataset-stats",
                         job_id=job_id, **kw)


def _step(net: LocalNet, doc: dict, job_id: str = "00000000-0000-0000-0000-000000000001") -> dict:
    """A step as the coordinator dispatches it, with the brand's genuine mandate."""
    return {"job_id": job_id, "step": "stats@brand", "job_type": "dataset-stats", "requester": "brand",
            "attempt": 1, "params": {}, "agreement": doc, "mandate": _mandate(net.pki_dir, doc, job_id)}


def test_node_refuses_steps_outside_a_signed_agreement(net: LocalNet, active: dict) -> None:
    """Even the real coordinator's identity cannot make a node run a step the agreement does not cover."""
    with net.client("brand", as_party="coordinator") as c:
        # unsigned by the partner
        unsigned = dict(active, signatures={"brand": active["signatures"]["brand"]})
        with pytest.raises(AgreementError, match="not signed by 'partner'"):
            c.post("/v1/steps", _step(net, unsigned))
        # tampered content (k_min lowered after signing)
        tampered = json.loads(json.dumps(active))
        tampered["spec"]["k_min"] = 1
        with pytest.raises(AgreementError, match="never signed|tampered"):
            c.post("/v1/steps", _step(net, tampered))
        # a job type the agreement does not allow
        with pytest.raises(AgreementError, match="does not allow 'match'"):
            c.post("/v1/steps", dict(_step(net, active), job_type="match"))
        # a requester that is not a party
        with pytest.raises(AgreementError, match="not a party"):
            c.post("/v1/steps", dict(_step(net, active), requester="mallory"))
    # and a party's identity cannot call coordinator-only routes
    with net.client("brand", as_party="partner") as c:
        with pytest.raises(Exception) as err:
            c.post("/v1/steps", _step(net, active))
        assert getattr(err.value, "status_code", None) == 403


def test_node_runs_only_what_the_requester_mandated(net: LocalNet, active: dict) -> None:
    """The coordinator's identity is not enough: a node runs a step only with the requester's own
    signature on that job id, agreement version, type and parameters, issued recently."""
    job = "00000000-0000-4000-8000-00000000b001"
    step = _step(net, active, job_id=job)
    with net.client("brand", as_party="coordinator") as c:
        with pytest.raises(ValidationError, match="signed mandate"):
            c.post("/v1/steps", {k: v for k, v in step.items() if k != "mandate"})
        with pytest.raises(PermissionDenied, match="not signed by 'brand'"):
            c.post("/v1/steps", dict(step, mandate=_mandate(net.pki_dir, active, job, signer="partner")))
        with pytest.raises(PermissionDenied, match="mandate is for job"):
            c.post("/v1/steps", dict(step, job_id="00000000-0000-4000-8000-00000000b002"))
        with pytest.raises(PermissionDenied, match="parameters differ"):
            c.post("/v1/steps", dict(step, params={"rows": True}))
        with pytest.raises(PermissionDenied, match="issued .* s ago"):
            old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
            c.post("/v1/steps", dict(step, mandate=_mandate(net.pki_dir, active, job, at=old)))
        assert c.post("/v1/steps", step)["status"] in ("running", "succeeded")
    log = net.tail("brand", 400)
    assert "parameters differ from the requester's mandate" in log


def test_node_refuses_expired_agreement(net: LocalNet, active: dict) -> None:
    short = spec("short-lived", datasets={"brand": ["members"], "partner": ["people"]},
                 expires_in=dt.timedelta(seconds=4))
    with net.client("brand") as c:
        doc = c.post("/v1/admin/agreements", short)
        c.post("/v1/admin/agreements/short-lived/versions/1/sign", {"digest": doc["digest"]})
    with net.client("partner") as c:
        doc = c.post("/v1/admin/agreements/short-lived/versions/1/sign", {"digest": doc["digest"]})
    assert doc["status"] == "active"
    time.sleep(max(0.0, ag.SignedAgreement.model_validate(doc).spec.expires_at.timestamp() - time.time()) + 0.5)
    with net.client("brand", as_party="coordinator") as c:
        with pytest.raises(AgreementError, match="expired"):
            c.post("/v1/steps", _step(net, doc))
    with net.client("brand") as c:
        with pytest.raises(AgreementError, match="expired"):
            c.post("/v1/admin/jobs", {"type": "dataset-stats", "agreement_id": "short-lived"})


def test_replayed_request_over_mtls_is_refused(net: LocalNet, active: dict) -> None:
    from confide.auth import sign_request
    from confide.transport import client_ssl_context

    ident = pki.load_identity(net.pki_dir / "brand")
    headers = sign_request(ident.signing_key, "brand", "coordinator", "GET", "/v1/agreements", b"")
    with httpx.Client(base_url=net.services["coordinator"].url, verify=client_ssl_context(ident)) as h:
        assert h.get("/v1/agreements", headers=headers).status_code == 200
        r = h.get("/v1/agreements", headers=headers)
        assert r.status_code == 401 and "replayed" in r.json()["message"]
    assert "replayed request" in net.tail("coordinator", 200)


def test_client_checks_the_server_is_the_peer_it_meant(net: LocalNet) -> None:
    from confide.transport import ServiceClient

    ident = pki.load_identity(net.pki_dir / "partner")
    # The brand node's certificate is valid for 127.0.0.1 too, but it is not the coordinator.
    with ServiceClient(ident, "coordinator", net.services["brand"].url) as c:
        with pytest.raises(AuthenticationError, match=r"certificate for \['brand'\], expected 'coordinator'"):
            c.get("/health")


def test_a_request_must_be_signed_by_the_party_whose_certificate_opened_the_connection(net: LocalNet, active: dict) -> None:
    """Binding of TLS identity and signer: the partner's TLS certificate and key together with
    the brand's identity key (a stolen signing key) is refused at the coordinator and at a node;
    each party's own pair is accepted over the same kind of connection."""
    import dataclasses

    from confide.transport import ServiceClient

    partner = pki.load_identity(net.pki_dir / "partner")
    brand = pki.load_identity(net.pki_dir / "brand")
    # TLS as the partner (its directory holds cert.pem and tls.key), signatures as the brand.
    thief = dataclasses.replace(partner, name="brand", signing_key=brand.signing_key)
    with ServiceClient(thief, "coordinator", net.services["coordinator"].url) as c:
        with pytest.raises(AuthenticationError, match="signed as 'brand' over a TLS connection authenticated as 'partner'"):
            c.get("/v1/agreements")
    with ServiceClient(thief, "brand", net.services["brand"].url) as c:  # the node's operator API
        with pytest.raises(AuthenticationError, match="authenticated as 'partner'"):
            c.get("/v1/admin/steps")
    with ServiceClient(brand, "coordinator", net.services["coordinator"].url) as c:
        assert isinstance(c.get("/v1/agreements"), list)
    with ServiceClient(partner, "coordinator", net.services["coordinator"].url) as c:
        assert isinstance(c.get("/v1/agreements"), list)


def test_signing_checks_reviewed_digest_and_held_datasets(net: LocalNet, active: dict) -> None:
    from confide.errors import ValidationError

    with net.client("brand") as c:
        doc = c.post("/v1/admin/agreements", spec("needs-review", datasets={"brand": ["members"], "partner": ["people"]}))
        with pytest.raises(AgreementError, match="not the reviewed"):
            c.post("/v1/admin/agreements/needs-review/versions/1/sign", {"digest": "f" * 64})
        ghost = spec("ghost-data", datasets={"brand": ["no_such_dataset"], "partner": ["people"]})
        g = c.post("/v1/admin/agreements", ghost)
        with pytest.raises(ValidationError, match="does not hold"):
            c.post("/v1/admin/agreements/ghost-data/versions/1/sign", {"digest": g["digest"]})
        cols = spec("ghost-cols", datasets={"brand": ["members"], "partner": ["people"]})
        cols["parties"][0]["columns"] = {"members": ["recency_days", "salary"]}
        g = c.post("/v1/admin/agreements", cols)
        with pytest.raises(ValidationError, match=r"columns \['salary'\]"):
            c.post("/v1/admin/agreements/ghost-cols/versions/1/sign", {"digest": g["digest"]})
        listed = {(d["agreement_id"], d["signed_by_me"]) for d in c.get("/v1/admin/agreements")}
    assert ("needs-review", False) in listed and ("ghost-data", False) in listed


def test_node_refuses_superseded_version(net: LocalNet, active: dict) -> None:
    """Once a node has seen v2 active, a step under v1 is refused even if the coordinator asks."""
    v2spec = spec("supersede-me", datasets={"brand": ["members"], "partner": ["people"]})
    docs = {}
    for k_min in (50, 60):
        with net.client("brand") as c:
            d = c.post("/v1/admin/agreements", dict(v2spec, k_min=k_min))
            c.post(f"/v1/admin/agreements/supersede-me/versions/{d['version']}/sign", {"digest": d["digest"]})
        with net.client("partner") as c:
            docs[d["version"]] = c.post(f"/v1/admin/agreements/supersede-me/versions/{d['version']}/sign", {})
    assert docs[1]["status"] == "active" and docs[2]["status"] == "active"
    with net.client("brand", as_party="coordinator") as c:
        ok = c.post("/v1/steps", _step(net, docs[2], job_id="00000000-0000-0000-0000-0000000000a2"))
        assert ok["status"] in ("running", "succeeded")
        with pytest.raises(AgreementError, match="superseded by v2"):
            c.post("/v1/steps", _step(net, docs[1], job_id="00000000-0000-0000-0000-0000000000a1"))


def test_audit_heads_reach_coordinator_and_peers_and_expose_tampering(net: LocalNet, active: dict) -> None:
    """Nodes publish signed tree heads after job steps; the coordinator keeps them and passes them
    to the other party, so the brand cannot later rewrite its log without the partner noticing."""
    from sqlalchemy import create_engine, text

    with net.client("brand") as c:
        published = c.post("/v1/admin/audit/publish")
    assert published["forwarded_to"] == ["partner"]
    brand_db = f"sqlite:///{net.workdir / 'brand' / 'node.db'}"
    partner_db = f"sqlite:///{net.workdir / 'partner' / 'node.db'}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        eng = create_engine(partner_db)
        with eng.connect() as conn:
            kept = conn.execute(text("select max(size) from audit_peer_heads where log = 'brand'")).scalar()
        eng.dispose()
        if kept:
            break
        time.sleep(0.2)
    assert kept and kept > 0
    cert = str(net.pki_dir / "brand" / "cert.pem")
    ok = confide("audit", "verify", "--database-url", brand_db, "--peer-database-url", partner_db, "--cert", cert,
                 check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    eng = create_engine(brand_db)
    with eng.begin() as conn:  # the brand quietly edits an early entry of its own log
        conn.execute(text("update audit_leaves set payload_json = :p where seq = 1"), {"p": '{"edited":1}'})
    eng.dispose()
    bad = confide("audit", "verify", "--database-url", brand_db, "--peer-database-url", partner_db, "--cert", cert,
                  check=False)
    assert bad.returncode == 1
    assert "seq 1" in (bad.stdout + bad.stderr)


def test_a_revoked_party_is_cut_off_at_the_coordinator_and_dropped_by_the_other_nodes(net: LocalNet, active: dict) -> None:
    """Runs last in this module: it leaves the partner revoked. The coordinator's operator
    revokes the partner's certificate (CLI on the running coordinator's database): the partner's
    calls are refused, no job of its agreements starts, and the brand node drops it from its
    peers at its next registry refresh."""
    # The brand node, restarted with a fast registry refresh, learns its peers during a job.
    net.kill("brand", signal.SIGTERM)
    net.start("brand", extra_env={"CONFIDE_NODE_REGISTRY_REFRESH_S": "0.5"})
    out = confide("node", "job", "create", "--type", "dataset-stats", "--agreement", "coffee-2026", "--wait",
                  "--json", "--config", str(net.config("brand")))
    assert json.loads(out.stdout)["status"] == "succeeded"

    bad = confide("coordinator", "revoke", "partner", "--reason", " ", "--config", str(net.config("coordinator")),
                  check=False)
    assert bad.returncode == 2 and "reason" in bad.stderr
    confide("coordinator", "revoke", "partner", "--reason", "identity key leaked (ticket 42)",
            "--config", str(net.config("coordinator")))
    again = confide("coordinator", "revoke", "partner", "--reason", "again", "--config", str(net.config("coordinator")),
                    check=False)
    assert again.returncode != 0 and "already revoked" in again.stderr
    refused = confide("node", "agreement", "list", "--config", str(net.config("partner")), check=False)
    assert refused.returncode != 0 and "revoked" in (refused.stderr + refused.stdout)
    job = confide("node", "job", "create", "--type", "dataset-stats", "--agreement", "coffee-2026",
                  "--config", str(net.config("brand")), check=False)
    assert job.returncode != 0 and "partner is revoked" in (job.stderr + job.stdout)
    log = net.services["brand"].log
    deadline = time.monotonic() + 30
    while "dropped: ['partner']" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.3)
