"""Vertical-training wire types: one set of typed messages shared by guest, hosts and arbiter.

Every message carries `kind` (the discriminator), the protocol `version`, the `job_id`, the
`sender` (party name) and, where it belongs to a round, the `epoch` and `batch`. A message of
another version, job or out-of-order round is refused (ProtocolError) by the roles.

Wire form (`encode` / `decode`): compact binary, no base64 —

    b"CVFL" | u32 header length | header (canonical JSON of every field but `data`) | raw `data`

`data` holds fixed-width big-endian ciphertexts (2·key_bits/8 bytes each), plaintexts
(key_bits/8 bytes) or 8-byte score shares, so a batch's ciphertext costs 512 bytes at 2048 bits.

What each message reveals, and to whom, is tabulated in docs/vfl.md.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from confide.canonical import canonical_json
from confide.errors import ProtocolError

VERSION = 1
MAGIC = b"CVFL"
MAX_HEADER_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_CHUNK_ROWS = 8192  # encrypted feature rows per FeatureCiphers message (4 MiB at 2048 bits)

Role = Literal["guest", "host", "arbiter"]


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = VERSION
    job_id: str = Field(min_length=1, max_length=200)
    sender: str = Field(min_length=1, max_length=200)


class ArbiterKey(_Msg):
    """Arbiter → every party: the job's Paillier public key."""

    kind: Literal["arbiter_key"] = "arbiter_key"
    n: str = Field(min_length=1, max_length=2000, description="modulus, decimal")
    key_bits: int = Field(ge=512, le=8192)
    config_digest: str = Field(min_length=64, max_length=64)


class PartyHello(_Msg):
    """Guest/host → the other parties: shape of its side and agreement on the run.
    `mask_seed` (host → guest only) seeds the pairwise masks that hide loss and score shares
    from the arbiter."""

    kind: Literal["party_hello"] = "party_hello"
    role: Literal["guest", "host"]
    rows: int = Field(ge=0, le=10**9)
    rows_digest: str = Field(min_length=64, max_length=64, description="sha256 of the aligned join keys")
    features: int = Field(ge=0, le=4096)
    slot_bits: int = Field(ge=8, le=1024)
    ciphers_per_row: int = Field(ge=0, le=64)
    config_digest: str = Field(min_length=64, max_length=64)
    mask_seed: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")


class FeatureCiphers(_Msg):
    """Guest/host → the other parties, once per job: its training rows' features, fixed-point,
    packed and encrypted under the arbiter's key (`ciphers_per_row` ciphertexts per row)."""

    kind: Literal["feature_ciphers"] = "feature_ciphers"
    offset: int = Field(ge=0)
    rows: int = Field(ge=0, le=MAX_CHUNK_ROWS)
    final: bool
    data: bytes = Field(repr=False)


class WeightCiphers(_Msg):
    """Guest → host, once per job (loss "irls" only): the per-row IRLS weights s_i = sigma'(a_i)
    of its training rows, fixed-point, one ciphertext per row, under the arbiter's key."""

    kind: Literal["weight_ciphers"] = "weight_ciphers"
    offset: int = Field(ge=0)
    rows: int = Field(ge=0, le=MAX_CHUNK_ROWS)
    final: bool
    data: bytes = Field(repr=False)


class GuestGradPart(_Msg):
    """Host → guest, per batch: [[X_guest^T (0.25 u_host)]] (taylor) or [[X_guest^T S u_host]]
    (irls) over the batch, packed, rerandomized."""

    kind: Literal["guest_grad_part"] = "guest_grad_part"
    epoch: int = Field(ge=0)
    batch: int = Field(ge=0)
    data: bytes = Field(repr=False)


class HostGradPart(_Msg):
    """Guest → host: [[X_host^T d_guest]] (taylor) or [[X_host^T c]] (irls); host → other host
    (taylor): [[X_host^T (0.25 u_sender)]]."""

    kind: Literal["host_grad_part"] = "host_grad_part"
    epoch: int = Field(ge=0)
    batch: int = Field(ge=0)
    data: bytes = Field(repr=False)


