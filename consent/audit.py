"""The node's append-only Merkle audit log (RFC 6962 / Certificate Transparency style).

Every processing decision, job step and consent event of a node is a *leaf*

    {"seq": n, "kind": "step.started", "at": "2026-11-27T07:04:34.123456Z", "payload": {...}}

hashed as ``SHA-256(0x00 || canonical JSON of the leaf)``; inner nodes are
``SHA-256(0x01 || left || right)`` and the tree has the RFC 6962 shape for any size (the left
subtree holds the largest power of two strictly below the size). The node signs *tree heads*
``{log, size, root, timestamp}`` with its Ed25519 identity key and sends them to the coordinator
and its partners, who keep them (`HeadStore`). Later, `verify_log` proves that the stored log
still hashes to every head it is given, or names the first bad entry.

What a payload may hold
    Pseudonymous references (job ids, agreement ids, keyed subject pseudonyms), counts, and
    hashes of content (`payload_digest`). Never raw identifiers: `append` refuses keys that name
    one (``phone``, ``mobile``, ``email``, ``identifier``, ``id_card``, ``openid``, ``name``,
    ``address``, ``ip``, ... also inside nested dicts and camelCase such as ``phoneNumber``) and
    string values that *are* one (an e-mail address, a phone number, a Chinese resident ID
    number). That check is a guard rail, not a proof: callers pseudonymise before they log.

Commit policy
    ``append(..., session=None)`` runs in its own transaction and is committed when it
    returns (durable as far as the engine is: with `confide.db.make_engine`'s SQLite settings,
    WAL + ``synchronous=NORMAL``, a commit survives a process crash, not necessarily a power
    cut). ``append(..., session=s)`` writes inside the caller's transaction, so a job's rows
    and their audit leaf commit or roll back together; the leaf is durable when the caller
    commits. Sequence numbers are taken inside the transaction, after taking a lock that
    serialises appenders until commit (PostgreSQL: a transaction-level advisory lock; SQLite:
    its database write lock), so a rolled-back append leaves no gap and concurrent appenders
    never collide. Keep transactions that append short: they hold that lock until commit.

    Group commit: concurrent own-transaction appends in one process (e.g. the node's request
    threads) are coalesced into one transaction per round; each caller still returns only
    after its leaf has committed. On PostgreSQL, where each commit waits for a WAL flush, this
    is what lets many callers together append thousands of entries per second; a lone caller
    is bounded by one flush per append, so bulk work should use `append_many` or append
    inside its own transaction. A round's leader waits up to a quarter of the last commit's
    duration (at most 0.5 ms) for callers of the previous round to come back before it takes
    its batch, never when the last round had one caller.

    On PostgreSQL a round (and any own-transaction batch up to `_PG_FAST_MAX` leaves) is one
    statement on the log's own autocommit connection, one round trip: it takes the advisory
    lock, inserts the leaves at the cached next seq, and inserts nothing if the leaf before
    them is missing; a seq taken meanwhile by another writer fails on the primary key. Either
    way nothing is committed and the append falls back to the locked read of max(seq). The
    server's `synchronous_commit` is left as configured (on): a returned append is flushed.

Retention
    `AuditSettings.retention_days` (default 1096 days = 3 years, the minimum allowed). Pruning
    (`AuditLog.prune_payloads`) is optional and only blanks ``payload_json`` of leaves older
    than the retention period; their ``seq``, ``kind``, ``at`` and ``leaf_hash`` stay, so every
    root, proof and signed head remains verifiable. `verify_log` accepts a pruned payload only
    for a leaf older than the retention period (it then trusts the stored leaf hash, which the
    signed roots still cover); a missing payload on a younger leaf is reported as tampering.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from confide.canonical import canonical_json
from confide.errors import AuthenticationError, ConfigurationError, Conflict, NotFound, ValidationError
from confide.pki import Identity
from consent.audit_storage import (
    CHUNK,
    AuditChunk,
    AuditLeaf,
    AuditPeerHead,
    AuditTreeHead,
)

DEFAULT_RETENTION_DAYS = 1096
HEAD_DOMAIN = b"confide/audit/tree-head/v1\x00"
HEAD_VERSION = 1
MAX_PAYLOAD_BYTES = 16 * 1024
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAVES = AuditLeaf.__table__
_CHUNKS = AuditChunk.__table__
_LEAF_COLS = ("seq", "kind", "at", "payload_json", "leaf_hash")
_SQLITE_INSERT = "INSERT INTO audit_leaves (seq, kind, at, payload_json, leaf_hash) VALUES (?, ?, ?, ?, ?)"
# Key of the PostgreSQL advisory lock that serialises appenders ("confide-audit" folded to int64).
_PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"confide-audit-append").digest()[:8], "big", signed=True)
# One own-transaction append on PostgreSQL in ONE statement and one round trip (autocommit, so
# the statement is its transaction): take the appenders' advisory lock, then insert the rows
# from binary arrays (text-format arrays of JSON strings cost ~30 us per element to escape in
# the client), but only if the leaf before `first` exists, so a stale cached next seq can never
# leave a gap (0 rows inserted -> the caller re-reads max(seq) the slow way); a seq another
# writer already took fails on the primary key. The lock is held until the statement's commit
# has flushed, so a concurrent `append(session=...)` that reads max(seq) after taking the lock
# sees these rows. Binary (%b) parameters keep the statement text constant, so psycopg
# prepares it after a few executions.
_PG_APPEND = (
    "WITH lk AS (SELECT pg_advisory_xact_lock(%(key)s)) "
    "INSERT INTO audit_leaves (seq, kind, at, payload_json, leaf_hash) "
    "SELECT v.* FROM lk CROSS JOIN unnest(%(seq)b::bigint[], %(kind)b::text[], %(at)b::text[], "
    "%(pj)b::text[], %(hash)b::bytea[]) AS v "
    "WHERE %(first)s = 0 OR EXISTS (SELECT 1 FROM audit_leaves WHERE seq = %(first)s - 1)"
)
# Append inside a transaction that already holds the lock: seqs from max(seq) read by this very
# statement (its snapshot is taken after the lock was granted, as the lock was an earlier
# statement) and leaf hashes computed by the server from `head` (the leaf's canonical JSON up
# to the seq) so the lock and this go out pipelined, in one round trip. The caller checks every
# returned hash against its own `leaf_hash(leaf_bytes(...))` and rewrites any that differ
# (e.g. a database whose encoding is not UTF-8), so what is stored is always the Python hash.
_PG_INSERT_NEXT = (
    "INSERT INTO audit_leaves (seq, kind, at, payload_json, leaf_hash) "
    "SELECT m.n + v.i - 1, v.kind, v.at, v.pj, sha256('\\x00'::bytea || convert_to("
    "v.head || v.pj || ',\"seq\":' || (m.n + v.i - 1)::text || '}', 'UTF8')) "
    "FROM (SELECT coalesce(max(seq) + 1, 0) AS n FROM audit_leaves) AS m, "
    "unnest(%(kind)b::text[], %(at)b::text[], %(pj)b::text[], %(head)b::text[]) "
    "WITH ORDINALITY AS v(kind, at, pj, head, i) "
    "RETURNING seq, leaf_hash"
)
# Batches up to this size take the one-statement path; larger ones (bulk `append_many`) COPY.
_PG_FAST_MAX = 2000
# Ping the log's own PostgreSQL connection before use when it sat idle longer than this.
_PG_IDLE_PING_S = 1.0


class AuditSettings(BaseSettings):
    """Audit-log settings (env `CONFIDE_AUDIT_*`)."""

    model_config = SettingsConfigDict(env_prefix="CONFIDE_AUDIT_", extra="forbid")

    retention_days: int = Field(
        default=DEFAULT_RETENTION_DAYS,
        ge=DEFAULT_RETENTION_DAYS,
        description="Keep leaf payloads at least this long (>= 3 years); older ones may be pruned",
    )


# --------------------------------------------------------------------------------------------
# Hashing (pure)
# --------------------------------------------------------------------------------------------


def leaf_hash(leaf: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || leaf bytes)."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def leaf_bytes(seq: int, kind: str, at: str, payload_json: str) -> bytes:
    """Canonical JSON of ``{"seq", "kind", "at", "payload"}`` given the payload's canonical JSON.

    Built by concatenation (keys in sorted order) so verification need not re-parse payloads;
    it equals ``canonical_json({"seq": seq, "kind": kind, "at": at, "payload": payload})``.
    """
    return (
        b'{"at":' + _json_str(at)
        + b',"kind":' + _json_str(kind)
        + b',"payload":' + payload_json.encode()
        + b',"seq":' + str(int(seq)).encode() + b"}"
    )


_PLAIN = re.compile(r"[A-Za-z0-9_.:\-]*")


def _json_str(s: str) -> bytes:
    # Kinds and timestamps never need escaping; anything else (e.g. a tampered row) goes
    # through the JSON encoder so the bytes stay exactly canonical JSON.
    if _PLAIN.fullmatch(s):
        return b'"' + s.encode() + b'"'
    return json.dumps(s, ensure_ascii=False).encode()


def _split(n: int) -> int:
    """Largest power of two strictly less than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class _Frontier:
    """Right edge of a growing RFC 6962 tree: perfect subtrees, sizes strictly decreasing."""

    __slots__ = ("sizes", "hashes")

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.hashes: list[bytes] = []

    def push(self, h: bytes, size: int = 1) -> None:
        sizes, hashes = self.sizes, self.hashes
        while sizes and sizes[-1] == size:
            size += sizes.pop()
            h = node_hash(hashes.pop(), h)
        sizes.append(size)
        hashes.append(h)

    def push_tail(self, h: bytes, size: int) -> None:
        """Push a final, not necessarily perfect, subtree smaller than every one pushed so far."""
        self.sizes.append(size)
        self.hashes.append(h)

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        r = self.hashes[-1]
        for h in reversed(self.hashes[:-1]):
            r = node_hash(h, r)
        return r


