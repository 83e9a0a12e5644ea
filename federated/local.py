"""Vertical training on one machine: guest, host(s) and arbiter as separate processes that
exchange the real wire messages over pipes (`confide train local`).

Each party process reads only its own CSV. The join on `--id` stands in for the PSI `match` job:
the launcher reads the id columns alone, keeps the ids every file has (each file's ids must be
unique) and hands every party the same aligned order; the shared seed splits it into training
and held-out rows identically everywhere. After training, every party sends masked partial
logits of the held-out rows to the arbiter, which returns 0-1 scores to the guest only; the
guest computes the metrics and trains its guest-only baseline the same way.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from confide import errors
from confide.errors import ConfideError, ValidationError
from federated import messages as m
from federated import roles as R
from federated.metrics import evaluate

ARBITER = "arbiter"
GUEST = "guest"
EVAL_REQUEST = "heldout"


def _read_ids(path: Path, id_col: str) -> list[str]:
    try:
        head = pd.read_csv(path, nrows=0)
    except FileNotFoundError:
        raise ValidationError(f"{path}: no such file", field="path") from None
    except Exception as exc:  # noqa: BLE001 - any parse error is bad input
        raise ValidationError(f"{path}: not a readable CSV ({exc})") from None
    if id_col not in head.columns:
        raise ValidationError(f"{path}: no id column {id_col!r} (columns: {', '.join(map(str, head.columns[:20]))})",
                              field="id")
    ids = pd.read_csv(path, usecols=[id_col], dtype=str)[id_col]
    if ids.isna().any():
        raise ValidationError(f"{path}: {int(ids.isna().sum())} rows have no id", field="id")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise ValidationError(f"{path}: id values must be unique; {len(dup)} duplicates", field="id")
    return ids.tolist()


def align_ids(paths: Sequence[Path], id_col: str, k_min: int) -> list[str]:
    """The ids present in every file, in one agreed order (stand-in for PSI `match`)."""
    common: set[str] | None = None
    for p in paths:
        ids = set(_read_ids(p, id_col))
        common = ids if common is None else common & ids
    aligned = sorted(common or ())
    if len(aligned) < k_min:
        raise ValidationError(
            f"only {len(aligned)} ids are present in every file (k_min={k_min}); do the files use the same ids?",
            field="id")
    return aligned


def load_party_frame(path: Path, id_col: str, ids: Sequence[str], label: str | None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Features (every column but id and label), labels (guest) and feature names, rows in `ids` order."""
    df = pd.read_csv(path, dtype={id_col: str})
    if label is not None and label not in df.columns:
        raise ValidationError(f"{path}: no label column {label!r}", field="label")
    df = df.set_index(id_col).loc[list(ids)]
    y = None
    if label is not None:
        raw = df[label]
        if raw.isna().any():
            raise ValidationError(f"{path}: label column {label!r} has {int(raw.isna().sum())} missing values", field="label")
        vals = pd.to_numeric(raw, errors="coerce")
        if vals.isna().any():
            raise ValidationError(f"{path}: labels must be binary 0/1; found {raw[vals.isna()].iloc[0]!r}", field="label")
        try:
            y = R.check_labels(vals.to_numpy())
        except ValidationError as exc:
            raise ValidationError(f"{path}: {exc.message}", field="label") from None
        df = df.drop(columns=[label])
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise ValidationError(f"{path}: non-numeric feature column(s) {', '.join(map(str, bad[:5]))}", field="features")
    if df.shape[1] == 0:
        raise ValidationError(f"{path}: no feature columns", field="features")
    missing = [str(c) for c in df.columns if df[c].isna().any()]
    if missing:
        raise ValidationError(f"{path}: missing values in feature column(s) {', '.join(missing[:5])}; impute them first",
                              field="features")
    X = R.check_features(df.to_numpy(dtype=np.float64), str(path))
    return X, y, [str(c) for c in df.columns]


