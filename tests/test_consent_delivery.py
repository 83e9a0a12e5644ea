"""`deliverable`: preferences enforced for activation and marketing jobs, against a reference
implementation written out per subject, on SQLite and PostgreSQL (`db_url`)."""

from __future__ import annotations

import datetime as dt
import random
import zoneinfo
from typing import Any

import pytest
from sqlalchemy import func, select

from confide.db import make_engine
from confide.errors import ValidationError
from consent.models import ContactRecord, ensure_tables
from consent.store import ConsentStore

T0 = dt.datetime(2026, 3, 2, 0, 0, tzinfo=dt.timezone.utc)  # a Monday, 08:00 in Shanghai
SH = zoneinfo.ZoneInfo("Asia/Shanghai")
CHANNELS = ["sms", "wecom", "email", "app_push"]
TOPICS = ["new_models", "service", "events"]
PERIOD = {"day": dt.timedelta(days=1), "week": dt.timedelta(days=7), "month": dt.timedelta(days=30)}


class Audit:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def append(self, kind: str, payload: dict[str, Any], session: object = None) -> int:
        self.entries.append((kind, payload))
        return len(self.entries)


def make_store(url: str) -> tuple[ConsentStore, Audit]:
    engine = make_engine(url)
    ensure_tables(engine)
    audit = Audit()
    store = ConsentStore(engine, secret_key=b"delivery-secret-0123456789abcdef", recipients={"adnet"}, audit=audit,
                         clock=lambda: T0)
    store.register_notice({"notice": "m", "version": "m/1", "published_at": T0 - dt.timedelta(days=30), "purposes": [
        {"purpose": "marketing", "data_categories": ["orders"]},
        {"purpose": "activation", "recipients": ["adnet"], "data_categories": ["phone"]},
    ]})
    return store, audit


# --------------------------------------------------------------------------- reference


def ref_window(w: dict[str, Any], local: dt.datetime) -> bool:
    start, end = dt.time.fromisoformat(w["start"]), dt.time.fromisoformat(w["end"])
    days = w.get("days", list(range(7)))
    if start < end:
        return local.weekday() in days and start <= local.time() < end
    # over midnight: the evening part on a listed day, the morning part on the day after one
    return (local.weekday() in days and local.time() >= start) or (
        (local - dt.timedelta(days=1)).weekday() in days and local.time() < end)


def reference(consent: str, prefs: dict[str, Any] | None, history: list[dt.datetime], channel: str, topic: str,
              at: dt.datetime) -> str:
    """'ok' or the reason, for one subject."""
    if consent == "none":
        return "no_consent"
    if consent == "refused":
        return "refused"
    if prefs is None:
        return "ok"
    if prefs["channels"] and not prefs["channels"].get(channel, False):
        return "channel_not_allowed"
    if prefs["time_windows"] and not any(ref_window(w, at.astimezone(SH)) for w in prefs["time_windows"]):
        return "outside_time_window"
    cap = prefs["frequency_cap"]
    if cap is not None and sum(1 for t in history if at - PERIOD[cap["per"]] < t <= at) >= cap["max_messages"]:
        return "frequency_cap"
    if prefs["topics"] and topic not in prefs["topics"]:
        return "topic_not_wanted"
    return "ok"


def random_prefs(rng: random.Random) -> dict[str, Any] | None:
    if rng.random() < 0.25:
        return None
    windows = []
    for _ in range(rng.choice([0, 0, 1, 2])):
        start, end = rng.randrange(24), rng.randrange(24)
        if start == end:
            end = (end + 3) % 24
        windows.append({"days": sorted(rng.sample(range(7), rng.randint(1, 7))),
                        "start": f"{start:02d}:00:00", "end": f"{end:02d}:30:00"})
    return {
        "channels": {c: rng.random() < 0.6 for c in rng.sample(CHANNELS, rng.randint(0, 3))},
        "time_windows": windows,
        "frequency_cap": rng.choice([None, None, {"max_messages": rng.randint(0, 3),
                                                  "per": rng.choice(["day", "week", "month"])}]),
        "topics": rng.sample(TOPICS, rng.randint(0, 2)),
    }


# --------------------------------------------------------------------------- tests


