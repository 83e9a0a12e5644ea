"""Vertical `train` job across real node and coordinator processes (LocalNet): the brand (guest)
and the partner (host) ingest subsets of the FATE breast_hetero data, matched by PSI on a
synthetic phone column, consent-gated at both nodes; the arbiter runs at the coordinator.

Keys are 1024-bit Paillier through the core's test-only switch (`train.allow_short_keys`),
passed in the job's training config: this checks the wiring, not the key size."""

from __future__ import annotations

import datetime as dt
import json
import random
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, text

from confide.localnet import LocalNet
from federated.roles import TrainConfig, split_indices, train_guest_only
from tests.conftest import SHARED_DATA
from tests.helpers import spec
from tests.test_integration import confide, wait_job

pytestmark = pytest.mark.slow
NOW = dt.datetime.now(dt.timezone.utc)
GUEST_X = [f"x{i}" for i in range(10)]
HOST_X = [f"p{i}" for i in range(20)]
TRAIN = {"key_bits": 1024, "allow_short_keys": True, "max_epochs": 20}


def _world() -> dict:
    g = pd.read_csv(SHARED_DATA / "fate" / "breast_hetero_guest.csv").head(300)
    h = pd.read_csv(SHARED_DATA / "fate" / "breast_hetero_host.csv").set_index("id").loc[g["id"]].reset_index()
    h.columns = ["id", *HOST_X]
    rnd = random.Random(11)
    phones = {int(i): f"13{rnd.randrange(10**9):09d}" for i in g["id"]}
    brand = g.iloc[:260].copy()        # ids 0..259 of the subset
    partner = h.iloc[40:300].copy()    # ids 40..299: 220 shared
    brand.insert(0, "lead_id", [f"L{i}" for i in brand["id"]])
    partner.insert(0, "person_id", [f"P{i}" for i in partner["id"]])
    brand.insert(1, "phone", [phones[int(i)] for i in brand["id"]])
    partner.insert(1, "phone", [phones[int(i)] for i in partner["id"]])
    # Some subjects refuse modeling, at each node (the train job must drop them at BOTH).
    brand_refuse = {s for k, s in enumerate(brand["lead_id"]) if k % 11 == 3}
    partner_refuse = {s for k, s in enumerate(partner["person_id"]) if k % 13 == 5}
    return {"brand": brand, "partner": partner, "refuse": {"brand": brand_refuse, "partner": partner_refuse}}


