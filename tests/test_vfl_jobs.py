"""Vertical `train` job across real node and coordinator processes (LocalNet): the brand (guest)
and the partner (host) ingest subsets of the FATE breast_hetero data, matched by PSI on a
synthetic phone column, consent-gated at both nodes; the arbiter runs at the coordinator.

Keys are 1024-bit Paillier through the core's test-only switch (`train.allow_short_keys`),
passed in the job's training config; the coordinator and nodes accept it only because this
test starts them with CONFIDE_TEST_SHORT_KEYS=1. This checks the wiring, not the key size."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import signal
import time
from pathlib import Path
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
HOST2_X = [f"q{i}" for i in range(6)]
# The plaintext oracle (train_guest_only) is FATE's Taylor loss; pin it where the core offers others.
TRAIN = {"key_bits": 1024, "allow_short_keys": True, "max_epochs": 20,
         **({"loss": "taylor"} if "loss" in TrainConfig.model_fields else {})}


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
    # Categorical columns: a brand segment (with gaps) and a partner band, derived from features.
    # (Few, large categories: an indicator needs k_min=50 training rows in every mini-batch.)
    seg = pd.qcut(brand["x0"], 2, labels=["a", "b"]).astype(object)
    seg[brand["id"] % 17 == 0] = None
    brand["segment"] = seg
    partner["band"] = pd.qcut(partner["p0"], 2, labels=[1, 2]).astype(int)
    # Some subjects refuse modeling, at each node (the train job must drop them at BOTH).
    brand_refuse = {s for k, s in enumerate(brand["lead_id"]) if k % 11 == 3}
    partner_refuse = {s for k, s in enumerate(partner["person_id"]) if k % 13 == 5}
    # A second partner (ids 20..279) with its own signals: noisy functions of some host columns.
    rng = np.random.default_rng(5)
    p2 = h.iloc[20:280][["id"]].copy()
    for i, c in enumerate(HOST2_X):
        p2[c] = h.iloc[20:280][HOST_X[10 + i]].to_numpy() * 0.5 + rng.normal(0, 0.2, len(p2))
    p2.insert(0, "person_id", [f"Q{i}" for i in p2["id"]])
    p2.insert(1, "phone", [phones[int(i)] for i in p2["id"]])
    p2_refuse = {s for k, s in enumerate(p2["person_id"]) if k % 17 == 7}
    return {"brand": brand, "partner": partner, "partner2": p2,
            "refuse": {"brand": brand_refuse, "partner": partner_refuse, "partner2": p2_refuse}}


def _consent(net: LocalNet, party: str, subjects: list[str], refuse: set[str], recipients: list[str]) -> None:
    """Grants naming each other party (separate consent, PIPL Art. 23) under a notice naming
    them; `refuse` refuses modelling (with anyone)."""
    with net.client(party) as c:
        c.post("/v1/consent/notices", {"notice": "privacy", "version": "privacy.v1",
                                       "published_at": (NOW - dt.timedelta(days=10)).isoformat(),
                                       "purposes": [{"purpose": p, "data_categories": [cat], "recipients": recipients}
                                                    for p, cat in (("audience", "phone"), ("modeling", "profile"),
                                                                   ("scoring", "profile"))]})
        common = {"channel": "app", "notice_version": "privacy.v1",
                  "valid_from": (NOW - dt.timedelta(days=1)).isoformat()}
        events = []
        for r in recipients:
            events += [{"event_id": f"{party}-a-{r}-{s}", "subject": s, "purpose": "audience", "action": "granted",
                        "recipient": r, **common} for s in subjects]
            events += [{"event_id": f"{party}-m-{r}-{s}", "subject": s, "purpose": "modeling", "action": "granted",
                        "recipient": r, **common} for s in subjects if s not in refuse]
            events += [{"event_id": f"{party}-s-{r}-{s}", "subject": s, "purpose": "scoring", "action": "granted",
                        "recipient": r, **common} for s in subjects]
        events += [{"event_id": f"{party}-m-{s}", "subject": s, "purpose": "modeling", "action": "refused", **common}
                   for s in subjects if s in refuse]
        assert c.post("/v1/consent/events/batch", {"events": events})["recorded"] == len(events)


def _ingest(net: LocalNet, work: Path, party: str, frame: pd.DataFrame, key: str, name: str, label: str | None,
            cols: list[str], cat: str | None) -> None:
    frame.to_csv(work / f"{name}.csv", index=False)
    schema = (f"dataset: {name}\nkey: {key}\nidentifiers:\n  - {{column: phone, type: phone}}\nfeatures:\n"
              + "".join(f"  - {{column: {c}, type: float}}\n" for c in cols)
              + ("  - {{column: {}, type: {}}}\n".format(*cat.split(": ")) if cat else "")
              + (f"labels:\n  - {{column: {label}, type: binary}}\n" if label else ""))
    (work / f"{name}.yaml").write_text(schema)
    confide("node", "register", "--config", str(net.config(party)))
    confide("node", "ingest", str(work / f"{name}.csv"), "--schema", str(work / f"{name}.yaml"),
            "--config", str(net.config(party)))


def _agree(net: LocalNet, agreement_id: str, parties: dict[str, tuple[str, list[str]]]) -> None:
    """An active agreement for match/train/score between `parties` = {party: (dataset, columns)}."""
    names = tuple(parties)
    agreement = spec(agreement_id, parties=names, jobs=("match", "train"),
                     datasets={p: [d] for p, (d, _) in parties.items()},
                     purposes=["audience", "modeling.lead_scoring", "scoring.lead"])
    for i, (p, (d, cols)) in enumerate(parties.items()):
        agreement["parties"][i]["identifiers"] = [{"dataset": d, "column": "phone", "type": "phone"}]
        agreement["parties"][i]["columns"] = {d: cols}
    agreement["allowed_jobs"] = [{"type": "match", "purpose": "audience.match"},
                                 {"type": "train", "purpose": "modeling.lead_scoring"},
                                 {"type": "score", "purpose": "scoring.lead"}]
    with net.client(names[0]) as c:
        d = c.post("/v1/admin/agreements", agreement)
        c.post(f"/v1/admin/agreements/{agreement_id}/versions/1/sign", {"digest": d["digest"]})
    for p in names[1:]:
        with net.client(p) as c:
            doc = c.post(f"/v1/admin/agreements/{agreement_id}/versions/1/sign", {})
    assert doc["status"] == "active"


def _match(net: LocalNet, agreement_id: str, partner: str | None = None) -> str:
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": "match", "agreement_id": agreement_id,
                                        "params": {"id_types": ["phone"], **({"partner": partner} if partner else {})}})
    job = wait_job(net, "brand", job["id"], timeout=60)
    assert job["status"] == "succeeded", job.get("error")
    return str(job["id"])


def _make_world(work: Path, with_partner2: bool) -> Iterator[tuple[LocalNet, dict]]:
    w = _world()
    parties = [("brand", "brand"), ("partner", "partner")] + ([("partner2", "partner")] if with_partner2 else [])
    with LocalNet(work, parties, coordinator_settings={"poll_interval_s": 0.1}) as net:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CONFIDE_TEST_SHORT_KEYS", "1")  # copied into the service processes only
            net.start_all()
        brand_to = ["partner", "partner2"] if with_partner2 else ["partner"]
        for party, key, name, label, cols, cat, to in (
                ("brand", "lead_id", "leads", "y", GUEST_X, "segment: category", brand_to),
                # With several partners each also learns the others take part on the same (aligned)
                # rows, so its subjects' separate consent names every party of the training.
                ("partner", "person_id", "people", None, HOST_X, "band: int",
                 ["brand", "partner2"] if with_partner2 else ["brand"]),
                *([("partner2", "person_id", "people2", None, HOST2_X, None, ["brand", "partner"])]
                  if with_partner2 else [])):
            frame = w[party].drop(columns=["id"])
            _ingest(net, work, party, frame, key, name, label, cols, cat)
            _consent(net, party, frame[key].tolist(), w["refuse"][party], to)
        _agree(net, "vfl-2026", {"brand": ("leads", ["y", *GUEST_X, "segment"]), "partner": ("people", [*HOST_X, "band"])})
        w["match_job"] = _match(net, "vfl-2026")
        if with_partner2:
            _agree(net, "vfl3-2026", {"brand": ("leads", ["y", *GUEST_X]), "partner": ("people", HOST_X),
                                      "partner2": ("people2", HOST2_X)})
            w["match3"] = {p: _match(net, "vfl3-2026", p) for p in ("partner", "partner2")}
        yield net, w


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNet, dict]]:
    yield from _make_world(tmp_path_factory.mktemp("vfl"), with_partner2=False)


@pytest.fixture(scope="module")
def world3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNet, dict]]:
    """As `world`, plus a second partner: agreement vfl3-2026 between the brand and both
    partners, with one match job per partner."""
    yield from _make_world(tmp_path_factory.mktemp("vfl3"), with_partner2=True)


def _run(net: LocalNet, type_: str, agreement: str, params: dict, timeout: float = 120) -> dict:
    """Create a job at the brand node, wait for it, and require that it succeeded."""
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": type_, "agreement_id": agreement, "params": params})
    job = wait_job(net, "brand", job["id"], timeout=timeout)
    assert job["status"] == "succeeded", job.get("error")
    return job


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


def _standardised(X: np.ndarray, train: np.ndarray) -> np.ndarray:
    mu, sd = X[train].mean(axis=0), X[train].std(axis=0)
    return (X - mu) / np.where(sd > 1e-12, sd, 1.0)


def _std(part: dict, x: np.ndarray) -> np.ndarray:
    """Apply a model part's stored standardisation (numeric columns only) to raw values."""
    cols = part["model"]["encoding"]["columns"]
    return (x - np.array([c["mean"] for c in cols])) / np.array([c["scale"] for c in cols])


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
    assert job["status"] == "succeeded", job.get("error")

    # Plaintext oracle: the pooled rows both nodes allow, in join-key order, the same split.
    bk, pk = _join_keys(net, "brand", w["match_job"]), _join_keys(net, "partner", w["match_job"])
    b = w["brand"].set_index("lead_id")
    p = w["partner"].set_index("person_id")
    by_join = {k: r for r, k in pk.items()}
    rows = sorted((k, r, by_join[k]) for r, k in bk.items()
                  if r not in w["refuse"]["brand"] and by_join[k] not in w["refuse"]["partner"])
    Xraw = np.hstack([b.loc[[r for _, r, _ in rows], GUEST_X].to_numpy(),
                      p.loc[[q for _, _, q in rows], HOST_X].to_numpy()])
    y = b.loc[[r for _, r, _ in rows], "y"].to_numpy()
    train, test = split_indices(len(rows), 0.2, 42)
    X = _standardised(Xraw, train)  # the nodes standardise each numeric column on the training rows
    lr = LogisticRegression(max_iter=5000).fit(X[train], y[train])
    oracle_auc = roc_auc_score(y[test], lr.predict_proba(X[test])[:, 1])

    guest = _private(net, "brand", job["id"])
    assert guest["rows"] == len(rows) and guest["test_rows"] == len(test)
    assert guest["gate"]["allowed_here"] < len(bk)  # the brand's own refusals
    assert len(rows) < guest["gate"]["allowed_here"]  # ... and the partner's
    # ~37 held-out rows: one mis-ordered pair moves the AUC by ~0.003; the weight check below is the strict one
    assert abs(guest["auc"] - oracle_auc) <= 0.03, (guest["auc"], oracle_auc)
    print(f"vfl train: rows={len(rows)} auc={guest['auc']:.4f} oracle={oracle_auc:.4f} "
          f"guest_only={guest['guest_only_auc']:.4f} epochs={guest['epochs']} ({guest['stop_reason']}) "
          f"train_s={guest['train_seconds']} step_s={guest['seconds']}")
    assert "guest_only_auc" in guest and guest["metrics"]["auc"] == guest["auc"]
    assert len(guest["model"]["weights"]) == len(GUEST_X)
    enc = guest["model"]["encoding"]["columns"]
    assert [c["name"] for c in enc] == GUEST_X
    assert np.allclose([c["mean"] for c in enc], Xraw[train, :len(GUEST_X)].mean(axis=0))
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

    # The coordinator's registry entry: sizes, config, epochs, losses (every party hears them);
    # held-out metrics only over >= k_min rows (here fewer: suppressed); no weights or values.
    result = job["result"]
    assert result["model"]["version"] == job["id"] and result["model"]["agreement_id"] == "vfl-2026"
    assert result["data"] == {"train_rows": len(train), "test_rows": len(test)}
    assert result["training"]["epochs"] == guest["epochs"] >= 1
    assert result["training"]["losses"] == pytest.approx(guest["losses"], abs=1e-6)
    assert result["model"]["feature_counts"] == {"brand": len(GUEST_X), "partner": len(HOST_X)}
    assert len(test) < 50 and result["heldout_metrics"]["suppressed"] is True
    rtext = json.dumps(job)
    for word in ("auc", "weights", "intercept", "mask_seed", "encoding", "calibration"):
        assert word not in rtext, word
    assert f"{guest['auc']}"[:8] not in rtext
    values = {f"{v:.6f}" for v in np.ravel(Xraw[:20])}
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


