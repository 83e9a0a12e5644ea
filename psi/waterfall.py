"""Multi-key "waterfall" matching: identifier types in the agreed priority order, each record
matched at most once.

Stage i is an ordinary match-mode session (session id `<base>/<i>/<id type>`, fresh keys and
salts) over the records that no earlier stage matched — on both sides, since in match mode each
side knows which of its own rows matched. A stage costs one single-key PSI over the remaining
records, so the whole waterfall costs at most one single-key run per key type used.

Both wrappers are state machines like the single-key roles: `start()` / `handle(message)`
return the messages to send; errors leave the current stage untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from confide.errors import ProtocolError, ValidationError
from psi.executor import BlindingExecutor
from psi.inputs import PreparedItems
from psi.messages import Hello, Message, Mode
from psi.roles import Requester, Responder, RoleSecrets, SessionParams


@dataclass
class WaterfallOutcome:
    """Own rows matched → (identifier type that matched them, join key); counts per type."""

    matched: dict[int, tuple[str, str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def _stage_params(base: SessionParams, i: int, id_type: str) -> SessionParams:
    return SessionParams(
        session=f"{base.session}/{i}/{id_type}",
        agreement_id=base.agreement_id,
        job_id=base.job_id,
        id_type=id_type,
        mode=Mode.match,
    )


class _Waterfall:
    def __init__(
        self,
        base: SessionParams,
        key_order: Sequence[str],
        items: dict[str, PreparedItems],
        executor: BlindingExecutor | None,
        secrets: Callable[[], RoleSecrets],
    ) -> None:
        if base.mode is not Mode.match:
            raise ValidationError(
                "waterfall matching needs match mode: excluding matched records requires "
                "each side to know its own matched rows, which cardinality mode hides"
            )
        if not key_order or len(set(key_order)) != len(key_order):
            raise ValidationError("key_order must list distinct identifier types")
        for t in key_order:
            if t not in items:
                raise ValidationError(f"no prepared items for identifier type {t!r}")
        self.base = base
        self.key_order = list(key_order)
        self.items = items
        self.executor = executor
        self._secrets = secrets
        self.stage = 0
        self.outcome = WaterfallOutcome()

    @property
    def done(self) -> bool:
        return self.stage >= len(self.key_order)

    def _remaining(self, t: str) -> PreparedItems:
        return self.items[t].without_rows(set(self.outcome.matched))

    def _record(self, t: str, matched: dict[int, str]) -> None:
        for row, key in matched.items():
            self.outcome.matched[row] = (t, key)
        self.outcome.counts[t] = len(matched)


class WaterfallRequester(_Waterfall):
    def __init__(
        self,
        base: SessionParams,
        key_order: Sequence[str],
        items: dict[str, PreparedItems],
        executor: BlindingExecutor | None = None,
        secrets: Callable[[], RoleSecrets] = RoleSecrets.fresh,
        chunk_rows: int = 65_536,
    ) -> None:
        super().__init__(base, key_order, items, executor, secrets)
        self.chunk_rows = chunk_rows
        self._current: Requester | None = None

    def _open(self) -> list[Message]:
        t = self.key_order[self.stage]
        self._current = Requester(
            _stage_params(self.base, self.stage, t), self._remaining(t), self.executor,
            self._secrets(), self.chunk_rows,
        )
        return [self._current.hello(), *self._current.round_one()]

    def start(self) -> list[Message]:
        """Hello and round one of the first stage."""
        if self._current is not None:
            raise ProtocolError("the waterfall has already started")
        return self._open()

    def handle(self, msg: Message) -> list[Message]:
        if self._current is None or self.done:
            raise ProtocolError("no waterfall stage is running")
        out = self._current.handle(msg)
        if self._current.done:
            assert self._current.outcome is not None
            self._record(self.key_order[self.stage], self._current.outcome.matched)
            self.stage += 1
            if not self.done:
                out = [*out, *self._open()]
        return out


class WaterfallResponder(_Waterfall):
    def __init__(
        self,
        base: SessionParams,
        key_order: Sequence[str],
        items: dict[str, PreparedItems],
        executor: BlindingExecutor | None = None,
        secrets: Callable[[], RoleSecrets] = RoleSecrets.fresh,
        chunk_rows: int = 65_536,
    ) -> None:
        super().__init__(base, key_order, items, executor, secrets)
        self.chunk_rows = chunk_rows
        self._current: Responder | None = None

    def handle(self, msg: Message) -> list[Message]:
        if self.done:
            raise ProtocolError("the waterfall is over")
        if self._current is None:
            if not isinstance(msg, Hello):
                raise ProtocolError(f"expected the hello of stage {self.stage}, got {msg.kind!r}")
            t = self.key_order[self.stage]
            params = _stage_params(self.base, self.stage, t)
            current = Responder(params, self._remaining(t), self.executor, self._secrets(), self.chunk_rows)
            out = current.handle(msg)  # raises before we keep it
            self._current = current
            return out
        out = self._current.handle(msg)
        if self._current.done:
            assert self._current.outcome is not None
            self._record(self.key_order[self.stage], self._current.outcome.matched)
            self.stage += 1
            self._current = None
        return out
