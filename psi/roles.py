"""PSI protocol roles: pure state machines, no I/O.

The requester (the party that asks: usually the brand) and the responder (the partner) each
get their prepared items (`psi.inputs.prepare_party`: consent-gated, normalised, de-duplicated)
and exchange messages through whatever transport the caller has:

    req = Requester(params, items, executor)          resp = Responder(params, items, executor)
    send(req.hello())                                 (responder node)
    send(*req.round_one())                            for m in received: send(*resp.handle(m))
    for m in received: send(*req.handle(m))
    until req.done                                    until resp.done

`handle(message)` returns the replies (possibly none). A malformed, oversized, replayed or
out-of-order message raises ProtocolError and leaves the role exactly as it was.

Message flow (one identifier type; `a`, `b` the two fresh secret scalars, H hash-to-curve,
T the 8-byte tag of a doubly-blinded point, σ/π/ρ secret shuffles):

    requester                                              responder
    Hello(params, |A|, salt_A)             ─────────▶
                                           ◀─────────     Ready(|B|, salt_B)
                                           ◀─────────     resp_single: π(H(B)^b)
    req_single: σ(H(A)^a)                  ─────────▶
                                           ◀─────────     resp_tags: T(σ(H(A)^a)^b)
                                                            cardinality: shuffled by ρ
                                                            match: in σ order
    cardinality: |A∩B| = |resp_tags ∩ T(π(H(B)^b)^a)|
    match:       my matched rows; req_tags: T(π(H(B)^b)^a) ─▶  its matched rows
    Result(|A∩B| if the agreement reveals it)  ─────────▶

Join key of a matched pair (match mode): keyed BLAKE2b of the pair's tag under salt_A‖salt_B.
"""

from __future__ import annotations

import enum
import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from confide.errors import ProtocolError, ValidationError
from psi import crypto
from psi.executor import BlindingExecutor, InProcessExecutor
from psi.inputs import PreparedItems
from psi.messages import (
    MAX_CHUNK_ROWS,
    Hello,
    Message,
    Mode,
    Points,
    Ready,
    Result,
    Stream,
)

BATCH_ROWS = 8_192


@dataclass(frozen=True)
class SessionParams:
    """What both sides must agree on; the responder checks the requester's Hello against its own."""

    session: str
    agreement_id: str
    job_id: str
    id_type: str
    mode: Mode = Mode.cardinality
    reveal_to_responder: bool = False

    @property
    def domain(self) -> bytes:
        return crypto.domain_key(self.agreement_id, self.job_id, self.id_type)


@dataclass(frozen=True)
class RoleSecrets:
    """The randomness of one role. Production: `RoleSecrets.fresh()`; tests inject fixed ones."""

    key: crypto.BlindingKey
    shuffle_seed: int | None
    join_salt: bytes

    @classmethod
    def fresh(cls, rng: Callable[[int], bytes] = os.urandom) -> "RoleSecrets":
        return cls(
            crypto.BlindingKey.generate(rng), int.from_bytes(rng(32), "big"), rng(32)
        )


@dataclass
class PsiOutcome:
    """What one role learned. `matched` (match mode) maps each of the party's own matched rows
    (indices into its input) to the pair's join key; it is empty in cardinality mode.
    `intersection_size` is None for a responder the agreement does not tell."""

    mode: Mode
    id_type: str
    intersection_size: int | None
    matched: dict[int, str] = field(default_factory=dict)
    own_items: int = 0
    peer_items: int = 0


class _Stage(enum.Enum):
    new = "new"
    hello_sent = "hello_sent"
    sent = "sent"  # requester: round one sent, waiting for the responder's streams
    await_hello = "await_hello"
    await_req_single = "await_req_single"
    await_req_tags = "await_req_tags"
    await_result = "await_result"
    done = "done"


def _point_batches(points: bytes, rows: int) -> Iterator[bytes]:
    step = rows * crypto.POINT_BYTES
    for i in range(0, len(points), step):
        yield points[i : i + step]


