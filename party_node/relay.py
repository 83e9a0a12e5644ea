"""A node's end of the relay: send to / receive from another party of a job, end-to-end encrypted.

    ch = RelayChannel(node, job_id, "psi")
    ch.send("partner", payload_bytes)          # seq 0, 1, 2, ... per (channel, recipient)
    data = ch.recv("partner", timeout=60)      # next in order from that sender

Payloads are sealed with `confide.e2e` to the recipient's box key from its CA-verified
certificate; the coordinator only stores and forwards opaque bytes.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from confide import e2e
from confide.errors import AgreementError, NotFound, ProtocolError

if TYPE_CHECKING:
    from party_node.node import Node


class RelayChannel:
    def __init__(self, node: "Node", job_id: str, channel: str, cancelled: threading.Event | None = None) -> None:
        self.node = node
        self.job_id = job_id
        self.channel = channel
        self.cancelled = cancelled or threading.Event()
        self._next_send: dict[str, int] = defaultdict(int)
        self._next_recv: dict[str, int] = defaultdict(int)
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, to: str, payload: bytes) -> int:
        info = self.node.cert_of(to)
        if info is None:
            raise AgreementError(f"no verified certificate for {to!r}; is it registered?")
        seq = self._next_send[to]
        env = e2e.seal(payload, sender=self.node.identity.name, sender_key=self.node.identity.signing_key,
                       recipient=to, recipient_box=info.box_public, job_id=self.job_id, channel=self.channel, seq=seq)
        with self.node.coordinator() as c:
            c.request("PUT", f"/v1/relay/{self.job_id}/{self.channel}/{to}/{seq}", content=env,
                      content_type="application/octet-stream")
        self._next_send[to] = seq + 1
        self.bytes_sent += len(env)
        return seq

    def recv(self, frm: str, timeout: float = 300.0, poll_s: float = 0.05) -> bytes:
        info = self.node.cert_of(frm)
        if info is None:
            raise AgreementError(f"no verified certificate for {frm!r}; is it registered?")
        seq = self._next_recv[frm]
        deadline = time.monotonic() + timeout
        with self.node.coordinator() as c:
            while True:
                if self.cancelled.is_set():
                    raise ProtocolError("step cancelled while waiting for a relayed message")
                try:
                    env = c.request("GET", f"/v1/relay/{self.job_id}/{self.channel}/{frm}/{seq}", raw=True)
                    break
                except NotFound:
                    if time.monotonic() > deadline:
                        raise ProtocolError(f"no message {self.channel}#{seq} from {frm} within {timeout:.0f}s") from None
                    time.sleep(poll_s)
                    poll_s = min(poll_s * 1.5, 1.0)
        data = e2e.open_sealed(env, sender=frm, sender_identity=info.identity_public,
                               recipient=self.node.identity.name, recipient_box=self.node.identity.box_key,
                               job_id=self.job_id, channel=self.channel, seq=seq)
        self._next_recv[frm] = seq + 1
        self.bytes_received += len(env)
        return data