class DecryptRequest(_Msg):
    """Guest/host → arbiter, per batch: its aggregate ciphertexts plus a uniform mask mod n."""

    kind: Literal["decrypt_request"] = "decrypt_request"
    epoch: int = Field(ge=0)
    batch: int = Field(ge=0)
    data: bytes = Field(repr=False)


class DecryptReply(_Msg):
    """Arbiter → the requesting party: the decryptions (still masked)."""

    kind: Literal["decrypt_reply"] = "decrypt_reply"
    epoch: int = Field(ge=0)
    batch: int = Field(ge=0)
    data: bytes = Field(repr=False)


class LossShare(_Msg):
    """Guest/host → arbiter, per epoch: its additive share (mod 2^128, fixed-point) of the
    epoch's summed training loss (Taylor or IRLS surrogate); pairwise masks cancel only in the sum."""

    kind: Literal["loss_share"] = "loss_share"
    epoch: int = Field(ge=0)
    share: str = Field(min_length=1, max_length=60, description="decimal, mod 2^128")


class EpochDone(_Msg):
    """Arbiter → every party: the epoch's mean training loss and whether to stop."""

    kind: Literal["epoch_done"] = "epoch_done"
    epoch: int = Field(ge=0)
    loss: float
    stop: bool
    reason: str = Field(default="", max_length=200)


class ScoreShare(_Msg):
    """Guest/host → arbiter: its partial logit per row plus pairwise masks (u64 each)."""

    kind: Literal["score_share"] = "score_share"
    request_id: str = Field(min_length=1, max_length=100)
    rows: int = Field(ge=0, le=10**7)
    data: bytes = Field(repr=False)


class Scores(_Msg):
    """Arbiter → guest: one 0–1 score per row (float64, big-endian)."""

    kind: Literal["scores"] = "scores"
    request_id: str = Field(min_length=1, max_length=100)
    rows: int = Field(ge=0, le=10**7)
    data: bytes = Field(repr=False)


Message = Annotated[
    Union[
        ArbiterKey, PartyHello, FeatureCiphers, WeightCiphers, GuestGradPart, HostGradPart, DecryptRequest,
        DecryptReply, LossShare, EpochDone, ScoreShare, Scores,
    ],
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
_WITH_DATA = {"feature_ciphers", "weight_ciphers", "guest_grad_part", "host_grad_part", "decrypt_request", "decrypt_reply",
              "score_share", "scores"}
ALL_KINDS = (
    "arbiter_key", "party_hello", "feature_ciphers", "weight_ciphers", "guest_grad_part", "host_grad_part",
    "decrypt_request", "decrypt_reply", "loss_share", "epoch_done", "score_share", "scores",
)


def encode(msg: _Msg) -> bytes:
    """The wire bytes of `msg`."""
    header = msg.model_dump(mode="json", exclude={"data"})
    data = getattr(msg, "data", b"")
    header["data_len"] = len(data)
    hb = canonical_json(header)
    return MAGIC + struct.pack(">I", len(hb)) + hb + data


def decode(wire: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse wire bytes into a message. Raises ProtocolError if they are oversized, truncated,
    of another protocol version or otherwise malformed."""
    if len(wire) > max_bytes:
        raise ProtocolError(f"message of {len(wire)} bytes exceeds the limit of {max_bytes}")
    if len(wire) < 8 or wire[:4] != MAGIC:
        raise ProtocolError("not a vertical-training message (bad magic)")
    (hlen,) = struct.unpack(">I", wire[4:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(wire):
        raise ProtocolError("vertical-training message header is oversized or truncated")
    try:
        header = json.loads(wire[8 : 8 + hlen])
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("vertical-training message header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("vertical-training message header is not an object")
    if header.get("version") != VERSION:
        raise ProtocolError(
            f"vertical-training protocol version {header.get('version')!r} is not supported (this node speaks {VERSION})"
        )
    data_len = header.pop("data_len", None)
    data = wire[8 + hlen :]
    if data_len != len(data):
        raise ProtocolError("vertical-training message payload length does not match its header")
    if header.get("kind") in _WITH_DATA:
        header["data"] = data
    elif data:
        raise ProtocolError("vertical-training message carries a payload its kind does not have")
    try:
        return _ADAPTER.validate_python(header)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError(f"malformed vertical-training message: {where}: {first.get('msg')}") from None
