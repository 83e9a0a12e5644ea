"""Paillier recipes and wire types of vertical training.

Keys are 1024 bits: these tests check arithmetic and encodings, not key strength.
"""

from __future__ import annotations

import random
import struct

import pytest

from confide.canonical import canonical_json
from confide.errors import ProtocolError, ValidationError
from federated import messages as m
from federated import paillier as pl
from federated.executor import InProcessExecutor


@pytest.fixture(scope="module")
def keys() -> tuple[pl.PublicKey, pl.PrivateKey]:
    return pl.generate_keypair(1024)


def test_encrypt_decrypt_add_scalar(keys: tuple[pl.PublicKey, pl.PrivateKey]) -> None:
    pub, priv = keys
    pool = pl.ObfuscatorPool(pub)
    pool.fill(8)
    assert len(pool) == 8
    a, b = pl.encrypt(pub, [-17, 123456789], pool)
    assert len(pool) == 6
    assert [pl.signed(pub, v) for v in pl.decrypt(priv, [a, b])] == [-17, 123456789]
    assert pl.signed(pub, pl.decrypt(priv, [pl.add(pub, a, b)])[0]) == 123456772
    assert pl.signed(pub, pl.decrypt(priv, [pl.add_plain(pub, a, -3)])[0]) == -20
    assert pl.signed(pub, pl.decrypt(priv, [pl.mul_scalar(pub, a, -5)])[0]) == 85
    r = pl.rerandomize(pub, a, pool)
    assert r != a and pl.decrypt(priv, [r]) == pl.decrypt(priv, [a])


def test_crt_decryption_matches_phe(keys: tuple[pl.PublicKey, pl.PrivateKey]) -> None:
    from phe import paillier

    pub, priv = keys
    ppub = paillier.PaillierPublicKey(pub.n)
    psk = paillier.PaillierPrivateKey(ppub, priv.p, priv.q)
    c = ppub.raw_encrypt(424242)
    assert pl.decrypt(priv, [c]) == [psk.raw_decrypt(c)] == [424242]


def test_packed_multi_exponentiation_equals_weighted_sums(keys: tuple[pl.PublicKey, pl.PrivateKey]) -> None:
    pub, priv = keys
    rnd = random.Random(7)
    rows = [[rnd.randint(-(2**22), 2**22) for _ in range(5)] for _ in range(300)]
    exps = [rnd.randint(-(2**31), 2**31) for _ in range(300)]
    slot = 80
    cs = pl.encrypt_parallel(pub, [pl.pack(r, slot) for r in rows], InProcessExecutor(), batch=64)
    c = pl.multi_exp(pub, cs, exps, InProcessExecutor())
    got = pl.unpack(pl.signed(pub, pl.decrypt(priv, [c])[0]), 5, slot)
    assert got == [sum(r[j] * e for r, e in zip(rows, exps)) for j in range(5)]


def test_packed_exponents_turn_a_scalar_ciphertext_into_a_packed_row(keys: tuple[pl.PublicKey, pl.PrivateKey]) -> None:
    """[[x]]^{pack(row)} = [[x row_1, ..., x row_k]] packed, signs mixed; then a multi-exp of
    such rows gives the weighted sums slot by slot."""
    pub, priv = keys
    rnd = random.Random(11)
    xs = [rnd.randint(0, 2**20) for _ in range(300)]
    rows = [[rnd.randint(-(2**20), 2**20) for _ in range(6)] for _ in range(300)]
    slot = 100
    cs = pl.encrypt_parallel(pub, xs, InProcessExecutor(), batch=128)
    packed = pl.pow_each(pub, cs, [pl.pack(r, slot) for r in rows], InProcessExecutor(), batch=64)
    assert pl.unpack(pl.signed(pub, pl.decrypt(priv, [packed[0]])[0]), 6, slot) == [xs[0] * v for v in rows[0]]
    us = [rnd.randint(-(2**30), 2**30) for _ in range(300)]
    got = pl.unpack(pl.signed(pub, pl.decrypt(priv, [pl.multi_exp(pub, packed, us)])[0]), 6, slot)
    assert got == [sum(x * r[j] * u for x, r, u in zip(xs, rows, us)) for j in range(6)]
    with pytest.raises(ValidationError):
        pl.pow_each(pub, cs[:3], [1, 2])


def test_unpack_detects_overflow_and_fixed_point_rejects_nan() -> None:
    assert pl.unpack(pl.pack([-1, 2, -3], 16), 3, 16) == [-1, 2, -3]
    with pytest.raises(ProtocolError):
        pl.unpack(pl.pack([1, 2, 3], 16), 2, 16)
    with pytest.raises(ValidationError):
        pl.encode_fixed([float("nan")], 16)
    assert pl.encode_fixed([0.5, -0.25], 4) == [8, -4]