def _consent(net: LocalNet, party: str, subjects: list[str], refuse: set[str]) -> None:
    with net.client(party) as c:
        c.post("/v1/consent/notices", {"notice": "privacy", "version": "privacy.v1",
                                       "published_at": (NOW - dt.timedelta(days=10)).isoformat(),
                                       "purposes": [{"purpose": "audience", "data_categories": ["phone"]},
                                                    {"purpose": "modeling", "data_categories": ["profile"]}]})
        common = {"channel": "app", "notice_version": "privacy.v1",
                  "valid_from": (NOW - dt.timedelta(days=1)).isoformat()}
        events = [{"event_id": f"{party}-a-{s}", "subject": s, "purpose": "audience", "action": "granted", **common}
                  for s in subjects]
        events += [{"event_id": f"{party}-m-{s}", "subject": s, "purpose": "modeling",
                    "action": "refused" if s in refuse else "granted", **common} for s in subjects]
        assert c.post("/v1/consent/events/batch", {"events": events})["recorded"] == len(events)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNet, dict]]:
    w = _world()
    work = tmp_path_factory.mktemp("vfl")
    with LocalNet(work, [("brand", "brand"), ("partner", "partner")],
                  coordinator_settings={"poll_interval_s": 0.1}) as net:
        net.start_all()
        for party, key, name, label, cols in (("brand", "lead_id", "leads", "y", GUEST_X),
                                              ("partner", "person_id", "people", None, HOST_X)):
            frame = w[party].drop(columns=["id"])
            frame.to_csv(work / f"{name}.csv", index=False)
            schema = (f"dataset: {name}\nkey: {key}\nidentifiers:\n  - {{column: phone, type: phone}}\nfeatures:\n"
                      + "".join(f"  - {{column: {c}, type: float}}\n" for c in cols)
                      + (f"labels:\n  - {{column: {label}, type: binary}}\n" if label else ""))
            (work / f"{name}.yaml").write_text(schema)
            confide("node", "register", "--config", str(net.config(party)))
            confide("node", "ingest", str(work / f"{name}.csv"), "--schema", str(work / f"{name}.yaml"),
                    "--config", str(net.config(party)))
            _consent(net, party, frame[key].tolist(), w["refuse"][party])
        agreement = spec("vfl-2026", jobs=("match", "train"), datasets={"brand": ["leads"], "partner": ["people"]})
        agreement["parties"][0]["identifiers"] = [{"dataset": "leads", "column": "phone", "type": "phone"}]
        agreement["parties"][1]["identifiers"] = [{"dataset": "people", "column": "phone", "type": "phone"}]
        agreement["parties"][0]["columns"] = {"leads": ["y", *GUEST_X]}
        agreement["parties"][1]["columns"] = {"people": HOST_X}
        agreement["allowed_jobs"] = [{"type": "match", "purpose": "audience.match"},
                                     {"type": "train", "purpose": "modeling.lead_scoring"}]
        with net.client("brand") as c:
            d = c.post("/v1/admin/agreements", agreement)
            c.post("/v1/admin/agreements/vfl-2026/versions/1/sign", {"digest": d["digest"]})
        with net.client("partner") as c:
            assert c.post("/v1/admin/agreements/vfl-2026/versions/1/sign", {})["status"] == "active"
        with net.client("brand") as c:
            job = c.post("/v1/admin/jobs", {"type": "match", "agreement_id": "vfl-2026",
                                            "params": {"id_types": ["phone"]}})
        job = wait_job(net, "brand", job["id"], timeout=60)
        assert job["status"] == "succeeded", job
        w["match_job"] = job["id"]
        yield net, w


def _private(net: LocalNet, party: str, job_id: str) -> dict:
    with net.client(party) as c:
        return next(iter(c.get(f"/v1/admin/jobs/{job_id}/private").values()))


def _join_keys(net: LocalNet, party: str, job_id: str) -> dict[str, str]:
    eng = create_engine(f"sqlite:///{net.workdir / party / 'node.db'}")
    with eng.connect() as conn:
        out = dict(conn.execute(text("select row_key, join_key from psi_matches where job_id = :j"),
                                {"j": job_id}).fetchall())
    eng.dispose()
    return out


def _params(w: dict, **over: object) -> dict:
    return {"match_job": w["match_job"], "label": "y", "guest_features": GUEST_X,
            "host_features": {"partner": HOST_X}, "test_fraction": 0.2, "seed": 42, "train": TRAIN, **over}


