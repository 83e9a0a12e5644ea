"""Preparing consent events for the store: validate, pseudonymise, hash and build rows.

The store records events in chunks (`ConsentStore._ingest_all`). Preparing a chunk is pure
Python CPU work with no database access, so a big import runs it in worker processes while the
importing process only writes (see `consent.store`). This module is what those workers import:
it holds plain data in and out and nothing heavier than pydantic.

A chunk is one of
    ("csv", name, header, first_line, text)     raw CSV lines (header already read)
    ("csvrows", name, header, first_line, rows) parsed CSV records (files with quoted fields)
    ("jsonl", name, first_line, text)           raw JSON Lines
    ("events", [(label, ConsentEventIn), ...])  validated models (API, `import_events`)

Rows are checked by a fast path that applies exactly the rules of `ConsentEventIn` to plain
strings without building a model; anything it does not accept as certainly valid (a bad value,
a non-string JSON value, an unseen time format that pydantic rejects) goes through the pydantic
model itself, so every error message is pydantic's, naming the line and field.
"""

from __future__ import annotations

import csv
import datetime as dt
import gc
import hashlib
import io
import json
import os
import operator
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from confide.errors import Conflict, ConfideError, ValidationError
from consent.purposes import PurposeRegistry
from consent.schemas import ConsentEventIn

# Column order of the event rows a batch carries (identifier_ct last: the importing process
# fills it in after encrypting, which on PostgreSQL is one string append per row).
EVENT_COLS = (
    "event_id", "subject_ref", "purpose", "recipient", "action", "legal_basis", "channel", "notice_version",
    "valid_from", "valid_until", "actor", "received_at", "content_hash", "batch_id", "identifier_ct",
)
STATE_COLS = (
    "purpose", "recipient", "subject_ref", "action", "event_id", "notice_version",
    "valid_from_us", "valid_until_us", "order_key",
)
RANK = {"granted": 0, "expired": 1, "refused": 2, "withdrawn": 3}
NEGATIVE_ACTIONS = ("refused", "withdrawn")

_NAIVE_EPOCH = dt.datetime(1970, 1, 1)
_US = dt.timedelta(microseconds=1)

# The rules of ConsentEventIn, for the fast path (schemas.py is the source of truth; a test
# checks these against the model's JSON schema).
_FIELDS = (
    "event_id", "subject", "identifier", "purpose", "recipient", "action", "legal_basis", "channel",
    "notice_version", "valid_from", "valid_until", "actor", "received_at",
)
_FIELD_SET = frozenset(_FIELDS)
_ID_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}").fullmatch  # the model's ^...$, whole string
_ACTIONS = frozenset(("granted", "refused", "withdrawn", "expired"))
_LEGAL_BASES = frozenset((
    "consent", "contract", "hr_management", "legal_obligation", "vital_interest", "news_reporting",
    "public_disclosed", "public_interest",
))
_CHANNELS = frozenset(("wechat_miniprogram", "app", "store", "call_centre", "web", "import", "coordinator"))
_MAX_LEN = {"subject": 256, "identifier": 256, "purpose": 128, "recipient": 64, "notice_version": 64, "actor": 128}
_TIME_CACHE = 100_000  # distinct time strings remembered per process

_datetime = TypeAdapter(dt.datetime)
_NULL = "\\N"  # COPY text NULL
_NULL_END = _NULL + "\n"


# --------------------------------------------------------------------------- times


def naive_utc(v: dt.datetime) -> dt.datetime:
    """`v` as a naive UTC datetime (naive input is taken as UTC)."""
    if v.tzinfo is None:
        return v
    off = v.utcoffset()
    v = v.replace(tzinfo=None)
    return v - off if off else v


def naive_us(v: dt.datetime) -> int:
    """Microseconds since the epoch of a naive UTC datetime."""
    return (v - _NAIVE_EPOCH) // _US


def naive_text(v: dt.datetime) -> str:
    """A naive UTC datetime in the text form SQLAlchemy's SQLite DateTime stores."""
    text_ = v.isoformat(" ")
    return text_ if v.microsecond else text_ + ".000000"


_Time = tuple[dt.datetime, str, int]  # naive UTC, stored text, microseconds since the epoch


