"""The small crypto layer of PSI: hash-to-curve, commutative blinding, tags, shuffles.

Group: X25519 (RFC 7748) through pyca/cryptography (OpenSSL's constant-time ladder; the fastest
maintained binding measured on our machines, see docs/psi.md). Tags (what is compared) are the
first 8 bytes of doubly-blinded points. Elements travel as 32-byte
u-coordinates. Blinding an element by a secret scalar `k` is `X25519(k, u)`; it commutes
(`X25519(a, X25519(b, u)) == X25519(b, X25519(a, u))`) because clamped scalars multiply.

- Hash-to-curve: u = BLAKE2b-256(keyed by the domain, counter || value) with the top bit cleared,
  retried with the next counter until u is the x-coordinate of a point on Curve25519 itself (not
  its twist). Without that check a blinded value would reveal one bit of H(value) (curve or
  twist) to the peer. Every input point is then in the full curve group (order 8·ℓ); clamped
  scalars are multiples of 8, so the first blinding clears the cofactor and everything the peer
  sees lies in the prime-order subgroup.
- Domain separation: the hash key is SHA-256 of the canonical JSON of (protocol version,
  agreement, job, identifier type), so a value hashed for one job or one identifier type never
  equals the same value hashed for another.
- Received points are not trusted: a point that X25519 maps to zero (low order) is a
  ProtocolError; twist points are harmless (Curve25519 is twist-secure and clamping clears the
  twist's cofactor 4), so no on-curve check is needed for them.

All batch functions take and return concatenated 32-byte points (`bytes`), which pickle and
frame cheaply; they are module-level so process pools and Ray can run them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from typing import Callable, Sequence

import gmpy2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from confide.canonical import canonical_json
from confide.errors import ProtocolError

try:  # pyca/cryptography's Rust constructors, without the public wrappers' per-call backend
    # check (1 µs of a 32 µs operation). Same objects, same OpenSSL ladder; pinned version.
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    _from_public = _rust_openssl.x25519.from_public_bytes
    _from_private = _rust_openssl.x25519.from_private_bytes
except (ImportError, AttributeError):  # pragma: no cover - other cryptography versions
    _from_public = X25519PublicKey.from_public_bytes
    _from_private = X25519PrivateKey.from_private_bytes

PROTOCOL_VERSION = 1
POINT_BYTES = 32
TAG_BYTES = 8  # see docs/psi.md "Truncated tags" for the collision bound

_P = 2**255 - 19
_A = 486662
_MASK = (1 << 255) - 1


@dataclass(frozen=True)
class BlindingKey:
    """A secret X25519 scalar, fresh per job and per identifier type. Never leaves its node
    (except to that node's own executor workers)."""

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != 32:
            raise ValueError("a blinding key is 32 bytes")

    @classmethod
    def generate(cls, rng: Callable[[int], bytes] = os.urandom) -> "BlindingKey":
        """A fresh key from `rng` (the OS by default; tests inject a deterministic one)."""
        return cls(rng(32))

    def __repr__(self) -> str:  # never print the secret
        return "BlindingKey(<secret>)"


def domain_key(agreement_id: str, job_id: str, id_type: str) -> bytes:
    """The hash-to-curve key of one (agreement, job, identifier type): 32 bytes."""
    return hashlib.sha256(
        b"confide/psi/h2c\x00"
        + canonical_json(
            {"v": PROTOCOL_VERSION, "agreement": agreement_id, "job": job_id, "id_type": id_type}
        )
    ).digest()


def tag_key(session_id: str) -> bytes:
    """The key under which doubly-blinded points are shortened to tags (domain separation only:
    tags are compared, never inverted)."""
    return hashlib.sha256(b"confide/psi/tag\x00" + session_id.encode()).digest()


def _on_curve(u: int) -> bool:
    rhs = (u * (u * (u + _A) + 1)) % _P
    return bool(gmpy2.jacobi(rhs, _P) == 1)


def hash_to_curve(value: str, dom: bytes) -> bytes:
    """The 32-byte u-coordinate of the curve point for `value` in domain `dom` (unblinded:
    only for tests and the plaintext oracle — never send it)."""
    base = hashlib.blake2b(key=dom, digest_size=32)
    vb = value.encode("utf-8")
    probe = _from_private(b"\x01" * 32)
    for ctr in range(256):
        h = base.copy()
        h.update(bytes((ctr,)) + vb)
        d = h.digest()
        u = int.from_bytes(d, "little") & _MASK
        if u < _P and _on_curve(u):
            out = u.to_bytes(32, "little")
            try:  # low-order points (8 of them) map to zero under every clamped scalar
                probe.exchange(_from_public(out))
            except ValueError:
                continue
            return out
    raise AssertionError("hash_to_curve: 256 counters without a curve point")  # p ≈ 2^-256


def hash_and_blind(values: Sequence[str], dom: bytes, secret: bytes) -> bytes:
    """Hash each value to the curve and blind it with `secret`: concatenated 32-byte points,
    in input order."""
    exchange = _from_private(secret).exchange
    from_pub = _from_public
    base = hashlib.blake2b(key=dom, digest_size=32)
    jacobi = gmpy2.jacobi
    p = gmpy2.mpz(_P)
    out = bytearray(len(values) * 32)
    pos = 0
    for value in values:
        vb = value.encode("utf-8")
        ctr = 0
        while True:
            h = base.copy()
            h.update(bytes((ctr,)) + vb)
            u = int.from_bytes(h.digest(), "little") & _MASK
            ctr += 1
            # Jacobi symbol of u³+Au²+u (GMP reduces mod p itself): 1 ⇔ u is on the curve.
            if u >= _P or jacobi(u * (u * (u + _A) + 1), p) != 1:
                continue
            try:
                out[pos : pos + 32] = exchange(from_pub(u.to_bytes(32, "little")))
            except ValueError:  # low-order point: deterministic, key-independent; next counter
                if ctr > 255:
                    raise
                continue
            break
        pos += 32
    return bytes(out)


def blind(points: bytes, secret: bytes) -> bytes:
    """Blind received points with `secret`. Raises ProtocolError for a malformed length or a
    low-order point (a peer following the protocol never sends one)."""
    if len(points) % 32:
        raise ProtocolError("point payload is not a multiple of 32 bytes")
    exchange = _from_private(secret).exchange
    from_pub = _from_public
    try:
        return b"".join([exchange(from_pub(points[i : i + 32])) for i in range(0, len(points), 32)])
    except ValueError:
        raise ProtocolError("a received point is of low order; refusing it") from None


def blind_to_tags(points: bytes, secret: bytes, key: bytes | None = None) -> bytes:
    """Blind received points and shorten each result to a TAG_BYTES tag (what is compared)."""
    return tags(blind(points, secret), key)


def tags(points: bytes, key: bytes | None = None) -> bytes:
    """The first TAG_BYTES bytes of each 32-byte doubly-blinded point, concatenated.

    The low 64 bits of the u-coordinate of a (pseudo)random point of the prime-order subgroup
    are as good as random, and a tag is only ever compared, so no hash is needed (vectorised:
    no per-point Python call). `key` is accepted for interface stability and unused."""
    if not points:
        return b""
    return np.frombuffer(points, dtype=np.uint8).reshape(-1, 32)[:, :TAG_BYTES].tobytes()


def tags_array(tag_bytes: bytes) -> np.ndarray:
    """Tags as a uint64 array (for sorting and set operations)."""
    return np.frombuffer(tag_bytes, dtype="<u8")


class Shuffler:
    """Random permutations that only need to be unpredictable to the peer (who never sees the
    generator's output): numpy's Philox seeded with 256 bits from the OS, or a test seed."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = np.random.Generator(
            np.random.Philox(seed if seed is not None else secrets.randbits(256))
        )

    def permutation(self, n: int) -> np.ndarray:
        return self._rng.permutation(n)


def permute_rows(data: bytes, width: int, perm: np.ndarray) -> bytes:
    """Rows of `width` bytes reordered so that output row i is input row perm[i]."""
    if not data:
        return data
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    return arr[perm].tobytes()


def unpermute_rows(data: bytes, width: int, perm: np.ndarray) -> bytes:
    """Inverse of `permute_rows` with the same `perm`."""
    if not data:
        return data
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    out = np.empty_like(arr)
    out[perm] = arr
    return out.tobytes()


def join_key(tag: bytes, salt: bytes) -> str:
    """The opaque join key of a matched pair: HMAC-like keyed BLAKE2b of the pair's tag under the
    job's join salt (contributed by both parties), 16 bytes hex. Equal on both sides, different
    across jobs (fresh blinding keys and salts)."""
    return hashlib.blake2b(tag, key=salt[:64], digest_size=16, person=b"confide-join").hexdigest()
