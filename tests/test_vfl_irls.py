"""The IRLS variant of vertical LR (`TrainConfig(loss="irls")`): against a plaintext oracle of
the same surrogate, resumed after a restart, refused with several hosts, and what every party
receives (the leakage tests).

The surrogate: the guest fits exact LR on its own rows (logits a_i); the logistic loss is
expanded to second order at a_i, so with p = sigma(a), s = p (1 - p) and u = u_g + u_h

    loss_i = l(a_i) + (p_i - y_i)(u_i - a_i) + s_i/2 (u_i - a_i)^2,   d_i = p_i - y_i + s_i (u_i - a_i)

Keys are 1024 bits (`allow_short_keys`): protocol logic and leakage, not key strength. Every
message goes through its wire form (`federated.inmemory`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from confide.errors import ValidationError
from federated import messages as m
from federated import paillier as pl
from federated import roles as R
from federated.inmemory import run_in_memory
from tests.test_vfl_protocol import breast, crash_mid_epoch_1, keypair, resume_and_compare  # noqa: F401

JOB = "job-vfl-irls"


def _cfg(**kw: Any) -> R.TrainConfig:
    base = dict(key_bits=1024, allow_short_keys=True, batch_size=128, max_epochs=3, tol=0.0)
    base.update(kw)
    return R.TrainConfig(**base)


def _roles(data: dict[str, Any], cfg: R.TrainConfig, keypair: Any, blocks: list[np.ndarray] | None = None) -> dict[str, Any]:
    blocks = blocks if blocks is not None else [data["Xh"]]
    hosts = [f"p{i + 1}" for i in range(len(blocks))]
    roles: dict[str, Any] = {
        "brand": R.GuestRole("brand", JOB, cfg, data["Xg"], data["y"], join_keys=data["ids"], hosts=hosts,
                             arbiter="coord"),
        "coord": R.ArbiterRole("coord", JOB, cfg, guest="brand", hosts=hosts, rows=len(data["ids"]), keypair=keypair),
    }
    for name, X in zip(hosts, blocks):
        roles[name] = R.HostRole(name, JOB, cfg, X, join_keys=data["ids"], guest="brand", hosts=hosts, arbiter="coord")
    return roles


def _newton(Xa: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Plain Newton on mean log-loss + 1/(2N) |w|^2 (no penalty on the last, intercept, column)."""
    pen = np.full(Xa.shape[1], 1.0 / len(y))
    pen[-1] = 0.0
    w = np.zeros(Xa.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-Xa @ w))
        H = (Xa.T * (p * (1 - p))) @ Xa / len(y) + np.diag(pen)
        w = w - np.linalg.solve(H, Xa.T @ (p - y) / len(y) + pen * w)
    return w


def _oracle(Xg: np.ndarray, y: np.ndarray, Xh: np.ndarray, cfg: R.TrainConfig, split: int | None = None) -> dict[str, Any]:
    """The IRLS surrogate, same batches and schedule, in plaintext on pooled features. With
    `split`, host columns [:split] and [split:] are two hosts: `reported` adds what the protocol's
    loss counts twice, the host-host cross terms sum_i s_i u_1,i u_2,i (as the Taylor variant)."""
    Xga = np.hstack([Xg, np.ones((len(y), 1))])
    w0 = _newton(Xga, y)
    a = Xga @ w0
    p = 1 / (1 + np.exp(-a))
    s = p * (1 - p)
    wg, wh = w0.copy(), np.zeros(Xh.shape[1])
    batches = R.make_batches(len(y), cfg.batch_size, cfg.seed)
    losses, grads, reported = [], [], []
    for epoch in range(cfg.max_epochs):
        total = extra = 0.0
        for b in R._hash_order(len(batches), cfg.seed, f"epoch:{epoch}"):
            idx = batches[int(b)]
            r = Xga[idx] @ wg + Xh[idx] @ wh - a[idx]
            yy = y[idx]
            total += float(np.sum(np.log1p(np.exp(a[idx])) - yy * a[idx] + (p[idx] - yy) * r + 0.5 * s[idx] * r * r))
            d = p[idx] - yy + s[idx] * r
            if split is not None:
                extra += float(np.sum(s[idx] * (Xh[idx, :split] @ wh[:split]) * (Xh[idx, split:] @ wh[split:])))
            grads.append((Xga[idx].T @ d, Xh[idx].T @ d, float(np.sum(s[idx] * (Xh[idx] @ wh) ** 2))))
            wg = wg - cfg.lr(epoch) * Xga[idx].T @ d / len(idx)
            wh = wh - cfg.lr(epoch) * Xh[idx].T @ d / len(idx)
        losses.append(total / len(y))
        reported.append((total + extra) / len(y))
    return {"wg": wg, "wh": wh, "losses": losses, "reported": reported, "w0": w0, "s": s, "grads": grads}


