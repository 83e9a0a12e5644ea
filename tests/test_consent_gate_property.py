"""Property test: the gate agrees with a straightforward reference implementation.

Random consent histories (recorded in random order and batches), notices with a later version
that changes some parts, opt-outs and erasures; the reference re-derives every decision from
the raw accepted events, one subject at a time.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.db import make_engine
from confide.errors import ValidationError
from consent.models import ensure_tables
from consent.purposes import PurposeRegistry
from consent.store import ConsentStore

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)
REG = PurposeRegistry.load()
NOTICES = [
    {"notice": "m", "version": "n1", "published_at": T0, "purposes": [
        {"purpose": "modeling", "recipients": ["p1"], "data_categories": ["a"]},
        {"purpose": "marketing", "data_categories": ["a"]},
        {"purpose": "sharing", "recipients": ["p1", "p2"], "data_categories": ["phone"]},
        {"purpose": "audience", "recipients": ["p1"], "data_categories": ["phone"]},
    ]},
    {"notice": "m", "version": "n2", "published_at": T0 + 3 * DAY, "purposes": [
        {"purpose": "modeling", "recipients": ["p1"], "data_categories": ["a", "b"]},
        {"purpose": "modeling.lookalike", "recipients": ["p1", "p2"], "data_categories": ["a", "c"]},
        {"purpose": "marketing", "data_categories": ["a"]},
        {"purpose": "sharing", "recipients": ["p1"], "data_categories": ["phone"]},
        {"purpose": "audience", "recipients": ["p1", "p2"], "data_categories": ["phone"]},
    ]},
]
PURPOSES = ["modeling", "modeling.lookalike", "marketing", "marketing.personalized", "sharing", "sharing.third_party",
            "audience", "audience.match"]
QUERIES = ["modeling.lookalike", "modeling", "modeling", "marketing.personalized", "marketing.general", "sharing.third_party",
           "audience.match", "audience.overlap"]
RANK = {"granted": 0, "expired": 1, "refused": 2, "withdrawn": 3}
WEAK = ["expired", "notice_superseded", "not_in_notice", "no_recipient_consent", "not_yet_valid"]


@dataclass(frozen=True)
class E:
    event_id: str
    subject: str
    purpose: str
    recipient: str | None
    action: str
    notice: str | None
    received: dt.datetime
    valid_from: dt.datetime
    valid_until: dt.datetime | None


# --------------------------------------------------------------------------- reference


def _entry(version: str, purpose: str) -> tuple[set[str], set[str]] | None:
    n = next(n for n in NOTICES if n["version"] == version)
    listed = {p["purpose"]: (set(p.get("recipients", [])), set(p["data_categories"])) for p in n["purposes"]}
    for key in REG.ancestors(purpose):
        if key in listed:
            return listed[key]
    return None


def _notice_problem(version: str, purpose: str, recipient: str | None, at: dt.datetime) -> str | None:
    mine = _entry(version, purpose)
    if mine is None or (recipient is not None and recipient not in mine[0]):
        return "not_in_notice"
    published = {n["version"]: n["published_at"] for n in NOTICES}
    in_force = max((n for n in NOTICES if n["published_at"] <= at), key=lambda n: n["published_at"], default=None)
    if in_force is None or in_force["version"] == version or published[version] > at:
        return None
    theirs = _entry(in_force["version"], purpose)
    if theirs is None or theirs[1] != mine[1] or (recipient is not None and recipient not in theirs[0]):
        return "notice_superseded"
    return None


def _separate(purpose: str, recipient: str | None) -> bool:
    """PIPL Art. 23 as docs/consent.md states it, written out independently of the registry:
    sharing always needs a grant naming the recipient; matching, modelling, scoring and
    activation with a named party need one too; counts-only overlap and own processing do not."""
    root = purpose.split(".")[0]
    if root == "sharing":
        return True
    if recipient is None or purpose == "audience.overlap":
        return False
    return root in ("audience", "modeling", "scoring", "activation")


def reference(events: list[E], opted: set[str], erased: set[str], subject: str, purpose: str,
              recipient: str | None, at: dt.datetime) -> tuple[str, set[str]]:
    """('allowed', evidence ids) or (reason, set())."""
    if subject in erased:
        return "erased", set()
    separate = _separate(purpose, recipient)  # only a grant naming the recipient counts
    usable = {recipient} if separate else {None, recipient}
    latest: dict[tuple[str, str | None], E] = {}
    for e in sorted(events, key=lambda e: (e.received, RANK[e.action], e.event_id)):
        if e.subject == subject and REG.covers(e.purpose, purpose):
            latest[(e.purpose, e.recipient)] = e
    rules = list(latest.values())
    vetoes = [e.action for e in rules if e.action in ("refused", "withdrawn") and e.recipient in (None, recipient)]
    if "withdrawn" in vetoes:
        return "withdrawn", set()
    if "refused" in vetoes:
        return "refused", set()
    if REG.personalised(purpose) and subject in opted:
        return "opted_out", set()
    good, reasons = set(), []
    for e in rules:
        if e.action in ("refused", "withdrawn"):
            continue
        if e.recipient not in usable:
            if separate and e.action == "granted":
                reasons.append("no_recipient_consent")
        elif e.action == "expired":
            reasons.append("expired")
        elif e.valid_until is not None and e.valid_until <= at:
            reasons.append("expired")
        elif e.valid_from > at:
            reasons.append("not_yet_valid")
        else:
            assert e.notice is not None
            problem = _notice_problem(e.notice, purpose, recipient if separate else None, at)
            if problem:
                reasons.append(problem)
            else:
                good.add(e.event_id)
    if good:
        return "allowed", good
    if reasons:
        return min(reasons, key=WEAK.index), set()
    return "no_consent", set()


# --------------------------------------------------------------------------- strategies


@st.composite
def histories(draw: Any) -> dict[str, Any]:
    subjects = [f"s{i}" for i in range(draw(st.integers(1, 3)))]
    events = []
    for i in range(draw(st.integers(0, 20))):
        action = draw(st.sampled_from(["granted"] * 4 + ["refused", "withdrawn", "expired"]))
        received = T0 + draw(st.integers(0, 8)) * DAY  # ties on purpose
        valid_from = received + draw(st.sampled_from([0, 0, 2])) * DAY
        until = draw(st.sampled_from([None, None, 1, 5])) if action == "granted" else None
        events.append({
            "i": i,
            "subject": draw(st.sampled_from(subjects)),
            "purpose": draw(st.sampled_from(PURPOSES if action != "granted" else PURPOSES + ["modeling"] * 2)),
            "recipient": draw(st.sampled_from([None, None, "p1", "p2"])),
            "action": action,
            "notice": draw(st.sampled_from(["n1", "n2"])) if action == "granted" else None,
            "received": received,
            "valid_from": valid_from,
            "valid_until": None if until is None else valid_from + until * DAY,
        })
    return {
        "subjects": subjects,
        "events": events,
        "order": draw(st.permutations(range(len(events)))),
        "batch": draw(st.integers(1, 5)),
        "opted": draw(st.sets(st.sampled_from(subjects))),
        "erased": draw(st.sets(st.sampled_from(subjects), max_size=1)),
        "queries": draw(st.lists(
            st.tuples(st.sampled_from(QUERIES), st.sampled_from([None, None, "p1", "p2"]), st.integers(0, 12)),
            min_size=2, max_size=6,
        )),
    }


_run_ids = itertools.count()


def _check(store: ConsentStore, h: dict[str, Any]) -> None:
    run = next(_run_ids)
    name = {s: f"r{run}-{s}" for s in h["subjects"]}
    accepted: list[E] = []
    ordered = [h["events"][i] for i in h["order"]]
    for start in range(0, len(ordered), h["batch"]):
        for raw in ordered[start:start + h["batch"]]:
            body = {
                "event_id": f"r{run}-e{raw['i']}", "subject": name[raw["subject"]], "purpose": raw["purpose"],
                "recipient": raw["recipient"], "action": raw["action"], "channel": "app",
                "notice_version": raw["notice"], "received_at": raw["received"], "valid_from": raw["valid_from"],
                "valid_until": raw["valid_until"],
            }
            try:  # events the store refuses (e.g. a recipient the notice does not name) are left out
                store.record(body)
            except ValidationError:
                continue
            accepted.append(E(body["event_id"], name[raw["subject"]], raw["purpose"], raw["recipient"],
                              raw["action"], raw["notice"], raw["received"], raw["valid_from"], raw["valid_until"]))
    for s in h["opted"]:
        store.set_preferences(name[s], {"no_personalised_marketing": True})
    for s in h["erased"]:
        store.erase(name[s])
    opted = {name[s] for s in h["opted"]}
    erased = {name[s] for s in h["erased"]}
    subjects = [name[s] for s in h["subjects"]] + [f"r{run}-unknown"]
    for purpose, recipient, day in h["queries"]:
        if REG.recipient_specific(purpose) and recipient is None:
            recipient = "p1"
        at = T0 + day * DAY
        d = store.allowed(subjects, purpose, recipient, at)
        expected_allowed, expected_counts = [], {}
        for s in subjects:
            verdict, evidence = reference(accepted, opted, erased, s, purpose, recipient, at)
            if verdict == "allowed":
                expected_allowed.append(s)
                assert d.evidence[s] in evidence, (s, purpose, recipient, day)
            else:
                expected_counts[verdict] = expected_counts.get(verdict, 0) + 1
        assert d.allowed == expected_allowed, (purpose, recipient, day, accepted)
        assert d.denied_counts == expected_counts, (purpose, recipient, day, accepted)


def _store(url: str) -> ConsentStore:
    engine = make_engine(url)
    ensure_tables(engine)
    store = ConsentStore(engine, secret_key=b"property-secret-0123456789abcdef", recipients={"p1", "p2"})
    for n in NOTICES:
        store.register_notice(n)
    return store


@pytest.mark.parametrize("examples", [80])
def test_gate_matches_reference_sqlite(tmp_path: Any, examples: int) -> None:
    store = _store(f"sqlite:///{tmp_path / 'prop.db'}")

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(histories())
    def check(h: dict[str, Any]) -> None:
        _check(store, h)

    check()


def test_gate_matches_reference_postgresql(pg_url: str) -> None:
    store = _store(pg_url)

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(histories())
    def check(h: dict[str, Any]) -> None:
        _check(store, h)

    check()
