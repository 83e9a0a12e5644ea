"""The consent REST router mounted on a small FastAPI app (in-process, TestClient)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from confide.db import make_engine
from confide.web import install_error_handlers
from consent.api import consent_router
from consent.models import ensure_tables
from consent.store import ConsentStore

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def client(db_url: str) -> Iterator[tuple[TestClient, ConsentStore]]:
    engine = make_engine(db_url)
    ensure_tables(engine)
    store = ConsentStore(engine, secret_key=b"api-secret-0123456789abcdefghijk", recipients={"partner"}, max_batch=5)
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(consent_router(lambda: store), prefix="/consent")
    with TestClient(app) as c:
        yield c, store
    engine.dispose()


NOTICE = {
    "notice": "member", "version": "member/1", "published_at": "2025-12-01T00:00:00Z",
    "purposes": [
        {"purpose": "modeling", "data_categories": ["orders"]},
        {"purpose": "audience", "recipients": ["partner"], "data_categories": ["phone"]},
    ],
}


def _event(event_id: str, subject: str, **kw: Any) -> dict[str, Any]:
    body = {"event_id": event_id, "subject": subject, "purpose": "modeling", "action": "granted",
            "channel": "wechat_miniprogram", "notice_version": "member/1", "received_at": "2026-01-01T08:00:00+08:00"}
    body.update(kw)
    return body


def test_record_query_check_and_reports(client: tuple[TestClient, ConsentStore]) -> None:
    c, _ = client
    assert c.post("/consent/notices", json=NOTICE).status_code == 201
    assert [n["version"] for n in c.get("/consent/notices").json()] == ["member/1"]
    r = c.post("/consent/events", json=_event("e1", "m1", identifier="13800000001"))
    assert r.status_code == 201 and r.json()["recorded"] == 1
    r = c.post("/consent/events", json=_event("e1", "m1", identifier="13800000001"))
    assert r.status_code == 200 and r.json()["duplicates"] == 1
    r = c.post("/consent/events/batch", json={"events": [_event("e2", "m2"), _event("w2", "m2", action="withdrawn",
                                                   notice_version=None, received_at="2026-01-02T00:00:00Z")]})
    assert r.status_code == 201 and r.json()["recorded"] == 2

    state = c.get("/consent/subjects/m2/state").json()
    assert [(e["purpose"], e["action"]) for e in state["entries"]] == [("modeling", "withdrawn")]
    history = c.get("/consent/subjects/m2/history").json()
    assert [h["event_id"] for h in history] == ["e2", "w2"]
    assert history[0]["received_at"].startswith("2026-01-01T00:00:00")  # stored as UTC

    r = c.post("/consent/check", json={"subjects": ["m1", "m2", "m3"], "purpose": "modeling.lookalike",
                                       "at": "2026-01-05T00:00:00Z"})
    body = r.json()
    assert body["allowed"] == ["m1"] and body["denied_counts"] == {"no_consent": 1, "withdrawn": 1}

    cov = c.get("/consent/reports/coverage", params={"at": ["2026-01-01T12:00:00Z", "2026-01-03T00:00:00Z"]}).json()
    assert [(row["at"][:10], row["granted"], row["withdrawn"]) for row in cov] == [
        ("2026-01-01", 2, 0), ("2026-01-03", 1, 1)
    ]
    csv_text = c.get("/consent/reports/coverage", params={"format": "csv"}).text
    assert csv_text.splitlines()[0].startswith("at,purpose,recipient,known_subjects")


def test_preferences_access_erasure(client: tuple[TestClient, ConsentStore]) -> None:
    c, store = client
    c.post("/consent/notices", json=NOTICE)
    c.post("/consent/events", json=_event("e1", "m1", identifier="13800000001"))
    prefs = {"channels": {"sms": True, "wecom": False}, "time_windows": [{"start": "09:00", "end": "21:00"}],
             "frequency_cap": {"max_messages": 2, "per": "week"}, "topics": ["coffee"],
             "no_personalised_marketing": True, "channel": "app"}
    r = c.put("/consent/subjects/m1/preferences", json=prefs)
    assert r.status_code == 200 and r.json()["frequency_cap"] == {"max_messages": 2, "per": "week"}
    assert c.get("/consent/subjects/m1/preferences").json()["no_personalised_marketing"] is True
    store.record_usage("job-1", "modeling", ["m1"], agreement_id="agr-1")

    access = c.get("/consent/subjects/m1/access").json()
    assert access["events"][0]["identifier"] == "13800000001"
    assert access["preferences"]["topics"] == ["coffee"] and len(access["preference_history"]) == 1
    assert access["usage"][0]["agreement_id"] == "agr-1"

    r = c.post("/consent/subjects/m1/erasure", json={"request_ref": "dsr-1"})
    assert r.status_code == 200 and r.json()["request_ref"] == "dsr-1"
    access = c.get("/consent/subjects/m1/access").json()
    assert access["erased"] and access["events"][0]["identifier"] is None and access["preferences"] is None

    processing = c.get("/consent/reports/processing").json()
    assert processing == [{"job_id": "job-1", "purpose": "modeling", "recipient": None, "agreement_id": "agr-1",
                           "at": processing[0]["at"], "subjects_count": 1}]


BAD_BODIES = [
    (_event("b1", "m1", purpose="nope"), 400, "events[0].purpose"),
    (_event("b1", "m1", valid_from="yesterday"), 400, "valid_from"),
    (_event("b1", "m1", valid_from="2026-02-01T00:00:00Z", valid_until="2026-01-01T00:00:00Z"), 400, "valid_until"),
    (_event("b1", "m1", purpose="audience", recipient="acme"), 400, "events[0].recipient"),
    (_event("e1", "m1", purpose="audience", recipient="partner"), 409, "events[0].event_id"),
]


def test_bad_input_status_and_field(client: tuple[TestClient, ConsentStore]) -> None:
    c, _ = client
    c.post("/consent/notices", json=NOTICE)
    c.post("/consent/events", json=_event("e1", "m1"))
    for body, status, field in BAD_BODIES:
        r = c.post("/consent/events", json=body)
        assert r.status_code == status, r.text
        assert field in r.text
        assert len(c.get("/consent/subjects/m1/history").json()) == 1, field  # nothing else written


def test_oversized_batch_and_bad_preferences(client: tuple[TestClient, ConsentStore]) -> None:
    c, _ = client
    c.post("/consent/notices", json=NOTICE)
    r = c.post("/consent/events/batch", json={"events": [_event(f"e{i}", "m1") for i in range(6)]})
    assert r.status_code == 400 and "limit of 5" in r.json()["message"]
    r = c.put("/consent/subjects/m1/preferences", json={"channels": {"fax": True}})
    assert r.status_code == 400 and "channels" in r.text
    r = c.put("/consent/subjects/m1/preferences", json={"time_windows": [{"start": "09:00", "end": "09:00"}]})
    assert r.status_code == 400 and "time_windows" in r.text
    r = c.post("/consent/check", json={"subjects": ["m1"], "purpose": "sharing.third_party"})
    assert r.status_code == 400 and r.json()["details"]["field"] == "recipient"


def test_deliverable_over_rest_applies_preferences_and_names_bad_fields(
    client: tuple[TestClient, ConsentStore],
) -> None:
    c, store = client
    notice = {**NOTICE, "purposes": [*NOTICE["purposes"], {"purpose": "marketing", "data_categories": ["orders"]}]}
    assert c.post("/consent/notices", json=notice).status_code == 201
    for i, s in enumerate(("a", "b", "c")):
        r = c.post("/consent/events", json=_event(f"k{i}", s, purpose="marketing"))
        assert r.status_code == 201, r.text
    # b only wants e-mail; c only between 20:00 and 22:00 Shanghai time.
    assert c.put("/consent/subjects/b/preferences", json={"channels": {"email": True}}).status_code == 200
    assert c.put("/consent/subjects/c/preferences",
                 json={"time_windows": [{"start": "20:00", "end": "22:00"}]}).status_code == 200
    body = {"subjects": ["a", "b", "c", "d"], "purpose": "marketing.general", "channel": "sms", "topic": "service",
            "at": "2026-02-03T13:30:00Z", "job_ref": "camp-1"}  # 21:30 in Shanghai
    r = c.post("/consent/deliverable", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["deliverable"] == ["a", "c"] and out["recorded"] == 2
    assert out["denied_counts"] == {"channel_not_allowed": 1, "no_consent": 1}
    r = c.post("/consent/deliverable", json={**body, "at": "2026-02-03T05:00:00Z", "record": False})  # 13:00
    assert r.json()["deliverable"] == ["a"] and r.json()["recorded"] == 0
    r = c.post("/consent/deliverable", json={**body, "channel": "pigeon"})
    assert r.status_code == 400 and "channel" in r.text
    r = c.post("/consent/deliverable", json={**body, "purpose": "scoring.lead"})
    assert r.status_code == 400 and "purpose" in r.text
