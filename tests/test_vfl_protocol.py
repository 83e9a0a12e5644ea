"""Vertical LR protocol: against a plaintext oracle, with two hosts, resumed after a restart,
and what every party receives (the leakage tests).

Keys are 1024 bits here (`allow_short_keys`): these tests are about protocol logic and leakage,
not key strength; production configurations refuse keys below 2048 bits. Every message goes
through its wire form (`federated.inmemory`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from federated import messages as m
from federated import paillier as pl
from federated import roles as R
from federated.inmemory import run_in_memory

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fate"
JOB = "job-vfl-test"


@pytest.fixture(scope="module")
def breast() -> dict[str, Any]:
    g = pd.read_csv(DATA / "breast_hetero_guest.csv", dtype={"id": str})
    h = pd.read_csv(DATA / "breast_hetero_host.csv", dtype={"id": str})
    # 320 of the 569 rows keep the suite fast; the batches stay well above features and k_min.
    d = g.merge(h, on="id", suffixes=("_g", "_h")).sort_values("id").head(320)
    gcols = [c for c in g.columns if c not in ("id", "y")]
    hcols = [c for c in h.columns if c != "id"]
    rename_g = {c: (c + "_g" if c in hcols else c) for c in gcols}
    rename_h = {c: (c + "_h" if c in gcols else c) for c in hcols}
    return {"ids": d["id"].tolist(), "y": d["y"].to_numpy(float),
            "Xg": d[[rename_g[c] for c in gcols]].to_numpy(float),
            "Xh": d[[rename_h[c] for c in hcols]].to_numpy(float)}


@pytest.fixture(scope="module")
def keypair() -> tuple[pl.PublicKey, pl.PrivateKey]:
    return pl.generate_keypair(1024)


def _cfg(**kw: Any) -> R.TrainConfig:
    base = dict(key_bits=1024, allow_short_keys=True, batch_size=128, max_epochs=3, learning_rate=0.3, tol=0.0,
                loss="taylor")
    base.update(kw)
    return R.TrainConfig(**base)


def _roles(data: dict[str, Any], cfg: R.TrainConfig, keypair: Any, host_blocks: list[np.ndarray]) -> dict[str, Any]:
    hosts = [f"p{i + 1}" for i in range(len(host_blocks))]
    roles: dict[str, Any] = {
        "brand": R.GuestRole("brand", JOB, cfg, data["Xg"], data["y"], join_keys=data["ids"], hosts=hosts, arbiter="coord"),
        "coord": R.ArbiterRole("coord", JOB, cfg, guest="brand", hosts=hosts, rows=len(data["ids"]), keypair=keypair),
    }
    for name, X in zip(hosts, host_blocks):
        roles[name] = R.HostRole(name, JOB, cfg, X, join_keys=data["ids"], guest="brand", hosts=hosts, arbiter="coord")
    return roles


def _oracle(Xg: np.ndarray, y: np.ndarray, Xh: np.ndarray, cfg: R.TrainConfig) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The same Taylor-loss mini-batch schedule in plaintext on pooled features."""
    Xga = np.hstack([Xg, np.ones((len(y), 1))])
    wg, wh = np.zeros(Xga.shape[1]), np.zeros(Xh.shape[1])
    batches = R.make_batches(len(y), cfg.batch_size, cfg.seed)
    losses = []
    for epoch in range(cfg.max_epochs):
        total = 0.0
        for b in R._hash_order(len(batches), cfg.seed, f"epoch:{epoch}"):
            idx = batches[int(b)]
            u = Xga[idx] @ wg + Xh[idx] @ wh
            total += float(np.sum(np.log(2) + (0.5 - y[idx]) * u + 0.125 * u * u))
            d = 0.25 * u + 0.5 - y[idx]
            wg = wg - cfg.lr(epoch) * Xga[idx].T @ d / len(idx)
            wh = wh - cfg.lr(epoch) * Xh[idx].T @ d / len(idx)
        losses.append(total / len(y))
    return wg, wh, losses


@pytest.fixture(scope="module")
def run1(breast: dict[str, Any], keypair: Any) -> dict[str, Any]:
    """One guest, one host, 3 epochs of 2 batches; every delivered message recorded."""
    cfg = _cfg()
    roles = _roles(breast, cfg, keypair, [breast["Xh"]])
    seen: dict[str, list[m._Msg]] = defaultdict(list)
    masks: list[tuple[str, list[int]]] = []

    def tap(to: str, msg: m._Msg) -> None:
        seen[to].append(msg)
        if isinstance(msg, m.DecryptRequest):
            masks.append((msg.sender, list(roles[msg.sender].cur.masks)))

    count = run_in_memory(roles, roles["coord"].start(), tap=tap)
    return {"roles": roles, "seen": seen, "cfg": cfg, "count": count, "masks": masks}


