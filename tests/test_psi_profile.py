"""`profile`: aggregates over the overlap vs the plaintext oracle, with k_min suppression."""

from __future__ import annotations

from collections import Counter

import pytest

from confide.errors import ProtocolError, ValidationError
from psi import _paillier
from psi.inputs import PreparedItems
from psi.messages import MaskedSum, Mode, decode, encode
from psi.profile import ProfileRequester, ProfileResponder, ProfileSpec
from psi.roles import SessionParams
from tests.test_psi_protocol import exchange


@pytest.fixture(scope="module")
def key():  # test-only: a 1024-bit key keeps the test fast; production uses fresh 2048-bit keys
    return _paillier.generate(1024)


def _data(n: int = 300):
    b = [f"u{i}" for i in range(100, 100 + n)]
    city = [["bj", "sh", "gz", "cd"][i % 4] if i % 9 else "lhasa" for i in range(n)]
    spend = [float(i % 40) + 0.5 if i % 5 else None for i in range(n)]
    return b, {"city": city, "spend": spend}


def _run(a, b, vals, spec, key, log=None):
    p = SessionParams("p", "agr", "job", "phone", Mode.profile)
    req = ProfileRequester(p, PreparedItems.from_values("phone", a), spec)
    resp = ProfileResponder(p, PreparedItems.from_values("phone", b), vals, spec, paillier_key=key)
    exchange(req, resp, [req.hello(), *req.round_one()], log)
    assert req.done and resp.done
    return req, resp


def test_profile_matches_plaintext_with_suppression(key) -> None:
    a = [f"u{i}" for i in range(0, 260)]
    b, vals = _data()
    spec = ProfileSpec(categorical=("city",), numeric=("spend",), k_min=20)
    req, resp = _run(a, b, vals, spec, key)
    rows = [r for r, x in enumerate(b) if x in set(a)]
    cnt = Counter(vals["city"][r] for r in rows)
    present = [vals["spend"][r] for r in rows if vals["spend"][r] is not None]
    res = req.result
    assert res is not None and res.intersection_size == len(rows) == 160
    cells = {(c.column, c.kind, c.value): c for c in res.cells}
    for v, n in cnt.items():
        cell = cells[("city", "count", v)]
        if n >= 20:
            assert cell.result == n and not cell.suppressed
        else:
            assert cell.result is None and cell.suppressed  # lhasa: 17 < k_min
    assert cells[("city", "count", "lhasa")].suppressed
    assert cells[("spend", "sum", "")].result == pytest.approx(sum(present))
    assert cells[("spend", "mean", "")].result == pytest.approx(sum(present) / len(present))
    # the partner learns |A∩B| and nothing per row
    assert resp.outcome is not None and resp.outcome.intersection_size == 160
    assert resp.outcome.matched == {}


def test_profile_all_suppressed_below_k_min(key) -> None:
    b, vals = _data(50)
    req, _ = _run(["u100", "u101"], b, vals, ProfileSpec(categorical=("city",), numeric=("spend",), k_min=5), key)
    assert req.result is not None and req.result.suppressed and req.result.intersection_size is None
    assert all(c.result is None for c in req.result.cells)


def test_profile_wire_has_no_values_and_partner_sees_only_masked_sum(key) -> None:
    b, vals = _data(60)
    log: list[bytes] = []
    _run([f"u{i}" for i in range(100, 140)], b, vals, ProfileSpec(categorical=("city",), k_min=1), key, log)
    blob = b"".join(log)
    for x in b:
        assert x.encode() not in blob
    masked = [decode(w) for w in log if isinstance(decode(w), MaskedSum)]
    assert len(masked) == 1  # the only thing the partner decrypts


def test_profile_refuses_columns_outside_the_agreement_and_bad_values(key) -> None:
    b, vals = _data(20)
    p = SessionParams("p", "agr", "job", "phone", Mode.profile)
    req = ProfileRequester(p, PreparedItems.from_values("phone", ["u1"]), ProfileSpec(categorical=("income",)))
    resp = ProfileResponder(p, PreparedItems.from_values("phone", b), vals, ProfileSpec(categorical=("city",)), paillier_key=key)
    with pytest.raises(ProtocolError, match="columns"):
        resp.handle(decode(encode(req.hello())))
    with pytest.raises(ValidationError, match="range|lie in"):
        ProfileResponder(p, PreparedItems.from_values("phone", ["x"]), {"spend": [-5]},
                         ProfileSpec(numeric=("spend",)), paillier_key=key)


def test_profile_agreed_vocabulary_hides_the_partners_own(key) -> None:
    b, vals = _data(120)
    spec = ProfileSpec(categorical=("city",), k_min=1, categories={"city": ("bj", "sh")})
    req, _ = _run([f"u{i}" for i in range(100, 220)], b, vals, spec, key)
    assert req.result is not None
    got = {c.value: c.result for c in req.result.cells}
    assert set(got) == {"bj", "sh", "__other__"}
    assert sum(got.values()) == 120


def test_profile_bad_masked_sum_refused_without_state_change(key) -> None:
    import pickle

    b, vals = _data(40)
    spec = ProfileSpec(categorical=("city",), k_min=1)
    p = SessionParams("p", "agr", "job", "phone", Mode.profile)
    req = ProfileRequester(p, PreparedItems.from_values("phone", [f"u{i}" for i in range(100, 120)]), spec)
    resp = ProfileResponder(p, PreparedItems.from_values("phone", b), vals, spec, paillier_key=key)
    to_resp = [req.hello(), *req.round_one()]
    to_req: list = []
    masked = None
    while to_resp or to_req:  # run until the requester emits its masked sum, hold it back
        while to_resp:
            m = to_resp.pop(0)
            if isinstance(m, MaskedSum):
                masked = m
                continue
            to_req.extend(resp.handle(decode(encode(m))))
        while to_req:
            to_resp.extend(req.handle(decode(encode(to_req.pop(0)))))
    assert masked is not None
    snap = pickle.dumps({k: v for k, v in vars(resp).items() if k not in ("executor", "_priv")})
    for bad in (
        MaskedSum(mode=masked.mode, session="p", seq=masked.seq, data=masked.data[:-1]),
        MaskedSum(mode=masked.mode, session="p", seq=masked.seq, data=b"\x00" * len(masked.data)),
        MaskedSum(mode=masked.mode, session="p", seq=masked.seq + 1, data=masked.data),
    ):
        with pytest.raises(ProtocolError):
            resp.handle(decode(encode(bad)))
        assert pickle.dumps({k: v for k, v in vars(resp).items() if k not in ("executor", "_priv")}) == snap
    exchange(req, resp, [masked])
    assert req.done and resp.done and req.result is not None and req.result.intersection_size == 20
