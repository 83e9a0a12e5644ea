"""The consent gate: the one question every processing activity asks before data moves.

    gate.allowed(subjects, purpose, recipient, at) -> GateDecision

Default deny: a subject is allowed only if a current, unexpired grant under a still-sufficient
notice covers `purpose` (or a parent purpose) and, where separate consent applies, names
`recipient`; any refusal, withdrawal or opt-out covering it wins over every grant.

Subjects are the node's own row keys (e.g. `member_id`): the gate never sees raw identifiers.
The consent store (`consent.store`) implements this protocol; jobs depend only on the protocol.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class GateDecision:
    """Which subjects may be processed, and why the others may not.

    `allowed` keeps the input order. `evidence` maps each allowed subject to the id of the
    consent event that allows it. `denied_counts` counts denied subjects per reason
    (e.g. `no_consent`, `refused`, `withdrawn`, `expired`, `notice_superseded`, `opted_out`,
    `no_recipient_consent`); it is what goes to the audit log, never the subjects themselves.
    """

    purpose: str
    recipient: str | None
    at: dt.datetime
    allowed: list[str]
    evidence: dict[str, str] = field(default_factory=dict)
    denied_counts: dict[str, int] = field(default_factory=dict)

    @property
    def allowed_count(self) -> int:
        return len(self.allowed)

    @property
    def denied_count(self) -> int:
        return sum(self.denied_counts.values())


class ConsentGate(Protocol):
    def allowed(
        self,
        subjects: Sequence[str],
        purpose: str,
        recipient: str | None,
        at: dt.datetime,
    ) -> GateDecision:
        """Decide for each subject; write one audit entry with the counts. Never raises for
        unknown subjects (they are denied as `no_consent`); raises ValidationError for an
        unknown purpose or recipient."""
        ...