def merkle_root(hashes: Sequence[bytes]) -> bytes:
    """Root of the RFC 6962 tree over these leaf hashes (the empty tree: SHA-256 of nothing)."""
    f = _Frontier()
    for h in hashes:
        f.push(h)
    return f.root()


def _inclusion_path(m: int, a: int, b: int, sub: Callable[[int, int], bytes]) -> list[bytes]:
    """RFC 6962 PATH for leaf m within D[a:b]; `sub(x, y)` is MTH(D[x:y])."""
    path: list[bytes] = []
    while b - a > 1:
        k = _split(b - a)
        if m < a + k:
            path.append(sub(a + k, b))
            b = a + k
        else:
            path.append(sub(a, a + k))
            a = a + k
    path.reverse()
    return path


def _consistency_path(m: int, n: int, sub: Callable[[int, int], bytes]) -> list[bytes]:
    """RFC 6962 PROOF(m, D[0:n]) for 0 < m < n (SUBPROOF with b = true)."""
    out: list[bytes] = []
    a, b, complete = 0, n, True
    while True:
        size = b - a
        if m == size:
            if not complete:
                out.append(sub(a, b))
            break
        k = _split(size)
        if m <= k:
            out.append(sub(a + k, b))
            b = a + k
        else:
            out.append(sub(a, a + k))
            m -= k
            a += k
            complete = False
    out.reverse()
    return out


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes) -> bool:
    """True iff `path` proves that leaf hash `leaf` is entry `index` of the tree of `size` with `root`
    (RFC 9162 §2.1.3.2)."""
    if index < 0 or index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True iff `proof` shows the tree (`new_size`, `new_root`) extends (`old_size`, `old_root`)
    (RFC 9162 §2.1.4.2). Every tree extends the empty one (empty proof)."""
    if old_size < 0 or new_size < old_size:
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if old_size == new_size:
        return not proof and old_root == new_root
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is itself a node
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0


# --------------------------------------------------------------------------------------------
# Payload guard
# --------------------------------------------------------------------------------------------

_KIND_RE = re.compile(r"^[a-z][a-z0-9_.\-]{0,63}$")
# A key is refused if one of its words (snake_case / camelCase / kebab-case split) is one of these…
_DENY_WORDS = frozenset({
    "phone", "phones", "mobile", "telephone", "tel", "msisdn", "email", "emails", "identifier",
    "identifiers", "passport", "openid", "unionid", "imei", "imsi", "idfa", "oaid", "ssn",
    "address", "ip", "birthday", "dob", "plaintext", "idcard",
})
# …or the whole key is one of these.
_DENY_KEYS = frozenset({
    "name", "full_name", "real_name", "first_name", "last_name", "surname", "id_card", "id_number",
    "id_no", "e_mail", "wechat_id", "wx_id", "license_plate", "bank_card", "card_number", "raw_id",
})
_DENY_VALUES = (
    re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+"),  # e-mail address
    re.compile(r"\+?(?:86)?[\s-]?1[3-9]\d{9}"),  # mainland China mobile number
    re.compile(r"\+\d{8,15}"),  # E.164 phone number
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_RE = re.compile(r"\d{6}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]")


def _is_resident_id(s: str) -> bool:
    """A PRC resident identity number: plausible birth date and a valid ISO 7064 check digit
    (so an 18-digit job id or timestamp is rarely mistaken for one)."""
    if len(s) != 18 or not _ID_RE.fullmatch(s):
        return False
    check = "10X98765432"[sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS)) % 11]
    return s[17].upper() == check


def _key_words(key: str) -> tuple[str, list[str]]:
    norm = re.sub(r"[^a-z0-9]+", "_", _CAMEL.sub("_", key).lower()).strip("_")
    return norm, [w for w in norm.split("_") if w]


_KEY_VERDICT: dict[str, bool] = {}  # key -> refused? (keys repeat across leaves: memoised)


def _key_refused(key: str) -> bool:
    verdict = _KEY_VERDICT.get(key)
    if verdict is None:
        norm, words = _key_words(key)
        verdict = norm in _DENY_KEYS or bool(_DENY_WORDS.intersection(words))
        if len(_KEY_VERDICT) < 10000:
            _KEY_VERDICT[key] = verdict
    return verdict


def _value_refused(s: str) -> bool:
    s = s.strip()
    # Cheap pre-filter: every pattern is an e-mail or ends in a digit (or an ID's X).
    if "@" not in s and not (s[-1:].isdigit() or s[-1:] in ("X", "x")):
        return False
    return any(rx.fullmatch(s) for rx in _DENY_VALUES) or _is_resident_id(s)


def _check_payload(obj: Any, where: str, depth: int = 0) -> None:
    if depth > 8:
        raise ValidationError(f"audit payload nested too deeply at {where}", field=where)
    t = type(obj)
    if t is str:
        if _value_refused(obj):
            raise ValidationError(
                f"audit payload value at {where} looks like a raw identifier (e-mail, phone or ID "
                "number); log a pseudonymous reference or a hash instead",
                field=where,
            )
    elif obj is None or t is int or t is float or t is bool:
        return
    elif t is dict or isinstance(obj, Mapping):
        for key, value in obj.items():
            if type(key) is not str:
                raise ValidationError(f"audit payload key {key!r} at {where} is not a string", field=where)
            if _key_refused(key):
                raise ValidationError(
                    f"audit payload key {where}.{key} names a raw identifier; log a pseudonymous "
                    "reference or a hash (payload_digest) instead",
                    field=f"{where}.{key}",
                )
            _check_payload(value, f"{where}.{key}", depth + 1)
    elif t is list or t is tuple:
        for i, value in enumerate(obj):
            _check_payload(value, f"{where}[{i}]", depth + 1)
    elif isinstance(obj, str):
        _check_payload(str(obj), where, depth)
    elif isinstance(obj, (bool, int, float)):
        return
    else:
        raise ValidationError(
            f"audit payload value at {where} has type {type(obj).__name__}; use JSON types", field=where
        )


def payload_json(payload: Mapping[str, Any]) -> str:
    """Validate an audit payload and return its canonical JSON.

    Raises ValidationError (naming the field) for a non-dict, a raw-identifier key or value,
    non-JSON values, or more than MAX_PAYLOAD_BYTES.
    """
    if not isinstance(payload, Mapping):
        raise ValidationError("audit payload must be a dict", field="payload")
    _check_payload(payload, "payload")
    try:
        data = canonical_json(dict(payload))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"audit payload is not JSON-serialisable: {exc}", field="payload") from exc
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValidationError(
            f"audit payload is {len(data)} bytes; the limit is {MAX_PAYLOAD_BYTES} (log a hash of "
            "large content instead)",
            field="payload",
        )
    return data.decode("utf-8")


def payload_digest(obj: Any) -> str:
    """``"sha256:<hex>"`` of the canonical JSON of `obj`: how a leaf refers to content."""
    return "sha256:" + hashlib.sha256(canonical_json(obj)).hexdigest()


def _check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValidationError(
            f"invalid audit entry kind {kind!r}: 1-64 chars of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter",
            field="kind",
        )
    return kind


def format_at(at: dt.datetime) -> str:
    """The fixed-width UTC text form stored and hashed for `at` (naive datetimes are UTC)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.timezone.utc)
    return at.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# --------------------------------------------------------------------------------------------
