"""PSI roles against the plaintext oracle, and what each side's output does and does not hold.

Every message goes through its wire form (`encode` → `decode`) on its way to the other role.
"""

from __future__ import annotations

import datetime as dt
import os
import random
from typing import Any, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consent.gate import GateDecision
from psi import crypto
from psi.inputs import PartyData, PreparedItems, prepare_party
from psi.messages import Message, Mode, Points, Stream, decode, encode
from psi.roles import Requester, Responder, RoleSecrets, SessionParams
from psi.waterfall import WaterfallRequester, WaterfallResponder

NOW = dt.datetime(2026, 11, 27, tzinfo=dt.timezone.utc)


class SetGate:
    """Test gate: allows exactly the subjects in `allowed`; records what it was asked."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed_set = allowed
        self.calls: list[tuple[int, str, str | None]] = []

    def allowed(self, subjects: Sequence[str], purpose: str, recipient: str | None, at: dt.datetime) -> GateDecision:
        self.calls.append((len(subjects), purpose, recipient))
        ok = [s for s in subjects if s in self.allowed_set]
        return GateDecision(purpose, recipient, at, ok, {s: "ev" for s in ok},
                            {"no_consent": len(subjects) - len(ok)} if len(subjects) > len(ok) else {})


def seeded(seed: int) -> RoleSecrets:
    r = random.Random(seed)
    return RoleSecrets.fresh(lambda n: bytes(r.getrandbits(8) for _ in range(n)))


def exchange(req: Any, resp: Any, first: list[Message], log: list[bytes] | None = None) -> None:
    """Deliver messages both ways through the wire form until neither side has anything to say."""
    to_resp: list[Message] = list(first)
    to_req: list[Message] = []
    while to_resp or to_req:
        while to_resp:
            w = encode(to_resp.pop(0))
            if log is not None:
                log.append(w)
            to_req.extend(resp.handle(decode(w)))
        while to_req:
            w = encode(to_req.pop(0))
            if log is not None:
                log.append(w)
            to_resp.extend(req.handle(decode(w)))


def run(a: Sequence[str | None], b: Sequence[str | None], mode: Mode = Mode.cardinality,
        session: str = "s", reveal: bool = False, chunk_rows: int = 7,
        log: list[bytes] | None = None) -> tuple[Requester, Responder]:
    p = SessionParams(session, "agr-1", f"job-{session}", "phone", mode, reveal_to_responder=reveal)
    req = Requester(p, PreparedItems.from_values("phone", a), chunk_rows=chunk_rows)
    resp = Responder(p, PreparedItems.from_values("phone", b), chunk_rows=chunk_rows)
    exchange(req, resp, [req.hello(), *req.round_one()], log)
    assert req.done and resp.done
    return req, resp


def phones(ids: Sequence[int]) -> list[str]:
    return [f"+86138{i:08d}" for i in ids]


ids = st.lists(st.integers(0, 40), max_size=25)


@given(ids, ids)
@settings(max_examples=25, deadline=None)
def test_cardinality_matches_plaintext(a: list[int], b: list[int]) -> None:
    req, resp = run(phones(a), phones(b))
    assert req.outcome is not None and resp.outcome is not None
    assert req.outcome.intersection_size == len(set(a) & set(b))
    assert req.outcome.matched == {}
    assert resp.outcome.intersection_size is None  # not revealed unless the agreement says so


@given(ids, ids)
@settings(max_examples=20, deadline=None)
def test_match_rows_and_join_keys(a: list[int], b: list[int]) -> None:
    pa, pb = phones(a), phones(b)
    req, resp = run(pa, pb, Mode.match)
    common = set(a) & set(b)
    assert req.outcome is not None and resp.outcome is not None
    assert set(req.outcome.matched) == {r for r, x in enumerate(a) if x in common}
    assert set(resp.outcome.matched) == {r for r, x in enumerate(b) if x in common}
    # the same pair gets the same key on both sides; different values different keys
    ka = {pa[r]: k for r, k in req.outcome.matched.items()}
    kb = {pb[r]: k for r, k in resp.outcome.matched.items()}
    assert ka == kb
    assert len(set(ka.values())) == len(ka)


@pytest.mark.parametrize(
    "a,b",
    [([], []), ([], [1, 2]), ([1, 2], []), ([1, 2, 3], [4, 5]), ([1, 2, 3], [1, 2, 3]),
     ([1, 1, 1, 2], [1, 2, 2])],
    ids=["empty", "empty-left", "empty-right", "disjoint", "identical", "duplicates"],
)
@pytest.mark.parametrize("mode", [Mode.cardinality, Mode.match])
def test_edge_cases(a: list[int], b: list[int], mode: Mode) -> None:
    req, resp = run(phones(a), phones(b), mode)
    assert req.outcome is not None
    assert req.outcome.intersection_size == len(set(a) & set(b))


def test_reveal_to_responder_when_agreed() -> None:
    _, resp = run(phones([1, 2, 3]), phones([2, 3, 4]), reveal=True)
    assert resp.outcome is not None and resp.outcome.intersection_size == 2


def test_consent_gate_first_and_invalid_identifiers_never_match() -> None:
    a = PartyData(["m1", "m2", "m3", "m4", "m5"],
                  {"phone": ["138 1234 5678", "+86 139-0000-0000", "garbage", "", "13700000000"]})
    b = PartyData(["x1", "x2", "x3", "x4"],
                  {"phone": ["008613812345678", "13900000000", "garbage", "13700000000"]})
    gate_a = SetGate({"m1", "m2", "m3", "m4"})  # m5 has no consent
    gate_b = SetGate({"x1", "x2", "x3", "x4"})
    pa = prepare_party(a, gate_a, purpose="audience.overlap", recipient="partner", at=NOW, id_types=["phone"])
    pb = prepare_party(b, gate_b, purpose="audience.overlap", recipient="brand", at=NOW, id_types=["phone"])
    assert gate_a.calls == [(5, "audience.overlap", "partner")]
    assert pa.stats["consented_rows"] == 4 and pa.stats["denied"] == {"no_consent": 1}
    assert pa.stats["invalid"] == {"phone": 1}  # "garbage"; the empty cell is not counted
    assert pb.stats["invalid"] == {"phone": 1}
    assert "+8613700000000" not in pa.items["phone"].values  # m5 never entered
    p = SessionParams("c", "agr", "job", "phone", Mode.match)
    req = Requester(p, pa.items["phone"])
    resp = Responder(p, pb.items["phone"])
    exchange(req, resp, [req.hello(), *req.round_one()])
    assert req.outcome is not None and resp.outcome is not None
    assert set(req.outcome.matched) == {0, 1}
    assert set(resp.outcome.matched) == {0, 1}


def test_join_keys_differ_across_jobs() -> None:
    a = phones(range(10))
    r1, _ = run(a, a, Mode.match, session="job1")
    r2, _ = run(a, a, Mode.match, session="job2")
    assert r1.outcome is not None and r2.outcome is not None
    assert not set(r1.outcome.matched.values()) & set(r2.outcome.matched.values())


def test_wire_carries_no_identifier_and_cardinality_tags_are_shuffled() -> None:
    a, b = phones(range(0, 30)), phones(range(15, 45))
    log: list[bytes] = []
    p = SessionParams("s", "agr", "job", "phone", Mode.cardinality)
    req = Requester(p, PreparedItems.from_values("phone", a), secrets=seeded(1), chunk_rows=8)
    resp = Responder(p, PreparedItems.from_values("phone", b), secrets=seeded(2), chunk_rows=8)
    exchange(req, resp, [req.hello(), *req.round_one()], log)
    blob = b"".join(log)
    for v in a + b:
        assert v.encode() not in blob and v[3:].encode() not in blob
    msgs = [decode(w) for w in log]
    req_single = b"".join(m.data for m in msgs if isinstance(m, Points) and m.stream is Stream.req_single)
    resp_tags = b"".join(m.data for m in msgs if isinstance(m, Points) and m.stream is Stream.resp_tags)
    in_order = crypto.blind_to_tags(req_single, seeded(2).key.secret, crypto.tag_key("s"))
    assert sorted(crypto.tags_array(in_order)) == sorted(crypto.tags_array(resp_tags))
    assert in_order != resp_tags  # the requester cannot tell which of its items matched


def test_match_outputs_contain_only_own_rows() -> None:
    a, b = phones(range(0, 20)), phones(range(10, 50))
    req, resp = run(a, b, Mode.match)
    assert req.outcome is not None and resp.outcome is not None
    assert all(0 <= r < len(a) for r in req.outcome.matched)
    assert all(0 <= r < len(b) for r in resp.outcome.matched)
    text = repr(req.outcome) + repr(resp.outcome)
    for v in a + b:
        assert v not in text


def test_deterministic_with_injected_secrets() -> None:
    p = SessionParams("s", "agr", "job", "phone", Mode.match)
    outs = []
    for _ in range(2):
        req = Requester(p, PreparedItems.from_values("phone", phones([1, 2, 3])), secrets=seeded(5))
        resp = Responder(p, PreparedItems.from_values("phone", phones([2, 3])), secrets=seeded(6))
        log: list[bytes] = []
        exchange(req, resp, [req.hello(), *req.round_one()], log)
        outs.append(log)
    assert outs[0] == outs[1]


def _plain_waterfall(a: dict[str, list[str | None]], b: dict[str, list[str | None]], order: list[str]) -> tuple[dict[int, str], dict[int, str]]:
    done_a: dict[int, str] = {}
    done_b: dict[int, str] = {}
    for t in order:
        va = {v for r, v in enumerate(a[t]) if v is not None and r not in done_a}
        vb = {v for r, v in enumerate(b[t]) if v is not None and r not in done_b}
        common = va & vb
        for r, v in enumerate(a[t]):
            if r not in done_a and v in common:
                done_a[r] = t
        for r, v in enumerate(b[t]):
            if r not in done_b and v in common:
                done_b[r] = t
    return done_a, done_b


maybe = st.one_of(st.none(), st.integers(0, 12).map(str))


@given(st.lists(st.tuples(maybe, maybe, maybe), max_size=15), st.lists(st.tuples(maybe, maybe, maybe), max_size=15))
@settings(max_examples=20, deadline=None)
def test_waterfall_each_record_at_most_once(ra: list[tuple], rb: list[tuple]) -> None:
    order = ["phone", "email", "openid"]
    a = {t: [r[i] for r in ra] for i, t in enumerate(order)}
    b = {t: [r[i] for r in rb] for i, t in enumerate(order)}
    base = SessionParams("w", "agr", "job", "phone", Mode.match)
    req = WaterfallRequester(base, order, {t: PreparedItems.from_values(t, v) for t, v in a.items()}, chunk_rows=5)
    resp = WaterfallResponder(base, order, {t: PreparedItems.from_values(t, v) for t, v in b.items()}, chunk_rows=5)
    exchange(req, resp, req.start())
    assert req.done and resp.done
    want_a, want_b = _plain_waterfall(a, b, order)
    assert {r: t for r, (t, _) in req.outcome.matched.items()} == want_a
    assert {r: t for r, (t, _) in resp.outcome.matched.items()} == want_b
    for t in order:
        assert req.outcome.counts[t] == sum(1 for x in want_a.values() if x == t)


def test_waterfall_refuses_cardinality_mode() -> None:
    from confide.errors import ValidationError

    with pytest.raises(ValidationError, match="match mode"):
        WaterfallRequester(SessionParams("w", "a", "j", "phone", Mode.cardinality), ["phone"],
                           {"phone": PreparedItems.from_values("phone", [])})


def test_crypto_blinding_commutes_and_domains_separate() -> None:
    a, b = os.urandom(32), os.urandom(32)
    d1 = crypto.domain_key("agr", "job", "phone")
    d2 = crypto.domain_key("agr", "job", "email")
    d3 = crypto.domain_key("agr", "job2", "phone")
    pa = crypto.hash_and_blind(["x", "y"], d1, a)
    assert crypto.blind(pa, b) == crypto.blind(crypto.hash_and_blind(["x", "y"], d1, b), a)
    assert len({crypto.hash_to_curve("x", d) for d in (d1, d2, d3)}) == 3
    assert crypto.hash_and_blind(["x"], d1, a) != crypto.hash_and_blind(["x"], d1, b)


class CountingExecutor:
    """In-process executor that counts the rows it blinds (one scalar multiplication each)."""

    def __init__(self) -> None:
        self.rows = 0

    workers = 1

    def map_batches(self, fn: Any, batches: Any) -> Any:
        for b in batches:
            self.rows += len(b) // 32 if isinstance(b, bytes) else len(b)
            yield fn(b)

    def close(self) -> None:
        pass


def test_waterfall_costs_at_most_one_single_key_run_per_type() -> None:
    order = ["phone", "email"]
    a = {"phone": [f"p{i}" if i % 3 else None for i in range(60)], "email": [f"e{i}" for i in range(60)]}
    b = {"phone": [f"p{i}" for i in range(30, 90)], "email": [f"e{i}" if i % 2 else None for i in range(30, 90)]}
    base = SessionParams("w", "agr", "job", "phone", Mode.match)
    ca, cb = CountingExecutor(), CountingExecutor()
    req = WaterfallRequester(base, order, {t: PreparedItems.from_values(t, v) for t, v in a.items()}, ca)
    resp = WaterfallResponder(base, order, {t: PreparedItems.from_values(t, v) for t, v in b.items()}, cb)
    exchange(req, resp, req.start())
    single = 0
    for t in order:
        p = SessionParams(f"s-{t}", "agr", "job", t, Mode.match)
        sa, sb = CountingExecutor(), CountingExecutor()
        r = Requester(p, PreparedItems.from_values(t, a[t]), sa)
        s = Responder(p, PreparedItems.from_values(t, b[t]), sb)
        exchange(r, s, [r.hello(), *r.round_one()])
        single += sa.rows + sb.rows
    assert 0 < ca.rows + cb.rows <= single


raw_phone = st.one_of(
    st.integers(0, 30).map(lambda i: f"138 0000 {i:04d}"),  # valid, messy
    st.integers(0, 30).map(lambda i: f"+86-1380000{i:04d}"),  # same numbers, other format
    st.sampled_from(["", "garbage", "12345", "1380000", "+86", "１２３"]),  # invalid
)


@given(st.lists(raw_phone, max_size=20), st.lists(raw_phone, max_size=20))
@settings(max_examples=20, deadline=None)
def test_cardinality_with_invalid_identifiers_matches_normalised_oracle(ra: list[str], rb: list[str]) -> None:
    from psi.normalize import normalize

    def prep(raw: list[str]) -> PreparedItems:
        subjects = [f"s{i}" for i in range(len(raw))]
        return prepare_party(PartyData(subjects, {"phone": list(raw)}), SetGate(set(subjects)),
                             purpose="audience.overlap", recipient=None, at=NOW, id_types=["phone"]).items["phone"]

    want = {v for v in normalize("phone", ra).values if v} & {v for v in normalize("phone", rb).values if v}
    p = SessionParams("h", "agr", "job", "phone", Mode.cardinality)
    req, resp = Requester(p, prep(ra)), Responder(p, prep(rb))
    exchange(req, resp, [req.hello(), *req.round_one()])
    assert req.outcome is not None and req.outcome.intersection_size == len(want)