class _Wire:
    """A party's pipes to the others: outgoing messages go through a sender thread per peer so
    two parties sending each other large payloads never block each other."""

    def __init__(self, conns: dict[str, Connection]) -> None:
        self.conns = conns
        self.bytes_sent = 0
        self.allow_eof = False  # set once this party only waits for peers that may have finished
        self._closed: set[Connection] = set()
        self._queues: dict[str, queue.Queue[bytes | None]] = {}
        self._threads = []
        for peer, conn in conns.items():
            q: queue.Queue[bytes | None] = queue.Queue()
            t = threading.Thread(target=self._pump, args=(conn, q), daemon=True)
            t.start()
            self._queues[peer], self._threads = q, [*self._threads, t]

    @staticmethod
    def _pump(conn: Connection, q: "queue.Queue[bytes | None]") -> None:
        while (item := q.get()) is not None:
            conn.send_bytes(item)

    def send(self, out: list[R.Outgoing]) -> None:
        for to, msg in out:
            data = m.encode(msg)
            self.bytes_sent += len(data)
            self._queues[to].put(data)

    def recv(self, timeout: float = 3600.0) -> m._Msg:
        """The next message from any peer (a peer that finished and closed its end is skipped)."""
        while True:
            live = [c for c in self.conns.values() if c not in self._closed]
            if not live:
                raise errors.RemoteError("every peer process has ended")
            ready = wait(live, timeout=timeout)
            if not ready:
                raise errors.ProtocolError(f"no message within {timeout:.0f}s")
            conn = ready[0]
            assert isinstance(conn, Connection)
            try:
                return m.decode(conn.recv_bytes())
            except EOFError:
                if not self.allow_eof:
                    peer = next(p for p, c in self.conns.items() if c is conn)
                    raise errors.RemoteError(f"{peer} ended before the protocol did") from None
                self._closed.add(conn)

    def close(self) -> None:
        for q in self._queues.values():
            q.put(None)
        for t in self._threads:
            t.join(timeout=60)


def _sigterm(*_: Any) -> None:
    raise SystemExit(143)  # run the finally blocks: shut the worker pool down


def _party_main(kind: str, name: str, spec: dict[str, Any], conns: dict[str, Connection], result: Connection,
                ready: Any = None) -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    wire = None
    try:
        wire = _Wire(conns)
        out = _run_party(kind, name, spec, wire, ready)
        result.send(("ok", out))
    except ConfideError as exc:
        result.send(("error", exc.code, exc.message))
    except Exception as exc:  # noqa: BLE001 - reported to the launcher
        result.send(("error", "error", f"crashed: {exc!r}\n{traceback.format_exc()}"))
    finally:
        if wire is not None:
            wire.close()


def _precomputed(ready: Any) -> float:
    """Wait until every party has its obfuscators (the idle time of a real node); returns when."""
    if ready is not None:
        ready.wait()
    return time.time()


