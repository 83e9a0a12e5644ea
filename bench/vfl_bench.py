"""Vertical federated LR on default_credit: Confide vs a FATE-style plain-phe implementation vs
centralised scikit-learn, in one run, on the same split.

    python bench/vfl_bench.py [--loss irls|taylor] [--max-epochs 30] [--fate-rows 256] [--results bench/RESULTS.md] [--json]

(a) Confide: `federated.local.run_local` — guest, host and arbiter as separate processes over
    pipes, 2048-bit keys, all cores, with the chosen loss (default irls).
(b) FATE-style on plain `phe`: one ciphertext per value, phe's default encoding, one core, in
    one process (communication not counted, which favours it). Per mini-batch: the host
    encrypts [[u_h]] and [[u_h^2]], the guest forms [[d]] = 0.25([[u_h]] + u_g) - 0.5 y', both
    compute X^T[[d]] value by value, mask, and the arbiter decrypts the gradients and the loss.
    It is far too slow to run an epoch here, so `--fate-rows` rows of one batch are timed and
    the per-row cost is extrapolated linearly to an epoch, plus the per-batch fixed cost
    (masking and decryption) times the number of batches. The extrapolation is stated in the
    output.
(c) scikit-learn LogisticRegression on the pooled features, same train/test split.
Also reported: the Taylor-loss and the IRLS-surrogate mini-batch schedules in plaintext on pooled
data (the protocols' exact-arithmetic oracles), to separate approximation error from protocol error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federated import roles as R  # noqa: E402
from federated.local import align_ids, load_party_frame, run_local  # noqa: E402
from federated.metrics import evaluate  # noqa: E402

DATA = Path(os.environ.get("CONFIDE_FATE_DATA", "/work/shared/data/fate"))
GUEST = DATA / "default_credit_hetero_guest.csv"
HOST = DATA / "default_credit_hetero_host.csv"


def _machine() -> dict[str, object]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import gmpy2
    import phe

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "gmpy2": gmpy2.version(), "phe": getattr(phe, "__version__", "1.5.0")}


def pooled(seed: int, test_fraction: float, k_min: int) -> dict[str, np.ndarray]:
    ids = align_ids([GUEST, HOST], "id", k_min)
    Xg, y, _ = load_party_frame(GUEST, "id", ids, "y")
    Xh, _, _ = load_party_frame(HOST, "id", ids, None)
    assert y is not None
    tr, te = R.split_indices(len(ids), test_fraction, seed)
    return {"Xg": Xg, "Xh": Xh, "y": y, "train": tr, "test": te}


def sklearn_baseline(d: dict[str, np.ndarray]) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    X = np.hstack([d["Xg"], d["Xh"]])
    tr, te, y = d["train"], d["test"], d["y"]
    t = time.perf_counter()
    lr = LogisticRegression(max_iter=2000).fit(X[tr], y[tr])
    pooled_auc = evaluate(y[te], lr.predict_proba(X[te])[:, 1])["auc"]
    g = LogisticRegression(max_iter=2000).fit(d["Xg"][tr], y[tr])
    g_auc = evaluate(y[te], g.predict_proba(d["Xg"][te])[:, 1])["auc"]
    return {"auc": pooled_auc, "guest_only_auc": g_auc, "seconds": time.perf_counter() - t}


def taylor_oracle(d: dict[str, np.ndarray], cfg: R.TrainConfig) -> dict[str, float]:
    """The protocol's arithmetic in plaintext on pooled features (same batches, schedule, stop)."""
    X = np.hstack([d["Xg"], np.ones((len(d["y"]), 1)), d["Xh"]])
    tr, te, y = d["train"], d["test"], d["y"]
    Xt, yt = X[tr], y[tr]
    batches = R.make_batches(len(tr), cfg.batch_size, cfg.seed)
    w = np.zeros(X.shape[1])
    losses: list[float] = []
    for epoch in range(cfg.max_epochs):
        total = 0.0
        for b in R._hash_order(len(batches), cfg.seed, f"epoch:{epoch}"):
            idx = batches[int(b)]
            u = Xt[idx] @ w
            total += float(np.sum(np.log(2) + (0.5 - yt[idx]) * u + 0.125 * u * u))
            w = w - cfg.lr(epoch) * (Xt[idx].T @ (0.25 * u + 0.5 - yt[idx]) / len(idx))
        losses.append(total / len(tr))
        if len(losses) >= 2 and abs(losses[-2] - losses[-1]) < cfg.tol:
            break
    return {"auc": evaluate(y[te], X[te] @ w)["auc"], "epochs": len(losses)}


