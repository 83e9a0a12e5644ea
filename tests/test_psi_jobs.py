"""PSI `overlap` and `match` jobs across real node and coordinator processes, checked against a
plaintext oracle: consent-gated inputs, what each party and the coordinator can see."""

from __future__ import annotations

import datetime as dt
import json
import random
from typing import Iterator

import pytest
from sqlalchemy import create_engine, text

from confide.localnet import LocalNet
from tests.helpers import spec
from tests.test_integration import confide, wait_job

pytestmark = pytest.mark.slow
NOW = dt.datetime.now(dt.timezone.utc)
TIER = lambda i: "gold" if i % 9 == 0 else "silver"  # noqa: E731
SPEND = lambda i: (i * 37) % 1000  # noqa: E731


def _fmt(phone: str, i: int) -> str:
    return [phone, f"+86 {phone[:3]} {phone[3:7]} {phone[7:]}", f"0086-{phone}", f"{phone[:3]}-{phone[3:7]}-{phone[7:]}"][i % 4]


def _world() -> dict:
    rnd = random.Random(7)
    phones = [f"13{rnd.randrange(10**9):09d}" for _ in range(400)]
    brand = {f"m{i}": phones[i] for i in range(150)}                 # phones 0..149
    partner = {f"p{i}": phones[70 + i] for i in range(300)}          # phones 70..369: 80 shared
    brand_ok = {s for i, s in enumerate(brand) if i % 10 != 3}       # 10% refuse
    partner_ok = {s for i, s in enumerate(partner) if i % 7 != 5}
    return {"brand": brand, "partner": partner, "ok": {"brand": brand_ok, "partner": partner_ok}}


def _consent(net: LocalNet, party: str, subjects: dict[str, str], ok: set[str]) -> None:
    # Matching with the other party provides it personal information (PIPL Art. 23): the notice
    # names that party and each grant names it (a separate consent).
    peer = "partner" if party == "brand" else "brand"
    with net.client(party) as c:
        c.post("/v1/consent/notices", {"notice": "privacy", "version": "privacy.v1",
                                       "published_at": (NOW - dt.timedelta(days=10)).isoformat(),
                                       "purposes": [{"purpose": "audience", "recipients": [peer],
                                                     "data_categories": ["phone"]}]})
        events = [{"event_id": f"{party}-{s}", "subject": s, "purpose": "audience", "recipient": peer,
                   "action": "granted" if s in ok else "refused", "channel": "app", "notice_version": "privacy.v1",
                   "valid_from": (NOW - dt.timedelta(days=1)).isoformat()} for s in subjects]
        assert c.post("/v1/consent/events/batch", {"events": events})["recorded"] == len(events)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNet, dict]]:
    w = _world()
    work = tmp_path_factory.mktemp("psi")
    with LocalNet(work, [("brand", "brand"), ("partner", "partner")],
                  coordinator_settings={"poll_interval_s": 0.1}) as net:
        net.start_all()
        for party, key, name in (("brand", "member_id", "members"), ("partner", "partner_id", "people")):
            rows = "".join(f"{s},{_fmt(ph, i)},{TIER(i)},{SPEND(i)}\n" for i, (s, ph) in enumerate(w[party].items()))
            (work / f"{name}.csv").write_text(f"{key},phone,tier,spend\n{rows}")
            (work / f"{name}.yaml").write_text(f"dataset: {name}\nkey: {key}\nidentifiers:\n"
                                               "  - {column: phone, type: phone}\nfeatures:\n"
                                               "  - {column: tier, type: category}\n"
                                               "  - {column: spend, type: int}\n")
            confide("node", "register", "--config", str(net.config(party)))
            confide("node", "ingest", str(work / f"{name}.csv"), "--schema", str(work / f"{name}.yaml"),
                    "--config", str(net.config(party)))
            _consent(net, party, w[party], w["ok"][party])
        agreement = spec("psi-2026", jobs=("overlap", "match", "profile"),
                         datasets={"brand": ["members"], "partner": ["people"]})
        agreement["parties"][0]["identifiers"] = [{"dataset": "members", "column": "phone", "type": "phone"}]
        agreement["parties"][1]["identifiers"] = [{"dataset": "people", "column": "phone", "type": "phone"}]
        agreement["parties"][1]["columns"] = {"people": ["tier", "spend"]}
        agreement["allowed_jobs"] = [{"type": "overlap", "purpose": "audience.overlap"},
                                     {"type": "match", "purpose": "audience.match"},
                                     {"type": "profile", "purpose": "audience.overlap"}]
        with net.client("brand") as c:
            d = c.post("/v1/admin/agreements", agreement)
            c.post("/v1/admin/agreements/psi-2026/versions/1/sign", {"digest": d["digest"]})
        with net.client("partner") as c:
            assert c.post("/v1/admin/agreements/psi-2026/versions/1/sign", {})["status"] == "active"
        yield net, w


