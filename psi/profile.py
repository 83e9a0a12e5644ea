"""`profile`: aggregates of the partner's agreed columns over the overlap, for the brand, with
every cell below k_min withheld from the brand cryptographically (a gated reveal).

An intersection-sum in the style of Google's Private Join and Compute. The brand (requester, no
values) learns which cells reach k_min and their values; the partner (responder, owner of the
values) learns |A∩B|. Each side has a fresh Paillier key per job (P: partner's, B: brand's):

    requester (brand, key B)                              responder (partner, key P)
    Hello(profile columns, |A|)            ─────────▶
                                           ◀─────────     Ready(|B|, n_P, slot layout)
                                           ◀─────────     resp_single: π(H(B)^b)
                                           ◀─────────     resp_cipher: Enc_P(packed row), π order
    req_single: σ(H(A)^a)                  ─────────▶
                                           ◀─────────     resp_tags: ρ(T(σ(H(A)^a)^b))  (shuffled)
    matched π-rows = those whose T(π(H(B)^b)^a) is in resp_tags
    MaskedSum: Π Enc_P(row) · Enc_P(Σ_s r_s·2^off_s)  ───▶  decrypt, unpack x_s = S_s + r_s
    GatePowers: n_B; Enc_B(r_c^j), j = 0..k_min,       ───▶  per count slot c: a_j with
                per count slot c                              Σ_j a_j r^j = P(x_c − r);
                                                              u_c = Enc_B(ρ_c·P(count_c)),
                                           ◀─────────     GatedValues: u_c, v_s = u_c^(x_s)
    u_c = 0: c and the slots it gates are suppressed; else S_s = v_s/u_c − r_s
    Result(|A∩B|)                          ─────────▶

Slots. Each row packs, per categorical value, a one-hot count and, per numeric column, the
fixed-point value and a present-count, into slots of one plaintext mod n_P. A slot whose sum is
< 2^b (b = 24 for counts: at most 2^24−1 rows; 64 for sums: values < 2^40 per row) is b + 41 bits
wide, so S_s + r_s with r_s uniform in [0, 2^(b+40)) never carries into the next slot.

The gate. P(z) = z(z−1)…(z−k_min+1) is 0 for z < k_min; for k_min ≤ z < 2^24 it is a product of
non-zero integers below 2^24, none divisible by either (≥ 2^511) prime factor of n_B, so P(z) is
a unit mod n_B. Each count slot c gates itself; a numeric column's present-count gates its sum.

What each message reveals (semi-honest parties):
- Ready, resp_single, resp_cipher → brand: |B| and the layout (the agreed vocabulary); points are
  DDH-blinded, values are Paillier ciphertexts under P: nothing else.
- resp_tags → brand: which of the partner's π-shuffled rows matched — so |A∩B|, but not which of
  its own rows matched nor anything about a row's values.
- MaskedSum → partner: per slot x_s = S_s + r_s, within statistical distance 2^-40 of uniform
  whatever S_s is; the ciphertext is re-randomised, so it cannot tell which rows went in.
- GatePowers → partner: ciphertexts under the brand's fresh key (semantically secure): nothing.
  The partner uses its own k_min and its own layout, whatever the brand asks.
- GatedValues → brand: for count_c < k_min, u_c and every v_s it gates decrypt to 0 — nothing.
  For count_c ≥ k_min, ρ_c·P(count_c) is uniform in Z*_{n_B} (so u_c hides count_c beyond
  "passes"), and v_s/u_c = x_s gives exactly S_s. All are re-randomised by the partner, so the
  encryption randomness (recoverable by the key holder) carries nothing.
- Result → partner: |A∩B|.

Not hidden: the brand's node counts the matched tags, so it knows |A∩B| even below k_min (the
result then reports it as suppressed). Security is semi-honest: a brand that sent the powers of
some r′ ≠ r_c would open a small cell; a partner could return arbitrary values. Values stay
packed in one or two ciphertexts per row whatever the number of columns.
"""

