"""PSI wire types: one set of typed messages shared by both roles.

Every message carries `kind` (the discriminator), the protocol `version`, the `mode`, the
`session` id and the sender's sequence number `seq` (0, 1, 2, … per sender; a gap or repeat is a
replay or reordering and is refused).

Wire form (`encode`/`decode`): compact binary, no base64 —

    b"CPSI" | u32 header length | header (canonical JSON of every field but `data`)
            | raw `data` bytes (concatenated 32-byte points, 8-byte tags or Paillier ciphertexts)

so a chunk of N points costs 32·N bytes plus a header of ~150 bytes.
"""

from __future__ import annotations

import json
import struct
from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from confide.canonical import canonical_json
from confide.errors import ProtocolError

VERSION = 1
MAGIC = b"CPSI"
MAX_HEADER_BYTES = 64 * 1024
# One chunk carries at most this many rows; bigger inputs stream as several chunks.
MAX_CHUNK_ROWS = 65_536
MAX_CIPHER_BYTES = 1024  # a Paillier ciphertext mod n^2 for n of up to 4096 bits


class Mode(str, Enum):
    cardinality = "cardinality"
    match = "match"
    profile = "profile"


class Stream(str, Enum):
    """Which payload a `points` chunk belongs to (`req` = requester, `resp` = responder)."""

    req_single = "req_single"  # requester's own items blinded once (shuffled), 32 B each
    resp_single = "resp_single"  # responder's own items blinded once (shuffled), 32 B each
    resp_tags = "resp_tags"  # requester's items blinded twice, as 8-byte tags
    req_tags = "req_tags"  # responder's items blinded twice, as 8-byte tags (match mode)
    resp_cipher = "resp_cipher"  # profile: the responder's encrypted row values


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    version: Literal[1] = VERSION
    mode: Mode
    session: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0)


class Hello(_Msg):
    """Requester → responder: opens a session and fixes its parameters."""

    kind: Literal["hello"] = "hello"
    agreement_id: str = Field(min_length=1, max_length=200)
    job_id: str = Field(min_length=1, max_length=200)
    id_type: str = Field(min_length=1, max_length=40)
    count: int = Field(ge=0, le=10**9, description="items the requester will send")
    join_salt: str = Field(default="", max_length=64, description="hex, match mode")
    profile_columns: list[str] = Field(default_factory=list, max_length=64)


class Ready(_Msg):
    """Responder → requester: accepts the session; its item count and (match) its join salt,
    (profile) its Paillier public modulus and the packing layout."""

    kind: Literal["ready"] = "ready"
    count: int = Field(ge=0, le=10**9)
    join_salt: str = Field(default="", max_length=64)
    paillier_n: str = Field(default="", max_length=2000)
    layout: list[tuple[str, str, str]] = Field(
        default_factory=list, max_length=4096, description="(column, kind, value) per slot"
    )
    slot_bits: int = Field(default=0, ge=0, le=256)
    ciphers_per_row: int = Field(default=0, ge=0, le=64)


class Points(_Msg):
    """A chunk of one stream. `offset` is the index of its first row within the stream;
    `final` marks the stream's last chunk."""

    kind: Literal["points"] = "points"
    stream: Stream
    offset: int = Field(ge=0)
    final: bool
    data: bytes = Field(repr=False)


class Result(_Msg):
    """Requester → responder: the session is over; `intersection_size` only where the agreement
    lets the responder learn it (else None)."""

    kind: Literal["result"] = "result"
    intersection_size: int | None = Field(default=None, ge=0)


class MaskedSum(_Msg):
    """Profile, requester → responder: the homomorphic sums of the matched rows, each masked
    with a uniformly random plaintext the requester keeps (so the responder learns nothing)."""

    kind: Literal["masked_sum"] = "masked_sum"
    data: bytes = Field(repr=False)


class Decrypted(_Msg):
    """Profile, responder → requester: the decryptions of the masked sums (one integer per
    ciphertext, decimal strings)."""

    kind: Literal["decrypted"] = "decrypted"
    values: list[str] = Field(max_length=64)


Message = Annotated[
    Union[Hello, Ready, Points, Result, MaskedSum, Decrypted], Field(discriminator="kind")
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def encode(msg: _Msg) -> bytes:
    """The wire bytes of `msg`."""
    header = msg.model_dump(mode="json", exclude={"data"})
    data = getattr(msg, "data", b"")
    header["data_len"] = len(data)
    hb = canonical_json(header)
    return MAGIC + struct.pack(">I", len(hb)) + hb + data


def decode(wire: bytes, *, max_bytes: int = 64 * 1024 * 1024) -> Message:
    """Parse wire bytes into a message. Raises ProtocolError if they are oversized, truncated,
    of another protocol version or otherwise malformed."""
    if len(wire) > max_bytes:
        raise ProtocolError(f"message of {len(wire)} bytes exceeds the limit of {max_bytes}")
    if len(wire) < 8 or wire[:4] != MAGIC:
        raise ProtocolError("not a PSI message (bad magic)")
    (hlen,) = struct.unpack(">I", wire[4:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(wire):
        raise ProtocolError("PSI message header is oversized or truncated")
    try:
        header = json.loads(wire[8 : 8 + hlen])
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("PSI message header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("PSI message header is not an object")
    if header.get("version") != VERSION:
        raise ProtocolError(
            f"PSI protocol version {header.get('version')!r} is not supported (this node speaks {VERSION})"
        )
    data_len = header.pop("data_len", None)
    data = wire[8 + hlen :]
    if data_len != len(data):
        raise ProtocolError("PSI message payload length does not match its header")
    if header.get("kind") in ("points", "masked_sum"):
        header["data"] = data
    elif data:
        raise ProtocolError("PSI message carries a payload its kind does not have")
    try:
        return _ADAPTER.validate_python(header)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError(f"malformed PSI message: {where}: {first.get('msg')}") from None
