"""Run both PSI roles on this machine, each in its own process, exchanging the real wire bytes.

This is the developer's and the benchmark's harness (`confide psi local`): the parties' files
are read in their own processes, every message goes through `encode`/`decode` over a pipe, and
the bytes, wall time and peak memory are measured. The services use the same roles with the
relay transport instead of a pipe.
"""

from __future__ import annotations

import csv
import datetime as dt
import multiprocessing as mp
import os
import queue
import resource
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from consent.gate import GateDecision
from confide.errors import ConfideError, ValidationError
from psi.executor import InProcessExecutor, ProcessPoolExecutor
from psi.inputs import PartyData, RowNumbers, prepare_party
from psi.messages import Mode, decode, encode
from psi.roles import Requester, Responder, SessionParams


class AssumeConsentedGate:
    """The gate of the developer CLI, whose input files the operator has already filtered by
    consent: allows every subject, with evidence `local-cli`. Node jobs use the consent store."""

    def allowed(
        self, subjects: Sequence[str], purpose: str, recipient: str | None, at: dt.datetime
    ) -> GateDecision:
        return GateDecision(purpose, recipient, at, subjects, {}, {})  # type: ignore[arg-type]


@dataclass
class LocalRunResult:
    mode: str
    intersection_size: int
    seconds: float
    bytes: int
    peak_rss_mb: float
    left: dict[str, Any] = field(default_factory=dict)
    right: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "intersection_size": self.intersection_size,
            "seconds": round(self.seconds, 3),
            "bytes": self.bytes,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "left": self.left,
            "right": self.right,
        }


def read_column(path: Path, column: str) -> list[str]:
    """One column of a CSV file (header row required). ValidationError if it is missing."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or column not in header:
                raise ValidationError(
                    f"{path}: no column {column!r} (columns: {', '.join(header or [])}); "
                    "choose one with --left-column/--right-column"
                )
            i = header.index(column)
            return [row[i] if i < len(row) else "" for row in reader]
    except FileNotFoundError:
        raise ValidationError(f"{path}: no such file") from None


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_usage() -> tuple[float, float]:
    """(CPU seconds, peak RSS MB) of this process and all its live descendants (the executor's
    forkserver and workers). Peak RSS is the sum of each process's own peak: an upper bound."""
    import psutil

    me = psutil.Process()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime
    rss_kib = ru.ru_maxrss
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
            cpu += t.user + t.system
            rss_kib += _vm_hwm_kib(child.pid)
        except psutil.Error:
            continue
    return cpu, rss_kib / 1024.0


def _party(
    role: str,
    conn: Any,
    source: Any,
    column: str,
    params: SessionParams,
    workers: int,
    results: Any,
) -> None:
    try:
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        values = read_column(Path(source), column) if isinstance(source, (str, Path)) else source
        data = PartyData(RowNumbers(len(values)), {params.id_type: values})
        prepared = prepare_party(
            data,
            AssumeConsentedGate(),
            purpose="audience.overlap",
            recipient=None,
            at=dt.datetime.now(dt.timezone.utc),
            id_types=[params.id_type],
        )
        items = prepared.items[params.id_type]
        n_rows, invalid = len(values), prepared.stats["invalid"][params.id_type]  # type: ignore[index]
        del values, data, prepared  # only the distinct items are needed from here on
        phases["prepared"] = time.perf_counter() - t0
        executor = ProcessPoolExecutor(workers) if workers > 1 else InProcessExecutor()
        sent = 0
        outq: queue.Queue[bytes | None] = queue.Queue()

        def sender() -> None:
            while (w := outq.get()) is not None:
                conn.send_bytes(w)

        t = threading.Thread(target=sender, daemon=True)
        t.start()

        def send(msgs: list[Any]) -> None:
            nonlocal sent
            msgs.reverse()
            while msgs:  # drop each message once encoded: one copy of a round in memory
                w = encode(msgs.pop())
                sent += len(w)
                outq.put(w)

        try:
            if role == "requester":
                r: Requester | Responder = Requester(params, items, executor)
                send([r.hello()])
                send(list(r.round_one()))
                phases["own_blinded"] = time.perf_counter() - t0
            else:
                r = Responder(params, items, executor)
            while not r.done:
                msgs = r.handle(decode(conn.recv_bytes()))
                if msgs and "first_reply" not in phases:
                    phases["first_reply"] = time.perf_counter() - t0
                send(msgs)
            phases["done"] = time.perf_counter() - t0
        finally:
            outq.put(None)
            t.join()
            cpu_s, peak_mb = _tree_usage()  # before the workers go away
            executor.close()
        out = r.outcome
        assert out is not None
        results.put(
            (
                role,
                {
                    "rows": n_rows,
                    "invalid": invalid,
                    "distinct": len(items.values),
                    "matched_rows": len(out.matched),
                    "intersection_size": out.intersection_size,
                    "bytes_sent": sent,
                    "peak_rss_mb": round(peak_mb, 1),
                    "cpu_s": round(cpu_s, 2),
                    "phases_s": {k: round(v, 2) for k, v in phases.items()},
                },
            )
        )
    except ConfideError as exc:
        results.put((role, {"error": type(exc).__name__, "message": exc.message}))
    except Exception as exc:  # surfaced to the parent, which raises
        results.put((role, {"error": type(exc).__name__, "message": str(exc)}))


def run_local(
    left: Path | Sequence[str],
    right: Path | Sequence[str],
    *,
    id_type: str = "phone",
    mode: Mode = Mode.cardinality,
    left_column: str | None = None,
    right_column: str | None = None,
    workers: int | None = None,
) -> LocalRunResult:
    """Run a PSI between `left` (requester) and `right` (responder): CSV paths or value lists.

    Returns the intersection size the requester learned, wall seconds (process start to both
    parties done), bytes on the wire both ways, and the peak RSS of the bigger party (its
    process and its worker pool). Raises the first error a party reported.
    """
    w = workers if workers is not None else (os.cpu_count() or 1)
    session = uuid.uuid4().hex
    params = SessionParams(session, "local", session, id_type, mode)
    ctx = mp.get_context("forkserver")
    results: Any = ctx.Queue()
    a, b = ctx.Pipe(duplex=True)
    t0 = time.perf_counter()
    procs = [
        ctx.Process(
            target=_party,
            args=("requester", a, left, left_column or id_type, params, w, results),
        ),
        ctx.Process(
            target=_party,
            args=("responder", b, right, right_column or id_type, params, w, results),
        ),
    ]
    for p in procs:
        p.start()
    got: dict[str, dict[str, Any]] = {}
    try:
        while len(got) < 2:
            try:
                role, info = results.get(timeout=1.0)
            except queue.Empty:
                if any(not p.is_alive() and p.exitcode not in (0, None) for p in procs):
                    raise ConfideError("a PSI party process died") from None
                continue
            got[role] = info
            if "error" in info:
                raise ValidationError(f"{role}: {info['error']}: {info['message']}")
        seconds = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    req, resp = got["requester"], got["responder"]
    return LocalRunResult(
        mode=mode.value,
        intersection_size=int(req["intersection_size"]),
        seconds=seconds,
        bytes=req["bytes_sent"] + resp["bytes_sent"],
        peak_rss_mb=max(req["peak_rss_mb"], resp["peak_rss_mb"]),
        left=req,
        right=resp,
    )
