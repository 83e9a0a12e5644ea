"""Bad input to vertical training gives clear errors before anything is encrypted or sent, and
`confide train local` works end to end (one small 2048-bit run, the CLI refuses shorter keys).

Role-level tests use 1024-bit keys (`allow_short_keys`): they check validation, not key strength.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from confide.errors import ProtocolError, ValidationError
from federated import messages as m
from federated import paillier as pl
from federated import roles as R
from federated.local import align_ids, load_party_frame

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "fate"
CFG = R.TrainConfig(key_bits=1024, allow_short_keys=True, batch_size=64, max_epochs=2)


def _data(n: int = 200, fg: int = 3, fh: int = 4, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"ids": [f"id{i:04d}" for i in range(n)], "Xg": rng.normal(size=(n, fg)), "Xh": rng.normal(size=(n, fh)),
            "y": (rng.random(n) < 0.4).astype(float)}


def _guest(d: dict[str, Any], cfg: R.TrainConfig = CFG, **kw: Any) -> R.GuestRole:
    args = dict(join_keys=d["ids"], hosts=["p1"], arbiter="coord")
    args.update(kw)
    return R.GuestRole("brand", "j", cfg, d["Xg"], d["y"], **args)


def _host(d: dict[str, Any], cfg: R.TrainConfig = CFG, **kw: Any) -> R.HostRole:
    args = dict(join_keys=d["ids"], guest="brand", hosts=["p1"], arbiter="coord")
    args.update(kw)
    return R.HostRole("p1", "j", cfg, d["Xh"], **args)


def test_non_binary_or_single_class_labels_are_refused() -> None:
    d = _data()
    d["y"][3] = 2.0
    with pytest.raises(ValidationError, match="binary"):
        _guest(d)
    d["y"][:] = 1.0
    with pytest.raises(ValidationError, match="single class"):
        _guest(d)


def test_missing_or_non_numeric_features_are_refused() -> None:
    d = _data()
    d["Xh"][5, 2] = np.nan
    with pytest.raises(ValidationError, match="row 5, column 2"):
        _host(d)
    with pytest.raises(ValidationError, match="numeric"):
        R.check_features([["a", "b"], ["c", "d"]], "host")
    with pytest.raises(ValidationError, match="join keys"):
        _guest(_data(), join_keys=["x"])


def test_short_keys_need_the_test_only_switch() -> None:
    with pytest.raises(ValidationError, match="2048"):
        _guest(_data(), R.TrainConfig(key_bits=1024))


def _handshake(g: R.GuestRole, h: R.HostRole, keypair: Any) -> None:
    a = R.ArbiterRole("coord", "j", CFG, guest="brand", hosts=["p1"], rows=g.n, keypair=keypair)
    [(_, key), _] = a.start()
    out_h = h.handle(m.decode(m.encode(key)))
    g.handle(m.decode(m.encode(key)))
    hello = next(x for to, x in out_h if isinstance(x, m.PartyHello))
    g.handle(hello)


@pytest.fixture(scope="module")
def keypair() -> Any:
    return pl.generate_keypair(1024)


def test_mismatched_join_keys_are_detected(keypair: Any) -> None:
    d = _data(n=120)
    g = _guest(d)
    other = dict(d, ids=[f"other{i}" for i in range(120)])
    h = _host(other)
    with pytest.raises(ValidationError, match="not aligned"):
        _handshake(g, h, keypair)


def test_runs_that_would_leak_labels_are_refused(keypair: Any) -> None:
    # fewer rows than features
    d = _data(n=60, fg=40, fh=40)
    cfg = R.TrainConfig(key_bits=1024, allow_short_keys=True, batch_size=0, k_min=10)
    g, h = _guest(d, cfg), _host(d, cfg)
    with pytest.raises(ValidationError, match="more rows than features"):
        R.check_leakage_guards(g.n, g.batches, 81, cfg.k_min)
    # below k_min
    with pytest.raises(ValidationError, match="k_min"):
        R.check_leakage_guards(40, [np.arange(40)], 5, 50)
    # batches no bigger than the features: the host could solve X^T d for the residuals
    with pytest.raises(ValidationError, match="batch"):
        R.check_leakage_guards(1000, R.make_batches(1000, 20, 1), 30, 10)
    with pytest.raises(ValidationError, match="k_min"):
        R.train_guest_only(d["Xg"][:30], d["y"][:30], CFG)
    del h


def test_out_of_order_foreign_and_replayed_messages_are_refused(keypair: Any) -> None:
    d = _data(n=120)
    h = _host(d)
    with pytest.raises(ProtocolError):
        h.handle(m.DecryptReply(job_id="j", sender="coord", epoch=0, batch=0, data=b"\x00" * 128))
    with pytest.raises(ProtocolError, match="job"):
        h.handle(m.ArbiterKey(job_id="other", sender="coord", n=str(keypair[0].n), key_bits=1024,
                              config_digest=CFG.digest()))
    with pytest.raises(ProtocolError):
        h.handle(m.EpochDone(job_id="j", sender="brand", epoch=0, loss=0.1, stop=True))
    a = R.ArbiterRole("coord", "j", CFG, guest="brand", hosts=["p1"], rows=120, keypair=keypair)
    a.start()
    pub = keypair[0]
    req = m.DecryptRequest(job_id="j", sender="p1", epoch=0, batch=0, data=pl.to_bytes([5], pub.cipher_bytes))
    assert len(a.handle(req)) == 1
    with pytest.raises(ProtocolError, match="replay"):
        a.handle(req)
    with pytest.raises(ProtocolError, match="ciphertexts"):
        a.handle(m.DecryptRequest(job_id="j", sender="brand", epoch=0, batch=0,
                                  data=pl.to_bytes([5] * 9, pub.cipher_bytes)))
    with pytest.raises(ProtocolError, match="not a party"):
        a.handle(m.LossShare(job_id="j", sender="mallory", epoch=0, share="1"))


def test_config_mismatch_is_refused(keypair: Any) -> None:
    d = _data(n=120)
    g = _guest(d)
    h = _host(d, R.TrainConfig(key_bits=1024, allow_short_keys=True, batch_size=64, max_epochs=3))
    with pytest.raises(ValidationError, match="configuration"):
        _handshake(g, h, keypair)


def test_csv_loading_names_the_problem(tmp_path: Path) -> None:
    g = tmp_path / "g.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "y": [0, 1, 0], "x": [1.0, None, 2.0]}).to_csv(g, index=False)
    with pytest.raises(ValidationError, match="missing values in feature column"):
        load_party_frame(g, "id", ["a", "b", "c"], "y")
    pd.DataFrame({"id": ["a", "b", "c"], "y": ["yes", "no", "yes"], "x": [1.0, 2.0, 3.0]}).to_csv(g, index=False)
    with pytest.raises(ValidationError, match="binary"):
        load_party_frame(g, "id", ["a", "b", "c"], "y")
    pd.DataFrame({"id": ["a", "b", "c"], "y": [0, 1, 0], "x": ["u", "v", "w"]}).to_csv(g, index=False)
    with pytest.raises(ValidationError, match="non-numeric"):
        load_party_frame(g, "id", ["a", "b", "c"], "y")
    with pytest.raises(ValidationError, match="label column"):
        load_party_frame(g, "id", ["a", "b", "c"], "target")
    h = tmp_path / "h.csv"
    pd.DataFrame({"id": ["a", "a"], "x": [1, 2]}).to_csv(h, index=False)
    with pytest.raises(ValidationError, match="unique"):
        align_ids([g, h], "id", 1)
    pd.DataFrame({"id": ["q", "r"], "x": [1, 2]}).to_csv(h, index=False)
    with pytest.raises(ValidationError, match="same ids"):
        align_ids([g, h], "id", 1)
    with pytest.raises(ValidationError, match="no id column"):
        align_ids([g, h], "key", 1)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "confide", "train", "local", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_labels_exit_code(tmp_path: Path) -> None:
    g = tmp_path / "g.csv"
    h = tmp_path / "h.csv"
    pd.DataFrame({"id": range(100), "y": [0, 1, 2, 3] * 25, "x": range(100)}).to_csv(g, index=False)
    pd.DataFrame({"id": range(100), "z": range(100)}).to_csv(h, index=False)
    r = _cli("--guest", str(g), "--host", str(h), "--id", "id", "--label", "y", "--json")
    assert r.returncode == 2, r.stderr
    assert "binary" in r.stderr


def test_cli_trains_breast_subset_and_reports_json(tmp_path: Path) -> None:
    """A 2048-bit run on 200 of the breast rows (full batch, 3 epochs)."""
    g = pd.read_csv(DATA / "breast_hetero_guest.csv").head(200)
    h = pd.read_csv(DATA / "breast_hetero_host.csv")
    g.to_csv(tmp_path / "g.csv", index=False)
    h.to_csv(tmp_path / "h.csv", index=False)
    r = _cli("--guest", str(tmp_path / "g.csv"), "--host", str(tmp_path / "h.csv"), "--id", "id", "--label", "y",
             "--batch-size", "0", "--max-epochs", "3", "--workers", "1", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    for k in ("auc", "guest_only_auc", "epochs", "seconds_per_epoch", "key_bits", "ks", "pr_auc", "lift_top_decile"):
        assert k in rep
    assert rep["key_bits"] == 2048 and rep["epochs"] == 3 and rep["matched_rows"] == 200
    assert rep["auc"] > 0.9 and rep["guest_only_auc"] > 0.9


def test_precomputed_obfuscators_cover_the_setup_and_change_nothing_else(tmp_path: Path) -> None:
    """`run_local(precompute=True)`: the arbiter key exists before the job (as the
    coordinator's per-agreement key does), each party computes exactly the r^n its setup
    needs, the setup then computes none, and the model is the one a cold run trains."""
    from federated.local import run_local
    from federated.roles import TrainConfig

    g = pd.read_csv(DATA / "breast_hetero_guest.csv").head(160)
    h = pd.read_csv(DATA / "breast_hetero_host.csv")
    g.to_csv(tmp_path / "g.csv", index=False)
    h.to_csv(tmp_path / "h.csv", index=False)
    cfg = TrainConfig(key_bits=1024, allow_short_keys=True, batch_size=0, max_epochs=3, seed=7)
    runs = {pre: run_local(tmp_path / "g.csv", [tmp_path / "h.csv"], id_col="id", label="y", seed=7, config=cfg,
                           workers=1, precompute=pre) for pre in (False, True)}
    cold, warm = runs[False], runs[True]
    assert cold["obfuscators_from_stock"] == 0 and "precompute_seconds" in cold and cold["stocked"] == 0
    # Guest (irls): one ciphertext per row group plus [[s_i]] per row, all from the stock.
    assert warm["stocked"] == warm["encrypted"] == cold["encrypted"] > 128  # 128 training rows
    assert warm["obfuscators_from_stock"] >= warm["encrypted"]
    host = warm["host_timings"][0]
    assert host["obfuscators_from_stock"] >= host["encrypted"] > 0
    assert warm["precompute_seconds"] > 0 and 0 < warm["wall_after_precompute_seconds"] < warm["wall_seconds"]
    assert warm["losses"] == pytest.approx(cold["losses"], abs=1e-12)
    assert warm["model"]["weights"] == pytest.approx(cold["model"]["weights"], abs=1e-12)
    assert warm["auc"] == cold["auc"]