def test_short_keys_need_the_test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from confide.agreements import AgreementSpec
    from confide.errors import ValidationError
    from coordinator.vfl_jobs import TrainJob

    monkeypatch.delenv("CONFIDE_TEST_SHORT_KEYS", raising=False)
    s = spec("vfl-x", jobs=("match", "train"), datasets={"brand": ["leads"], "partner": ["people"]})
    s["parties"][0]["columns"] = {"leads": ["y", *GUEST_X]}
    s["parties"][1]["columns"] = {"people": HOST_X}
    params = {"match_job": "m", "label": "y", "guest_features": GUEST_X, "host_features": {"partner": HOST_X},
              "train": TRAIN}
    with pytest.raises(ValidationError, match="tests only"):
        TrainJob().validate_params(AgreementSpec.model_validate(s), params)
    monkeypatch.setenv("CONFIDE_TEST_SHORT_KEYS", "1")
    assert TrainJob().validate_params(AgreementSpec.model_validate(s), params)["train"]["key_bits"] == 1024


def test_train_on_an_unknown_match_job_fails_cleanly(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026",
                                        "params": _params(w, match_job="no-such-job")})
    job = wait_job(net, "brand", job["id"], timeout=30)
    assert job["status"] == "failed" and "not a match job" in job["error"]


