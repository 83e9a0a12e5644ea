"""The node's audit trail of processing decisions and job steps.

Entries hold pseudonymous references, counts and hashes only, never raw identifiers. They go
to the node's Merkle audit log (`consent.audit.AuditLog`) so a compliance officer can verify
them; when that log is not available the entries still go to the service log.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from confide.pki import Identity

log = logging.getLogger("confide.audit")


class NodeAudit:
    def __init__(self, factory: sessionmaker[Session], identity: Identity) -> None:
        self.factory = factory
        self.identity = identity
        self.log: Any = None
        try:
            from consent.audit import AuditLog
        except ImportError:
            return
        self.log = AuditLog(factory, identity, identity.name)

    def append(self, kind: str, payload: dict[str, Any], *, session: Session | None = None) -> None:
        log.info("audit %s %s", kind, payload)
        if self.log is not None:
            self.log.append(kind, payload, session=session)
