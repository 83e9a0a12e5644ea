"""Paillier obfuscators computed while the node is idle, for the arbiter keys of its agreements.

Encrypting a row under the arbiter's 2048-bit key is `(1 + m n) r^n mod n^2`; the `r^n` part is
almost all of the cost (~9 ms here, one 2048-bit exponent modulo a 4096-bit number) and does not
depend on the row. The coordinator keeps one arbiter key per agreement and key size
(`coordinator.arbiter_keys`), so a node can compute `r^n` for it before any job asks: at setup
the training roles then take them from this stock (`federated.roles`, "obfuscators") and an
encryption costs two multiplications. What the stock cannot cover is computed at setup as before.

    stock = ObfuscatorStock(node, capacity=60_000, key_bits=2048)
    stock.start()                 # background: fetch keys, fill each key's pool to capacity
    stock.pool_for(n)             # the pool for modulus n, or None
    stock.status()                # per key: agreement, key id, ready, capacity

Rules:
- Each value is handed out once (the pool is thread-safe; `take_upto` removes what it returns).
  Reusing an obfuscator would let anyone holding both ciphertexts learn the difference of the
  plaintexts, so there is no way to put one back.
- The values are secrets (an `r^n` opens the ciphertext made with it) and exist only in this
  process's memory; a restarted node starts an empty stock and refills it.
- The workers run at the lowest CPU priority (`nice 19`) so a running job's own pool wins the
  cores; the stock fills only the agreements whose active version allows `train` and names
  this node, and only keys the coordinator still publishes (a rotated key's pool is dropped).
- Memory: 2 * key_bits / 8 bytes per value (512 B at 2048 bits; 60,000 ≈ 31 MB per key).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import datetime as dt
import hashlib
import logging
import multiprocessing as mp
import os
import threading
import time
from typing import Any

from federated import paillier as pl

log = logging.getLogger("confide.node.obfuscators")

BATCH = 32  # values per worker task


def _lowest_priority() -> None:
    try:
        os.nice(19)
    except OSError:  # pragma: no cover - not permitted on this platform: run at normal priority
        pass


def _batch(n: int, count: int) -> list[int]:
    return [int(v) for v in pl._obfuscator_batch(n, count)]


def key_fingerprint(n: int) -> str:
    """A short public name of a Paillier modulus (to compare keys across jobs and nodes)."""
    return hashlib.sha256(str(int(n)).encode()).hexdigest()[:16]


class _Key:
    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.pool = pl.ObfuscatorPool(pl.PublicKey(int(info["n"])))
        self.made = 0


class ObfuscatorStock:
    def __init__(self, node: Any, *, capacity: int, key_bits: int = 2048, workers: int | None = None,
                 refresh_s: float = 300.0) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.node = node
        self.capacity = capacity
        self.key_bits = key_bits
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.refresh_s = refresh_s
        self._keys: dict[int, _Key] = {}  # by modulus
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._executor: cf.ProcessPoolExecutor | None = None
        self.last_error: str | None = None
        self.last_refresh: float | None = None

    # -- what jobs and operators use --------------------------------------------------------
    def pool_for(self, n: int) -> pl.ObfuscatorPool | None:
        with self._lock:
            k = self._keys.get(int(n))
            return k.pool if k is not None else None

    def status(self) -> dict[str, Any]:
        with self._lock:
            keys = [{"agreement_id": k.info["agreement_id"], "key_id": k.info["key_id"],
                     "key_fingerprint": key_fingerprint(int(k.info["n"])),
                     "key_bits": k.info["key_bits"], "expires_at": k.info.get("expires_at"),
                     "ready": len(k.pool), "computed": k.made} for k in self._keys.values()]
        return {"capacity_per_key": self.capacity, "workers": self.workers, "running": self.running,
                "last_refresh": self.last_refresh, "last_error": self.last_error, "keys": keys}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def refresh_now(self) -> None:
        """Fetch the keys again at the next chance (e.g. after signing an agreement)."""
        self._wake.set()

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self.capacity == 0 or self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="obfuscator-stock", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- keys --------------------------------------------------------------------------------
    def _wanted(self) -> list[str]:
        """Active, unexpired agreements of this node that allow training."""
        now = dt.datetime.now(dt.timezone.utc)
        with self.node.coordinator() as c:
            docs = c.get("/v1/agreements")
        out = []
        for d in docs if isinstance(docs, list) else []:
            spec = d.get("spec") or {}
            if d.get("status") != "active":
                continue
            if not any(p.get("name") == self.node.identity.name for p in spec.get("parties", [])):
                continue
            if not any(r.get("type") == "train" for r in spec.get("allowed_jobs", [])):
                continue
            try:
                if dt.datetime.fromisoformat(str(spec["expires_at"]).replace("Z", "+00:00")) <= now:
                    continue
            except (KeyError, ValueError):
                continue
            out.append(str(spec["agreement_id"]))
        return sorted(set(out))

    def refresh(self) -> None:
        """Ask the coordinator for the current key of every training agreement; keep the pools
        of keys it still publishes, start empty pools for new ones, drop the rest."""
        infos = []
        for agreement_id in self._wanted():
            with self.node.coordinator() as c:
                info = c.get(f"/v1/agreements/{agreement_id}/arbiter-key", params={"bits": self.key_bits})
            n = int(info["n"])
            if n.bit_length() != int(info["key_bits"]) or int(info["key_bits"]) < self.key_bits:
                raise ValueError(f"the coordinator published a {n.bit_length()}-bit key for {agreement_id}")
            infos.append(info)
        with self._lock:
            keep = {int(i["n"]): self._keys.get(int(i["n"])) or _Key(i) for i in infos}
            for n, k in keep.items():
                k.info = next(i for i in infos if int(i["n"]) == n)
            dropped = [k.info["key_id"] for n, k in self._keys.items() if n not in keep]
            self._keys = keep
        if dropped:
            log.info("dropped the obfuscator stock of rotated arbiter keys %s", dropped)
        self.last_refresh = time.time()

    # -- filling -----------------------------------------------------------------------------
    def _pool(self) -> cf.ProcessPoolExecutor:
        if self._executor is None:
            ctx = mp.get_context("forkserver")
            self._executor = cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_lowest_priority)
        return self._executor

    def _short(self) -> list[_Key]:
        with self._lock:
            return [k for k in self._keys.values() if len(k.pool) < self.capacity]

    def _fill_round(self) -> bool:
        """Compute until every pool is full, a refresh is due or we are stopped; True if
        anything was computed."""
        pending: collections.deque[tuple[_Key, cf.Future[list[int]]]] = collections.deque()
        did = False
        deadline = time.monotonic() + self.refresh_s
        try:
            while not self._stop.is_set() and not self._wake.is_set() and time.monotonic() < deadline:
                short = self._short()
                if not short and not pending:
                    break
                inflight = collections.Counter(id(k) for k, _ in pending)
                for k in short:
                    if len(pending) >= 2 * self.workers:
                        break
                    if len(k.pool) + inflight[id(k)] * BATCH < self.capacity:
                        pending.append((k, self._pool().submit(_batch, k.pool.pub.n, BATCH)))
                        inflight[id(k)] += 1
                if not pending:
                    break
                k, fut = pending.popleft()
                values = fut.result()
                with self._lock:  # status() sees `ready` and `computed` move together
                    room = self.capacity - len(k.pool)
                    if room > 0:
                        k.pool.put([pl.mpz(v) for v in values[:room]])
                        k.made += min(room, len(values))
                        did = True
        finally:
            for _, fut in pending:
                fut.cancel()
        return did

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.refresh()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - the coordinator may be down: try later
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("obfuscator stock: could not fetch the arbiter keys: %s", self.last_error)
            try:
                self._fill_round()
            except Exception as exc:  # noqa: BLE001
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("obfuscator stock: filling failed: %s", self.last_error)
            self._wake.wait(timeout=self.refresh_s if not self._short() else 5.0)
