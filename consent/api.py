"""REST endpoints of the consent service: a router factory the node mounts.

    app.include_router(consent_router(get_store), prefix="/consent")

`get_store` is a FastAPI dependency returning the node's `ConsentStore`. Routes validate and
delegate; errors are `ConfideError`s, translated to status codes by the app's handlers
(`confide.web.install_error_handlers`). Routes are plain `def`: the store blocks on the database,
so FastAPI runs them in its thread pool.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, Query, Response, status

from confide.errors import ValidationError
from consent import reports
from consent.schemas import (
    AccessReport,
    CheckIn,
    CheckOut,
    ConsentEventBatchIn,
    ConsentEventIn,
    ConsentEventOut,
    DeliverableIn,
    DeliverableOut,
    ErasureIn,
    NoticeIn,
    NoticeOut,
    PreferencesIn,
    PreferencesOut,
    RecordResult,
    RemoteWithdrawalIn,
    SubjectState,
    TombstoneOut,
)
from consent.store import ConsentStore


def consent_router(get_store: Callable[..., ConsentStore]) -> APIRouter:
    """The consent endpoints (no prefix of their own; the node mounts them, e.g. at /consent)."""
    router = APIRouter(tags=["consent"])
    Store = Depends(get_store)

    @router.post("/events", response_model=RecordResult, status_code=status.HTTP_201_CREATED)
    def record_event(event: ConsentEventIn, response: Response, store: ConsentStore = Store) -> RecordResult:
        """Record one consent event (e.g. from a mini-program backend). Idempotent by event_id:
        a repeat answers 200 with `duplicates: 1`."""
        result = store.record(event)
        if result.recorded == 0:
            response.status_code = status.HTTP_200_OK
        return result

    @router.post("/events/batch", response_model=RecordResult, status_code=status.HTTP_201_CREATED)
    def record_batch(batch: ConsentEventBatchIn, store: ConsentStore = Store) -> RecordResult:
        """Record up to the store's batch limit of events atomically (all or none)."""
        return store.record_events(batch.events)

    @router.post("/remote-withdrawals", response_model=RecordResult, status_code=status.HTTP_201_CREATED)
    def remote_withdrawal(body: RemoteWithdrawalIn, store: ConsentStore = Store) -> RecordResult:
        """Recipient side: exclude a subject from processing with `from_party` from now on."""
        return store.record_remote_withdrawal(
            body.subject, body.purpose, body.from_party, event_id=body.event_id, at=body.at
        )

    @router.get("/subjects/{subject}/state", response_model=SubjectState)
    def subject_state(subject: str, store: ConsentStore = Store) -> SubjectState:
        return store.state(subject)

    @router.get("/subjects/{subject}/history", response_model=list[ConsentEventOut])
    def subject_history(subject: str, store: ConsentStore = Store) -> list[ConsentEventOut]:
        return store.history(subject)

    @router.get("/subjects/{subject}/preferences", response_model=PreferencesOut)
    def get_preferences(subject: str, store: ConsentStore = Store) -> PreferencesOut:
        return store.get_preferences(subject)

    @router.put("/subjects/{subject}/preferences", response_model=PreferencesOut)
    def put_preferences(subject: str, prefs: PreferencesIn, store: ConsentStore = Store) -> PreferencesOut:
        return store.set_preferences(subject, prefs)

    @router.get("/subjects/{subject}/access", response_model=AccessReport)
    def access(subject: str, request_ref: str | None = None, store: ConsentStore = Store) -> AccessReport:
        """Data-subject access: everything held about the subject (logged)."""
        return store.access(subject, request_ref=request_ref)

    @router.post("/subjects/{subject}/erasure", response_model=TombstoneOut)
    def erase(subject: str, body: ErasureIn | None = None, store: ConsentStore = Store) -> TombstoneOut:
        """Data-subject erasure: crypto-shred the subject key, keep a tombstone (logged)."""
        return store.erase(subject, request_ref=body.request_ref if body else None)

    @router.post("/notices", response_model=NoticeOut, status_code=status.HTTP_201_CREATED)
    def register_notice(notice: NoticeIn, store: ConsentStore = Store) -> NoticeOut:
        return store.register_notice(notice)

    @router.get("/notices", response_model=list[NoticeOut])
    def list_notices(store: ConsentStore = Store) -> list[NoticeOut]:
        return store.notices()

    @router.post("/check", response_model=CheckOut)
    def check(body: CheckIn, store: ConsentStore = Store) -> CheckOut:
        """Ask the gate (audited like every gate call)."""
        at = body.at or dt.datetime.now(dt.timezone.utc)
        d = store.allowed(body.subjects, body.purpose, body.recipient, at)
        return CheckOut(
            purpose=d.purpose, recipient=d.recipient, at=d.at, allowed=d.allowed, evidence=d.evidence,
            denied_counts=d.denied_counts, allowed_count=d.allowed_count, denied_count=d.denied_count,
        )

    @router.post("/deliverable", response_model=DeliverableOut)
    def deliverable(body: DeliverableIn, store: ConsentStore = Store) -> DeliverableOut:
        """For an activation or marketing job: which subjects may be contacted now on this
        channel about this topic (consent, then channel opt-ins, time windows, frequency cap,
        topics). With `record` (default) the contacts are added to the contact history.
        Audited with counts only."""
        return store.deliverable(
            body.subjects, body.purpose, body.channel, body.topic, body.at,
            recipient=body.recipient, record=body.record, job_ref=body.job_ref,
        )

    @router.get("/reports/coverage")
    def coverage_report(
        format: Literal["json", "csv"] = "json",
        at: list[dt.datetime] | None = Query(default=None, description="Points in time (default: monthly)"),
        periods: int = Query(default=12, ge=1, le=120),
        store: ConsentStore = Store,
    ) -> Any:
        rows = reports.coverage(store, at, periods=periods)
        return _render(rows, reports.COVERAGE_COLUMNS, format, "consent-coverage")

    @router.get("/reports/processing")
    def processing_report(
        format: Literal["json", "csv"] = "json",
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        store: ConsentStore = Store,
    ) -> Any:
        if since and until and until <= since:
            raise ValidationError("until: must be after since", field="until")
        rows = reports.processing_activities(store, since=since, until=until)
        return _render(rows, reports.PROCESSING_COLUMNS, format, "processing-activities")

    return router


def _render(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str, name: str) -> Any:
    if fmt == "csv":
        return Response(
            reports.to_csv(rows, columns),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    return rows