def test_deliverable_matches_reference_over_many_calls(db_url: str) -> None:
    store, audit = make_store(db_url)
    rng = random.Random(20261127)
    subjects = [f"c{i}" for i in range(60)]
    consent = {s: rng.choice(["granted", "granted", "granted", "refused", "none"]) for s in subjects}
    events = [{"event_id": f"e-{s}", "subject": s, "purpose": "marketing", "action": consent[s], "channel": "app",
               "received_at": T0 - dt.timedelta(days=10),
               **({"notice_version": "m/1"} if consent[s] == "granted" else {})}
              for s in subjects if consent[s] != "none"]
    store.record_events(events)
    prefs = {s: random_prefs(rng) for s in subjects}
    for s, p in prefs.items():
        if p is not None:
            store.set_preferences(s, p)
    history: dict[str, list[dt.datetime]] = {s: [] for s in subjects}
    at = T0
    for call in range(25):
        at += dt.timedelta(hours=rng.choice([1, 3, 7, 20, 50]))
        channel, topic = rng.choice(CHANNELS), rng.choice(TOPICS)
        asked = rng.sample(subjects, 40) + ["unknown-1"]
        out = store.deliverable(asked + asked[:3], "marketing.general", channel, topic, at, job_ref=f"camp-{call}")
        want, reasons = [], {}
        for s in asked:
            r = reference(consent.get(s, "none"), prefs.get(s), history.get(s, []), channel, topic, at)
            if r == "ok":
                want.append(s)
            else:
                reasons[r] = reasons.get(r, 0) + 1
        assert out.deliverable == want, (call, channel, topic, at)
        assert out.denied_counts == dict(sorted(reasons.items())), call
        assert out.recorded == len(want)
        for s in want:
            history[s].append(at)
    # Every contact is in the history table (pseudonymous), and each call left a counts-only entry.
    with store.factory() as sess:
        assert sess.scalar(select(func.count()).select_from(ContactRecord)) == sum(map(len, history.values()))
        stored = set(sess.scalars(select(ContactRecord.subject_ref)))
        assert stored and not stored & set(subjects) and all(len(r) == 32 for r in stored)
        assert stored == {store.subject_ref(s) for s, h in history.items() if h}
    deliveries = [p for k, p in audit.entries if k == "consent.delivery"]
    assert len(deliveries) == 25 and all("c1" not in str(p) and "deliverable" in p for p in deliveries)
    assert sum(p["deliverable"] for p in deliveries) == sum(map(len, history.values()))


def test_deliverable_without_record_changes_nothing_and_bad_input_names_the_field(db_url: str) -> None:
    store, audit = make_store(db_url)
    store.record({"event_id": "g", "subject": "a", "purpose": "marketing", "action": "granted", "channel": "app",
                  "notice_version": "m/1", "received_at": T0 - dt.timedelta(days=1)})
    store.set_preferences("a", {"frequency_cap": {"max_messages": 1, "per": "day"}})
    at = T0 + dt.timedelta(hours=2)
    for _ in range(3):  # a dry run never uses up the cap
        assert store.deliverable(["a"], "marketing.general", "sms", "service", at, record=False).deliverable == ["a"]
    assert store.deliverable(["a"], "marketing.general", "sms", "service", at).recorded == 1
    assert store.deliverable(["a"], "marketing.general", "sms", "service", at).denied_counts == {"frequency_cap": 1}
    assert store.deliverable(["a"], "marketing.general", "sms", "service", at + dt.timedelta(days=1, seconds=1)).deliverable == ["a"]
    for kwargs, field in (
        ({"purpose": "modeling.lookalike"}, "purpose"),
        ({"purpose": "marketing.nope"}, "purpose"),
        ({"channel": "fax"}, "deliverable.channel"),
        ({"topic": "Bad Topic!"}, "deliverable.topic"),
    ):
        args = {"purpose": "marketing.general", "channel": "sms", "topic": "service", **kwargs}
        with pytest.raises(ValidationError) as exc:
            store.deliverable(["a"], args["purpose"], args["channel"], args["topic"], at)
        assert exc.value.details["field"] == field


def test_delivery_through_a_party_needs_separate_consent_and_erasure_drops_contacts(db_url: str) -> None:
    store, _ = make_store(db_url)
    base = {"purpose": "activation", "action": "granted", "channel": "app", "notice_version": "m/1",
            "received_at": T0 - dt.timedelta(days=1)}
    store.record_events([{"event_id": "g1", "subject": "a", **base},
                         {"event_id": "g2", "subject": "b", "recipient": "adnet", **base}])
    out = store.deliverable(["a", "b"], "activation.ads", "app_push", "new_models", T0, recipient="adnet")
    assert out.deliverable == ["b"] and out.denied_counts == {"no_recipient_consent": 1}
    assert store.deliverable(["a", "b"], "activation.ads", "app_push", "new_models", T0).deliverable == ["a"]
    tomb = store.erase("b")
    assert tomb.detail["contacts_deleted"] == 1
