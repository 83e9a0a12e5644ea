"""Coordinated hetero logistic regression (as in FATE) as pure state machines: no I/O.

Parties: the **guest** (brand: labels + its features + the intercept), one or more **hosts**
(partners: features) and the **arbiter** (coordinator: the Paillier private key). Each role is
driven by

    out = role.start()          # list of (recipient, message) to send
    out = role.handle(message)  # for every message addressed to it

and raises ProtocolError for a message of another job, version, sender or round. Messages go
party-to-party over the end-to-end encrypted relay; the arbiter never sees party-to-party ones.

Two losses (`TrainConfig.loss`), both with residuals linear in the partial predictions
(u = u_guest + sum_k u_host_k, y in {0,1}):

- "taylor" (FATE): sigma(u) ~ 0.5 + u/4 at 0,
      d_i = 0.25 u_i + 0.5 - y_i = dg_i + 0.25 sum_k uh_ki,   dg = 0.25 u_guest + 0.5 - y
- "irls" (default): the logistic loss expanded to second order at the guest's own exact-LR
  logits a_i (p = sigma(a), s = p (1 - p)); training starts at that LR (host weights 0),
      loss_i = l(a_i) + (p_i - y_i)(u_i - a_i) + s_i/2 (u_i - a_i)^2
      d_i    = c_i + s_i sum_k uh_ki,   c = p - y + s (u_guest - a)   (guest only)

- Setup, once per job: the arbiter sends its public key; every party encrypts its training
  rows (fixed-point, one row packed into one ciphertext) and sends them to the others
  (`FeatureCiphers`): taylor: features x (the guest's include the intercept column); irls: the
  guest sends x_g s and [[s_i]] (`WeightCiphers`), a host sends the guest its x_h, computes
  [[s_i x_h,i]] = [[s_i]]^{pack(x_h,i)} for itself and sends those, rerandomized, to other hosts.
- Per mini-batch, with X_p the batch rows of party p:
  * host k: uh_k = X_k w_k; sends the guest [[X_g^T (0.25 uh_k)]] (taylor; irls: [[X_g^T S uh_k]])
    by multi-exponentiation of the guest's row ciphertexts by its own plaintext partials,
    rerandomized, and every other host l [[X_l^T (0.25 uh_k)]] (irls: [[X_l^T S uh_k]]);
  * guest: sends each host k [[X_k^T dg]] (irls: [[X_k^T c]]) the same way;
  * irls host k adds [[X_k^T S uh_k]] from its [[s x]] rows and [[sum_i s_i uh_ki^2]] from [[s]];
  * each party multiplies what it received, adds a uniform mask mod n, has the arbiter decrypt
    (`DecryptRequest`/`DecryptReply`), removes the mask, adds its plaintext part and updates:
        guest:  X_g^T d = X_g^T dg + sum_k X_g^T(0.25 uh_k)        (irls: X_g^T c + sum_k X_g^T S uh_k)
        host k: X_k^T d = X_k^T(0.25 uh_k) + X_k^T(dg + 0.25 sum_{l!=k} uh_l)   (irls: all remote)
- Per epoch: each party sends a share of the summed loss
      taylor: [guest: sum log2 + (0.5-y)ug + ug^2/8] + sum_k [host k: w_k . X_k^T dg + |uh_k|^2/8]
      irls:   [guest: sum l(a) + (p-y) r + s r^2/2, r = ug - a] + sum_k [host k: w_k . X_k^T d - q_k/2]
  masked pairwise (host k's mask seed is shared with the guest only); the arbiter adds them,
  decides early stopping and tells everyone (`EpochDone`). With several hosts both count the
  host-host cross terms twice (docs/vfl.md §5).

So per batch: one party-to-party exchange and one arbiter round trip per party, a few
ciphertexts per message; per epoch one loss round. Per-row values only ever travel encrypted
between parties; the arbiter decrypts only uniformly masked aggregates and learns the loss.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from confide.canonical import digest
from confide.errors import ProtocolError, ValidationError
from federated import messages as m
from federated import paillier as pl
from federated.executor import Executor, InProcessExecutor

Outgoing = tuple[str, m._Msg]

FEATURE_FRAC_BITS = 16  # fixed-point fraction of features
EXP_FRAC_BITS = 20  # fixed-point fraction of partial predictions / residuals
EXP_INT_BITS = 12  # |partials| < 4096: beyond that the model has diverged
# IRLS fixed point: s_i at 2^-20; encrypted rows x_i s_i at 2^-36 (the guest's, and each host's
# [[s_i]]^{x_i 2^16}); times partials u at 2^-20 -> every remote aggregate at 2^-56, which is
# also where the host's features (2^-16) times the guest's c_i (at 2^-40) land.
IRLS_FRAC_BITS = 20
IRLS_ROW_FRAC = IRLS_FRAC_BITS + FEATURE_FRAC_BITS
IRLS_REMOTE_FRAC = IRLS_ROW_FRAC + EXP_FRAC_BITS
C_FRAC_BITS = IRLS_REMOTE_FRAC - FEATURE_FRAC_BITS
SCORE_FRAC_BITS = 24
LOSS_FRAC_BITS = 32
LOSS_MOD = 1 << 128
SCORE_MOD = 1 << 64
LOG2 = math.log(2.0)


# ------------------------------------------------------------------------------------ config


class TrainConfig(BaseModel):
    """Hyper-parameters every party and the arbiter agree on (compared by digest)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_bits: int = Field(default=2048, ge=1024, le=4096, description="Paillier modulus size")
    allow_short_keys: bool = Field(default=False, description="tests of protocol logic only: permit < 2048")
    batch_size: int = Field(default=4096, ge=0, description="rows per mini-batch (0: full batch)")
    max_epochs: int = Field(default=30, ge=1, le=1000)
    loss: Literal["irls", "taylor"] = Field(
        default="irls",
        description="irls: the logistic loss expanded to second order at the guest's own exact-LR logits "
                    "(one host); taylor: FATE's first-order expansion at 0 (any number of hosts)")
    learning_rate: float | None = Field(default=None, gt=0, description="None: 1.0 for irls, 0.3 for taylor")
    lr_decay: float = Field(default=0.05, ge=0, description="lr_e = lr / (1 + decay * e)")
    l2: float = Field(default=0.0, ge=0, description="L2 penalty (not on the intercept)")
    tol: float = Field(default=1e-4, ge=0, description="stop when |loss_e - loss_{e-1}| < tol")
    k_min: int = Field(default=50, ge=1, description="minimum rows per batch and in total")
    seed: int = Field(default=42, description="batch composition and order (shared)")

    def digest(self) -> str:
        return digest(self.model_dump(mode="json"))

    def check_keys(self) -> None:
        if self.key_bits < 2048 and not self.allow_short_keys:
            raise ValidationError(f"key_bits={self.key_bits} is below 2048; only tests may set allow_short_keys")

    @property
    def base_lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        # The IRLS surrogate's curvature is s_i = sigma'(a_i) <= 0.25 per row, the Taylor one 0.25
        # everywhere, so the same step size would crawl; 1.0 converges on default_credit in ~10 epochs.
        return 1.0 if self.loss == "irls" else 0.3

    def lr(self, epoch: int) -> float:
        return self.base_lr / (1.0 + self.lr_decay * epoch)

    def check_hosts(self, hosts: int) -> None:
        if hosts < 1:
            raise ValidationError("vertical training needs at least one host", field="hosts")


# -------------------------------------------------------------------------------- row helpers


def _hash_order(n: int, seed: int, label: str) -> np.ndarray:
    """A permutation of range(n) that every party computes identically (no library RNG)."""
    key = f"{seed}:{label}:".encode()
    keys = [hashlib.blake2b(key + i.to_bytes(8, "big"), digest_size=8).digest() for i in range(n)]
    return np.array(sorted(range(n), key=keys.__getitem__), dtype=np.int64)


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions within the aligned rows, identical at every party."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValidationError(f"test fraction must be in [0, 1), got {test_fraction}", field="test_fraction")
    order = _hash_order(n, seed, "split")
    k = int(round(n * test_fraction))
    return np.sort(order[k:]), np.sort(order[:k])