# Wire types
# --------------------------------------------------------------------------------------------


def _public_key(key: ed25519.Ed25519PublicKey | bytes | str) -> ed25519.Ed25519PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    try:
        raw = bytes.fromhex(key) if isinstance(key, str) else bytes(key)
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ValidationError("public key must be 32 bytes of Ed25519 (64 hex digits)", field="public_key") from exc


@dataclass(frozen=True)
class SignedTreeHead:
    """A signed statement "log `log` had `size` entries with root `root` at `timestamp`".

    The signature is Ed25519 over ``HEAD_DOMAIN || canonical_json({log, size, root, timestamp})``;
    `root` and `signature` are hex, `signer` names the identity that signed.
    """

    log: str
    size: int
    root: str
    timestamp: str
    signature: str
    signer: str

    def signed_bytes(self) -> bytes:
        return head_bytes(self.log, self.size, self.root, self.timestamp)

    @property
    def root_bytes(self) -> bytes:
        return bytes.fromhex(self.root)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": HEAD_VERSION,
            "log": self.log,
            "size": self.size,
            "root": self.root,
            "timestamp": self.timestamp,
            "signature": self.signature,
            "signer": self.signer,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SignedTreeHead:
        """Parse a head; raises ValidationError naming the bad field."""
        if not isinstance(d, Mapping):
            raise ValidationError("a tree head must be a JSON object", field="head")
        if d.get("version", HEAD_VERSION) != HEAD_VERSION:
            raise ValidationError(f"unsupported tree head version {d.get('version')!r}", field="version")
        for name, typ in (("log", str), ("size", int), ("root", str), ("timestamp", str),
                          ("signature", str), ("signer", str)):
            if name not in d:
                raise ValidationError(f"tree head lacks {name!r}", field=name)
            if not isinstance(d[name], typ) or isinstance(d[name], bool):
                raise ValidationError(f"tree head field {name!r} must be {typ.__name__}", field=name)
        if d["size"] < 0:
            raise ValidationError("tree head size must be >= 0", field="size")
        for name, n in (("root", 64), ("signature", 128)):
            if not re.fullmatch(rf"[0-9a-f]{{{n}}}", d[name]):
                raise ValidationError(f"tree head {name} must be {n} lower-case hex digits", field=name)
        return cls(d["log"], d["size"], d["root"], d["timestamp"], d["signature"], d["signer"])


def head_bytes(log: str, size: int, root: str, timestamp: str) -> bytes:
    """The exact bytes a tree head signature covers (domain tag + canonical JSON)."""
    return HEAD_DOMAIN + canonical_json({"log": log, "size": size, "root": root, "timestamp": timestamp})


