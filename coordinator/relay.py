"""The relay: parties of a running job exchange end-to-end encrypted payloads through the
coordinator (parties need only reach the coordinator). The coordinator stores opaque bytes
keyed by (job, channel, sender, recipient, seq) and learns sizes and timing only."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from confide import agreements as ag
from confide.errors import Conflict, NotFound, PermissionDenied, ValidationError
from coordinator import service
from coordinator.storage.models import RelayMessage

MAX_SEQ = 10_000_000


def _job_parties(session: Session, job_id: str, party: str) -> tuple[set[str], str]:
    job = service.get_job(session, job_id, party)
    spec = ag.AgreementSpec.model_validate(service.get_version(session, job.agreement_id, job.version).spec)
    return {p.name for p in spec.parties}, job.status


def put(session: Session, job_id: str, channel: str, sender: str, recipient: str, seq: int, payload: bytes) -> int:
    if not (0 <= seq < MAX_SEQ) or not channel or len(channel) > 60:
        raise ValidationError("relay: bad channel or sequence number")
    parties, status = _job_parties(session, job_id, sender)
    if recipient not in parties or recipient == sender:
        raise PermissionDenied(f"relay: {recipient!r} is not another party of job {job_id}")
    if status not in ("pending", "running"):
        raise Conflict(f"relay: job {job_id} is {status}")
    exists = session.scalar(select(RelayMessage.id).where(
        RelayMessage.job_id == job_id, RelayMessage.channel == channel, RelayMessage.sender == sender,
        RelayMessage.recipient == recipient, RelayMessage.seq == seq))
    if exists is not None:
        raise Conflict(f"relay: message {channel}#{seq} from {sender} to {recipient} already sent (replay?)")
    session.add(RelayMessage(job_id=job_id, channel=channel, sender=sender, recipient=recipient, seq=seq,
                             payload=payload))
    return len(payload)


def get(session: Session, job_id: str, channel: str, sender: str, recipient: str, seq: int) -> bytes:
    parties, _ = _job_parties(session, job_id, recipient)
    msg = session.scalars(select(RelayMessage).where(
        RelayMessage.job_id == job_id, RelayMessage.channel == channel, RelayMessage.sender == sender,
        RelayMessage.recipient == recipient, RelayMessage.seq == seq)).first()
    if msg is None:
        raise NotFound(f"relay: no message {channel}#{seq} from {sender} yet")
    return bytes(msg.payload)


def purge(session: Session, job_id: str) -> None:
    session.execute(delete(RelayMessage).where(RelayMessage.job_id == job_id))
