"""The arbiter's Paillier key per agreement (coordinator.arbiter_keys): stable across jobs and
parties of one agreement, different between agreements, rotated by age, private half sealed at
rest, published only to parties of an active agreement that allows training."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator import arbiter_keys
from coordinator.storage.models import ArbiterKeyRecord
from confide.db import session_scope
from confide.errors import AgreementError, NotFound, ValidationError
from federated import paillier as pl
from tests.helpers import spec
from tests.test_coordinator import active_agreement, client, coord, register, sign  # noqa: F401 - fixture

KEY = "/v1/agreements/{}/arbiter-key?bits=1024"


@pytest.fixture(autouse=True)
def _short_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONFIDE_TEST_SHORT_KEYS", "1")  # 1024-bit keys keep these tests fast


def _coordinator(coord):  # type: ignore[no-untyped-def]
    return coord[0].state.coordinator


def test_one_key_per_agreement_shared_by_its_parties_and_rotated_by_age(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    active_agreement(coord, pki_dir, jobs=("train",))
    brand = client(coord, pki_dir, "brand").get(KEY.format("coffee-2026"))
    partner = client(coord, pki_dir, "partner").get(KEY.format("coffee-2026"))
    assert brand == partner and brand["key_bits"] == 1024 and int(brand["n"]).bit_length() == 1024
    assert client(coord, pki_dir, "brand").get(KEY.format("coffee-2026"))["key_id"] == brand["key_id"]
    # Another agreement between the same parties: another key.
    doc = client(coord, pki_dir, "brand").post("/v1/agreements", {"spec": spec("tea-2026", jobs=("train",))})
    sign(coord, pki_dir, "brand", doc)
    sign(coord, pki_dir, "partner", doc)
    tea = client(coord, pki_dir, "partner").get(KEY.format("tea-2026"))
    assert tea["n"] != brand["n"] and tea["key_id"] != brand["key_id"]

    created = dt.datetime.fromisoformat(brand["created_at"])
    assert dt.datetime.fromisoformat(brand["expires_at"]) - created == dt.timedelta(days=7)  # the default
    c = _coordinator(coord)
    c.settings.arbiter_key_max_age_s = 3600.0
    again = client(coord, pki_dir, "brand").get(KEY.format("coffee-2026"))
    assert again["key_id"] == brand["key_id"]
    assert dt.datetime.fromisoformat(again["expires_at"]) - created == dt.timedelta(hours=1)
    # Past its age the next request makes a new key; a job then uses the new one.
    later = created + dt.timedelta(hours=1, seconds=1)
    rec, made = arbiter_keys.current(c, "coffee-2026", 1024, now=later)
    assert made and rec.id != brand["key_id"] and rec.n != brand["n"]
    key_id, (pub, priv) = arbiter_keys.for_job(c, "coffee-2026", 1024)
    assert key_id == rec.id and str(pub.n) == rec.n
    # The sweep deletes keys a day past their age, not the current one.
    assert arbiter_keys.sweep(c, now=created + dt.timedelta(hours=25, seconds=2)) == 2  # coffee's first, tea's
    with session_scope(c.factory) as s:
        left = {r.id for r in s.scalars(select(ArbiterKeyRecord))}
    assert left == {rec.id}


def test_the_private_half_is_sealed_at_rest_and_bound_to_its_key_id(coord, pki_dir: Path) -> None:  # type: ignore[no-untyped-def]
    active_agreement(coord, pki_dir, jobs=("train",))
    pub_view = client(coord, pki_dir, "brand").get(KEY.format("coffee-2026"))
    c = _coordinator(coord)
    with session_scope(c.factory) as s:
        rec = s.scalars(select(ArbiterKeyRecord)).one()
        s.expunge(rec)
    pub, priv = arbiter_keys.keypair(c, rec)
    assert str(pub.n) == pub_view["n"] == rec.n
    sealed = bytes(rec.sealed)
    for secret in (priv.p, priv.q):
        assert str(secret).encode() not in sealed
        assert secret.to_bytes((secret.bit_length() + 7) // 8, "big") not in sealed
    # The key opens: a ciphertext under the published n decrypts.
    pool = pl.ObfuscatorPool(pl.PublicKey(int(pub_view["n"])))
    assert pl.decrypt(priv, pl.encrypt(pub, [12345, -7], pool)) == [12345, pub.n - 7]
    # Sealed under its own id: swapped between records, or altered, it does not open.
    with pytest.raises(AgreementError, match="does not open"):
        arbiter_keys.unseal(c, "another-key-id", sealed)
    with pytest.raises(AgreementError, match="does not open"):
        arbiter_keys.unseal(c, rec.id, sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_only_parties_of_an_active_training_agreement_get_the_key(coord, pki_dir: Path,  # type: ignore[no-untyped-def]
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    active_agreement(coord, pki_dir, jobs=("train",))
    register(coord, pki_dir, "partner2")
    with pytest.raises(AgreementError, match="not a party"):
        client(coord, pki_dir, "partner2").get(KEY.format("coffee-2026"))
    with pytest.raises(NotFound, match="no active version"):
        client(coord, pki_dir, "brand").get(KEY.format("nope-2026"))
    # Proposed (not signed by everyone): no key yet.
    doc = client(coord, pki_dir, "brand").post("/v1/agreements", {"spec": spec("tea-2026", jobs=("train",))})
    sign(coord, pki_dir, "brand", doc)
    with pytest.raises(NotFound, match="no active version"):
        client(coord, pki_dir, "brand").get(KEY.format("tea-2026"))
    # Active, but no training job allowed: no key.
    doc = client(coord, pki_dir, "brand").post("/v1/agreements", {"spec": spec("stats-2026")})
    sign(coord, pki_dir, "brand", doc)
    sign(coord, pki_dir, "partner", doc)
    with pytest.raises(AgreementError, match="allows no training"):
        client(coord, pki_dir, "brand").get(KEY.format("stats-2026"))
    with pytest.raises(ValidationError, match="multiple of 256"):
        client(coord, pki_dir, "brand").get("/v1/agreements/coffee-2026/arbiter-key?bits=1000")
    with pytest.raises(ValidationError):
        client(coord, pki_dir, "brand").get("/v1/agreements/coffee-2026/arbiter-key?bits=many")
    monkeypatch.delenv("CONFIDE_TEST_SHORT_KEYS")
    with pytest.raises(ValidationError, match="for tests only"):
        client(coord, pki_dir, "brand").get(KEY.format("coffee-2026"))
    with session_scope(_coordinator(coord).factory) as s:
        assert s.scalars(select(ArbiterKeyRecord)).all() == []
