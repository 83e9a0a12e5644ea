"""Paillier recipes for vertical training: the only module that touches `phe` and `gmpy2`.

Speed comes from doing less work per value, never from weaker keys (2048-bit by default):

- **Fixed-point, one small fixed exponent.** Values are integers `round(v * 2**frac_bits)` with
  the same `frac_bits` for a whole vector, so sums need no exponent alignment (phe's default
  encoding picks an exponent per value and pays powmods to align them).
- **Packing.** Several fixed-point values share one plaintext in slots of `slot_bits` bits
  (signed, two's-complement-like carries handled on unpacking): one ciphertext carries all of a
  row's features.
- **Precomputed obfuscators.** `r^n mod n^2`, the expensive part of encryption, is computed ahead
  in batches on the executor's process pool (`ObfuscatorPool.fill`); encrypting is then two
  multiplications.
- **Multi-exponentiation.** `prod_i c_i^{e_i} mod n^2` for short exponents with Pippenger's
  bucket method (shared squarings), split across the executor's workers. `pow_each` raises scalar ciphertexts to packed
  exponents ([[s]] -> [[s x_1, ..., s x_f]] packed), once per row.
- **CRT decryption** with the factors of n.

Ciphertexts and plaintexts are Python ints (gmpy2 `mpz` inside); on the wire they are fixed-width
big-endian bytes (`to_bytes` / `from_bytes`).
"""

from __future__ import annotations

import functools
import math
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import gmpy2
from gmpy2 import mpz
from phe import paillier as _phe

from confide.errors import ProtocolError, ValidationError
from federated.executor import Executor, InProcessExecutor

DEFAULT_KEY_BITS = 2048
MIN_KEY_BITS = 1024  # tests of protocol logic only; production refuses < 2048 (see roles.TrainConfig)


# --------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class PublicKey:
    n: int

    @functools.cached_property
    def nsquare(self) -> Any:
        return mpz(self.n) * mpz(self.n)

    @property
    def bits(self) -> int:
        return int(self.n).bit_length()

    @property
    def cipher_bytes(self) -> int:
        """Width of one serialised ciphertext (an element of Z*_{n^2})."""
        return (2 * self.bits + 7) // 8

    @property
    def plain_bytes(self) -> int:
        return (self.bits + 7) // 8

    @property
    def plain_bits(self) -> int:
        """Signed plaintexts must stay below n/2 in magnitude: usable bits for packing."""
        return self.bits - 2