def _run_party(kind: str, name: str, spec: dict[str, Any], wire: _Wire, ready: Any = None) -> dict[str, Any]:
    from federated import paillier as pl
    from federated.executor import default_executor

    cfg = R.TrainConfig(**spec["config"])
    ids: list[str] = spec["ids"]
    train = np.asarray(spec["train"], dtype=np.int64)
    test = np.asarray(spec["test"], dtype=np.int64)
    train_keys = [ids[i] for i in train]
    hosts: list[str] = spec["hosts"]
    if kind == "arbiter":
        key = spec.get("arbiter_key")
        pair = None
        if key is not None:  # made ahead, as the coordinator's per-agreement key (coordinator.arbiter_keys)
            priv = pl.PrivateKey.from_dict(key)
            pair = (priv.public, priv)
        role: Any = R.ArbiterRole(name, spec["job_id"], cfg, guest=GUEST, hosts=hosts, rows=len(train), keypair=pair)
        _precomputed(ready)
        wire.send(role.start())
        while True:
            msg = wire.recv()
            out = role.handle(msg)
            wire.send(out)
            wire.allow_eof = role.finished  # hosts leave after sending their score shares
            if any(isinstance(x, m.Scores) for _, x in out):
                return {"decrypted_values": role.decrypted_values, "losses": role.losses}
    executor = default_executor(spec.get("workers"))
    try:
        if kind == "guest":
            X, y, names = load_party_frame(Path(spec["path"]), spec["id"], ids, spec["label"])
            assert y is not None
            role = R.GuestRole(name, spec["job_id"], cfg, X[train], y[train], join_keys=train_keys, hosts=hosts,
                               arbiter=ARBITER, executor=executor)
        else:
            X, _, names = load_party_frame(Path(spec["path"]), spec["id"], ids, None)
            role = R.HostRole(name, spec["job_id"], cfg, X[train], join_keys=train_keys, guest=GUEST, hosts=hosts,
                              arbiter=ARBITER, executor=executor)
        precompute_s, stocked = 0.0, 0
        if spec.get("n") is not None:
            # What a node's idle-time stock (party_node.obfuscator_stock) holds when the job
            # starts: r^n for the arbiter key, computed on this party's pool before training.
            t_pre = time.perf_counter()
            pool = pl.ObfuscatorPool(pl.PublicKey(int(spec["n"])), executor)
            stocked = role.setup_obfuscators(int(spec["n"]))
            pool.fill(stocked)
            role._ahead = pool
            precompute_s = time.perf_counter() - t_pre
        started_at = _precomputed(ready)
        t0 = time.perf_counter()
        wire.send(role.start())
        while not role.done:
            wire.send(role.handle(wire.recv()))
        train_s = time.perf_counter() - t0
    finally:
        executor.close()
    job = spec["job_id"]
    wire.allow_eof = True
    if kind == "host":
        share = R.score_share(job_id=job, sender=name, request_id=EVAL_REQUEST, partial=R.host_partial(role.model(), X[test]),
                              mask_seeds=[role.mask_seed], role="host")
        wire.send([(ARBITER, share)])
        return {"features": len(names), "bytes_sent": wire.bytes_sent, "timings": role.timings,
                "precompute_seconds": precompute_s, "stocked": stocked}
    seeds = [role.peer[h].mask_seed for h in hosts]
    share = R.score_share(job_id=job, sender=name, request_id=EVAL_REQUEST, partial=R.guest_partial(role.model(), X[test]),
                          mask_seeds=seeds, role="guest")
    wire.send([(ARBITER, share)])
    while True:
        msg = wire.recv()
        if isinstance(msg, m.Scores) and msg.sender == ARBITER and msg.request_id == EVAL_REQUEST:
            break
        raise errors.ProtocolError(f"guest expected scores, got {msg.kind}")  # type: ignore[attr-defined]
    scores = np.frombuffer(msg.data, dtype=">f8").astype(np.float64)
    t1 = time.perf_counter()
    gonly = R.train_guest_only(X[train], y[train], cfg)
    gonly_scores = 1.0 / (1.0 + np.exp(-R.guest_partial(gonly, X[test])))
    federated = evaluate(y[test], scores)
    baseline = evaluate(y[test], gonly_scores)
    # What the brand could do alone with exact logistic regression (scikit-learn): with the
    # Taylor loss, "trained the same way" costs the guest-only model more than the joint one and
    # flatters the partner; with irls the guest-only model is this LR (up to the solver).
    from sklearn.linear_model import LogisticRegression

    exact = LogisticRegression(max_iter=2000).fit(X[train], y[train])
    exact_auc = evaluate(y[test], exact.predict_proba(X[test])[:, 1])["auc"]
    epoch_s = role.timings["epoch_s"]
    return {
        "auc": federated["auc"], "ks": federated["ks"], "pr_auc": federated["pr_auc"],
        "lift_top_decile": federated["lift_top_decile"], "brier": federated["brier"], "ece": federated["ece"],
        "calibration": federated["calibration"],
        "guest_only_auc": baseline["auc"], "guest_only": {k: v for k, v in baseline.items() if k != "calibration"},
        "guest_only_exact_lr_auc": exact_auc, "guest_only_epochs": gonly["epochs"], "guest_only_seconds": time.perf_counter() - t1,
        "loss": cfg.loss, "epochs": len(role.losses), "losses": role.losses, "stop_reason": role.stop_reason,
        "setup_seconds": role.timings["setup_s"], "guest_encrypt_seconds": role.timings.get("encrypt_s", 0.0), "seconds_per_epoch": float(np.mean(epoch_s)) if epoch_s else 0.0,
        "epoch_seconds": epoch_s, "train_seconds": train_s, "key_bits": cfg.key_bits,
        "train_rows": int(len(train)), "test_rows": int(len(test)), "guest_features": len(names),
        "batches_per_epoch": len(role.batches), "guest_bytes_sent": wire.bytes_sent,
        "model": role.model(),
        "precompute_seconds": precompute_s, "stocked": stocked, "started_at": started_at,
        "encrypted": role.timings.get("encrypted", 0),
        "obfuscators_from_stock": role.timings.get("obfuscators_from_stock", 0),
    }