from __future__ import annotations

import enum
import functools
import secrets
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from confide.errors import ProtocolError, ValidationError
from psi import _paillier, crypto
from psi.executor import BlindingExecutor
from psi.inputs import PreparedItems
from psi.messages import (
    MAX_GATE_BYTES,
    MAX_K_MIN,
    MIN_PAILLIER_BITS,
    GatedValues,
    GatePowers,
    Hello,
    MaskedSum,
    Message,
    Mode,
    Points,
    Ready,
    Result,
    Stream,
    cipher_bytes,
)
from psi.roles import MAX_CHUNK_ROWS, PsiOutcome, RoleSecrets, SessionParams, _Role

STAT_BITS = 40  # statistical hiding of each slot's mask
COUNT_BITS = 24  # every count is below 2^24: the partner refuses more rows
VALUE_BITS = 40
MAX_ROWS = 2**COUNT_BITS - 1
MAX_SCALED_VALUE = 2**VALUE_BITS  # per row, so a sum stays below 2^(24+40)
OTHER = "__other__"
KINDS = ("count", "sum", "n")  # a categorical value's count; a numeric's sum and present-count


def _bound_bits(kind: str) -> int:
    """b with every sum of a slot of this kind < 2^b."""
    return COUNT_BITS + VALUE_BITS if kind == "sum" else COUNT_BITS


def _slot_width(kind: str) -> int:
    return _bound_bits(kind) + STAT_BITS + 1  # sum + mask < 2^b + 2^(b+40) < 2^(b+41)


SLOT_BITS = _slot_width("count")  # 65, carried in Ready as the layout version; sums take 105


@dataclass(frozen=True)
class _Slot:
    """Where a layout entry lives in the packed plaintexts, and which count slot gates it."""

    cipher: int
    offset: int
    width: int
    bound: int
    gate: int  # layout index of the gating count slot (itself, for counts)


def _packing(layout: Sequence[tuple[str, str, str]], n_bits: int) -> list[_Slot]:
    """Slots in layout order, packed greedily into plaintexts of n_bits − 2 bits (< n, so the
    masked sums never wrap). Raises ProtocolError for a layout that is not well-formed."""
    capacity = n_bits - 2
    index = {entry: i for i, entry in enumerate(layout)}
    if len(index) != len(layout):
        raise ProtocolError("the profile layout repeats a slot")
    out: list[_Slot] = []
    cipher, offset = 0, 0
    for column, kind, value in layout:
        if kind not in KINDS:
            raise ProtocolError(f"the profile layout has a slot of unknown kind {kind!r}")
        gate = index[(column, kind, value)]
        if kind == "sum":
            if (column, "n", "") not in index:
                raise ProtocolError(f"the profile layout has no present-count for {column!r}")
            gate = index[(column, "n", "")]
        width = _slot_width(kind)
        if offset + width > capacity:
            cipher, offset = cipher + 1, 0
        out.append(_Slot(cipher, offset, width, _bound_bits(kind), gate))
        offset += width
    return out


def _gates(slots: list[_Slot]) -> list[int]:
    """Layout indices of the count slots, in layout order."""
    return sorted({s.gate for s in slots})


def gate_coefficients(x: int, k: int, n: int) -> list[int]:
    """a_0..a_k mod n with Σ_j a_j·r^j = P(x − r) = Π_{t<k} (x − t − r): the gate polynomial at
    count = x − r, as a polynomial in the (unknown to the caller) mask r."""
    a = [1]
    for t in range(k):
        y = (x - t) % n
        nxt = [0] * (len(a) + 1)
        for j, c in enumerate(a):
            nxt[j] = (nxt[j] + y * c) % n
            nxt[j + 1] = (nxt[j + 1] - c) % n
        a = nxt
    return a