def test_weights_and_loss_equal_plaintext_oracle(breast: dict[str, Any], run1: dict[str, Any]) -> None:
    roles, cfg = run1["roles"], run1["cfg"]
    wg, wh, losses = _oracle(breast["Xg"], breast["y"], breast["Xh"], cfg)
    assert roles["brand"].done and roles["p1"].done
    assert np.allclose(roles["brand"].w, wg, atol=1e-5, rtol=0)
    assert np.allclose(roles["p1"].w, wh, atol=1e-5, rtol=0)
    assert np.allclose(roles["brand"].losses, losses, atol=1e-6)
    assert roles["coord"].losses == roles["brand"].losses == roles["p1"].losses


def test_gradients_equal_plaintext_gradients(breast: dict[str, Any], keypair: Any) -> None:
    """Full batch, 2 epochs: (w1 - w2) / lr is the protocol's gradient at w1."""
    cfg = _cfg(batch_size=0, max_epochs=2)
    roles = _roles(breast, cfg, keypair, [breast["Xh"]])
    after_first: dict[str, np.ndarray] = {}

    def tap(to: str, msg: m._Msg) -> None:
        if isinstance(msg, m.EpochDone) and msg.epoch == 0 and to in ("brand", "p1"):
            after_first[to] = roles[to].w.copy()

    run_in_memory(roles, roles["coord"].start(), tap=tap)
    g_fed = (after_first["brand"] - roles["brand"].w) / cfg.lr(1)
    h_fed = (after_first["p1"] - roles["p1"].w) / cfg.lr(1)
    Xga = np.hstack([breast["Xg"], np.ones((len(breast["y"]), 1))])
    u = Xga @ after_first["brand"] + breast["Xh"] @ after_first["p1"]
    d = 0.25 * u + 0.5 - breast["y"]
    g_plain, h_plain = Xga.T @ d / len(d), breast["Xh"].T @ d / len(d)
    # fixed-point: features at 2^-16, residuals at 2^-20 -> about 1e-5 relative per product
    assert np.allclose(g_fed, g_plain, atol=1e-5, rtol=1e-4)
    assert np.allclose(h_fed, h_plain, atol=1e-5, rtol=1e-4)


def test_two_hosts_equal_plaintext_oracle(breast: dict[str, Any], keypair: Any) -> None:
    cfg = _cfg(max_epochs=2)
    blocks = [breast["Xh"][:, :12], breast["Xh"][:, 12:]]
    roles = _roles(breast, cfg, keypair, blocks)
    run_in_memory(roles, roles["coord"].start())
    wg, wh, _ = _oracle(breast["Xg"], breast["y"], breast["Xh"], cfg)
    assert np.allclose(roles["brand"].w, wg, atol=1e-5, rtol=0)
    assert np.allclose(np.r_[roles["p1"].w, roles["p2"].w], wh, atol=1e-5, rtol=0)


def crash_mid_epoch_1(roles: dict[str, Any]) -> dict[str, Any]:
    """Run `roles` until every party has snapshotted epoch 0 (and the arbiter its state at epoch
    1), then kill them all mid-epoch 1; returns the snapshots (shared with test_vfl_irls)."""
    snaps: dict[str, Any] = {}

    class Crash(Exception):
        pass

    class Snapshotting:
        def __init__(self, name: str) -> None:
            self.name = name

        def handle(self, msg: m._Msg) -> list[R.Outgoing]:
            out = roles[self.name].handle(msg)
            if isinstance(msg, m.EpochDone) and msg.epoch == 0:
                snaps[self.name] = roles[self.name].snapshot()
            if isinstance(msg, m.LossShare) and roles["coord"].epoch == 1 and "coord" not in snaps:
                snaps["coord"] = roles["coord"].snapshot()
            if len(snaps) == 3 and isinstance(msg, m.DecryptRequest):
                raise Crash()  # every node dies mid-epoch 1
            return out

    with pytest.raises(Crash):
        run_in_memory({n: Snapshotting(n) for n in roles}, roles["coord"].start())
    return snaps


def resume_and_compare(fresh: dict[str, Any], snaps: dict[str, Any], done: dict[str, Any]) -> None:
    """Restore new roles from the snapshots, finish training, compare with the uninterrupted run."""
    fresh["coord"].restore(snaps["coord"])
    first = fresh["brand"].restore(snaps["brand"]) + fresh["p1"].restore(snaps["p1"])
    run_in_memory(fresh, first)
    assert np.allclose(fresh["brand"].w, done["brand"].w, atol=1e-9)
    assert np.allclose(fresh["p1"].w, done["p1"].w, atol=1e-9)
    assert fresh["brand"].losses == pytest.approx(done["brand"].losses, abs=1e-9)


