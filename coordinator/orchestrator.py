"""Drives jobs through their state machine: pending -> running -> succeeded | failed | cancelled.

All state lives in the database, so a restarted coordinator picks up where it stopped:
- a step not yet dispatched is dispatched;
- a dispatched step is polled at its node; the node keeps its own step record, so a node
  restarted mid-step reports the step `interrupted` and it is dispatched again (attempt + 1,
  at most `max_attempts`);
- a node that stays unreachable longer than `step_deadline_s` fails the job with that reason.
Nothing is ever left silently half-done: every job ends in a terminal state with a reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from confide import agreements as ag
from confide.db import session_scope
from confide.errors import ConfideError, RemoteError
from confide.transport import ServiceClient
from coordinator import relay, service
from coordinator.jobtypes import job_type
from coordinator.storage.models import Job, JobStep, utcnow

log = logging.getLogger("confide.coordinator.jobs")
TERMINAL = ("succeeded", "failed", "cancelled")
NodeClientFactory = Callable[[str], ServiceClient]


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=dt.timezone.utc)
    return t


class Orchestrator:
    def __init__(
        self,
        factory: sessionmaker[Session],
        node_client: NodeClientFactory,
        *,
        step_deadline_s: float = 120.0,
        max_attempts: int = 3,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.factory = factory
        self.node_client = node_client
        self.step_deadline = dt.timedelta(seconds=step_deadline_s)
        self.max_attempts = max_attempts
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self.coordinator: Any = None  # set by the app: job types with on_start get it

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="orchestrator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep the loop alive; the job itself records its failure
                log.exception("orchestrator tick failed")
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    # -- one pass ------------------------------------------------------------------------
    def tick(self) -> None:
        with session_scope(self.factory) as s:
            ids = list(s.scalars(select(Job.id).where(Job.status.in_(("pending", "running"))).order_by(Job.created_at)))
        for job_id in ids:
            try:
                self.advance(job_id)
            except ConfideError as exc:  # e.g. a job type refusing to start: say why, plainly
                self._fail(job_id, exc.message)
            except Exception as exc:
                log.exception("job %s: unexpected error", job_id)
                self._fail(job_id, f"internal error: {type(exc).__name__}: {exc}")
        self._stop_cancelled_steps()

    def _stop_cancelled_steps(self) -> None:
        """Tell nodes to stop the steps of cancelled jobs (best effort, until the deadline)."""
        with session_scope(self.factory) as s:
            todo = [(st.id, st.job_id, st.name, st.party, _aware(st.dispatched_at))
                    for st in s.scalars(select(JobStep).where(JobStep.status == "cancelling"))]
        for step_id, job_id, name, party, since in todo:
            outcome = "cancelled"
            try:
                with self.node_client(party) as client:
                    client.delete(f"/v1/steps/{job_id}/{name}")
            except RemoteError as exc:
                if exc.details.get("status") is None:
                    now = dt.datetime.now(dt.timezone.utc)
                    if since is not None and now - since < self.step_deadline:
                        continue  # try again next tick
            except ConfideError:
                pass  # the node no longer has it: nothing to stop
            with session_scope(self.factory) as s:
                st = s.get(JobStep, step_id)
                if st is not None and st.status == "cancelling":
                    st.status = outcome
                    st.finished_at = utcnow()
                    service.record(s, "step.cancelled", "coordinator", job_id=job_id, step=name, party=party)

    def advance(self, job_id: str) -> None:
        with session_scope(self.factory) as s:
            job = s.get(Job, job_id)
            if job is None or job.status in TERMINAL:
                return
            av = service.get_version(s, job.agreement_id, job.version)
            signed = service.to_signed(av)
            started = None
            if job.status == "pending":
                jt = job_type(job.type)
                for i, plan in enumerate(jt.plan(signed.spec, job.params)):
                    s.add(JobStep(job_id=job.id, seq=i, stage=plan.stage, name=plan.name, party=plan.party,
                                  status="pending", result=None))
                job.status = "running"
                job.started_at = utcnow()
                service.record(s, "job.started", "coordinator", job_id=job.id)
                started = (jt, job.id, signed.spec, dict(job.params))
                s.flush()
                s.refresh(job)
            steps = [(st.id, st.stage, st.name, st.party, st.status, st.attempt,
                      _aware(st.last_contact_at) or _aware(st.dispatched_at) or _aware(job.started_at))
                     for st in job.steps]
            job_info = {"job_id": job.id, "job_type": job.type, "requester": job.requester,
                        "params": job.params, "agreement": signed.model_dump(mode="json"),
                        "mandate": job.mandate}
        if started is not None and hasattr(started[0], "on_start") and self.coordinator is not None:
            started[0].on_start(self.coordinator, started[1], started[2], started[3])
        open_stages = sorted({stage for _, stage, _, _, status, _, _ in steps if status != "succeeded"})
        if not open_stages:
            self._finish(job_id)
            return
        stage = open_stages[0]
        for step_id, st_stage, name, party, status, attempt, last in steps:
            if st_stage != stage or status == "succeeded":
                continue
            if status == "failed":
                return  # _fail already ran
            if party is None:
                continue  # coordinator-side steps are computed in _finish
            if status == "pending":
                self._dispatch(job_id, step_id, name, party, attempt, last, job_info)
            elif status == "dispatched":
                self._poll(job_id, step_id, name, party, attempt, last, job_info)

    # -- step handling ---------------------------------------------------------------------
    def _dispatch(self, job_id: str, step_id: int, name: str, party: str, attempt: int,
                  last: dt.datetime | None, job_info: dict[str, Any]) -> None:
        if attempt >= self.max_attempts:
            self._fail(job_id, f"step {name} at {party} failed {attempt} times; giving up")
            return
        body = dict(job_info, step=name, attempt=attempt + 1)
        try:
            with self.node_client(party) as client:
                reply = client.post("/v1/steps", body)
        except RemoteError as exc:
            if exc.details.get("status") is None:  # unreachable: wait, up to the deadline
                self._unreachable(job_id, step_id, name, party, last, exc)
                return
            self._fail(job_id, f"step {name}: {party} answered: {exc.message}")
            return
        except ConfideError as exc:  # the node refused (agreement, validation, ...)
            self._fail(job_id, f"step {name} refused by {party}: {exc.message}")
            return
        with session_scope(self.factory) as s:
            st = s.get(JobStep, step_id)
            assert st is not None
            st.status = "dispatched"
            st.attempt = attempt + 1
            st.dispatched_at = st.last_contact_at = utcnow()
            service.record(s, "step.dispatched", "coordinator", job_id=job_id, step=name, party=party, attempt=st.attempt)
        self._apply(job_id, step_id, name, party, reply)

    def _poll(self, job_id: str, step_id: int, name: str, party: str, attempt: int,
              last: dt.datetime | None, job_info: dict[str, Any]) -> None:
        try:
            with self.node_client(party) as client:
                reply = client.get(f"/v1/steps/{job_id}/{name}")
        except RemoteError as exc:
            if exc.details.get("status") is None:
                self._unreachable(job_id, step_id, name, party, last, exc)
                return
            self._fail(job_id, f"step {name}: {party} answered: {exc.message}")
            return
        except ConfideError as exc:
            if exc.status_code == 404:  # the node lost the step (e.g. its database was reset): run it again
                reply = {"status": "interrupted"}
            else:
                self._fail(job_id, f"step {name} at {party}: {exc.message}")
                return
        self._apply(job_id, step_id, name, party, reply)

    def _apply(self, job_id: str, step_id: int, name: str, party: str, reply: dict[str, Any]) -> None:
        status = reply.get("status")
        with session_scope(self.factory) as s:
            st = s.get(JobStep, step_id)
            job = s.get(Job, job_id)
            assert st is not None and job is not None
            if job.status in TERMINAL:
                return
            st.last_contact_at = utcnow()
            if status == "succeeded":
                st.status = "succeeded"
                st.result = reply.get("result") or {}
                st.finished_at = utcnow()
                service.record(s, "step.succeeded", party, job_id=job_id, step=name)
            elif status == "failed":
                st.status = "failed"
                st.error = str(reply.get("error") or "failed")
                st.finished_at = utcnow()
                job.status = "failed"
                job.error = f"step {name} at {party} failed: {st.error}"
                job.finished_at = utcnow()
                service.record(s, "job.failed", "coordinator", job_id=job_id, reason=job.error)
            elif status in ("interrupted", "cancelled"):
                # The node restarted (or dropped the step) mid-way: run it again.
                st.status = "pending"
                service.record(s, "step.interrupted", party, job_id=job_id, step=name, attempt=st.attempt)
            # "running": nothing to do but remember we heard from the node.

    def _unreachable(self, job_id: str, step_id: int, name: str, party: str,
                     last: dt.datetime | None, exc: RemoteError) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        if last is not None and now - last > self.step_deadline:
            self._fail(job_id, f"step {name}: node {party} unreachable for more than "
                               f"{self.step_deadline.total_seconds():.0f}s ({exc.message})")
        else:
            log.info("job %s step %s: %s unreachable, will retry", job_id, name, party)

    def _finish(self, job_id: str) -> None:
        with session_scope(self.factory) as s:
            job = s.get(Job, job_id)
            assert job is not None
            if job.status in TERMINAL:
                return
            spec = ag.AgreementSpec.model_validate(service.get_version(s, job.agreement_id, job.version).spec)
            results = {st.name: st.result or {} for st in job.steps}
            try:
                job.result = job_type(job.type).finalize(spec, job.params, results)
                job.status = "succeeded"
            except ConfideError as exc:
                job.status = "failed"
                job.error = f"finalising failed: {exc.message}"
            job.finished_at = utcnow()
            relay.purge(s, job_id)
            service.record(s, f"job.{job.status}", "coordinator", job_id=job_id)

    def _fail(self, job_id: str, reason: str) -> None:
        with session_scope(self.factory) as s:
            job = s.get(Job, job_id)
            if job is None or job.status in TERMINAL:
                return
            job.status = "failed"
            job.error = reason
            job.finished_at = utcnow()
            for st in job.steps:
                if st.status in ("pending", "dispatched"):
                    st.status = "cancelled" if st.status == "pending" else "failed"
                    st.error = st.error or reason
            relay.purge(s, job_id)
            service.record(s, "job.failed", "coordinator", job_id=job_id, reason=reason)
        log.warning("job %s failed: %s", job_id, reason)
