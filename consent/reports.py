"""Compliance reports, as rows of plain values (render them with `to_csv` / `to_json`).

- `coverage`: consent coverage per purpose and recipient at a series of points in time, replayed
  from the event record (so a past point shows what was held then, not today's state).
- `processing_activities`: the record of processing activities, from usage records (which job
  processed how many subjects for which purpose, recipient and agreement).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import Counter, defaultdict
from typing import Any, Sequence

from sqlalchemy import select

from confide.errors import ValidationError
from consent.models import UsageRecord
from consent.schemas import as_utc
from consent.store import ConsentStore, _pg_ts, _raw, _sqlite_ts

_RANK = {"granted": 0, "expired": 1, "refused": 2, "withdrawn": 3}
COVERAGE_COLUMNS = (
    "at", "purpose", "recipient", "known_subjects", "subjects_with_rule",
    "granted", "refused", "withdrawn", "expired", "not_yet_valid", "coverage",
)
PROCESSING_COLUMNS = ("job_id", "purpose", "recipient", "agreement_id", "at", "subjects_count")


def default_points(now: dt.datetime, periods: int = 12) -> list[dt.datetime]:
    """The first instant of each of the last `periods - 1` months, and `now`."""
    if periods < 1 or periods > 120:
        raise ValidationError("periods: must be between 1 and 120", field="periods")
    points = [now]
    y, m = now.year, now.month
    for _ in range(periods - 1):
        points.append(dt.datetime(y, m, 1, tzinfo=dt.timezone.utc))
        y, m = (y, m - 1) if m > 1 else (y - 1, 12)
    return sorted(set(points))


def coverage(store: ConsentStore, points: Sequence[dt.datetime] | None = None, *, periods: int = 12) -> list[dict[str, Any]]:
    """One row per point in time, purpose and recipient that has any rule by then.

    `granted` counts subjects whose latest event for that exact purpose and recipient is a
    grant valid at the point; `coverage` is granted / known_subjects (every subject with any
    consent event by then). Erased subjects keep counting: their events are kept as evidence.
    """
    at_points = sorted(as_utc(p) for p in points) if points else default_points(store._now(), periods)  # type: ignore[type-var]
    with store.factory() as session:
        pg = session.get_bind().dialect.name == "postgresql"
        ts = _pg_ts if pg else _sqlite_ts
        cur = _raw(session).cursor()
        try:
            cur.execute(
                "SELECT subject_ref, purpose, recipient, action, valid_from, valid_until, received_at, event_id "
                "FROM consent_events"
            )
            events = cur.fetchall()
        finally:
            cur.close()
    # Same order the store uses to decide which event of a key is the latest.
    events.sort(key=lambda r: (r[6], _RANK[r[3]], r[7]))
    state: dict[tuple[str, str, str], tuple[str, Any, Any]] = {}
    known: set[str] = set()
    rows: list[dict[str, Any]] = []
    i = 0
    for point in at_points:
        t = ts(point)
        while i < len(events) and events[i][6] <= t:
            ref, purpose, recipient, action, vf, vu, _rec, _eid = events[i]
            state[(ref, purpose, recipient)] = (action, vf, vu)
            known.add(ref)
            i += 1
        counts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        for (_ref, purpose, recipient), (action, vf, vu) in state.items():
            c = counts[(purpose, recipient)]
            if action == "granted":
                if vu is not None and vu <= t:
                    c["expired"] += 1
                elif vf > t:
                    c["not_yet_valid"] += 1
                else:
                    c["granted"] += 1
            else:
                c[action] += 1
        for (purpose, recipient), c in sorted(counts.items()):
            rows.append(
                {
                    "at": point.isoformat(),
                    "purpose": purpose,
                    "recipient": recipient or None,
                    "known_subjects": len(known),
                    "subjects_with_rule": sum(c.values()),
                    "granted": c["granted"],
                    "refused": c["refused"],
                    "withdrawn": c["withdrawn"],
                    "expired": c["expired"],
                    "not_yet_valid": c["not_yet_valid"],
                    "coverage": round(c["granted"] / len(known), 4) if known else 0.0,
                }
            )
    return rows


def processing_activities(
    store: ConsentStore, *, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """The record of processing activities: one row per usage record, oldest first."""
    q = select(UsageRecord).order_by(UsageRecord.at, UsageRecord.id)
    if since is not None:
        q = q.where(UsageRecord.at >= as_utc(since))
    if until is not None:
        q = q.where(UsageRecord.at < as_utc(until))
    with store.factory() as session:
        return [
            {
                "job_id": u.job_id,
                "purpose": u.purpose,
                "recipient": u.recipient or None,
                "agreement_id": u.agreement_id or None,
                "at": u.at.isoformat(),
                "subjects_count": u.subjects_count,
            }
            for u in session.scalars(q)
        ]


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return out.getvalue()


def to_json(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(rows), indent=2, ensure_ascii=False)