class _Role:
    """Shared bookkeeping: peer sequence numbers, stream offsets, chunking."""

    def __init__(
        self,
        params: SessionParams,
        items: PreparedItems,
        executor: BlindingExecutor | None,
        secrets: RoleSecrets | None,
        chunk_rows: int,
    ) -> None:
        if not 0 < chunk_rows <= MAX_CHUNK_ROWS:
            raise ValidationError(f"chunk_rows must be in 1..{MAX_CHUNK_ROWS}")
        if items.id_type != params.id_type:
            raise ValidationError(
                f"items are of type {items.id_type!r}, the session is for {params.id_type!r}"
            )
        self.params = params
        self.items = items
        self.executor: BlindingExecutor = executor or InProcessExecutor()
        self.secrets = secrets or RoleSecrets.fresh()
        self.chunk_rows = chunk_rows
        self._shuffler = crypto.Shuffler(self.secrets.shuffle_seed)
        self._seq = 0
        self._peer_seq = 0
        self._offsets: dict[Stream, int] = {}
        self._finished: set[Stream] = set()
        self.outcome: PsiOutcome | None = None

    # -- outgoing -------------------------------------------------------------------------
    def _base(self) -> dict[str, object]:
        d = {"mode": self.params.mode, "session": self.params.session, "seq": self._seq}
        self._seq += 1
        return d

    def _chunks(self, stream: Stream, data: bytes, width: int, rows: int | None = None) -> list[Points]:
        step = min(rows or self.chunk_rows, self.chunk_rows) * width
        out: list[Points] = []
        n = len(data)
        if n == 0:
            return [Points(**self._base(), stream=stream, offset=0, final=True, data=b"")]  # type: ignore[arg-type]
        for i in range(0, n, step):
            out.append(
                Points(
                    **self._base(),  # type: ignore[arg-type]
                    stream=stream,
                    offset=i // width,
                    final=i + step >= n,
                    data=data[i : i + step],
                )
            )
        return out

    def _blind_own(self, order: np.ndarray) -> bytes:
        values = self.items.values
        ordered = [values[i] for i in order]
        # Module-level functions of psi.crypto: cheap for worker processes to import.
        fn = functools.partial(
            crypto.hash_and_blind, dom=self.params.domain, secret=self.secrets.key.secret
        )
        batches = (ordered[i : i + BATCH_ROWS] for i in range(0, len(ordered), BATCH_ROWS))
        return b"".join(self.executor.map_batches(fn, batches))

    def _blind_received(self, points: bytes) -> bytes:
        fn = functools.partial(crypto.blind, secret=self.secrets.key.secret)
        return b"".join(self.executor.map_batches(fn, _point_batches(points, BATCH_ROWS)))

    def _blind_received_to_tags(self, points: bytes) -> bytes:
        fn = functools.partial(crypto.blind_to_tags, secret=self.secrets.key.secret)
        return b"".join(self.executor.map_batches(fn, _point_batches(points, BATCH_ROWS)))

    # -- incoming checks (no state change) --------------------------------------------------
    def _check_envelope(self, msg: Message) -> None:
        if msg.session != self.params.session:
            raise ProtocolError(f"message for session {msg.session!r}, this is {self.params.session!r}")
        if msg.mode != self.params.mode:
            raise ProtocolError(f"message in mode {msg.mode.value!r}, this session is {self.params.mode.value!r}")
        if msg.seq != self._peer_seq:
            what = "replayed" if msg.seq < self._peer_seq else "out of order"
            raise ProtocolError(
                f"message seq {msg.seq} is {what}; expected seq {self._peer_seq}"
            )

    def _check_chunk(self, msg: Points, allowed: set[Stream], width: int, total: int) -> None:
        if msg.stream not in allowed:
            raise ProtocolError(f"a {msg.stream.value!r} chunk is not expected now")
        if msg.stream in self._finished:
            raise ProtocolError(f"stream {msg.stream.value!r} is already complete")
        if len(msg.data) % width:
            raise ProtocolError(f"{msg.stream.value!r} payload is not a multiple of {width} bytes")
        rows = len(msg.data) // width
        if rows > MAX_CHUNK_ROWS:
            raise ProtocolError(f"chunk of {rows} rows exceeds the limit of {MAX_CHUNK_ROWS}")
        expected = self._offsets.get(msg.stream, 0)
        if msg.offset != expected:
            raise ProtocolError(f"{msg.stream.value!r} chunk at row {msg.offset}, expected row {expected}")
        if expected + rows > total:
            raise ProtocolError(
                f"{msg.stream.value!r} carries more than the {total} rows announced"
            )
        if msg.final and expected + rows != total:
            raise ProtocolError(
                f"{msg.stream.value!r} ends after {expected + rows} rows, {total} were announced"
            )

    def _accept_chunk(self, msg: Points, width: int | None = None) -> None:
        if width is None:
            single = msg.stream in (Stream.req_single, Stream.resp_single)
            width = crypto.POINT_BYTES if single else crypto.TAG_BYTES
        self._peer_seq += 1
        self._offsets[msg.stream] = msg.offset + len(msg.data) // width
        if msg.final:
            self._finished.add(msg.stream)

    @property
    def done(self) -> bool:
        return self._stage is _Stage.done  # type: ignore[attr-defined]

    def _join_keys(self, my_tags: np.ndarray, peer_tags: np.ndarray, salt: bytes) -> dict[int, str]:
        """Own rows whose distinct item's tag is in `peer_tags` → join key. `my_tags[i]` is the
        tag of distinct item i."""
        hit = np.isin(my_tags, peer_tags)
        out: dict[int, str] = {}
        for i in np.flatnonzero(hit):
            key = crypto.join_key(my_tags[i].tobytes(), salt)
            for row in self.items.rows_of(int(i)):
                out[row] = key
        return out