def make_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Fixed mini-batches (as FATE): every batch has at least `batch_size` rows (the remainder
    is spread over the others, never left as a small batch)."""
    order = _hash_order(n, seed, "batches")
    if batch_size <= 0 or batch_size >= n:
        return [order]
    return [b for b in np.array_split(order, max(1, n // batch_size))]


def rows_digest(join_keys: Sequence[str]) -> str:
    """Digest of the aligned join keys (the PSI `match` keys), to detect misaligned rows."""
    h = hashlib.sha256()
    for k in join_keys:
        h.update(str(k).encode())
        h.update(b"\x00")
    return h.hexdigest()


def check_features(X: Any, what: str) -> np.ndarray:
    """A finite float matrix, or ValidationError naming the first bad column/row."""
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValidationError(f"{what}: features must be numeric") from None
    if arr.ndim != 2:
        raise ValidationError(f"{what}: features must be a rows x columns matrix")
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        raise ValidationError(f"{what}: missing or non-finite feature value at row {r}, column {c}", row=r, column=c)
    return arr


def check_labels(y: Any) -> np.ndarray:
    try:
        arr = np.asarray(y, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValidationError("labels must be 0/1") from None
    if not np.isfinite(arr).all() or not np.isin(arr, (0.0, 1.0)).all():
        bad = sorted({str(v) for v in np.asarray(y).reshape(-1)[:10000] if v not in (0, 1)})[:5]
        raise ValidationError(f"labels must be binary 0/1; found {', '.join(bad) or 'non-finite values'}")
    if arr.min() == arr.max():
        raise ValidationError("labels contain a single class; training needs both 0 and 1")
    return arr


def check_leakage_guards(rows: int, batches: list[np.ndarray], total_features: int, k_min: int) -> None:
    """Refuse runs whose per-batch aggregates would let a party solve for per-row values:
    a host learns X_host^T d (labels' residuals) per batch, the guest X_guest^T u_host."""
    if rows < k_min:
        raise ValidationError(f"only {rows} matched training rows; the agreement requires at least k_min={k_min}")
    if rows <= total_features:
        raise ValidationError(
            f"{rows} matched rows for {total_features} features: the gradients would reveal labels; "
            "need more rows than features"
        )
    smallest = min(len(b) for b in batches)
    if smallest < k_min or smallest <= total_features:
        raise ValidationError(
            f"mini-batches of {smallest} rows would reveal per-row values (need > {total_features} "
            f"features and >= k_min={k_min}); raise batch_size"
        )


def _slot_bits(X: np.ndarray, batch_rows: int, loss: str = "taylor", role: str = "guest") -> int:
    """Width of one packed slot: the largest batch aggregate the party will decrypt, signed."""
    xmax = float(np.abs(X).max()) if X.size else 0.0
    xint = max(1, math.ceil(math.log2(xmax + 1.0))) + 1
    sum_bits = max(1, math.ceil(math.log2(batch_rows + 1))) + 2
    if loss == "taylor":
        return FEATURE_FRAC_BITS + xint + EXP_FRAC_BITS + EXP_INT_BITS + sum_bits
    # irls, at 2^-44: guest slots sum s x u (s <= 1/4); host slots sum x c + s x u (|c|, |u| <
    # 2^12) and one more slot sums s u^2 (the host's loss term).
    per_row = xint + EXP_INT_BITS + 1 if role == "guest" else max(xint + EXP_INT_BITS + 1, 2 * EXP_INT_BITS)
    return IRLS_REMOTE_FRAC + per_row + sum_bits


def _encode_exponents(v: np.ndarray, frac_bits: int = EXP_FRAC_BITS) -> list[int]:
    bound = 2.0 ** EXP_INT_BITS
    if not np.isfinite(v).all() or np.abs(v).max(initial=0.0) >= bound:
        raise ProtocolError("partial predictions left the fixed-point range: the model diverged; lower the learning rate")
    return [int(x) for x in np.rint(v * float(1 << frac_bits)).astype(np.int64)]


def _encode_exponents_sq(u: np.ndarray) -> list[int]:
    """u_i^2 at 2^-20 (|u| < 2^12 already checked, so u^2 < 2^24)."""
    return [int(x) for x in np.rint(u * u * float(1 << EXP_FRAC_BITS)).astype(np.int64)]


def fit_exact_lr(Xa: np.ndarray, y: np.ndarray, l2: float = 0.0, max_iter: int = 100) -> dict[str, Any]:
    """Regularised logistic regression by Newton's method (IRLS) on `Xa`, whose last column is
    the intercept: mean log-loss + (l2 + 1/N)/2 |w|^2 without the intercept (scikit-learn's
    default penalty C=1 is 1/N in this scale; it keeps separable data finite).

    Returns {"w", "logits", "iterations", "loss"}; the guest's IRLS anchor and guest-only model."""
    n, k = Xa.shape
    pen = np.full(k, l2 + 1.0 / n)
    pen[-1] = 0.0

    def objective(w: np.ndarray) -> float:
        z = Xa @ w
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * np.dot(pen * w, w))

    w = np.zeros(k)
    f = objective(w)
    it = 0
    for it in range(1, max_iter + 1):
        z = Xa @ w
        p = 1.0 / (1.0 + np.exp(-z))
        grad = Xa.T @ (p - y) / n + pen * w
        hess = (Xa.T * (p * (1.0 - p))) @ Xa / n + np.diag(pen) + 1e-12 * np.eye(k)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8:  # damped Newton: never increase the objective
            f_new = objective(w - t * step)
            if f_new <= f + 1e-15:
                break
            t *= 0.5
        w, f_old, f = w - t * step, f, f_new
        if np.abs(t * step).max() < 1e-10 or f_old - f < 1e-15:
            break
    return {"w": w, "logits": Xa @ w, "iterations": it, "loss": f}


def _mask_stream(seed: str, label: str, count: int) -> np.ndarray:
    """Pairwise masks (uint64) from a seed shared by one host and the guest."""
    k = hashlib.blake2b(bytes.fromhex(seed) + label.encode(), digest_size=16).digest()
    return np.random.PCG64(int.from_bytes(k, "big")).random_raw(count).astype(np.uint64)


def _loss_mask(seed: str, epoch: int) -> int:
    return int.from_bytes(hashlib.blake2b(bytes.fromhex(seed) + f"loss:{epoch}".encode(), digest_size=16).digest(), "big")


# --------------------------------------------------------------------------------- the parties


@dataclass
class _PeerRows:
    """Another party's encrypted feature rows, as received."""

    features: int = 0
    slot_bits: int = 0
    ciphers_per_row: int = 0
    rows: int = 0
    mask_seed: str = ""
    ciphers: list[Any] = field(default_factory=list)
    complete: bool = False
    hello: bool = False


@dataclass
class _Batch:
    epoch: int
    batch: int
    idx: np.ndarray
    w_start: np.ndarray
    plain: np.ndarray  # this party's plaintext part of X^T d (unscaled sums)
    received: dict[str, list[Any]] = field(default_factory=dict)
    own: list[Any] = field(default_factory=list)  # irls host: [[X^T S u]] and [[sum s u^2]], own ciphertexts
    masks: list[int] = field(default_factory=list)
    requested: bool = False


