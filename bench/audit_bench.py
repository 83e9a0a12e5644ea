"""Benchmark of the Merkle audit log (`consent.audit`) on SQLite and PostgreSQL.

    python bench/audit_bench.py [--append-n 20000] [--verify-n 1000000] [--no-pg]

Measures single `append` rate (each call its own committed transaction) from one caller and
from 4, 16 and 64 concurrent callers (group commit: rate, entries per transaction, latency
percentiles), a realistic mix for `--mix-seconds` (REST-like threads doing a read then an
own-transaction `append`, job threads appending inside their own transactions next to a row of
their own, a thread signing heads and serving proofs; the log verifies afterwards),
`append_many` rate, `verify_log` time for a large log against signed heads, root and proof
times, and proof sizes at 10^3 and 10^6 entries. Prints a JSON document; paste the numbers
into bench/RESULTS.md.

Every append that returned is committed (PostgreSQL's synchronous_commit stays on): the
concurrent rates are what group commit gets out of one WAL flush per round, not deferred
durability. One caller alone pays one flush per append.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from confide.db import make_engine  # noqa: E402
from consent.audit import AuditLog, verify_log  # noqa: E402
from consent.audit_storage import AuditBase  # noqa: E402

PG_ADMIN_URL = os.environ.get("CONFIDE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


class BenchSigner:
    """Test-only stand-in for `confide.pki.Identity`: a fresh Ed25519 key with a name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.signing_key = ed25519.Ed25519PrivateKey.generate()
        self.public_key = self.signing_key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data)


@contextmanager
def database(kind: str) -> Iterator[Engine]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            eng = make_engine(f"sqlite:///{d}/audit.db", pool_size=32, max_overflow=16)
            AuditBase.metadata.create_all(eng)
            try:
                yield eng
            finally:
                eng.dispose()
        return
    name = f"confide_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    eng = make_engine(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name, pool_size=32, max_overflow=16)
    try:
        AuditBase.metadata.create_all(eng)
        yield eng
    finally:
        eng.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


THREADS = [4, 16, 64]


def payload(i: int) -> dict[str, Any]:
    # A realistic gate decision: pseudonymous job ref, counts per reason, a content digest.
    return {"job_id": f"job-{i // 100}", "step": "gate", "purpose": "audience.overlap",
            "allowed": 9000 + i % 1000, "denied": {"no_consent": 120, "withdrawn": 3},
            "digest": "sha256:" + f"{i:064x}"}


def bench_append(kind: str, n: int) -> dict[str, Any]:
    with database(kind) as eng:
        log = AuditLog(eng, None, "bench")
        log.append("bench.warmup", {"i": -1})
        t, c = time.perf_counter(), time.process_time()
        for i in range(n):
            log.append("gate.decision", payload(i))
        single = n / (time.perf_counter() - t)
        # Appends per CPU-second of this process: less sensitive to other load on the machine.
        single_cpu = n / (time.process_time() - c)
        concurrent = {}
        for threads in THREADS:
            concurrent[threads] = bench_concurrent(log, n, threads)
        mix = bench_mix(eng, log, MIX["seconds"], MIX["rest"], MIX["jobs"]) if MIX["seconds"] > 0 else None
        m = 10 * n
        t = time.perf_counter()
        log.append_many(("consent.import", payload(i)) for i in range(m))
        many = m / (time.perf_counter() - t)
        assert log.size() == n + m + 1 + sum(c["entries"] for c in concurrent.values()) + (
            mix["entries"] if mix else 0)
        _close(log)
    return {"append_per_s": round(single), "append_per_cpu_s": round(single_cpu), "append_n": n,
            "concurrent_append_per_s": concurrent, "mix": mix,
            "append_many_per_s": round(many), "append_many_n": m}


def _close(log: AuditLog) -> None:
    close = getattr(log, "close", None)  # absent before issue #4: the bench also runs on older code
    if close is not None:
        close()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2) if xs else 0.0