def test_score_gives_the_brand_joint_or_guest_only_scores_and_skips_opted_out_leads(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    with net.client("brand") as c:
        train = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026", "params": _params(w)})
    train = wait_job(net, "brand", train["id"], timeout=90)
    assert train["status"] == "succeeded", train.get("error")
    bk, pk = _join_keys(net, "brand", w["match_job"]), _join_keys(net, "partner", w["match_job"])
    by_join = {k: r for r, k in pk.items()}
    matched = sorted(bk)
    opted = set(matched[:3])  # brand members who switch personalised marketing off: not scored
    partner_off = {by_join[bk[r]] for r in matched[3:5]}  # the partner's side opts out: partner_missing
    for party, subjects in (("brand", opted), ("partner", partner_off)):
        with net.client(party) as c:
            for s in subjects:
                c.request("PUT", f"/v1/consent/subjects/{s}/preferences",
                          json_body={"no_personalised_marketing": True})
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": "score", "agreement_id": "vfl-2026",
                                        "params": {"model": train["id"], "dataset": "leads"}})
    job = wait_job(net, "brand", job["id"], timeout=60)
    assert job["status"] == "succeeded", job.get("error")
    res = _private(net, "brand", job["id"])
    scores = {s["lead"]: s for s in res["scores"]}
    assert not (opted & set(scores)) and res["not_scored"] == len(opted)
    assert len(scores) == len(w["brand"]) - len(opted)
    assert all(s["model_version"] == train["id"] and 0.0 <= s["score"] <= 1.0 for s in scores.values())

    # Oracle from the model parts (each held at its node) and the raw rows.
    g, hp = _private(net, "brand", train["id"]), _private(net, "partner", train["id"])
    b = w["brand"].set_index("lead_id")
    p = w["partner"].set_index("person_id")
    joint = [r for r in matched if r not in opted and by_join[bk[r]] not in partner_off]
    assert {r for r, s in scores.items() if not s["partner_missing"]} == set(joint)
    for r in joint[:40]:
        u = (_std(g, b.loc[r, GUEST_X].to_numpy(float)) @ np.array(g["model"]["weights"]) + g["model"]["intercept"]
             + _std(hp, p.loc[by_join[bk[r]], HOST_X].to_numpy(float)) @ np.array(hp["model"]["weights"]))
        assert scores[r]["score"] == pytest.approx(1 / (1 + np.exp(-u)), abs=1e-5)
    missing = [r for r, s in scores.items() if s["partner_missing"]]
    assert set(missing) == set(b.index) - set(joint) - opted  # brand-only leads and the partner's opt-outs
    go = g["guest_only_model"]
    for r in missing[:20]:
        u = _std(g, b.loc[r, GUEST_X].to_numpy(float)) @ np.array(go["weights"]) + go["intercept"]
        assert scores[r]["score"] == pytest.approx(1 / (1 + np.exp(-u)), abs=1e-9)

    # The coordinator: counts and the model version, no scores or lead ids.
    assert job["result"]["scored"] == len(scores) and job["result"]["model_version"] == train["id"]
    rtext = json.dumps(job)
    assert not any(r in rtext for r in scores) and "partner_missing" not in rtext
    assert not any(f"{s['score']:.6f}"[2:] in rtext for s in list(scores.values())[:50])
    partner = _private(net, "partner", job["id"])
    assert partner["contributed"] == len(joint) and "scores" not in partner
    # Bad input: a dataset that is not the brand's, a model version that does not exist.
    from confide.errors import ValidationError

    with net.client("brand") as c:
        with pytest.raises(ValidationError, match="dataset must be one of"):
            c.post("/v1/admin/jobs", {"type": "score", "agreement_id": "vfl-2026",
                                      "params": {"model": train["id"], "dataset": "people"}})
    with net.client("brand") as c:
        bad = c.post("/v1/admin/jobs", {"type": "score", "agreement_id": "vfl-2026",
                                        "params": {"model": "no-such-model", "dataset": "leads"}})
    bad = wait_job(net, "brand", bad["id"], timeout=30)
    assert bad["status"] == "failed" and "does not exist" in bad["error"]


