"""The vertical-training arbiter at the coordinator, and its authenticated mailbox.

The arbiter holds the job's Paillier private key; it lives only in this process's memory. The
parties of a `train` job talk to it through two endpoints (party <-> party messages go over the
end-to-end encrypted relay instead, which this module never touches):

    PUT /v1/arbiter/{job_id}/in/{seq}    party -> arbiter; body = one message; the sender is the
                                          authenticated peer; seq 0, 1, 2, ... per sender
    GET /v1/arbiter/{job_id}/out/{seq}   arbiter -> the calling party, its seq-th message
                                          (404 until it exists; waits up to `LONG_POLL_S` first)

Wire format of a mailbox body: one byte `C` + JSON (control) or `M` + `federated.messages.encode`.
A party's first message is the control `{"rows": <matched training rows after both consent
gates>}`; when every party has sent the same count the arbiter makes its key (`ArbiterRole`)
and the protocol runs as in docs/vfl.md §4. After training, each party sends its masked
`ScoreShare` of the held-out rows (request `heldout`); the arbiter returns the scores to the
guest only and the session ends.

A `score` job's session (mode `score`) holds no key: each party sends one masked `ScoreShare`
(request id = the job id, so the pairwise masks are fresh per job); the arbiter adds them, the
masks cancel, and it returns the 0-1 scores to the guest only.

What the arbiter sees: row counts, masked aggregates it decrypts, the per-epoch loss and the
held-out scores (docs/vfl.md §2). Messages are kept in memory per job, never in the database.
After a coordinator restart mid-training the first mailbox call rebuilds the session from the
sealed snapshot of the last completed epoch and the parties rejoin as below; before the first
epoch there is none: the parties' next mailbox call gets 409 and their steps fail, so the
orchestrator fails the job with that reason (rerun the job).

Resume after a node restart (docs/vfl.md §4b). After every `EpochDone` the arbiter keeps its
snapshot (it holds the private key: sealed with AES-GCM under a key derived from the
coordinator's identity key, in `arbiter_snapshots`) and each party keeps its own. A restarted
node's step calls

    POST /v1/arbiter/{job_id}/resume   {"epochs": [completed epochs it can restore], "gen": null}

which opens a new *generation*: the mailbox of the old one is dropped, the other parties'
next mailbox call answers `C{"resume": gen}` (GET) or 409 (PUT), and they call `resume` too
(`"gen": gen`). When every party has offered, the arbiter picks the latest epoch that every
party and the arbiter can restore (0 = start over with a fresh key), restores itself, and
answers `{"gen", "epoch"}`; the parties restore the same epoch and continue over relay
channel `vfl.g<gen>` and the mailbox of that generation (`?gen=<gen>`, sequence numbers from 0).
Snapshots are deleted when the session ends, however it ends.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import APIRouter, Depends, Request, Response

from confide.auth import Peer
from confide.db import session_scope
from confide.errors import Conflict, NotFound, PermissionDenied, ProtocolError, ValidationError

log = logging.getLogger("confide.coordinator.arbiter")
ARBITER = "coordinator"  # the arbiter's party name in the protocol (docs/vfl.md §4)
EVAL_REQUEST = "heldout"
LONG_POLL_S = 5.0
IDLE_S = 1800.0  # no message for this long: the session fails
KEEP_S = 600.0  # a finished session's outbox stays this long for the parties to fetch
MAX_AHEAD = 10_000  # out-of-order window per sender
MAX_BODY = 64 * 1024 * 1024


@dataclass
class Session:
    job_id: str
    guest: str
    hosts: list[str]
    config: dict[str, Any]
    mode: str = "train"
    cond: threading.Condition = field(default_factory=threading.Condition)
    inbox: dict[tuple[str, int], bytes] = field(default_factory=dict)
    next_in: dict[str, int] = field(default_factory=dict)
    outbox: dict[str, list[bytes]] = field(default_factory=dict)
    error: str | None = None
    done: bool = False
    last_activity: float = field(default_factory=time.monotonic)
    stats: dict[str, Any] = field(default_factory=dict)
    # resume (see the module docstring): the mailbox generation, the parties' offers for the
    # open round, the epoch decided for the current generation (None while a round is open)
    gen: int = 0
    offers: dict[str, list[int]] = field(default_factory=dict)
    decided: int | None = 0
    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)
    rows: int = 0
    agreement_id: str | None = None  # a training job uses its agreement's arbiter key (arbiter_keys)
    recovering: bool = False  # rebuilt after a coordinator restart: the parties must rejoin first

    @property
    def parties(self) -> list[str]:
        return [self.guest, *self.hosts]


_SESSIONS: dict[str, Session] = {}
_LOCK = threading.Lock()


class _Resumed(Exception):
    """The session moved to a new generation: the arbiter restores the agreed epoch."""


def _open_round(sess: Session, by: str) -> None:
    """A new generation (call holding `sess.cond`): the old mailbox is dropped."""
    log.warning("arbiter for job %s: %s asks to resume; generation %d opens", sess.job_id, by, sess.gen + 1)
    sess.gen += 1
    sess.offers, sess.decided = {}, None
    sess.inbox = {}
    sess.next_in = {p: 0 for p in sess.parties}
    sess.outbox = {p: [] for p in sess.parties}
    sess.cond.notify_all()


# -- snapshots of the arbiter (private key inside): sealed at rest ---------------------------

def _snapshot_key(coord: Any) -> bytes:
    from coordinator.arbiter_keys import derived_key

    return derived_key(coord, b"confide/arbiter-snapshot/v1")


def seal_snapshot(coord: Any, job_id: str, epoch: int, snap: dict[str, Any]) -> bytes:
    """AES-256-GCM under a key derived (HKDF) from the coordinator's identity key; the job id
    and epoch are bound as associated data."""
    import os as _os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = _os.urandom(12)
    aad = f"{job_id}:{epoch}".encode()
    return nonce + AESGCM(_snapshot_key(coord)).encrypt(nonce, json.dumps(snap).encode(), aad)


def open_snapshot(coord: Any, job_id: str, epoch: int, sealed: bytes) -> dict[str, Any]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        data = AESGCM(_snapshot_key(coord)).decrypt(sealed[:12], sealed[12:], f"{job_id}:{epoch}".encode())
    except InvalidTag:
        raise ProtocolError(f"the arbiter snapshot of job {job_id} epoch {epoch} does not open with this "
                            "coordinator's key (altered, or another identity)") from None
    return dict(json.loads(data))


def _persist(coord: Any, sess: Session, epoch: int, snap: dict[str, Any]) -> None:
    """Keep the snapshot of `epoch` (and the one before it: a party may be one epoch behind)."""
    from sqlalchemy import delete

    from coordinator.storage.models import ArbiterSnapshot

    sess.snapshots[epoch] = snap
    for e in [e for e in sess.snapshots if e < epoch - 1]:
        del sess.snapshots[e]
    with session_scope(coord.factory) as s:
        s.execute(delete(ArbiterSnapshot).where(ArbiterSnapshot.job_id == sess.job_id,
                                                (ArbiterSnapshot.epoch < epoch - 1) | (ArbiterSnapshot.epoch == epoch)))
        s.add(ArbiterSnapshot(job_id=sess.job_id, epoch=epoch, rows=sess.rows,
                              sealed=seal_snapshot(coord, sess.job_id, epoch, snap)))


def delete_snapshots(coord: Any, job_id: str) -> None:
    from sqlalchemy import delete

    from coordinator.storage.models import ArbiterSnapshot

    try:
        with session_scope(coord.factory) as s:
            s.execute(delete(ArbiterSnapshot).where(ArbiterSnapshot.job_id == job_id))
    except Exception as exc:  # noqa: BLE001 - swept again when the next session starts
        log.warning("could not delete the arbiter snapshots of job %s: %s", job_id, exc)


def _sweep_snapshots(coord: Any) -> None:
    """Snapshots of jobs that ended while no session ran (e.g. across a coordinator restart)."""
    from sqlalchemy import delete, select

    from coordinator.storage.models import ArbiterSnapshot, Job

    try:
        with session_scope(coord.factory) as s:
            ended = select(Job.id).where(Job.status.in_(("succeeded", "failed", "cancelled")))
            s.execute(delete(ArbiterSnapshot).where(ArbiterSnapshot.job_id.in_(ended)))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not sweep arbiter snapshots: %s", exc)


def check_match_job(coord: Any, job_id: str, match_job: str) -> None:
    """The match job must have succeeded under the same agreement as the training job."""
    from coordinator.storage.models import Job

    with session_scope(coord.factory) as s:
        job, match = s.get(Job, job_id), s.get(Job, match_job)
        if match is None or match.type != "match":
            raise ValidationError(f"match_job {match_job!r} is not a match job")
        if job is None or match.agreement_id != job.agreement_id:
            raise ValidationError(f"match job {match_job} ran under another agreement")
        if match.status != "succeeded":
            raise ValidationError(f"match job {match_job} is {match.status}, not succeeded")


def check_model(coord: Any, job_id: str, model: str, hosts: list[str]) -> None:
    """The model version (a train job) must exist, have succeeded under the same agreement, and
    have been trained with the same partners."""
    from coordinator.storage.models import Job

    with session_scope(coord.factory) as s:
        job, train = s.get(Job, job_id), s.get(Job, model)
        if train is None or train.type != "train" or job is None or train.agreement_id != job.agreement_id:
            raise ValidationError(f"model version {model!r} does not exist under this agreement")
        if train.status != "succeeded":
            raise ValidationError(f"model version {model} is {train.status}, not a trained model")
        if sorted(train.params.get("hosts", [])) != sorted(hosts):
            raise ValidationError(f"model {model} was trained with {sorted(train.params.get('hosts', []))}; "
                                  f"this agreement's partners are {sorted(hosts)}")


def start_session(coord: Any, job_id: str, params: dict[str, Any]) -> Session:
    sess = Session(job_id=job_id, guest=params["guest"], hosts=list(params["hosts"]), config=dict(params["train"]),
                   mode=str(params.get("mode", "train")), agreement_id=params.get("agreement_id"))
    sess.next_in = {p: 0 for p in sess.parties}
    sess.outbox = {p: [] for p in sess.parties}
    _sweep_snapshots(coord)
    try:
        from coordinator import arbiter_keys

        arbiter_keys.sweep(coord)
    except Exception as exc:  # noqa: BLE001 - swept again when the next session starts
        log.warning("could not sweep old arbiter keys: %s", exc)
    with _LOCK:
        _SESSIONS[job_id] = sess
    threading.Thread(target=_run, args=(coord, sess), name=f"arbiter-{job_id[:8]}", daemon=True).start()
    return sess


def session(job_id: str) -> Session | None:
    with _LOCK:
        return _SESSIONS.get(job_id)


def _job_over(coord: Any, job_id: str) -> str | None:
    from coordinator.storage.models import Job

    try:
        with session_scope(coord.factory) as s:
            job = s.get(Job, job_id)
            if job is None:
                return "deleted"
            return job.status if job.status in ("succeeded", "failed", "cancelled") else None
    except Exception:  # noqa: BLE001 - the database hiccuped: look again later
        return None


def _wait_job(coord: Any, sess: Session, last_check: float) -> float:
    """Every few seconds (call holding `sess.cond`): fail if idle too long or the job ended."""
    if time.monotonic() - sess.last_activity > IDLE_S:
        raise ProtocolError(f"no message from the parties for {IDLE_S:.0f}s")
    if time.monotonic() - last_check > 5.0:
        sess.cond.release()
        try:
            over = _job_over(coord, sess.job_id)
        finally:
            sess.cond.acquire()
        if over:
            raise ProtocolError(f"job is {over}")
        return time.monotonic()
    return last_check


def _next_message(coord: Any, sess: Session, gen: int = 0) -> tuple[str, bytes]:
    """The next in-order message of any sender (oldest sender first), waiting for one.
    Raises _Resumed when the session moved past generation `gen`."""
    last_check = time.monotonic()
    with sess.cond:
        while True:
            if sess.gen != gen:
                raise _Resumed()
            for p in sess.parties:
                data = sess.inbox.pop((p, sess.next_in[p]), None)
                if data is not None:
                    sess.next_in[p] += 1
                    return p, data
            last_check = _wait_job(coord, sess, last_check)
            sess.cond.wait(1.0)


def _post(sess: Session, out: list[tuple[str, Any]], gen: int = 0) -> None:
    from federated import messages as m

    with sess.cond:
        if sess.gen != gen:
            raise _Resumed()  # computed for a generation that is gone: dropped
        for to, msg in out:
            if to not in sess.outbox:
                raise ProtocolError(f"the arbiter tried to send to {to!r}, not a party of the job")
            sess.outbox[to].append(b"M" + m.encode(msg))
        sess.cond.notify_all()


def _await_round(coord: Any, sess: Session) -> int:
    """Wait until every party has offered the epochs it can restore; decide the latest epoch
    everyone (the arbiter too) can restore, 0 meaning a fresh start."""
    last_check = time.monotonic()
    with sess.cond:
        while sess.decided is None and set(sess.offers) != set(sess.parties):
            last_check = _wait_job(coord, sess, last_check)
            sess.cond.wait(1.0)
        if sess.decided is None:
            common = {0} | set(sess.snapshots)
            for epochs in sess.offers.values():
                common &= {0} | set(epochs)
            sess.decided = max(common)
            sess.stats["resumes"] = sess.stats.get("resumes", 0) + 1
            sess.stats["resumed_from_epoch"] = sess.decided
            log.warning("arbiter for job %s: generation %d resumes from epoch %d (offers %s)", sess.job_id, sess.gen,
                        sess.decided, sess.offers)
            sess.cond.notify_all()
        return sess.decided


def _run(coord: Any, sess: Session) -> None:
    from federated import messages as m
    from federated import roles as R

    rows: dict[str, int] = {}
    role: R.ArbiterRole | None = None
    gen = 0
    try:
        if sess.mode == "score":
            _score(coord, sess)
            return
        cfg = R.TrainConfig(**sess.config)
        rejoin = sess.recovering
        while True:
            try:
                if rejoin:
                    rejoin = False
                    raise _Resumed()
                sender, data = _next_message(coord, sess, gen)
                if data[:1] == b"C":
                    if role is not None or sender in rows:
                        raise ProtocolError(f"unexpected control message from {sender}")
                    try:
                        ctl = json.loads(data[1:])
                        n = int(ctl["rows"])
                    except Exception:  # noqa: BLE001
                        raise ProtocolError(f"bad control message from {sender}") from None
                    rows[sender] = n
                    if set(rows) == set(sess.parties):
                        if len(set(rows.values())) != 1:
                            raise ValidationError("the parties hold different numbers of training rows; "
                                                  "their consent-gated rows are not aligned")
                        role = R.ArbiterRole(ARBITER, sess.job_id, cfg, guest=sess.guest, hosts=sess.hosts,
                                             rows=n, keypair=_keypair(coord, sess, cfg))
                        sess.rows = n
                        sess.stats["train_rows"] = n
                        _post(sess, role.start(), gen)
                    continue
                if data[:1] != b"M" or role is None:
                    raise ProtocolError(f"{sender} sent a protocol message before the row counts")
                msg = m.decode(data[1:])
                if msg.sender != sender:
                    raise ProtocolError(f"{sender} sent a message signed as {msg.sender!r}")
                if isinstance(msg, m.ScoreShare) and (not role.finished or msg.request_id != EVAL_REQUEST):
                    raise ProtocolError("score shares are taken only for the held-out rows, after training")
                out = role.handle(msg)
                if any(isinstance(x, m.EpochDone) for _, x in out):
                    # Before anyone hears of the epoch: a party that has it, the arbiter has too.
                    _persist(coord, sess, len(role.losses), role.snapshot())
                _post(sess, out, gen)
                if any(isinstance(x, m.Scores) for _, x in out):
                    sess.stats.update(epochs=len(role.losses), decrypted_values=role.decrypted_values)
                    break
            except _Resumed:
                role, rows = None, {}
                epoch = _await_round(coord, sess)
                with sess.cond:
                    gen = sess.gen
                    sess.recovering = False
                if epoch > 0:
                    role = R.ArbiterRole(ARBITER, sess.job_id, cfg, guest=sess.guest, hosts=sess.hosts,
                                         rows=sess.rows)
                    role.restore(sess.snapshots[epoch])
        _finish(sess)
    except Exception as exc:  # noqa: BLE001 - reported to the parties, who fail their steps
        msg = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        log.warning("arbiter for job %s failed: %s", sess.job_id, msg)
        with sess.cond:
            sess.error = msg
            sess.cond.notify_all()
    finally:
        role = None  # drop the private key
        sess.snapshots = {}
        if sess.mode != "score":
            delete_snapshots(coord, sess.job_id)
        timer = threading.Timer(KEEP_S, _forget, args=(sess.job_id,))
        timer.daemon = True
        timer.start()


def _keypair(coord: Any, sess: Session, cfg: Any) -> Any:
    """The agreement's current arbiter key (the parties may have precomputed obfuscators for
    it); a job without an agreement id (none in practice) gets a fresh key from the role."""
    if sess.agreement_id is None:
        return None
    from coordinator import arbiter_keys

    key_id, pair = arbiter_keys.for_job(coord, sess.agreement_id, int(cfg.key_bits))
    sess.stats["arbiter_key"] = key_id
    return pair


def _finish(sess: Session) -> None:
    with sess.cond:
        sess.done = True
        sess.cond.notify_all()
    log.info("arbiter for job %s finished: %s", sess.job_id, sess.stats)


def _score(coord: Any, sess: Session) -> None:
    """A score job: one ScoreShare per party for request `job_id`; the sum (masks cancel) -> 0-1
    scores to the guest only. No key is needed: the shares are additively masked."""
    from federated import messages as m
    from federated import roles as R

    shares: dict[str, m.ScoreShare] = {}
    while set(shares) != set(sess.parties):
        sender, data = _next_message(coord, sess)
        msg = m.decode(data[1:]) if data[:1] == b"M" else None
        if not isinstance(msg, m.ScoreShare) or msg.sender != sender or msg.job_id != sess.job_id \
                or msg.request_id != sess.job_id or sender in shares:
            raise ProtocolError(f"{sender} sent something other than one score share for job {sess.job_id}")
        shares[sender] = msg
    scores = R.combine_score_shares(list(shares.values()))
    _post(sess, [(sess.guest, m.Scores(job_id=sess.job_id, sender=ARBITER, request_id=sess.job_id,
                                       rows=len(scores), data=scores.astype(">f8").tobytes()))])
    sess.stats["scored_jointly"] = len(scores)
    _finish(sess)


def _forget(job_id: str) -> None:
    with _LOCK:
        _SESSIONS.pop(job_id, None)


def _recover(coord: Any, job_id: str) -> Session | None:
    """After a coordinator restart: rebuild a running training job's arbiter from its sealed
    snapshots (None if there are none, or they do not open). The parties learn it from their next
    mailbox call and rejoin in a new generation, as after a node restart."""
    from sqlalchemy import select

    from coordinator.storage.models import ArbiterSnapshot, Job

    with session_scope(coord.factory) as s:
        job = s.get(Job, job_id)
        if job is None or job.type != "train" or job.status != "running":
            return None
        found = [(r.epoch, r.rows, bytes(r.sealed)) for r in s.scalars(
            select(ArbiterSnapshot).where(ArbiterSnapshot.job_id == job_id).order_by(ArbiterSnapshot.epoch))]
        params = dict(job.params)
    if not found:
        return None
    try:
        snaps = {e: open_snapshot(coord, job_id, e, sealed) for e, _, sealed in found}
    except ProtocolError as exc:
        log.warning("job %s: cannot resume the arbiter: %s", job_id, exc.message)
        return None
    sess = Session(job_id=job_id, guest=params["guest"], hosts=list(params["hosts"]), config=dict(params["train"]))
    sess.next_in = {p: 0 for p in sess.parties}
    sess.outbox = {p: [] for p in sess.parties}
    sess.snapshots, sess.rows, sess.recovering = snaps, found[-1][1], True
    sess.gen, sess.decided = 1, None  # a round is open; its number floats above the parties' (below)
    with _LOCK:
        if job_id in _SESSIONS:
            return _SESSIONS[job_id]
        _SESSIONS[job_id] = sess
    log.warning("arbiter for job %s rebuilt from its snapshot of epoch %d after a restart", job_id, max(snaps))
    threading.Thread(target=_run, args=(coord, sess), name=f"arbiter-{job_id[:8]}", daemon=True).start()
    return sess


def _float_gen(sess: Session, gen: int | None) -> None:
    """A rebuilt session does not know the parties' generation: keep its open round above it
    (call holding `sess.cond`)."""
    if sess.recovering and sess.decided is None and gen is not None and gen >= sess.gen:
        sess.gen = gen + 1
        sess.cond.notify_all()


def _session_for(coord: Any, job_id: str, peer: str) -> Session:
    from coordinator import service

    with session_scope(coord.factory) as s:
        service.get_job(s, job_id, peer)  # NotFound unless the peer is a party of the job's agreement
    sess = session(job_id) or _recover(coord, job_id)
    if sess is None:
        raise Conflict(f"no arbiter is running for job {job_id} (finished, or the coordinator restarted "
                       "before the first epoch completed: rerun the job)")
    if peer not in sess.parties:
        raise PermissionDenied(f"{peer!r} is not a party of training job {job_id}")
    return sess


RESUMED = "the training resumed"  # in the 409 a party gets for a superseded generation


def arbiter_router(coord: Any, party_dep: Callable[..., Any]) -> APIRouter:
    from coordinator.registry import registry_router

    router = APIRouter()
    # The model registry of vertical training rides on this optional router (coordinator/app.py
    # mounts it when the training capability is present).
    router.include_router(registry_router(coord, party_dep))

    @router.put("/v1/arbiter/{job_id}/in/{seq}")
    async def put_in(job_id: str, seq: int, request: Request, gen: int = 0,
                     peer: Peer = Depends(party_dep)) -> dict[str, int]:
        body = await request.body()
        if not body or len(body) > MAX_BODY:
            raise ValidationError("arbiter mailbox: empty or oversized message")
        sess = _session_for(coord, job_id, peer.name)
        with sess.cond:
            if sess.error:
                raise Conflict(f"the arbiter failed: {sess.error}")
            if sess.done:
                raise Conflict(f"the arbiter of job {job_id} has finished")
            _float_gen(sess, gen)
            if gen < sess.gen:
                raise Conflict(f"{RESUMED} (generation {sess.gen}); message of generation {gen} dropped")
            if gen > sess.gen or sess.decided is None:
                raise ValidationError(f"arbiter mailbox: generation {gen} is not open")
            nxt = sess.next_in[peer.name]
            if seq < nxt or (peer.name, seq) in sess.inbox:
                raise Conflict(f"arbiter message #{seq} from {peer.name} already sent (replay?)")
            if seq >= nxt + MAX_AHEAD:
                raise ValidationError("arbiter mailbox: sequence number too far ahead")
            sess.inbox[(peer.name, seq)] = body
            sess.last_activity = time.monotonic()
            sess.cond.notify_all()
        return {"bytes": len(body)}

    @router.get("/v1/arbiter/{job_id}/out/{seq}")
    def get_out(job_id: str, seq: int, gen: int = 0, peer: Peer = Depends(party_dep)) -> Response:
        sess = _session_for(coord, job_id, peer.name)
        deadline = time.monotonic() + LONG_POLL_S
        with sess.cond:
            _float_gen(sess, gen)
            while True:
                if gen < sess.gen:  # the caller's generation is over: tell it to resume
                    return Response(content=b"C" + json.dumps({"resume": sess.gen}).encode(),
                                    media_type="application/octet-stream")
                box = sess.outbox[peer.name]
                if gen == sess.gen and 0 <= seq < len(box):
                    return Response(content=box[seq], media_type="application/octet-stream")
                if sess.error:
                    raise Conflict(f"the arbiter failed: {sess.error}")
                left = deadline - time.monotonic()
                if sess.done or left <= 0:
                    raise NotFound(f"arbiter: no message #{seq} for {peer.name} yet")
                sess.cond.wait(left)

    @router.post("/v1/arbiter/{job_id}/resume")
    def resume(job_id: str, body: dict[str, Any], peer: Peer = Depends(party_dep)) -> dict[str, Any]:
        """A party offers the completed epochs it can restore (see the module docstring).
        Answers {"gen", "epoch"} once every party has offered, else {"gen", "pending": true}
        after a few seconds (call again with that gen)."""
        epochs, join = body.get("epochs"), body.get("gen")
        if not isinstance(epochs, list) or not all(isinstance(e, int) and e >= 0 for e in epochs) \
                or len(epochs) > 16:
            raise ValidationError("epochs must be a short list of completed epoch numbers", field="epochs")
        if join is not None and not isinstance(join, int):
            raise ValidationError("gen must be an integer or null", field="gen")
        sess = _session_for(coord, job_id, peer.name)
        if sess.mode != "train":
            raise Conflict(f"job {job_id} is not a training job; nothing to resume")
        deadline = time.monotonic() + LONG_POLL_S
        with sess.cond:
            if sess.error:
                raise Conflict(f"the arbiter failed: {sess.error}")
            if sess.done:
                raise Conflict(f"the arbiter of job {job_id} has finished")
            if sess.recovering and sess.decided is None and join is not None and join > sess.gen:
                sess.gen = join  # a party that had joined before the restart
            if join is not None and join > sess.gen:
                raise ValidationError(f"generation {join} was never opened", field="gen")
            if not (join == sess.gen and sess.decided is not None):
                if sess.decided is not None:  # a restarted party (or news of one): a new round
                    _open_round(sess, peer.name)
                sess.offers[peer.name] = sorted(set(epochs))
                sess.last_activity = time.monotonic()
                sess.cond.notify_all()
            gen = sess.gen
            while sess.decided is None and sess.gen == gen and not sess.error:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sess.cond.wait(left)
            if sess.error:
                raise Conflict(f"the arbiter failed: {sess.error}")
            if sess.gen == gen and sess.decided is not None:
                return {"gen": gen, "epoch": sess.decided}
            return {"gen": sess.gen, "pending": True}

    return router
