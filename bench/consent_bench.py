"""Consent store benchmark: import N consent events from CSV, then gate N subjects.

    python bench/consent_bench.py --events 1000000 --database-url sqlite:///var/bench.db
    python bench/consent_bench.py --events 1000000 --database-url postgresql://postgres@127.0.0.1/bench

Targets (issue 4): import 10^6 events <= 60 s; gate 10^6 subjects <= 3 s. The data are synthetic:
90% of the events are grants on a mix of purposes (a third with a phone number to encrypt),
10% later refusals or withdrawals; a tenth of the gated subjects have no consent at all.
The database must be empty (or absent, for SQLite); the tables are created here.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from confide.db import make_engine  # noqa: E402
from consent.audit import AuditLog  # noqa: E402
from consent.audit_storage import AuditBase  # noqa: E402
from consent.importer import COLUMNS, import_file  # noqa: E402
from consent.models import ensure_tables  # noqa: E402
from consent.store import ConsentStore  # noqa: E402

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
GRANT_PURPOSES = ["modeling", "modeling.lookalike", "audience", "marketing", "sharing.third_party"]


class CountingSink:
    def __init__(self) -> None:
        self.entries = 0

    def append(self, kind: str, payload: dict, session: object = None) -> None:
        self.entries += 1


def write_events(path: Path, n_events: int, seed: int = 7) -> int:
    """Write `n_events` synthetic events; returns the number of distinct subjects."""
    rng = random.Random(seed)
    n_grants = n_events * 9 // 10
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for i in range(n_grants):
            purpose = GRANT_PURPOSES[i % len(GRANT_PURPOSES)]
            recipient = "partner" if purpose.startswith("sharing") else ""
            received = T0 + dt.timedelta(seconds=i % 86_400 * 30)
            until = (received + dt.timedelta(days=730)).isoformat() if i % 4 == 0 else ""
            w.writerow([
                f"ev-{i}", f"m{i:07d}", f"138{i:08d}" if i % 3 == 0 else "", purpose, recipient, "granted",
                "wechat_miniprogram", "member/2026-01", received.isoformat(), until, received.isoformat(),
            ])
        for j in range(n_events - n_grants):
            subject = rng.randrange(n_grants)
            action = "withdrawn" if j % 2 else "refused"
            received = T0 + dt.timedelta(days=40, seconds=j)
            w.writerow([
                f"ev-w{j}", f"m{subject:07d}", "", rng.choice(["modeling", "marketing", "audience"]), "", action,
                "app", "", "", "", received.isoformat(),
            ])
    return n_grants


def run(url: str, n_events: int, reimport: bool, profile: str | None = None) -> dict[str, object]:
    engine = make_engine(url)
    ensure_tables(engine)
    AuditBase.metadata.create_all(engine)
    # The node's real Merkle log in the same database: imports append one leaf per 20,000-event
    # batch inside the import's transaction, each gate call one leaf.
    sink = AuditLog(engine, None, "bench")
    store = ConsentStore(engine, secret_key=b"bench-secret-key-32-bytes-long!!", recipients={"partner"}, audit=sink)
    store.register_notice({
        "notice": "member", "version": "member/2026-01", "published_at": T0 - dt.timedelta(days=1),
        "purposes": [
            {"purpose": "modeling", "data_categories": ["orders", "profile"]},
            {"purpose": "audience", "data_categories": ["phone"]},
            {"purpose": "marketing", "data_categories": ["orders"]},
            {"purpose": "sharing.third_party", "recipients": ["partner"], "data_categories": ["phone"]},
        ],
    })
    out: dict[str, object] = {"events": n_events}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.csv"
        n_subjects = write_events(path, n_events)
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t, c = time.perf_counter(), time.process_time()
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = import_file(store, path)
        kids_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU of the import's worker processes (reaped when the import ends)
        out["import_worker_cpu_s"] = round(
            kids_after.ru_utime + kids_after.ru_stime - kids.ru_utime - kids.ru_stime, 2
        )
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
        out["import_s"] = round(time.perf_counter() - t, 2)
        out["import_client_cpu_s"] = round(time.process_time() - c, 2)
        out["recorded"] = res.recorded
        if reimport:
            t = time.perf_counter()
            res2 = import_file(store, path)
            out["reimport_s"] = round(time.perf_counter() - t, 2)
            out["reimport_recorded"] = res2.recorded
    at = T0 + dt.timedelta(days=60)
    subjects = [f"m{i:07d}" for i in range(n_subjects + n_subjects // 9)]  # ~10% unknown
    for purpose, recipient in (("modeling.lookalike", None), ("sharing.third_party", "partner")):
        t, c = time.perf_counter(), time.process_time()
        d = store.allowed(subjects, purpose, recipient, at)
        out[f"gate_{purpose}_s"] = round(time.perf_counter() - t, 2)
        out[f"gate_{purpose}_client_cpu_s"] = round(time.process_time() - c, 2)
        out[f"gate_{purpose}_allowed"] = d.allowed_count
        out[f"gate_{purpose}_denied"] = d.denied_counts
    out["gate_subjects"] = len(subjects)
    t = time.perf_counter()
    store.allowed(subjects[:1000], "modeling.lookalike", None, at)
    out["gate_1000_s"] = round(time.perf_counter() - t, 3)
    out["audit_entries"] = sink.size()
    engine.dispose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--reimport", action="store_true", help="Also time an idempotent re-import")
    ap.add_argument("--profile", metavar="FILE", help="Write a cProfile of the import (this process only) to FILE")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    result = run(args.database_url, args.events, args.reimport, args.profile)
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["backend"] = args.database_url.split(":", 1)[0]
    result["python"] = platform.python_version()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