def _gate_batch(jobs: list[tuple[list[int], int, list[int]]], n: int, k: int) -> list[tuple[int, list[int]]]:
    """Executor task: (powers Enc_B(r^j), x of the count slot, xs of the gated slots) → (u, vs)."""
    return [_paillier.eval_gate(n, powers, gate_coefficients(x, k, n), xs) for powers, x, xs in jobs]


class _PStage(enum.Enum):
    new = "new"
    hello_sent = "hello_sent"
    sent = "sent"  # requester: round one sent, waiting for the responder's streams
    await_gated = "await_gated"  # requester: masked sums and gate powers sent
    await_hello = "await_hello"
    await_req_single = "await_req_single"
    await_masked_sum = "await_masked_sum"
    await_gate_powers = "await_gate_powers"
    await_result = "await_result"
    done = "done"


def _check_k_min(spec: "ProfileSpec") -> None:
    if not 1 <= spec.k_min <= MAX_K_MIN:
        raise ValidationError(f"profile k_min must lie in 1..{MAX_K_MIN}, not {spec.k_min}")


@dataclass(frozen=True)
class ProfileSpec:
    """The agreed profile: partner columns, fixed-point scale of numerics, k_min."""

    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    scale: int = 100
    k_min: int = 50
    max_categories: int = 64
    # The agreed value vocabulary per categorical column (values outside it count as OTHER).
    # Without it the partner's own vocabulary of the column is used — and thereby revealed.
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return sorted([*self.categorical, *self.numeric])


@dataclass
class ProfileCell:
    column: str
    kind: str  # "count" (categorical value), "sum", "mean"
    value: str  # the category ("" for numerics)
    result: float | int | None  # None when suppressed
    suppressed: bool


@dataclass
class ProfileResult:
    intersection_size: int | None  # None when below k_min
    suppressed: bool
    cells: list[ProfileCell] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "intersection_size": self.intersection_size,
            "suppressed": self.suppressed,
            "cells": [c.__dict__ for c in self.cells],
        }


class _ProfileRole(_Role):
    _stage: _PStage

    @property
    def done(self) -> bool:
        return self._stage is _PStage.done