def _oracle(w: dict) -> set[tuple[str, str]]:
    inv = {ph: s for s, ph in w["partner"].items() if s in w["ok"]["partner"]}
    return {(s, inv[ph]) for s, ph in w["brand"].items() if s in w["ok"]["brand"] and ph in inv}


def _run(net: LocalNet, job_type: str, **params: object) -> dict:
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": job_type, "agreement_id": "psi-2026",
                                        "params": {"id_types": ["phone"], **params}})
    job = wait_job(net, "brand", job["id"], timeout=120)
    assert job["status"] == "succeeded", job
    return job


def _private(net: LocalNet, party: str, job_id: str) -> dict:
    with net.client(party) as c:
        return next(iter(c.get(f"/v1/admin/jobs/{job_id}/private").values()))


def test_overlap_equals_plaintext_oracle_and_only_the_brand_learns_it(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    oracle = _oracle(w)
    assert len(oracle) >= 50  # above k_min, so not suppressed
    job = _run(net, "overlap")
    brand = _private(net, "brand", job["id"])
    partner = _private(net, "partner", job["id"])
    assert brand["overlap"]["intersection_size"] == len(oracle)
    assert brand["gate"]["consented_rows"] == len(w["ok"]["brand"])
    assert "overlap" not in partner  # the agreement does not tell the partner
    # The coordinator holds set sizes only: no overlap size, no identifiers.
    text_ = json.dumps(job)
    assert str(len(oracle)) not in json.dumps(job["result"])
    assert job["result"]["set_sizes"] == {"brand": len(w["ok"]["brand"]), "partner": len(w["ok"]["partner"])}
    assert not any(ph in text_ for ph in w["brand"].values())


def test_match_join_keys_pair_exactly_the_oracle_pairs(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    job = _run(net, "match")

    def keys(party: str) -> dict[str, str]:
        eng = create_engine(f"sqlite:///{net.workdir / party / 'node.db'}")
        with eng.connect() as conn:
            rows = conn.execute(text("select row_key, join_key from psi_matches where job_id = :j"), {"j": job["id"]})
            out = dict(rows.fetchall())
        eng.dispose()
        return out

    brand, partner = keys("brand"), keys("partner")
    by_key = {k: r for r, k in partner.items()}
    pairs = {(r, by_key[k]) for r, k in brand.items()}
    assert pairs == _oracle(w)
    assert len(set(brand.values())) == len(brand)  # one opaque key per pair
    assert _private(net, "brand", job["id"])["matched_rows"] == len(pairs)
    # A second match job gives unrelated join keys (fresh per job).
    again = _run(net, "match")
    assert again["id"] != job["id"]
    eng = create_engine(f"sqlite:///{net.workdir / 'brand' / 'node.db'}")
    with eng.connect() as conn:
        second = set(r[0] for r in conn.execute(text("select join_key from psi_matches where job_id = :j"),
                                                {"j": again["id"]}))
    eng.dispose()
    assert second and not (second & set(brand.values()))


def test_profile_equals_plaintext_aggregates_with_suppression(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    job = _run(net, "profile", categorical=["tier"], numeric=["spend"])
    prof = _private(net, "brand", job["id"])["profile"]
    index = {s: i for i, s in enumerate(w["partner"])}
    rows = [index[p] for _, p in _oracle(w)]
    gold = sum(TIER(i) == "gold" for i in rows)
    cells = {(c["column"], c["kind"], c["value"]): c for c in prof["cells"]}
    assert prof["intersection_size"] == len(rows)
    assert cells[("tier", "count", "silver")]["result"] == len(rows) - gold
    assert gold < 50 and cells[("tier", "count", "gold")]["suppressed"] is True  # below k_min
    assert cells[("tier", "count", "gold")]["result"] is None
    assert cells[("spend", "sum", "")]["result"] == pytest.approx(sum(SPEND(i) for i in rows))
    partner = _private(net, "partner", job["id"])
    assert "profile" not in partner and partner["overlap"]["intersection_size"] == len(rows)
    assert "cells" not in json.dumps(job["result"])


def test_profile_with_agreed_vocabulary_hides_other_values(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    job = _run(net, "profile", categorical=["tier"], numeric=["spend"], categories={"tier": ["silver"]})
    prof = _private(net, "brand", job["id"])["profile"]
    labels = {c["value"] for c in prof["cells"] if c["column"] == "tier"}
    assert "gold" not in labels and "silver" in labels  # 'gold' is folded into the 'other' cell


def test_profile_refuses_columns_outside_the_agreement(world) -> None:  # type: ignore[no-untyped-def]
    from confide.errors import ValidationError

    net, _ = world
    with net.client("brand") as c, pytest.raises(ValidationError, match="not among the partner's agreed columns"):
        c.post("/v1/admin/jobs", {"type": "profile", "agreement_id": "psi-2026",
                                  "params": {"id_types": ["phone"], "numeric": ["partner_id"]}})


def test_withdrawal_excludes_the_subject_from_later_jobs(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    pair = sorted(_oracle(w))[0]
    with net.client("brand") as c:
        c.post("/v1/consent/events", {"event_id": "withdraw-1", "subject": pair[0], "purpose": "audience",
                                      "action": "withdrawn", "channel": "app"})
    job = _run(net, "overlap")
    assert _private(net, "brand", job["id"])["overlap"]["intersection_size"] == len(_oracle(w)) - 1


def test_per_recipient_withdrawal_reaches_the_recipient_node(world) -> None:  # type: ignore[no-untyped-def]
    """PIPL Art. 23: a brand member withdraws the separate consent to share with the partner; the
    brand purges its match record and the partner, told through the coordinator by join key only,
    excludes its matching record from every later job with the brand."""
    net, w = world
    match = _run(net, "match")
    before = _private(net, "brand", _run(net, "overlap")["id"])["overlap"]["intersection_size"]
    brand_subject, partner_subject = sorted(_oracle(w))[1]
    eng = create_engine(f"sqlite:///{net.workdir / 'brand' / 'node.db'}")
    with eng.connect() as conn:
        has = conn.execute(text("select count(*) from psi_matches where row_key = :r and job_id = :j"),
                           {"r": brand_subject, "j": match["id"]}).scalar()
    assert has == 1
    with net.client("brand") as c:
        res = c.post("/v1/consent/events", {"event_id": "w-share-1", "subject": brand_subject,
                                            "purpose": "sharing.third_party", "recipient": "partner",
                                            "action": "withdrawn", "channel": "app"})
    assert res["hook_errors"] == []
    with eng.connect() as conn:
        left = conn.execute(text("select count(*) from psi_matches where row_key = :r"), {"r": brand_subject}).scalar()
    eng.dispose()
    assert left == 0  # purged at the brand
    after = _run(net, "overlap")
    partner = _private(net, "partner", after["id"])
    assert partner["gate"]["denied"].get("withdrawn", 0) >= 1
    assert _private(net, "brand", after["id"])["overlap"]["intersection_size"] == before - 1
    assert partner_subject  # the partner never learned the brand's subject id, only its own row


def test_jobs_appear_in_the_record_of_processing_activities(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    job = _run(net, "overlap")
    with net.client("brand") as c:
        report = c.get("/v1/consent/reports/processing")
    text_ = json.dumps(report)
    assert job["id"] in text_ and "audience.overlap" in text_
    assert not any(ph in text_ for ph in w["brand"].values())
