"""The consent store: records consent events, notices and preferences, and is the gate.

    store = ConsentStore(engine, secret_key=key, recipients={"partner"}, audit=audit_log)
    store.record_events([...])                       # append-only, idempotent by event_id
    decision = store.allowed(subjects, "modeling.lookalike", None, now)

Semantics of the gate (`allowed`), per subject:
- The *rules* that apply to a purpose are the latest event (by received_at; on a tie a
  withdrawal beats a refusal beats an expiry beats a grant; then by event_id) recorded for the
  purpose or any ancestor, for no recipient or, when the call names one, for that recipient.
- Erased subjects are denied (`erased`). A refusal or withdrawal among the rules wins over any
  grant (`withdrawn`, `refused`); so does the "no personalised marketing" switch for a
  personalised purpose (`opted_out`).
- Otherwise a grant allows if it applies to the call's recipient, is valid at `at`, and its
  notice version still covers the purpose unchanged. When the call needs separate consent
  (PIPL Art. 23; `PurposeRegistry.needs_named_grant`: always for `sharing.*`, and for
  `audience.match`, `modeling.*`, `scoring.*`, `activation.*` whenever the call names a
  recipient) only a grant naming that recipient applies, and its notice must name the
  recipient too; a grant for no or another recipient gives `no_recipient_consent`. Otherwise
  a general grant or one naming the recipient applies. A refusal or withdrawal, general or
  naming the recipient, always vetoes. A later notice version in
  force at `at` that changes the purpose's data categories (or drops the recipient) makes the
  grant `notice_superseded`; a version that never covered them, `not_in_notice`.
- Denied subjects are counted per reason; a subject with no applicable rule is `no_consent`.
The gate answers from the current state: a withdrawal recorded now binds every later call,
whatever its `at`.

Subjects are stored only as keyed pseudonyms (HMAC-SHA256 under a key derived from the node
secret); raw identifiers only encrypted with a per-subject AES-GCM key, itself wrapped with a
key derived from the node secret. Erasure deletes the subject key and leaves a tombstone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import collections
import logging
import multiprocessing
import os
import itertools
import operator
import uuid
import zoneinfo
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import compress
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import Field
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import and_, delete, func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from confide import db
from confide.errors import ConfigurationError, Conflict, ValidationError
from consent.gate import GateDecision
from consent.prepare import (
    EVENT_COLS,
    STATE_COLS,
    Batch,
    NoticeTerms as _NoticeTerms,
    Preparer,
    PrepSpec,
    Pseudonymizer,
    batch_digest,
    init_worker,
    pydantic_error,
    rebuild_error,
    seal,
    work,
)
from consent.models import (
    ConsentEvent,
    ContactRecord,
    ConsentState,
    GateCall,
    Notice,
    PreferenceChange,
    Preferences,
    SubjectKey,
    Tombstone,
    UsageRecord,
    UsageSubject,
    ensure_tables,
)
from consent.purposes import PurposeRegistry
from consent.schemas import (
    CONTACT_PURPOSE_ROOTS,
    MAX_BATCH,
    AccessReport,
    ConsentEventIn,
    ConsentEventOut,
    DeliverableIn,
    DeliverableOut,
    NoticeIn,
    NoticeOut,
    PreferenceChangeOut,
    PreferencesIn,
    PreferencesOut,
    RecordResult,
    StateEntry,
    SubjectState,
    TombstoneOut,
    UsageOut,
    as_utc,
)

log = logging.getLogger("confide.consent")

__all__ = [
    "AuditSink", "ConsentSettings", "ConsentStore", "LoggingAuditSink", "batch_digest", "ensure_tables",
    "load_or_create_secret", "pydantic_error",
]

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_US = dt.timedelta(microseconds=1)
# Reasons a non-vetoed subject without a usable grant is denied, strongest first.
_WEAK_REASONS = ("expired", "notice_superseded", "not_in_notice", "no_recipient_consent", "not_yet_valid")
_WEAK_RANK = {r: i for i, r in enumerate(reversed(_WEAK_REASONS))}
_IMPORT_CHUNK = 20_000
_SMALL_GATE = 20_000  # up to this many distinct subjects the gate looks them up instead of scanning
_IN_CHUNK = 5_000
_REMEMBER_IDS = 2_000_000  # event ids an import into an empty table keeps in memory (about 150 MB)
# Worker processes that prepare the chunks of a multi-chunk file import while this process
# writes (see `_IngestContext.run`); 0 prepares in-process.
_IMPORT_WORKERS = 2 if (os.cpu_count() or 1) >= 2 else 0
_POOL_AHEAD = 2  # chunks queued per worker beyond the one it is preparing

WithdrawalHook = Callable[[str, str, "str | None"], None]
ErasureHook = Callable[[str], None]


class AuditSink(Protocol):
    """Where the store writes its audit entries (`consent.audit.AuditLog` fits). Payloads hold
    pseudonymous references and counts only."""

    def append(self, kind: str, payload: dict[str, Any], session: Session | None = None) -> Any: ...


class LoggingAuditSink:
    """Fallback sink: the service log only (no tamper evidence)."""

    def append(self, kind: str, payload: dict[str, Any], session: Session | None = None) -> Any:
        log.info("audit %s %s", kind, payload)
        return None


def load_or_create_secret(path: Path) -> bytes:
    """The node's consent secret kept in `path` (32 random bytes, created 0600 if missing)."""
    path = Path(path)
    if path.exists():
        data = path.read_bytes()
        if len(data) < 32:
            raise ConfigurationError(f"consent key file {path} is too short; it must hold 32 bytes")
        return data
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


class ConsentSettings(BaseSettings):
    """Consent-store settings (env `CONFIDE_CONSENT_*`)."""

    model_config = SettingsConfigDict(env_prefix="CONFIDE_CONSENT_", extra="forbid")

    retention_days: int = Field(
        default=1096,
        ge=1096,
        description="Keep consent evidence at least this long (>= 3 years); `purge` reduces only older records",
    )


# --------------------------------------------------------------------------- crypto recipes


class _Keys:
    """Pseudonyms, subject keys and identifier encryption; every primitive call lives here."""

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
            raise ConfigurationError("the consent secret key must be at least 16 bytes")
        pkey = _hkdf(bytes(secret), b"confide/consent/pseudonym/v1")
        self.pseudonym_key = pkey  # for import worker processes (PrepSpec); never logged
        pseudonyms = Pseudonymizer(pkey)
        self.ref, self.refs = pseudonyms.ref, pseudonyms.refs
        self.wrap_key = _hkdf(bytes(secret), b"confide/consent/key-wrap/v1")  # for import workers too
        self._wrap = AESGCM(self.wrap_key)

        pseudonyms = Pseudonymizer(pkey)
        self.ref, self.refs = pseudonyms.ref, pseudonyms.refs

    def unwrap(self, ref: str, wrapped: bytes) -> AESGCM:
        return AESGCM(self._wrap.decrypt(wrapped[:12], wrapped[12:], ref.encode()))

    @staticmethod
    def open(aes: AESGCM, ref: str, event_id: str, sealed: bytes) -> str:
        return aes.decrypt(sealed[:12], sealed[12:], f"{ref}|{event_id}".encode()).decode("utf-8")


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _us(t: dt.datetime) -> int:
    return (t - EPOCH) // _US


def _from_us(us: int | None) -> dt.datetime | None:
    return None if us is None else EPOCH + dt.timedelta(microseconds=us)


def _fmt(t: dt.datetime | None) -> str:
    return "" if t is None else t.isoformat()


# --------------------------------------------------------------------------- notices