def test_resume_after_restart_gives_the_same_model(breast: dict[str, Any], keypair: Any, run1: dict[str, Any]) -> None:
    cfg = run1["cfg"]
    snaps = crash_mid_epoch_1(_roles(breast, cfg, keypair, [breast["Xh"]]))
    resume_and_compare(_roles(breast, cfg, None, [breast["Xh"]]), snaps, run1["roles"])


# ------------------------------------------------------------------------------------ leakage


def test_arbiter_receives_only_masked_aggregates(run1: dict[str, Any], keypair: Any) -> None:
    pub, priv = keypair
    seen, masks = run1["seen"]["coord"], run1["masks"]
    assert {x.kind for x in seen} <= {"decrypt_request", "loss_share", "score_share"}
    requests = [x for x in seen if isinstance(x, m.DecryptRequest)]
    assert len(requests) == len(masks) == 2 * 3 * 2  # two parties x 3 epochs x 2 batches
    for req, (owner, owner_masks) in zip(requests, masks):
        assert req.sender == owner
        cs = pl.from_bytes(req.data, pub.cipher_bytes)
        role = run1["roles"][owner]
        # one packed aggregate per batch (features / slots per ciphertext), never a per-row vector
        assert len(cs) == role.cpr <= 2
        per = pl.slots_per_cipher(pub, role.slot_bits)
        for k, (c, mask) in enumerate(zip(cs, owner_masks)):
            seen_by_arbiter = pl.decrypt(priv, [c])[0]
            true = pl.signed(pub, seen_by_arbiter - mask)
            # What the arbiter decrypts is uniform mod n; the true aggregate is small ...
            assert seen_by_arbiter.bit_length() > pub.bits - 40
            assert abs(true).bit_length() <= per * role.slot_bits
            # ... and only the owner's mask turns it into gradient slots.
            pl.unpack(true, min(per, role.X.shape[1] - k * per), role.slot_bits)
    shares = [int(x.share) for x in seen if isinstance(x, m.LossShare)]
    assert len(shares) == 6
    assert all(s.bit_length() > 100 for s in shares)  # masked: true parts are < 2^60


def test_host_never_receives_labels_or_residuals_in_plaintext(run1: dict[str, Any], keypair: Any) -> None:
    pub, priv = keypair
    seen = run1["seen"]["p1"]
    assert {x.kind for x in seen} == {"arbiter_key", "party_hello", "feature_ciphers", "host_grad_part",
                                      "decrypt_reply", "epoch_done"}
    for x in seen:
        if isinstance(x, m.PartyHello):
            assert x.sender == "brand" and x.mask_seed == ""
        if isinstance(x, (m.FeatureCiphers, m.HostGradPart)):
            cs = pl.from_bytes(x.data, pub.cipher_bytes, bound=pub.nsquare)
            # ciphertexts, not plaintexts: uniform-looking elements of Z*_{n^2}
            assert all(c.bit_length() > 2 * pub.bits - 40 for c in cs)
        if isinstance(x, m.HostGradPart):
            # an aggregate over the batch (one ciphertext per slot group), not a per-row vector
            assert len(pl.from_bytes(x.data, pub.cipher_bytes)) == run1["roles"]["p1"].cpr == 2
        if isinstance(x, m.DecryptReply):
            assert all(v.bit_length() > pub.bits - 40 for v in pl.from_bytes(x.data, pub.plain_bytes))  # still masked
        if isinstance(x, m.EpochDone):
            assert set(x.model_dump()) == {"version", "job_id", "sender", "kind", "epoch", "loss", "stop", "reason"}


def test_guest_never_receives_host_features_or_partials(run1: dict[str, Any], keypair: Any) -> None:
    pub, _ = keypair
    seen = run1["seen"]["brand"]
    assert {x.kind for x in seen} == {"arbiter_key", "party_hello", "feature_ciphers", "guest_grad_part",
                                      "decrypt_reply", "epoch_done"}
    for x in seen:
        if isinstance(x, m.FeatureCiphers):
            cs = pl.from_bytes(x.data, pub.cipher_bytes, bound=pub.nsquare)
            assert all(c.bit_length() > 2 * pub.bits - 40 for c in cs)
        if isinstance(x, m.GuestGradPart):
            assert len(pl.from_bytes(x.data, pub.cipher_bytes)) == 1  # X_g^T u_h over the batch, encrypted
        if isinstance(x, m.PartyHello):
            assert set(x.model_dump()) == {"version", "job_id", "sender", "kind", "role", "rows", "rows_digest",
                                           "features", "slot_bits", "ciphers_per_row", "config_digest", "mask_seed"}