class Requester(_Role):
    """The party that asks. Learns |A∩B| (cardinality) or its own matched rows with join keys
    (match)."""

    def __init__(
        self,
        params: SessionParams,
        items: PreparedItems,
        executor: BlindingExecutor | None = None,
        secrets: RoleSecrets | None = None,
        chunk_rows: int = MAX_CHUNK_ROWS,
    ) -> None:
        super().__init__(params, items, executor, secrets, chunk_rows)
        self._stage = _Stage.new
        self._order = self._shuffler.permutation(len(items.values))  # σ
        self._peer_count: int | None = None
        self._peer_salt = b""
        self._resp_single_tags: list[bytes] = []  # T(π(B)^b)^a, in π order
        self._resp_tags: list[bytes] = []

    def hello(self) -> Hello:
        """The opening message. Call once, before `round_one`."""
        if self._stage is not _Stage.new:
            raise ProtocolError("hello() was already sent")
        msg = Hello(
            **self._base(),  # type: ignore[arg-type]
            agreement_id=self.params.agreement_id,
            job_id=self.params.job_id,
            id_type=self.params.id_type,
            count=len(self.items.values),
            join_salt=self.secrets.join_salt.hex() if self.params.mode is Mode.match else "",
        )
        self._stage = _Stage.hello_sent
        return msg

    def round_one(self) -> list[Points]:
        """The requester's items, hashed, blinded and shuffled (the heavy step: all cores)."""
        if self._stage is not _Stage.hello_sent:
            raise ProtocolError("round_one() comes once, right after hello()")
        data = self._blind_own(self._order)
        msgs = self._chunks(Stream.req_single, data, crypto.POINT_BYTES)
        self._stage = _Stage.sent
        return msgs

    def handle(self, msg: Message) -> list[Message]:
        if self._stage not in (_Stage.hello_sent, _Stage.sent):
            raise ProtocolError(f"no message is expected now (stage {self._stage.value})")
        self._check_envelope(msg)
        if isinstance(msg, Ready):
            if self._peer_count is not None:
                raise ProtocolError("a second Ready")
            salt = b""
            if self.params.mode is Mode.match:
                try:
                    salt = bytes.fromhex(msg.join_salt)
                except ValueError:
                    raise ProtocolError("Ready.join_salt is not hex") from None
                if len(salt) != 32:
                    raise ProtocolError("Ready.join_salt must be 32 bytes")
            self._peer_seq += 1
            self._peer_count = msg.count
            self._peer_salt = salt
            return []
        if not isinstance(msg, Points):
            raise ProtocolError(f"unexpected {msg.kind!r} message")
        if self._peer_count is None:
            raise ProtocolError("data before Ready")
        if msg.stream is Stream.resp_single:
            self._check_chunk(msg, {Stream.resp_single}, crypto.POINT_BYTES, self._peer_count)
            tags = self._blind_received_to_tags(msg.data)  # may raise: state still untouched
            self._accept_chunk(msg)
            self._resp_single_tags.append(tags)
        elif msg.stream is Stream.resp_tags:
            if self._stage is not _Stage.sent:
                raise ProtocolError("tags of our items before we sent them")
            self._check_chunk(msg, {Stream.resp_tags}, crypto.TAG_BYTES, len(self.items.values))
            self._accept_chunk(msg)
            self._resp_tags.append(msg.data)
        else:
            raise ProtocolError(f"a {msg.stream.value!r} chunk is not expected by the requester")
        if {Stream.resp_single, Stream.resp_tags} <= self._finished:
            return self._finish()
        return []

    def _finish(self) -> list[Message]:
        peer_tags = crypto.tags_array(b"".join(self._resp_single_tags))
        mine = crypto.tags_array(b"".join(self._resp_tags))
        out: list[Message] = []
        if self.params.mode is Mode.cardinality:
            size = int(np.isin(mine, peer_tags).sum())
            self.outcome = PsiOutcome(
                Mode.cardinality, self.params.id_type, size,
                own_items=len(mine), peer_items=len(peer_tags),
            )
        else:
            # resp_tags came in σ order: tag of distinct item order[j] is mine[j].
            by_item = np.empty_like(mine)
            by_item[self._order] = mine
            salt = self.secrets.join_salt + self._peer_salt
            matched = self._join_keys(by_item, peer_tags, salt)
            size = int(np.isin(by_item, peer_tags).sum())
            self.outcome = PsiOutcome(
                Mode.match, self.params.id_type, size, matched,
                own_items=len(mine), peer_items=len(peer_tags),
            )
            out.extend(
                self._chunks(Stream.req_tags, peer_tags.tobytes(), crypto.TAG_BYTES)
            )
        out.append(
            Result(
                **self._base(),  # type: ignore[arg-type]
                intersection_size=size if self.params.reveal_to_responder else None,
            )
        )
        self._resp_single_tags = []
        self._resp_tags = []
        self._stage = _Stage.done
        return out