def irls_oracle(d: dict[str, np.ndarray], cfg: R.TrainConfig) -> dict[str, float]:
    """The IRLS surrogate in plaintext on pooled features: expanded at the guest-only exact LR
    (its logits a), started there with the host weights at 0, same batches, schedule, stop."""
    tr, te, y = d["train"], d["test"], d["y"]
    Xg = np.hstack([d["Xg"], np.ones((len(y), 1))])
    Xh = d["Xh"]
    fit = R.fit_exact_lr(Xg[tr], y[tr], cfg.l2)
    a = fit["logits"]
    p = 1.0 / (1.0 + np.exp(-a))
    s = p * (1.0 - p)
    X = np.hstack([Xg, Xh])[tr]
    yt = y[tr]
    w = np.r_[fit["w"], np.zeros(Xh.shape[1])]
    batches = R.make_batches(len(tr), cfg.batch_size, cfg.seed)
    losses: list[float] = []
    for epoch in range(cfg.max_epochs):
        total = 0.0
        for b in R._hash_order(len(batches), cfg.seed, f"epoch:{epoch}"):
            idx = batches[int(b)]
            r = X[idx] @ w - a[idx]
            total += float(np.sum(np.logaddexp(0, a[idx]) - yt[idx] * a[idx] + (p[idx] - yt[idx]) * r
                                  + 0.5 * s[idx] * r * r))
            w = w - cfg.lr(epoch) * (X[idx].T @ (p[idx] - yt[idx] + s[idx] * r) / len(idx))
        losses.append(total / len(tr))
        if len(losses) >= 2 and abs(losses[-2] - losses[-1]) < cfg.tol:
            break
    return {"auc": evaluate(y[te], np.hstack([Xg, Xh])[te] @ w)["auc"], "epochs": len(losses),
            "guest_only_auc": evaluate(y[te], Xg[te] @ fit["w"])["auc"]}


