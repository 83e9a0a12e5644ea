"""Signed requests: every service-to-service call carries the sender's Ed25519 signature.

The signature covers a domain tag, the sender and intended recipient, the method, the path
with query string, the SHA-256 of the body, a timestamp and a random nonce. Mutual TLS
already restricts who can connect; the signature binds each request to a party identity
(the key in its CA-issued certificate) and makes it non-replayable:

- unknown sender                        -> 401 "unknown party"
- bad signature / missing headers       -> 401
- timestamp outside +-`max_skew_s`      -> 401 "stale"
- nonce seen before within the window   -> 401 "replayed"
- request signed before this process started -> 401 "stale" (nonces live in memory, so a
  restart could otherwise reopen the window for requests captured before it)
- addressed to another service          -> 401 "wrong recipient"
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from confide.errors import AuthenticationError

log = logging.getLogger("confide.auth")

H_SENDER = "x-confide-sender"
H_RECIPIENT = "x-confide-recipient"
H_TIMESTAMP = "x-confide-timestamp"
H_NONCE = "x-confide-nonce"
H_SIGNATURE = "x-confide-signature"
DOMAIN = b"confide-request-v1"


def signing_string(
    sender: str, recipient: str, method: str, path: str, body: bytes, timestamp: str, nonce: str
) -> bytes:
    return b"\n".join(
        [
            DOMAIN,
            sender.encode(),
            recipient.encode(),
            method.upper().encode(),
            path.encode(),
            hashlib.sha256(body).hexdigest().encode(),
            timestamp.encode(),
            nonce.encode(),
        ]
    )


def sign_request(
    signing_key: ed25519.Ed25519PrivateKey,
    sender: str,
    recipient: str,
    method: str,
    path: str,
    body: bytes,
    *,
    now: float | None = None,
) -> dict[str, str]:
    """Headers that authenticate one request from `sender` to `recipient`."""
    ts = f"{(now if now is not None else time.time()):.3f}"
    nonce = secrets.token_hex(16)
    sig = signing_key.sign(signing_string(sender, recipient, method, path, body, ts, nonce))
    return {
        H_SENDER: sender,
        H_RECIPIENT: recipient,
        H_TIMESTAMP: ts,
        H_NONCE: nonce,
        H_SIGNATURE: base64.b64encode(sig).decode(),
    }


class NonceCache:
    """Nonces seen within the skew window; bounded, thread-safe."""

    def __init__(self, window_s: float, max_entries: int = 1_000_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def check_and_add(self, nonce: str, now: float) -> bool:
        """True if `nonce` is new (and remember it); False if it was seen."""
        with self._lock:
            while self._seen:
                oldest, t = next(iter(self._seen.items()))
                if now - t > 2 * self.window_s or len(self._seen) > self.max_entries:
                    self._seen.popitem(last=False)
                else:
                    break
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


@dataclass(frozen=True)
class Peer:
    """The authenticated sender of a request."""

    name: str
    role: str


KeyResolver = Callable[[str], "tuple[ed25519.Ed25519PublicKey, str] | None"]


class RequestVerifier:
    """Verifies signed requests addressed to `me`; `resolve(name)` gives (public key, role)."""

    def __init__(
        self,
        me: str,
        resolve: KeyResolver,
        *,
        max_skew_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.me = me
        self.resolve = resolve
        self.max_skew_s = max_skew_s
        self.clock = clock
        self.started_at = clock()
        self.nonces = NonceCache(max_skew_s)

    def verify(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        key_override: "tuple[ed25519.Ed25519PublicKey, str] | None" = None,
    ) -> Peer:
        """Return the authenticated peer or raise AuthenticationError with the reason.

        `key_override` supplies the sender's key for requests whose sender is not yet
        known (registration, where the key comes from the CA-verified certificate in the body).
        """
        try:
            sender = headers[H_SENDER]
            recipient = headers[H_RECIPIENT]
            ts = headers[H_TIMESTAMP]
            nonce = headers[H_NONCE]
            sig = base64.b64decode(headers[H_SIGNATURE], validate=True)
        except KeyError as exc:
            raise self._fail(f"missing signature header {exc.args[0]}")
        except ValueError:
            raise self._fail("signature header is not base64")
        if recipient != self.me:
            raise self._fail(f"request addressed to {recipient!r}, this is {self.me!r}", sender)
        resolved = key_override or self.resolve(sender)
        if resolved is None:
            raise self._fail(f"unknown party {sender!r}: not registered", sender)
        key, role = resolved
        try:
            t = float(ts)
        except ValueError:
            raise self._fail("timestamp is not a number", sender)
        now = self.clock()
        if abs(now - t) > self.max_skew_s:
            raise self._fail(f"stale request: timestamp {now - t:+.0f}s off (max {self.max_skew_s:.0f}s)", sender)
        if t < self.started_at - 0.001:
            raise self._fail("stale request: signed before this service started", sender)
        try:
            key.verify(sig, signing_string(sender, recipient, method, path, body, ts, nonce))
        except InvalidSignature:
            raise self._fail("bad signature", sender)
        if not self.nonces.check_and_add(f"{sender}:{nonce}", now):
            raise self._fail("replayed request: nonce already used", sender)
        return Peer(sender, role)

    def _fail(self, reason: str, sender: str | None = None) -> AuthenticationError:
        log.warning("auth refused: %s (sender=%s)", reason, sender or "?")
        return AuthenticationError(f"authentication failed: {reason}", reason=reason)
