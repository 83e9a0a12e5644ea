"""`profile`: aggregates of the partner's agreed columns over the overlap, for the brand.

An intersection-sum in the style of Google's Private Join and Compute, with the roles arranged
so that the brand (requester, no values) learns the aggregates and the partner (responder, owner
of the values and of the Paillier key) learns only |A∩B|:

    requester (brand)                                    responder (partner, Paillier key)
    Hello(profile columns, |A|)           ─────────▶
                                          ◀─────────     Ready(|B|, n, slot layout)
                                          ◀─────────     resp_single: π(H(B)^b)
                                          ◀─────────     resp_cipher: Enc(packed row values), π order
    req_single: σ(H(A)^a)                 ─────────▶
                                          ◀─────────     resp_tags: ρ(T(σ(H(A)^a)^b))  (shuffled)
    matched π-rows = those whose T(π(H(B)^b)^a) is in resp_tags
    MaskedSum: Π Enc(row) · Enc(r)        ─────────▶     (sum + r: uniformly random to it)
                                          ◀─────────     Decrypted: sum + r mod n
    sums = decrypted − r; unpack; suppress cells < k_min
    Result(|A∩B|)                         ─────────▶

The brand never sees which of *its* rows matched (resp_tags are shuffled) nor any partner row's
values (encrypted under the partner's key); the partner sees only sum + r. Values are packed:
each row's counts (one-hot per categorical value) and fixed-point numerics occupy `SLOT_BITS`
slots of one plaintext, so a row costs one or two encryptions whatever the number of columns.

Limitation (see docs/psi.md): the k_min suppression is applied by the brand's own node after
decryption — the brand node's process holds the unsuppressed cells for a moment. Enforcing it
cryptographically needs a secure comparison per cell; it is listed as follow-up work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from confide.errors import ProtocolError, ValidationError
from psi import _paillier, crypto
from psi.executor import BlindingExecutor
from psi.inputs import PreparedItems
from psi.messages import (
    Decrypted,
    Hello,
    MaskedSum,
    Message,
    Mode,
    Points,
    Ready,
    Result,
    Stream,
)
from psi.roles import MAX_CHUNK_ROWS, PsiOutcome, RoleSecrets, SessionParams, _Role, _Stage

SLOT_BITS = 64
MAX_SCALED_VALUE = 2**40  # per row; with ≤ 2^23 rows a slot sum stays below 2^63
OTHER = "__other__"


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


class ProfileResponder(_Role):
    """The partner: holds the values and the Paillier key; learns |A∩B| only."""

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
        for c in spec.columns:
            if c not in values:
                raise ValidationError(f"profile column {c!r} is missing from the partner's data")
        self.spec = spec
        self._priv = paillier_key or _paillier.generate(2048)
        self._n = int(self._priv.public_key.n)
        self._layout, self._plain = self._pack(values)
        self._stage = _Stage.await_hello
        self._order = self._shuffler.permutation(len(items.values))
        self._peer_count = 0
        self._tags: list[bytes] = []

    def _pack(self, values: dict[str, Sequence[object]]) -> tuple[list[tuple[str, str, str]], list[list[int]]]:
        rows = self.items.first_row.tolist()  # a duplicated identifier keeps its first row
        layout: list[tuple[str, str, str]] = []
        slot_of: dict[tuple[str, str, str], int] = {}
        for c in sorted(self.spec.categorical):
            if c in self.spec.categories:
                seen = sorted(set(self.spec.categories[c]))[: self.spec.max_categories - 1] + [OTHER]
            else:
                seen = sorted({str(values[c][r]) for r in rows if values[c][r] not in (None, "")})
                if len(seen) > self.spec.max_categories:
                    seen = seen[: self.spec.max_categories - 1] + [OTHER]
            for v in seen:
                slot_of[(c, "count", v)] = len(layout)
                layout.append((c, "count", v))
        for c in sorted(self.spec.numeric):
            for kind in ("sum", "n"):
                slot_of[(c, kind, "")] = len(layout)
                layout.append((c, kind, ""))
        per = self._slots_per_cipher()
        ciphers = max(1, math.ceil(len(layout) / per))
        plain: list[list[int]] = []
        for r in rows:
            acc = [0] * ciphers
            for c in self.spec.categorical:
                v = values[c][r]
                if v in (None, ""):
                    continue
                key = (c, "count", str(v))
                s = slot_of.get(key, slot_of.get((c, "count", OTHER)))
                if s is not None:
                    acc[s // per] += 1 << (SLOT_BITS * (s % per))
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
                    acc[s // per] += amount << (SLOT_BITS * (s % per))
            plain.append(acc)
        return layout, plain

    def _slots_per_cipher(self) -> int:
        return max(1, (self._n.bit_length() - 2) // SLOT_BITS)

    def handle(self, msg: Message) -> list[Message]:
        if self._stage is _Stage.done:
            raise ProtocolError("the session is over")
        self._check_envelope(msg)
        if self._stage is _Stage.await_hello:
            if not isinstance(msg, Hello):
                raise ProtocolError(f"expected hello, got {msg.kind!r}")
            return self._on_hello(msg)
        if self._stage is _Stage.await_req_single:
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
            self._stage = _Stage.await_req_tags  # here: awaiting the masked sums
            return list(
                self._chunks(Stream.resp_tags, crypto.permute_rows(all_tags, crypto.TAG_BYTES, perm), crypto.TAG_BYTES)
            )
        if self._stage is _Stage.await_req_tags:
            if not isinstance(msg, MaskedSum):
                raise ProtocolError(f"expected masked_sum, got {msg.kind!r}")
            width = _paillier.cipher_bytes(self._n)
            k = len(self._plain[0]) if self._plain else 1
            if len(msg.data) != k * width:
                raise ProtocolError(f"masked_sum must carry {k} ciphertexts of {width} bytes")
            n2 = self._n * self._n
            cs = [int.from_bytes(msg.data[i : i + width], "big") for i in range(0, len(msg.data), width)]
            if any(not 0 < c < n2 for c in cs):
                raise ProtocolError("masked_sum carries a value outside Z*_{n^2}")
            plain = [_paillier.decrypt(self._priv, c) for c in cs]
            self._peer_seq += 1
            self._stage = _Stage.await_result
            return [Decrypted(**self._base(), values=[str(v) for v in plain])]  # type: ignore[arg-type]
        if not isinstance(msg, Result):
            raise ProtocolError(f"expected result, got {msg.kind!r}")
        if msg.intersection_size is None:
            raise ProtocolError("a profile result must carry |A∩B| for the partner")
        self._peer_seq += 1
        self.outcome = PsiOutcome(
            Mode.profile, self.params.id_type, msg.intersection_size,
            own_items=len(self.items.values), peer_items=self._peer_count,
        )
        self._stage = _Stage.done
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
        ordered = [self._plain[i] for i in self._order]
        k = len(ordered[0]) if ordered else max(1, math.ceil(len(self._layout) / self._slots_per_cipher()))
        flat = [x for row in ordered for x in row]
        fn = enc.encrypt_many  # a bound method of a picklable dataclass: runs in the workers
        width = _paillier.cipher_bytes(self._n)
        ciphers = b"".join(
            c.to_bytes(width, "big")
            for batch in self.executor.map_batches(fn, (flat[i : i + 256] for i in range(0, len(flat), 256)))
            for c in batch
        )
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
        self._stage = _Stage.await_req_single
        return out


class ProfileRequester(_Role):
    """The brand: learns the suppressed aggregates (and |A∩B|), nothing per row."""

    def __init__(
        self,
        params: SessionParams,
        items: PreparedItems,
        spec: ProfileSpec,
        executor: BlindingExecutor | None = None,
        secrets: RoleSecrets | None = None,
        chunk_rows: int = MAX_CHUNK_ROWS,
    ) -> None:
        if params.mode is not Mode.profile:
            raise ValidationError("ProfileRequester needs a profile-mode session")
        super().__init__(params, items, executor, secrets, chunk_rows)
        self.spec = spec
        self._stage = _Stage.new
        self._order = self._shuffler.permutation(len(items.values))
        self._ready: Ready | None = None
        self._single_tags: list[bytes] = []
        self._ciphers: list[bytes] = []
        self._resp_tags: list[bytes] = []
        self._masks: list[int] = []
        self._size = 0
        self.result: ProfileResult | None = None

    def hello(self) -> Hello:
        if self._stage is not _Stage.new:
            raise ProtocolError("hello() was already sent")
        msg = Hello(
            **self._base(),  # type: ignore[arg-type]
            agreement_id=self.params.agreement_id,
            job_id=self.params.job_id,
            id_type=self.params.id_type,
            count=len(self.items.values),
            profile_columns=self.spec.columns,
        )
        self._stage = _Stage.hello_sent
        return msg

    def round_one(self) -> list[Points]:
        if self._stage is not _Stage.hello_sent:
            raise ProtocolError("round_one() comes once, right after hello()")
        msgs = self._chunks(Stream.req_single, self._blind_own(self._order), crypto.POINT_BYTES)
        self._stage = _Stage.sent
        return msgs

    def _cipher_width(self) -> int:
        assert self._ready is not None
        return self._ready.ciphers_per_row * _paillier.cipher_bytes(int(self._ready.paillier_n))

    def handle(self, msg: Message) -> list[Message]:
        if self._stage not in (_Stage.hello_sent, _Stage.sent, _Stage.await_result):
            raise ProtocolError(f"no message is expected now (stage {self._stage.value})")
        self._check_envelope(msg)
        if self._stage is _Stage.await_result:
            if not isinstance(msg, Decrypted):
                raise ProtocolError(f"expected decrypted, got {msg.kind!r}")
            return self._finish(msg)
        if isinstance(msg, Ready):
            if self._ready is not None:
                raise ProtocolError("a second Ready")
            try:
                n = int(msg.paillier_n)
            except ValueError:
                raise ProtocolError("Ready.paillier_n is not an integer") from None
            if n.bit_length() < 1024 or msg.slot_bits != SLOT_BITS or msg.ciphers_per_row < 1:
                raise ProtocolError("Ready carries an unacceptable Paillier key or layout")
            per = max(1, (n.bit_length() - 2) // SLOT_BITS)
            if len(msg.layout) > per * msg.ciphers_per_row:
                raise ProtocolError("Ready's layout does not fit its ciphertexts")
            cols = {c for c, _, _ in msg.layout}
            if not cols <= set(self.spec.columns):
                raise ProtocolError("Ready's layout names columns outside the agreement")
            self._peer_seq += 1
            self._ready = msg
            return []
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
            if self._stage is not _Stage.sent:
                raise ProtocolError("tags of our items before we sent them")
            self._check_chunk(msg, {Stream.resp_tags}, crypto.TAG_BYTES, len(self.items.values))
            self._accept_chunk(msg)
            self._resp_tags.append(msg.data)
        else:
            raise ProtocolError(f"a {msg.stream.value!r} chunk is not expected by the requester")
        if {Stream.resp_single, Stream.resp_cipher, Stream.resp_tags} <= self._finished:
            return self._sum()
        return []

    def _sum(self) -> list[Message]:
        assert self._ready is not None
        n = int(self._ready.paillier_n)
        k = self._ready.ciphers_per_row
        cw = _paillier.cipher_bytes(n)
        theirs = crypto.tags_array(b"".join(self._single_tags))  # π order
        mine = crypto.tags_array(b"".join(self._resp_tags))
        hit = np.flatnonzero(np.isin(theirs, mine))
        self._size = len(hit)
        blob = b"".join(self._ciphers)
        rw = k * cw
        out = bytearray()
        masks = []
        for j in range(k):
            cs = [int.from_bytes(blob[i * rw + j * cw : i * rw + (j + 1) * cw], "big") for i in hit.tolist()]
            masked, r = _paillier.mask(n, _paillier.add_all(n, cs))
            masks.append(r)
            out += masked.to_bytes(cw, "big")
        self._masks = masks
        self._single_tags, self._ciphers, self._resp_tags = [], [], []
        self._stage = _Stage.await_result
        return [MaskedSum(**self._base(), data=bytes(out))]  # type: ignore[arg-type]

    def _finish(self, msg: Decrypted) -> list[Message]:
        assert self._ready is not None
        n = int(self._ready.paillier_n)
        if len(msg.values) != len(self._masks):
            raise ProtocolError(f"decrypted carries {len(msg.values)} values, expected {len(self._masks)}")
        try:
            plain = [(int(v) - r) % n for v, r in zip(msg.values, self._masks)]
        except ValueError:
            raise ProtocolError("decrypted values are not integers") from None
        self._peer_seq += 1
        per = max(1, (n.bit_length() - 2) // SLOT_BITS)
        mask = (1 << SLOT_BITS) - 1
        slots = {
            spec: (plain[i // per] >> (SLOT_BITS * (i % per))) & mask
            for i, spec in enumerate(self._ready.layout)
        }
        self.result = _suppress(self._size, slots, self.spec)
        self.outcome = PsiOutcome(
            Mode.profile, self.params.id_type, self.result.intersection_size,
            own_items=len(self.items.values), peer_items=self._ready.count,
        )
        self._stage = _Stage.done
        return [Result(**self._base(), intersection_size=self._size)]  # type: ignore[arg-type]


def _suppress(size: int, slots: dict[tuple[str, str, str], int], spec: ProfileSpec) -> ProfileResult:
    k = spec.k_min
    if size < k:
        cells = [ProfileCell(c, "count" if kind == "count" else kind, v, None, True)
                 for (c, kind, v) in slots if kind != "n"]
        return ProfileResult(None, True, cells)
    cells: list[ProfileCell] = []
    for (c, kind, v), x in slots.items():
        if kind == "count":
            ok = x >= k
            cells.append(ProfileCell(c, "count", v, int(x) if ok else None, not ok))
        elif kind == "sum":
            cnt = slots[(c, "n", "")]
            ok = cnt >= k
            cells.append(ProfileCell(c, "sum", "", x / spec.scale if ok else None, not ok))
            cells.append(ProfileCell(c, "mean", "", x / spec.scale / cnt if ok else None, not ok))
    return ProfileResult(size, False, cells)