def test_coordinator_restart_before_the_first_epoch_fails_the_job_cleanly(world) -> None:  # type: ignore[no-untyped-def]
    """Before the first completed epoch there is no sealed arbiter snapshot to rebuild from (a
    restart later resumes: tests/test_vfl_resume.py): the parties' next coordinator call fails
    (409, or cut off mid-write), their steps fail and the job fails with the reason."""
    import time

    net, w = world
    # The partner's step starts 6 s late, so the coordinator restart lands before any epoch.
    net.kill("partner")
    net.start("partner", extra_env={"CONFIDE_TEST_SHORT_KEYS": "1", "CONFIDE_NODE_TEST_STEP_DELAY_S": "6"})
    try:
        with net.client("brand") as c:
            job = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026", "params": _params(w)})
        deadline = time.monotonic() + 30
        with net.client("brand") as c:
            while c.get(f"/v1/admin/jobs/{job['id']}")["status"] != "running" and time.monotonic() < deadline:
                time.sleep(0.2)
        time.sleep(1.0)
        net.kill("coordinator")
        net.start("coordinator", extra_env={"CONFIDE_TEST_SHORT_KEYS": "1"})
        job = wait_job(net, "brand", job["id"], timeout=90)
        assert job["status"] == "failed", job
        assert "no arbiter is running" in job["error"] or "could not reach coordinator" in job["error"], job["error"]
        assert not (net.workdir / "brand" / "vfl-snapshots" / job["id"]).exists()
    finally:
        net.kill("partner")
        net.start("partner", extra_env={"CONFIDE_TEST_SHORT_KEYS": "1"})


