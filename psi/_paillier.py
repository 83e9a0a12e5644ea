"""The one module that touches `phe`/`gmpy2` Paillier for PSI profiles (private: use psi.profile).

Only the key holder (the responder, who owns the values) encrypts, so it encrypts with its
factorisation: the obfuscator r^n mod n² is computed mod p² and mod q² and recombined (CRT),
about 1.8x faster than phe's public-key encryption (5.0 vs 8.9 ms CPU at 2048 bits here). The requester only multiplies ciphertexts
(adds plaintexts) and adds its mask with the public key.

The profile's gated reveal also gives the requester a key of its own (it encrypts the powers of
its masks, CRT as above) and has the responder evaluate a polynomial on those ciphertexts and
multiply the result by a secret factor (`eval_gate`), all with the requester's public key.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import gmpy2
from phe import paillier


@dataclass(frozen=True)
class CrtEncryptor:
    """Picklable encryption parameters of the key holder (sent to its own executor workers)."""

    n: int
    p: int
    q: int

    def encrypt_many(self, plaintexts: list[int]) -> list[int]:
        n, p, q = gmpy2.mpz(self.n), gmpy2.mpz(self.p), gmpy2.mpz(self.q)
        n2 = n * n
        p2, q2 = p * p, q * q
        ep, eq = n % (p * (p - 1)), n % (q * (q - 1))
        q2_inv = gmpy2.invert(q2, p2)
        out = []
        for m in plaintexts:
            r = gmpy2.mpz(secrets.randbelow(self.n - 1) + 1)
            xp = gmpy2.powmod(r, ep, p2)
            xq = gmpy2.powmod(r, eq, q2)
            obf = xq + q2 * ((xp - xq) * q2_inv % p2)  # r^n mod n² by CRT
            out.append(int((1 + m * n) % n2 * obf % n2))
        return out


def generate(bits: int = 2048) -> paillier.PaillierPrivateKey:
    _, priv = paillier.generate_paillier_keypair(n_length=bits)
    return priv


def encryptor(priv: paillier.PaillierPrivateKey) -> CrtEncryptor:
    return CrtEncryptor(priv.public_key.n, priv.p, priv.q)


def add_all(n: int, ciphertexts: list[int]) -> int:
    """Ciphertext of the sum of the plaintexts (1 = encryption of 0 without randomness)."""
    n2 = gmpy2.mpz(n) * n
    acc = gmpy2.mpz(1)
    for c in ciphertexts:
        acc = acc * c % n2
    return int(acc)


def mask(n: int, c: int) -> tuple[int, int]:
    """(ciphertext of plaintext + r, r) with r uniform mod n and fresh encryption randomness,
    so the result is unlinkable to the ciphertexts summed into `c`."""
    pub = paillier.PaillierPublicKey(n)
    r = secrets.randbelow(n)
    return int(gmpy2.mpz(c) * pub.raw_encrypt(r) % (gmpy2.mpz(n) * n)), r


def add_plain(n: int, c: int, m: int) -> int:
    """Ciphertext of plaintext(c) + m, with fresh encryption randomness (so the result is
    unlinkable to `c`)."""
    return int(gmpy2.mpz(c) * paillier.PaillierPublicKey(n).raw_encrypt(m) % (gmpy2.mpz(n) * n))


def rerandomize(n: int, c: int) -> int:
    """The same plaintext under fresh, uniform encryption randomness (c · s^n mod n²)."""
    return add_plain(n, c, 0)


def eval_gate(n: int, powers: list[int], coeffs: list[int], xs: list[int]) -> tuple[int, list[int]]:
    """Under the public key n, with `powers[j]` = Enc(r^j): u = Enc(ρ·Σ_j coeffs[j]·r^j) for a
    fresh uniform ρ in Z*_n, and v_i = Enc(ρ·Σ_j coeffs[j]·r^j · xs[i]) for each x in `xs`; every
    ciphertext re-randomised. Returns (u, [v_i])."""
    n_ = gmpy2.mpz(n)
    n2 = n_ * n_
    acc = multi_pow(powers, coeffs, n2)
    while True:
        rho = gmpy2.mpz(secrets.randbelow(n - 1) + 1)
        if gmpy2.gcd(rho, n_) == 1:
            break
    u = rerandomize(n, int(gmpy2.powmod(acc, rho, n2)))
    vs = [rerandomize(n, int(gmpy2.powmod(gmpy2.mpz(u), gmpy2.mpz(x), n2))) for x in xs]
    return u, vs


def multi_pow(bases: list[int], exps: list[int], mod: int, window: int = 5) -> gmpy2.mpz:
    """Π bases[i]^exps[i] mod `mod` (exps ≥ 0) by interleaved fixed windows (Straus): the
    squarings are shared by all bases — about 5x fewer multiplications than one powmod per base
    for 51 bases with 2048-bit exponents (1.6 s against 7.8 s measured here under load)."""
    m = gmpy2.mpz(mod)
    es = [gmpy2.mpz(e) for e in exps]
    tables = []
    for b in bases:
        t = [gmpy2.mpz(1), gmpy2.mpz(b) % m]
        for _ in range(2, 1 << window):
            t.append(t[-1] * t[1] % m)
        tables.append(t)
    acc = gmpy2.mpz(1)
    mask = (1 << window) - 1
    top = max((e.bit_length() for e in es), default=0)
    for pos in range((top + window - 1) // window - 1, -1, -1):
        for _ in range(window):
            acc = acc * acc % m
        shift = pos * window
        for t, e in zip(tables, es):
            d = int((e >> shift) & mask)
            if d:
                acc = acc * t[d] % m
    return acc


def decrypt(priv: paillier.PaillierPrivateKey, c: int) -> int:
    return int(priv.raw_decrypt(c))


def cipher_bytes(n: int) -> int:
    return (2 * n.bit_length() + 7) // 8
