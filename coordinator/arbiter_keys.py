"""The arbiter's Paillier keys, one per agreement and key size, rotated by age.

Why not a fresh key per job: a party encrypts every training row once per job, and at 2048
bits the random part of each ciphertext, `r^n mod n^2`, is most of the cost (docs/vfl.md §3).
That part depends only on the public key, so a node can compute a stock of them while it is
idle — if it knows the key before the job starts. The coordinator therefore keeps one key per
(agreement, key size) and publishes its public half to the agreement's parties:

    GET /v1/agreements/{agreement_id}/arbiter-key?bits=2048
        -> {"key_id", "agreement_id", "n", "key_bits", "created_at", "expires_at"}

Only parties of an *active* agreement get it; a key is used by that agreement's training jobs
until it is `arbiter_key_max_age_s` old (default 7 days), then a new one is made on the next
request and the old one is kept until its last job ended (its private half sits in the sealed
epoch snapshots of running jobs anyway). Each obfuscator is still used for one ciphertext only
(the node's stock hands each out once), so sharing the key across jobs does not weaken a
ciphertext; what it changes is written down in docs/vfl.md §2: a ciphertext from one job of the
agreement decrypts under another job of the same agreement (the per-batch decryption budget and
the masks apply per job as before), never under another agreement's key.

The private half is stored sealed: AES-256-GCM under a key derived (HKDF) from the coordinator's
identity key, the key id bound as associated data — the same protection as the arbiter's epoch
snapshots.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import uuid
from typing import Any

from sqlalchemy import select

from confide.db import session_scope
from confide.errors import AgreementError, NotFound, ValidationError

DEFAULT_MAX_AGE_S = 7 * 86_400.0
_MAKE_LOCK = threading.Lock()  # one key generation at a time per coordinator process


def derived_key(coord: Any, info: bytes) -> bytes:
    """A 256-bit key for sealing coordinator secrets at rest, derived (HKDF-SHA256) from the
    coordinator's identity key; `info` separates the uses."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    raw = coord.identity.signing_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                   serialization.NoEncryption())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(raw)


def _seal_key(coord: Any) -> bytes:
    return derived_key(coord, b"confide/arbiter-key/v1")


def seal(coord: Any, key_id: str, priv: dict[str, str]) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return nonce + AESGCM(_seal_key(coord)).encrypt(nonce, json.dumps(priv).encode(), key_id.encode())


def unseal(coord: Any, key_id: str, sealed: bytes) -> dict[str, str]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        data = AESGCM(_seal_key(coord)).decrypt(sealed[:12], sealed[12:], key_id.encode())
    except InvalidTag:
        raise AgreementError(f"arbiter key {key_id} does not open with this coordinator's identity key "
                             "(altered, or another identity)") from None
    return dict(json.loads(data))


def _max_age(coord: Any) -> float:
    return float(getattr(coord.settings, "arbiter_key_max_age_s", DEFAULT_MAX_AGE_S))


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def _check_bits(bits: int) -> int:
    from federated import paillier as pl

    if not isinstance(bits, int) or isinstance(bits, bool) or not pl.MIN_KEY_BITS <= bits <= 4096 or bits % 256:
        raise ValidationError(f"key bits must be a multiple of 256 between {pl.MIN_KEY_BITS} and 4096, not {bits!r}",
                              field="bits")
    return bits


