"""A node's side of the vertical `train` job (docs/vfl.md §4): align, gate, train, evaluate.

1. Rows: this node's rows matched by the PSI `match` job `params.match_job` (`psi_matches`),
   ordered by join key — the same order at every party.
2. Consent gate at this node (purpose = the agreement rule's purpose for `train`, recipient =
   each other party). The parties then agree on the rows allowed at *every* node: each sends the
   others, over the end-to-end encrypted relay (channel `vfl.gate`), SHA-256(job id, join key) of
   its allowed matched rows; each keeps the intersection. A party so learns which of the shared
   matched rows the other side excluded — which it must learn anyway to align the training rows
   — and nothing about rows outside the match.
3. The same train/held-out split everywhere (`split_indices`); the party runs GuestRole or
   HostRole: party <-> party messages over the relay (channel `vfl`), party <-> arbiter over the
   coordinator's arbiter mailbox (`coordinator.arbiter`).
4. Held-out evaluation: masked partial logits to the arbiter, 0-1 scores to the guest only; the
   guest computes the metrics and the guest-only baseline trained the same way.

Private step result (this party's operator only): the model part (weights, mask seeds, feature
names) and, at the guest, the held-out metrics. To the coordinator: sizes, epochs, model version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sqlalchemy import select

from confide.db import session_scope
from confide.errors import AgreementError, ConfideError, Conflict, NotFound, ProtocolError, RemoteError, ValidationError
from party_node.relay import RelayChannel
from party_node.steps import PRIVATE, StepContext, register
from party_node.storage.models import PsiMatch

log = logging.getLogger("confide.node.vfl")
ARBITER = "coordinator"
EVAL_REQUEST = "heldout"
RESUMED = "the training resumed"  # as coordinator.arbiter.RESUMED (the 409 of a superseded generation)
SNAPSHOT_DIR = "vfl-snapshots"
WAIT_S = 1800.0  # longest wait for any one message (the peers' one-off encryption can be long)
POOL_ROWS = 2_000  # from this many training rows, heavy Paillier work goes to a process pool


def _key_digest(job_id: str, join_key: str) -> str:
    return hashlib.sha256(f"{job_id}\x00{join_key}".encode()).hexdigest()


UNREACHABLE_S = 60.0  # how long a node rides out a coordinator it cannot reach


def _retrying(call: Callable[[], Any], stop: threading.Event, *, idempotent: bool = True) -> Any:
    """`call()`, retried while the coordinator is unreachable, for up to UNREACHABLE_S: any
    transport failure for reads, only a failure to connect (nothing was sent) for writes.
    Answers from the coordinator (404, 409, ...) are not retried here. After a coordinator
    restart the arbiter session is gone: the next call gets 409 and the step fails."""
    deadline = time.monotonic() + UNREACHABLE_S
    while True:
        try:
            return call()
        except RemoteError as exc:
            if exc.details.get("status") is not None or time.monotonic() > deadline or stop.is_set():
                raise
            if not idempotent and "ConnectError" not in exc.message:
                raise
            time.sleep(1.0)


class _Resume(Exception):
    """The arbiter opened a new generation (a party restarted): restore the agreed epoch."""

    def __init__(self, gen: int | None) -> None:
        super().__init__(f"training resumes (generation {gen})")
        self.gen = gen


class _Links:
    """Receives from every peer (relay) and the arbiter (mailbox) on background threads into one
    queue; sends on the caller's thread. One generation of the session (coordinator.arbiter):
    relay channel `vfl` (generation 0) or `vfl.g<gen>`, mailbox `?gen=<gen>`."""

    def __init__(self, ctx: StepContext, peers: list[str], gen: int = 0) -> None:
        self.ctx = ctx
        self.gen = gen
        self.stop = threading.Event()
        self.relay = RelayChannel(ctx.node, ctx.job_id, "vfl" if gen == 0 else f"vfl.g{gen}", self.stop)
        self.q: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._arb_seq = 0
        self.bytes_to_arbiter = 0
        self._threads = [threading.Thread(target=self._from_peer, args=(p,), daemon=True) for p in peers]
        self._threads.append(threading.Thread(target=self._from_arbiter, daemon=True))
        for t in self._threads:
            t.start()

    def _from_peer(self, peer: str) -> None:
        from federated import messages as m

        try:
            while not self.stop.is_set():
                data = _retrying(lambda: self.relay.recv(peer, timeout=WAIT_S), self.stop)
                self.q.put(("msg", m.decode(data)))
        except Exception as exc:  # noqa: BLE001 - handed to the step's thread
            if not self.stop.is_set():
                self.q.put(("error", exc))

    def _from_arbiter(self) -> None:
        from federated import messages as m

        seq = 0
        try:
            with self.ctx.node.coordinator() as c:
                deadline = time.monotonic() + WAIT_S
                while not self.stop.is_set():
                    try:
                        data = _retrying(lambda: c.request(
                            "GET", f"/v1/arbiter/{self.ctx.job_id}/out/{seq}", params={"gen": self.gen}, raw=True), self.stop)
                    except NotFound:  # the server waited a few seconds already
                        if time.monotonic() > deadline:
                            raise ProtocolError(f"no message from the arbiter within {WAIT_S:.0f}s") from None
                        continue
                    if data[:1] == b"C":  # this generation is over: another party restarted
                        try:
                            gen = int(json.loads(data[1:])["resume"])
                        except Exception:  # noqa: BLE001
                            raise ProtocolError("malformed control message from the arbiter") from None
                        self.q.put(("resume", gen))
                        return
                    if data[:1] != b"M":
                        raise ProtocolError("malformed message from the arbiter")
                    self.q.put(("msg", m.decode(data[1:])))
                    seq += 1
                    deadline = time.monotonic() + WAIT_S
        except Exception as exc:  # noqa: BLE001
            if not self.stop.is_set():
                self.q.put(("error", exc))

    def to_arbiter(self, body: bytes) -> None:
        with self.ctx.node.coordinator() as c:
            try:
                _retrying(lambda: c.request(
                    "PUT", f"/v1/arbiter/{self.ctx.job_id}/in/{self._arb_seq}", params={"gen": self.gen},
                    content=body, content_type="application/octet-stream"), self.stop)
            except Conflict as exc:
                # Our seq advances only after a PUT succeeds, so "already sent" means the
                # coordinator took a PUT whose answer was lost: done. Anything else is fatal.
                if RESUMED in exc.message:
                    raise _Resume(None) from None
                if "already sent" not in exc.message:
                    raise
        self._arb_seq += 1
        self.bytes_to_arbiter += len(body)

    def send(self, out: list[tuple[str, Any]]) -> None:
        from federated import messages as m

        for to, msg in out:
            if to == ARBITER:
                self.to_arbiter(b"M" + m.encode(msg))
            else:
                data = m.encode(msg)
                try:
                    _retrying(lambda: self.relay.send(to, data), self.stop, idempotent=False)
                except RemoteError as exc:
                    if exc.details.get("status") is not None:
                        raise
                    # Cut off mid-send (e.g. the coordinator restarted): whether it arrived is
                    # unknown, so everyone restores the last epoch in a new generation instead.
                    raise _Resume(None) from None

    def recv(self) -> Any:
        deadline = time.monotonic() + WAIT_S
        while True:
            if self.ctx.cancelled.is_set():
                raise ProtocolError("step cancelled")
            try:
                kind, item = self.q.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise ProtocolError(f"no training message within {WAIT_S:.0f}s") from None
                continue
            if kind == "resume":
                raise _Resume(int(item))
            if kind == "error":
                if isinstance(item, ConfideError):
                    raise item
                raise ProtocolError(f"training link failed: {type(item).__name__}: {item}")
            return item

    def close(self) -> None:
        self.stop.set()


class _Snapshots:
    """This step's resume state in the node's data dir (`vfl-snapshots/<job>/<step>/`): the
    agreed training rows (this node's own join keys) and the role snapshot after each of the
    last two completed epochs (weights, losses, the peers' *encrypted* rows: no plaintext of
    another party). Files are written atomically (temporary file, fsync, rename)."""

    def __init__(self, ctx: StepContext) -> None:
        self.root = Path(ctx.node.settings.data_dir) / SNAPSHOT_DIR / ctx.job_id
        self.dir = self.root / ctx.step.replace("/", "_")

    def _write(self, name: str, data: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)

    def save_rows(self, join_keys: list[str]) -> None:
        self._write("rows.json", {"join_keys": join_keys})

    def load_rows(self) -> list[str] | None:
        try:
            return list(json.loads((self.dir / "rows.json").read_text())["join_keys"])
        except FileNotFoundError:
            return None

    def save(self, epoch: int, snap: dict[str, Any]) -> None:
        self._write(f"epoch-{epoch}.json", snap)
        for e in self.epochs():
            if e < epoch - 1:  # a peer may be one epoch behind us, never two
                (self.dir / f"epoch-{e}.json").unlink(missing_ok=True)

    def epochs(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(f.name[6:-5]) for f in self.dir.glob("epoch-*.json"))

    def load(self, epoch: int) -> dict[str, Any]:
        return dict(json.loads((self.dir / f"epoch-{epoch}.json").read_text()))

    def delete(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _sweep_snapshots(ctx: StepContext) -> None:
    """Delete the resume state of training jobs that are over (e.g. failed while this node was
    down), asking the coordinator about jobs this node has no running step of."""
    from party_node.storage.models import StepRecord

    base = Path(ctx.node.settings.data_dir) / SNAPSHOT_DIR
    if not base.is_dir():
        return
    for d in base.iterdir():
        if d.name == ctx.job_id:
            continue
        with session_scope(ctx.node.factory) as s:
            running = s.scalars(select(StepRecord.step).where(StepRecord.job_id == d.name,
                                                              StepRecord.status == "running")).first()
        if running is not None:
            continue
        try:
            with ctx.node.coordinator() as c:
                status = c.get(f"/v1/jobs/{d.name}")["status"]
        except NotFound:
            status = "deleted"
        except ConfideError:
            continue  # ask again next time
        if status in ("succeeded", "failed", "cancelled", "deleted"):
            shutil.rmtree(d, ignore_errors=True)


def _attempt(ctx: StepContext) -> int:
    from party_node.storage.models import StepRecord

    with session_scope(ctx.node.factory) as s:
        rec = s.get(StepRecord, (ctx.job_id, ctx.step))
        return int(rec.attempt) if rec is not None else 1


def _resume_round(ctx: StepContext, epochs: list[int], gen: int | None) -> tuple[int, int]:
    """Offer the epochs this node can restore; (generation, epoch) once every party has."""
    deadline = time.monotonic() + WAIT_S
    stop = threading.Event()
    with ctx.node.coordinator() as c:
        while True:
            if ctx.cancelled.is_set():
                raise ProtocolError("step cancelled")
            body = {"epochs": epochs, "gen": gen}
            r = _retrying(lambda: c.post(f"/v1/arbiter/{ctx.job_id}/resume", body), stop)
            gen = int(r["gen"])
            if "epoch" in r:
                log.warning("job %s: training resumes in generation %d from epoch %d (offered %s)",
                            ctx.job_id, gen, int(r["epoch"]), epochs)
                return gen, int(r["epoch"])
            if time.monotonic() > deadline:
                raise ProtocolError(f"the other parties did not rejoin the training within {WAIT_S:.0f}s")


def _dataset_and_frame(ctx: StepContext, match_job: str, columns: list[str]
                       ) -> tuple[str, str, Any, dict[str, str], dict[str, str]]:
    """(dataset, key column, frame of matched rows with `columns`, row key -> join key,
    column -> schema type)."""
    from party_node import datasets as ds

    with session_scope(ctx.node.factory) as s:
        rows = _match_rows(s, match_job)
        if {r[3] for r in rows} != {ctx.agreement.agreement_id}:
            raise AgreementError(f"match job {match_job} ran under another agreement")
        datasets = {r[2] for r in rows}
        if len(datasets) != 1:
            raise ValidationError(f"match job {match_job} matched rows of several datasets here")
        dataset = datasets.pop()
        agreed = set(ctx.me.columns.get(dataset, []))
        missing = [c for c in columns if c not in agreed]
        if missing:
            raise AgreementError(f"columns {missing} are not agreed for dataset {dataset!r}")
        info = ds.describe(s, dataset)
    key = next(c["column"] for c in info["columns"] if c["role"] == "key")
    types = {c["column"]: c["type"] for c in info["columns"]}
    unknown = [c for c in columns if c not in types]
    if unknown:
        raise ValidationError(f"dataset {dataset!r} has no column(s) {unknown}", field="features")
    joins = {str(r[0]): str(r[1]) for r in rows}
    frame = ds.load_frame(ctx.node.engine, dataset, list(dict.fromkeys([key, *columns])))
    frame[key] = frame[key].astype(str)
    frame = frame[frame[key].isin(joins)]
    if frame[key].duplicated().any():
        raise ValidationError(f"dataset {dataset!r} has duplicate row keys among the matched rows")
    return dataset, key, frame, joins, types


def _encoder(model: dict[str, Any]) -> Any:
    """The feature transform stored with a model part (raw columns for parts trained before)."""
    from party_node.features import Encoder

    if "encoding" in model:
        return Encoder.from_dict(model["encoding"])
    return Encoder.identity(list(model["features"]))


def _match_rows(s: Any, match_job: str) -> list[Any]:
    """(row key, join key, dataset, agreement id) of every row `match_job` matched at this node."""
    rows = s.execute(select(PsiMatch.row_key, PsiMatch.join_key, PsiMatch.dataset, PsiMatch.agreement_id)
                     .where(PsiMatch.job_id == match_job)).all()
    if not rows:
        raise ValidationError(f"this node holds no matched rows of match job {match_job}; run a match job first",
                              field="match_job")
    return list(rows)


def _joins(ctx: StepContext, match_job: str, dataset: str) -> dict[str, str]:
    """This node's row key -> join key of `match_job` (which must have matched `dataset`)."""
    with session_scope(ctx.node.factory) as s:
        rows = _match_rows(s, match_job)
    if {r[3] for r in rows} != {ctx.agreement.agreement_id} or {r[2] for r in rows} != {dataset}:
        raise ValidationError(f"match job {match_job} matched another dataset or ran under another agreement",
                              field="match_job")
    return {str(r[0]): str(r[1]) for r in rows}


def _align_hub(ctx: StepContext, guest: str, hosts: list[str], allowed: set[str],
               host_joins: dict[str, dict[str, str]]) -> list[str]:
    """Rows and their order when each partner matched the brand in its own match job (several
    partners): every partner sends the guest SHA-256(job id, join key) of its allowed matched
    rows; the guest keeps its allowed rows that every partner allows, orders them, and sends
    each partner the digests of *that partner's* join keys in that order. A partner learns
    which of its matched rows are used (as with one partner) and the row count, nothing about
    the other partners' rows. Returns this node's join keys (the guest: with the first partner)
    in the agreed order."""
    ch = RelayChannel(ctx.node, ctx.job_id, "vfl.gate", ctx.cancelled)
    me = ctx.node.identity.name
    if me != guest:
        mine = {_key_digest(ctx.job_id, host_joins[guest][r]): host_joins[guest][r] for r in allowed}
        ch.send(guest, json.dumps(sorted(mine)).encode())
        order = _json_keys(ch.recv(guest, timeout=WAIT_S), guest)
        if len(set(order)) != len(order) or not set(order) <= set(mine):
            raise ProtocolError(f"{guest} asked for rows this node did not offer")
        return [mine[d] for d in order]
    offered = {h: set(_json_keys(ch.recv(h, timeout=WAIT_S), h)) for h in hosts}
    digest = {h: {r: _key_digest(ctx.job_id, host_joins[h][r]) for r in allowed if r in host_joins[h]} for h in hosts}
    rows = [r for r in allowed if all(r in digest[h] and digest[h][r] in offered[h] for h in hosts)]
    rows.sort(key=lambda r: digest[hosts[0]][r])  # an order that says nothing about the rows
    for h in hosts:
        ch.send(h, json.dumps([digest[h][r] for r in rows]).encode())
    return [host_joins[hosts[0]][r] for r in rows]


def _agree_rows(ctx: StepContext, allowed_keys: set[str], others: list[str]) -> set[str]:
    """The join keys allowed at every node (see the module docstring)."""
    ch = RelayChannel(ctx.node, ctx.job_id, "vfl.gate", ctx.cancelled)
    mine = {_key_digest(ctx.job_id, k): k for k in allowed_keys}
    payload = json.dumps(sorted(mine)).encode()
    for p in others:
        ch.send(p, payload)
    keep = set(mine)
    for p in others:
        try:
            theirs = json.loads(ch.recv(p, timeout=WAIT_S))
        except ValueError:
            raise ProtocolError(f"{p} sent a malformed list of allowed rows") from None
        if not isinstance(theirs, list):
            raise ProtocolError(f"{p} sent a malformed list of allowed rows")
        keep &= set(map(str, theirs))
    return {mine[d] for d in keep}


def _job_over(ctx: StepContext) -> bool:
    try:
        with ctx.node.coordinator() as c:
            return c.get(f"/v1/jobs/{ctx.job_id}")["status"] in ("succeeded", "failed", "cancelled")
    except NotFound:
        return True
    except ConfideError:
        return False


def train_step(ctx: StepContext) -> dict[str, Any]:
    from federated import messages as m
    from federated import roles as R
    from federated.executor import InProcessExecutor, ProcessPoolExecutor
    from federated.metrics import evaluate
    from federated.roles import check_features
    from party_node import features as features_mod

    t0 = time.perf_counter()
    p = ctx.params
    me = ctx.node.identity.name
    guest, hosts = p["guest"], list(p["hosts"])
    if me != guest and me not in hosts:
        raise AgreementError(f"{me!r} has no role in this training job")
    _sweep_snapshots(ctx)
    is_guest = me == guest
    others = [x for x in [guest, *hosts] if x != me]
    rule = ctx.agreement.spec.rule(ctx.job_type or "train")
    features = list(p["guest_features"] if is_guest else p["host_features"][me])
    columns = features + ([p["label"]] if is_guest else [])
    # One match job for everyone, or (several partners) one per partner: the guest is then the
    # hub that aligns every partner's rows (`_align_hub`).
    mj = p["match_job"]
    hub = isinstance(mj, dict)
    my_jobs = ([mj[h] for h in hosts] if is_guest else [mj[me]]) if hub else [mj]
    dataset, key, frame, joins, types = _dataset_and_frame(ctx, my_jobs[0], columns)
    host_joins = {hosts[0] if is_guest else guest: joins}
    for h, job in zip(hosts[1:] if is_guest and hub else [], my_jobs[1:]):
        host_joins[h] = _joins(ctx, job, dataset)
        frame = frame[frame[key].isin(host_joins[h])]  # the guest trains on rows every partner matched
    what = f"{me} dataset {dataset}"
    encode = {"categories": (p.get("categories") or {}).get(me),
              "max_categories": int(p.get("max_categories", features_mod.MAX_CATEGORIES)),
              "standardize": bool(p.get("standardize", True)), "what": what}
    # Bad data (unknown column, missing or non-numeric values, empty vocabulary) fails here,
    # before any row leaves the node; the real fit below uses the training rows only.
    features_mod.fit(frame, features, types, **encode).transform(frame, what)

    # Consent gate at this node, for each party the model's use involves.
    now = dt.datetime.now(dt.timezone.utc)
    subjects = frame[key].tolist()
    allowed = set(subjects)
    denied: dict[str, int] = {}
    for other in others:
        decision = ctx.node.consent.allowed(subjects, rule.purpose, other, now)
        allowed &= set(decision.allowed)
        for reason, n in decision.denied_counts.items():
            denied[reason] = max(denied.get(reason, 0), n)
    store = _Snapshots(ctx)
    agreed = store.load_rows()
    allowed_keys = {joins[s] for s in allowed if s in joins}
    if agreed is not None:
        # This node restarted mid-training: the rows every party agreed on before, in their
        # order (no new exchange: the others are mid-training). All must still pass the gate.
        lost = set(agreed) - allowed_keys
        if lost:
            store.delete()
            raise ValidationError(f"{len(lost)} of the training rows agreed before this node restarted no longer "
                                  "pass the consent gate here; rerun the job")
        ordered = list(agreed)
    else:
        if _attempt(ctx) > 1:
            raise ProtocolError("this node restarted before the parties agreed on the training rows; "
                                "the training cannot resume: rerun the job")
        if hub:
            ordered = _align_hub(ctx, guest, hosts, allowed, host_joins)
        else:
            ordered = sorted(_agree_rows(ctx, allowed_keys, others))
    frame = frame.assign(_join=frame[key].map(joins))
    if not set(ordered) <= set(frame["_join"]):
        raise ValidationError("the agreed rows are not all present at this node; rerun the match job")
    frame = frame.set_index("_join", drop=False).loc[ordered]
    used = frame[key].tolist()
    for other in others:
        ctx.node.consent.record_usage(ctx.job_id, rule.purpose, used, agreement_id=ctx.agreement.agreement_id,
                                      recipient=other)
    # The roles compare a digest of these in PartyHello: the shared join keys, or (hub) the
    # row positions, since the partners' join keys differ.
    join_keys = [f"{ctx.job_id}:{i}" for i in range(len(ordered))] if hub else list(ordered)
    y = None
    if is_guest:
        raw = frame[p["label"]]
        if raw.isna().any():
            raise ValidationError(f"label column {p['label']!r} has {int(raw.isna().sum())} missing values",
                                  field="label")
        try:
            y = R.check_labels(raw.astype("float64").to_numpy())
        except (TypeError, ValueError):
            raise ValidationError("labels must be binary 0/1", field="label") from None
    n = len(join_keys)
    cfg = R.TrainConfig(**p["train"])
    # This node's own check: a partner does not accept short keys on the requester's word.
    if cfg.allow_short_keys and os.environ.get("CONFIDE_TEST_SHORT_KEYS") != "1":
        raise ValidationError("allow_short_keys is for tests only: this node was not started with "
                              "CONFIDE_TEST_SHORT_KEYS=1", field="train")
    if n < cfg.k_min:
        raise ValidationError(f"only {n} matched rows pass the consent gate at every node (k_min={cfg.k_min})")
    train, test = R.split_indices(n, p["test_fraction"], p["seed"])
    if len(train) == 0 or len(test) == 0:
        raise ValidationError("the split leaves no training or no held-out rows; change test_fraction")
    train_keys = [join_keys[i] for i in train]
    # Categorical columns one-hot, numeric standardised: fitted on the training rows only, here.
    # An indicator needs k_min rows in every mini-batch (else it would single rows out).
    encoder = features_mod.fit(frame.iloc[train], features, types, **encode, min_count=cfg.k_min,
                               batches=R.make_batches(len(train), cfg.batch_size, cfg.seed))
    X = check_features(encoder.transform(frame, what), what)
    del frame

    executor = ProcessPoolExecutor() if len(train) >= POOL_ROWS else InProcessExecutor()

    from party_node.obfuscator_stock import key_fingerprint

    # Obfuscators this node computed while idle for the agreement's arbiter key, if any.
    stock = getattr(getattr(ctx.node, "obfuscators", None), "pool_for", None)

    def make_role() -> Any:
        if is_guest:
            assert y is not None
            return R.GuestRole(me, ctx.job_id, cfg, X[train], y[train], join_keys=train_keys, hosts=hosts,
                               arbiter=ARBITER, executor=executor, obfuscators=stock)
        return R.HostRole(me, ctx.job_id, cfg, X[train], join_keys=train_keys, guest=guest, hosts=hosts,
                          arbiter=ARBITER, executor=executor, obfuscators=stock)

    if agreed is None:
        store.save_rows(list(ordered))
    links: _Links | None = None
    sent = 0
    resumed_from: list[int] = []
    finished = False
    try:
        gen, epoch = _resume_round(ctx, store.epochs(), None) if agreed is not None else (0, 0)
        if agreed is not None:
            resumed_from.append(epoch)
        while True:
            role = make_role()
            links = _Links(ctx, others, gen)
            try:
                if epoch > 0:
                    links.send(role.restore(store.load(epoch)))
                else:
                    links.to_arbiter(b"C" + json.dumps({"rows": int(len(train))}).encode())
                    links.send(role.start())
                t_train = time.perf_counter()
                while not role.done:
                    msg = links.recv()
                    out = role.handle(msg)
                    if isinstance(msg, m.EpochDone):
                        # Before the next epoch's messages leave: a peer that hears from us in
                        # epoch e+1 knows we can restore epoch e.
                        try:
                            store.save(len(role.losses), role.snapshot())
                        except ProtocolError as exc:
                            # The role already took a quick peer's first message of the next
                            # epoch, so it is not at an epoch boundary: keep the previous
                            # snapshot (a resume restores the epoch every party has).
                            log.info("job %s: no snapshot after epoch %d (%s); epoch %d's stands",
                                     ctx.job_id, len(role.losses), exc.message, len(role.losses) - 1)
                    links.send(out)
                train_s = time.perf_counter() - t_train
                # Held-out evaluation: masked partial logits to the arbiter; scores to the guest only.
                if is_guest:
                    seeds = [role.peer[h].mask_seed for h in hosts]
                    partial = R.guest_partial(role.model(), X[test])
                else:
                    seeds = [role.mask_seed]
                    partial = R.host_partial(role.model(), X[test])
                links.send([(ARBITER, R.score_share(job_id=ctx.job_id, sender=me, request_id=EVAL_REQUEST,
                                                    partial=partial, mask_seeds=seeds,
                                                    role="guest" if is_guest else "host"))])
                scores = None
                if is_guest:
                    msg = links.recv()
                    if not (isinstance(msg, m.Scores) and msg.sender == ARBITER and msg.request_id == EVAL_REQUEST):
                        raise ProtocolError(f"the guest expected the held-out scores, got "
                                            f"{getattr(msg, 'kind', msg)!r}")
                    scores = np.frombuffer(msg.data, dtype=">f8").astype(np.float64)
                    if len(scores) != len(test):
                        raise ProtocolError(f"{len(scores)} scores for {len(test)} held-out rows")
                break
            except _Resume as r:
                # Another party restarted: everyone restores the same completed epoch.
                links.close()
                sent += links.relay.bytes_sent + links.bytes_to_arbiter
                gen, epoch = _resume_round(ctx, store.epochs(), r.gen)
                resumed_from.append(epoch)
        finished = True
    finally:
        if links is not None:
            links.close()
        executor.close()
        if finished or not ctx.cancelled.is_set() or _job_over(ctx):
            store.delete()  # kept only when the node is shutting down mid-job (it resumes)

    model = {**role.model(), "features": features, "dataset": dataset, "mask_seeds": seeds,
             "encoding": encoder.to_dict(), "feature_names": encoder.names}
    epochs = len(role.losses)
    private: dict[str, Any] = {
        "role": "guest" if is_guest else "host", "model_version": ctx.job_id, "model": model,
        "match_job": p["match_job"],
        "matched_rows": len(joins), "rows": n, "train_rows": int(len(train)), "test_rows": int(len(test)),
        "gate": {"allowed_here": len(allowed), "allowed_everywhere": n, "denied": denied},
        "epochs": epochs, "losses": role.losses, "stop_reason": role.stop_reason,
        "setup_seconds": role.timings["setup_s"], "train_seconds": round(train_s, 3),
        "encrypted": role.timings.get("encrypted", 0),
        "obfuscators_from_stock": role.timings.get("obfuscators_from_stock", 0),
        "arbiter_key_fingerprint": key_fingerprint(role.pub.n) if role.pub is not None else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "bytes_sent": sent + links.relay.bytes_sent + links.bytes_to_arbiter, "key_bits": cfg.key_bits,
        "resumed_from_epochs": resumed_from,
    }
    if is_guest:
        assert y is not None and scores is not None
        federated = evaluate(y[test], scores)
        gonly = R.train_guest_only(X[train], y[train], cfg)
        baseline = evaluate(y[test], 1.0 / (1.0 + np.exp(-R.guest_partial(gonly, X[test]))))
        private["metrics"] = {**federated, "guest_only_auc": baseline["auc"],
                              "guest_only": {k: v for k, v in baseline.items() if k != "calibration"},
                              "guest_only_epochs": gonly["epochs"]}
        # For leads the partner does not know (score jobs): the guest-only model, trained the same way.
        private["guest_only_model"] = {"weights": gonly["weights"], "intercept": gonly["intercept"]}
        private["auc"], private["guest_only_auc"] = federated["auc"], baseline["auc"]
    ctx.node.audit.append("vfl.train", {
        "job_id": ctx.job_id, "agreement_id": ctx.agreement.agreement_id, "version": ctx.agreement.version,
        "purpose": rule.purpose, "role": private["role"], "model_version": ctx.job_id, "matched_rows": len(joins),
        "rows_used": n, "denied": denied, "epochs": epochs})
    public = {"model_version": ctx.job_id, "role": private["role"], "train_rows": int(len(train)),
              "test_rows": int(len(test)), "features": encoder.width, "source_columns": len(features),
              "epochs": epochs, "losses": [round(float(v), 6) for v in role.losses],
              "stop_reason": role.stop_reason}
    if is_guest:
        public["heldout_metrics"] = (
            _registry_metrics(private["metrics"], len(test), ctx.agreement.spec.k_min)
            if ctx.params.get("publish_metrics")
            else {"suppressed": True, "reason": "kept private by the brand (publish_metrics is false)"}
        )
    return {**public, PRIVATE: private}


REGISTRY_METRICS = ("auc", "ks", "pr_auc", "lift_top_decile", "brier", "ece")


def _registry_metrics(metrics: dict[str, Any], heldout: int, k_min: int) -> dict[str, Any]:
    """What the brand reports to the coordinator's model registry when the train job asks it
    to (`publish_metrics`, off by default: the leakage table gives metrics to the brand only):
    aggregate held-out quality
    (AUC, KS, PR-AUC, top-decile lift, Brier, ECE), federated and guest-only, when the held-out
    rows number at least k_min. Not the base rate or the per-decile calibration table (a decile
    of the held-out rows can be fewer than k_min rows); those stay in the private result."""
    if heldout < k_min:
        return {"suppressed": True, "reason": f"{heldout} held-out rows, fewer than k_min={k_min}"}
    return {"rows": heldout, **{k: round(float(metrics[k]), 6) for k in REGISTRY_METRICS},
            "guest_only": {k: round(float(metrics["guest_only"][k]), 6) for k in REGISTRY_METRICS}}


# ------------------------------------------------------------------------------------ scoring


def _model_part(ctx: StepContext, model: str, me: str) -> dict[str, Any]:
    """This node's private result of the train job `model` (its model part), or ValidationError."""
    from party_node.storage.models import StepRecord

    with session_scope(ctx.node.factory) as s:
        rec = s.get(StepRecord, (model, f"train@{me}"))
        if rec is None or rec.status != "succeeded" or not rec.private_result:
            raise ValidationError(f"model version {model!r} does not exist at this node", field="model")
        if rec.agreement_id != ctx.agreement.agreement_id:
            raise AgreementError(f"model {model} was trained under another agreement")
        return dict(rec.private_result)


def _arbiter_scores(ctx: StepContext, request_id: str) -> np.ndarray:
    from federated import messages as m

    deadline = time.monotonic() + WAIT_S
    with ctx.node.coordinator() as c:
        while True:
            if ctx.cancelled.is_set():
                raise ProtocolError("step cancelled")
            try:
                data = c.request("GET", f"/v1/arbiter/{ctx.job_id}/out/0", raw=True)
                break
            except NotFound:
                if time.monotonic() > deadline:
                    raise ProtocolError("no scores from the arbiter in time") from None
    msg = m.decode(data[1:]) if data[:1] == b"M" else None
    if not isinstance(msg, m.Scores) or msg.sender != ARBITER or msg.request_id != request_id:
        raise ProtocolError("the arbiter did not answer with this job's scores")
    return np.frombuffer(msg.data, dtype=">f8").astype(np.float64)


def _send_share(ctx: StepContext, me: str, partial: np.ndarray, seeds: list[str], role: str) -> None:
    from federated import messages as m
    from federated import roles as R

    # request id = job id: the pairwise masks are fresh for every scoring job
    share = R.score_share(job_id=ctx.job_id, sender=me, request_id=ctx.job_id, partial=partial,
                          mask_seeds=seeds, role=role)
    with ctx.node.coordinator() as c:
        c.request("PUT", f"/v1/arbiter/{ctx.job_id}/in/0", content=b"M" + m.encode(share),
                  content_type="application/octet-stream")


def _json_keys(data: bytes, who: str) -> list[str]:
    try:
        keys = json.loads(data)
    except ValueError:
        keys = None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ProtocolError(f"{who} sent a malformed list of join keys")
    return keys


def score_step(ctx: StepContext) -> dict[str, Any]:
    from federated import roles as R

    t0 = time.perf_counter()
    p = ctx.params
    me = ctx.node.identity.name
    guest, hosts = p["guest"], list(p["hosts"])
    if me != guest and me not in hosts:
        raise AgreementError(f"{me!r} has no role in this scoring job")
    rule = ctx.agreement.spec.rule(ctx.job_type or "score")
    part = _model_part(ctx, p["model"], me)
    # The leads' join keys: from the job's match job (fresh leads), else the model's.
    model, mj = part["model"], p.get("match_job") or part["match_job"]
    match_job = (mj[me] if me in mj else None) if isinstance(mj, dict) else mj  # this host's (several partners)
    features = list(model["features"])
    ch = RelayChannel(ctx.node, ctx.job_id, "score", ctx.cancelled)
    now = dt.datetime.now(dt.timezone.utc)
    if me != guest:
        # Host: contribute partials for the requested join keys it knows and may use.
        requested = _json_keys(ch.recv(guest, timeout=WAIT_S), guest)
        with session_scope(ctx.node.factory) as s:
            rows = s.execute(select(PsiMatch.join_key, PsiMatch.row_key)
                             .where(PsiMatch.job_id == match_job, PsiMatch.dataset == model["dataset"])).all()
        by_key = {str(k): str(r) for k, r in rows}
        known = [k for k in requested if k in by_key]
        decision = ctx.node.consent.allowed([by_key[k] for k in known], rule.purpose, guest, now)
        ok = set(decision.allowed)
        contributing = sorted(k for k in known if by_key[k] in ok)
        ch.send(guest, json.dumps(contributing).encode())
        final = _json_keys(ch.recv(guest, timeout=WAIT_S), guest)
        if not set(final) <= set(contributing) or len(set(final)) != len(final):
            raise ProtocolError("the guest asked for join keys this node did not offer")
        info_key, frame = _scoring_frame(ctx, model["dataset"], features)
        frame = frame.set_index(info_key).loc[[by_key[k] for k in final]] if final else frame.iloc[:0]
        partial = R.host_partial(model, _encoder(model).transform(frame.reset_index(), f"{me} scoring rows")) \
            if final else np.zeros(0)
        _send_share(ctx, me, partial, [model["mask_seeds"][0]], "host")
        ctx.node.consent.record_usage(ctx.job_id, rule.purpose, [by_key[k] for k in final],
                                      agreement_id=ctx.agreement.agreement_id, recipient=guest)
        ctx.node.audit.append("vfl.score", {"job_id": ctx.job_id, "agreement_id": ctx.agreement.agreement_id,
                                            "model_version": p["model"], "role": "host", "requested": len(requested),
                                            "contributed": len(final), "denied": decision.denied_counts})
        return {"role": "host", PRIVATE: {"role": "host", "model_version": p["model"], "requested": len(requested),
                                          "contributed": len(final), "seconds": round(time.perf_counter() - t0, 2)}}

    # Guest (brand): every row of the leads dataset is a lead.
    dataset = p["dataset"]
    agreed = set(ctx.me.columns.get(dataset, []))
    if not set(features) <= agreed:
        raise AgreementError(f"the model's features {sorted(set(features) - agreed)} are not agreed for {dataset!r}")
    key, frame = _scoring_frame(ctx, dataset, features)
    leads = frame[key].tolist()
    if len(set(leads)) != len(leads):
        raise ValidationError(f"dataset {dataset!r} has duplicate row ids")
    allowed: set[str] = set(leads)
    denied: dict[str, int] = {}
    for h in hosts:
        decision = ctx.node.consent.allowed(leads, rule.purpose, h, now)
        allowed &= set(decision.allowed)
        for reason, n in decision.denied_counts.items():
            denied[reason] = max(denied.get(reason, 0), n)
    # Each partner's join keys of the leads (one match job for all, or one per partner).
    per_host: dict[str, dict[str, str]] = {}
    for h in hosts:
        with session_scope(ctx.node.factory) as s:
            rows = s.execute(select(PsiMatch.row_key, PsiMatch.join_key)
                             .where(PsiMatch.job_id == (mj[h] if isinstance(mj, dict) else mj),
                                    PsiMatch.dataset == dataset)).all()
        per_host[h] = {str(r): str(k) for r, k in rows if str(r) in allowed}
    requested_rows = [r for r in leads if all(r in per_host[h] for h in hosts)]
    for h in hosts:
        ch.send(h, json.dumps(sorted(per_host[h][r] for r in requested_rows)).encode())
    ok_rows = set(requested_rows)
    for h in hosts:
        offered = set(_json_keys(ch.recv(h, timeout=WAIT_S), h))
        ok_rows &= {r for r in requested_rows if per_host[h][r] in offered}
    final_rows = sorted(ok_rows, key=lambda r: per_host[hosts[0]][r])
    for h in hosts:
        ch.send(h, json.dumps([per_host[h][r] for r in final_rows]).encode())
    X = _encoder(model).transform(frame, f"{dataset} leads")
    pos = {r: i for i, r in enumerate(leads)}
    idx = np.array([pos[r] for r in final_rows], dtype=np.int64)
    partial = R.guest_partial(model, X[idx]) if len(idx) else np.zeros(0)
    _send_share(ctx, me, partial, list(model["mask_seeds"]), "guest")
    joint = _arbiter_scores(ctx, ctx.job_id)
    if len(joint) != len(final_rows):
        raise ProtocolError(f"{len(joint)} scores for {len(final_rows)} leads")
    gonly = part["guest_only_model"]
    scores: dict[str, dict[str, Any]] = {r: {"score": float(v), "partner_missing": False}
                                         for r, v in zip(final_rows, joint)}
    rest = [r for r in leads if r in allowed and r not in scores]
    if rest:
        ridx = np.array([pos[r] for r in rest], dtype=np.int64)
        vals = 1.0 / (1.0 + np.exp(-R.guest_partial(gonly, X[ridx])))
        scores.update({r: {"score": float(v), "partner_missing": True} for r, v in zip(rest, vals)})
    out = [{"lead": r, **scores[r], "model_version": p["model"]} for r in leads if r in scores]
    for h in hosts:
        ctx.node.consent.record_usage(ctx.job_id, rule.purpose, [o["lead"] for o in out],
                                      agreement_id=ctx.agreement.agreement_id, recipient=h)
    not_scored = len(leads) - len(out)
    ctx.node.audit.append("vfl.score", {"job_id": ctx.job_id, "agreement_id": ctx.agreement.agreement_id,
                                        "model_version": p["model"], "role": "guest", "scored": len(out),
                                        "partner_missing": len(rest), "not_scored": not_scored, "denied": denied})
    private = {"role": "guest", "model_version": p["model"], "dataset": dataset, "leads": len(leads),
               "scored": len(out), "partner_missing": len(rest), "not_scored": not_scored, "denied": denied,
               "scores": out, "seconds": round(time.perf_counter() - t0, 2)}
    return {"role": "guest", "scored": len(out), PRIVATE: private}


def _scoring_frame(ctx: StepContext, dataset: str, features: list[str]) -> tuple[str, Any]:
    from party_node import datasets as ds

    with session_scope(ctx.node.factory) as s:
        info = ds.describe(s, dataset)
    key = next(c["column"] for c in info["columns"] if c["role"] == "key")
    frame = ds.load_frame(ctx.node.engine, dataset, list(dict.fromkeys([key, *features])))
    frame[key] = frame[key].astype(str)
    return key, frame


register("train", train_step)
register("score", score_step)