def bench_concurrent(log: AuditLog, n: int, threads: int) -> dict[str, Any]:
    """`threads` callers each making single `append` calls (each returns once its leaf is
    committed); the group commit shares transactions among them. Rate over all callers."""
    import threading

    per = n // threads
    barrier = threading.Barrier(threads + 1)
    tx0 = log._group.transactions
    lat: list[list[float]] = [[] for _ in range(threads)]

    def caller(k: int) -> None:
        mine = lat[k]
        barrier.wait()
        for i in range(per):
            t0 = time.perf_counter()
            log.append("gate.decision", payload(k * per + i))
            mine.append(time.perf_counter() - t0)

    pool = [threading.Thread(target=caller, args=(k,)) for k in range(threads)]
    for th in pool:
        th.start()
    barrier.wait()
    t, c = time.perf_counter(), time.process_time()
    for th in pool:
        th.join()
    wall = time.perf_counter() - t
    cpu = time.process_time() - c
    done = per * threads
    every = [x for xs in lat for x in xs]
    return {"entries": done, "per_s": round(done / wall), "per_cpu_s": round(done / max(cpu, 1e-9)),
            "entries_per_transaction": round(done / max(log._group.transactions - tx0, 1), 1),
            "latency_ms_p50": _pct(every, 0.5), "latency_ms_p99": _pct(every, 0.99)}


MIX = {"seconds": 5.0, "rest": 16, "jobs": 4}