class ProfileResponder(_ProfileRole):
    """The partner: holds the values and its Paillier key; learns |A∩B| only."""

    def __init__(
        self,
        params: SessionParams,
        items: PreparedItems,
        values: dict[str, Sequence[object]],
        spec: ProfileSpec,
        executor: BlindingExecutor | None = None,
        secrets: RoleSecrets | None = None,
        chunk_rows: int = MAX_CHUNK_ROWS,
        paillier_key: Any = None,
    ) -> None:
        """`values[column][row]` for every agreed column (rows as in `items.rows_of`).
        `paillier_key`: test-only injection of a (smaller, pre-generated) key; production
        generates a fresh 2048-bit key per job."""
        if params.mode is not Mode.profile:
            raise ValidationError("ProfileResponder needs a profile-mode session")
        super().__init__(params, items, executor, secrets, chunk_rows)
        _check_k_min(spec)
        if len(items.values) > MAX_ROWS:
            raise ValidationError(f"a profile takes at most {MAX_ROWS} distinct partner identifiers")
        for c in spec.columns:
            if c not in values:
                raise ValidationError(f"profile column {c!r} is missing from the partner's data")
        self.spec = spec
        self._priv = paillier_key or _paillier.generate(2048)
        self._n = int(self._priv.public_key.n)
        self._layout, self._slots, self._plain = self._pack(values)
        if not self._layout:
            raise ValidationError("the profile has no cells: no agreed column has a value")
        self._gate_of = _gates(self._slots)
        self._stage = _PStage.await_hello
        self._order = self._shuffler.permutation(len(items.values))
        self._peer_count = 0
        self._tags: list[bytes] = []
        self._x: list[int] = []  # masked slot sums S_s + r_s, statistically hidden from us

    def _pack(
        self, values: dict[str, Sequence[object]]
    ) -> tuple[list[tuple[str, str, str]], list[_Slot], list[list[int]]]:
        rows = self.items.first_row.tolist()  # a duplicated identifier keeps its first row
        layout: list[tuple[str, str, str]] = []
        for c in sorted(self.spec.categorical):
            if c in self.spec.categories:
                seen = sorted(set(self.spec.categories[c]))[: self.spec.max_categories - 1] + [OTHER]
            else:
                seen = sorted({str(values[c][r]) for r in rows if values[c][r] not in (None, "")})
                if len(seen) > self.spec.max_categories:
                    seen = seen[: self.spec.max_categories - 1] + [OTHER]
            layout.extend((c, "count", v) for v in seen)
        for c in sorted(self.spec.numeric):
            layout.extend([(c, "sum", ""), (c, "n", "")])
        slots = _packing(layout, self._n.bit_length())
        slot_of = {entry: slots[i] for i, entry in enumerate(layout)}
        ciphers = slots[-1].cipher + 1 if slots else 1
        plain: list[list[int]] = []
        for r in rows:
            acc = [0] * ciphers
            for c in self.spec.categorical:
                v = values[c][r]
                if v in (None, ""):
                    continue
                s = slot_of.get((c, "count", str(v)), slot_of.get((c, "count", OTHER)))
                if s is not None:
                    acc[s.cipher] += 1 << s.offset
            for c in self.spec.numeric:
                v = values[c][r]
                if v in (None, "") or (isinstance(v, float) and v != v):
                    continue
                try:
                    x = round(float(v) * self.spec.scale)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    raise ValidationError(f"profile column {c!r}: {v!r} is not a number") from None
                if not 0 <= x < MAX_SCALED_VALUE:
                    raise ValidationError(
                        f"profile column {c!r}: values must lie in [0, {MAX_SCALED_VALUE // self.spec.scale})"
                    )
                for kind, amount in (("sum", x), ("n", 1)):
                    s = slot_of[(c, kind, "")]
                    acc[s.cipher] += amount << s.offset
            plain.append(acc)
        return layout, slots, plain

    def handle(self, msg: Message) -> list[Message]:
        if self._stage is _PStage.done:
            raise ProtocolError("the session is over")
        self._check_envelope(msg)
        if self._stage is _PStage.await_hello:
            if not isinstance(msg, Hello):
                raise ProtocolError(f"expected hello, got {msg.kind!r}")
            return self._on_hello(msg)
        if self._stage is _PStage.await_req_single:
            if not isinstance(msg, Points):
                raise ProtocolError(f"expected req_single chunks, got {msg.kind!r}")
            self._check_chunk(msg, {Stream.req_single}, crypto.POINT_BYTES, self._peer_count)
            tags = self._blind_received_to_tags(msg.data)
            self._accept_chunk(msg)
            self._tags.append(tags)
            if not msg.final:
                return []
            all_tags = b"".join(self._tags)
            perm = self._shuffler.permutation(len(all_tags) // crypto.TAG_BYTES)
            self._tags = []
            self._stage = _PStage.await_masked_sum
            return list(
                self._chunks(Stream.resp_tags, crypto.permute_rows(all_tags, crypto.TAG_BYTES, perm), crypto.TAG_BYTES)
            )
        if self._stage is _PStage.await_masked_sum:
            if not isinstance(msg, MaskedSum):
                raise ProtocolError(f"expected masked_sum, got {msg.kind!r}")
            return self._on_masked_sum(msg)
        if self._stage is _PStage.await_gate_powers:
            if not isinstance(msg, GatePowers):
                raise ProtocolError(f"expected gate_powers, got {msg.kind!r}")
            return self._on_gate_powers(msg)
        if not isinstance(msg, Result):
            raise ProtocolError(f"expected result, got {msg.kind!r}")
        if msg.intersection_size is None:
            raise ProtocolError("a profile result must carry |A∩B| for the partner")
        self._peer_seq += 1
        self.outcome = PsiOutcome(
            Mode.profile, self.params.id_type, msg.intersection_size,
            own_items=len(self.items.values), peer_items=self._peer_count,
        )
        self._stage = _PStage.done
        return []

    def _on_hello(self, msg: Hello) -> list[Message]:
        p = self.params
        for name, theirs, ours in (
            ("agreement", msg.agreement_id, p.agreement_id),
            ("job", msg.job_id, p.job_id),
            ("identifier type", msg.id_type, p.id_type),
        ):
            if theirs != ours:
                raise ProtocolError(f"hello names {name} {theirs!r}; this node runs {ours!r}")
        if sorted(msg.profile_columns) != self.spec.columns:
            raise ProtocolError(
                f"hello asks for columns {sorted(msg.profile_columns)}; the agreement has {self.spec.columns}"
            )
        points = self._blind_own(self._order)
        enc = _paillier.encryptor(self._priv)
        k = self._slots[-1].cipher + 1
        flat = [x for i in self._order for x in self._plain[i]]
        fn = enc.encrypt_many  # a bound method of a picklable dataclass: runs in the workers
        width = cipher_bytes(self._n)
        ciphers = b"".join(
            c.to_bytes(width, "big")
            for batch in self.executor.map_batches(fn, (flat[i : i + 256] for i in range(0, len(flat), 256)))
            for c in batch
        )
        self._plain = []  # encrypted and sent: the plaintext rows are no longer needed
        self._peer_seq += 1
        self._peer_count = msg.count
        ready = Ready(
            **self._base(),  # type: ignore[arg-type]
            count=len(self.items.values),
            paillier_n=str(self._n),
            layout=self._layout,
            slot_bits=SLOT_BITS,
            ciphers_per_row=k,
        )
        out: list[Message] = [ready]
        out.extend(self._chunks(Stream.resp_single, points, crypto.POINT_BYTES))
        out.extend(self._chunks(Stream.resp_cipher, ciphers, k * width, rows=1024))
        self._stage = _PStage.await_req_single
        return out

    def _on_masked_sum(self, msg: MaskedSum) -> list[Message]:
        width = cipher_bytes(self._n)
        k = self._slots[-1].cipher + 1
        if len(msg.data) != k * width:
            raise ProtocolError(f"masked_sum must carry {k} ciphertexts of {width} bytes")
        n2 = self._n * self._n
        cs = [int.from_bytes(msg.data[i : i + width], "big") for i in range(0, len(msg.data), width)]
        if any(not 0 < c < n2 for c in cs):
            raise ProtocolError("masked_sum carries a value outside Z*_{n^2}")
        plain = [_paillier.decrypt(self._priv, c) for c in cs]
        if any(v >> (self._n.bit_length() - 2) for v in plain):
            raise ProtocolError("masked_sum decrypts to more than its slots can hold")
        x = [(plain[s.cipher] >> s.offset) & ((1 << s.width) - 1) for s in self._slots]
        self._peer_seq += 1
        self._x = x
        self._stage = _PStage.await_gate_powers
        return []

    def _on_gate_powers(self, msg: GatePowers) -> list[Message]:
        k = self.spec.k_min
        if msg.k_min != k:  # the gate is ours: the brand cannot lower it
            raise ProtocolError(f"gate_powers is for k_min={msg.k_min}; the agreement says {k}")
        if msg.gates != len(self._gate_of):
            raise ProtocolError(f"gate_powers carries {msg.gates} gates; the layout has {len(self._gate_of)}")
        n_b = int(msg.paillier_n)  # its size and the payload length are checked by the message
        n2 = n_b * n_b
        width = cipher_bytes(n_b)
        cs = [int.from_bytes(msg.data[i : i + width], "big") for i in range(0, len(msg.data), width)]
        if any(not 0 < c < n2 for c in cs):
            raise ProtocolError("gate_powers carries a value outside Z*_{n^2}")
        gated: dict[int, list[int]] = {g: [] for g in self._gate_of}
        for i, s in enumerate(self._slots):
            gated[s.gate].append(i)
        jobs = [
            (cs[j * (k + 1) : (j + 1) * (k + 1)], self._x[g], [self._x[i] for i in gated[g]])
            for j, g in enumerate(self._gate_of)
        ]
        fn = functools.partial(_gate_batch, n=n_b, k=k)
        results = [r for batch in self.executor.map_batches(fn, ([job] for job in jobs)) for r in batch]
        v_of: dict[int, int] = {}
        for g, (_, vs) in zip(self._gate_of, results):
            v_of.update(zip(gated[g], vs))
        out = [u for u, _ in results] + [v_of[i] for i in range(len(self._slots))]
        self._peer_seq += 1
        self._x = []
        self._stage = _PStage.await_result
        return [GatedValues(**self._base(), gates=len(self._gate_of), slots=len(self._slots),  # type: ignore[arg-type]
                            data=b"".join(c.to_bytes(width, "big") for c in out))]


class ProfileRequester(_ProfileRole):
    """The brand: learns the cells that reach k_min (and |A∩B|), nothing per row."""

    def __init__(
        self,
        params: SessionParams,
        items: PreparedItems,
        spec: ProfileSpec,
        executor: BlindingExecutor | None = None,
        secrets: RoleSecrets | None = None,
        chunk_rows: int = MAX_CHUNK_ROWS,
        paillier_key: Any = None,
    ) -> None:
        """`paillier_key`: test-only injection of a (smaller, pre-generated) key for the gate;
        production generates a fresh 2048-bit key per job."""
        if params.mode is not Mode.profile:
            raise ValidationError("ProfileRequester needs a profile-mode session")
        super().__init__(params, items, executor, secrets, chunk_rows)
        _check_k_min(spec)
        self.spec = spec
        self._key = paillier_key or _paillier.generate(2048)
        self._stage = _PStage.new
        self._order = self._shuffler.permutation(len(items.values))
        self._ready: Ready | None = None
        self._slots: list[_Slot] = []
        self._single_tags: list[bytes] = []
        self._ciphers: list[bytes] = []
        self._resp_tags: list[bytes] = []
        self._masks: list[int] = []
        self._size = 0
        # What this node decrypted at the gate, per layout entry: (u, v) plaintexts under its own
        # key — zeros for every suppressed cell.
        self.opened: dict[tuple[str, str, str], tuple[int, int]] = {}
        self.result: ProfileResult | None = None

    def hello(self) -> Hello:
        if self._stage is not _PStage.new:
            raise ProtocolError("hello() was already sent")
        msg = Hello(
            **self._base(),  # type: ignore[arg-type]
            agreement_id=self.params.agreement_id,
            job_id=self.params.job_id,
            id_type=self.params.id_type,
            count=len(self.items.values),
            profile_columns=self.spec.columns,
        )
        self._stage = _PStage.hello_sent
        return msg

    def round_one(self) -> list[Points]:
        if self._stage is not _PStage.hello_sent:
            raise ProtocolError("round_one() comes once, right after hello()")
        msgs = self._chunks(Stream.req_single, self._blind_own(self._order), crypto.POINT_BYTES)
        self._stage = _PStage.sent
        return msgs

    def _cipher_width(self) -> int:
        assert self._ready is not None
        return self._ready.ciphers_per_row * cipher_bytes(int(self._ready.paillier_n))

    def handle(self, msg: Message) -> list[Message]:
        if self._stage not in (_PStage.hello_sent, _PStage.sent, _PStage.await_gated):
            raise ProtocolError(f"no message is expected now (stage {self._stage.value})")
        self._check_envelope(msg)
        if self._stage is _PStage.await_gated:
            if not isinstance(msg, GatedValues):
                raise ProtocolError(f"expected gated_values, got {msg.kind!r}")
            return self._finish(msg)
        if isinstance(msg, Ready):
            return self._on_ready(msg)
        if not isinstance(msg, Points):
            raise ProtocolError(f"unexpected {msg.kind!r} message")
        if self._ready is None:
            raise ProtocolError("data before Ready")
        total = self._ready.count
        if msg.stream is Stream.resp_single:
            self._check_chunk(msg, {Stream.resp_single}, crypto.POINT_BYTES, total)
            tags = self._blind_received_to_tags(msg.data)
            self._accept_chunk(msg)
            self._single_tags.append(tags)
        elif msg.stream is Stream.resp_cipher:
            w = self._cipher_width()
            self._check_chunk(msg, {Stream.resp_cipher}, w, total)
            self._accept_chunk(msg, w)
            self._ciphers.append(msg.data)
        elif msg.stream is Stream.resp_tags:
            if self._stage is not _PStage.sent:
                raise ProtocolError("tags of our items before we sent them")
            self._check_chunk(msg, {Stream.resp_tags}, crypto.TAG_BYTES, len(self.items.values))
            self._accept_chunk(msg)
            self._resp_tags.append(msg.data)
        else:
            raise ProtocolError(f"a {msg.stream.value!r} chunk is not expected by the requester")
        if {Stream.resp_single, Stream.resp_cipher, Stream.resp_tags} <= self._finished:
            return self._sum()
        return []

    def _on_ready(self, msg: Ready) -> list[Message]:
        if self._ready is not None:
            raise ProtocolError("a second Ready")
        try:
            n = int(msg.paillier_n)
        except ValueError:
            raise ProtocolError("Ready.paillier_n is not an integer") from None
        if n.bit_length() < MIN_PAILLIER_BITS or msg.slot_bits != SLOT_BITS or msg.ciphers_per_row < 1:
            raise ProtocolError("Ready carries an unacceptable Paillier key or layout")
        if not msg.layout:
            raise ProtocolError("Ready's layout is empty")
        slots = _packing(msg.layout, n.bit_length())
        if slots[-1].cipher + 1 != msg.ciphers_per_row:
            raise ProtocolError("Ready's layout does not fit its ciphertexts")
        cols = {c for c, _, _ in msg.layout}
        if not cols <= set(self.spec.columns):
            raise ProtocolError("Ready's layout names columns outside the agreement")
        gate_bytes = len(_gates(slots)) * (self.spec.k_min + 1) * cipher_bytes(int(self._key.public_key.n))
        if gate_bytes > MAX_GATE_BYTES:
            raise ProtocolError(
                f"the layout's {len(_gates(slots))} count cells at k_min={self.spec.k_min} need "
                f"{gate_bytes} bytes of gate powers, more than {MAX_GATE_BYTES}: agree fewer values"
            )
        self._peer_seq += 1
        self._ready = msg
        self._slots = slots
        return []

    def _sum(self) -> list[Message]:
        assert self._ready is not None
        n = int(self._ready.paillier_n)
        k = self._ready.ciphers_per_row
        cw = cipher_bytes(n)
        theirs = crypto.tags_array(b"".join(self._single_tags))  # π order
        mine = crypto.tags_array(b"".join(self._resp_tags))
        hit = np.flatnonzero(np.isin(theirs, mine))
        self._size = len(hit)
        masks = [secrets.randbelow(1 << (s.bound + STAT_BITS)) for s in self._slots]
        packed = [0] * k
        for s, r in zip(self._slots, masks):
            packed[s.cipher] += r << s.offset
        blob = b"".join(self._ciphers)
        rw = k * cw
        out = bytearray()
        for j in range(k):
            cs = [int.from_bytes(blob[i * rw + j * cw : i * rw + (j + 1) * cw], "big") for i in hit.tolist()]
            out += _paillier.add_plain(n, _paillier.add_all(n, cs), packed[j]).to_bytes(cw, "big")
        # The gate: Enc_B(r_c^j mod n_B), j = 0..k_min, for each count slot c.
        n_b = int(self._key.public_key.n)
        kmin = self.spec.k_min
        gates = _gates(self._slots)
        enc = _paillier.encryptor(self._key)
        batches = ([pow(masks[g], j, n_b) for j in range(kmin + 1)] for g in gates)
        bw = cipher_bytes(n_b)
        powers = b"".join(c.to_bytes(bw, "big") for b in self.executor.map_batches(enc.encrypt_many, batches) for c in b)
        self._masks = masks
        self._single_tags, self._ciphers, self._resp_tags = [], [], []
        self._stage = _PStage.await_gated
        return [
            MaskedSum(**self._base(), data=bytes(out)),  # type: ignore[arg-type]
            GatePowers(**self._base(), paillier_n=str(n_b), k_min=kmin, gates=len(gates), data=powers),  # type: ignore[arg-type]
        ]

    def _finish(self, msg: GatedValues) -> list[Message]:
        assert self._ready is not None
        gates = _gates(self._slots)
        n_b = int(self._key.public_key.n)
        width = cipher_bytes(n_b)
        if msg.gates != len(gates) or msg.slots != len(self._slots):
            raise ProtocolError(
                f"gated_values carries {msg.gates} gates and {msg.slots} slots; expected "
                f"{len(gates)} and {len(self._slots)}"
            )
        if len(msg.data) != (len(gates) + len(self._slots)) * width:
            raise ProtocolError(f"gated_values must carry ciphertexts of {width} bytes")
        n2 = n_b * n_b
        cs = [int.from_bytes(msg.data[i : i + width], "big") for i in range(0, len(msg.data), width)]
        if any(not 0 < c < n2 for c in cs):
            raise ProtocolError("gated_values carries a value outside Z*_{n^2}")
        plain = [_paillier.decrypt(self._key, c) for c in cs]
        u = dict(zip(gates, plain[: len(gates)]))
        v = plain[len(gates) :]
        sums: list[int | None] = []
        for i, s in enumerate(self._slots):
            ug = u[s.gate]
            if ug == 0:
                if v[i] != 0:
                    raise ProtocolError("gated_values opens a value behind a closed gate")
                sums.append(None)
                continue
            try:
                x = v[i] * pow(ug, -1, n_b) % n_b
            except ValueError:
                raise ProtocolError("gated_values carries a gate that is not a unit mod n_B") from None
            total = x - self._masks[i]
            if not 0 <= total < 1 << s.bound or (s.gate == i and total < self.spec.k_min):
                raise ProtocolError("gated_values opens a sum outside its slot's range")
            sums.append(total)
        self._peer_seq += 1
        self.opened = {entry: (u[s.gate], v[i]) for i, (entry, s) in enumerate(zip(self._ready.layout, self._slots))}
        self._masks = []
        self.result = _cells(self._size, dict(zip(self._ready.layout, sums)), self.spec)
        self.outcome = PsiOutcome(
            Mode.profile, self.params.id_type, self.result.intersection_size,
            own_items=len(self.items.values), peer_items=self._ready.count,
        )
        self._stage = _PStage.done
        return [Result(**self._base(), intersection_size=self._size)]  # type: ignore[arg-type]


def _cells(size: int, sums: dict[tuple[str, str, str], int | None], spec: ProfileSpec) -> ProfileResult:
    """The result from the opened sums (None: the gate kept the cell closed)."""
    if size < spec.k_min:  # every count is then below k_min: all gates are closed anyway
        cells = [ProfileCell(c, kind, v, None, True) for (c, kind, v) in sums if kind != "n"]
        return ProfileResult(None, True, cells)
    cells: list[ProfileCell] = []
    for (c, kind, v), x in sums.items():
        if kind == "count":
            cells.append(ProfileCell(c, "count", v, x, x is None))
        elif kind == "sum":
            cnt = sums[(c, "n", "")]
            ok = x is not None and cnt is not None
            cells.append(ProfileCell(c, "sum", "", x / spec.scale if ok else None, not ok))  # type: ignore[operator]
            cells.append(ProfileCell(c, "mean", "", x / spec.scale / cnt if ok else None, not ok))  # type: ignore[operator]
    return ProfileResult(size, False, cells)