def test_train_matches_pooled_logistic_regression_and_keeps_results_at_the_nodes(world) -> None:  # type: ignore[no-untyped-def]
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    net, w = world
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026", "params": _params(w)})
    job = wait_job(net, "brand", job["id"], timeout=90)
    assert job["status"] == "succeeded", job

    # Plaintext oracle: the pooled rows both nodes allow, in join-key order, the same split.
    bk, pk = _join_keys(net, "brand", w["match_job"]), _join_keys(net, "partner", w["match_job"])
    b = w["brand"].set_index("lead_id")
    p = w["partner"].set_index("person_id")
    by_join = {k: r for r, k in pk.items()}
    rows = sorted((k, r, by_join[k]) for r, k in bk.items()
                  if r not in w["refuse"]["brand"] and by_join[k] not in w["refuse"]["partner"])
    X = np.hstack([b.loc[[r for _, r, _ in rows], GUEST_X].to_numpy(), p.loc[[q for _, _, q in rows], HOST_X].to_numpy()])
    y = b.loc[[r for _, r, _ in rows], "y"].to_numpy()
    train, test = split_indices(len(rows), 0.2, 42)
    lr = LogisticRegression(max_iter=5000).fit(X[train], y[train])
    oracle_auc = roc_auc_score(y[test], lr.predict_proba(X[test])[:, 1])

    guest = _private(net, "brand", job["id"])
    assert guest["rows"] == len(rows) and guest["test_rows"] == len(test)
    assert guest["gate"]["allowed_here"] < len(bk)  # the brand's own refusals
    assert len(rows) < guest["gate"]["allowed_here"]  # ... and the partner's
    assert abs(guest["auc"] - oracle_auc) <= 0.02, (guest["auc"], oracle_auc)
    print(f"vfl train: rows={len(rows)} auc={guest['auc']:.4f} oracle={oracle_auc:.4f} "
          f"guest_only={guest['guest_only_auc']:.4f} epochs={guest['epochs']} ({guest['stop_reason']}) "
          f"train_s={guest['train_seconds']} step_s={guest['seconds']}")
    assert "guest_only_auc" in guest and guest["metrics"]["auc"] == guest["auc"]
    assert len(guest["model"]["weights"]) == len(GUEST_X)
    # Stronger than the AUC (breast data separates almost perfectly): the federated model equals
    # the same Taylor-loss training on the pooled rows in plaintext, up to fixed-point error, which
    # only holds if both nodes aligned, gated and split the rows identically.
    plain = train_guest_only(X[train], y[train], TrainConfig(**TRAIN, seed=42, k_min=50))
    assert plain["epochs"] == guest["epochs"]

    # The partner keeps its model part; it never holds labels, scores or metrics.
    partner = _private(net, "partner", job["id"])
    assert len(partner["model"]["weights"]) == len(HOST_X) and partner["rows"] == len(rows)
    fed = np.array([*guest["model"]["weights"], *partner["model"]["weights"], guest["model"]["intercept"]])
    ref = np.array([*plain["weights"], plain["intercept"]])
    assert np.abs(fed - ref).max() < 1e-3, np.abs(fed - ref).max()
    ptext = json.dumps(partner)
    assert "metrics" not in partner and "auc" not in ptext and "scores" not in ptext
    assert "labels" not in ptext and '"y"' not in ptext

    # The coordinator's registry entry: sizes, config, epochs; no metrics, weights or values.
    result = job["result"]
    assert result["model"]["version"] == job["id"] and result["model"]["agreement_id"] == "vfl-2026"
    assert result["data"] == {"train_rows": len(train), "test_rows": len(test)}
    assert result["training"]["epochs"] == guest["epochs"] >= 1
    rtext = json.dumps(job)
    for word in ("auc", "weights", "intercept", "metrics", "mask_seed", "losses"):
        assert word not in rtext, word
    assert f"{guest['auc']}"[:8] not in rtext
    values = {f"{v:.6f}" for v in np.ravel(X[:20])}
    assert not any(v in rtext for v in values)
    assert not any(ph in rtext for ph in w["brand"]["phone"])


def test_train_refuses_columns_outside_the_agreement(world) -> None:  # type: ignore[no-untyped-def]
    from confide.errors import ValidationError

    net, w = world
    with net.client("brand") as c:
        with pytest.raises(ValidationError, match="not among partner's agreed columns"):
            c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026",
                                      "params": _params(w, host_features={"partner": ["phone"]})})
        with pytest.raises(ValidationError, match="below 2048"):
            c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026",
                                      "params": _params(w, train={"key_bits": 1024})})


def test_train_on_an_unknown_match_job_fails_cleanly(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026",
                                        "params": _params(w, match_job="no-such-job")})
    job = wait_job(net, "brand", job["id"], timeout=30)
    assert job["status"] == "failed" and "not a match job" in job["error"]