@dataclass(frozen=True)
class PrivateKey:
    public: PublicKey
    p: int
    q: int
    _crt: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        p, q = mpz(self.p), mpz(self.q)
        if p * q != self.public.n:
            raise ValidationError("Paillier private key does not match its public key")
        g = mpz(self.public.n) + 1
        psq, qsq = p * p, q * q
        hp = gmpy2.invert((gmpy2.powmod(g, p - 1, psq) - 1) // p, p)
        hq = gmpy2.invert((gmpy2.powmod(g, q - 1, qsq) - 1) // q, q)
        object.__setattr__(self, "_crt", (p, q, psq, qsq, hp, hq, gmpy2.invert(p, q)))

    def to_dict(self) -> dict[str, str]:
        """For the arbiter's encrypted-at-rest store (resume after restart). Secret!"""
        return {"n": str(self.public.n), "p": str(self.p), "q": str(self.q)}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> "PrivateKey":
        return cls(PublicKey(int(d["n"])), int(d["p"]), int(d["q"]))


def generate_keypair(bits: int = DEFAULT_KEY_BITS) -> tuple[PublicKey, PrivateKey]:
    """A fresh Paillier key pair (phe's generator, gmpy2-backed). Raises ValidationError for
    keys shorter than MIN_KEY_BITS."""
    if bits < MIN_KEY_BITS:
        raise ValidationError(f"Paillier keys of {bits} bits are too short (minimum {MIN_KEY_BITS})")
    pk, sk = _phe.generate_paillier_keypair(n_length=bits)
    pub = PublicKey(int(pk.n))
    return pub, PrivateKey(pub, int(sk.p), int(sk.q))


# ------------------------------------------------------------------------------ fixed point


def encode_fixed(values: Iterable[float], frac_bits: int) -> list[int]:
    """`round(v * 2**frac_bits)` for each value (floats must be finite)."""
    scale = float(1 << frac_bits)
    out = []
    for v in values:
        if not math.isfinite(v):
            raise ValidationError("cannot encode a non-finite value")
        out.append(int(round(float(v) * scale)))
    return out


def pack(slots: Sequence[int], slot_bits: int) -> int:
    """`sum_j slots[j] * 2**(j*slot_bits)` as a (possibly negative) integer."""
    acc = 0
    for j in reversed(range(len(slots))):
        acc = (acc << slot_bits) + int(slots[j])
    return acc


def unpack(value: int, count: int, slot_bits: int) -> list[int]:
    """Inverse of `pack` for signed slots each of magnitude < 2**(slot_bits-1)."""
    mask = (1 << slot_bits) - 1
    half = 1 << (slot_bits - 1)
    out = []
    v = int(value)
    for _ in range(count):
        s = v & mask
        if s >= half:
            s -= 1 << slot_bits
        out.append(s)
        v = (v - s) >> slot_bits
    if v not in (0,):
        raise ProtocolError("packed value overflowed its slots (fixed-point range exceeded)")
    return out


def slots_per_cipher(pub: PublicKey, slot_bits: int) -> int:
    return max(1, pub.plain_bits // slot_bits)


def signed(pub: PublicKey, m: int) -> int:
    """A plaintext mod n read as a signed integer in (-n/2, n/2]."""
    m = int(m) % pub.n
    return m - pub.n if m > pub.n // 2 else m


# ------------------------------------------------------------------------------ obfuscators


def _obfuscator_batch(n: int, count: int) -> list[Any]:
    n_ = mpz(n)
    n2 = n_ * n_
    out = []
    for _ in range(count):
        r = mpz(secrets.randbelow(n - 2) + 2)
        out.append(gmpy2.powmod(r, n_, n2))
    return out


class ObfuscatorPool:
    """`r^n mod n^2` values computed ahead (on the executor's pool) and used once each.

    `fill(k)` tops the pool up to at least k values; `take(k)` hands out k values, computing
    more if the pool ran dry (in-process, so callers should `fill` ahead of bulk work);
    `take_upto(k)` hands out what there is, at most k; `put(values)` adds values computed
    elsewhere (a node's idle-time stock, `party_node.obfuscator_stock`). Thread-safe: a value
    is handed out once, however many threads take."""

    def __init__(self, pub: PublicKey, executor: Executor | None = None, batch: int = 64) -> None:
        self.pub = pub
        self.executor = executor or InProcessExecutor()
        self.batch = batch
        self._pool: list[Any] = []
        self._lock = threading.Lock()
        self.generated = 0

    def __len__(self) -> int:
        return len(self._pool)

    def fill(self, count: int) -> None:
        need = count - len(self._pool)
        if need <= 0:
            return
        sizes = [self.batch] * (need // self.batch) + ([need % self.batch] if need % self.batch else [])
        fn = functools.partial(_obfuscator_batch, self.pub.n)
        for chunk in self.executor.map_batches(fn, sizes):
            self.put(chunk)
        self.generated += need

    def put(self, values: Sequence[Any]) -> None:
        with self._lock:
            self._pool.extend(values)

    def take_upto(self, count: int) -> list[Any]:
        with self._lock:
            k = min(count, len(self._pool))
            out = self._pool[len(self._pool) - k :] if k else []
            del self._pool[len(self._pool) - k :]
        return out

    def take(self, count: int) -> list[Any]:
        out = self.take_upto(count)
        if len(out) < count:
            missing = count - len(out)
            out.extend(_obfuscator_batch(self.pub.n, missing))
            self.generated += missing
        return out


# --------------------------------------------------------------------------- homomorphic ops


def encrypt(pub: PublicKey, plaintexts: Sequence[int], pool: ObfuscatorPool) -> list[Any]:
    """Encrypt integers (negative ones mod n) with obfuscators from the pool."""
    n = mpz(pub.n)
    n2 = pub.nsquare
    obf = pool.take(len(plaintexts))
    return [((1 + (mpz(int(m)) % n) * n) * r) % n2 for m, r in zip(plaintexts, obf)]


def _encrypt_batch(n: int, plaintexts: list[int]) -> list[Any]:
    n_ = mpz(n)
    n2 = n_ * n_
    out = []
    for m in plaintexts:
        r = mpz(secrets.randbelow(n - 2) + 2)
        out.append(((1 + (mpz(m) % n_) * n_) * gmpy2.powmod(r, n_, n2)) % n2)
    return out


def encrypt_parallel(pub: PublicKey, plaintexts: Sequence[int], executor: Executor, batch: int = 128) -> list[Any]:
    """Encrypt many integers on the executor's workers (obfuscators computed where they are
    used, so nothing but plaintexts and ciphertexts crosses process boundaries)."""
    fn = functools.partial(_encrypt_batch, pub.n)
    chunks = [list(map(int, plaintexts[i : i + batch])) for i in range(0, len(plaintexts), batch)]
    out: list[Any] = []
    for part in executor.map_batches(fn, chunks):
        out.extend(part)
    return out


def add(pub: PublicKey, a: Any, b: Any) -> Any:
    """[[x]], [[y]] -> [[x + y]]."""
    return (mpz(a) * mpz(b)) % pub.nsquare


def add_plain(pub: PublicKey, c: Any, m: int) -> Any:
    """[[x]], m -> [[x + m]] (no fresh randomness: rerandomize before handing it to a party
    that knows the randomness of c)."""
    n = mpz(pub.n)
    return (mpz(c) * (1 + (mpz(int(m)) % n) * n)) % pub.nsquare


def mul_scalar(pub: PublicKey, c: Any, k: int) -> Any:
    """[[x]], k -> [[k x]] (negative k via the inverse, so the exponent stays short)."""
    k = int(k)
    if k >= 0:
        return gmpy2.powmod(mpz(c), k, pub.nsquare)
    return gmpy2.powmod(gmpy2.invert(mpz(c), pub.nsquare), -k, pub.nsquare)


def rerandomize(pub: PublicKey, c: Any, pool: ObfuscatorPool) -> Any:
    """The same plaintext under fresh randomness."""
    return (mpz(c) * pool.take(1)[0]) % pub.nsquare


def _window(count: int, bits: int) -> int:
    best, best_cost = 1, None
    for c in range(1, 17):
        cost = -(-bits // c) * (count + (2 << c))
        if best_cost is None or cost < best_cost:
            best, best_cost = c, cost
    return best


def _pippenger(bases: Sequence[Any], exps: Sequence[int], mod: Any) -> Any:
    """prod bases[i]^exps[i] mod `mod` for non-negative exponents (Pippenger buckets)."""
    pairs = [(mpz(b), int(e)) for b, e in zip(bases, exps) if e]
    if not pairs:
        return mpz(1)
    bits = max(e.bit_length() for _, e in pairs)
    c = _window(len(pairs), bits)
    mask = (1 << c) - 1
    acc = None
    for w in reversed(range(-(-bits // c))):
        if acc is not None:
            for _ in range(c):
                acc = acc * acc % mod
        buckets: list[Any] = [None] * (mask + 1)
        shift = w * c
        for b, e in pairs:
            d = (e >> shift) & mask
            if d:
                x = buckets[d]
                buckets[d] = b if x is None else x * b % mod
        running = None
        total = None
        for d in range(mask, 0, -1):
            x = buckets[d]
            if x is not None:
                running = x if running is None else running * x % mod
            if running is not None:
                total = running if total is None else total * running % mod
        if total is not None:
            acc = total if acc is None else acc * total % mod
    return acc if acc is not None else mpz(1)


def _multi_exp_part(n: int, part: tuple[list[Any], list[int]]) -> tuple[Any, Any]:
    n_ = mpz(n)
    n2 = n_ * n_
    bases, exps = part
    pos_b, pos_e, neg_b, neg_e = [], [], [], []
    for b, e in zip(bases, exps):
        if e > 0:
            pos_b.append(b)
            pos_e.append(e)
        elif e < 0:
            neg_b.append(b)
            neg_e.append(-e)
    return _pippenger(pos_b, pos_e, n2), _pippenger(neg_b, neg_e, n2)


def multi_exp(pub: PublicKey, bases: Sequence[Any], exps: Sequence[int], executor: Executor | None = None,
              min_chunk: int = 512) -> Any:
    """[[sum_i e_i x_i]] = prod_i [[x_i]]^{e_i} mod n^2 for short signed exponents e_i
    (a packed base gives the packed weighted sum, slot by slot). Splits the bases across the
    executor's workers; negative exponents cost one modular inverse in total."""
    if len(bases) != len(exps):
        raise ValidationError("multi_exp: bases and exponents differ in length")
    ex = executor or InProcessExecutor()
    parts = max(1, min(ex.workers, len(bases) // min_chunk))
    size = -(-len(bases) // parts) if bases else 0
    chunks = [(list(bases[i : i + size]), [int(e) for e in exps[i : i + size]]) for i in range(0, len(bases), size or 1)]
    fn = functools.partial(_multi_exp_part, pub.n)
    n2 = pub.nsquare
    pos, neg = mpz(1), mpz(1)
    for p, q in (ex.map_batches(fn, chunks) if parts > 1 else map(fn, chunks)):
        pos = pos * p % n2
        neg = neg * q % n2
    return pos if neg == 1 else pos * gmpy2.invert(neg, n2) % n2


def _pow_part(n: int, part: tuple[list[Any], list[int]]) -> list[Any]:
    n2 = mpz(n) * mpz(n)
    return [gmpy2.powmod(mpz(b), int(e), n2) for b, e in zip(*part)]


def pow_each(pub: PublicKey, bases: Sequence[Any], exps: Sequence[int], executor: Executor | None = None,
             batch: int = 256) -> list[Any]:
    """[[e_i x_i]] = [[x_i]]^{e_i} for every i (e_i may be a long packed exponent, or negative),
    on the executor's workers. The results carry the bases' randomness: rerandomize before
    handing them to a party that holds the bases."""
    if len(bases) != len(exps):
        raise ValidationError("pow_each: bases and exponents differ in length")
    ex = executor or InProcessExecutor()
    chunks = [(list(bases[i : i + batch]), [int(e) for e in exps[i : i + batch]]) for i in range(0, len(bases), batch)]
    out: list[Any] = []
    for part in ex.map_batches(functools.partial(_pow_part, pub.n), chunks):
        out.extend(part)
    return out


def decrypt(priv: PrivateKey, ciphertexts: Iterable[Any]) -> list[int]:
    """Plaintexts in [0, n) via CRT (two half-size exponentiations per value)."""
    p, q, psq, qsq, hp, hq, pinv = priv._crt
    out = []
    for c in ciphertexts:
        c = mpz(c)
        mp = (gmpy2.powmod(c, p - 1, psq) - 1) // p * hp % p
        mq = (gmpy2.powmod(c, q - 1, qsq) - 1) // q * hq % q
        out.append(int(mp + p * ((mq - mp) * pinv % q)))
    return out


def random_mask(pub: PublicKey) -> int:
    """A uniform plaintext in [0, n): added before the arbiter decrypts, it hides the value
    perfectly; the owner subtracts it afterwards."""
    return secrets.randbelow(pub.n)


# ------------------------------------------------------------------------------ serialisation


def to_bytes(values: Iterable[Any], width: int) -> bytes:
    return b"".join(int(v).to_bytes(width, "big") for v in values)


def from_bytes(data: bytes, width: int, bound: int | None = None) -> list[Any]:
    """Fixed-width big-endian integers; each must be < `bound` when given (ProtocolError)."""
    if width <= 0 or len(data) % width:
        raise ProtocolError(f"payload of {len(data)} bytes is not a whole number of {width}-byte values")
    out = []
    for i in range(0, len(data), width):
        v = mpz(int.from_bytes(data[i : i + width], "big"))
        if bound is not None and v >= bound:
            raise ProtocolError("a ciphertext or plaintext in the payload is out of range")
        out.append(v)
    return out