def time_info(v: dt.datetime) -> _Time:
    n = naive_utc(v)
    return n, naive_text(n), naive_us(n)


# --------------------------------------------------------------------------- notices


@dataclass(frozen=True)
class NoticeTerms:
    version: str
    notice: str
    published_at: dt.datetime
    # purpose key -> (recipients, data categories)
    entries: Mapping[str, tuple[frozenset[str], frozenset[str]]]

    def entry_for(self, purpose: str) -> tuple[frozenset[str], frozenset[str]] | None:
        """The terms the notice states for `purpose`: its most specific listed ancestor-or-self."""
        parts = purpose.split(".")
        for i in range(len(parts), 0, -1):
            hit = self.entries.get(".".join(parts[:i]))
            if hit is not None:
                return hit
        return None

    def overlaps(self, purpose: str) -> bool:
        return any(k == purpose or k.startswith(purpose + ".") or purpose.startswith(k + ".") for k in self.entries)

    def recipients_for(self, purpose: str) -> set[str]:
        out: set[str] = set()
        for k, (recips, _cats) in self.entries.items():
            if k == purpose or k.startswith(purpose + ".") or purpose.startswith(k + "."):
                out |= recips
        return out


# --------------------------------------------------------------------------- errors


def pydantic_error(exc: PydanticValidationError, label: str) -> ValidationError:
    """A ValidationError naming each bad field as `label.field`."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", ""))
        if not loc and msg.startswith("Value error, ") and ": " in msg:
            # A model-level check names its field at the start of the message.
            loc, msg = msg[len("Value error, "):].split(": ", 1)
        problems.append({"field": f"{label}.{loc}" if loc else label, "message": msg})
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return ValidationError(summary, field=problems[0]["field"] if problems else label, problems=problems)


# --------------------------------------------------------------------------- the spec and a batch


@dataclass(frozen=True)
class PrepSpec:
    """Everything preparing needs, as plain picklable data. `pseudonym_key` (HMAC key of subject
    pseudonyms) and `wrap_key` (wraps subject keys) are derived from the node secret, not the
    secret itself; they go to worker processes on this machine only and are never logged
    (repr=False)."""

    pseudonym_key: bytes = field(repr=False)
    wrap_key: bytes = field(repr=False)
    purposes: PurposeRegistry
    recipients: frozenset[str]
    notices: Mapping[str, NoticeTerms]
    now: dt.datetime
    default_actor: str
    pg: bool


@dataclass
class Batch:
    """One prepared chunk: its distinct events in first-seen order, ready to write.

    `rows` are event rows in EVENT_COLS order (SQLite: tuples; PostgreSQL: COPY text lines).
    Identifiers are encrypted under a subject key made here for each subject of the chunk
    (`new_keys`: ref -> (key, wrapped key)); the writer keeps it if the subject has no key
    yet, and otherwise encrypts those rows again under the subject's key (`idents`)."""

    ids: list[str]
    hashes: list[str]
    refs: list[str]
    rows: list[Any]
    state: list[Any]  # projection rows (tuples or COPY lines), one per key, latest event
    idents: list[tuple[int, str]]  # (index, raw identifier) of events with an identifier
    new_keys: dict[str, tuple[bytes, bytes]] = field(repr=False)
    no_received: set[str]  # ids of events given without received_at
    withdrawals: list[tuple[str, str, str | None]]
    actions: dict[str, int]
    digest: str
    batch_id: str
    duplicates: int  # repeats of an event earlier in the chunk (dropped)
    label_keys: list[Any]
    label_prefix: str = ""
    label_suffix: str = ""
    single: tuple[str, str] | None = None  # (purpose, action) of a one-event batch

    def label(self, i: int) -> str:
        return f"{self.label_prefix}{self.label_keys[i]}{self.label_suffix}"


def batch_digest(content_hashes_in_event_id_order: Iterable[str]) -> str:
    """The `digest` of a `consent.events` audit entry, recomputed from stored events."""
    return hashlib.sha256("".join(content_hashes_in_event_id_order).encode()).hexdigest()