def test_categorical_features_are_one_hot_at_their_own_node_and_scoring_uses_the_same_transform(world) -> None:  # type: ignore[no-untyped-def]
    net, w = world
    gx, hx = GUEST_X[:4], HOST_X[:6]
    params = _params(w, guest_features=[*gx, "segment"], host_features={"partner": [*hx, "band"]},
                     categories={"partner": {"band": [1, 2, 3]}}, max_categories=3)
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl-2026", "params": params})
    job = wait_job(net, "brand", job["id"], timeout=90)
    assert job["status"] == "succeeded", job.get("error")

    # Oracle, independent of party_node.features: pooled rows, pandas one-hot, numeric standardised.
    bk, pk = _join_keys(net, "brand", w["match_job"]), _join_keys(net, "partner", w["match_job"])
    b, p = w["brand"].set_index("lead_id"), w["partner"].set_index("person_id")
    by_join = {k: r for r, k in pk.items()}
    # (k in by_join: an earlier test's opt-outs purged some of the partner's matches)
    rows = sorted((k, r, by_join[k]) for r, k in bk.items()
                  if k in by_join and r not in w["refuse"]["brand"] and by_join[k] not in w["refuse"]["partner"])
    train, test = split_indices(len(rows), 0.2, 42)
    seg = b.loc[[r for _, r, _ in rows], "segment"].to_numpy(object)
    band = p.loc[[q for _, _, q in rows], "band"].to_numpy()
    # One mini-batch here (fewer rows than batch_size): a value needs 50 training rows; a rarer
    # value folds into "other", which is itself dropped when rarer than that but not empty.
    counts = pd.Series([v for v in seg[train] if v is not None]).value_counts()
    vocab = [v for v in sorted(counts.index, key=lambda v: (-counts[v], v))[:3] if counts[v] >= 50]
    rare = sum(1 for v in seg[train] if v not in vocab)
    assert vocab == ["a", "b"] or vocab == ["b", "a"]
    assert 0 < rare < 50  # the missing segments: no "segment=<other>" column
    seg_1h = np.array([[float(v == c) for c in vocab] for v in seg])
    assert all((band[train] == c).sum() >= 50 for c in (1, 2))  # band 3 never occurs: folded
    band_1h = np.array([[float(v == c) for c in (1, 2)] + [0.0] for v in band])  # "<other>" empty: kept, weight 0
    gnum = _standardised(b.loc[[r for _, r, _ in rows], gx].to_numpy(float), train)
    hnum = _standardised(p.loc[[q for _, _, q in rows], hx].to_numpy(float), train)
    X = np.hstack([gnum, seg_1h, hnum, band_1h])
    y = b.loc[[r for _, r, _ in rows], "y"].to_numpy()
    plain = train_guest_only(X[train], y[train], TrainConfig(**TRAIN, seed=42, k_min=50))

    guest, partner = _private(net, "brand", job["id"]), _private(net, "partner", job["id"])
    assert guest["model"]["feature_names"] == [*gx, *(f"segment={v}" for v in vocab)]
    assert partner["model"]["feature_names"] == [*hx, "band=1", "band=2", "band=<other>"]
    fed = np.array([*guest["model"]["weights"], *partner["model"]["weights"], guest["model"]["intercept"]])
    ref = np.array([*plain["weights"], plain["intercept"]])
    assert np.abs(fed - ref).max() < 1e-3, np.abs(fed - ref).max()
    # Only counts reach the coordinator: the expanded names and the node-chosen vocabulary stay home.
    steps = {s["party"]: s["result"] for s in job["steps"]}
    assert steps["brand"]["features"] == len(gx) + 2 and steps["partner"]["features"] == len(hx) + 3
    text = json.dumps(job)
    assert "segment=" not in text and "band=" not in text and "<other>" not in text

    # Scoring applies the stored transform (standardisation and vocabulary) to the leads.
    sj = _run(net, "score", "vfl-2026", {"model": job["id"], "dataset": "leads"}, timeout=60)
    scores = {s["lead"]: s for s in _private(net, "brand", sj["id"])["scores"]}
    pos = {r: i for i, (_, r, _) in enumerate(rows)}
    checked = 0
    for r, s in scores.items():
        if r in pos and not s["partner_missing"]:
            u = X[pos[r]] @ fed[:-1] + fed[-1]
            assert s["score"] == pytest.approx(1 / (1 + np.exp(-u)), abs=1e-4)
            checked += 1
    assert checked >= 50