def bench_mix(eng: Engine, log: AuditLog, seconds: float, rest: int, jobs: int) -> dict[str, Any]:
    """A node under a realistic load for `seconds`: `rest` REST-like threads (a keyed read of
    their own, then an own-transaction `append`: group commit), `jobs` job threads (each
    transaction inserts a row of its own and appends its leaf inside that transaction, as the
    consent store and job steps do: these hold the appenders' lock until their commit), and
    one thread that signs a head and serves an inclusion proof every 200 ms. Afterwards the
    whole log must verify against the heads signed meanwhile."""
    import random
    import threading

    from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select

    from confide.db import session_factory, session_scope

    md = MetaData()
    rows = Table("bench_mix_rows", md, Column("id", Integer, primary_key=True, autoincrement=True),
                 Column("v", String(64), nullable=False))
    md.create_all(eng)
    with eng.begin() as conn:
        conn.execute(insert(rows), [{"v": f"subject-{i}"} for i in range(1000)])
    factory = session_factory(eng)
    signer = BenchSigner("bench")
    slog = AuditLog(eng, signer, "bench")  # type: ignore[arg-type]  # same log; signs heads
    stop = threading.Event()
    barrier = threading.Barrier(rest + jobs + 2)
    lat: list[list[float]] = [[] for _ in range(rest)]
    job_lat: list[list[float]] = [[] for _ in range(jobs)]
    heads: list[Any] = []
    size0 = log.size()
    tx0 = log._group.transactions

    def rest_caller(k: int) -> None:
        rnd = random.Random(k)
        mine = lat[k]
        barrier.wait()
        i = 0
        while not stop.is_set():
            with eng.connect() as conn:
                conn.execute(select(rows.c.v).where(rows.c.id == rnd.randint(1, 1000))).first()
            t0 = time.perf_counter()
            log.append("consent.gate", payload(k * 1_000_000 + i))
            mine.append(time.perf_counter() - t0)
            i += 1

    def job(k: int) -> None:
        mine = job_lat[k]
        barrier.wait()
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            with session_scope(factory) as s:
                s.connection().execute(insert(rows), {"v": f"job-{k}-{i}"})
                log.append("step.finished", payload(k * 1_000_000 + i), session=s)
            mine.append(time.perf_counter() - t0)
            i += 1

    def head_signer() -> None:
        barrier.wait()
        while not stop.wait(0.2):
            head = slog.sign_head()
            heads.append(head)
            if head.size:
                assert slog.inclusion_proof(head.size // 2, head.size).verify(head.root_bytes)

    threads = ([threading.Thread(target=rest_caller, args=(k,)) for k in range(rest)]
               + [threading.Thread(target=job, args=(k,)) for k in range(jobs)]
               + [threading.Thread(target=head_signer)])
    for th in threads:
        th.start()
    barrier.wait()
    t, c = time.perf_counter(), time.process_time()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    rest_n = sum(len(x) for x in lat)
    job_n = sum(len(x) for x in job_lat)
    entries = log.size() - size0
    assert entries == rest_n + job_n, (entries, rest_n, job_n)
    heads.append(slog.sign_head())
    report = verify_log(slog, [h for h in slog.heads()], signer.public_key)
    assert report.ok, report.summary()
    every = [x for xs in lat for x in xs]
    jobs_every = [x for xs in job_lat for x in xs]
    _close(slog)
    md.drop_all(eng)
    return {"seconds": round(wall, 1), "rest_threads": rest, "job_threads": jobs, "entries": entries,
            "per_s": round(entries / wall), "per_cpu_s": round(entries / max(cpu, 1e-9)),
            "rest_appends_per_s": round(rest_n / wall), "job_appends_per_s": round(job_n / wall),
            "rest_entries_per_transaction": round(rest_n / max(log._group.transactions - tx0, 1), 1),
            "rest_append_latency_ms_p50": _pct(every, 0.5), "rest_append_latency_ms_p99": _pct(every, 0.99),
            "job_transaction_ms_p50": _pct(jobs_every, 0.5), "job_transaction_ms_p99": _pct(jobs_every, 0.99),
            "heads_signed": len(heads), "verify_ok": report.ok}


def bench_big(kind: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    signer = BenchSigner("bench")
    with database(kind) as eng:
        log = AuditLog(eng, signer, "bench")  # type: ignore[arg-type]
        heads = []
        t = time.perf_counter()
        checkpoints = sorted({1000, n // 4, n // 2, n})
        done = 0
        for cp in checkpoints:
            log.append_many((("consent.import", payload(i)) for i in range(done, cp)), batch_size=10000)
            done = cp
            heads.append(log.sign_head())
        out["build_s"] = round(time.perf_counter() - t, 1)
        t, c = time.perf_counter(), time.process_time()
        report = verify_log(log, heads, signer.public_key)
        out["verify_s"] = round(time.perf_counter() - t, 2)
        # This process's CPU time: on a shared machine less sensitive to other load than wall time.
        out["verify_client_cpu_s"] = round(time.process_time() - c, 2)
        out["verify_ok"] = report.ok
        out["heads"] = len(heads)
        t = time.perf_counter()
        root = log.root()
        out["root_warm_ms"] = round((time.perf_counter() - t) * 1000, 1)
        for size in (1000, n):
            t = time.perf_counter()
            p = log.inclusion_proof(size // 3, size)
            inc_ms = (time.perf_counter() - t) * 1000
            assert p.verify(log.root(size))
            t = time.perf_counter()
            c = log.consistency_proof(size // 3 + 1, size)
            con_ms = (time.perf_counter() - t) * 1000
            assert c.verify(log.root(size // 3 + 1), log.root(size))
            out[f"proofs_at_{size}"] = {
                "inclusion_hashes": len(p.path), "inclusion_bytes": 32 * len(p.path),
                "inclusion_ms": round(inc_ms, 1),
                "consistency_hashes": len(c.path), "consistency_bytes": 32 * len(c.path),
                "consistency_ms": round(con_ms, 1),
            }
        assert root == bytes.fromhex(heads[-1].root)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--append-n", type=int, default=20000)
    ap.add_argument("--verify-n", type=int, default=1_000_000)
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--big-on", default="sqlite,postgresql", help="databases for the large-log run (or none)")
    ap.add_argument("--threads", default="4,16,64", help="concurrent callers to measure, comma-separated")
    ap.add_argument("--mix-seconds", type=float, default=MIX["seconds"], help="realistic mix duration (0: skip)")
    ap.add_argument("--mix-rest", type=int, default=MIX["rest"], help="REST-like threads in the mix")
    ap.add_argument("--mix-jobs", type=int, default=MIX["jobs"], help="job threads in the mix")
    ap.add_argument("--only", default="", help="run only this database (sqlite or postgresql)")
    args = ap.parse_args()
    THREADS[:] = [int(x) for x in args.threads.split(",") if x]
    MIX.update(seconds=args.mix_seconds, rest=args.mix_rest, jobs=args.mix_jobs)
    kinds = ["sqlite"] + ([] if args.no_pg else ["postgresql"])
    if args.only:
        kinds = [k for k in kinds if k == args.only]
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    for kind in kinds:
        result[kind] = bench_append(kind, args.append_n)
        print(kind, result[kind], file=sys.stderr, flush=True)
    for kind in args.big_on.split(","):
        if kind in kinds:
            result[kind]["big"] = bench_big(kind, args.verify_n)
            print(kind, result[kind]["big"], file=sys.stderr, flush=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