def test_scores_reach_only_the_guest_and_shares_are_masked(breast: dict[str, Any], run1: dict[str, Any]) -> None:
    roles = run1["roles"]
    g, h, a = roles["brand"], roles["p1"], roles["coord"]
    rows = slice(0, 40)
    ug = R.guest_partial(g.model(), breast["Xg"][rows])
    uh = R.host_partial(h.model(), breast["Xh"][rows])
    hs = R.score_share(job_id=JOB, sender="p1", request_id="r1", partial=uh, mask_seeds=[h.mask_seed], role="host")
    gs = R.score_share(job_id=JOB, sender="brand", request_id="r1", partial=ug,
                       mask_seeds=[g.peer["p1"].mask_seed], role="guest")
    plain_h = np.rint(uh * 2**R.SCORE_FRAC_BITS).astype(np.int64).astype(np.uint64)
    assert not np.any(np.frombuffer(hs.data, dtype=">u8") == plain_h)  # the arbiter sees masked partials
    a.finished = True  # scoring after training
    assert a.handle(m.decode(m.encode(hs))) == []
    [(to, scores)] = a.handle(m.decode(m.encode(gs)))
    assert to == "brand" and isinstance(scores, m.Scores)
    got = np.frombuffer(scores.data, dtype=">f8")
    assert np.allclose(got, 1 / (1 + np.exp(-(ug + uh))), atol=1e-6)


def test_any_interleaving_of_senders_gives_the_same_model(breast: dict[str, Any], keypair: Any) -> None:
    """The relay keeps each sender's order but not the order between senders: deliver from a
    random (sender, recipient) queue each step, so peers run a batch ahead, or into the next
    epoch before the arbiter's EpochDone reaches us."""
    import random

    cfg = _cfg(max_epochs=3, batch_size=64)
    data = {k: v[:200] for k, v in breast.items()}
    wg, wh, _ = _oracle(data["Xg"], data["y"], data["Xh"], cfg)
    for seed in (1, 2):
        roles = _roles(data, cfg, keypair, [data["Xh"]])
        queues: dict[tuple[str, str], list[m._Msg]] = defaultdict(list)
        rnd = random.Random(seed)

        def push(out: list[R.Outgoing], sender: str) -> None:
            for to, msg in out:
                queues[(sender, to)].append(m.decode(m.encode(msg)))

        push(roles["coord"].start(), "coord")
        while any(queues.values()):
            key = rnd.choice([k for k, v in queues.items() if v])
            push(roles[key[1]].handle(queues[key].pop(0)), key[1])
        assert roles["brand"].done and roles["p1"].done
        assert np.allclose(roles["brand"].w, wg, atol=1e-5, rtol=0)
        assert np.allclose(roles["p1"].w, wh, atol=1e-5, rtol=0)


def test_obfuscators_computed_ahead_are_used_for_setup(breast: dict[str, Any], keypair: Any) -> None:
    """With a long-lived arbiter key, nodes can fill their pools before the job: setup then
    computes no r^n at all (each batch needs one more per party, for rerandomizing)."""
    cfg = _cfg(max_epochs=1)
    data = {k: v[:200] for k, v in breast.items()}
    pub = keypair[0]
    pools = {p: pl.ObfuscatorPool(pub) for p in ("brand", "p1")}
    for pool in pools.values():
        pool.fill(2 * 200 + 2)  # up to two ciphertexts per row at 1024 bits, plus rerandomizing
    hosts = ["p1"]
    roles: dict[str, Any] = {
        "brand": R.GuestRole("brand", JOB, cfg, data["Xg"], data["y"], join_keys=data["ids"], hosts=hosts,
                             arbiter="coord", obfuscators=pools["brand"]),
        "p1": R.HostRole("p1", JOB, cfg, data["Xh"], join_keys=data["ids"], guest="brand", hosts=hosts,
                         arbiter="coord", obfuscators=pools["p1"]),
        "coord": R.ArbiterRole("coord", JOB, cfg, guest="brand", hosts=hosts, rows=200, keypair=keypair),
    }
    run_in_memory(roles, roles["coord"].start())
    wg, wh, _ = _oracle(data["Xg"], data["y"], data["Xh"], cfg)
    assert np.allclose(roles["brand"].w, wg, atol=1e-5, rtol=0)
    assert np.allclose(roles["p1"].w, wh, atol=1e-5, rtol=0)
    for name, pool in pools.items():
        peer_ciphers = sum(p.ciphers_per_row for p in roles[name].peer.values())
        used = 200 * roles[name].cpr + len(roles[name].batches) * peer_ciphers
        assert pool.generated == 402 and len(pool) == 402 - used
