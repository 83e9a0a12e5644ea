"""PSI wire form, and bad messages: malformed, oversized, replayed, out of order → ProtocolError,
with the role left exactly as it was (it then completes the session correctly)."""

from __future__ import annotations

import json
import pickle
import struct
from typing import Any

import pytest

from confide.errors import ProtocolError
from psi.inputs import PreparedItems
from psi.messages import (
    MAX_CHUNK_ROWS,
    Decrypted,
    Hello,
    MaskedSum,
    Mode,
    Points,
    Ready,
    Result,
    Stream,
    decode,
    encode,
)
from psi.roles import Requester, Responder, SessionParams
from tests.test_psi_protocol import exchange, phones

SAMPLES = [
    Hello(mode=Mode.match, session="s", seq=0, agreement_id="a", job_id="j", id_type="phone",
          count=3, join_salt="00" * 32),
    Ready(mode=Mode.profile, session="s", seq=0, count=5, paillier_n="12345",
          layout=[("city", "count", "bj")], slot_bits=64, ciphers_per_row=1),
    Points(mode=Mode.cardinality, session="s", seq=3, stream=Stream.resp_tags, offset=16,
           final=True, data=bytes(range(256)) * 2),
    Result(mode=Mode.cardinality, session="s", seq=9, intersection_size=None),
    MaskedSum(mode=Mode.profile, session="s", seq=4, data=b"\x01" * 512),
    Decrypted(mode=Mode.profile, session="s", seq=5, values=["1", "2"]),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.kind)
def test_round_trip(msg: Any) -> None:
    assert decode(encode(msg)) == msg


def test_points_are_raw_bytes_on_the_wire() -> None:
    data = b"\x07" * (32 * 100)
    w = encode(Points(mode=Mode.cardinality, session="s", seq=1, stream=Stream.req_single,
                      offset=0, final=True, data=data))
    assert w.endswith(data) and len(w) - len(data) < 200


def _header(msg: Any, **changes: Any) -> bytes:
    w = encode(msg)
    (hlen,) = struct.unpack(">I", w[4:8])
    h = json.loads(w[8 : 8 + hlen])
    h.update(changes)
    hb = json.dumps(h).encode()
    return w[:4] + struct.pack(">I", len(hb)) + hb + w[8 + hlen :]


@pytest.mark.parametrize(
    "wire,match",
    [
        (b"XXXX" + encode(SAMPLES[3])[4:], "magic"),
        (encode(SAMPLES[3])[:10], "truncated"),
        (b"CPSI" + struct.pack(">I", 5) + b"{nope", "JSON"),
        (_header(SAMPLES[3], version=2), "version"),
        (_header(SAMPLES[3], kind="bogus"), "malformed"),
        (_header(SAMPLES[3], extra="x"), "malformed"),
        (_header(SAMPLES[3], seq=-1), "malformed"),
        (encode(SAMPLES[2]) + b"\x00", "length"),
        (encode(SAMPLES[3]) + b"", None),
    ],
)
def test_decode_rejects_malformed(wire: bytes, match: str | None) -> None:
    if match is None:
        decode(wire)
        return
    with pytest.raises(ProtocolError, match=match):
        decode(wire)


def test_decode_rejects_oversized() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(encode(SAMPLES[2]), max_bytes=100)


def _snapshot(role: Any) -> bytes:
    return pickle.dumps({k: v for k, v in vars(role).items() if k != "executor"})


def _pair(mode: Mode = Mode.cardinality) -> tuple[Requester, Responder]:
    p = SessionParams("s", "agr", "job", "phone", mode)
    return (Requester(p, PreparedItems.from_values("phone", phones(range(0, 12))), chunk_rows=4),
            Responder(p, PreparedItems.from_values("phone", phones(range(6, 20))), chunk_rows=4))


def _bad_variants(good: Points) -> list[tuple[str, Any]]:
    base = dict(mode=good.mode, session=good.session, seq=good.seq, stream=good.stream,
                offset=good.offset, final=good.final, data=good.data)
    return [
        ("replayed", Points(**{**base, "seq": good.seq - 1})),
        ("out of order", Points(**{**base, "seq": good.seq + 1})),
        ("session", Points(**{**base, "session": "other"})),
        ("mode", Points(**{**base, "mode": Mode.match})),
        ("expected row", Points(**{**base, "offset": good.offset + 4})),
        ("multiple of 32", Points(**{**base, "data": good.data[:-1]})),
        ("low order", Points(**{**base, "data": b"\x00" * 32 + good.data[32:]})),
        ("exceeds the limit", Points(**{**base, "data": b"\x09" * 32 * (MAX_CHUNK_ROWS + 1)})),
        ("more than", Points(**{**base, "data": good.data * 3})),
        ("ends after", Points(**{**base, "final": True, "data": good.data[:32]})),
        ("not expected", Points(**{**base, "stream": Stream.req_tags, "data": b"\x01" * 8})),
        ("expected req_single", Result(mode=good.mode, session=good.session, seq=good.seq)),
    ]


def test_responder_rejects_bad_chunks_without_state_change() -> None:
    req, resp = _pair()
    first = [req.hello(), *req.round_one()]
    to_req = resp.handle(decode(encode(first[0])))  # hello
    to_req += resp.handle(decode(encode(first[1])))  # chunk 0
    good = first[2]
    assert isinstance(good, Points)
    before = _snapshot(resp)
    for want, bad in _bad_variants(good):
        with pytest.raises(ProtocolError, match=want):
            resp.handle(decode(encode(bad)))
            pytest.fail(f"accepted a message that should fail with {want!r}")
        assert _snapshot(resp) == before, want
    # a replay of an accepted message is refused too
    with pytest.raises(ProtocolError, match="replayed"):
        resp.handle(decode(encode(first[1])))
    assert _snapshot(resp) == before
    # and the session still completes correctly
    for m in to_req:
        req.handle(decode(encode(m)))
    exchange(req, resp, first[2:])
    assert req.outcome is not None and req.outcome.intersection_size == 6


def test_requester_rejects_out_of_order_and_early_messages() -> None:
    req, resp = _pair(Mode.match)
    hello = req.hello()
    replies = resp.handle(decode(encode(hello)))  # Ready + resp_single chunks
    before = _snapshot(req)
    with pytest.raises(ProtocolError, match="out of order"):
        req.handle(decode(encode(replies[1])))  # a chunk before Ready
    with pytest.raises(ProtocolError, match="already sent"):
        req.hello()
    assert _snapshot(req) == before
    ready = replies[0]
    assert isinstance(ready, Ready)
    bad_ready = Ready(mode=ready.mode, session=ready.session, seq=0, count=ready.count, join_salt="zz")
    with pytest.raises(ProtocolError, match="hex"):
        req.handle(decode(encode(bad_ready)))
    assert _snapshot(req) == before
    rest = req.round_one()
    for m in replies:
        req.handle(decode(encode(m)))
    exchange(req, resp, rest)
    assert req.done and resp.done
    with pytest.raises(ProtocolError):
        resp.handle(decode(encode(rest[0])))


def test_responder_refuses_a_hello_for_another_job() -> None:
    _, resp = _pair()
    h = Hello(mode=Mode.cardinality, session="s", seq=0, agreement_id="agr", job_id="other",
              id_type="phone", count=1)
    before = _snapshot(resp)
    with pytest.raises(ProtocolError, match="job"):
        resp.handle(decode(encode(h)))
    assert _snapshot(resp) == before