def _copy_escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class _Escapes(dict):  # type: ignore[type-arg]
    """COPY text escaping, remembered per distinct value (purposes, actors etc. repeat)."""

    def __missing__(self, key: str) -> str:
        out = _copy_escape(key)
        if len(self) < 10_000:
            self[key] = out
        return out


# --------------------------------------------------------------------------- the preparer


class Pseudonymizer:
    """Subject pseudonyms: HMAC-SHA256 under the pseudonym key, the first 128 bits in hex
    (collision-free at any realistic scale). The pads are hashed once, which makes it ~2x
    faster than `hmac.digest` per subject. The store and the import workers both use this one
    definition, so a subject gets the same pseudonym whichever process computed it."""

    def __init__(self, key: bytes) -> None:
        block = bytes(key).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def ref(self, value: str) -> str:
        inner = self._inner.copy()
        inner.update(value.encode("utf-8"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()[:32]

    def refs(self, values: Iterable[str]) -> list[str]:
        icopy, ocopy = self._inner.copy, self._outer.copy
        out = []
        for v in values:
            i = icopy()
            i.update(v.encode("utf-8"))
            o = ocopy()
            o.update(i.digest())
            out.append(o.hexdigest()[:32])
        return out


class Preparer:
    """Prepares chunks under one spec; keeps per-import caches (checked purpose/recipient/
    notice combinations, parsed time strings)."""

    def __init__(self, spec: PrepSpec) -> None:
        self.spec = spec
        self.ref = Pseudonymizer(spec.pseudonym_key).ref
        self._checked: set[tuple[Any, ...]] = set()
        self._times: dict[str, _Time] = {}
        self._now = time_info(spec.now)
        self._esc = _Escapes()
        self._wrap = AESGCM(spec.wrap_key)

    # -------------------------------------------------------------- entry point

    def prepare(
        self,
        chunk: tuple[Any, ...],
        *,
        exclude: frozenset[str] | set[str] = frozenset(),
        received: Mapping[str, dt.datetime] | None = None,
    ) -> Batch:
        """Validate and prepare `chunk` (see the module docstring). Events whose id is in
        `exclude` are dropped as duplicates; `received` gives a received_at for events sent
        without one (a retry compared with what is stored). Raises ValidationError naming the
        line and field of the first bad row, Conflict for an id repeated with other content."""
        b = _Builder(self, exclude, received or {})
        kind = chunk[0]
        if kind == "csv" or kind == "csvrows":
            _, name, header, first, data = chunk
            b.label_prefix = f"{name} line "
            rows = csv.reader(io.StringIO(data, newline="")) if kind == "csv" else data
            self._csv(b, name, tuple(header), first, rows)
        elif kind == "jsonl":
            _, name, first, data = chunk
            b.label_prefix = f"{name} line "
            self._jsonl(b, name, first, data)
        elif kind == "events":
            for label, e in chunk[1]:
                b.label_keys.append(label)
                b.add_model(label, e)
        else:
            raise ValueError(f"unknown chunk kind {kind!r}")
        return b.finish()

    # -------------------------------------------------------------- readers

    def _csv(self, b: "_Builder", name: str, header: tuple[str, ...], first: int, rows: Iterable[list[str]]) -> None:
        width = len(header)
        pos = {h: i for i, h in enumerate(header)}
        # Absent columns read the padding cell appended to every row (an empty cell).
        get = operator.itemgetter(*(pos.get(f, width) for f in _FIELDS))
        fast = b.add_fields
        for lineno, values in enumerate(rows, start=first):
            if len(values) != width:
                if not values:
                    continue
                raise ValidationError(
                    f"{name} line {lineno}: expected {width} fields, found {len(values)}", field=f"line {lineno}"
                )
            b.label_keys.append(lineno)
            values.append("")
            fields = get(values)
            values.pop()
            if not fast(lineno, fields):
                b.add_dict(f"{name} line {lineno}", {k: v for k, v in zip(header, values) if v})

    def _jsonl(self, b: "_Builder", name: str, first: int, data: str) -> None:
        fast = b.add_fields
        for lineno, line in enumerate(io.StringIO(data, newline=""), start=first):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValidationError(
                    f"{name} line {lineno}: not valid JSON ({exc.msg})", field=f"line {lineno}"
                ) from None
            if not isinstance(obj, dict):
                raise ValidationError(f"{name} line {lineno}: expected a JSON object", field=f"line {lineno}")
            obj = {k: v for k, v in obj.items() if v is not None and v != ""}
            b.label_keys.append(lineno)
            if not (obj.keys() <= _FIELD_SET and all(type(v) is str for v in obj.values())
                    and fast(lineno, tuple(obj.get(f, "") for f in _FIELDS))):
                b.add_dict(f"{name} line {lineno}", obj)

    # -------------------------------------------------------------- checks

    def time(self, s: str) -> _Time | None:
        """A time string as pydantic parses it for a datetime field, or None if it does not."""
        hit = self._times.get(s)
        if hit is None:
            try:
                hit = time_info(_datetime.validate_python(s))
            except PydanticValidationError:
                return None
            if len(self._times) >= _TIME_CACHE:
                self._times.clear()
            self._times[s] = hit
        return hit

    def check(self, label: str, purpose: str, recipient: str | None, action: str, notice_version: str | None) -> None:
        """Validate what depends only on purpose, recipient, action and notice version."""
        key = (purpose, recipient, action, notice_version)
        if key in self._checked:
            return
        spec = self.spec
        reg = spec.purposes
        reg.get(purpose, field=f"{label}.purpose")
        if recipient is not None and recipient not in spec.recipients:
            raise ValidationError(
                f"{label}.recipient: unknown recipient {recipient!r}; known: {', '.join(sorted(spec.recipients)) or 'none'}",
                field=f"{label}.recipient",
            )
        if action == "granted":
            if reg.recipient_specific(purpose) and recipient is None:
                raise ValidationError(
                    f"{label}.recipient: a grant for {purpose!r} must name the recipient (separate consent)",
                    field=f"{label}.recipient",
                )
            if notice_version is None:
                raise ValidationError(
                    f"{label}.notice_version: a grant must name the notice version shown", field=f"{label}.notice_version"
                )
        if notice_version is not None:
            terms = spec.notices.get(notice_version)
            if terms is None:
                raise ValidationError(
                    f"{label}.notice_version: unknown notice version {notice_version!r}; register it first",
                    field=f"{label}.notice_version",
                )
            if action == "granted":
                if not terms.overlaps(purpose):
                    raise ValidationError(
                        f"{label}.purpose: notice {notice_version!r} does not cover purpose {purpose!r}",
                        field=f"{label}.purpose",
                    )
                if (
                    recipient is not None
                    and reg.needs_named_grant(purpose, recipient)
                    and recipient not in terms.recipients_for(purpose)
                ):
                    raise ValidationError(
                        f"{label}.recipient: notice {notice_version!r} does not name recipient {recipient!r} "
                        f"for {purpose!r}",
                        field=f"{label}.recipient",
                    )
        self._checked.add(key)


class _Builder:
    """Accumulates one chunk's prepared events."""

    def __init__(self, prep: Preparer, exclude: frozenset[str] | set[str], received: Mapping[str, dt.datetime]):
        self.prep = prep
        self.exclude = exclude
        self.received = received
        self.batch_id = uuid.uuid4().hex[:16]
        self.pg = prep.spec.pg
        self.index: dict[str, int] = {}
        self.ids: list[str] = []
        self.hashes: list[str] = []
        self.refs: list[str] = []
        self.rows: list[Any] = []
        self.state: dict[tuple[str, str, str], tuple[str, Any]] = {}
        self.idents: list[tuple[int, str]] = []
        self.keys: dict[str, tuple[AESGCM, bytes, bytes]] = {}
        self.no_received: set[str] = set()
        self.withdrawals: list[tuple[str, str, str | None]] = []
        self.actions: list[str] = []
        self.duplicates = 0
        self.label_keys: list[Any] = []  # one per row read, in order (for labels of kept rows)
        self.kept_keys: list[Any] = []
        self.label_prefix = ""
        self.first: tuple[str, str] | None = None

    # A row as the 13 field strings of _FIELDS ("" = absent): the fast path. Returns False if
    # the row is not certainly valid under ConsentEventIn (the caller then asks pydantic).
    def add_fields(self, key: Any, f: tuple[str, ...]) -> bool:
        (event_id, subject, identifier, purpose, recipient, action, legal_basis, channel,
         notice_version, valid_from, valid_until, actor, received_at) = f
        if not (
            event_id and _ID_OK(event_id) is not None
            and subject and len(subject) <= 256
            and len(identifier) <= 256
            and purpose and len(purpose) <= 128
            and len(recipient) <= 64
            and action in _ACTIONS
            and (not legal_basis or legal_basis in _LEGAL_BASES)
            and channel in _CHANNELS
            and len(notice_version) <= 64
            and len(actor) <= 128
        ):
            return False
        time = self.prep.time
        rec = vf = vu = None
        if received_at and (rec := time(received_at)) is None:
            return False
        if valid_from and (vf := time(valid_from)) is None:
            return False
        if valid_until and (vu := time(valid_until)) is None:
            return False
        self._add(
            f"{self.label_prefix}{key}", event_id, subject, identifier or None, purpose, recipient or None, action,
            legal_basis or "consent", channel, notice_version or None, vf, vu, actor or None, rec,
        )
        return True

    def add_dict(self, label: str, row: dict[str, Any]) -> None:
        try:
            e = ConsentEventIn.model_validate(row)
        except PydanticValidationError as exc:
            raise pydantic_error(exc, label) from None
        self.add_model(label, e)

    def add_model(self, label: str, e: ConsentEventIn) -> None:
        # Blank text means "not given" (the API may send "").
        self._add(
            label, e.event_id, e.subject, e.identifier or None, e.purpose, e.recipient or None, e.action,
            e.legal_basis, e.channel, e.notice_version or None,
            None if e.valid_from is None else time_info(e.valid_from),
            None if e.valid_until is None else time_info(e.valid_until),
            e.actor or None,
            None if e.received_at is None else time_info(e.received_at),
        )

    def _add(
        self, label: str, event_id: str, subject: str, identifier: str | None, purpose: str, recipient: str | None,
        action: str, legal_basis: str, channel: str, notice_version: str | None,
        vf: _Time | None, vu: _Time | None, actor: str | None, rec: _Time | None,
    ) -> None:
        prep = self.prep
        prep.check(label, purpose, recipient, action, notice_version)
        if rec is None:
            given = self.received.get(event_id)
            rec = self.prep._now if given is None else time_info(given)
            missing_received = True
        else:
            missing_received = False
        if vf is None:
            vf = rec
        if vu is not None and vu[0] <= vf[0]:
            raise ValidationError(
                f"{label}.valid_until: must be after valid_from ({vf[0].isoformat()}Z)", field=f"{label}.valid_until"
            )
        actor = actor or prep.spec.default_actor
        ref = prep.ref(subject)
        ident_ref = prep.ref("id:" + identifier) if identifier else ""
        recipient_ = recipient or ""
        nv = notice_version or ""
        vu_text = "" if vu is None else vu[1]
        digest = hashlib.sha256("\x1f".join((
            event_id, ref, ident_ref, purpose, recipient_, action, legal_basis, channel, nv,
            vf[1], vu_text, actor, rec[1],
        )).encode("utf-8")).hexdigest()
        seen = self.index.get(event_id)
        if seen is not None:
            if self.hashes[seen] != digest:
                raise Conflict(
                    f"{label}.event_id: event id {event_id!r} appears twice with different content "
                    f"(first at {self.label_prefix}{self.kept_keys[seen]})",
                    field=f"{label}.event_id",
                )
            self.duplicates += 1
            return
        if event_id in self.exclude:
            self.duplicates += 1
            return
        n = len(self.ids)
        self.index[event_id] = n
        self.ids.append(event_id)
        self.hashes.append(digest)
        self.refs.append(ref)
        self.kept_keys.append(self.label_keys[-1])
        self.actions.append(action)
        if missing_received:
            self.no_received.add(event_id)
        if action in NEGATIVE_ACTIONS:
            self.withdrawals.append((subject, purpose, recipient))
        ct_hex = ""
        if identifier:
            self.idents.append((n, identifier))
            ct = self.seal(ref, event_id, identifier)
            ct_hex = ct.hex()
        okey = f"{max(rec[2], 0):020d}.{RANK[action]}.{event_id}"
        vu_us = None if vu is None else vu[2]
        k = (ref, purpose, recipient_)
        if n == 0:
            self.first = (purpose, action)
        if self.pg:
            esc = prep._esc
            line = (
                f"{event_id}\t{ref}\t{esc[purpose]}\t{esc[recipient_]}\t{action}\t{legal_basis}\t{channel}\t"
                f"{_NULL if notice_version is None else esc[notice_version]}\t{vf[1]}\t{vu_text or _NULL}\t"
                f"{esc[actor]}\t{rec[1]}\t{digest}\t{self.batch_id}\t"
            )
            self.rows.append(f"{line}\\\\x{ct_hex}\n" if identifier else line + _NULL_END)
            cur = self.state.get(k)
            if cur is None or okey > cur[0]:
                self.state[k] = (okey, (
                    f"{esc[purpose]}\t{esc[recipient_]}\t{ref}\t{action}\t{event_id}\t"
                    f"{_NULL if notice_version is None else esc[notice_version]}\t{vf[2]}\t"
                    f"{_NULL if vu_us is None else vu_us}\t{okey}\n"
                ))
        else:
            self.rows.append((
                event_id, ref, purpose, recipient_, action, legal_basis, channel, notice_version,
                vf[1], vu_text or None, actor, rec[1], digest, self.batch_id, ct if identifier else None,
            ))
            cur = self.state.get(k)
            if cur is None or okey > cur[0]:
                self.state[k] = (okey, (
                    purpose, recipient_, ref, action, event_id, notice_version, vf[2], vu_us, okey,
                ))

    def seal(self, ref: str, event_id: str, identifier: str) -> bytes:
        """`identifier` encrypted under the chunk's key for subject `ref` (made on first use)."""
        hit = self.keys.get(ref)
        if hit is None:
            rnd = os.urandom(44)
            key, nonce = rnd[:32], rnd[32:]
            hit = (AESGCM(key), key, nonce + self.prep._wrap.encrypt(nonce, key, ref.encode()))
            self.keys[ref] = hit
        return seal(hit[0], ref, event_id, identifier)

    def finish(self) -> Batch:
        single = self.first if len(self.ids) == 1 else None
        return Batch(
            ids=self.ids, hashes=self.hashes, refs=self.refs, rows=self.rows,
            state=[v for _, v in self.state.values()], idents=self.idents, no_received=self.no_received,
            new_keys={ref: (key, wrapped) for ref, (_aes, key, wrapped) in self.keys.items()},
            withdrawals=self.withdrawals, actions=dict(sorted(Counter(self.actions).items())),
            digest=batch_digest(h for _, h in sorted(zip(self.ids, self.hashes))),
            batch_id=self.batch_id, duplicates=self.duplicates, label_keys=self.kept_keys,
            label_prefix=self.label_prefix, single=single,
        )


def seal(aes: AESGCM, ref: str, event_id: str, identifier: str) -> bytes:
    """The stored form of a raw identifier: nonce + AES-GCM, bound to subject and event."""
    nonce = os.urandom(12)
    return nonce + aes.encrypt(nonce, identifier.encode("utf-8"), f"{ref}|{event_id}".encode())


# --------------------------------------------------------------------------- worker processes

_WORKER: Preparer | None = None


def init_worker(spec: PrepSpec) -> None:
    """ProcessPoolExecutor initializer: one Preparer per worker process for the import."""
    global _WORKER
    # Never collect what the forked worker inherited: a database connection object finalised
    # here would close the importing process's connection.
    gc.freeze()
    _WORKER = Preparer(spec)


def work(chunk: tuple[Any, ...]) -> tuple[str, Any]:
    """Prepare `chunk` in a worker: ("ok", Batch) or ("error", (class name, message, details))
    (Confide errors carry their details as keyword arguments, which pickling would drop)."""
    assert _WORKER is not None
    try:
        return "ok", _WORKER.prepare(chunk)
    except ConfideError as exc:
        return "error", (type(exc).__name__, exc.message, exc.details)


def rebuild_error(name: str, message: str, details: dict[str, Any]) -> ConfideError:
    cls = {"ValidationError": ValidationError, "Conflict": Conflict}.get(name, ConfideError)
    return cls(message, **details)
