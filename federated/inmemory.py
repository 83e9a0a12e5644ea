"""The in-memory twin of the relay: drive guest, host(s) and arbiter in one process.

Every message goes through its wire form (`encode` -> `decode`) exactly as over the relay, in
FIFO order. `tap(recipient, message)` sees every delivered message (the leakage tests use it).
For tests and for debugging a protocol change; nodes use the relay.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Mapping

from confide.errors import ProtocolError
from federated import messages as m
from federated.roles import Outgoing


def run_in_memory(roles: Mapping[str, Any], first: Iterable[Outgoing],
                  tap: Callable[[str, m._Msg], None] | None = None, max_messages: int = 1_000_000) -> int:
    """Deliver `first` and everything it causes until no message is left; returns the number
    of messages delivered. Raises ProtocolError on a message to an unknown party."""
    q: deque[Outgoing] = deque(first)
    count = 0
    while q:
        to, msg = q.popleft()
        if to not in roles:
            raise ProtocolError(f"message to unknown party {to!r}")
        wire = m.decode(m.encode(msg))
        if tap is not None:
            tap(to, wire)
        q.extend(roles[to].handle(wire))
        count += 1
        if count > max_messages:
            raise ProtocolError("protocol did not terminate")
    return count
