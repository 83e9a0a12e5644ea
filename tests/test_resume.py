"""Jobs survive process deaths: a killed node or coordinator resumes the job, or it fails cleanly."""

from __future__ import annotations

import json
import time
from typing import Iterator

import pytest

from confide.localnet import LocalNet
from tests.test_integration import confide, setup_walk, wait_job

pytestmark = pytest.mark.slow
DELAY = "2.5"


@pytest.fixture
def net(tmp_path) -> Iterator[LocalNet]:  # type: ignore[no-untyped-def]
    with LocalNet(tmp_path, [("brand", "brand"), ("partner", "partner")],
                  coordinator_settings={"poll_interval_s": 0.1, "step_deadline_s": 6.0}) as n:
        n.start("coordinator")
        n.start("brand")
        n.start("partner", extra_env={"CONFIDE_NODE_TEST_STEP_DELAY_S": DELAY})
        setup_walk(n, tmp_path)
        yield n


def start_job(net: LocalNet) -> str:
    with net.client("brand") as c:
        return c.post("/v1/admin/jobs", {"type": "dataset-stats", "agreement_id": "coffee-2026"})["id"]


def wait_dispatched(net: LocalNet, job_id: str, party: str) -> None:
    deadline = time.monotonic() + 20
    with net.client("brand") as c:
        while time.monotonic() < deadline:
            job = c.get(f"/v1/admin/jobs/{job_id}")
            if any(s["party"] == party and s["status"] == "dispatched" for s in job["steps"]):
                return
            time.sleep(0.05)
    raise AssertionError(f"step at {party} never dispatched")


def test_node_killed_mid_step_resumes(net: LocalNet) -> None:
    job_id = start_job(net)
    wait_dispatched(net, job_id, "partner")
    net.kill("partner")  # SIGKILL while its step sleeps
    with net.client("brand") as c:
        assert c.get(f"/v1/admin/jobs/{job_id}")["status"] == "running"
    net.start("partner")  # back, without the delay
    job = wait_job(net, "brand", job_id)
    assert job["status"] == "succeeded", job
    partner_step = next(s for s in job["steps"] if s["party"] == "partner")
    assert partner_step["attempt"] == 2
    assert job["result"]["parties"]["partner"]["datasets"][0]["rows"] == 25
    with net.client("partner") as c:
        steps = c.get("/v1/admin/steps")
    assert [(s["job_id"], s["status"], s["attempt"]) for s in steps] == [(job_id, "succeeded", 2)]


def test_coordinator_killed_mid_job_resumes(net: LocalNet) -> None:
    job_id = start_job(net)
    wait_dispatched(net, job_id, "partner")
    net.kill("coordinator")
    time.sleep(float(DELAY) + 0.5)  # the partner finishes its step while the coordinator is down
    net.start("coordinator")
    job = wait_job(net, "brand", job_id)
    assert job["status"] == "succeeded", job
    assert all(s["attempt"] == 1 for s in job["steps"])  # nothing ran twice


def test_node_gone_for_good_fails_the_job_cleanly(net: LocalNet) -> None:
    job_id = start_job(net)
    wait_dispatched(net, job_id, "partner")
    net.kill("partner")
    job = wait_job(net, "brand", job_id, timeout=40)
    assert job["status"] == "failed"
    assert "partner unreachable" in job["error"]
    assert job["finished_at"] is not None
    partner_step = next(s for s in job["steps"] if s["party"] == "partner")
    assert partner_step["status"] == "failed"
    # the brand's own step either finished or was stopped: nothing is left "running"
    assert all(s["status"] in ("succeeded", "failed", "cancelled") for s in job["steps"])
    out = json.loads(confide("node", "job", "status", job_id, "--json", "--config", str(net.config("brand"))).stdout)
    assert out["status"] == "failed"


def test_cancel_stops_the_step_at_the_node(net: LocalNet) -> None:
    job_id = start_job(net)
    wait_dispatched(net, job_id, "partner")
    with net.client("brand") as c:
        assert c.post(f"/v1/admin/jobs/{job_id}/cancel")["status"] == "cancelled"
    deadline = time.monotonic() + 20
    with net.client("partner") as c:
        while time.monotonic() < deadline:
            steps = c.get("/v1/admin/steps")
            if steps and steps[0]["status"] == "cancelled":
                break
            time.sleep(0.2)
    assert [(s["job_id"], s["status"]) for s in steps] == [(job_id, "cancelled")]
    job = wait_job(net, "brand", job_id)
    assert job["status"] == "cancelled"
    assert next(s for s in job["steps"] if s["party"] == "partner")["status"] == "cancelled"