def _stock(net: LocalNet, party: str) -> dict:
    with net.client(party) as c:
        return c.get("/v1/admin/obfuscators")


def _restart(net: LocalNet, party: str, env: dict[str, str]) -> None:
    net.kill(party, signal.SIGTERM)
    net.start(party, extra_env={"CONFIDE_TEST_SHORT_KEYS": "1", **env})


def test_nodes_precompute_obfuscators_for_the_agreements_arbiter_key_and_training_uses_them(world) -> None:  # type: ignore[no-untyped-def]
    """The coordinator keeps one arbiter key per agreement; nodes fill a stock of r^n for it
    while idle; a training job's setup then takes its obfuscators from the stock, and the
    model is the same as without it."""
    net, w = world
    cold = _run(net, "train", "vfl-2026", _params(w))
    cold_parts = {p: _private(net, p, cold["id"]) for p in ("brand", "partner")}
    for part in cold_parts.values():
        assert part["obfuscators_from_stock"] == 0 and part["encrypted"] > 0
    stock_env = {"CONFIDE_NODE_OBFUSCATOR_STOCK": "1500", "CONFIDE_NODE_OBFUSCATOR_KEY_BITS": "1024",
                 "CONFIDE_NODE_OBFUSCATOR_WORKERS": "1", "CONFIDE_NODE_OBFUSCATOR_REFRESH_S": "2"}
    try:
        for party in ("brand", "partner"):
            _restart(net, party, stock_env)
        deadline = time.monotonic() + 180
        while True:
            st = {p: _stock(net, p) for p in ("brand", "partner")}
            if all(len(v["keys"]) == 1 and v["keys"][0]["ready"] == 1500 for v in st.values()):
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.5)
        keys = {p: v["keys"][0] for p, v in st.items()}
        # One key, the agreement's, at both nodes; the same key the first (cold) job used.
        assert {k["agreement_id"] for k in keys.values()} == {"vfl-2026"}
        assert len({k["key_id"] for k in keys.values()}) == 1
        fp = keys["brand"]["key_fingerprint"]
        assert keys["partner"]["key_fingerprint"] == fp
        assert {part["arbiter_key_fingerprint"] for part in cold_parts.values()} == {fp}
        shown = confide("node", "obfuscators", "--config", str(net.config("partner")))
        assert "vfl-2026" in shown.stdout and "1,500 / 1,500" in shown.stdout

        warm = _run(net, "train", "vfl-2026", _params(w))
        after = {p: _stock(net, p)["keys"][0] for p in ("brand", "partner")}
        for p in ("brand", "partner"):
            part = _private(net, p, warm["id"])
            assert part["arbiter_key_fingerprint"] == fp
            # Every encryption of the setup (and the per-batch rerandomizations) used the stock...
            assert part["obfuscators_from_stock"] >= part["encrypted"] == cold_parts[p]["encrypted"] > 0
            # ... and each stocked value went to exactly one use: what left the stock is what the job took.
            assert after[p]["computed"] - after[p]["ready"] == part["obfuscators_from_stock"]
            # The same rows, split and protocol: the same model, whatever the obfuscators.
            assert np.allclose(part["model"]["weights"], cold_parts[p]["model"]["weights"], atol=1e-9, rtol=0)
            assert part["losses"] == pytest.approx(cold_parts[p]["losses"], abs=1e-12)
        # The stock holds obfuscators, never plaintext or key material: nothing of it reaches the job result.
        assert "obfuscator" not in json.dumps(warm["result"])
    finally:
        for party in ("brand", "partner"):
            _restart(net, party, {})