@pytest.fixture(scope="module")
def run1(breast: dict[str, Any], keypair: Any) -> dict[str, Any]:
    """One guest, one host, 3 epochs of 2 batches; every delivered message recorded."""
    cfg = _cfg()
    roles = _roles(breast, cfg, keypair)
    seen: dict[str, list[m._Msg]] = defaultdict(list)
    masks: list[tuple[str, list[int]]] = []

    def tap(to: str, msg: m._Msg) -> None:
        seen[to].append(msg)
        if isinstance(msg, m.DecryptRequest):
            masks.append((msg.sender, list(roles[msg.sender].cur.masks)))

    run_in_memory(roles, roles["coord"].start(), tap=tap)
    return {"roles": roles, "seen": seen, "cfg": cfg, "masks": masks,
            "oracle": _oracle(breast["Xg"], breast["y"], breast["Xh"], cfg)}


def test_irls_is_the_default_and_uses_a_larger_step() -> None:
    cfg = R.TrainConfig()
    assert cfg.loss == "irls" and cfg.lr(0) == 1.0
    assert R.TrainConfig(loss="taylor").lr(0) == 0.3 and R.TrainConfig(learning_rate=0.5).lr(0) == 0.5
    assert R.TrainConfig(loss="taylor").digest() != cfg.digest()  # parties on different losses fail at hello


def test_anchor_is_scikit_learns_default_logistic_regression(breast: dict[str, Any]) -> None:
    from sklearn.linear_model import LogisticRegression

    Xga = np.hstack([breast["Xg"], np.ones((len(breast["y"]), 1))])
    fit = R.fit_exact_lr(Xga, breast["y"])
    sk = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(breast["Xg"], breast["y"])
    assert np.allclose(fit["w"][:-1], sk.coef_[0], atol=1e-4)
    assert fit["w"][-1] == pytest.approx(sk.intercept_[0], abs=1e-4)
    assert np.allclose(fit["w"], _newton(Xga, breast["y"]), atol=1e-8)
    # the guest-only model of an irls job is that anchor
    g = R.train_guest_only(breast["Xg"], breast["y"], _cfg())
    assert np.allclose(g["weights"], fit["w"][:-1]) and g["intercept"] == pytest.approx(fit["w"][-1])


def test_weights_and_loss_equal_plaintext_oracle(run1: dict[str, Any]) -> None:
    roles, o = run1["roles"], run1["oracle"]
    assert roles["brand"].done and roles["p1"].done
    assert not np.allclose(o["wh"], 0.0)  # the host's part moved: the test could fail
    assert np.allclose(roles["brand"].w, o["wg"], atol=1e-5, rtol=0)
    assert np.allclose(roles["p1"].w, o["wh"], atol=1e-5, rtol=0)
    assert np.allclose(roles["brand"].losses, o["losses"], atol=1e-6)
    assert o["losses"][0] > o["losses"][-1]
    assert roles["coord"].losses == roles["brand"].losses == roles["p1"].losses
    for party in ("brand", "p1"):  # setup ends when every peer's first training message is in
        t = roles[party].timings
        assert len(t["epoch_s"]) == 3 and t["setup_s"] >= t["encrypt_s"] > 0
    assert roles["p1"].timings["weighted_rows_s"] > 0 and roles["brand"].timings["encrypted"] == 2 * 320


