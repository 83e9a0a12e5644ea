"""Vertical training survives a node restart: real coordinator and node processes, a node
SIGKILLed mid-training and started again; every party and the arbiter restore the same
completed epoch and the model equals the uninterrupted one (the plaintext oracle of the same
training, which an uninterrupted federated run equals within fixed-point error, see
tests/test_vfl_jobs.py). Snapshots are gone when the job ends. Plus the arbiter's sealing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from confide import pki
from confide.errors import ProtocolError
from confide.localnet import LocalNet
from federated.roles import TrainConfig, split_indices, train_guest_only
from tests.test_integration import wait_job
from tests.test_vfl_jobs import GUEST_X, HOST_X, TRAIN, _join_keys, _params, _private, _standardised, world  # noqa: F401

pytestmark = pytest.mark.slow
LONG = {**TRAIN, "max_epochs": 24, "tol": 0.0}  # no early stop: the kill lands mid-training


def _snapshot_epochs(net: LocalNet, party: str, job_id: str) -> list[int]:
    d = net.workdir / party / "vfl-snapshots" / job_id / f"train@{party}"
    return sorted(int(f.name[6:-5]) for f in d.glob("epoch-*.json")) if d.is_dir() else []


def _oracle(net: LocalNet, w: dict) -> dict:
    bk, pk = _join_keys(net, "brand", w["match_job"]), _join_keys(net, "partner", w["match_job"])
    b, p = w["brand"].set_index("lead_id"), w["partner"].set_index("person_id")
    by_join = {k: r for r, k in pk.items()}
    rows = sorted((k, r, by_join[k]) for r, k in bk.items()
                  if k in by_join and r not in w["refuse"]["brand"] and by_join[k] not in w["refuse"]["partner"])
    X = np.hstack([b.loc[[r for _, r, _ in rows], GUEST_X].to_numpy(), p.loc[[q for _, _, q in rows], HOST_X].to_numpy()])
    y = b.loc[[r for _, r, _ in rows], "y"].to_numpy()
    train, _ = split_indices(len(rows), 0.2, 42)
    X = _standardised(X, train)
    return train_guest_only(X[train], y[train], TrainConfig(**LONG, seed=42, k_min=50))


@pytest.mark.parametrize("victim", ["partner", "brand"])
def test_node_killed_mid_training_resumes_from_the_last_epoch(world, victim: str) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    watcher = "partner" if victim == "brand" else "brand"  # asks about the job while the victim is down
    with net.client("brand") as c:
        job_id = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026",
                                           "params": _params(w, train=LONG)})["id"]
    deadline = time.monotonic() + 120
    while not [e for e in _snapshot_epochs(net, victim, job_id) if e >= 4]:
        assert time.monotonic() < deadline, "training never reached epoch 4"
        time.sleep(0.1)
    net.kill(victim)  # SIGKILL mid-training: no clean-up runs at the victim
    killed_at = max(_snapshot_epochs(net, victim, job_id))
    assert killed_at < LONG["max_epochs"]
    time.sleep(1.0)
    net.start(victim, extra_env={"CONFIDE_TEST_SHORT_KEYS": "1"})
    job = wait_job(net, watcher, job_id, timeout=240)
    assert job["status"] == "succeeded", job.get("error")

    step = {s["party"]: s for s in job["steps"]}
    assert step[victim]["attempt"] == 2 and step[watcher]["attempt"] == 1
    guest, partner = _private(net, "brand", job_id), _private(net, "partner", job_id)
    # Both parties (and the arbiter) resumed from the same completed epoch, not from scratch.
    assert guest["resumed_from_epochs"] == partner["resumed_from_epochs"]
    (resumed,) = guest["resumed_from_epochs"]
    assert killed_at - 1 <= resumed <= killed_at and resumed >= 3
    assert guest["epochs"] == partner["epochs"] == LONG["max_epochs"]
    assert len(guest["losses"]) == LONG["max_epochs"]

    # The model equals the uninterrupted training's (plaintext oracle), up to fixed-point error.
    plain = _oracle(net, w)
    fed = np.array([*guest["model"]["weights"], *partner["model"]["weights"], guest["model"]["intercept"]])
    ref = np.array([*plain["weights"], plain["intercept"]])
    assert np.abs(fed - ref).max() < 1e-3, np.abs(fed - ref).max()
    assert guest["losses"] == pytest.approx(plain["losses"], abs=1e-4)

    # Nothing from the dead attempt: one step record at the victim (the second attempt), and
    # no snapshot left at either node or at the coordinator.
    with net.client(victim) as c:
        mine = [s for s in c.get("/v1/admin/steps") if s["job_id"] == job_id]
    assert [(s["status"], s["attempt"]) for s in mine] == [("succeeded", 2)]
    for party in ("brand", "partner"):
        assert not (net.workdir / party / "vfl-snapshots" / job_id).exists(), party
    eng = create_engine(f"sqlite:///{net.workdir / 'coordinator' / 'coordinator.db'}")
    with eng.connect() as conn:
        left = conn.execute(text("select count(*) from arbiter_snapshots where job_id = :j"), {"j": job_id}).scalar()
    eng.dispose()
    assert left == 0
    # The registry entry has the full run.
    assert job["result"]["training"]["epochs"] == LONG["max_epochs"]


def test_coordinator_killed_mid_training_rebuilds_the_arbiter_from_its_sealed_snapshot(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    with net.client("brand") as c:
        job_id = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026",
                                           "params": _params(w, train=LONG)})["id"]
    deadline = time.monotonic() + 120
    while not [e for e in _snapshot_epochs(net, "brand", job_id) if e >= 4]:
        assert time.monotonic() < deadline, "training never reached epoch 4"
        time.sleep(0.1)
    net.kill("coordinator")  # the arbiter's memory (private key, mailbox) is gone
    time.sleep(1.0)
    net.start("coordinator", extra_env={"CONFIDE_TEST_SHORT_KEYS": "1"})
    job = wait_job(net, "brand", job_id, timeout=240)
    assert job["status"] == "succeeded", job.get("error")
    assert all(s["attempt"] == 1 for s in job["steps"])  # no step ran twice: the nodes rejoined
    guest, partner = _private(net, "brand", job_id), _private(net, "partner", job_id)
    assert guest["resumed_from_epochs"] == partner["resumed_from_epochs"]
    assert len(guest["resumed_from_epochs"]) == 1 and guest["resumed_from_epochs"][0] >= 3
    plain = _oracle(net, w)
    fed = np.array([*guest["model"]["weights"], *partner["model"]["weights"], guest["model"]["intercept"]])
    ref = np.array([*plain["weights"], plain["intercept"]])
    assert np.abs(fed - ref).max() < 1e-3, np.abs(fed - ref).max()
    assert "rebuilt from its snapshot" in net.tail("coordinator", 200)


def test_arbiter_snapshot_is_sealed_under_the_coordinator_key(tmp_path: Path) -> None:
    from coordinator.arbiter import open_snapshot, seal_snapshot

    pki.init(tmp_path, [("brand", "brand")])
    coord = SimpleNamespace(identity=pki.load_identity(tmp_path / "coordinator"))
    snap = {"role": "arbiter", "job_id": "j1", "key": {"p": "1234567890123456789", "q": "98765432109876543"},
            "epoch": 3, "losses": [0.6, 0.5, 0.4], "finished": False}
    sealed = seal_snapshot(coord, "j1", 3, snap)
    assert b"1234567890123456789" not in sealed and b"arbiter" not in sealed
    assert open_snapshot(coord, "j1", 3, sealed) == snap
    assert seal_snapshot(coord, "j1", 3, snap) != sealed  # fresh nonce each time
    with pytest.raises(ProtocolError, match="does not open"):
        open_snapshot(coord, "j1", 4, sealed)  # bound to its epoch ...
    with pytest.raises(ProtocolError, match="does not open"):
        open_snapshot(coord, "j2", 3, sealed)  # ... and job
    other = tmp_path / "other"
    pki.init(other, [("brand", "brand")])
    with pytest.raises(ProtocolError, match="does not open"):
        open_snapshot(SimpleNamespace(identity=pki.load_identity(other / "coordinator")), "j1", 3, sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(ProtocolError):
        open_snapshot(coord, "j1", 3, tampered)
    assert json.loads(json.dumps(snap)) == snap