def test_one_brand_and_two_partners_train_one_model_across_real_processes(world3) -> None:  # type: ignore[no-untyped-def]
    """Multi-host: each partner matched the brand in its own match job; the brand aligns both
    (hub), the three parties train one model with the arbiter, and scoring uses both parts."""
    net, w = world3
    params = {"match_job": w["match3"], "label": "y", "guest_features": GUEST_X,
              "host_features": {"partner": HOST_X, "partner2": HOST2_X}, "test_fraction": 0.2, "seed": 42,
              "train": TRAIN}
    with net.client("brand") as c:
        job = c.post("/v1/admin/jobs", {"type": "train", "agreement_id": "vfl3-2026", "params": params})
    job = wait_job(net, "brand", job["id"], timeout=180)
    assert job["status"] == "succeeded", job.get("error")

    # Oracle: the brand's rows matched by both partners, allowed at all three nodes, in plaintext.
    b = w["brand"].set_index("lead_id")
    hosts = {"partner": ("person_id", HOST_X), "partner2": ("person_id", HOST2_X)}
    theirs = {h: {k: r for r, k in _join_keys(net, h, w["match3"][h]).items()} for h in hosts}
    mine = {h: _join_keys(net, "brand", w["match3"][h]) for h in hosts}
    rows = [r for r in b.index if r not in w["refuse"]["brand"]
            and all(r in mine[h] and mine[h][r] in theirs[h] and theirs[h][mine[h][r]] not in w["refuse"][h]
                    for h in hosts)]
    rows.sort(key=lambda r: hashlib.sha256(f"{job['id']}\x00{mine['partner'][r]}".encode()).hexdigest())
    parts = [b.loc[rows, GUEST_X].to_numpy(float)]
    for h, (key, cols) in hosts.items():
        frame = w[h].set_index(key)
        parts.append(frame.loc[[theirs[h][mine[h][r]] for r in rows], cols].to_numpy(float))
    train, test = split_indices(len(rows), 0.2, 42)
    X = _standardised(np.hstack(parts), train)
    y = b.loc[rows, "y"].to_numpy()
    plain = train_guest_only(X[train], y[train], TrainConfig(**TRAIN, seed=42, k_min=50))

    g, p1, p2 = (_private(net, party, job["id"]) for party in ("brand", "partner", "partner2"))
    assert g["rows"] == p1["rows"] == p2["rows"] == len(rows)
    assert (len(p1["model"]["weights"]), len(p2["model"]["weights"])) == (len(HOST_X), len(HOST2_X))
    fed = np.array([*g["model"]["weights"], *p1["model"]["weights"], *p2["model"]["weights"], g["model"]["intercept"]])
    ref = np.array([*plain["weights"], plain["intercept"]])
    assert g["epochs"] == plain["epochs"]
    assert np.abs(fed - ref).max() < 1e-3, np.abs(fed - ref).max()
    assert job["result"]["model"]["feature_counts"] == {"brand": len(GUEST_X), "partner": len(HOST_X),
                                                        "partner2": len(HOST2_X)}
    # Neither partner holds the other's rows, features or weights, nor labels or metrics.
    for part, other in ((p1, "q0"), (p2, "p0")):
        text = json.dumps(part)
        assert "metrics" not in part and "auc" not in text and f'"{other}"' not in text

    # Scoring with both parts: the brand's leads every partner knows get the three-party score.
    sj = _run(net, "score", "vfl3-2026", {"model": job["id"], "dataset": "leads"}, timeout=60)
    scores = {s["lead"]: s for s in _private(net, "brand", sj["id"])["scores"]}
    pos = {r: i for i, r in enumerate(rows)}
    joint = [r for r in rows if not scores[r]["partner_missing"]]
    assert len(joint) == len(rows)  # every training row is known to both partners and allowed
    for r in joint[:40]:
        u = X[pos[r]] @ fed[:-1] + fed[-1]
        assert scores[r]["score"] == pytest.approx(1 / (1 + np.exp(-u)), abs=1e-4)
    only_one = [r for r in b.index if r in scores and sum(r in mine[h] for h in hosts) == 1]
    assert only_one and all(scores[r]["partner_missing"] for r in only_one)