def test_gradients_equal_plaintext_gradients(breast: dict[str, Any], keypair: Any) -> None:
    """Full batch, 2 epochs: (w1 - w2) / lr is the protocol's gradient at w1."""
    cfg = _cfg(batch_size=0, max_epochs=2)
    roles = _roles(breast, cfg, keypair)
    after_first: dict[str, np.ndarray] = {}

    def tap(to: str, msg: m._Msg) -> None:
        if isinstance(msg, m.EpochDone) and msg.epoch == 0 and to in ("brand", "p1"):
            after_first[to] = roles[to].w.copy()

    run_in_memory(roles, roles["coord"].start(), tap=tap)
    g_fed = (after_first["brand"] - roles["brand"].w) / cfg.lr(1)
    h_fed = (after_first["p1"] - roles["p1"].w) / cfg.lr(1)
    o = _oracle(breast["Xg"], breast["y"], breast["Xh"], cfg)
    g_plain, h_plain, _ = o["grads"][1]
    n = len(breast["y"])
    assert np.abs(h_plain).max() > 1e-3
    assert np.allclose(g_fed, g_plain / n, atol=1e-6, rtol=1e-4)
    assert np.allclose(h_fed, h_plain / n, atol=1e-6, rtol=1e-4)


def test_two_hosts_equal_plaintext_oracle(breast: dict[str, Any], keypair: Any) -> None:
    cfg = _cfg(max_epochs=2)
    blocks = [breast["Xh"][:, :12], breast["Xh"][:, 12:]]
    roles = _roles(breast, cfg, keypair, blocks)
    seen: dict[str, list[m._Msg]] = defaultdict(list)
    run_in_memory(roles, roles["coord"].start(), tap=lambda to, msg: seen[to].append(msg))
    o = _oracle(breast["Xg"], breast["y"], breast["Xh"], cfg, split=12)
    assert np.allclose(roles["brand"].w, o["wg"], atol=1e-5, rtol=0)
    assert np.allclose(np.r_[roles["p1"].w, roles["p2"].w], o["wh"], atol=1e-5, rtol=0)
    assert np.allclose(roles["coord"].losses, o["reported"], atol=1e-6)
    assert not np.allclose(o["reported"], o["losses"], atol=1e-6)  # the documented double count
    # Host-to-host rows are [[s_i x_i]] rerandomized: p2 cannot test a guess of p1's x_i by
    # recomputing [[s_i]]^{pack(x_i)} from the guest's [[s_i]], which it also holds.
    pub = keypair[0]
    p1, p2 = roles["p1"], roles["p2"]
    got = [c for x in seen["p2"] if isinstance(x, m.FeatureCiphers) and x.sender == "p1"
           for c in pl.from_bytes(x.data, pub.cipher_bytes)]
    assert len(got) == len(p1.sx) and got[:5] != p1.sx[:5]
    per = pl.slots_per_cipher(pub, p1.slot_bits)
    guess = pl.pack(np.rint(blocks[0][0, :per] * 2**R.FEATURE_FRAC_BITS).astype(int).tolist(), p1.slot_bits)
    assert pl.pow_each(pub, [p2.weights[0]], [guess])[0] == p1.sx[0] != got[0]
    # the weights go to hosts only
    assert not any(isinstance(x, m.WeightCiphers) for x in seen["brand"])


def test_resume_after_restart_gives_the_same_model(breast: dict[str, Any], keypair: Any, run1: dict[str, Any]) -> None:
    cfg = run1["cfg"]
    snaps = crash_mid_epoch_1(_roles(breast, cfg, keypair))
    # the host's snapshot keeps the guest's [[s_i]] (ciphertexts only), so setup is not repeated
    assert len(bytes.fromhex(snaps["p1"]["weights"])) == len(breast["ids"]) * keypair[0].cipher_bytes
    resume_and_compare(_roles(breast, cfg, None), snaps, run1["roles"])


