"""Group commit and the PostgreSQL one-statement append of the Merkle audit log (issue #4).

Every test that touches a database runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from confide import pki
from confide.db import make_engine, session_factory, session_scope
from consent.audit import AuditLog, _GroupCommit, verify_log
from consent.audit_storage import AuditBase


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url, pool_size=8)
    AuditBase.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def brand(pki_dir: Path) -> pki.Identity:
    return pki.load_identity(pki_dir / "brand")


def _payloads(log: AuditLog) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(pj) for _seq, _k, _at, pj, _h in log.iter_leaves()]


def test_concurrent_group_commit_log_verifies_and_holds_every_leaf_exactly_once(
    engine: Engine, brand: pki.Identity
) -> None:
    log = AuditLog(engine, brand, "brand")
    n_threads, per_thread = 24, 30
    got: dict[tuple[int, int], int] = {}
    heads = []
    lock = threading.Lock()
    start = threading.Barrier(n_threads + 1)
    stop = threading.Event()

    def writer(k: int) -> None:
        start.wait()
        for i in range(per_thread):
            seq = log.append("gate.decision", {"w": k, "i": i})
            with lock:
                got[(k, i)] = seq

    def signer() -> None:  # heads signed while appends are in flight
        start.wait()
        while not stop.is_set():
            heads.append(log.sign_head())
            time.sleep(0.01)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(n_threads)]
    threads.append(threading.Thread(target=signer))
    for t in threads:
        t.start()
    for t in threads[:-1]:
        t.join()
    stop.set()
    threads[-1].join()
    heads.append(log.sign_head())

    total = n_threads * per_thread
    assert sorted(got.values()) == list(range(total))
    # Every leaf is stored exactly once, at the seq its caller was given.
    stored = _payloads(log)
    assert len(stored) == total
    assert sorted((p["w"], p["i"]) for p in stored) == sorted(got)
    for (k, i), seq in got.items():
        assert stored[seq] == {"w": k, "i": i}
    # Rounds really were shared, and the log verifies against every head signed meanwhile.
    assert log._group.transactions < total
    report = verify_log(log, heads, brand.public_key)
    assert report.ok, report.summary()
    assert report.heads_verified == len(heads) and report.size == total
    root = log.root()
    for seq in random.Random(1).sample(range(total), 10):
        assert log.inclusion_proof(seq).verify(root)
    log.close()


def test_group_commit_mixes_with_appends_in_callers_transactions_and_other_logs(engine: Engine) -> None:
    # Two AuditLog objects on one database (as two processes would be), each with group
    # commit, plus appends inside callers' transactions: contiguous seqs, no gap, no duplicate.
    logs = [AuditLog(engine, None, "brand"), AuditLog(engine, None, "brand")]
    seqs: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def writer(k: int) -> None:
        log = logs[k % 2]
        start.wait()
        for i in range(25):
            if k % 4 == 3:
                with session_scope(session_factory(engine)) as s:
                    seq = log.append("job.step", {"w": k, "i": i}, session=s)
            else:
                seq = log.append("job.step", {"w": k, "i": i})
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(300))
    assert sorted((p["w"], p["i"]) for p in _payloads(logs[0])) == [(k, i) for k in range(12) for i in range(25)]
    assert verify_log(logs[0], [], "00" * 32).ok
    for log in logs:
        log.close()


def test_a_stale_cached_next_seq_never_leaves_a_gap_or_a_duplicate(engine: Engine) -> None:
    a, b = AuditLog(engine, None, "brand"), AuditLog(engine, None, "brand")
    assert [a.append("job.step", {"i": i}) for i in range(3)] == [0, 1, 2]
    # `b` appends behind `a`'s back: `a`'s cached next seq (3) is now taken.
    assert b.append("job.step", {"i": 3}) == 3
    assert a.append("job.step", {"i": 4}) == 4
    if engine.dialect.name == "postgresql":
        # A cached next seq past the end (as if rows had vanished) must not open a gap: the
        # one-statement append checks that the leaf before it exists. (SQLite's cached seq
        # comes only from its own single writer's commits and is never ahead.)
        a._next = 9
    assert a.append("job.step", {"i": 5}) == 5
    assert a.append_many([("job.step", {"i": 6}), ("job.step", {"i": 7})]) == [6, 7]
    assert [p["i"] for p in _payloads(a)] == list(range(8))
    assert verify_log(a, [], "00" * 32).ok
    a.close()
    b.close()


def test_lone_caller_never_waits_for_other_callers(engine: Engine) -> None:
    log = AuditLog(engine, None, "brand")
    for i in range(20):
        log.append("job.step", {"i": i})
    assert log._group.gathered == 0 and log._group.transactions == 20
    log.close()


def test_gathering_is_bounded_and_each_caller_gets_its_own_result() -> None:
    committed: list[list[tuple[str, str, str]]] = []

    def commit(items: list[tuple[str, str, str]]) -> list[int]:
        time.sleep(0.004)
        first = sum(len(b) for b in committed)
        committed.append(items)
        return list(range(first, first + len(items)))

    g = _GroupCommit(commit, gather_max_s=0.0005)
    out: dict[int, int] = {}
    lock = threading.Lock()

    def caller(k: int) -> None:
        seq = g.submit(("job.step", "at", str(k)))
        with lock:
            out[k] = seq

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [it for b in committed for it in b]
    assert sorted(out.values()) == list(range(8))
    assert all(flat[seq] == ("job.step", "at", str(k)) for k, seq in out.items())
    # Now the last round had several callers but only one comes back: it waits at most
    # gather_max_s (not the commit's duration) before committing alone.
    t0 = time.perf_counter()
    assert g.submit(("job.step", "at", "late")) == 8
    assert time.perf_counter() - t0 < 0.004 + 0.0005 + 0.05
    assert committed[-1] == [("job.step", "at", "late")]


def test_group_commit_error_reaches_every_caller_and_the_log_recovers(engine: Engine) -> None:
    log = AuditLog(engine, None, "brand")
    log.append("job.step", {"i": 0})
    real = log._group._commit
    fail = threading.Event()
    fail.set()

    def flaky(items: list) -> list[int]:  # type: ignore[type-arg]
        if fail.is_set():
            time.sleep(0.01)
            raise OperationalError("append", None, RuntimeError("database unavailable"))
        return real(items)

    log._group._commit = flaky
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        try:
            log.append("job.step", {"i": i})
        except OperationalError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 6 and log.size() == 1
    fail.clear()
    assert log.append("job.step", {"i": 1}) == 1
    assert verify_log(log, [], "00" * 32).ok
    log.close()


# ----------------------------------------------------------------------------------------------
# PostgreSQL: the log's own connection
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    eng = make_engine(pg_url)
    AuditBase.metadata.create_all(eng)
    yield eng
    eng.dispose()


def _terminate(engine: Engine, pid: int) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    time.sleep(0.05)


def test_pg_appends_take_one_statement_on_the_logs_own_connection(pg_engine: Engine) -> None:
    log = AuditLog(pg_engine, None, "brand")
    log.append("job.step", {"i": 0})  # first append: locked read of max(seq)
    raw = log._pg_raw
    assert raw is None or raw.info.backend_pid  # (the first append may take either path)
    for i in range(1, 5):
        log.append("job.step", {"i": i})
    raw = log._pg_raw
    assert raw is not None and raw.autocommit
    # Committed for every other connection the moment append returns.
    with pg_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_leaves")).scalar() == 5
    # The connection is not one of the pool's.
    assert pg_engine.pool.checkedout() == 0
    log.close()
    assert log._pg_raw is None and raw.closed
    assert log.append("job.step", {"i": 5}) == 5  # reopened when needed
    log.close()


def test_pg_idle_connection_killed_by_the_server_is_healed_by_the_idle_ping(pg_engine: Engine) -> None:
    log = AuditLog(pg_engine, None, "brand")
    for i in range(3):
        log.append("job.step", {"i": i})
    assert log._pg_raw is not None
    _terminate(pg_engine, log._pg_raw.info.backend_pid)
    log._pg_used = 0.0  # as if idle for long: pinged, found dead, replaced
    assert log.append("job.step", {"i": 3}) == 3
    assert log.size() == 4
    log.close()


def test_pg_connection_lost_mid_use_is_reported_not_hidden(pg_engine: Engine) -> None:
    log = AuditLog(pg_engine, None, "brand")
    for i in range(3):
        log.append("job.step", {"i": i})
    assert log._pg_raw is not None
    _terminate(pg_engine, log._pg_raw.info.backend_pid)
    # Not idle: no ping, so the append meets the dead connection. Whether such a statement
    # committed cannot be known in general, so the caller gets the error (as for a lost COMMIT).
    with pytest.raises(OperationalError):
        log.append("job.step", {"i": 3})
    # The next append works on a new connection, with no gap and no duplicate.
    assert log.append("job.step", {"i": 4}) == 3
    assert [p["i"] for p in _payloads(log)] == [0, 1, 2, 4]
    assert verify_log(log, [], "00" * 32).ok
    log.close()


def test_pg_server_error_falls_back_to_the_sqlalchemy_path(pg_engine: Engine) -> None:
    from sqlalchemy.exc import ProgrammingError

    log = AuditLog(pg_engine, None, "brand")
    log.append("job.step", {"i": 0})
    log.append("job.step", {"i": 1})
    with pg_engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_leaves RENAME TO audit_leaves_gone"))
    with pytest.raises(ProgrammingError):
        log.append("job.step", {"i": 2})
    with pg_engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_leaves_gone RENAME TO audit_leaves"))
    assert log.append("job.step", {"i": 3}) == 2
    log.close()


def test_pg_appends_inside_a_transaction_store_the_python_leaf_hash(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consent import audit

    log = AuditLog(pg_engine, None, "brand")
    # Non-ASCII payload text: the server's hash of the leaf must equal the Python one.
    with session_scope(session_factory(pg_engine)) as s:
        assert log.append("consent.granted", {"purpose_label": "营销 – ünïcode", "i": 0}, session=s) == 0
        assert log.append_many([("job.step", {"i": i}) for i in (1, 2)], session=s) == [1, 2]
    assert verify_log(log, [], "00" * 32).ok
    # Were the server's hash ever different (another encoding), the Python hash is stored.
    monkeypatch.setattr(audit, "_PG_INSERT_NEXT", audit._PG_INSERT_NEXT.replace("'\\x00'", "'\\x01'"))
    assert "'\\x01'" in audit._PG_INSERT_NEXT
    with session_scope(session_factory(pg_engine)) as s:
        assert log.append("job.step", {"i": 3}, session=s) == 3
    assert log.append_many([("job.step", {"i": i}) for i in (4, 5)]) == [4, 5]  # own transaction, slow path
    report = verify_log(log, [], "00" * 32)
    assert report.ok, report.summary()
    assert [p["i"] for p in _payloads(log)] == list(range(6))
    log.close()