def test_short_keys_and_bad_private_keys_are_refused(keys: tuple[pl.PublicKey, pl.PrivateKey]) -> None:
    with pytest.raises(ValidationError):
        pl.generate_keypair(512)
    pub, priv = keys
    with pytest.raises(ValidationError):
        pl.PrivateKey(pub, priv.p, priv.p)


def test_serialisation_bounds(keys: tuple[pl.PublicKey, pl.PrivateKey]) -> None:
    pub, _ = keys
    data = pl.to_bytes([1, 2, 3], pub.cipher_bytes)
    assert pl.from_bytes(data, pub.cipher_bytes, bound=pub.nsquare) == [1, 2, 3]
    with pytest.raises(ProtocolError):
        pl.from_bytes(data[:-1], pub.cipher_bytes)
    with pytest.raises(ProtocolError):
        pl.from_bytes(b"\xff" * pub.cipher_bytes, pub.cipher_bytes, bound=pub.nsquare)


def _one_of_each() -> list[m._Msg]:
    base = {"job_id": "j", "sender": "s"}
    dg = "ab" * 32
    return [
        m.ArbiterKey(**base, n="12345", key_bits=2048, config_digest=dg),
        m.PartyHello(**base, role="host", rows=10, rows_digest=dg, features=3, slot_bits=80, ciphers_per_row=1,
                     config_digest=dg, mask_seed="00" * 32),
        m.FeatureCiphers(**base, offset=0, rows=2, final=True, data=b"\x01" * 1024),
        m.GuestGradPart(**base, epoch=1, batch=2, data=b"\x02" * 512),
        m.HostGradPart(**base, epoch=1, batch=2, data=b"\x03" * 512),
        m.DecryptRequest(**base, epoch=0, batch=0, data=b"\x04" * 512),
        m.DecryptReply(**base, epoch=0, batch=0, data=b"\x05" * 256),
        m.LossShare(**base, epoch=3, share=str(2**127)),
        m.EpochDone(**base, epoch=3, loss=0.5, stop=True, reason="converged"),
        m.ScoreShare(**base, request_id="r", rows=2, data=b"\x06" * 16),
        m.Scores(**base, request_id="r", rows=2, data=b"\x07" * 16),
        m.WeightCiphers(**base, offset=0, rows=2, final=True, data=b"\x08" * 512),
    ]


def test_every_message_round_trips_through_its_wire_form() -> None:
    msgs = _one_of_each()
    assert sorted(x.kind for x in msgs) == sorted(m.ALL_KINDS)
    for msg in msgs:
        wire = m.encode(msg)
        assert wire[:4] == m.MAGIC
        assert m.decode(wire) == msg
    # compact: a 512-byte ciphertext costs 512 bytes plus a small header
    assert len(m.encode(msgs[3])) < 512 + 200


def test_malformed_wire_is_refused() -> None:
    good = m.encode(_one_of_each()[3])
    with pytest.raises(ProtocolError, match="magic"):
        m.decode(b"XXXX" + good[4:])
    with pytest.raises(ProtocolError, match="length"):
        m.decode(good[:-1])
    with pytest.raises(ProtocolError, match="version"):
        m.decode(good.replace(b'"version":1', b'"version":2'))
    loss = _one_of_each()[7]
    header = canonical_json({**loss.model_dump(mode="json"), "data_len": 3})
    with pytest.raises(ProtocolError, match="payload its kind does not have"):
        m.decode(m.MAGIC + struct.pack(">I", len(header)) + header + b"abc")
    with pytest.raises(ProtocolError):
        m.decode(good.replace(b'"epoch":1', b'"epoch":-1'))


def test_an_obfuscator_pool_hands_each_value_out_once_across_threads() -> None:
    """A node's idle-time stock is shared by its jobs' threads: no value may go out twice
    (two ciphertexts with one r^n reveal the difference of their plaintexts)."""
    import threading

    pub, _ = pl.generate_keypair(1024)
    pool = pl.ObfuscatorPool(pub)
    pool.put([pl.mpz(v) for v in range(2, 4002)])  # distinct stand-ins: this tests the bookkeeping
    got: list[list[int]] = []

    def drain() -> None:
        mine: list[int] = []
        while True:
            part = pool.take_upto(7)
            if not part:
                break
            mine.extend(int(v) for v in part)
        got.append(mine)

    threads = [threading.Thread(target=drain) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [v for mine in got for v in mine]
    assert len(taken) == 4000 and set(taken) == set(range(2, 4002)) and len(pool) == 0
    # An empty pool computes what it lacks: take() always returns `count` fresh values.
    fresh = pool.take(3)
    assert len(fresh) == 3 and len({int(v) for v in fresh}) == 3 and pool.generated == 3