def run_local(guest: Path, hosts: Sequence[Path], *, id_col: str, label: str, test_fraction: float = 0.2,
              seed: int = 42, config: R.TrainConfig | None = None, workers: int | None = None,
              timeout: float = 3600.0, precompute: bool = False) -> dict[str, Any]:
    """Train guest + hosts + arbiter as separate processes; returns the guest's report (held-out
    metrics of the federated and the guest-only model, timings). Raises the ConfideError a party
    raised (ValidationError for bad input).

    precompute: as with nodes that stock obfuscators while idle — the arbiter key is made first,
    every party computes the `r^n` its setup needs, and training starts when all have them
    (`precompute_seconds` and `wall_after_precompute_seconds` report the two phases)."""
    if not hosts:
        raise ValidationError("give at least one --host file")
    cfg = config or R.TrainConfig(seed=seed)
    cfg.check_keys()
    ids = align_ids([guest, *hosts], id_col, cfg.k_min)
    train, test = R.split_indices(len(ids), test_fraction, seed)
    if len(test) == 0 or len(train) == 0:
        raise ValidationError("the split leaves no training or no held-out rows; change --test-fraction")
    host_names = [f"host{i + 1}" for i in range(len(hosts))]
    names = [ARBITER, GUEST, *host_names]
    ctx = mp.get_context("spawn")
    ends: dict[str, dict[str, Connection]] = {n: {} for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ca, cb = ctx.Pipe(duplex=True)
            ends[a][b], ends[b][a] = ca, cb
    common = {"config": cfg.model_dump(), "ids": ids, "train": train.tolist(), "test": test.tolist(),
              "hosts": host_names, "job_id": f"local-{os.getpid()}", "id": id_col, "workers": workers}
    specs = {ARBITER: ("arbiter", {**common}), GUEST: ("guest", {**common, "path": str(guest), "label": label})}
    for hn, hp in zip(host_names, hosts):
        specs[hn] = ("host", {**common, "path": str(hp)})
    ready = None
    if precompute:
        from federated import paillier as pl

        _, priv = pl.generate_keypair(cfg.key_bits)
        specs[ARBITER][1]["arbiter_key"] = priv.to_dict()
        for n in names[1:]:
            specs[n][1]["n"] = str(priv.public.n)
        ready = ctx.Barrier(len(names))
    procs, results = [], {}
    for n in names:
        kind, spec = specs[n]
        r_recv, r_send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_party_main, args=(kind, n, spec, ends[n], r_send, ready), name=f"confide-vfl-{n}")
        p.start()
        r_send.close()
        procs.append((n, p, r_recv))
    for n in names:  # the children hold their ends now: a party that dies is seen as EOF by its peers
        for c in ends[n].values():
            c.close()
    t0 = time.perf_counter()
    try:
        pending = {r: n for n, _, r in procs}
        while pending:
            ready = wait(list(pending), timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            if not ready:
                raise errors.RemoteError("local training timed out")
            for r in ready:
                n = pending.pop(r)  # type: ignore[call-overload]
                try:
                    res = r.recv()  # type: ignore[union-attr]
                except EOFError:
                    raise errors.RemoteError(f"party {n} ended without a result") from None
                if res[0] == "error":
                    cls = errors._BY_CODE.get(res[1], errors.ConfideError)
                    raise cls(f"{n}: {res[2]}")
                results[n] = res[1]
    finally:
        for _, p, _ in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    report = results[GUEST]
    report["wall_seconds"] = time.perf_counter() - t0
    if precompute:
        report["wall_after_precompute_seconds"] = time.time() - report["started_at"]
        report["host_precompute_seconds"] = [results[h]["precompute_seconds"] for h in host_names]
    report["hosts"] = len(hosts)
    report["arbiter_decrypted_values"] = results[ARBITER]["decrypted_values"]
    report["host_timings"] = [results[h]["timings"] for h in host_names]
    report["matched_rows"] = len(ids)
    return report