class _Party:
    """What guest and host share: setup, batching, the decrypt round trip, updates, resume."""

    role: str = ""

    def __init__(self, name: str, job_id: str, config: TrainConfig, X: Any, *, join_keys: Sequence[str],
                 peers: Sequence[str], arbiter: str, executor: Executor | None = None,
                 obfuscators: "pl.ObfuscatorPool | Callable[[int], pl.ObfuscatorPool | None] | None" = None) -> None:
        config.check_keys()
        # Obfuscators computed ahead for the arbiter's key: a pool, or a lookup by modulus (a
        # node's idle-time stock, party_node.obfuscator_stock). Used when the key matches.
        self._ahead = obfuscators
        self._stock: pl.ObfuscatorPool | None = None
        self.name, self.job_id, self.config, self.arbiter = name, job_id, config, arbiter
        self.peers = list(peers)
        if name in self.peers or arbiter in self.peers or name == arbiter:
            raise ValidationError("party names must be distinct")
        self.X = check_features(X, f"{self.role} {name}")
        if len(join_keys) != len(self.X):
            raise ValidationError(f"{len(join_keys)} join keys for {len(self.X)} rows", field="join_keys")
        self.rows_digest = rows_digest(join_keys)
        self.n = len(self.X)
        self.batches = make_batches(self.n, config.batch_size, config.seed)
        self.executor = executor or InProcessExecutor()
        self.w = np.zeros(self.X.shape[1])
        self.slot_bits = _slot_bits(self.X, max(len(b) for b in self.batches), config.loss, self.role)
        self.irls = config.loss == "irls"
        self.pub: pl.PublicKey | None = None
        self.pool: pl.ObfuscatorPool | None = None
        self.peer: dict[str, _PeerRows] = {p: _PeerRows() for p in self.peers}
        self.stage = "wait_key"
        self.epoch = 0
        self.batch_pos = 0
        self.cur: _Batch | None = None
        self.early: list[m._Msg] = []
        self.losses: list[float] = []
        self.loss_part = 0.0
        self.stop_reason = ""
        self.timings: dict[str, Any] = {"setup_s": 0.0, "epoch_s": []}
        self._t0 = 0.0
        self._epoch_t0 = 0.0
        self._setup_open = True  # until every peer's first training message is in
        self._first_seen: dict[str, float] = {}  # when each peer's first training message arrived

    # -- helpers
    def _m(self, cls: type, **kw: Any) -> Any:
        return cls(job_id=self.job_id, sender=self.name, **kw)

    @property
    def cpr(self) -> int:
        """Ciphertexts per encrypted feature row (and per aggregate a peer sends us)."""
        assert self.pub is not None
        return -(-self.X.shape[1] // pl.slots_per_cipher(self.pub, self.slot_bits))

    def setup_obfuscators(self, n: int) -> int:
        """How many `r^n` this party's setup uses under modulus `n`: what an idle-time stock
        should hold for this job (rerandomizing takes a few more per batch as training goes)."""
        cpr = -(-self.X.shape[1] // pl.slots_per_cipher(pl.PublicKey(int(n)), self.slot_bits))
        return self.n * cpr + self._setup_extra(cpr)

    def _setup_extra(self, cpr: int) -> int:
        return 0

    @property
    def out_slots(self) -> int:
        """Slots this party decrypts per batch: one per feature (+1 for an irls host's loss term)."""
        return self.X.shape[1]

    @property
    def groups(self) -> int:
        """Ciphertexts per decrypt request."""
        assert self.pub is not None
        return -(-self.out_slots // pl.slots_per_cipher(self.pub, self.slot_bits))

    @property
    def remote_frac(self) -> int:
        return IRLS_REMOTE_FRAC if self.irls else FEATURE_FRAC_BITS + EXP_FRAC_BITS

    def _row_values(self) -> tuple[np.ndarray, int]:
        """What this party encrypts per row for the others, and its fixed-point fraction."""
        return self.X, FEATURE_FRAC_BITS

    def _check(self, msg: m._Msg, senders: Sequence[str]) -> None:
        if msg.job_id != self.job_id:
            raise ProtocolError(f"message for job {msg.job_id!r} reached job {self.job_id!r}")
        if msg.sender not in senders:
            raise ProtocolError(f"{self.role} {self.name} does not take {msg.kind!r} from {msg.sender!r}")

    def _hello(self, mask_seed: str = "") -> m.PartyHello:
        return self._m(m.PartyHello, role=self.role, rows=self.n, rows_digest=self.rows_digest,
                       features=int(self.X.shape[1]), slot_bits=self.slot_bits, ciphers_per_row=self.cpr,
                       config_digest=self.config.digest(), mask_seed=mask_seed)

    def _encrypt_own_rows(self, extra: Sequence[int] = ()) -> list[Any]:
        """The packed rows of `_row_values()`, then the `extra` plaintexts, all encrypted."""
        assert self.pub is not None
        per = pl.slots_per_cipher(self.pub, self.slot_bits)
        values, frac = self._row_values()
        Xi = np.rint(values * float(1 << frac)).astype(np.int64)
        plains = []
        for row in Xi.tolist():
            for k in range(0, len(row), per):
                plains.append(pl.pack(row[k : k + per], self.slot_bits))
        plains += [int(v) for v in extra]
        assert self.pool is not None
        t0 = time.perf_counter()
        self._provision(len(plains))
        out = pl.encrypt(self.pub, plains, self.pool)
        self.timings["encrypt_s"], self.timings["encrypted"] = time.perf_counter() - t0, len(plains)
        return out

    def _provision(self, count: int) -> None:
        """Have `count` obfuscators in the pool: first from the stock computed ahead (with
        them an encryption is two multiplications), the rest computed now on the executor."""
        assert self.pool is not None
        self._from_stock(count)
        self.pool.fill(count)

    def _from_stock(self, count: int) -> None:
        assert self.pool is not None
        need = count - len(self.pool)
        if need > 0 and self._stock is not None:
            got = self._stock.take_upto(need)
            self.pool.put(got)
            self.timings["obfuscators_from_stock"] = self.timings.get("obfuscators_from_stock", 0) + len(got)

    def _use_key(self, n: int) -> None:
        self.pub = pl.PublicKey(n)
        self.pool = pl.ObfuscatorPool(self.pub, self.executor)
        ahead = self._ahead(n) if callable(self._ahead) else self._ahead
        self._stock = ahead if ahead is not None and ahead.pub.n == n else None

    def _feature_messages(self, ciphers: list[Any], cls: type = m.FeatureCiphers, per_row: int = 0) -> list[Any]:
        assert self.pub is not None
        w = self.pub.cipher_bytes
        cpr = per_row or self.cpr
        out = []
        for off in range(0, max(self.n, 1), m.MAX_CHUNK_ROWS):
            rows = min(m.MAX_CHUNK_ROWS, self.n - off)
            data = pl.to_bytes(ciphers[off * cpr : (off + rows) * cpr], w)
            out.append(self._m(cls, offset=off, rows=rows, final=off + rows >= self.n, data=data))
        return out

    def _on_key(self, msg: m.ArbiterKey) -> None:
        self._check(msg, [self.arbiter])
        if self.stage != "wait_key":
            raise ProtocolError(f"{self.role} {self.name} got a second arbiter key")
        if msg.config_digest != self.config.digest():
            raise ValidationError("the arbiter runs another training configuration (config digest differs)")
        n = int(msg.n)
        if n.bit_length() != msg.key_bits or msg.key_bits < self.config.key_bits:
            raise ProtocolError(f"arbiter key of {n.bit_length()} bits, the configuration asks for {self.config.key_bits}")
        self._use_key(n)
        self._t0 = time.perf_counter()
        self.stage = "setup"

    def _on_hello(self, msg: m.PartyHello) -> None:
        self._check(msg, self.peers)
        p = self.peer[msg.sender]
        if p.hello:
            raise ProtocolError(f"second hello from {msg.sender}")
        if msg.config_digest != self.config.digest():
            raise ValidationError(f"{msg.sender} runs another training configuration (config digest differs)")
        if msg.rows != self.n or msg.rows_digest != self.rows_digest:
            raise ValidationError(
                f"rows are not aligned with {msg.sender}: {msg.rows} rows there, {self.n} here, or other join keys; "
                "rerun the match job"
            )
        if msg.features < 1 or msg.ciphers_per_row < 1:
            raise ValidationError(f"{msg.sender} contributes no features")
        p.features, p.slot_bits, p.ciphers_per_row, p.rows = msg.features, msg.slot_bits, msg.ciphers_per_row, msg.rows
        p.mask_seed, p.hello = msg.mask_seed, True
        assert self.pub is not None
        if pl.slots_per_cipher(self.pub, msg.slot_bits) * msg.ciphers_per_row < msg.features:
            raise ProtocolError(f"{msg.sender}'s packing layout does not fit its features")

    def _on_features(self, msg: m.FeatureCiphers) -> None:
        self._check(msg, self.peers)
        p = self.peer[msg.sender]
        if not p.hello or p.complete:
            raise ProtocolError(f"feature ciphertexts from {msg.sender} out of order")
        if msg.offset * p.ciphers_per_row != len(p.ciphers):
            raise ProtocolError(f"feature chunk at row {msg.offset} from {msg.sender} is out of order")
        assert self.pub is not None
        cs = pl.from_bytes(msg.data, self.pub.cipher_bytes, bound=self.pub.nsquare)
        if len(cs) != msg.rows * p.ciphers_per_row:
            raise ProtocolError(f"feature chunk from {msg.sender} has {len(cs)} ciphertexts for {msg.rows} rows")
        p.ciphers.extend(cs)
        if msg.final:
            if len(p.ciphers) != p.rows * p.ciphers_per_row:
                raise ProtocolError(f"{msg.sender} sent ciphertexts for {len(p.ciphers) // p.ciphers_per_row} of {p.rows} rows")
            p.complete = True

    def _ready(self) -> bool:
        return self.stage == "setup" and all(p.complete for p in self.peer.values())

    def _extra_guards(self) -> None:
        total = self.X.shape[1] + sum(p.features for p in self.peer.values())
        check_leakage_guards(self.n, self.batches, total, self.config.k_min)

    def _batch_order(self, epoch: int) -> np.ndarray:
        return _hash_order(len(self.batches), self.config.seed, f"epoch:{epoch}")

    def _position(self, epoch: int, batch: int) -> int:
        """Where batch id `batch` comes in `epoch`'s order (-1 if there is no such batch)."""
        hits = np.nonzero(self._batch_order(epoch) == batch)[0]
        return int(hits[0]) if len(hits) else -1

    def _weighted_sum(self, peer: str, idx: np.ndarray, exps: list[int]) -> bytes:
        """[[X_peer[idx]^T e]] for this party's exponents e, rerandomized, as bytes."""
        assert self.pub is not None and self.pool is not None
        p = self.peer[peer]
        out = []
        self._from_stock(p.ciphers_per_row)
        for k in range(p.ciphers_per_row):
            bases = [p.ciphers[int(i) * p.ciphers_per_row + k] for i in idx]
            c = pl.multi_exp(self.pub, bases, exps, self.executor)
            out.append(pl.rerandomize(self.pub, c, self.pool))
        return pl.to_bytes(out, self.pub.cipher_bytes)

    def _begin_training(self) -> list[Outgoing]:
        self._extra_guards()
        self.timings["setup_s"] = time.perf_counter() - self._t0
        self.stage = "train"
        self._epoch_t0 = time.perf_counter()
        return self._start_batch()

    def _on_grad_part(self, msg: Any, senders: Sequence[str]) -> list[Outgoing]:
        self._check(msg, senders)
        self._first_seen.setdefault(msg.sender, time.perf_counter())
        if self.stage != "train":
            # A peer may finish setup, or see the arbiter's EpochDone, before we do.
            if self.stage == "setup" or (self.stage == "wait_epoch" and msg.epoch == self.epoch + 1
                                         and self._position(msg.epoch, msg.batch) == 0):
                if len(self.early) >= 64:
                    raise ProtocolError(f"too many early messages from {msg.sender}")
                self.early.append(msg)
                return []
            raise ProtocolError(f"{msg.kind} from {msg.sender} while {self.stage}")
        cur = self.cur
        assert cur is not None
        if (msg.epoch, msg.batch) != (cur.epoch, cur.batch):
            # A peer may be one batch ahead of us (batch ids follow the epoch's shuffled order);
            # anything else is a replay or a bug.
            if msg.epoch == cur.epoch and self._position(msg.epoch, msg.batch) > self.batch_pos and len(self.early) < 64:
                self.early.append(msg)
                return []
            raise ProtocolError(f"{msg.kind} for epoch {msg.epoch} batch {msg.batch} from {msg.sender}; expected {cur.epoch}/{cur.batch}")
        if msg.sender in cur.received:
            raise ProtocolError(f"second {msg.kind} from {msg.sender} for epoch {msg.epoch} batch {msg.batch}")
        assert self.pub is not None
        cs = pl.from_bytes(msg.data, self.pub.cipher_bytes, bound=self.pub.nsquare)
        if len(cs) != self.cpr:
            raise ProtocolError(f"{msg.kind} from {msg.sender} has {len(cs)} ciphertexts, expected {self.cpr}")
        cur.received[msg.sender] = cs
        return self._maybe_request()

    def _maybe_request(self) -> list[Outgoing]:
        cur = self.cur
        assert cur is not None and self.pub is not None
        if cur.requested or set(cur.received) != set(self._grad_senders()):
            return []
        if self._setup_open:
            # Setup ends for this party when the slowest peer has finished its own setup (its
            # first training message is here), not when this party could start: otherwise
            # epoch 0 would carry the wait for, e.g., an irls host's [[s x]] rows.
            self._setup_open = False
            end = max(self._epoch_t0, *self._first_seen.values())
            self.timings["setup_s"], self._epoch_t0 = end - self._t0, end
        cur.own = self._own_part(cur)
        combined = []
        for k in range(self.groups):
            c = 1
            for cs in [*cur.received.values(), cur.own]:
                if k < len(cs):
                    c = pl.add(self.pub, c, cs[k])
            r = pl.random_mask(self.pub)
            cur.masks.append(r)
            combined.append(pl.add_plain(self.pub, c, r))
        cur.requested = True
        req = self._m(m.DecryptRequest, epoch=cur.epoch, batch=cur.batch, data=pl.to_bytes(combined, self.pub.cipher_bytes))
        return [(self.arbiter, req)]

    def _on_decrypted(self, msg: m.DecryptReply) -> list[Outgoing]:
        self._check(msg, [self.arbiter])
        cur = self.cur
        if self.stage != "train" or cur is None or not cur.requested or (msg.epoch, msg.batch) != (cur.epoch, cur.batch):
            raise ProtocolError(f"unexpected decrypt reply for epoch {msg.epoch} batch {msg.batch}")
        assert self.pub is not None
        vals = pl.from_bytes(msg.data, self.pub.plain_bytes, bound=self.pub.n)
        if len(vals) != self.groups:
            raise ProtocolError("decrypt reply has the wrong number of values")
        per = pl.slots_per_cipher(self.pub, self.slot_bits)
        f = self.out_slots
        slots: list[int] = []
        for k, (v, r) in enumerate(zip(vals, cur.masks)):
            slots += pl.unpack(pl.signed(self.pub, int(v) - r), min(per, f - k * per), self.slot_bits)
        remote = np.array(slots, dtype=np.float64) / float(1 << self.remote_frac)
        self._after_remote(cur, remote)
        return self._next()

    def _apply(self, cur: _Batch, xtd: np.ndarray) -> None:
        """Gradient step from X^T d over the batch (sums), with L2 except on the intercept."""
        grad = xtd / len(cur.idx) + self.config.l2 * self._l2_mask() * self.w
        self.w = self.w - self.config.lr(cur.epoch) * grad

    def _l2_mask(self) -> np.ndarray:
        return np.ones_like(self.w)

    def _next(self) -> list[Outgoing]:
        self.cur = None
        self.batch_pos += 1
        if self.batch_pos < len(self.batches):
            return self._start_batch()
        self.stage = "wait_epoch"
        return [(self.arbiter, self._m(m.LossShare, epoch=self.epoch, share=str(self._loss_share() % LOSS_MOD)))]

    def _on_epoch_done(self, msg: m.EpochDone) -> list[Outgoing]:
        self._check(msg, [self.arbiter])
        if self.stage != "wait_epoch" or msg.epoch != self.epoch:
            raise ProtocolError(f"epoch_done for epoch {msg.epoch} while {self.stage} in epoch {self.epoch}")
        self.losses.append(msg.loss)
        self.timings["epoch_s"].append(time.perf_counter() - self._epoch_t0)
        self.loss_part = 0.0
        if msg.stop:
            self.stage, self.stop_reason = "done", msg.reason
            return []
        self.epoch += 1
        self.batch_pos = 0
        self._epoch_t0 = time.perf_counter()
        self.stage = "train"
        return self._start_batch()

    def _replay_early(self, out: list[Outgoing]) -> list[Outgoing]:
        while True:
            if self.cur is None:
                return out
            waiting = [x for x in self.early if (x.epoch, x.batch) == (self.cur.epoch, self.cur.batch)]
            if not waiting:
                return out
            self.early = [x for x in self.early if all(x is not w for w in waiting)]
            for x in waiting:
                out += self.handle(x)

    @property
    def done(self) -> bool:
        return self.stage == "done"

    # -- resume: what a node persists after every completed epoch
    def snapshot(self) -> dict[str, Any]:
        """State after the last completed epoch (call when `stage == "train"` has just restarted,
        or `done`): weights, losses, epoch, and the peers' encrypted rows (so setup is not
        repeated). Contains no plaintext of any other party."""
        if self.stage not in ("train", "done") or (self.stage == "train" and self.batch_pos != 0):
            raise ProtocolError("snapshot only between epochs")
        assert self.pub is not None
        return {
            "role": self.role, "name": self.name, "job_id": self.job_id, "config_digest": self.config.digest(),
            "n": str(self.pub.n), "epoch": self.epoch, "stage": self.stage, "w": self.w.tolist(),
            "losses": list(self.losses), "stop_reason": self.stop_reason,
            "peers": {k: {"features": p.features, "slot_bits": p.slot_bits, "ciphers_per_row": p.ciphers_per_row,
                          "rows": p.rows, "mask_seed": p.mask_seed,
                          "ciphers": pl.to_bytes(p.ciphers, self.pub.cipher_bytes).hex()}
                      for k, p in self.peer.items()},
            **self._snapshot_extra(),
        }

    def _snapshot_extra(self) -> dict[str, Any]:
        return {}

    def restore(self, snap: dict[str, Any]) -> list[Outgoing]:
        """Resume from `snapshot()` (same data, config and job); returns the messages that
        start the next epoch (nothing if training had finished)."""
        if snap.get("role") != self.role or snap.get("name") != self.name or snap.get("job_id") != self.job_id:
            raise ValidationError("snapshot belongs to another role, party or job")
        if snap.get("config_digest") != self.config.digest():
            raise ValidationError("snapshot was taken under another training configuration")
        self._use_key(int(snap["n"]))
        self.w = np.array(snap["w"], dtype=np.float64)
        self.losses = list(snap["losses"])
        self.epoch = int(snap["epoch"])
        self.stop_reason = snap.get("stop_reason", "")
        for k, d in snap["peers"].items():
            p = self.peer[k]
            p.features, p.slot_bits, p.ciphers_per_row, p.rows = d["features"], d["slot_bits"], d["ciphers_per_row"], d["rows"]
            p.mask_seed, p.hello, p.complete = d["mask_seed"], True, True
            p.ciphers = pl.from_bytes(bytes.fromhex(d["ciphers"]), self.pub.cipher_bytes, bound=self.pub.nsquare)
        self._restore_extra(snap)
        self.batch_pos, self.cur, self.early, self.loss_part = 0, None, [], 0.0
        self._setup_open = False
        if snap["stage"] == "done":
            self.stage = "done"
            return []
        self.stage = "train"
        self._epoch_t0 = time.perf_counter()
        return self._start_batch()

    def _restore_extra(self, snap: dict[str, Any]) -> None:
        pass

    # -- to be provided by guest / host
    def _own_part(self, cur: _Batch) -> list[Any]:
        """Ciphertexts this party adds itself to what it received before the masked decryption."""
        return []

    def _grad_senders(self) -> list[str]:
        raise NotImplementedError

    def _start_batch(self) -> list[Outgoing]:
        raise NotImplementedError

    def _after_remote(self, cur: _Batch, remote: np.ndarray) -> None:
        raise NotImplementedError

    def _loss_share(self) -> int:
        raise NotImplementedError

    def handle(self, msg: m._Msg) -> list[Outgoing]:
        raise NotImplementedError


class GuestRole(_Party):
    """The brand: labels and its own features; holds the intercept.

    GuestRole(name, job_id, config, X_train, y_train, join_keys=..., hosts=[...], arbiter=...)
    where row i of X_train/y_train is the i-th aligned training row (same order at every party).
    """

    role = "guest"

    def __init__(self, name: str, job_id: str, config: TrainConfig, X: Any, y: Any, *, join_keys: Sequence[str],
                 hosts: Sequence[str], arbiter: str, executor: Executor | None = None,
                 obfuscators: "pl.ObfuscatorPool | Callable[[int], pl.ObfuscatorPool | None] | None" = None) -> None:
        Xg = check_features(X, f"guest {name}")
        self.y = check_labels(y)
        if len(self.y) != len(Xg):
            raise ValidationError(f"{len(self.y)} labels for {len(Xg)} rows")
        if not hosts:
            raise ValidationError("vertical training needs at least one host; use train_guest_only() otherwise")
        config.check_hosts(len(hosts))
        super().__init__(name, job_id, config, np.hstack([Xg, np.ones((len(Xg), 1))]), join_keys=join_keys,
                         peers=hosts, arbiter=arbiter, executor=executor, obfuscators=obfuscators)
        self.hosts = list(hosts)
        self._pending_hellos: list[m.PartyHello] = []
        if self.irls:
            # The anchor: exact LR on the guest's own rows. Training starts there (w_g = w0,
            # w_h = 0); its logits a_i give p_i = sigma(a_i) and the weights s_i = sigma'(a_i).
            fit = fit_exact_lr(self.X, self.y, config.l2)
            self.anchor = np.asarray(fit["logits"])
            self.p = 1.0 / (1.0 + np.exp(-self.anchor))
            self.s = self.p * (1.0 - self.p)
            self.anchor_loss = np.logaddexp(0.0, self.anchor) - self.y * self.anchor
            self.w = np.asarray(fit["w"], dtype=np.float64).copy()

    def _setup_extra(self, cpr: int) -> int:
        return self.n if self.irls else 0  # [[s_i]], one per row

    def _row_values(self) -> tuple[np.ndarray, int]:
        if self.irls:
            return self.X * self.s[:, None], IRLS_ROW_FRAC  # the hosts only ever need X_g^T S u_h
        return self.X, FEATURE_FRAC_BITS

    def start(self) -> list[Outgoing]:
        return []

    def _l2_mask(self) -> np.ndarray:
        mask = np.ones_like(self.w)
        mask[-1] = 0.0
        return mask

    def handle(self, msg: m._Msg) -> list[Outgoing]:
        out: list[Outgoing] = []
        if isinstance(msg, m.ArbiterKey):
            self._on_key(msg)
            hello = self._hello()
            extra = _encode_exponents(self.s, IRLS_FRAC_BITS) if self.irls else []
            ciphers = self._encrypt_own_rows(extra)
            rows = self.n * self.cpr
            chunks = self._feature_messages(ciphers[:rows])
            if self.irls:
                chunks += self._feature_messages(ciphers[rows:], m.WeightCiphers, per_row=1)
            for h in self.hosts:
                out.append((h, hello))
                out += [(h, c) for c in chunks]
            for early in self._pending_hellos:
                out += self.handle(early)
            self._pending_hellos = []
        elif isinstance(msg, m.PartyHello):
            if self.pub is None:
                self._check(msg, self.hosts)
                self._pending_hellos.append(msg)
                return []
            if msg.role != "host" or not msg.mask_seed:
                raise ProtocolError(f"hello from {msg.sender} is not a host's")
            self._on_hello(msg)
        elif isinstance(msg, m.FeatureCiphers):
            if self.pub is None:
                self._check(msg, self.hosts)
                self._pending_hellos.append(msg)  # type: ignore[arg-type]
                return []
            self._on_features(msg)
        elif isinstance(msg, m.GuestGradPart):
            return self._replay_early(self._on_grad_part(msg, self.hosts))
        elif isinstance(msg, m.DecryptReply):
            return self._replay_early(self._on_decrypted(msg))
        elif isinstance(msg, m.EpochDone):
            return self._replay_early(self._on_epoch_done(msg))
        else:
            raise ProtocolError(f"the guest does not take {msg.kind!r} messages")  # type: ignore[attr-defined]
        if self._ready():
            out += self._replay_early(self._begin_training())
        return out

    def _grad_senders(self) -> list[str]:
        return self.hosts

    def _start_batch(self) -> list[Outgoing]:
        b = int(self._batch_order(self.epoch)[self.batch_pos])
        idx = self.batches[b]
        Xb, yb = self.X[idx], self.y[idx]
        ug = Xb @ self.w
        if self.irls:
            # d_i = c_i + s_i u_h,i with c_i = p_i - y_i + s_i (u_g,i - a_i); the surrogate loss
            # l(a) + (p - y)(u - a) + s/2 (u - a)^2, guest's part: everything without u_h.
            p, s, r = self.p[idx], self.s[idx], ug - self.anchor[idx]
            dg = p - yb + s * r
            self.loss_part += float(np.sum(self.anchor_loss[idx] + (p - yb) * r + 0.5 * s * r * r))
            exps = _encode_exponents(dg, C_FRAC_BITS)
        else:
            dg = 0.25 * ug + 0.5 - yb
            self.loss_part += float(np.sum(LOG2 + (0.5 - yb) * ug + 0.125 * ug * ug))
            exps = _encode_exponents(dg)
        cur = _Batch(self.epoch, b, idx, self.w.copy(), Xb.T @ dg)
        self.cur = cur
        return [(h, self._m(m.HostGradPart, epoch=self.epoch, batch=b, data=self._weighted_sum(h, idx, exps)))
                for h in self.hosts]

    def _after_remote(self, cur: _Batch, remote: np.ndarray) -> None:
        self._apply(cur, cur.plain + remote)

    def _loss_share(self) -> int:
        share = int(round(self.loss_part * float(1 << LOSS_FRAC_BITS)))
        for h in self.hosts:
            share += _loss_mask(self.peer[h].mask_seed, self.epoch)
        return share

    def model(self) -> dict[str, Any]:
        """The guest's model part: one weight per feature column, then the intercept."""
        return {"weights": self.w[:-1].tolist(), "intercept": float(self.w[-1])}


class HostRole(_Party):
    """A partner: features only.

    HostRole(name, job_id, config, X_train, join_keys=..., guest=..., hosts=[all hosts], arbiter=...)
    """

    role = "host"

    def __init__(self, name: str, job_id: str, config: TrainConfig, X: Any, *, join_keys: Sequence[str],
                 guest: str, hosts: Sequence[str], arbiter: str, executor: Executor | None = None,
                 mask_seed: str | None = None,
                 obfuscators: "pl.ObfuscatorPool | Callable[[int], pl.ObfuscatorPool | None] | None" = None) -> None:
        others = [h for h in hosts if h != name]
        config.check_hosts(len(others) + 1)
        super().__init__(name, job_id, config, X, join_keys=join_keys, peers=[guest, *others], arbiter=arbiter,
                         executor=executor, obfuscators=obfuscators)
        self.guest = guest
        self.other_hosts = others
        self.mask_seed = mask_seed or secrets.token_hex(32)
        self._pending: list[m._Msg] = []
        self.weights: list[Any] = []  # irls: the guest's [[s_i]], one per training row
        self.weights_complete = not self.irls
        self.sx: list[Any] = []  # irls: [[s_i x_i]] = [[s_i]]^{pack(x_i)}, cpr per row, this host's own

    @property
    def out_slots(self) -> int:
        return self.X.shape[1] + (1 if self.irls else 0)

    def start(self) -> list[Outgoing]:
        return []

    def handle(self, msg: m._Msg) -> list[Outgoing]:
        out: list[Outgoing] = []
        if isinstance(msg, m.ArbiterKey):
            self._on_key(msg)
            ciphers = self._encrypt_own_rows()
            chunks = self._feature_messages(ciphers)
            out.append((self.guest, self._hello(self.mask_seed)))
            out += [(self.guest, c) for c in chunks]
            for h in self.other_hosts:
                out.append((h, self._hello()))
                if not self.irls:  # irls: other hosts get [[s_i x_i]] once the guest's weights are in
                    out += [(h, c) for c in chunks]
            pending, self._pending = self._pending, []
            for early in pending:
                out += self.handle(early)
        elif isinstance(msg, (m.PartyHello, m.FeatureCiphers, m.WeightCiphers)) and self.pub is None:
            self._check(msg, self.peers)
            self._pending.append(msg)
            return []
        elif isinstance(msg, m.WeightCiphers):
            out += self._on_weights(msg)
        elif isinstance(msg, m.PartyHello):
            if msg.mask_seed:
                raise ProtocolError("only a host sends a mask seed, and only to the guest")
            expected = "guest" if msg.sender == self.guest else "host"
            if msg.role != expected:
                raise ProtocolError(f"{msg.sender} says it is a {msg.role}, the job says {expected}")
            self._on_hello(msg)
        elif isinstance(msg, m.FeatureCiphers):
            self._on_features(msg)
        elif isinstance(msg, m.HostGradPart):
            return self._replay_early(self._on_grad_part(msg, self.peers))
        elif isinstance(msg, m.DecryptReply):
            return self._replay_early(self._on_decrypted(msg))
        elif isinstance(msg, m.EpochDone):
            return self._replay_early(self._on_epoch_done(msg))
        else:
            raise ProtocolError(f"a host does not take {msg.kind!r} messages")  # type: ignore[attr-defined]
        if self._ready():
            out += self._replay_early(self._begin_training())
        return out

    def _on_weights(self, msg: m.WeightCiphers) -> list[Outgoing]:
        self._check(msg, [self.guest])
        if not self.irls or self.weights_complete or not self.peer[self.guest].hello:
            raise ProtocolError(f"weight ciphertexts from {msg.sender} out of order (loss={self.config.loss})")
        if msg.offset != len(self.weights):
            raise ProtocolError(f"weight chunk at row {msg.offset} from {msg.sender} is out of order")
        assert self.pub is not None
        cs = pl.from_bytes(msg.data, self.pub.cipher_bytes, bound=self.pub.nsquare)
        if len(cs) != msg.rows:
            raise ProtocolError(f"weight chunk from {msg.sender} has {len(cs)} ciphertexts for {msg.rows} rows")
        self.weights.extend(cs)
        if not msg.final:
            return []
        if len(self.weights) != self.n:
            raise ProtocolError(f"{msg.sender} sent weights for {len(self.weights)} of {self.n} rows")
        self.weights_complete = True
        t0 = time.perf_counter()
        self.sx = self._weighted_rows()
        self.timings["weighted_rows_s"] = time.perf_counter() - t0
        if not self.other_hosts:
            return []
        # Another host l needs [[X_h^T S u_l]]: it gets these rows, rerandomized (it holds the
        # same [[s_i]] and could otherwise test guesses of x_i by recomputing [[s_i]]^{x_i}).
        assert self.pub is not None and self.pool is not None
        self._provision(len(self.sx))
        fresh = [pl.rerandomize(self.pub, c, self.pool) for c in self.sx]
        chunks = self._feature_messages(fresh)
        return [(h, c) for h in self.other_hosts for c in chunks]

    def _setup_extra(self, cpr: int) -> int:
        # irls with other hosts: its [[s_i x_i]] rows go to them rerandomized
        return self.n * cpr if self.irls and self.other_hosts else 0

    def _weighted_rows(self) -> list[Any]:
        """[[s_i x_i]] per row and slot group: the guest's [[s_i]] raised to the packed features."""
        assert self.pub is not None
        per = pl.slots_per_cipher(self.pub, self.slot_bits)
        Xi = np.rint(self.X * float(1 << FEATURE_FRAC_BITS)).astype(np.int64).tolist()
        bases, exps = [], []
        for w, row in zip(self.weights, Xi):
            for k in range(0, len(row), per):
                bases.append(w)
                exps.append(pl.pack(row[k : k + per], self.slot_bits))
        return pl.pow_each(self.pub, bases, exps, self.executor)

    def _ready(self) -> bool:
        return super()._ready() and self.weights_complete

    def _grad_senders(self) -> list[str]:
        return self.peers

    def _start_batch(self) -> list[Outgoing]:
        b = int(self._batch_order(self.epoch)[self.batch_pos])
        idx = self.batches[b]
        Xb = self.X[idx]
        uh = Xb @ self.w
        if self.irls:
            # Everything of X_h^T d = X_h^T c + X_h^T S u_h is remote: the guest sends [[X_h^T c]],
            # this host adds [[X_h^T S u_h]] from the guest's [[s_i]] (`_own_part`).
            cur = _Batch(self.epoch, b, idx, self.w.copy(), np.zeros(self.X.shape[1]))
            exps = _encode_exponents(uh)
        else:
            self.loss_part += float(0.125 * np.dot(uh, uh))
            cur = _Batch(self.epoch, b, idx, self.w.copy(), Xb.T @ (0.25 * uh))
            exps = _encode_exponents(0.25 * uh)
        self.cur = cur
        out: list[Outgoing] = [(self.guest, self._m(m.GuestGradPart, epoch=self.epoch, batch=b,
                                                    data=self._weighted_sum(self.guest, idx, exps)))]
        for h in self.other_hosts:
            out.append((h, self._m(m.HostGradPart, epoch=self.epoch, batch=b, data=self._weighted_sum(h, idx, exps))))
        return out

    def _own_part(self, cur: _Batch) -> list[Any]:
        """irls: [[X_h^T S u_h]] = prod_i [[s_i x_i]]^{u_i} per slot group, and [[sum_i s_i u_i^2]]
        = prod_i [[s_i]]^{u_i^2}, shifted into the slot after the features."""
        if not self.irls:
            return []
        assert self.pub is not None
        uh = self.X[cur.idx] @ cur.w_start
        exps = _encode_exponents(uh)
        own = []
        for k in range(self.cpr):
            bases = [self.sx[int(i) * self.cpr + k] for i in cur.idx]
            own.append(pl.multi_exp(self.pub, bases, exps, self.executor))
        q = pl.multi_exp(self.pub, [self.weights[int(i)] for i in cur.idx], _encode_exponents_sq(uh), self.executor)
        per = pl.slots_per_cipher(self.pub, self.slot_bits)
        f = self.X.shape[1]
        # q is at 2^-(20+20); the slots at 2^-56: shift by 2^16 and by the slot's position
        q = pl.mul_scalar(self.pub, q, 1 << (IRLS_REMOTE_FRAC - IRLS_FRAC_BITS - EXP_FRAC_BITS + (f % per) * self.slot_bits))
        if f % per:
            own[-1] = pl.add(self.pub, own[-1], q)
        else:
            own.append(q)
        return own

    def _after_remote(self, cur: _Batch, remote: np.ndarray) -> None:
        if self.irls:
            # remote = [X_h^T (c + S u_h), sum s u_h^2]. With u_h = X_h w, w.X_h^T (c + S u_h)
            # = sum c u_h + sum s u_h^2; this host's surrogate share is sum c u_h + sum s u_h^2 / 2.
            grad, q = remote[:-1], float(remote[-1])
            self.loss_part += float(np.dot(cur.w_start, grad)) - 0.5 * q
            self._apply(cur, grad)
            return
        # remote = X_h^T (dg + 0.25 sum_{l!=k} uh_l); w_start . remote is this host's loss cross term.
        self.loss_part += float(np.dot(cur.w_start, remote))
        self._apply(cur, cur.plain + remote)

    def _loss_share(self) -> int:
        return int(round(self.loss_part * float(1 << LOSS_FRAC_BITS))) - _loss_mask(self.mask_seed, self.epoch)

    def _snapshot_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"mask_seed": self.mask_seed}
        if self.irls:
            assert self.pub is not None
            extra["weights"] = pl.to_bytes(self.weights, self.pub.cipher_bytes).hex()
            extra["sx"] = pl.to_bytes(self.sx, self.pub.cipher_bytes).hex()
        return extra

    def _restore_extra(self, snap: dict[str, Any]) -> None:
        self.mask_seed = snap["mask_seed"]
        if self.irls:
            assert self.pub is not None
            self.weights = pl.from_bytes(bytes.fromhex(snap["weights"]), self.pub.cipher_bytes, bound=self.pub.nsquare)
            self.sx = pl.from_bytes(bytes.fromhex(snap["sx"]), self.pub.cipher_bytes, bound=self.pub.nsquare)
            if len(self.weights) != self.n or len(self.sx) != self.n * self.cpr:
                raise ValidationError("snapshot holds the wrong number of weight ciphertexts")
            self.weights_complete = True

    def model(self) -> dict[str, Any]:
        return {"weights": self.w.tolist()}


class ArbiterRole:
    """The coordinator's part: holds the Paillier key, decrypts masked aggregates (one request
    per party and batch, a handful of ciphertexts each), adds the loss shares and decides when
    to stop. It never receives a party-to-party message.

    ArbiterRole(name, job_id, config, guest=..., hosts=[...], rows=<matched training rows>, keypair=None)
    """

    role = "arbiter"
    MAX_CIPHERS_PER_REQUEST = 8

    def __init__(self, name: str, job_id: str, config: TrainConfig, *, guest: str, hosts: Sequence[str],
                 rows: int, keypair: tuple[pl.PublicKey, pl.PrivateKey] | None = None) -> None:
        config.check_keys()
        config.check_hosts(len(hosts))
        self.name, self.job_id, self.config = name, job_id, config
        self.guest, self.hosts = guest, list(hosts)
        self.parties = [guest, *self.hosts]
        self.keypair = keypair
        if rows < 1:
            raise ValidationError("the arbiter needs the number of matched training rows")
        self.batches_per_epoch: int | None = len(make_batches(rows, config.batch_size, config.seed))
        self.served: set[tuple[str, int, int]] = set()
        self.shares: dict[str, int] = {}
        self.epoch = 0
        self.losses: list[float] = []
        self.rows = rows
        self.finished = False
        self.decrypted_values = 0
        self._score_shares: dict[str, dict[str, m.ScoreShare]] = {}

    def _m(self, cls: type, **kw: Any) -> Any:
        return cls(job_id=self.job_id, sender=self.name, **kw)

    def start(self) -> list[Outgoing]:
        if self.keypair is None:
            self.keypair = pl.generate_keypair(self.config.key_bits)
        pub = self.keypair[0]
        key = self._m(m.ArbiterKey, n=str(pub.n), key_bits=pub.bits, config_digest=self.config.digest())
        return [(p, key) for p in self.parties]

    def handle(self, msg: m._Msg) -> list[Outgoing]:
        if msg.job_id != self.job_id:
            raise ProtocolError(f"message for job {msg.job_id!r} reached job {self.job_id!r}")
        if msg.sender not in self.parties:
            raise ProtocolError(f"{msg.sender!r} is not a party of job {self.job_id}")
        if isinstance(msg, m.DecryptRequest):
            return self._decrypt(msg)
        if isinstance(msg, m.LossShare):
            return self._loss(msg)
        if isinstance(msg, m.ScoreShare):
            return self._score(msg)
        raise ProtocolError(f"the arbiter does not take {msg.kind!r} messages")  # type: ignore[attr-defined]

    def _decrypt(self, msg: m.DecryptRequest) -> list[Outgoing]:
        assert self.keypair is not None
        pub, priv = self.keypair
        if self.finished:
            raise ProtocolError("training is over; the arbiter decrypts nothing more")
        key = (msg.sender, msg.epoch, msg.batch)
        if key in self.served or msg.epoch != self.epoch or (
                self.batches_per_epoch is not None and msg.batch >= self.batches_per_epoch):
            raise ProtocolError(f"decrypt request {msg.epoch}/{msg.batch} from {msg.sender} is a replay or out of round")
        cs = pl.from_bytes(msg.data, pub.cipher_bytes, bound=pub.nsquare)
        if not 1 <= len(cs) <= self.MAX_CIPHERS_PER_REQUEST:
            raise ProtocolError(f"decrypt request with {len(cs)} ciphertexts (1..{self.MAX_CIPHERS_PER_REQUEST} per batch)")
        self.served.add(key)
        vals = pl.decrypt(priv, cs)
        self.decrypted_values += len(vals)
        return [(msg.sender, self._m(m.DecryptReply, epoch=msg.epoch, batch=msg.batch,
                                     data=pl.to_bytes(vals, pub.plain_bytes)))]

    def _loss(self, msg: m.LossShare) -> list[Outgoing]:
        if msg.epoch != self.epoch or msg.sender in self.shares or self.finished:
            raise ProtocolError(f"loss share for epoch {msg.epoch} from {msg.sender} is out of round")
        self.shares[msg.sender] = int(msg.share) % LOSS_MOD
        if set(self.shares) != set(self.parties):
            return []
        total = sum(self.shares.values()) % LOSS_MOD
        if total >= LOSS_MOD // 2:
            total -= LOSS_MOD
        loss = total / float(1 << LOSS_FRAC_BITS) / float(self.rows)
        self.losses.append(loss)
        stop, reason = False, ""
        if len(self.losses) >= 2 and abs(self.losses[-2] - loss) < self.config.tol:
            stop, reason = True, f"converged: loss changed by < {self.config.tol}"
        elif self.epoch + 1 >= self.config.max_epochs:
            stop, reason = True, f"reached max_epochs={self.config.max_epochs}"
        elif not math.isfinite(loss):
            stop, reason = True, "loss is not finite"
        done = self._m(m.EpochDone, epoch=self.epoch, loss=loss, stop=stop, reason=reason)
        self.shares = {}
        self.epoch += 1
        self.served = {k for k in self.served if k[1] >= self.epoch}
        self.finished = stop
        return [(p, done) for p in self.parties]

    def _score(self, msg: m.ScoreShare) -> list[Outgoing]:
        got = self._score_shares.setdefault(msg.request_id, {})
        if msg.sender in got:
            raise ProtocolError(f"second score share from {msg.sender} for request {msg.request_id}")
        got[msg.sender] = msg
        if set(got) != set(self.parties):
            return []
        del self._score_shares[msg.request_id]
        scores = combine_score_shares(list(got.values()))
        return [(self.guest, self._m(m.Scores, request_id=msg.request_id, rows=len(scores),
                                     data=scores.astype(">f8").tobytes()))]

    def snapshot(self) -> dict[str, Any]:
        """Secret (contains the private key): store encrypted at rest."""
        assert self.keypair is not None
        return {"role": "arbiter", "job_id": self.job_id, "key": self.keypair[1].to_dict(), "epoch": self.epoch,
                "losses": list(self.losses), "finished": self.finished}

    def restore(self, snap: dict[str, Any]) -> None:
        if snap.get("role") != "arbiter" or snap.get("job_id") != self.job_id:
            raise ValidationError("snapshot belongs to another role or job")
        priv = pl.PrivateKey.from_dict(snap["key"])
        self.keypair = (priv.public, priv)
        self.epoch, self.losses, self.finished = int(snap["epoch"]), list(snap["losses"]), bool(snap["finished"])
        self.served, self.shares = set(), {}


# ------------------------------------------------------------------------------------ scoring


def score_share(*, job_id: str, sender: str, request_id: str, partial: np.ndarray, mask_seeds: Sequence[str],
                role: str) -> m.ScoreShare:
    """A party's masked partial logits for `request_id` (rows in the agreed order).

    Host: partial + mask(own seed). Guest: partial - sum of masks(every host's seed). The masks
    cancel only in the sum at the arbiter, which so learns the combined logit (the score) and
    nothing about either part."""
    p = np.asarray(partial, dtype=np.float64)
    if not np.isfinite(p).all():
        raise ValidationError("partial predictions must be finite")
    fixed = np.rint(p * float(1 << SCORE_FRAC_BITS)).astype(np.int64).astype(np.uint64)
    total = fixed.copy()
    for seed in mask_seeds:
        mask = _mask_stream(seed, f"score:{request_id}", len(p))
        total = total + mask if role == "host" else total - mask  # uint64 arithmetic wraps mod 2^64
    return m.ScoreShare(job_id=job_id, sender=sender, request_id=request_id, rows=len(p),
                        data=total.astype(">u8").tobytes())


def combine_score_shares(shares: Sequence[m.ScoreShare]) -> np.ndarray:
    """The arbiter's sum of every party's shares -> 0-1 scores."""
    rows = {s.rows for s in shares}
    if len(rows) != 1:
        raise ProtocolError(f"score shares disagree on the number of rows: {sorted(rows)}")
    total = np.zeros(rows.pop(), dtype=np.uint64)
    for s in shares:
        if len(s.data) != 8 * s.rows:
            raise ProtocolError("score share payload has the wrong length")
        total = total + np.frombuffer(s.data, dtype=">u8").astype(np.uint64)
    logit = total.view(np.int64).astype(np.float64) / float(1 << SCORE_FRAC_BITS)
    return 1.0 / (1.0 + np.exp(-logit))


# --------------------------------------------------------------------------- guest-only model


def train_guest_only(X: Any, y: Any, config: TrainConfig) -> dict[str, Any]:
    """The guest's features alone, trained the same way in plaintext: the baseline that shows
    the partner's value. Taylor: same batches, schedule, L2 and early stopping. IRLS: the
    surrogate expanded at the guest's own exact LR is minimised by that LR itself (the anchor
    the federated training starts from), so the guest-only model *is* the anchor."""
    Xg = check_features(X, "guest")
    yy = check_labels(y)
    Xa = np.hstack([Xg, np.ones((len(Xg), 1))])
    batches = make_batches(len(Xa), config.batch_size, config.seed)
    check_leakage_guards(len(Xa), batches, Xa.shape[1], config.k_min)
    if config.loss == "irls":
        fit = fit_exact_lr(Xa, yy, config.l2)
        wa = np.asarray(fit["w"])
        return {"weights": wa[:-1].tolist(), "intercept": float(wa[-1]), "losses": [fit["loss"]],
                "epochs": int(fit["iterations"])}
    w = np.zeros(Xa.shape[1])
    l2mask = np.ones_like(w)
    l2mask[-1] = 0.0
    losses: list[float] = []
    for epoch in range(config.max_epochs):
        total = 0.0
        for b in _hash_order(len(batches), config.seed, f"epoch:{epoch}"):
            idx = batches[int(b)]
            u = Xa[idx] @ w
            d = 0.25 * u + 0.5 - yy[idx]
            total += float(np.sum(LOG2 + (0.5 - yy[idx]) * u + 0.125 * u * u))
            w = w - config.lr(epoch) * (Xa[idx].T @ d / len(idx) + config.l2 * l2mask * w)
        losses.append(total / len(Xa))
        if len(losses) >= 2 and abs(losses[-2] - losses[-1]) < config.tol:
            break
    return {"weights": w[:-1].tolist(), "intercept": float(w[-1]), "losses": losses, "epochs": len(losses)}


def guest_partial(model: dict[str, Any], X: Any) -> np.ndarray:
    return check_features(X, "guest") @ np.asarray(model["weights"]) + float(model.get("intercept", 0.0))


def host_partial(model: dict[str, Any], X: Any) -> np.ndarray:
    return check_features(X, "host") @ np.asarray(model["weights"])