def verify_head(head: SignedTreeHead, public_key: ed25519.Ed25519PublicKey | bytes | str) -> bool:
    """True iff `head` carries a valid signature by `public_key` (object, raw bytes or hex)."""
    key = _public_key(public_key)
    try:
        key.verify(bytes.fromhex(head.signature), head.signed_bytes())
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class InclusionProof:
    """Audit path proving leaf `seq` is in the tree of `size` (hashes in hex on the wire)."""

    seq: int
    size: int
    leaf_hash: bytes
    path: list[bytes]

    def verify(self, root: bytes) -> bool:
        return verify_inclusion(self.leaf_hash, self.seq, self.size, self.path, root)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "size": self.size, "leaf_hash": self.leaf_hash.hex(),
                "path": [p.hex() for p in self.path]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InclusionProof:
        try:
            return cls(int(d["seq"]), int(d["size"]), bytes.fromhex(d["leaf_hash"]),
                       [bytes.fromhex(p) for p in d["path"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"malformed inclusion proof: {exc}", field="proof") from exc


@dataclass(frozen=True)
class ConsistencyProof:
    """Proof that the tree of `new_size` extends the tree of `old_size`."""

    old_size: int
    new_size: int
    path: list[bytes]

    def verify(self, old_root: bytes, new_root: bytes) -> bool:
        return verify_consistency(self.old_size, self.new_size, old_root, new_root, self.path)

    def to_dict(self) -> dict[str, Any]:
        return {"old_size": self.old_size, "new_size": self.new_size, "path": [p.hex() for p in self.path]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConsistencyProof:
        try:
            return cls(int(d["old_size"]), int(d["new_size"]), [bytes.fromhex(p) for p in d["path"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"malformed consistency proof: {exc}", field="proof") from exc


@dataclass(frozen=True)
class AuditEntry:
    """A stored leaf. `payload` is None once pruned after the retention period."""

    seq: int
    kind: str
    at: str
    payload: dict[str, Any] | None
    leaf_hash: bytes


# --------------------------------------------------------------------------------------------
# The log
# --------------------------------------------------------------------------------------------


def _factory(engine_or_factory: Engine | sessionmaker[Session]) -> tuple[Engine, sessionmaker[Session]]:
    if isinstance(engine_or_factory, Engine):
        return engine_or_factory, sessionmaker(engine_or_factory, expire_on_commit=False)
    bind = engine_or_factory.kw.get("bind")
    if not isinstance(bind, Engine):
        raise ConfigurationError("AuditLog needs an Engine or a sessionmaker bound to one")
    return bind, engine_or_factory


class _TreeReader:
    """MTH(D[a:b]) over the stored log, from cached chunk hashes plus leaf hashes.

    Every subtree RFC 6962 asks for starts at a multiple of 2^ceil(log2(b - a)), so a range
    longer than CHUNK starts on a chunk boundary and is complete chunks plus a tail that is
    itself a node of the tree; a shorter range lies inside one chunk.
    """

    def __init__(self, conn: Connection, size: int, persist: bool) -> None:
        self.conn = conn
        self.size = size
        self.persist = persist
        self._chunk_leaves: dict[int, list[bytes]] = {}

    def leaves(self, a: int, b: int) -> list[bytes]:
        rows = self.conn.execute(
            select(_LEAVES.c.seq, _LEAVES.c.leaf_hash)
            .where(_LEAVES.c.seq >= a, _LEAVES.c.seq < b)
            .order_by(_LEAVES.c.seq)
        ).all()
        if len(rows) != b - a or (rows and (rows[0][0] != a or rows[-1][0] != b - 1)):
            raise Conflict(
                f"audit log entries {a}..{b - 1} are incomplete ({len(rows)} of {b - a} found); "
                "run `confide audit verify`"
            )
        return [bytes(r[1]) for r in rows]

    def _in_chunk(self, ci: int) -> list[bytes]:
        got = self._chunk_leaves.get(ci)
        if got is None:
            got = self.leaves(ci * CHUNK, min((ci + 1) * CHUNK, self.size))
            self._chunk_leaves[ci] = got
        return got

    def chunks(self, lo: int, hi: int) -> list[bytes]:
        """Hashes of complete chunks lo..hi-1, computing and caching the missing ones."""
        cached = dict(
            self.conn.execute(
                select(_CHUNKS.c.idx, _CHUNKS.c.hash).where(_CHUNKS.c.idx >= lo, _CHUNKS.c.idx < hi)
            ).all()
        )
        out: list[bytes] = []
        new: list[dict[str, Any]] = []
        i = lo
        while i < hi:
            if i in cached:
                out.append(bytes(cached[i]))
                i += 1
                continue
            j = i
            # Missing runs are filled 64 chunks at a time to bound memory on a cold cache.
            while j < hi and j not in cached and j - i < 64:
                j += 1
            hashes = self.leaves(i * CHUNK, j * CHUNK)
            for c in range(i, j):
                h = merkle_root(hashes[(c - i) * CHUNK:(c - i + 1) * CHUNK])
                out.append(h)
                new.append({"idx": c, "hash": h})
            i = j
        if new and self.persist:
            _insert_ignore(self.conn, new)
        return out

    def __call__(self, a: int, b: int) -> bytes:
        if b - a <= CHUNK:
            ci = a // CHUNK
            base = ci * CHUNK
            return merkle_root(self._in_chunk(ci)[a - base:b - base])
        lo, hi = a // CHUNK, b // CHUNK
        f = _Frontier()
        for h in self.chunks(lo, hi):
            f.push(h, CHUNK)
        if b % CHUNK:
            f.push_tail(merkle_root(self._in_chunk(hi)[: b - hi * CHUNK]), b % CHUNK)
        return f.root()


def _is_lock_error(exc: OperationalError) -> bool:
    msg = str(exc.orig).lower()
    return "locked" in msg or "busy" in msg


def _insert_ignore(conn: Connection, rows: list[dict[str, Any]]) -> None:
    name = conn.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        conn.execute(pg_insert(_CHUNKS).on_conflict_do_nothing(index_elements=["idx"]), rows)
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        conn.execute(sqlite_insert(_CHUNKS).on_conflict_do_nothing(index_elements=["idx"]), rows)
    else:  # pragma: no cover - other databases are not supported targets
        for row in rows:
            try:
                with conn.begin_nested():
                    conn.execute(insert(_CHUNKS), row)
            except IntegrityError:
                pass


class _Pending:
    """One queued single append. `gate` is a plain lock taken at creation and released by
    whoever finishes this append (its result is set first): cheaper than an Event to make,
    wait on and wake, which matters at thousands of appends per second."""

    __slots__ = ("item", "seq", "error", "gate", "lead")

    def __init__(self, item: tuple[str, str, str]) -> None:
        self.item = item
        self.seq = -1
        self.error: BaseException | None = None
        self.gate = threading.Lock()
        self.gate.acquire()
        self.lead = False  # set (before the gate opens) when this caller is handed the leader's role


class _GroupCommit:
    """Group commit for single appends in their own transaction.

    Concurrent `submit` calls are coalesced: one caller at a time (the leader) writes every
    leaf queued so far in one transaction and commits it; callers that arrive meanwhile queue
    up and go together in the next transaction, led by the oldest of them. Each caller returns
    only once the transaction holding its leaf has committed (or raises that transaction's
    error), so the durability promise of a single append is unchanged; only the cost of the
    commit (on PostgreSQL one WAL flush) is shared. A lone caller pays exactly one transaction,
    as before. Each waiter sleeps on its own gate, so a commit wakes only its own callers and
    the next leader (no thundering herd among hundreds of waiting threads); the next leader is
    woken first, as the next commit waits on it while the others merely return.
    """

    def __init__(self, commit: Callable[[list[tuple[str, str, str]]], list[int]], max_batch: int = 5000,
                 gather_max_s: float = 0.0005) -> None:
        self._commit = commit
        self._max = max_batch
        self._gather_max = gather_max_s
        self._mu = threading.Lock()
        self._arrived = threading.Condition(self._mu)
        self._queue: list[_Pending] = []
        self._busy = False
        self._want = 0  # queue length a gathering leader waits for (0: nobody is gathering)
        self._last = 1  # size of the last batch: how many callers were recently appending together
        self._commit_s = 0.0  # duration of the last commit
        self.transactions = 0  # how many transactions served single appends (for tests and benchmarks)
        self.gathered = 0  # rounds in which the leader waited for returning callers (for tests and benchmarks)

    def submit(self, item: tuple[str, str, str]) -> int:
        me = _Pending(item)
        with self._mu:
            self._queue.append(me)
            lead = not self._busy
            self._busy = True
            if self._want and len(self._queue) >= self._want:
                self._arrived.notify()
        if not lead:
            me.gate.acquire()
            if not me.lead:
                return self._result(me)
        while True:
            with self._mu:
                self._gather()
                batch, self._queue = self._queue[: self._max], self._queue[self._max:]
            started = time.perf_counter()
            try:
                seqs = self._commit([p.item for p in batch])
                for p, seq in zip(batch, seqs):
                    p.seq = seq
            except BaseException as exc:  # every leaf of the failed transaction fails with it
                for p in batch:
                    p.error = exc
            mine = me in batch  # identity: _Pending has no __eq__
            nxt = None
            with self._mu:
                self.transactions += 1
                self._last = len(batch)
                self._commit_s = time.perf_counter() - started
                if mine:
                    if self._queue:  # hand the leader's role to the oldest waiter
                        nxt = self._queue[0]
                        nxt.lead = True
                    else:
                        self._busy = False
            if nxt is not None:
                nxt.gate.release()
            for p in batch:
                if p is not me:
                    p.gate.release()
            if mine:
                return self._result(me)

    def _gather(self) -> None:
        """Called by the leader (holding `_mu`) before it takes a batch. Callers that append in
        a loop return from one commit while the next is already being written, so without
        this the queue splits into two halves that commit in turn, each paying a commit for
        half the callers. If the last batch was bigger than what is queued now, wait a little
        for those callers to come back: at most a quarter of the last commit's duration and
        `gather_max_s`, and never when one caller is appending alone (the last batch had one
        entry), so a lone caller's latency is unchanged. Every caller still returns only after
        its own leaf committed; this only trades a bounded delay for fewer, fuller commits."""
        want = min(self._last, self._max)
        if len(self._queue) >= want or want <= 1:
            return
        deadline = time.perf_counter() + min(self._gather_max, self._commit_s / 4)
        self._want = want
        try:
            while len(self._queue) < want:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._arrived.wait(left)
        finally:
            self._want = 0
        self.gathered += 1

    @staticmethod
    def _result(p: _Pending) -> int:
        if p.error is not None:
            raise p.error
        return p.seq


class AuditLog:
    """A node's append-only Merkle audit log in its database.

    ``AuditLog(engine_or_session_factory, signer, node_name)``: `signer` (the node's
    `Identity`) is needed only to sign heads; `node_name` defaults to the signer's name.
    `clock` is injectable for tests. See the module docstring for the commit policy.
    """

    def __init__(
        self,
        engine_or_factory: Engine | sessionmaker[Session],
        signer: Identity | None = None,
        node_name: str | None = None,
        *,
        settings: AuditSettings | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.engine, self.factory = _factory(engine_or_factory)
        self.signer = signer
        name = node_name or (signer.name if signer is not None else None)
        if not name:
            raise ConfigurationError("AuditLog needs a node_name (or a signer to take it from)")
        self.node_name = name
        self.settings = settings or AuditSettings()
        self.clock = clock
        self._lock = threading.Lock()
        self._is_pg = self.engine.dialect.name == "postgresql"
        self._is_sqlite = self.engine.dialect.name == "sqlite"
        self._next: int | None = None  # cached next seq for own-transaction appends
        self._pg_raw: Any = None  # own psycopg connection for one-statement appends (PostgreSQL)
        self._pg_pid = 0
        self._pg_used = 0.0
        self._group = _GroupCommit(self._commit)

    # -- writing ---------------------------------------------------------------------------------
    def append(
        self,
        kind: str,
        payload: Mapping[str, Any],
        at: dt.datetime | None = None,
        session: Session | None = None,
    ) -> int:
        """Append one leaf; return its seq.

        Without `session` the leaf is committed before this returns; with `session` it is part
        of the caller's transaction. Raises ValidationError for a bad kind or payload (see the
        module docstring), Conflict if a concurrent writer could not be serialised.
        """
        item = (_check_kind(kind), format_at(at or self.clock()), payload_json(payload))
        return self._write([item], session)[0]

    def append_many(
        self,
        entries: Iterable[tuple[str, Mapping[str, Any]] | tuple[str, Mapping[str, Any], dt.datetime | None]],
        session: Session | None = None,
        *,
        at: dt.datetime | None = None,
        batch_size: int = 5000,
    ) -> list[int]:
        """Append many leaves (bulk imports); return their seqs in order.

        `entries` are ``(kind, payload)`` or ``(kind, payload, at)``. With `session` all go into
        the caller's transaction; without, each batch of `batch_size` is validated completely
        and then committed as one transaction (an invalid entry fails its batch before anything
        of that batch is written; earlier batches stay committed).
        """
        default_at = format_at(at or self.clock())
        seqs: list[int] = []
        batch: list[tuple[str, str, str]] = []
        for entry in entries:
            kind, payload = entry[0], entry[1]
            when = entry[2] if len(entry) > 2 else None  # type: ignore[misc]
            batch.append((_check_kind(kind), format_at(when) if when else default_at, payload_json(payload)))
            if len(batch) >= batch_size:
                first = self._write(batch, session)[0]
                seqs.extend(range(first, first + len(batch)))
                batch = []
        if batch:
            first = self._write(batch, session)[0]
            seqs.extend(range(first, first + len(batch)))
        return seqs

    def _write(self, items: list[tuple[str, str, str]], session: Session | None) -> list[int]:
        if session is not None:
            # The caller may still roll back: forget the cached next seq.
            self._next = None
            return self._insert(session.connection(), items, None)
        if len(items) == 1:
            return [self._group.submit(items[0])]
        return self._commit(items)

    def _commit(self, items: list[tuple[str, str, str]]) -> list[int]:
        """Write `items` in one transaction of their own and commit it."""
        with self._lock:
            if self._is_pg and self._next is not None and len(items) <= _PG_FAST_MAX:
                seqs = self._pg_append(items, self._next)
                if seqs is not None:
                    return seqs
            for attempt in range(8):
                try:
                    with self.engine.begin() as conn:
                        seqs = self._insert(conn, items, self._next)
                    self._next = seqs[-1] + 1
                    return seqs
                except (IntegrityError, OperationalError) as exc:
                    # Another writer appended (duplicate seq) or held SQLite's write lock:
                    # re-read the next seq inside the transaction and try again. Any other
                    # operational error (e.g. missing tables) is not transient.
                    self._next = None
                    if isinstance(exc, OperationalError) and not _is_lock_error(exc):
                        raise
                    if attempt == 7:
                        raise Conflict(f"could not append to the audit log: {exc.orig}") from exc
                    time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    def _pg_append(self, items: list[tuple[str, str, str]], first: int) -> list[int] | None:
        """PostgreSQL own-transaction append from the cached next seq `first` in one statement
        (`_PG_APPEND`); committed when it returns a list. None: nothing was written (another
        writer took these seqs, or `first` is past the end) and the caller must re-read the
        next seq in a locked transaction. Raises OperationalError if the connection broke, when
        whether the statement committed is unknown (as for any lost commit)."""
        import psycopg
        from psycopg.types.numeric import Int8

        seqs = list(range(first, first + len(items)))
        hashes = [leaf_hash(leaf_bytes(seq, kind, at, pj)) for seq, (kind, at, pj) in zip(seqs, items)]
        params = {"key": Int8(_PG_LOCK_KEY), "first": Int8(first), "seq": seqs,
                  "kind": [it[0] for it in items], "at": [it[1] for it in items],
                  "pj": [it[2] for it in items], "hash": hashes}
        raw = self._pg_connection()
        try:
            with raw.cursor() as cur:
                cur.execute(_PG_APPEND, params)
                written = cur.rowcount
        except psycopg.Error as exc:
            self._next = None
            if raw.broken or raw.closed or exc.sqlstate is None:
                # No answer from the server: the statement may or may not have committed.
                self.close()
                raise OperationalError("audit append (one-statement path)", None, exc) from exc
            # The server answered with an error (a duplicate seq, a missing table, ...), so
            # nothing was committed: the slow path retries, or raises it the SQLAlchemy way.
            return None
        if written != len(items):  # the leaf before `first` is missing: `first` was stale
            self._next = None
            return None
        self._next = first + len(items)
        self._pg_used = time.monotonic()
        return seqs

    def _pg_connection(self) -> Any:
        """This log's own psycopg connection for `_pg_append` (autocommit), made on first use.

        It is detached from the engine's pool, so it takes no pool slot and skips the pool's
        per-checkout ping; instead it is pinged only after it sat idle for `_PG_IDLE_PING_S`
        (a server restart while idle is then healed, not reported). A connection inherited
        across fork() is abandoned, never used or closed (the parent still owns its socket).
        """
        raw = self._pg_raw
        if raw is not None and self._pg_pid != os.getpid():
            raw = self._pg_raw = None
        if raw is not None and (raw.closed or raw.broken):
            self.close()
            raw = None
        if raw is not None and time.monotonic() - self._pg_used > _PG_IDLE_PING_S:
            try:
                raw.execute("SELECT 1")
            except Exception:
                self.close()
                raw = None
        if raw is None:
            fairy = self.engine.raw_connection()
            raw = fairy.driver_connection
            try:
                raw.autocommit = True
            except BaseException:
                fairy.close()
                raise
            fairy.detach()
            self._pg_raw, self._pg_pid, self._pg_used = raw, os.getpid(), time.monotonic()
        return raw

    def close(self) -> None:
        """Close this log's own PostgreSQL connection, if any (it is reopened when needed)."""
        raw, self._pg_raw = self._pg_raw, None
        if raw is not None and self._pg_pid == os.getpid():
            try:
                raw.close()
            except Exception:
                pass

    def _insert(self, conn: Connection, items: list[tuple[str, str, str]], first: int | None) -> list[int]:
        """Insert leaves from seq `first`; None: read it inside this transaction (on PostgreSQL
        after taking the appenders' advisory lock). A cached `first` is only used here on
        SQLite, whose single writer plus the primary key turn a stale value into an
        IntegrityError, never a gap or a duplicate (PostgreSQL uses its cached value only in
        `_pg_append`, whose statement checks for the gap itself)."""
        if self._is_pg:
            return self._pg_insert(conn, items)
        if first is None or not self._is_sqlite:
            if self._is_sqlite:
                # Take SQLite's write lock before reading max(seq): the driver only opens the
                # transaction at the first write, so a plain read could be stale by the insert.
                conn.exec_driver_sql("UPDATE audit_leaves SET seq = seq WHERE 0")
            first = self._size(conn)
        rows = [
            (first + i, kind, at, pj, leaf_hash(leaf_bytes(first + i, kind, at, pj)))
            for i, (kind, at, pj) in enumerate(items)
        ]
        if self._is_sqlite:
            # Plain DBAPI statement: compiling the Core insert costs more than the insert itself.
            conn.exec_driver_sql(_SQLITE_INSERT, rows if len(rows) > 1 else rows[0])
        else:  # pragma: no cover - other databases are not supported targets
            conn.execute(insert(_LEAVES), [dict(zip(_LEAF_COLS, r)) for r in rows])
        return list(range(first, first + len(items)))

    def _pg_insert(self, conn: Connection, items: list[tuple[str, str, str]]) -> list[int]:
        """PostgreSQL append inside `conn`'s transaction (the caller's, or `_commit`'s slow
        path): two round trips while the appenders' lock is held. The lock and the read of
        max(seq) go out pipelined, yet as two statements, so the read's snapshot is taken
        after the lock was granted and sees every append committed before; then the rows go
        in one statement of binary arrays (COPY for large batches). Database errors are
        raised as SQLAlchemy's DBAPIError subclasses, as from any other statement."""
        import psycopg
        from psycopg.types.numeric import Int8
        from sqlalchemy.exc import DBAPIError

        raw = conn.connection.driver_connection
        try:
            if len(items) <= _PG_FAST_MAX:
                return self._pg_insert_next(raw, items)
            with raw.pipeline():  # type: ignore[union-attr]
                raw.execute("SELECT pg_advisory_xact_lock(%s)", (Int8(_PG_LOCK_KEY),))  # type: ignore[union-attr]
                cur = raw.execute("SELECT max(seq) FROM audit_leaves")  # type: ignore[union-attr]
            last = cur.fetchone()[0]  # type: ignore[index]
            first = 0 if last is None else int(last) + 1
            seqs = list(range(first, first + len(items)))
            hashes = [leaf_hash(leaf_bytes(seq, kind, at, pj)) for seq, (kind, at, pj) in zip(seqs, items)]
            with raw.cursor() as cur:  # type: ignore[union-attr]
                # COPY: for big batches cheaper than INSERT on both sides
                with cur.copy(f"COPY audit_leaves ({', '.join(_LEAF_COLS)}) FROM STDIN") as copy:
                    for seq, (kind, at, pj), h in zip(seqs, items, hashes):
                        copy.write_row((seq, kind, at, pj, h))
        except psycopg.Error as exc:
            raise DBAPIError.instance("audit append", None, exc, psycopg.Error) from exc
        return seqs

    @staticmethod
    def _pg_insert_next(raw: Any, items: list[tuple[str, str, str]]) -> list[int]:
        """Lock and insert (`_PG_INSERT_NEXT`) pipelined: one round trip under the lock."""
        from psycopg.types.numeric import Int8

        heads = [(b'{"at":' + _json_str(at) + b',"kind":' + _json_str(kind) + b',"payload":').decode()
                 for kind, at, _pj in items]
        with raw.pipeline():
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (Int8(_PG_LOCK_KEY),))
            cur = raw.execute(_PG_INSERT_NEXT, {"kind": [it[0] for it in items], "at": [it[1] for it in items],
                                                "pj": [it[2] for it in items], "head": heads})
        got = sorted((int(seq), bytes(h)) for seq, h in cur.fetchall())
        first = got[0][0]
        if len(got) != len(items) or got[-1][0] != first + len(items) - 1:  # pragma: no cover - defensive
            raise Conflict(f"audit append stored {len(got)} leaves for {len(items)}")
        fix = []
        for (seq, stored), (kind, at, pj) in zip(got, items):
            h = leaf_hash(leaf_bytes(seq, kind, at, pj))
            if h != stored:
                fix.append((h, seq))
        if fix:
            with raw.cursor() as c2:
                c2.executemany("UPDATE audit_leaves SET leaf_hash = %s WHERE seq = %s", fix)
        return list(range(first, first + len(items)))

    # -- reading ---------------------------------------------------------------------------------
    def size(self) -> int:
        """Number of entries (one more than the highest seq)."""
        with self.engine.connect() as conn:
            return self._size(conn)

    @staticmethod
    def _size(conn: Connection) -> int:
        last = conn.execute(select(func.max(_LEAVES.c.seq))).scalar()
        return 0 if last is None else int(last) + 1

    def _checked_size(self, conn: Connection, size: int | None) -> int:
        current = self._size(conn)
        if size is None:
            return current
        if size < 0 or size > current:
            raise ValidationError(f"tree size {size} is outside 0..{current}", field="size")
        return size

    def root(self, size: int | None = None) -> bytes:
        """Root hash of the first `size` entries (default: all)."""
        with self.engine.begin() as conn:
            n = self._checked_size(conn, size)
            return _TreeReader(conn, n, persist=True)(0, n) if n else EMPTY_ROOT

    def entry(self, seq: int) -> AuditEntry:
        """The stored leaf `seq`; raises NotFound."""
        with self.engine.connect() as conn:
            row = conn.execute(select(_LEAVES).where(_LEAVES.c.seq == seq)).first()
        if row is None:
            raise NotFound(f"no audit entry with seq {seq}")
        return AuditEntry(row.seq, row.kind, row.at,
                          json.loads(row.payload_json) if row.payload_json is not None else None,
                          bytes(row.leaf_hash))

    def inclusion_proof(self, seq: int, size: int | None = None) -> InclusionProof:
        """Proof (O(log size) hashes) that entry `seq` is in the tree of `size` (default: all)."""
        with self.engine.begin() as conn:
            n = self._checked_size(conn, size)
            if not 0 <= seq < n:
                raise ValidationError(f"seq {seq} is not in a tree of size {n}", field="seq")
            tree = _TreeReader(conn, n, persist=True)
            path = _inclusion_path(seq, 0, n, tree)
            leaf = tree(seq, seq + 1)
        return InclusionProof(seq, n, leaf, path)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """Proof (O(log new_size) hashes) that the tree of `new_size` extends that of `old_size`."""
        with self.engine.begin() as conn:
            n = self._checked_size(conn, new_size)
            if not 0 <= old_size <= n:
                raise ValidationError(f"old size {old_size} is outside 0..{n}", field="old_size")
            if old_size in (0, n):
                return ConsistencyProof(old_size, n, [])
            path = _consistency_path(old_size, n, _TreeReader(conn, n, persist=True))
        return ConsistencyProof(old_size, n, path)

    def iter_leaves(self, start: int | None = None, batch: int = 20000) -> Iterator[tuple[int, str, str, str | None, bytes]]:
        """Stored rows ``(seq, kind, at, payload_json, leaf_hash)`` in seq order from `start`
        (default: every row, even a stray negative seq), streamed."""
        cols = (_LEAVES.c.seq, _LEAVES.c.kind, _LEAVES.c.at, _LEAVES.c.payload_json, _LEAVES.c.leaf_hash)
        with self.engine.connect() as conn:
            # Keyset pages: bounded memory on both databases, one snapshot per page is enough
            # because the log only grows.
            after: int | None = None if start is None else start - 1
            while True:
                q = select(*cols).order_by(_LEAVES.c.seq).limit(batch)
                if after is not None:
                    q = q.where(_LEAVES.c.seq > after)
                rows = conn.execute(q).all()
                if not rows:
                    return
                for r in rows:
                    yield r[0], r[1], r[2], r[3], bytes(r[4])
                after = rows[-1][0]

    # -- heads -----------------------------------------------------------------------------------
    def sign_head(self, session: Session | None = None) -> SignedTreeHead:
        """Sign the current head with the node's identity key, store it, and return it.

        Raises ConfigurationError when the log has no signer.
        """
        if self.signer is None:
            raise ConfigurationError("this audit log has no signing identity; load the node identity")
        with self.engine.begin() as conn:
            n = self._size(conn)
            root = (_TreeReader(conn, n, persist=True)(0, n) if n else EMPTY_ROOT).hex()
        ts = format_at(self.clock())
        sig = self.signer.sign(head_bytes(self.node_name, n, root, ts)).hex()
        head = SignedTreeHead(self.node_name, n, root, ts, sig, self.signer.name)
        row = {"log": head.log, "size": n, "root": root, "signed_at": ts, "signature": sig,
               "signer": head.signer}
        if session is not None:
            session.connection().execute(insert(AuditTreeHead.__table__), row)
        else:
            with self.engine.begin() as conn:
                conn.execute(insert(AuditTreeHead.__table__), row)
        return head

    def heads(self) -> list[SignedTreeHead]:
        """Heads this node signed over its own log, oldest first."""
        t = AuditTreeHead.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(select(t).where(t.c.log == self.node_name).order_by(t.c.id)).all()
        return [SignedTreeHead(r.log, r.size, r.root, r.signed_at, r.signature, r.signer) for r in rows]

    # -- retention -------------------------------------------------------------------------------
    def retention_cutoff(self, now: dt.datetime | None = None) -> str:
        """`at` text before which leaf payloads are past the retention period."""
        return format_at((now or self.clock()) - dt.timedelta(days=self.settings.retention_days))

    def prune_payloads(self, now: dt.datetime | None = None) -> int:
        """Blank the payloads of leaves older than the retention period; return how many.

        Leaf hashes stay, so roots, proofs and signed heads remain verifiable.
        """
        cutoff = self.retention_cutoff(now)
        with self.engine.begin() as conn:
            res = conn.execute(
                update(_LEAVES)
                .where(_LEAVES.c.at < cutoff, _LEAVES.c.payload_json.is_not(None))
                .values(payload_json=None)
            )
        return int(res.rowcount or 0)

    # Static verifiers, also importable as module functions.
    verify_inclusion = staticmethod(verify_inclusion)
    verify_consistency = staticmethod(verify_consistency)
    verify_head = staticmethod(verify_head)


# --------------------------------------------------------------------------------------------
# Whole-log verification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One finding. `seq` is the entry it pins down (None if only a range is known)."""

    kind: str  # leaf_changed | payload_missing | missing_entry | truncated | root_mismatch | bad_signature | wrong_log | equivocation
    message: str
    seq: int | None = None
    range: tuple[int, int] | None = None  # [first, last] entries that must contain the change

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "message": self.message, "seq": self.seq}
        if self.range is not None:
            d["range"] = list(self.range)
        return d


@dataclass
class VerifyReport:
    """Outcome of `verify_log`. `ok` iff no problem was found."""

    log: str
    size: int
    heads_given: int
    heads_verified: int
    leaves_checked: int
    pruned: int
    seconds: float
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_seq(self) -> int | None:
        """The lowest entry pinned down as bad (deleted, changed, reordered or truncated)."""
        seqs = [p.seq for p in self.problems if p.seq is not None]
        return min(seqs) if seqs else None

    @property
    def first_problem(self) -> Problem | None:
        if not self.problems:
            return None
        pinned = [p for p in self.problems if p.seq is not None]
        if pinned:
            return min(pinned, key=lambda p: p.seq)  # type: ignore[arg-type,return-value]
        # The first head whose root no longer matches bounds the first change most tightly.
        ranged = [p for p in self.problems if p.kind == "root_mismatch" and p.range is not None]
        if ranged:
            return min(ranged, key=lambda p: p.range[1])  # type: ignore[index]
        return self.problems[0]

    def summary(self) -> str:
        if self.ok:
            return (f"audit log {self.log!r}: {self.size} entries verified against "
                    f"{self.heads_verified} signed head(s) in {self.seconds:.2f}s"
                    + (f" ({self.pruned} payloads pruned after retention)" if self.pruned else "")
                    + ("; WARNING: no signed head was checked, so only the log's internal "
                       "consistency is proven" if not self.heads_verified else ""))
        first = self.first_problem
        assert first is not None
        where = (f"first bad entry: seq {first.seq}" if first.seq is not None
                 else f"first bad entry within seq {first.range[0]}..{first.range[1]}" if first.range
                 else "")
        return f"audit log {self.log!r} FAILED verification ({len(self.problems)} problem(s)); {where}: {first.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "log": self.log, "size": self.size, "heads_given": self.heads_given,
            "heads_verified": self.heads_verified, "leaves_checked": self.leaves_checked,
            "pruned": self.pruned, "seconds": round(self.seconds, 3),
            "first_bad_seq": self.first_bad_seq, "problems": [p.to_dict() for p in self.problems],
            "summary": self.summary(),
        }


_MAX_PROBLEMS = 100


def verify_log(
    log: AuditLog,
    heads: Sequence[SignedTreeHead],
    public_key: ed25519.Ed25519PublicKey | bytes | str,
    *,
    now: dt.datetime | None = None,
) -> VerifyReport:
    """Check the stored log against signed heads, trusting nothing stored but the leaf content.

    Recomputes every leaf hash from ``seq, kind, at, payload_json`` (a mismatch with the stored
    hash names that seq: content changed or rows reordered, as the seq is part of the hashed
    leaf), checks that seqs run 0, 1, 2, ... (a gap names the first missing seq), recomputes the
    root at every validly signed head's size and compares it with the signed root (a mismatch
    with matching leaf hashes means history was rewritten and re-hashed: the report names the
    range between the last matching head and that head), and reports a log shorter than a head
    (truncation: the first missing seq). Heads with a bad signature, another log's name, or two
    heads of one size with different roots (equivocation) are reported too.
    """
    started = time.perf_counter()
    key = _public_key(public_key)
    problems: list[Problem] = []
    by_size: dict[int, list[SignedTreeHead]] = {}
    for i, h in enumerate(heads):
        if h.log != log.node_name:
            problems.append(Problem("wrong_log", f"head #{i} is for log {h.log!r}, not {log.node_name!r}"))
        elif not verify_head(h, key):
            problems.append(Problem("bad_signature", f"head #{i} (size {h.size}, {h.timestamp}) has an invalid signature"))
        else:
            by_size.setdefault(h.size, []).append(h)
    for size, hs in by_size.items():
        if len({h.root for h in hs}) > 1:
            problems.append(Problem("equivocation", f"validly signed heads of size {size} disagree on the root",
                                    range=(0, max(size - 1, 0))))
    verified = sum(len(hs) for hs in by_size.values())
    targets = sorted(by_size)
    ti = 0
    last_good = 0  # largest head size whose root matched
    if targets and targets[0] == 0:
        for h in by_size[0]:
            if h.root_bytes != EMPTY_ROOT:
                problems.append(Problem("root_mismatch", "a head of size 0 has a non-empty root"))
        ti = 1
    cutoff = log.retention_cutoff(now)
    frontier = _Frontier()
    expected = 0
    pruned = 0
    checked = 0
    for seq, kind, at, pj, stored in log.iter_leaves():
        if seq != expected:
            if seq < expected:
                problems.append(Problem("unexpected_entry", f"a stray entry with seq {seq} precedes entry "
                                        f"{expected}", seq=expected))
            else:
                problems.append(Problem("missing_entry", f"entry {expected} is missing (next stored entry "
                                        f"is {seq})", seq=expected))
            break
        if pj is None:
            if at >= cutoff:
                problems.append(Problem("payload_missing",
                                        f"entry {seq} ({kind}, {at}) has no payload but is within retention",
                                        seq=seq))
            pruned += 1
            h = stored
        else:
            h = leaf_hash(leaf_bytes(seq, kind, at, pj))
            if h != stored and len(problems) < _MAX_PROBLEMS:
                problems.append(Problem("leaf_changed",
                                        f"entry {seq} does not hash to its stored leaf hash (content changed or "
                                        "rows reordered)", seq=seq))
        frontier.push(h)
        expected += 1
        checked += 1
        if ti < len(targets) and targets[ti] == expected:
            root = frontier.root()
            for hd in by_size[expected]:
                if hd.root_bytes != root:
                    problems.append(Problem(
                        "root_mismatch",
                        f"entries 0..{expected - 1} do not hash to the root signed at {hd.timestamp} "
                        f"(size {expected}): history between seq {last_good} and {expected - 1} was rewritten",
                        range=(last_good, expected - 1)))
                    break
            else:
                last_good = expected
            ti += 1
    for size in targets[ti:]:
        problems.append(Problem("truncated",
                                f"a head signed at {by_size[size][0].timestamp} covers {size} entries but only "
                                f"{expected} are present from seq 0 on", seq=expected))
    return VerifyReport(log.node_name, expected, len(heads), verified, checked, pruned,
                        time.perf_counter() - started, problems)


# --------------------------------------------------------------------------------------------
# Heads received from other parties
# --------------------------------------------------------------------------------------------


class HeadStore:
    """Tree heads received from other parties' logs (`audit_peer_heads`).

    Kept as evidence: once a party's head is here, that party cannot later present a log
    that disagrees with it without `verify_log` noticing.
    """

    def __init__(self, engine_or_factory: Engine | sessionmaker[Session],
                 clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self.engine, self.factory = _factory(engine_or_factory)
        self.clock = clock

    def add(self, head: SignedTreeHead, public_key: ed25519.Ed25519PublicKey | bytes | str,
            session: Session | None = None, proof: ConsistencyProof | None = None) -> None:
        """Verify `head` with the sender's identity key and keep it.

        With `proof` (a consistency proof from the largest kept smaller head of that log to
        `head`, as `AuditLog.consistency_proof(old, head.size)` makes it) a fork is caught on
        receipt, not only at the next `verify_log`. Raises AuthenticationError for a bad
        signature, Conflict if a kept head of the same log and size has another root (the
        sender equivocated) or the proof does not hold. Re-adding an identical head is a no-op.
        """
        if not verify_head(head, public_key):
            raise AuthenticationError(f"tree head of log {head.log!r} (size {head.size}) has an invalid signature")
        t = AuditPeerHead.__table__

        def _do(conn: Connection) -> None:
            rows = conn.execute(select(t.c.root, t.c.signature).where(t.c.log == head.log, t.c.size == head.size)).all()
            if any(r.root != head.root for r in rows):
                raise Conflict(f"log {head.log!r} signed two different roots for size {head.size}",
                               log=head.log, size=head.size)
            if proof is not None:
                prev = conn.execute(
                    select(t.c.size, t.c.root).where(t.c.log == head.log, t.c.size < head.size)
                    .order_by(t.c.size.desc()).limit(1)
                ).first()
                old_size, old_root = (prev.size, bytes.fromhex(prev.root)) if prev else (0, EMPTY_ROOT)
                if proof.old_size != old_size or proof.new_size != head.size or not proof.verify(
                    old_root, head.root_bytes
                ):
                    raise Conflict(
                        f"log {head.log!r}: the consistency proof from size {old_size} to {head.size} "
                        "does not hold (the log was rewritten, or the proof is for other sizes)",
                        log=head.log, size=head.size, old_size=old_size,
                    )
            if any(r.signature == head.signature for r in rows):
                return
            conn.execute(insert(t), {"log": head.log, "size": head.size, "root": head.root,
                                     "signed_at": head.timestamp, "signature": head.signature,
                                     "signer": head.signer, "received_at": self.clock()})

        if session is not None:
            _do(session.connection())
        else:
            with self.engine.begin() as conn:
                _do(conn)

    def heads(self, log: str) -> list[SignedTreeHead]:
        """Kept heads of `log`, by size then arrival."""
        t = AuditPeerHead.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(select(t).where(t.c.log == log).order_by(t.c.size, t.c.id)).all()
        return [SignedTreeHead(r.log, r.size, r.root, r.signed_at, r.signature, r.signer) for r in rows]

    def latest(self, log: str) -> SignedTreeHead | None:
        hs = self.heads(log)
        return hs[-1] if hs else None