def fate_style(d: dict[str, np.ndarray], cfg: R.TrainConfig, rows: int) -> dict[str, float]:
    """Time `rows` rows of one FATE-style mini-batch on plain phe, one core; extrapolate."""
    from phe import paillier

    pk, sk = paillier.generate_paillier_keypair(n_length=cfg.key_bits)
    tr = d["train"]
    batches = R.make_batches(len(tr), cfg.batch_size, cfg.seed)
    idx = tr[batches[0][:rows]]
    Xg = np.hstack([d["Xg"][idx], np.ones((len(idx), 1))])
    Xh = d["Xh"][idx]
    ypm = 2.0 * d["y"][idx] - 1.0
    rng = np.random.default_rng(0)
    wg, wh = rng.normal(0, 0.1, Xg.shape[1]), rng.normal(0, 0.1, Xh.shape[1])

    def xt_d(X: np.ndarray, enc_d: list) -> list:
        out = []
        for j in range(X.shape[1]):
            acc = enc_d[0] * float(X[0, j])
            for i in range(1, len(enc_d)):
                acc = acc + enc_d[i] * float(X[i, j])
            out.append(acc)
        return out

    t0 = time.perf_counter()
    uh = Xh @ wh
    enc_uh = [pk.encrypt(float(v)) for v in uh]  # host -> guest
    enc_uh2 = [pk.encrypt(float(v * v)) for v in uh]  # for the loss
    ug = Xg @ wg
    enc_d = [(e + float(g)) * 0.25 - 0.5 * float(yy) for e, g, yy in zip(enc_uh, ug, ypm)]  # guest -> host
    enc_gg = xt_d(Xg, enc_d)
    enc_gh = xt_d(Xh, enc_d)
    enc_loss = None
    for e, e2, g, yy in zip(enc_uh, enc_uh2, ug, ypm):
        term = e * float(-0.5 * yy + 0.25 * g) + e2 * 0.125 + float(np.log(2) - 0.5 * yy * g + 0.125 * g * g)
        enc_loss = term if enc_loss is None else enc_loss + term
    t_rows = time.perf_counter() - t0
    t1 = time.perf_counter()
    masked = [c + float(m) for c, m in zip(enc_gg + enc_gh + [enc_loss], rng.normal(0, 1e3, 25))]
    _ = [sk.decrypt(c) for c in masked]  # the arbiter
    t_batch = time.perf_counter() - t1
    epoch = t_rows * (len(tr) / len(idx)) + t_batch * len(batches)
    return {"rows_timed": len(idx), "seconds_rows": t_rows, "seconds_per_batch_fixed": t_batch,
            "batches_per_epoch": len(batches), "train_rows": len(tr), "seconds_per_epoch_extrapolated": epoch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--learning-rate", type=float, default=None, help="default: 1.0 irls, 0.3 taylor")
    ap.add_argument("--loss", choices=["irls", "taylor"], default="irls")
    ap.add_argument("--key-bits", type=int, default=2048)
    ap.add_argument("--fate-rows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mode", choices=["cold", "precompute", "both"], default="both",
                    help="cold: every r^n computed at setup; precompute: the parties compute them before the job "
                         "(the arbiter key exists ahead, as the coordinator's per-agreement key does, and nodes "
                         "stock obfuscators while idle); both: one after the other")
    a = ap.parse_args()
    cfg = R.TrainConfig(key_bits=a.key_bits, batch_size=a.batch_size, max_epochs=a.max_epochs, loss=a.loss,
                        learning_rate=a.learning_rate, seed=a.seed)
    taylor_cfg = cfg.model_copy(update={"loss": "taylor"})
    irls_cfg = cfg.model_copy(update={"loss": "irls"})
    load0 = os.getloadavg()
    started = dt.datetime.now(dt.timezone.utc)
    d = pooled(a.seed, 0.2, cfg.k_min)
    sk = sklearn_baseline(d)
    oracle = taylor_oracle(d, taylor_cfg)
    irls = irls_oracle(d, irls_cfg)
    print(f"(c) sklearn pooled AUC {sk['auc']:.4f} (guest-only {sk['guest_only_auc']:.4f}); "
          f"Taylor plaintext oracle AUC {oracle['auc']:.4f} in {oracle['epochs']} epochs (lr {taylor_cfg.base_lr}); "
          f"IRLS plaintext oracle AUC {irls['auc']:.4f} in {irls['epochs']} epochs (lr {irls_cfg.base_lr})", flush=True)
    fate = fate_style(d, cfg, a.fate_rows)
    print(f"(b) FATE-style plain phe: {fate['rows_timed']} rows in {fate['seconds_rows']:.1f} s -> "
          f"~{fate['seconds_per_epoch_extrapolated']:.0f} s/epoch (extrapolated)", flush=True)
    load1 = os.getloadavg()
    runs = {}
    for mode in (["cold", "precompute"] if a.mode == "both" else [a.mode]):
        t = time.perf_counter()
        runs[mode] = run_local(GUEST, [HOST], id_col="id", label="y", test_fraction=0.2, seed=a.seed, config=cfg,
                               workers=a.workers, precompute=mode == "precompute")
        runs[mode]["bench_wall_seconds"] = time.perf_counter() - t
        r = runs[mode]
        extra = (f"; precompute {r['precompute_seconds']:.1f} s guest / {r['host_precompute_seconds'][0]:.1f} s host, "
                 f"then {r['wall_after_precompute_seconds']:.1f} s to the model" if mode == "precompute" else "")
        print(f"(a) Confide [{mode}] AUC {r['auc']:.4f} (guest-only {r['guest_only_auc']:.4f}), {r['epochs']} epochs, "
              f"{r['seconds_per_epoch']:.2f} s/epoch, setup {r['setup_seconds']:.1f} s, wall {r['bench_wall_seconds']:.1f} s"
              f"{extra}", flush=True)
    conf = runs.get("cold") or runs["precompute"]
    conf_wall = conf["bench_wall_seconds"]
    load2 = os.getloadavg()
    res = {
        "date": started.isoformat(timespec="seconds"), "machine": _machine(),
        "loadavg": {"start": load0, "before_confide": load1, "after_confide": load2},
        "config": cfg.model_dump(), "confide": {k: v for k, v in conf.items() if k not in ("calibration", "model")},
        "fate_style": fate, "sklearn": sk, "taylor_oracle": oracle, "irls_oracle": irls,
        "confide_wall_seconds": conf_wall, "base_lr": cfg.base_lr, "mode": a.mode,
        "precompute": ({k: v for k, v in runs["precompute"].items() if k not in ("calibration", "model")}
                       if "precompute" in runs else None),
    }
    res["speedup_epoch"] = fate["seconds_per_epoch_extrapolated"] / max(conf["seconds_per_epoch"], 1e-9)
    res["auc_gap_vs_sklearn"] = sk["auc"] - conf["auc"]
    if a.json:
        print(json.dumps(res, indent=2, default=str))
    if not a.no_write:
        append_results(a.results, res)


def _precompute_row(p: dict, loss: str) -> str:
    hp = p.get("host_precompute_seconds") or [0.0]
    return (f"| (a) Confide, loss={loss}, obfuscators precomputed (idle-time stock) | {p['auc']:.4f} | "
            f"{p['guest_only_auc']:.4f} | {p['seconds_per_epoch']:.2f} | before the job: guest {p['precompute_seconds']:.0f} s "
            f"for {p['stocked']:,} r^n, host {hp[0]:.0f} s (side by side on these cores); job: setup "
            f"{p['setup_seconds']:.0f} s, {p['epochs']} epochs; **{p['wall_after_precompute_seconds']:.0f} s from the "
            f"start of the job to the model** (wall incl. precompute {p['bench_wall_seconds']:.0f} s) |")


def append_results(path: Path, r: dict) -> None:
    c, f, s, o, ir = r["confide"], r["fate_style"], r["sklearn"], r["taylor_oracle"], r["irls_oracle"]
    loss = r["config"]["loss"]
    oc = ir if loss == "irls" else o
    hosts = c.get("host_timings") or [{}]
    h0 = hosts[0]
    la = r["loadavg"]
    fmt = functools.partial(lambda x: " / ".join(f"{v:.2f}" for v in x))
    lines = [
        "",
        f"## Vertical federated LR, loss={loss} (default_credit, {r['date']})",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores shared with other workers; "
        f"Python {r['machine']['python']}, gmpy2 {r['machine']['gmpy2']}, phe {r['machine']['phe']}. "
        f"Load average (1/5/15 min) at start {fmt(la['start'])}, before Confide {fmt(la['before_confide'])}, "
        f"after {fmt(la['after_confide'])}.",
        f"Data: {c['train_rows']:,} training / {c['test_rows']:,} held-out rows (seed {r['config']['seed']}), "
        f"13+1 guest and 10 host features. Keys {c['key_bits']} bits. Batch {r['config']['batch_size']} "
        f"({c['batches_per_epoch']} per epoch), lr {r['base_lr']}/(1+{r['config']['lr_decay']}e), "
        f"tol {r['config']['tol']}, max {r['config']['max_epochs']} epochs.",
        "",
        "| | held-out AUC | guest-only AUC | s / epoch | other time |",
        "|---|---|---|---|---|",
        f"| (a) Confide, loss={loss} (3 processes, pipes, all cores{'; the precompute run' if r.get('mode') == 'precompute' else ''}) | {c['auc']:.4f} | {c['guest_only_auc']:.4f} | "
        f"{c['seconds_per_epoch']:.2f} | setup {c['setup_seconds']:.0f} s (guest encrypts {c.get('guest_encrypt_seconds', 0):.0f} s, "
        f"host encrypts {h0.get('encrypt_s', 0):.0f} s, host [[s x]] rows {h0.get('weighted_rows_s', 0):.0f} s); "
        f"{c['epochs']} epochs ({c['stop_reason']}); wall {r['confide_wall_seconds']:.0f} s |",
        *([] if r.get("precompute") is None else [_precompute_row(r["precompute"], loss)]),
        f"| (b) FATE-style, plain phe, 1 core | not run to convergence | | ~{f['seconds_per_epoch_extrapolated']:.0f} "
        f"(extrapolated from {f['rows_timed']} rows of one batch: {f['seconds_rows']:.1f} s, + {f['seconds_per_batch_fixed']:.2f} s "
        f"fixed per batch x {f['batches_per_epoch']}) | no setup |",
        f"| (c) scikit-learn LR, pooled | {s['auc']:.4f} | {s['guest_only_auc']:.4f} | | {s['seconds']:.1f} s |",
        f"| guest alone, exact LR at the guest (`guest_only_exact_lr_auc`) | | "
        f"{c.get('guest_only_exact_lr_auc', float('nan')):.4f} | | |",
        f"| Taylor-loss schedule in plaintext, pooled (oracle) | {o['auc']:.4f} | | | {o['epochs']} epochs |",
        f"| IRLS-surrogate schedule in plaintext, pooled (oracle) | {ir['auc']:.4f} | {ir['guest_only_auc']:.4f} | | "
        f"{ir['epochs']} epochs |",
        "",
        f"Epoch speed-up (b)/(a): {r['speedup_epoch']:.0f}x. AUC gap (c) - (a): {r['auc_gap_vs_sklearn']:+.4f} "
        f"(Taylor oracle gap {s['auc'] - o['auc']:+.4f}, IRLS oracle gap {s['auc'] - ir['auc']:+.4f}; "
        f"Confide vs its oracle {c['auc'] - oc['auc']:+.5f}). Arbiter decrypted {c['arbiter_decrypted_values']} masked values in total.",
        "",
    ]
    if path.exists():
        text = path.read_text()
    else:
        text = "# Benchmark results\n"
    path.write_text(text.rstrip("\n") + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