def test_any_interleaving_of_senders_gives_the_same_model(breast: dict[str, Any], keypair: Any) -> None:
    import random

    cfg = _cfg(max_epochs=2, batch_size=64)
    data = {k: v[:200] for k, v in breast.items()}
    o = _oracle(data["Xg"], data["y"], data["Xh"], cfg)
    for seed, blocks in ((1, [data["Xh"]]), (2, [data["Xh"][:, :7], data["Xh"][:, 7:]])):
        roles = _roles(data, cfg, keypair, blocks)
        queues: dict[tuple[str, str], list[m._Msg]] = defaultdict(list)
        rnd = random.Random(seed)

        def push(out: list[R.Outgoing], sender: str) -> None:
            for to, msg in out:
                queues[(sender, to)].append(m.decode(m.encode(msg)))

        push(roles["coord"].start(), "coord")
        while any(queues.values()):
            key = rnd.choice([k for k, v in queues.items() if v])
            push(roles[key[1]].handle(queues[key].pop(0)), key[1])
        assert all(roles[p].done for p in roles if p != "coord")
        assert np.allclose(roles["brand"].w, o["wg"], atol=1e-5, rtol=0)
        wh = np.concatenate([roles[f"p{i + 1}"].w for i in range(len(blocks))])
        assert np.allclose(wh, o["wh"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ leakage


def test_arbiter_receives_only_masked_aggregates(run1: dict[str, Any], keypair: Any) -> None:
    pub, priv = keypair
    seen, masks, roles = run1["seen"]["coord"], run1["masks"], run1["roles"]
    assert {x.kind for x in seen} <= {"decrypt_request", "loss_share", "score_share"}
    requests = [x for x in seen if isinstance(x, m.DecryptRequest)]
    assert len(requests) == len(masks) == 2 * 3 * 2
    for req, (owner, owner_masks) in zip(requests, masks):
        role = roles[owner]
        cs = pl.from_bytes(req.data, pub.cipher_bytes)
        assert len(cs) == role.groups == len(owner_masks) <= 2
        per = pl.slots_per_cipher(pub, role.slot_bits)
        for k, (c, mask) in enumerate(zip(cs, owner_masks)):
            seen_by_arbiter = pl.decrypt(priv, [c])[0]
            assert seen_by_arbiter.bit_length() > pub.bits - 40  # uniform mod n
            true = pl.signed(pub, seen_by_arbiter - mask)
            pl.unpack(true, min(per, role.out_slots - k * per), role.slot_bits)  # only the owner's mask opens it
    shares = [int(x.share) for x in seen if isinstance(x, m.LossShare)]
    assert len(shares) == 6 and all(s.bit_length() > 100 for s in shares)


def test_host_receives_weights_and_guest_rows_only_encrypted(run1: dict[str, Any], breast: dict[str, Any],
                                                             keypair: Any) -> None:
    pub, priv = keypair
    seen, host = run1["seen"]["p1"], run1["roles"]["p1"]
    assert {x.kind for x in seen} == {"arbiter_key", "party_hello", "feature_ciphers", "weight_ciphers",
                                      "host_grad_part", "decrypt_reply", "epoch_done"}
    weights = [c for x in seen if isinstance(x, m.WeightCiphers) for c in pl.from_bytes(x.data, pub.cipher_bytes)]
    assert len(weights) == len(breast["y"])
    for x in seen:
        if isinstance(x, (m.FeatureCiphers, m.WeightCiphers, m.HostGradPart)):
            cs = pl.from_bytes(x.data, pub.cipher_bytes, bound=pub.nsquare)
            assert all(c.bit_length() > 2 * pub.bits - 40 for c in cs)  # ciphertexts, not values
        if isinstance(x, m.HostGradPart):
            assert len(pl.from_bytes(x.data, pub.cipher_bytes)) == host.cpr  # a batch aggregate
        if isinstance(x, m.DecryptReply):
            assert all(v.bit_length() > pub.bits - 40 for v in pl.from_bytes(x.data, pub.plain_bytes))
        if isinstance(x, m.PartyHello):
            assert x.sender == "brand" and x.mask_seed == ""
    # What the ciphertexts hold (only the arbiter's key opens them): s_i, and the guest's x_i s_i.
    s = pl.decrypt(priv, weights[:20])
    assert np.allclose(np.array(s, dtype=float) / 2**R.IRLS_FRAC_BITS, run1["oracle"]["s"][:20], atol=1e-6)


def test_host_learns_only_its_gradient_and_one_loss_scalar_per_batch(run1: dict[str, Any]) -> None:
    """After unmasking, a host holds X_h^T d over the batch and sum_i s_i u_h,i^2, as in the oracle."""
    host, o = run1["roles"]["p1"], run1["oracle"]
    pub = host.pub
    replies = [x for x in run1["seen"]["p1"] if isinstance(x, m.DecryptReply)]
    masks = [mk for owner, mk in run1["masks"] if owner == "p1"]
    per = pl.slots_per_cipher(pub, host.slot_bits)
    assert len(replies) == len(masks) == len(o["grads"])
    for reply, mask, (_, xh_d, q) in zip(replies, masks, o["grads"]):
        slots: list[int] = []
        for k, (v, r) in enumerate(zip(pl.from_bytes(reply.data, pub.plain_bytes), mask)):
            slots += pl.unpack(pl.signed(pub, int(v) - r), min(per, host.out_slots - k * per), host.slot_bits)
        learned = np.array(slots, dtype=float) / 2**R.IRLS_REMOTE_FRAC
        assert len(learned) == len(xh_d) + 1
        # sums over the batch's rows, at weights that drifted from the oracle's by fixed-point error
        assert np.allclose(learned[:-1], xh_d, atol=1e-4, rtol=1e-5)
        assert learned[-1] == pytest.approx(q, abs=1e-4, rel=1e-5)


def test_guest_never_receives_host_features_or_partials(run1: dict[str, Any], keypair: Any) -> None:
    pub, _ = keypair
    seen = run1["seen"]["brand"]
    assert {x.kind for x in seen} == {"arbiter_key", "party_hello", "feature_ciphers", "guest_grad_part",
                                      "decrypt_reply", "epoch_done"}
    for x in seen:
        if isinstance(x, m.FeatureCiphers):
            assert all(c.bit_length() > 2 * pub.bits - 40 for c in pl.from_bytes(x.data, pub.cipher_bytes))
        if isinstance(x, m.GuestGradPart):
            assert len(pl.from_bytes(x.data, pub.cipher_bytes)) == run1["roles"]["brand"].cpr == 1
        if isinstance(x, m.DecryptReply):
            assert all(v.bit_length() > pub.bits - 40 for v in pl.from_bytes(x.data, pub.plain_bytes))


def test_weights_from_a_host_or_in_taylor_mode_are_refused(breast: dict[str, Any], keypair: Any) -> None:
    from confide.errors import ProtocolError

    roles = _roles(breast, _cfg(), keypair)
    key = roles["coord"].start()[0][1]
    roles["p1"].handle(key)
    bogus = m.WeightCiphers(job_id=JOB, sender="brand", offset=0, rows=1, final=False, data=b"\x01" * 256)
    with pytest.raises(ProtocolError, match="out of order"):
        roles["p1"].handle(bogus)  # before the guest's hello
    with pytest.raises(ProtocolError):
        roles["brand"].handle(bogus)  # the guest takes no weights
    taylor = _roles(breast, _cfg(loss="taylor"), keypair)
    taylor["p1"].handle(key.model_copy(update={"config_digest": _cfg(loss="taylor").digest()}))
    with pytest.raises(ProtocolError):
        taylor["p1"].handle(bogus)


def test_parties_on_different_losses_stop_at_hello(breast: dict[str, Any], keypair: Any) -> None:
    data = {k: v[:120] for k, v in breast.items()}
    roles = _roles(data, _cfg(batch_size=0), keypair)
    roles["p1"] = R.HostRole("p1", JOB, _cfg(batch_size=0, loss="taylor"), data["Xh"], join_keys=data["ids"],
                             guest="brand", hosts=["p1"], arbiter="coord")
    with pytest.raises(ValidationError, match="another training configuration"):
        run_in_memory(roles, roles["coord"].start())
    assert roles["brand"].stage == "setup" and not roles["brand"].losses  # nothing trained
