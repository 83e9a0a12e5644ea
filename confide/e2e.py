"""End-to-end encryption of party-to-party payloads relayed by the coordinator.

`seal` encrypts to the recipient's X25519 box key (from its CA-issued certificate) with a fresh
ephemeral key, HKDF-SHA256 and ChaCha20-Poly1305, and signs the envelope with the sender's
Ed25519 identity key. The associated data binds sender, recipient, job, channel and sequence
number, so the relay (which sees only sizes) can neither read, alter, redirect nor reorder a
payload without the recipient noticing.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confide.errors import ProtocolError
from confide.pki import raw_public

VERSION = 1
_HDR = struct.Struct(">B32s64s")  # version, ephemeral public key, signature
_INFO = b"confide-e2e-v1"


def _context(sender: str, recipient: str, job_id: str, channel: str, seq: int) -> bytes:
    parts = [p.encode() for p in (sender, recipient, job_id, channel)]
    return b"\x00".join(parts) + struct.pack(">Q", seq)


def _key(shared: bytes, eph_pub: bytes, recipient_pub: bytes, ctx: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=_INFO + ctx).derive(shared)


def seal(
    plaintext: bytes,
    *,
    sender: str,
    sender_key: ed25519.Ed25519PrivateKey,
    recipient: str,
    recipient_box: x25519.X25519PublicKey,
    job_id: str,
    channel: str,
    seq: int,
) -> bytes:
    """Encrypt and sign `plaintext` for `recipient`; returns the envelope bytes."""
    ctx = _context(sender, recipient, job_id, channel, seq)
    eph = x25519.X25519PrivateKey.generate()
    eph_pub = raw_public(eph.public_key())
    rpub = raw_public(recipient_box)
    key = _key(eph.exchange(recipient_box), eph_pub, rpub, ctx)
    ct = ChaCha20Poly1305(key).encrypt(b"\x00" * 12, plaintext, ctx)  # key is single-use: fixed nonce is safe
    sig = sender_key.sign(bytes([VERSION]) + eph_pub + ctx + ct)
    return _HDR.pack(VERSION, eph_pub, sig) + ct


def open_sealed(
    envelope: bytes,
    *,
    sender: str,
    sender_identity: ed25519.Ed25519PublicKey,
    recipient: str,
    recipient_box: x25519.X25519PrivateKey,
    job_id: str,
    channel: str,
    seq: int,
) -> bytes:
    """Verify and decrypt an envelope; ProtocolError if it was altered, misrouted or replayed elsewhere."""
    if len(envelope) < _HDR.size + 16:
        raise ProtocolError("relayed envelope is truncated")
    version, eph_pub, sig = _HDR.unpack_from(envelope)
    if version != VERSION:
        raise ProtocolError(f"relayed envelope has version {version}, expected {VERSION}")
    ct = envelope[_HDR.size:]
    ctx = _context(sender, recipient, job_id, channel, seq)
    try:
        sender_identity.verify(sig, bytes([version]) + eph_pub + ctx + ct)
    except InvalidSignature:
        raise ProtocolError(f"relayed envelope is not signed by {sender!r} for this job/channel/sequence") from None
    rpub = raw_public(recipient_box.public_key())
    key = _key(recipient_box.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub)), eph_pub, rpub, ctx)
    try:
        return ChaCha20Poly1305(key).decrypt(b"\x00" * 12, ct, ctx)
    except InvalidTag:
        raise ProtocolError("relayed envelope failed decryption (altered or not for us)") from None