class Responder(_Role):
    """The party asked. Learns nothing in cardinality mode (|A∩B| if the agreement says so);
    its own matched rows with join keys in match mode."""

    def __init__(
        self,
        params: SessionParams,
        items: PreparedItems,
        executor: BlindingExecutor | None = None,
        secrets: RoleSecrets | None = None,
        chunk_rows: int = MAX_CHUNK_ROWS,
    ) -> None:
        super().__init__(params, items, executor, secrets, chunk_rows)
        self._stage = _Stage.await_hello
        self._order = self._shuffler.permutation(len(items.values))  # π
        self._peer_count = 0
        self._peer_salt = b""
        self._req_tags_parts: list[bytes] = []  # T(σ(A)^ab) as computed here, σ order
        self._their_view: list[bytes] = []  # req_tags: T(π(B)^ba), π order

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
            self._req_tags_parts.append(tags)
            if msg.final:
                return self._send_tags()
            return []
        if self._stage is _Stage.await_req_tags:
            if not isinstance(msg, Points):
                raise ProtocolError(f"expected req_tags chunks, got {msg.kind!r}")
            self._check_chunk(msg, {Stream.req_tags}, crypto.TAG_BYTES, len(self.items.values))
            self._accept_chunk(msg)
            self._their_view.append(msg.data)
            if msg.final:
                self._finish_match()
                self._stage = _Stage.await_result
            return []
        # await_result
        if not isinstance(msg, Result):
            raise ProtocolError(f"expected result, got {msg.kind!r}")
        if msg.intersection_size is not None and not self.params.reveal_to_responder:
            raise ProtocolError("the requester revealed a size this session does not allow")
        self._peer_seq += 1
        if self.outcome is None:
            self.outcome = PsiOutcome(
                self.params.mode, self.params.id_type, msg.intersection_size,
                own_items=len(self.items.values), peer_items=self._peer_count,
            )
        elif msg.intersection_size is not None:
            self.outcome.intersection_size = msg.intersection_size
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
        salt = b""
        if p.mode is Mode.match:
            try:
                salt = bytes.fromhex(msg.join_salt)
            except ValueError:
                raise ProtocolError("Hello.join_salt is not hex") from None
            if len(salt) != 32:
                raise ProtocolError("Hello.join_salt must be 32 bytes")
        data = self._blind_own(self._order)  # π(H(B)^b): the heavy step
        self._peer_seq += 1
        self._peer_count = msg.count
        self._peer_salt = salt
        ready = Ready(
            **self._base(),  # type: ignore[arg-type]
            count=len(self.items.values),
            join_salt=self.secrets.join_salt.hex() if p.mode is Mode.match else "",
        )
        out: list[Message] = [ready]
        out.extend(self._chunks(Stream.resp_single, data, crypto.POINT_BYTES))
        self._stage = _Stage.await_req_single
        return out

    def _send_tags(self) -> list[Message]:
        tags = b"".join(self._req_tags_parts)
        if self.params.mode is Mode.cardinality:
            perm = self._shuffler.permutation(len(tags) // crypto.TAG_BYTES)  # ρ
            out = self._chunks(
                Stream.resp_tags, crypto.permute_rows(tags, crypto.TAG_BYTES, perm), crypto.TAG_BYTES
            )
            self._req_tags_parts = []
            self._stage = _Stage.await_result
        else:
            self._req_tags_parts = [tags]
            out = self._chunks(Stream.resp_tags, tags, crypto.TAG_BYTES)
            self._stage = _Stage.await_req_tags
        return list(out)

    def _finish_match(self) -> None:
        view = crypto.tags_array(b"".join(self._their_view))  # π order
        by_item = np.empty_like(view)
        by_item[self._order] = view
        peer = crypto.tags_array(self._req_tags_parts[0])
        salt = self._peer_salt + self.secrets.join_salt
        matched = self._join_keys(by_item, peer, salt)
        size = int(np.isin(by_item, peer).sum())
        self.outcome = PsiOutcome(
            Mode.match, self.params.id_type,
            size,  # in match mode each side sees its matched rows, hence the size
            matched, own_items=len(self.items.values), peer_items=self._peer_count,
        )
        self._their_view = []
        self._req_tags_parts = []
