"""`profile`: aggregates over the overlap vs the plaintext oracle, with k_min enforced by the gated
reveal — what the brand decrypts for a small cell is 0, what the partner decrypts is masked."""

from __future__ import annotations

import pickle
import secrets
from collections import Counter
from typing import Any

import pytest

from confide.errors import ProtocolError, ValidationError
from psi import _paillier
from psi.inputs import PreparedItems
from psi.messages import GatedValues, GatePowers, MaskedSum, Message, Mode, cipher_bytes, decode, encode
from psi.profile import (
    STAT_BITS,
    ProfileRequester,
    ProfileResponder,
    ProfileSpec,
    _packing,
    gate_coefficients,
)
from psi.roles import SessionParams
from tests.test_psi_protocol import exchange


# test-only: 1024-bit keys keep the tests fast; production generates fresh 2048-bit keys per job
@pytest.fixture(scope="module")
def key():  # the partner's
    return _paillier.generate(1024)


@pytest.fixture(scope="module")
def brand_key():
    return _paillier.generate(1024)


def _data(n: int = 300):
    b = [f"u{i}" for i in range(100, 100 + n)]
    city = [["bj", "sh", "gz", "cd"][i % 4] if i % 9 else "lhasa" for i in range(n)]
    spend = [float(i % 40) + 0.5 if i % 5 else None for i in range(n)]
    return b, {"city": city, "spend": spend}


def _roles(a, b, vals, spec, key, brand_key):
    p = SessionParams("p", "agr", "job", "phone", Mode.profile)
    req = ProfileRequester(p, PreparedItems.from_values("phone", a), spec, paillier_key=brand_key)
    resp = ProfileResponder(p, PreparedItems.from_values("phone", b), vals, spec, paillier_key=key)
    return req, resp


def _run(a, b, vals, spec, key, brand_key, log=None):
    req, resp = _roles(a, b, vals, spec, key, brand_key)
    exchange(req, resp, [req.hello(), *req.round_one()], log)
    assert req.done and resp.done
    return req, resp


def _partner_view(log: list[bytes], key) -> list[int]:
    """The slot values the partner decrypts: x_s = S_s + r_s, from the MaskedSum in `log`."""
    ready = next(m for m in map(decode, log) if m.kind == "ready")
    masked = next(m for m in map(decode, log) if isinstance(m, MaskedSum))
    n = int(key.public_key.n)
    w = cipher_bytes(n)
    plain = [_paillier.decrypt(key, int.from_bytes(masked.data[i : i + w], "big")) for i in range(0, len(masked.data), w)]
    slots = _packing(ready.layout, n.bit_length())
    return [(plain[s.cipher] >> s.offset) & ((1 << s.width) - 1) for s in slots]


def _cells(req: ProfileRequester) -> dict[tuple[str, str, str], Any]:
    assert req.result is not None
    return {(c.column, c.kind, c.value): c for c in req.result.cells}


def test_gate_polynomial_vanishes_exactly_below_k_min() -> None:
    n = 2**127 - 1  # any modulus whose prime factors exceed 2^24 behaves the same
    for k in (1, 2, 5, 50):
        for count in {0, 1, k - 1, k, k + 1, 2**24 - 1}:
            r = secrets.randbelow(2**64)
            a = gate_coefficients(count + r, k, n)
            assert len(a) == k + 1
            p = sum(aj * pow(r, j, n) for j, aj in enumerate(a)) % n
            direct = 1
            for t in range(k):
                direct = direct * (count - t) % n
            assert p == direct
            assert (p == 0) == (count < k)


def test_multi_pow_equals_one_powmod_per_base() -> None:
    for trial in range(50):
        mod = secrets.randbelow(2**600) + 2
        bases = [secrets.randbelow(2**620) for _ in range(trial % 7)]
        exps = [secrets.randbelow(2 ** (trial * 11)) for _ in bases]  # incl. 0 and short exponents
        want = 1
        for b, e in zip(bases, exps):
            want = want * pow(b, e, mod) % mod
        assert _paillier.multi_pow(bases, exps, mod) == want % mod