def notice_content_hash(n: NoticeIn) -> str:
    body = {
        "notice": n.notice,
        "version": n.version,
        "published_at": n.published_at.isoformat(),
        "purposes": sorted(
            (
                {
                    "purpose": p.purpose,
                    "recipients": sorted(set(p.recipients)),
                    "data_categories": sorted(set(p.data_categories)),
                }
                for p in n.purposes
            ),
            key=lambda d: str(d["purpose"]),
        ),
        "text": n.text,
    }
    import json

    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def insufficient_versions(
    notices: Sequence[_NoticeTerms], purpose: str, recipient: str | None, at: dt.datetime
) -> dict[str, str]:
    """Notice versions under which a grant does not (or no longer) cover `purpose` for
    `recipient` at `at`, with the reason (`not_in_notice` or `notice_superseded`)."""
    latest: dict[str, _NoticeTerms] = {}
    for n in notices:
        if n.published_at <= at:
            cur = latest.get(n.notice)
            if cur is None or (n.published_at, n.version) > (cur.published_at, cur.version):
                latest[n.notice] = n
    out: dict[str, str] = {}
    for n in notices:
        mine = n.entry_for(purpose)
        if mine is None or (recipient is not None and recipient not in mine[0]):
            out[n.version] = "not_in_notice"
            continue
        newest = latest.get(n.notice)
        if newest is None or newest.version == n.version or n.published_at > at:
            continue
        theirs = newest.entry_for(purpose)
        if theirs is None or theirs[1] != mine[1] or (recipient is not None and recipient not in theirs[0]):
            out[n.version] = "notice_superseded"
    return out


# --------------------------------------------------------------------------- the store