def current(coord: Any, agreement_id: str, bits: int, *, now: dt.datetime | None = None) -> tuple[Any, bool]:
    """The agreement's key of `bits` bits that is not older than the maximum age (made if there
    is none). Returns (ArbiterKeyRecord, created)."""
    from federated import paillier as pl

    from coordinator.service import record
    from coordinator.storage.models import ArbiterKeyRecord

    _check_bits(bits)
    now = now or dt.datetime.now(dt.timezone.utc)
    cutoff = now - dt.timedelta(seconds=_max_age(coord))

    def newest(s: Any) -> Any:
        rec = s.scalars(select(ArbiterKeyRecord).where(ArbiterKeyRecord.agreement_id == agreement_id,
                                                       ArbiterKeyRecord.key_bits == bits)
                        .order_by(ArbiterKeyRecord.created_at.desc()).limit(1)).first()
        if rec is not None and _aware(rec.created_at) > cutoff:
            s.expunge(rec)
            return rec
        return None

    with session_scope(coord.factory) as s:
        rec = newest(s)
    if rec is not None:
        return rec, False
    with _MAKE_LOCK:
        with session_scope(coord.factory) as s:  # made by another thread meanwhile?
            rec = newest(s)
        if rec is not None:
            return rec, False
        pub, priv = pl.generate_keypair(bits)
        key_id = str(uuid.uuid4())
        rec = ArbiterKeyRecord(id=key_id, agreement_id=agreement_id, key_bits=bits, n=str(pub.n),
                               sealed=seal(coord, key_id, priv.to_dict()), created_at=now)
        with session_scope(coord.factory) as s:
            s.add(rec)
            record(s, "arbiter_key.created", None, key_id=key_id, agreement_id=agreement_id, key_bits=bits)
            s.flush()
            s.expunge(rec)
    return rec, True


def public_view(coord: Any, rec: Any) -> dict[str, Any]:
    created = _aware(rec.created_at)
    return {"key_id": rec.id, "agreement_id": rec.agreement_id, "n": rec.n, "key_bits": rec.key_bits,
            "created_at": created.isoformat(),
            "expires_at": (created + dt.timedelta(seconds=_max_age(coord))).isoformat()}


def keypair(coord: Any, rec: Any) -> tuple[Any, Any]:
    """The (public, private) pair of a key record, opened from its seal."""
    from federated import paillier as pl

    priv = pl.PrivateKey.from_dict(unseal(coord, rec.id, bytes(rec.sealed)))
    if str(priv.public.n) != rec.n:
        raise AgreementError(f"arbiter key {rec.id}: the sealed private key does not match the public one")
    return priv.public, priv


def for_job(coord: Any, agreement_id: str, bits: int) -> tuple[str, tuple[Any, Any]]:
    """The key a training job of this agreement uses: the current one."""
    rec, _ = current(coord, agreement_id, bits)
    return rec.id, keypair(coord, rec)


def sweep(coord: Any, *, now: dt.datetime | None = None) -> int:
    """Delete keys past their maximum age by more than a day (no job of theirs can still run:
    the step deadline is far shorter). Returns how many."""
    from sqlalchemy import delete

    from coordinator.storage.models import ArbiterKeyRecord

    now = now or dt.datetime.now(dt.timezone.utc)
    cutoff = now - dt.timedelta(seconds=_max_age(coord) + 86_400.0)
    with session_scope(coord.factory) as s:
        res = s.execute(delete(ArbiterKeyRecord).where(ArbiterKeyRecord.created_at < cutoff))
        return int(res.rowcount or 0)


def published(coord: Any, peer: str, agreement_id: str, bits: int) -> dict[str, Any]:
    """What `GET /v1/agreements/{id}/arbiter-key` answers `peer`: the current public key, if
    `peer` is a party of the agreement's active version and the agreement allows training."""
    from coordinator import service

    _check_bits(bits)
    if bits < 2048 and os.environ.get("CONFIDE_TEST_SHORT_KEYS") != "1":
        raise ValidationError(f"{bits}-bit arbiter keys are for tests only: this coordinator was not started "
                              "with CONFIDE_TEST_SHORT_KEYS=1", field="bits")
    with session_scope(coord.factory) as s:
        try:
            av = service.get_version(s, agreement_id, None)
        except NotFound:
            raise NotFound(f"agreement {agreement_id} has no active version") from None
        doc = service.to_signed(av)
    spec = doc.spec
    if spec.expires_at <= dt.datetime.now(dt.timezone.utc):
        raise AgreementError(f"agreement {agreement_id} v{doc.version} has expired")
    spec.party(peer)  # raises for a non-party
    if not any(rule.type == "train" for rule in spec.allowed_jobs):
        raise AgreementError(f"agreement {agreement_id} allows no training job; it has no arbiter key")
    rec, _ = current(coord, agreement_id, bits)
    return public_view(coord, rec)