def test_profile_matches_plaintext_with_suppression(key, brand_key) -> None:
    a = [f"u{i}" for i in range(0, 260)]
    b, vals = _data()
    spec = ProfileSpec(categorical=("city",), numeric=("spend",), k_min=20)
    req, resp = _run(a, b, vals, spec, key, brand_key)
    rows = [r for r, x in enumerate(b) if x in set(a)]
    cnt = Counter(vals["city"][r] for r in rows)
    present = [vals["spend"][r] for r in rows if vals["spend"][r] is not None]
    res = req.result
    assert res is not None and res.intersection_size == len(rows) == 160
    cells = _cells(req)
    assert cnt["lhasa"] == 18 < 20  # below k_min
    for v, n in cnt.items():
        cell = cells[("city", "count", v)]
        if n >= 20:
            assert cell.result == n and not cell.suppressed
            assert req.opened[("city", "count", v)][0] != 0
        else:
            assert cell.result is None and cell.suppressed
            assert req.opened[("city", "count", v)] == (0, 0)  # all the brand ever decrypted
    assert cells[("spend", "sum", "")].result == pytest.approx(sum(present))
    assert cells[("spend", "mean", "")].result == pytest.approx(sum(present) / len(present))
    # the partner learns |A∩B| and nothing per row
    assert resp.outcome is not None and resp.outcome.intersection_size == 160
    assert resp.outcome.matched == {}