class ConsentStore:
    """Consent events, notices, preferences, usage records; implements `consent.gate.ConsentGate`.

    `bind` is an Engine or a sessionmaker. `secret_key` is the node's consent secret (pseudonyms
    and key wrapping derive from it; keep it stable: a new key orphans every record).
    `recipients` are the parties consent may name (plus any recipient a registered notice names).
    `audit` receives one entry per gate call, per recorded batch, per preference change, access
    and erasure. `clock` returns the current aware UTC time (injectable for tests).
    """

    def __init__(
        self,
        bind: Engine | sessionmaker[Session],
        *,
        secret_key: bytes,
        recipients: Iterable[str] = (),
        purposes: PurposeRegistry | None = None,
        audit: AuditSink | None = None,
        clock: Callable[[], dt.datetime] | None = None,
        max_batch: int = MAX_BATCH,
        timezone: str = "Asia/Shanghai",
        settings: ConsentSettings | None = None,
    ) -> None:
        if isinstance(bind, Engine):
            self.factory = db.session_factory(bind)
        else:
            self.factory = bind
        self._keys = _Keys(secret_key)
        self.purposes = purposes or PurposeRegistry.load()
        self.recipients = frozenset(recipients)
        self.audit: AuditSink = audit or LoggingAuditSink()
        self.clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self.max_batch = max_batch
        self.settings = settings or ConsentSettings()
        try:  # preference time windows are local times of the subjects' market
            self.timezone = zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigurationError(f"timezone: unknown time zone {timezone!r}") from exc
        self.on_withdrawal: list[WithdrawalHook] = []
        self.on_erasure: list[ErasureHook] = []

    # ------------------------------------------------------------------ hooks and helpers

    def add_withdrawal_hook(self, hook: WithdrawalHook) -> None:
        """`hook(subject, purpose, recipient)` runs after a withdrawal or refusal is committed
        (and for each personalised purpose when the no-personalisation switch is turned on):
        the node purges stored scores and segments and forwards per-recipient withdrawals."""
        self.on_withdrawal.append(hook)

    def add_erasure_hook(self, hook: ErasureHook) -> None:
        self.on_erasure.append(hook)

    def subject_ref(self, subject: str) -> str:
        """The stored pseudonym of `subject`."""
        return self._keys.ref(subject)

    def _now(self) -> dt.datetime:
        now = as_utc(self.clock())
        assert now is not None
        return now

    def _notices(self, session: Session) -> list[_NoticeTerms]:
        out = []
        for n in session.scalars(select(Notice)):
            entries = {
                p["purpose"]: (frozenset(p.get("recipients", ())), frozenset(p.get("data_categories", ())))
                for p in n.content.get("purposes", [])
            }
            out.append(_NoticeTerms(n.version, n.notice, n.published_at, entries))
        return out

    def known_recipients(self, session: Session | None = None) -> set[str]:
        """Configured parties plus every recipient a registered notice names."""
        if session is None:
            with self.factory() as s:
                return self.known_recipients(s)
        named: set[str] = set(self.recipients)
        for n in self._notices(session):
            for recips, _ in n.entries.values():
                named |= recips
        return named

    def _check_recipient(self, session: Session, recipient: str, field: str = "recipient") -> None:
        known = self.known_recipients(session)
        if recipient not in known:
            raise ValidationError(
                f"{field}: unknown recipient {recipient!r}; known: {', '.join(sorted(known)) or 'none'}",
                field=field,
            )

    def _fire_withdrawals(self, items: Iterable[tuple[str, str, str | None]]) -> list[str]:
        errors: list[str] = []
        for subject_, purpose, recipient in items:
            for hook in self.on_withdrawal:
                try:
                    hook(subject_, purpose, recipient)
                except Exception as exc:  # a failing hook must not undo a recorded withdrawal
                    log.error("withdrawal hook %r failed for purpose %s: %s", hook, purpose, exc)
                    errors.append(f"{getattr(hook, '__name__', hook)!s}: {exc}")
        return errors

    # ------------------------------------------------------------------ notices

    def register_notice(self, notice: NoticeIn | Mapping[str, Any]) -> NoticeOut:
        """Register an immutable notice version. Registering identical content again is a no-op;
        different content under an existing version raises Conflict."""
        n = _validate(NoticeIn, notice, "notice")
        for i, p in enumerate(n.purposes):
            self.purposes.get(p.purpose, field=f"purposes[{i}].purpose")
        digest = notice_content_hash(n)
        with db.session_scope(self.factory) as session:
            old = session.get(Notice, n.version)
            if old is not None:
                if old.content_hash != digest:
                    raise Conflict(
                        f"version: notice version {n.version!r} is already registered with other "
                        "content; notice versions are immutable, publish a new version",
                        field="version",
                    )
                return _notice_out(old)
            row = Notice(
                version=n.version,
                notice=n.notice,
                published_at=n.published_at,
                content_hash=digest,
                content={"purposes": [p.model_dump() for p in n.purposes], "text": n.text},
                recorded_at=self._now(),
            )
            session.add(row)
            self.audit.append(
                "consent.notice", {"version": n.version, "notice": n.notice, "content_hash": digest}, session=session
            )
            session.flush()
            return _notice_out(row)

    def notices(self) -> list[NoticeOut]:
        with self.factory() as session:
            return [_notice_out(n) for n in session.scalars(select(Notice).order_by(Notice.published_at))]

    # ------------------------------------------------------------------ recording

    def record(self, event: ConsentEventIn | Mapping[str, Any], *, default_actor: str = "subject") -> RecordResult:
        """Record one consent event (see `record_events`)."""
        return self.record_events([event], default_actor=default_actor)

    def record_events(
        self,
        events: Sequence[ConsentEventIn | Mapping[str, Any]],
        *,
        default_actor: str = "subject",
    ) -> RecordResult:
        """Record a batch atomically: all new events are stored, or none.

        Events already held with identical content are counted as duplicates (no-op). Raises
        ValidationError naming `events[i].field` for bad input or a batch over `max_batch`,
        Conflict for an event id already held with other content or an erased subject.
        """
        if len(events) > self.max_batch:
            raise ValidationError(
                f"events: batch of {len(events)} exceeds the limit of {self.max_batch}; split it",
                field="events",
            )
        parsed = [_validate(ConsentEventIn, e, f"events[{i}]") for i, e in enumerate(events)]
        return self._ingest_all(
            _event_chunks((f"events[{i}]", e) for i, e in enumerate(parsed)), default_actor=default_actor, source="api"
        )

    def import_events(
        self, events: Iterable[tuple[str, ConsentEventIn]], *, default_actor: str = "import"
    ) -> RecordResult:
        """Record a stream of (label, event) pairs of any length in one transaction; labels
        (e.g. `line 12`) name the offending row in errors. Idempotent by event id."""
        return self._ingest_all(_event_chunks(events), default_actor=default_actor, source="import")

    def import_chunks(self, chunks: Iterable[tuple[Any, ...]], *, default_actor: str = "import") -> RecordResult:
        """Record the raw chunks of a file (`consent.importer.read_chunks`; the chunk forms are
        described in `consent.prepare`) in one transaction, idempotent by event id. More than one
        chunk is prepared in worker processes. Raises ValidationError naming the line and field
        of the first bad row, Conflict as `record_events`; nothing is written then."""
        return self._ingest_all(chunks, default_actor=default_actor, source="import")

    def record_remote_withdrawal(
        self,
        subject: str,
        purpose: str,
        from_party: str,
        *,
        event_id: str,
        at: dt.datetime | None = None,
    ) -> RecordResult:
        """Recipient side of a forwarded per-recipient withdrawal: `subject` (this node's row key)
        is excluded from `purpose` with `from_party` for every later gate call. Idempotent by the
        originating `event_id`."""
        return self.record(
            {
                "event_id": f"remote:{from_party}:{event_id}"[:128],
                "subject": subject,
                "purpose": purpose,
                "recipient": from_party,
                "action": "withdrawn",
                "channel": "coordinator",
                "legal_basis": "consent",
                "actor": f"party:{from_party}",
                "received_at": at,
            },
            default_actor=f"party:{from_party}",
        )

    def _ingest_all(self, chunks: Iterable[tuple[Any, ...]], *, default_actor: str, source: str) -> RecordResult:
        recorded = 0
        duplicates = 0
        new_ids: list[str] = []
        withdrawals: list[tuple[str, str, str | None]] = []
        with db.session_scope(self.factory) as session:
            ctx = _IngestContext(self, session, default_actor)
            if ctx.pg:
                _open_state_stage(session)
            for n_new, n_dup, ids, wd in ctx.run(chunks, source):
                recorded += n_new
                duplicates += n_dup
                if len(new_ids) < 1000:
                    new_ids.extend(ids[: 1000 - len(new_ids)])
                withdrawals.extend(wd)
            if ctx.pg:
                _flush_state_stage(session)
            if ctx.pg and recorded >= 50_000:
                # Fresh planner statistics, or PostgreSQL scans the whole projection for a
                # 1,000-subject gate call right after a bulk import.
                session.execute(text("ANALYZE consent_state"))
                session.execute(text("ANALYZE consent_events"))
        errors = self._fire_withdrawals(withdrawals)
        return RecordResult(recorded=recorded, duplicates=duplicates, event_ids=new_ids, hook_errors=errors)

    # ------------------------------------------------------------------ the gate

    def allowed(
        self,
        subjects: Sequence[str],
        purpose: str,
        recipient: str | None,
        at: dt.datetime,
    ) -> GateDecision:
        """Decide for each subject (see the module docstring); write one audit entry with the
        counts. Unknown subjects are denied as `no_consent`. Raises ValidationError for an
        unknown purpose or recipient, or no recipient for a recipient-specific purpose."""
        spec = self.purposes.get(purpose)
        at_utc = as_utc(at) or self._now()
        subjects = list(subjects)
        with db.session_scope(self.factory) as session:
            if recipient:
                self._check_recipient(session, recipient)
            else:
                recipient = None
                if spec.recipient_specific:
                    raise ValidationError(
                        f"recipient: purpose {purpose!r} gives data to another party; name the recipient",
                        field="recipient",
                    )
            refs = self._keys.refs(subjects)
            separate = self.purposes.needs_named_grant(purpose, recipient)
            bad_versions = insufficient_versions(
                self._notices(session), purpose, recipient if separate else None, at_utc
            )
            lookup = _StateLookup(session, refs if len(set(refs)) <= _SMALL_GATE else None)
            good, vetoes, weak = lookup.classify(
                self.purposes.ancestors(purpose), recipient, separate, _us(at_utc), bad_versions
            )
            erased = lookup.column_set("SELECT subject_ref FROM consent_tombstones", ())
            opted = (
                lookup.column_set("SELECT subject_ref FROM consent_preferences WHERE no_personalised = {p}", (True,))
                if spec.personalised
                else set()
            )
            # Whole-list operations in C (map/compress/Counter): the gate must handle 10^6
            # subjects in about a second of CPU, so no per-subject Python loop here.
            deny: dict[str, str] = {}
            deny.update((r, "opted_out") for r in opted)
            deny.update(vetoes)
            deny.update((r, "erased") for r in erased)
            for r in deny:
                good.pop(r, None)
            evs = list(map(good.get, refs))
            allowed = list(compress(subjects, evs))
            evidence = dict(zip(allowed, filter(None, evs)))
            if len(allowed) == len(subjects):
                counts: Counter[str] = Counter()
            else:
                weak.update(deny)
                denied_refs = compress(refs, map(operator.not_, evs))
                counts = Counter(map(weak.get, denied_refs))
                if None in counts:
                    counts["no_consent"] += counts.pop(None)  # type: ignore[call-overload]
            decision = GateDecision(
                purpose=purpose,
                recipient=recipient,
                at=at_utc,
                allowed=allowed,
                evidence=evidence,
                denied_counts=dict(sorted(counts.items())),
            )
            payload = {
                "purpose": purpose,
                "recipient": recipient,
                "at": at_utc.isoformat(),
                "subjects": len(subjects),
                "allowed": len(allowed),
                "denied": decision.denied_counts,
            }
            session.add(
                GateCall(
                    purpose=purpose,
                    recipient=recipient or "",
                    at=at_utc,
                    decided_at=self._now(),
                    subjects=len(subjects),
                    allowed=len(allowed),
                    denied=decision.denied_counts,
                )
            )
            self.audit.append("consent.gate", payload, session=session)
        return decision

    # ------------------------------------------------------------------ subject queries

    def state(self, subject: str) -> SubjectState:
        """The current rules held for `subject` (one per purpose and recipient) and preferences."""
        ref = self._keys.ref(subject)
        with self.factory() as session:
            rows = _state_rows(session, ref)
            prefs = session.get(Preferences, ref)
            erased = session.get(Tombstone, ref) is not None
            return SubjectState(
                subject_ref=ref,
                erased=erased,
                entries=[_state_out(r) for r in rows],
                preferences=_prefs_out(prefs) if prefs else None,
            )

    def history(self, subject: str) -> list[ConsentEventOut]:
        """Every consent event held for `subject`, oldest first (identifiers not included)."""
        ref = self._keys.ref(subject)
        with self.factory() as session:
            return [_event_out(e) for e in _events_of(session, ref)]

    def access(self, subject: str, *, request_ref: str | None = None) -> AccessReport:
        """Everything held about `subject`: events (with decrypted identifiers while the subject
        key exists), current state, preferences and their history, usage. Audited."""
        ref = self._keys.ref(subject)
        with db.session_scope(self.factory) as session:
            key_row = session.get(SubjectKey, ref)
            aes = self._keys.unwrap(ref, key_row.wrapped_key) if key_row else None
            events = []
            for e in _events_of(session, ref):
                out = _event_out(e)
                if e.identifier_ct is not None:
                    if aes is not None:
                        out.identifier = self._keys.open(aes, ref, e.event_id, e.identifier_ct)
                    else:
                        out.identifier_erased = True
                events.append(out)
            tomb = session.get(Tombstone, ref)
            prefs = session.get(Preferences, ref)
            changes = session.scalars(
                select(PreferenceChange).where(PreferenceChange.subject_ref == ref).order_by(PreferenceChange.id)
            ).all()
            usage = session.scalars(
                select(UsageRecord)
                .join(UsageSubject, UsageSubject.usage_id == UsageRecord.id)
                .where(UsageSubject.subject_ref == ref)
                .order_by(UsageRecord.at, UsageRecord.id)
            ).all()
            state = _state_rows(session, ref)
            report = AccessReport(
                subject_ref=ref,
                erased=tomb is not None,
                tombstone=_tomb_out(tomb) if tomb else None,
                events=events,
                state=[_state_out(s) for s in state],
                preferences=_prefs_out(prefs) if prefs else None,
                preference_history=[
                    PreferenceChangeOut(changed_at=c.changed_at, actor=c.actor, channel=c.channel, snapshot=c.snapshot)
                    for c in changes
                ],
                usage=[_usage_out(u) for u in usage],
            )
            self.audit.append(
                "consent.access",
                {"subject_ref": ref, "request_ref": request_ref, "events": len(events), "usage": len(usage)},
                session=session,
            )
            return report

    def erase(self, subject: str, *, request_ref: str | None = None) -> TombstoneOut:
        """Erasure: destroy the subject key (its identifiers become unreadable), delete
        preferences, usage links and current state, keep the events (pseudonymous evidence) and
        a tombstone. Later gate calls deny the subject (`erased`); erasing again is a no-op."""
        ref = self._keys.ref(subject)
        now = self._now()
        with db.session_scope(self.factory) as session:
            old = session.get(Tombstone, ref)
            if old is not None:
                return _tomb_out(old)
            n_events = session.scalar(select(func.count()).where(ConsentEvent.subject_ref == ref)) or 0
            shredded = session.execute(delete(SubjectKey).where(SubjectKey.subject_ref == ref)).rowcount
            n_prefs = session.execute(delete(Preferences).where(Preferences.subject_ref == ref)).rowcount
            session.execute(delete(PreferenceChange).where(PreferenceChange.subject_ref == ref))
            n_usage = session.execute(delete(UsageSubject).where(UsageSubject.subject_ref == ref)).rowcount
            n_contacts = session.execute(delete(ContactRecord).where(ContactRecord.subject_ref == ref)).rowcount
            for row in _state_rows(session, ref):
                session.delete(row)
            detail = {
                "events_kept": int(n_events),
                "subject_key_destroyed": bool(shredded),
                "preferences_deleted": bool(n_prefs),
                "usage_links_deleted": int(n_usage),
                "contacts_deleted": int(n_contacts),
            }
            tomb = Tombstone(subject_ref=ref, erased_at=now, request_ref=request_ref or uuid.uuid4().hex, detail=detail)
            session.add(tomb)
            self.audit.append("consent.erasure", {"subject_ref": ref, "request_ref": tomb.request_ref, **detail}, session=session)
            session.flush()
            out = _tomb_out(tomb)
        for hook in self.on_erasure:
            try:
                hook(subject)
            except Exception as exc:
                log.error("erasure hook %r failed: %s", hook, exc)
        return out

    # ------------------------------------------------------------------ preferences

    def get_preferences(self, subject: str) -> PreferencesOut:
        """The subject's preferences (defaults, with `updated_at` None, if never set)."""
        ref = self._keys.ref(subject)
        with self.factory() as session:
            row = session.get(Preferences, ref)
            if row is None:
                return PreferencesOut(
                    subject_ref=ref, channels={}, time_windows=[], frequency_cap=None, topics=[],
                    no_personalised_marketing=False, updated_at=None,
                )
            return _prefs_out(row)

    def set_preferences(self, subject: str, prefs: PreferencesIn | Mapping[str, Any]) -> PreferencesOut:
        """Replace the subject's preferences; the change is kept in the history and audited.
        Turning "no personalised marketing" on fires the withdrawal hooks for every
        personalised purpose."""
        p = _validate(PreferencesIn, prefs, "preferences")
        ref = self._keys.ref(subject)
        now = self._now()
        with db.session_scope(self.factory) as session:
            if session.get(Tombstone, ref) is not None:
                raise Conflict("subject: this subject was erased; nothing more is recorded for it", field="subject")
            row = session.get(Preferences, ref)
            was_opted_out = bool(row and row.no_personalised)
            snapshot = p.model_dump(mode="json", exclude={"channel", "actor"})
            if row is None:
                row = Preferences(subject_ref=ref)
                session.add(row)
            row.channels = snapshot["channels"]
            row.time_windows = snapshot["time_windows"]
            row.frequency_cap = snapshot["frequency_cap"]
            row.topics = snapshot["topics"]
            row.no_personalised = p.no_personalised_marketing
            row.updated_at = now
            session.add(
                PreferenceChange(subject_ref=ref, changed_at=now, actor=p.actor or "subject", channel=p.channel, snapshot=snapshot)
            )
            self.audit.append(
                "consent.preferences",
                {"subject_ref": ref, "no_personalised_marketing": p.no_personalised_marketing, "channel": p.channel},
                session=session,
            )
            session.flush()
            out = _prefs_out(row)
        if p.no_personalised_marketing and not was_opted_out:
            self._fire_withdrawals((subject, key, None) for key in self._personalised_roots())
        return out

    def _personalised_roots(self) -> list[str]:
        keys = [k for k in self.purposes if self.purposes.personalised(k)]
        return [k for k in keys if not any(k.startswith(o + ".") for o in keys)]

    # ------------------------------------------------------------------ delivery (preferences enforced)

    def deliverable(
        self,
        subjects: Sequence[str],
        purpose: str,
        channel: str,
        topic: str,
        at: dt.datetime | None = None,
        *,
        recipient: str | None = None,
        record: bool = True,
        job_ref: str | None = None,
    ) -> DeliverableOut:
        """The subjects an activation or marketing job may contact at `at` on `channel` about
        `topic`: those the gate allows for `purpose` (an `activation.*` or `marketing.*` key;
        the gate call is audited as usual) whose preferences let them be reached now:

        - channels: if the subject opted in to any channel, `channel` must be one of them;
        - time windows: if any are set, `at` in the store's time zone lies in one (a window
          whose end is before its start runs past midnight into the next day);
        - frequency cap: fewer than `max_messages` contacts recorded in the rolling day
          (24 h), week (7 days) or month (30 days) up to `at`;
        - topics: if any are set, `topic` is one of them.

        A subject without preferences is reachable when the gate allows it. Repeated subjects
        count once. With `record`, one contact per deliverable subject is written to the
        contact history in the same transaction as the audit entry (counts only); calls are
        serialised so concurrent jobs cannot both use a subject's last allowed message.
        Raises ValidationError naming the field for a purpose outside activation/marketing,
        an unknown channel, a malformed topic, or what the gate refuses."""
        self.purposes.get(purpose)
        if purpose.split(".")[0] not in CONTACT_PURPOSE_ROOTS:
            raise ValidationError(
                f"purpose: contacting subjects needs an activation.* or marketing.* purpose, not {purpose!r}",
                field="purpose",
            )
        body = _validate(
            DeliverableIn,
            {"subjects": [], "purpose": purpose, "channel": channel, "topic": topic, "recipient": recipient,
             "at": at, "record": record, "job_ref": job_ref},
            "deliverable",
        )
        at_utc = as_utc(at) or self._now()
        distinct = list(dict.fromkeys(subjects))
        decision = self.allowed(distinct, purpose, recipient, at_utc)
        refs = self._keys.refs(decision.allowed)
        local = at_utc.astimezone(self.timezone)
        denied: Counter[str] = Counter(decision.denied_counts)
        ok: list[str] = []
        ok_refs: list[str] = []
        with db.session_scope(self.factory) as session:
            pg = session.get_bind().dialect.name == "postgresql"
            if record:
                _lock_contacts(session, pg)
            prefs: dict[str, Preferences] = {}
            for chunk in _chunks(sorted(set(refs)), _IN_CHUNK):
                prefs.update((p.subject_ref, p) for p in session.scalars(
                    select(Preferences).where(Preferences.subject_ref.in_(chunk))))
            sent = _recent_contacts(session, [p for p in prefs.values() if p.frequency_cap], at_utc)
            for subject, ref in zip(decision.allowed, refs):
                p = prefs.get(ref)
                reason = None if p is None else _preference_denial(p, body.channel, body.topic, local, sent.get(ref, 0))
                if reason is None:
                    ok.append(subject)
                    ok_refs.append(ref)
                else:
                    denied[reason] += 1
            if record and ok_refs:
                when = _pg_ts(at_utc) if pg else _sqlite_ts(at_utc)
                _bulk_insert(
                    session, "consent_contacts", ("subject_ref", "at", "channel", "topic", "purpose", "job_ref"),
                    [(r, when, body.channel, body.topic, purpose, job_ref or "") for r in ok_refs], pg,
                )
            counts = dict(sorted(denied.items()))
            self.audit.append(
                "consent.delivery",
                {"purpose": purpose, "recipient": recipient, "channel": body.channel, "topic": body.topic,
                 "at": at_utc.isoformat(), "job_ref": job_ref, "subjects": len(distinct), "deliverable": len(ok),
                 "denied": counts, "recorded": len(ok_refs) if record else 0},
                session=session,
            )
        return DeliverableOut(
            purpose=purpose, channel=body.channel, topic=body.topic, recipient=recipient, at=at_utc,
            deliverable=ok, deliverable_count=len(ok), denied_counts=counts, recorded=len(ok_refs) if record else 0,
        )

    # ------------------------------------------------------------------ retention

    def purge(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Reduce consent records past the retention period (`settings.retention_days`, at
        least three years) without losing evidence, in one audited transaction:

        - events received before the cutoff that are no longer the current rule of their
          subject, purpose and recipient (or whose subject is erased) lose their encrypted
          identifier; every field their content hash and their import batch's audit digest
          cover stays, so both can still be recomputed;
        - gate-call rows and contact-history rows older than the cutoff are deleted (their
          counts are in the audit log; frequency caps look back 30 days at most).

        Returns the counts. Current rules are never touched, however old."""
        cutoff = (as_utc(now) or self._now()) - dt.timedelta(days=self.settings.retention_days)
        with db.session_scope(self.factory) as session:
            current = select(ConsentState.event_id).where(
                ConsentState.subject_ref == ConsentEvent.subject_ref,
                ConsentState.purpose == ConsentEvent.purpose,
                ConsentState.recipient == ConsentEvent.recipient,
                ConsentState.event_id == ConsentEvent.event_id,
            )
            reduced = session.execute(
                update(ConsentEvent)
                .where(and_(ConsentEvent.received_at < cutoff, ConsentEvent.identifier_ct.is_not(None),
                            ~current.exists()))
                .values(identifier_ct=None)
                .execution_options(synchronize_session=False)
            ).rowcount
            gate_calls = session.execute(delete(GateCall).where(GateCall.decided_at < cutoff)).rowcount
            contacts = session.execute(delete(ContactRecord).where(ContactRecord.at < cutoff)).rowcount
            counts = {"identifiers_dropped": int(reduced or 0), "gate_calls_deleted": int(gate_calls or 0),
                      "contacts_deleted": int(contacts or 0)}
            self.audit.append(
                "consent.purge", {"cutoff": cutoff.isoformat(), "retention_days": self.settings.retention_days, **counts},
                session=session,
            )
        return counts

    # ------------------------------------------------------------------ usage records

    def record_usage(
        self,
        job_id: str,
        purpose: str,
        subjects: Sequence[str],
        *,
        agreement_id: str | None = None,
        recipient: str | None = None,
        at: dt.datetime | None = None,
    ) -> UsageOut:
        """Record that job `job_id` processed `subjects` for `purpose` (record of processing
        activities; the subjects' access reports list it). Recording the same job, purpose and
        recipient again adds subjects not yet listed."""
        self.purposes.get(purpose)
        when = as_utc(at) or self._now()
        refs = sorted(set(self._keys.refs(subjects)))
        with db.session_scope(self.factory) as session:
            if recipient:
                self._check_recipient(session, recipient)
            row = session.scalars(
                select(UsageRecord).where(
                    UsageRecord.job_id == job_id, UsageRecord.purpose == purpose, UsageRecord.recipient == (recipient or "")
                )
            ).first()
            if row is None:
                row = UsageRecord(
                    job_id=job_id, purpose=purpose, recipient=recipient or "", agreement_id=agreement_id or "",
                    at=when, subjects_count=0,
                )
                session.add(row)
                session.flush()
                fresh = refs
            else:
                have: set[str] = set()
                for chunk in _chunks(refs, _IN_CHUNK):
                    have |= set(
                        session.scalars(
                            select(UsageSubject.subject_ref).where(
                                UsageSubject.usage_id == row.id, UsageSubject.subject_ref.in_(chunk)
                            )
                        )
                    )
                fresh = [r for r in refs if r not in have]
            if fresh:
                pg = session.get_bind().dialect.name == "postgresql"
                _bulk_insert(session, "consent_usage_subjects", ("usage_id", "subject_ref"),
                             [(row.id, r) for r in fresh], pg)
            row.subjects_count += len(fresh)
            self.audit.append(
                "consent.usage",
                {"job_id": job_id, "purpose": purpose, "recipient": recipient, "agreement_id": agreement_id,
                 "subjects": row.subjects_count},
                session=session,
            )
            session.flush()
            return _usage_out(row)


# --------------------------------------------------------------------------- delivery helpers

_CAP_PERIOD = {"day": dt.timedelta(days=1), "week": dt.timedelta(days=7), "month": dt.timedelta(days=30)}
# Key of the PostgreSQL advisory lock that serialises contact recording (frequency caps).
_PG_CONTACT_LOCK = int.from_bytes(hashlib.sha256(b"confide-consent-contacts").digest()[:8], "big", signed=True)


def _lock_contacts(session: Session, pg: bool) -> None:
    if pg:
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CONTACT_LOCK})
    else:  # take SQLite's write lock now, before the counts are read
        session.execute(text("DELETE FROM consent_contacts WHERE 0 = 1"))


def _recent_contacts(session: Session, capped: list[Preferences], at: dt.datetime) -> dict[str, int]:
    """Contacts recorded per subject in each capped subject's rolling cap period up to `at`."""
    out: dict[str, int] = {}
    by_period: dict[str, list[str]] = {}
    for p in capped:
        by_period.setdefault(str(p.frequency_cap["per"]), []).append(p.subject_ref)  # type: ignore[index]
    for per, refs in by_period.items():
        since = at - _CAP_PERIOD[per]
        for chunk in _chunks(refs, _IN_CHUNK):
            rows = session.execute(
                select(ContactRecord.subject_ref, func.count())
                .where(ContactRecord.subject_ref.in_(chunk), ContactRecord.at > since, ContactRecord.at <= at)
                .group_by(ContactRecord.subject_ref)
            ).all()
            out.update((r, int(n)) for r, n in rows)
    return out


def _in_window(window: Mapping[str, Any], local: dt.datetime) -> bool:
    days = set(window.get("days", range(7)))
    start = dt.time.fromisoformat(str(window["start"]))
    end = dt.time.fromisoformat(str(window["end"]))
    t, day = local.time(), local.weekday()
    if start < end:
        return day in days and start <= t < end
    return (day in days and t >= start) or ((day - 1) % 7 in days and t < end)


def _preference_denial(p: Preferences, channel: str, topic: str, local: dt.datetime, sent: int) -> str | None:
    """Why preferences `p` keep the subject from being contacted now, or None."""
    opted_in = {c for c, on in (p.channels or {}).items() if on}
    if p.channels and channel not in opted_in:
        return "channel_not_allowed"
    if p.time_windows and not any(_in_window(w, local) for w in p.time_windows):
        return "outside_time_window"
    cap = p.frequency_cap
    if cap is not None and sent >= int(cap["max_messages"]):
        return "frequency_cap"
    if p.topics and topic not in p.topics:
        return "topic_not_wanted"
    return None


# --------------------------------------------------------------------------- ingest


_WriteResult = tuple[int, int, list[str], list[tuple[str, str, str | None]]]


class _IngestContext:
    """Per-transaction state of an ingest: caches of notices, recipients and subject keys, and
    the preparation spec (see `consent.prepare`)."""

    def __init__(self, store: ConsentStore, session: Session, default_actor: str) -> None:
        self.store = store
        self.session = session
        self.notices = {n.version: n for n in store._notices(session)}
        self.recipients = store.known_recipients(session)
        self.now = store._now()
        # Subject keys used by this import (AESGCM, or a key made by the preparer as raw bytes).
        self.subject_keys: dict[str, AESGCM | bytes] = {}
        self.keys_empty = session.scalar(select(SubjectKey.subject_ref).limit(1)) is None
        self.any_tombstones = session.scalar(select(func.count()).select_from(Tombstone)) != 0
        self.events_empty = session.scalar(select(ConsentEvent.event_id).limit(1)) is None
        # Into an empty event table, only ids this import already wrote can exist: they are
        # remembered (up to a bound) so later chunks ask the database about repeats only.
        self.written_ids: set[str] | None = set() if self.events_empty else None
        self.pg = session.get_bind().dialect.name == "postgresql"
        self.ts = _pg_ts if self.pg else _sqlite_ts
        self.spec = PrepSpec(
            pseudonym_key=store._keys.pseudonym_key, wrap_key=store._keys.wrap_key, purposes=store.purposes, recipients=frozenset(self.recipients),
            notices=self.notices, now=self.now, default_actor=default_actor, pg=self.pg,
        )
        self.preparer = Preparer(self.spec)
        if not self.pg:
            # A bigger page cache keeps the index B-trees in memory during bulk imports.
            _raw(session).execute("PRAGMA cache_size = -1048576")

    def run(self, chunks: Iterable[tuple[Any, ...]], source: str) -> Iterator[_WriteResult]:
        """Prepare and write every chunk, in order. A file import of more than one chunk is
        prepared by worker processes (parse, validate, pseudonymise, hash: Python CPU) while
        this process writes (encrypt identifiers, COPY or executemany, audit), so both cores
        work. Errors keep their sequential order: chunk k's results, including its error, are
        taken only after every earlier chunk was written cleanly."""
        it = iter(chunks)
        first = next(it, None)
        if first is None:
            return
        second = next(it, None)
        rest = itertools.chain([first], [] if second is None else [second], it)
        if second is None or first[0] == "events" or _IMPORT_WORKERS < 1:
            for chunk in rest:
                yield self.write(self.preparer.prepare(chunk), chunk, source)
            return
        # fork: a worker starts at once and needs nothing re-imported (forkserver and spawn
        # would also re-run the caller's main script, breaking scripts without a main guard).
        context = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(
            max_workers=_IMPORT_WORKERS, mp_context=context, initializer=init_worker, initargs=(self.spec,)
        )
        pending: collections.deque[tuple[tuple[Any, ...], Future[tuple[str, Any]]]] = collections.deque()
        try:
            for chunk in rest:
                pending.append((chunk, pool.submit(work, chunk)))
                if len(pending) > _IMPORT_WORKERS * (1 + _POOL_AHEAD):
                    yield self._write_done(*pending.popleft(), source)
            while pending:
                yield self._write_done(*pending.popleft(), source)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _write_done(self, chunk: tuple[Any, ...], future: Future[tuple[str, Any]], source: str) -> _WriteResult:
        status, value = future.result()
        if status == "error":
            raise rebuild_error(*value)
        return self.write(value, chunk, source)

    def write(self, batch: Batch, chunk: tuple[Any, ...], source: str) -> _WriteResult:
        """Drop events already recorded (raising Conflict for an id recorded with other content
        or an erased subject), encrypt identifiers, write events and projection rows, and
        append the batch's audit entry. Returns (recorded, duplicates, new ids, withdrawals)."""
        session = self.session
        if not self.events_empty and batch.ids:
            candidates = batch.ids if self.written_ids is None else [i for i in batch.ids if i in self.written_ids]
            found: dict[str, tuple[str, dt.datetime]] = {}
            for ids in _chunks(candidates, _IN_CHUNK):
                found.update((i, (h, r)) for i, h, r in _existing_events(session, ids, self.pg))
            if found:
                batch = self._drop_recorded(batch, chunk, found)
        if not batch.ids:
            return 0, batch.duplicates, [], []
        if self.any_tombstones:
            erased = set()
            for refs_chunk in _chunks(sorted(set(batch.refs)), _IN_CHUNK):
                erased |= set(session.scalars(select(Tombstone.subject_ref).where(Tombstone.subject_ref.in_(refs_chunk))))
            for i, ref in enumerate(batch.refs):
                if ref in erased:
                    label = batch.label(i)
                    raise Conflict(
                        f"{label}.subject: this subject was erased; nothing more is recorded for it",
                        field=f"{label}.subject",
                    )
        refs, ids, rows = batch.refs, batch.ids, batch.rows
        if batch.idents:
            self._settle_keys(batch)
        if self.pg:
            _copy_text(session, "consent_events", EVENT_COLS, "".join(rows))
            _copy_text(session, "consent_state_stage", _STATE_COLS, "".join(batch.state))
        else:
            _bulk_insert(session, "consent_events", EVENT_COLS, rows, False)
            _upsert_state(session, batch.state, False)
        self.events_empty = False
        if self.written_ids is not None:
            if len(self.written_ids) + len(ids) > _REMEMBER_IDS:
                self.written_ids = None  # from here on every id is checked in the database
            else:
                self.written_ids.update(ids)
        payload: dict[str, Any] = {
            "source": source,
            "batch_id": batch.batch_id,
            "count": len(ids),
            "actions": batch.actions,
            # sha256 over the batch's event content hashes in event-id order (recomputable).
            "digest": batch.digest,
        }
        if batch.single is not None:
            payload.update(
                event_id=ids[0], subject_ref=refs[0], purpose=batch.single[0], action=batch.single[1],
                content_hash=batch.hashes[0],
            )
        self.store.audit.append("consent.events", payload, session=session)
        return len(ids), batch.duplicates, ids, batch.withdrawals

    def _drop_recorded(self, batch: Batch, chunk: tuple[Any, ...], found: Mapping[str, tuple[str, dt.datetime]]) -> Batch:
        """`batch` without the events `found` already recorded (id -> content hash, received_at);
        raises Conflict for one recorded with other content. An event sent without received_at
        is compared as if sent with the stored one (a retry). Re-prepares the chunk in-process:
        only re-imports that overlap what is stored come here."""
        pos = {event_id: i for i, event_id in enumerate(batch.ids)}
        retry = {i: r for i, (h, r) in found.items() if batch.hashes[pos[i]] != h and i in batch.no_received}
        again = self.preparer.prepare(chunk, received=retry) if retry else batch
        again_pos = pos if again is batch else {event_id: i for i, event_id in enumerate(again.ids)}
        for event_id, (digest, _received) in found.items():
            i = again_pos[event_id]
            if again.hashes[i] != digest:
                label = again.label(i)
                raise Conflict(
                    f"{label}.event_id: event id {event_id!r} is already recorded with different "
                    "content; event ids must be unique",
                    field=f"{label}.event_id",
                )
        if len(found) == len(batch.ids):
            batch.duplicates += len(found)
            batch.ids, batch.refs, batch.hashes = [], [], []
            return batch
        return self.preparer.prepare(chunk, exclude=set(found))

    def _settle_keys(self, batch: Batch) -> None:
        """Give every subject of `batch` with an identifier one key: a subject with a stored key
        (or one from an earlier chunk) keeps it and its rows are encrypted again under it; a
        new subject keeps the key the preparer made, which is stored (wrapped) here."""
        refs = batch.refs
        unknown = {refs[i] for i, _ in batch.idents} - self.subject_keys.keys()
        if unknown and not self.keys_empty:
            for ref, wrapped in _stored_keys(self.session, sorted(unknown), self.pg):
                self.subject_keys[ref] = self.store._keys.unwrap(ref, wrapped)
        fresh = []
        adopted: set[str] = set()
        created = self.ts(self.now)
        for i, ident in batch.idents:
            ref = refs[i]
            if ref in adopted:
                continue
            key = self.subject_keys.get(ref)
            if key is None:
                key, wrapped = batch.new_keys[ref]
                self.subject_keys[ref] = key
                adopted.add(ref)
                fresh.append((ref, wrapped, created))
                continue
            if isinstance(key, bytes):
                key = self.subject_keys[ref] = AESGCM(key)
            ct = seal(key, ref, batch.ids[i], ident)
            row = batch.rows[i]
            batch.rows[i] = f"{row[: row.rindex(chr(9)) + 1]}\\\\x{ct.hex()}\n" if self.pg else (*row[:-1], ct)
        if fresh:
            _bulk_insert(self.session, "consent_subject_keys", ("subject_ref", "wrapped_key", "created_at"), fresh, self.pg)


def _stored_keys(session: Session, refs: list[str], pg: bool) -> list[tuple[str, bytes]]:
    """(subject_ref, wrapped_key) of the stored subject keys among `refs`."""
    out: list[tuple[str, bytes]] = []
    cur = _raw(session).cursor()
    try:
        for chunk in _chunks(refs, _IN_CHUNK):
            if pg:
                cur.execute("SELECT subject_ref, wrapped_key FROM consent_subject_keys WHERE subject_ref = ANY(%s)", (chunk,))
            else:
                marks = ", ".join("?" * len(chunk))
                cur.execute(f"SELECT subject_ref, wrapped_key FROM consent_subject_keys WHERE subject_ref IN ({marks})", chunk)
            out.extend((r, bytes(w)) for r, w in cur.fetchall())
    finally:
        cur.close()
    return out


def _sqlite_ts(v: dt.datetime | None) -> str | None:
    """A UTC time in the text form SQLAlchemy's SQLite DateTime stores and parses."""
    if v is None:
        return None
    if v.tzinfo is not dt.timezone.utc and v.utcoffset():
        v = v.astimezone(dt.timezone.utc)
    text_ = v.isoformat(" ")[:-6]  # drop the zero offset "+00:00"
    return text_ if v.microsecond else text_ + ".000000"


def _pg_ts(v: dt.datetime | None) -> dt.datetime | None:
    return None if v is None else v.astimezone(dt.timezone.utc).replace(tzinfo=None)


def _raw(session: Session) -> Any:
    """The DB-API connection under the session's transaction (bulk paths bypass the ORM:
    building 10^6 SQLAlchemy parameter sets costs more than the database work)."""
    raw = session.connection().connection.driver_connection
    assert raw is not None
    return raw


def _existing_events(session: Session, ids: list[str], pg: bool) -> list[tuple[str, str, dt.datetime]]:
    """(event_id, content_hash, received_at) of the events among `ids` already recorded."""
    cur = _raw(session).cursor()
    try:
        if pg:
            cur.execute(
                "SELECT event_id, content_hash, received_at FROM consent_events WHERE event_id = ANY(%s)", (ids,)
            )
            return [(i, h, r.replace(tzinfo=dt.timezone.utc)) for i, h, r in cur.fetchall()]
        marks = ", ".join("?" * len(ids))
        cur.execute(f"SELECT event_id, content_hash, received_at FROM consent_events WHERE event_id IN ({marks})", ids)
        return [(i, h, dt.datetime.fromisoformat(r).replace(tzinfo=dt.timezone.utc)) for i, h, r in cur.fetchall()]
    finally:
        cur.close()


def _event_chunks(labelled: Iterable[tuple[str, ConsentEventIn]]) -> Iterator[tuple[Any, ...]]:
    return (("events", chunk) for chunk in _chunks(labelled, _IMPORT_CHUNK))


def _copy_text(session: Session, table: str, cols: Sequence[str], data: str) -> None:
    """PostgreSQL COPY of rows already in COPY text form, inside the session's transaction."""
    if not data:
        return
    with _raw(session).cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
            copy.write(data)


def _bulk_insert(session: Session, table: str, cols: Sequence[str], rows: list[tuple[Any, ...]], pg: bool) -> None:
    if not rows:
        return
    if pg:
        _copy_rows(session, table, cols, rows)
        return
    marks = ", ".join("?" * len(cols))
    _raw(session).executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", rows)


def _copy_rows(session: Session, table: str, cols: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """PostgreSQL COPY inside the session's transaction (many times faster than INSERTs)."""
    with _raw(session).cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)


_STATE_COLS = list(STATE_COLS)
_STATE_SET = ", ".join(f"{c} = excluded.{c}" for c in _STATE_COLS[3:])


_UPSERT = (
    f"ON CONFLICT (purpose, recipient, subject_ref) DO UPDATE SET {_STATE_SET} "
    "WHERE excluded.order_key > consent_state.order_key"
)


def _upsert_state(session: Session, rows: list[tuple[Any, ...]], pg: bool) -> None:
    """Insert or replace projection rows, keeping whichever event sorts last (order_key).

    On PostgreSQL the rows only go to a staging table here; `_flush_state_stage` merges the
    whole import at the end in one set-based statement (sorted, one row per key), which lets
    the server insert into the key's B-tree in order instead of 10^6 random probes."""
    if not rows:
        return
    if pg:
        _copy_rows(session, "consent_state_stage", _STATE_COLS, rows)
        return
    marks = ", ".join("?" * len(_STATE_COLS))
    _raw(session).executemany(
        f"INSERT INTO consent_state ({', '.join(_STATE_COLS)}) VALUES ({marks}) {_UPSERT}", rows
    )


def _open_state_stage(session: Session) -> None:
    session.execute(
        text(
            "CREATE TEMP TABLE IF NOT EXISTS consent_state_stage "
            "(LIKE consent_state INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
    )
    session.execute(text("TRUNCATE consent_state_stage"))  # DELETE would leave dead rows to rescan


def _flush_state_stage(session: Session) -> None:
    cols = ", ".join(_STATE_COLS)
    # Room to sort a whole import in memory (the default 4 MB spills 10^6 rows to disk);
    # SET LOCAL ends with the transaction.
    session.execute(text("SET LOCAL work_mem = '256MB'"))
    # Into an empty projection (a first bulk load) a plain INSERT is sound and ~40% cheaper
    # than ON CONFLICT; the lock (readers unaffected) keeps other writers from adding a key
    # until this transaction ends, and the emptiness is checked again under it.
    upsert = _UPSERT
    if session.execute(text("SELECT NOT EXISTS (SELECT 1 FROM consent_state)")).scalar():
        session.execute(text("LOCK TABLE consent_state IN SHARE ROW EXCLUSIVE MODE"))
        if session.execute(text("SELECT NOT EXISTS (SELECT 1 FROM consent_state)")).scalar():
            upsert = ""
    session.execute(
        text(
            f"INSERT INTO consent_state ({cols}) "
            f"SELECT DISTINCT ON (purpose, recipient, subject_ref) {cols} FROM consent_state_stage "
            f"ORDER BY purpose, recipient, subject_ref, order_key DESC {upsert}"
        )
    )
    session.execute(text("TRUNCATE consent_state_stage"))


# --------------------------------------------------------------------------- gate lookups


class _StateLookup:
    """Bulk reads for one gate call, through the raw DB-API cursor: the gate may read 10^6 rows
    and SQLAlchemy row objects would cost more than the query."""

    def __init__(self, session: Session, refs: Sequence[str] | None) -> None:
        self.conn = session.connection()
        self.dialect = self.conn.dialect.name
        self.mark = "%s" if self.dialect == "postgresql" else "?"
        self.refs = sorted(set(refs)) if refs is not None else None

    def _run(self, sql: str, params: Sequence[Any]) -> Iterator[list[tuple[Any, ...]]]:
        """Run `sql` ({p} marks parameters) over all subjects, or chunk by chunk of `refs`;
        yields the rows of each statement as one list."""
        raw = self.conn.connection.driver_connection
        assert raw is not None
        sql = sql.replace("{p}", self.mark)
        chunks: Iterable[list[str] | None] = [None] if self.refs is None else _chunks(self.refs, _IN_CHUNK)
        for chunk in chunks:
            cur = raw.cursor()
            try:
                if chunk is None:
                    cur.execute(sql, tuple(params))
                else:
                    if not chunk:
                        continue
                    marks = ", ".join([self.mark] * len(chunk))
                    cur.execute(f"{sql} AND subject_ref IN ({marks})", (*params, *chunk))
                yield cur.fetchall()
            finally:
                cur.close()

    def column_set(self, sql: str, params: Sequence[Any]) -> set[str]:
        if " WHERE " not in sql:
            sql += " WHERE 1 = 1"
        return {row[0] for rows in self._run(sql, params) for row in rows}

    def classify(
        self,
        purposes: list[str],
        recipient: str | None,
        separate: bool,
        at_us: int,
        bad_versions: Mapping[str, str],
    ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        """(usable grants ref -> event id, vetoes ref -> reason, weakest-denial ref -> reason).

        Rules for no recipient and, when the call names one, for that recipient apply. With
        `separate` (a recipient-specific purpose) only a grant naming the recipient is usable;
        grants for no or another recipient make the denial reason `no_recipient_consent`."""
        pm = ", ".join(["{p}"] * len(purposes))
        usable = [recipient] if separate and recipient else ["", recipient] if recipient else [""]
        um = ", ".join(["{p}"] * len(usable))
        bad = sorted(bad_versions)
        bad_clause = f" AND COALESCE(notice_version, '') NOT IN ({', '.join(['{p}'] * len(bad))})" if bad else ""
        good_where = (
            f"action = 'granted' AND recipient IN ({um}) AND valid_from_us <= {{p}} "
            "AND (valid_until_us IS NULL OR valid_until_us > {p})" + bad_clause
        )
        good_params = [*usable, at_us, at_us, *bad]
        if separate:
            base, base_params = f"FROM consent_state WHERE purpose IN ({pm})", list(purposes)
        else:
            recs = ["", recipient] if recipient else [""]
            base = f"FROM consent_state WHERE purpose IN ({pm}) AND recipient IN ({', '.join(['{p}'] * len(recs))})"
            base_params = [*purposes, *recs]
        good: dict[str, str] = {}
        for rows in self._run(f"SELECT subject_ref, event_id {base} AND {good_where}", [*base_params, *good_params]):
            good.update(rows)  # (ref, event id) pairs straight into the dict, no Python loop
        vetoes: dict[str, str] = {}
        weak: dict[str, str] = {}
        rest = self._run(
            f"SELECT subject_ref, recipient, action, notice_version, valid_from_us, valid_until_us {base} "
            f"AND NOT ({good_where})",
            [*base_params, *good_params],
        )
        applies = ("", recipient or "")
        for ref, rec, action, version, vf, vu in itertools.chain.from_iterable(rest):
            if action == "withdrawn" or action == "refused":
                if rec in applies and vetoes.get(ref) != "withdrawn":
                    vetoes[ref] = action
                continue
            if rec not in usable:
                if action != "granted":
                    continue
                reason = "no_recipient_consent"
            elif action == "expired":
                reason = "expired"
            elif vu is not None and vu <= at_us:
                reason = "expired"
            elif vf > at_us:
                reason = "not_yet_valid"
            else:
                reason = bad_versions.get(version or "", "not_in_notice")
            old = weak.get(ref)
            if old is None or _WEAK_RANK[reason] > _WEAK_RANK[old]:
                weak[ref] = reason
        return good, vetoes, weak


# --------------------------------------------------------------------------- converters


def _validate(model: Any, value: Any, label: str) -> Any:
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except PydanticValidationError as exc:
        raise pydantic_error(exc, label) from None


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def _events_of(session: Session, ref: str) -> Sequence[ConsentEvent]:
    return session.scalars(
        select(ConsentEvent).where(ConsentEvent.subject_ref == ref).order_by(ConsentEvent.received_at, ConsentEvent.event_id)
    ).all()


def _event_out(e: ConsentEvent) -> ConsentEventOut:
    return ConsentEventOut(
        event_id=e.event_id, subject_ref=e.subject_ref, purpose=e.purpose, recipient=e.recipient or None,
        action=e.action,  # type: ignore[arg-type]
        legal_basis=e.legal_basis, channel=e.channel, notice_version=e.notice_version,
        valid_from=e.valid_from, valid_until=e.valid_until, actor=e.actor, received_at=e.received_at,
        content_hash=e.content_hash,
    )


def _state_rows(session: Session, ref: str) -> list[ConsentState]:
    """The projection rows of one subject, found by primary key: the projection has no index
    on subject_ref alone (it would cost a third of the bulk-import time), so the keys come
    from the subject's events, which are indexed by subject."""
    keys = session.execute(
        select(ConsentEvent.purpose, ConsentEvent.recipient).where(ConsentEvent.subject_ref == ref).distinct()
    ).all()
    rows = [session.get(ConsentState, (purpose, recipient, ref)) for purpose, recipient in keys]
    return sorted((r for r in rows if r is not None), key=lambda r: (r.purpose, r.recipient))


def _state_out(s: ConsentState) -> StateEntry:
    vf = _from_us(s.valid_from_us)
    assert vf is not None
    return StateEntry(
        purpose=s.purpose, recipient=s.recipient or None, action=s.action,  # type: ignore[arg-type]
        event_id=s.event_id, notice_version=s.notice_version, valid_from=vf, valid_until=_from_us(s.valid_until_us),
    )


def _prefs_out(p: Preferences) -> PreferencesOut:
    return PreferencesOut(
        subject_ref=p.subject_ref, channels=dict(p.channels), time_windows=list(p.time_windows),  # type: ignore[arg-type]
        frequency_cap=p.frequency_cap,  # type: ignore[arg-type]
        topics=list(p.topics), no_personalised_marketing=p.no_personalised, updated_at=p.updated_at,
    )


def _usage_out(u: UsageRecord) -> UsageOut:
    return UsageOut(
        job_id=u.job_id, purpose=u.purpose, recipient=u.recipient or None, agreement_id=u.agreement_id or None,
        at=u.at, subjects_count=u.subjects_count,
    )


def _tomb_out(t: Tombstone) -> TombstoneOut:
    return TombstoneOut(subject_ref=t.subject_ref, erased_at=t.erased_at, request_ref=t.request_ref, detail=dict(t.detail))


def _notice_out(n: Notice) -> NoticeOut:
    purposes = n.content.get("purposes", [])
    return NoticeOut(
        notice=n.notice, version=n.version, published_at=n.published_at, purposes=purposes,
        text=n.content.get("text", ""), content_hash=n.content_hash,
        recipients=sorted({r for p in purposes for r in p.get("recipients", [])}),
        data_categories=sorted({c for p in purposes for c in p.get("data_categories", [])}),
    )