def test_cells_at_k_min_and_one_below_and_a_gated_numeric_sum(key, brand_key) -> None:
    k = 6
    # overlap: 6 × "a" (exactly k_min), 5 × "b" (k_min − 1), 12 × "c"; spend on 6 rows, age on 5
    city = ["a"] * 6 + ["b"] * 5 + ["c"] * 12
    spend = [10.25 * (i + 1) if i < 6 else None for i in range(23)]
    age = [30 + i if 6 <= i < 11 else None for i in range(23)]
    b = [f"p{i}" for i in range(23)] + [f"q{i}" for i in range(40)]  # q*: not in the overlap
    vals = {"city": city + ["b"] * 40, "spend": spend + [99.0] * 40, "age": age + [40] * 40}
    a = [f"p{i}" for i in range(23)] + [f"z{i}" for i in range(30)]
    spec = ProfileSpec(categorical=("city",), numeric=("age", "spend"), k_min=k)
    log: list[bytes] = []
    req, _ = _run(a, b, vals, spec, key, brand_key, log)
    cells = _cells(req)
    assert req.result is not None and req.result.intersection_size == 23
    assert cells[("city", "count", "a")].result == 6 and not cells[("city", "count", "a")].suppressed
    assert cells[("city", "count", "b")].result is None and cells[("city", "count", "b")].suppressed
    assert cells[("city", "count", "c")].result == 12
    assert cells[("spend", "sum", "")].result == pytest.approx(sum(10.25 * (i + 1) for i in range(6)))
    assert cells[("spend", "mean", "")].result == pytest.approx(10.25 * 3.5)
    assert cells[("age", "sum", "")].suppressed and cells[("age", "mean", "")].suppressed
    assert cells[("age", "sum", "")].result is None and cells[("age", "mean", "")].result is None
    # What the brand decrypted: zeros behind closed gates (the count and the sum it gates), and
    # exactly the partner's masked value x_s = v/u behind open ones.
    ready = next(m for m in map(decode, log) if m.kind == "ready")
    x = dict(zip(map(tuple, ready.layout), _partner_view(log, key)))
    n_b = int(brand_key.public_key.n)
    closed = {("city", "count", "b"), ("age", "sum", ""), ("age", "n", "")}
    for entry, (u, v) in req.opened.items():
        if entry in closed:
            assert (u, v) == (0, 0)
        else:
            assert u != 0 and v * pow(u, -1, n_b) % n_b == x[entry]
    assert set(req.opened) == set(x)
    # and nothing of a closed slot's masked value (the only thing that could recover it) remains
    state = pickle.dumps({k_: v for k_, v in vars(req).items() if k_ not in ("executor", "_key")})
    for entry in closed:
        assert str(x[entry]).encode() not in state
        assert x[entry].to_bytes((x[entry].bit_length() + 7) // 8, "little") not in state  # pickle's int form
    assert req._masks == []


def test_profile_all_suppressed_below_k_min(key, brand_key) -> None:
    b, vals = _data(50)
    spec = ProfileSpec(categorical=("city",), numeric=("spend",), k_min=5)
    req, _ = _run(["u100", "u101"], b, vals, spec, key, brand_key)
    assert req.result is not None and req.result.suppressed and req.result.intersection_size is None
    assert all(c.result is None for c in req.result.cells)
    assert req.opened and all(uv == (0, 0) for uv in req.opened.values())


def test_partner_sees_only_uniformly_masked_slots(key, brand_key) -> None:
    vocab = tuple(f"v{i:02d}" for i in range(30))
    b = [f"u{i}" for i in range(200)]
    vals = {"seg": [vocab[i % 7] for i in range(200)], "spend": [float(i % 13) for i in range(200)]}
    a = [f"u{i}" for i in range(50, 250)]
    spec = ProfileSpec(categorical=("seg",), numeric=("spend",), k_min=10, categories={"seg": vocab})
    rows = range(50, 200)
    true = Counter(vals["seg"][r] for r in rows)
    oracle = {("seg", "count", v): true.get(v, 0) for v in (*vocab, "__other__")}
    oracle[("spend", "sum", "")] = sum(round(vals["spend"][r] * 100) for r in rows)
    oracle[("spend", "n", "")] = len(rows)
    views = []
    fractions = []
    for _ in range(2):  # identical data, identical keys
        log: list[bytes] = []
        req, _ = _run(a, b, vals, spec, key, brand_key, log)
        ready = next(m for m in map(decode, log) if m.kind == "ready")
        slots = _packing(ready.layout, int(key.public_key.n).bit_length())
        view = _partner_view(log, key)
        for entry, s, x in zip(map(tuple, ready.layout), slots, view):
            mask = x - oracle[entry]
            assert 0 <= mask < 2 ** (s.bound + STAT_BITS)  # the slot never carried
            assert mask >= 2 ** (s.bound + STAT_BITS - 20)  # fails with probability 2^-20 per slot
            fractions.append(mask / 2 ** (s.bound + STAT_BITS))
        views.append(view)
        assert _cells(req)[("seg", "count", vocab[0])].result == oracle[("seg", "count", vocab[0])]
        # the only ciphertexts the partner decrypts are its own-key MaskedSum; GatePowers is
        # under the brand's key
        kinds = [decode(w).kind for w in log]
        assert kinds.count("masked_sum") == 1 and kinds.count("gate_powers") == 1
        assert "decrypted" not in kinds
    assert all(x != y for x, y in zip(*views))  # fresh masks per run
    assert len(fractions) == 2 * 33
    assert abs(sum(fractions) / len(fractions) - 0.5) < 0.15  # mean of 66 uniforms: σ ≈ 0.036


def test_profile_wire_has_no_values(key, brand_key) -> None:
    b, vals = _data(60)
    log: list[bytes] = []
    _run([f"u{i}" for i in range(100, 140)], b, vals, ProfileSpec(categorical=("city",), k_min=1), key, brand_key, log)
    blob = b"".join(log)
    for x in b:
        assert x.encode() not in blob
    assert b"lhasa" in blob  # the layout (vocabulary) is in Ready: positive control of the scan
    assert sum(isinstance(decode(w), MaskedSum) for w in log) == 1


def test_profile_refuses_columns_outside_the_agreement_and_bad_values(key, brand_key) -> None:
    b, vals = _data(20)
    p = SessionParams("p", "agr", "job", "phone", Mode.profile)
    req = ProfileRequester(p, PreparedItems.from_values("phone", ["u1"]), ProfileSpec(categorical=("income",)),
                           paillier_key=brand_key)
    resp = ProfileResponder(p, PreparedItems.from_values("phone", b), vals, ProfileSpec(categorical=("city",)), paillier_key=key)
    with pytest.raises(ProtocolError, match="columns"):
        resp.handle(decode(encode(req.hello())))
    with pytest.raises(ValidationError, match="range|lie in"):
        ProfileResponder(p, PreparedItems.from_values("phone", ["x"]), {"spend": [-5]},
                         ProfileSpec(numeric=("spend",)), paillier_key=key)
    with pytest.raises(ValidationError, match="k_min"):
        ProfileRequester(p, PreparedItems.from_values("phone", ["u1"]), ProfileSpec(categorical=("city",), k_min=0),
                         paillier_key=brand_key)


def test_profile_agreed_vocabulary_hides_the_partners_own(key, brand_key) -> None:
    b, vals = _data(120)
    spec = ProfileSpec(categorical=("city",), k_min=1, categories={"city": ("bj", "sh")})
    req, _ = _run([f"u{i}" for i in range(100, 220)], b, vals, spec, key, brand_key)
    got = {c.value: c.result for c in _cells(req).values()}
    assert set(got) == {"bj", "sh", "__other__"}
    assert sum(got.values()) == 120


def _until_gate(req: ProfileRequester, resp: ProfileResponder) -> tuple[MaskedSum, GatePowers]:
    """Run the exchange until the requester emits its MaskedSum and GatePowers; hold them back."""
    to_resp: list[Message] = [req.hello(), *req.round_one()]
    to_req: list[Message] = []
    held: list[Message] = []
    while to_resp or to_req:
        while to_resp:
            m = to_resp.pop(0)
            if isinstance(m, (MaskedSum, GatePowers)):
                held.append(m)
                continue
            to_req.extend(resp.handle(decode(encode(m))))
        while to_req:
            to_resp.extend(req.handle(decode(encode(to_req.pop(0)))))
    masked, powers = held
    assert isinstance(masked, MaskedSum) and isinstance(powers, GatePowers)
    return masked, powers


def _snap(role: Any, secret: str) -> bytes:
    return pickle.dumps({k: v for k, v in vars(role).items() if k not in ("executor", secret)})


def _refused(role: Any, secret: str, bad: list[Any]) -> None:
    snap = _snap(role, secret)
    for m in bad:
        with pytest.raises(ProtocolError):
            role.handle(decode(encode(m)) if not isinstance(m, bytes) else decode(m))
        assert _snap(role, secret) == snap


def test_bad_gate_messages_refused_without_state_change(key, brand_key) -> None:
    b, vals = _data(80)
    spec = ProfileSpec(categorical=("city",), numeric=("spend",), k_min=3)
    req, resp = _roles([f"u{i}" for i in range(100, 130)], b, vals, spec, key, brand_key)
    masked, powers = _until_gate(req, resp)
    env = {"mode": masked.mode, "session": "p"}
    _refused(resp, "_priv", [
        MaskedSum(**env, seq=masked.seq, data=masked.data[:-1]),
        MaskedSum(**env, seq=masked.seq, data=b"\x00" * len(masked.data)),
        MaskedSum(**env, seq=masked.seq + 1, data=masked.data),
        powers,  # before the masked sum
    ])
    assert resp.handle(decode(encode(masked))) == []
    w = cipher_bytes(int(powers.paillier_n))
    one_gate = w * (spec.k_min + 1)
    lowered = powers.model_copy(update={"k_min": 1, "data": b"".join(
        powers.data[g * one_gate : g * one_gate + 2 * w] for g in range(powers.gates))})
    wire = encode(powers)
    _refused(resp, "_priv", [
        masked,  # replayed
        lowered,  # the brand cannot lower the partner's k_min
        powers.model_copy(update={"gates": powers.gates - 1, "data": powers.data[:-one_gate]}),
        powers.model_copy(update={"data": b"\x00" * len(powers.data)}),
        wire[:-1],  # truncated: its header's data length does not match
    ])
    with pytest.raises(ValueError):  # the message itself checks the payload against its header
        GatePowers(**env, seq=powers.seq, paillier_n=powers.paillier_n, k_min=3, gates=powers.gates,
                   data=powers.data[:-w])
    (gated,) = resp.handle(decode(encode(powers)))
    assert isinstance(gated, GatedValues)
    wb = cipher_bytes(int(brand_key.public_key.n))
    _refused(req, "_key", [
        gated.model_copy(update={"seq": gated.seq + 1}),
        gated.model_copy(update={"data": gated.data[:-wb] + b"\x00" * wb}),  # a v outside Z*
        gated.model_copy(update={"slots": gated.slots - 1, "data": gated.data[:-wb]}),
        gated.model_copy(update={"data": gated.data[wb:] + gated.data[:wb]}),  # shuffled: opens garbage
    ])
    exchange(req, resp, req.handle(decode(encode(gated))))
    assert req.done and resp.done and req.result is not None and req.result.intersection_size == 30
    assert _cells(req)[("city", "count", "bj")].result == sum(
        1 for i in range(30) if vals["city"][i] == "bj")


def test_gate_message_sizes_are_checked_on_decode(brand_key) -> None:
    n = int(brand_key.public_key.n)
    w = cipher_bytes(n)
    ok = GatePowers(mode=Mode.profile, session="s", seq=3, paillier_n=str(n), k_min=2, gates=2, data=b"\x01" * (6 * w))
    assert decode(encode(ok)) == ok
    wire = encode(ok)
    for bad in (wire.replace(b'"gates":2', b'"gates":3'), wire.replace(b'"k_min":2', b'"k_min":1')):
        with pytest.raises(ProtocolError, match="malformed"):
            decode(bad)
    small = GatePowers.model_construct(mode=Mode.profile, session="s", seq=3, paillier_n="1000001", k_min=0,
                                       gates=1, data=b"\x01" * cipher_bytes(1000001))
    with pytest.raises(ProtocolError, match="paillier_n"):
        decode(encode(small))
    gv = GatedValues(mode=Mode.profile, session="s", seq=4, gates=1, slots=2, data=b"\x02" * (3 * w))
    assert decode(encode(gv)) == gv
    with pytest.raises(ProtocolError, match="malformed"):
        decode(encode(GatedValues.model_construct(mode=Mode.profile, session="s", seq=4, gates=1, slots=2,
                                                  data=b"\x02" * (3 * w + 1))))
