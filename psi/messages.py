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

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from pydantic import ValidationError as PydanticValidationError

from confide.canonical import canonical_json
from confide.errors import ProtocolError

VERSION = 1
MAGIC = b"CPSI"
MAX_HEADER_BYTES = 64 * 1024
# One chunk carries at most this many rows; bigger inputs stream as several chunks.
MAX_CHUNK_ROWS = 65_536
MAX_CIPHER_BYTES = 1024  # a Paillier ciphertext mod n^2 for n of up to 4096 bits
# Profile gate: a Paillier modulus of the requester between these sizes, k_min up to MAX_K_MIN,
# and one gate message (all powers of all count slots) of at most MAX_GATE_BYTES.
MIN_PAILLIER_BITS = 1024  # production keys are 2048 bits; 1024 only for test-sized keys
MAX_PAILLIER_BITS = 4096
MAX_K_MIN = 1000
MAX_GATE_SLOTS = 4096
MAX_GATE_BYTES = 48 * 1024 * 1024


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
    """Profile (before the gated reveal), responder → requester: the decryptions of the masked
    sums (one integer per ciphertext, decimal strings). The profile roles no longer send it: the
    responder keeps the decryptions and answers `GatePowers` with `GatedValues`."""

    kind: Literal["decrypted"] = "decrypted"
    values: list[str] = Field(max_length=64)


def cipher_bytes(n: int) -> int:
    """Width of one Paillier ciphertext (mod n²) on the wire."""
    return (2 * n.bit_length() + 7) // 8


class GatePowers(_Msg):
    """Profile, requester → responder: the requester's own fresh Paillier modulus n_B and, for
    each of the `gates` count slots (layout order), Enc_B(r^j mod n_B) for j = 0..k_min, where r
    is that slot's mask — `gates · (k_min+1)` ciphertexts of `cipher_bytes(n_B)` bytes each."""

    kind: Literal["gate_powers"] = "gate_powers"
    paillier_n: str = Field(min_length=1, max_length=1300, pattern=r"^[1-9][0-9]*$")
    k_min: int = Field(ge=0, le=MAX_K_MIN)
    gates: int = Field(ge=1, le=MAX_GATE_SLOTS)
    data: bytes = Field(repr=False, max_length=MAX_GATE_BYTES)

    @model_validator(mode="after")
    def _sizes(self) -> "GatePowers":
        n = int(self.paillier_n)
        if not MIN_PAILLIER_BITS <= n.bit_length() <= MAX_PAILLIER_BITS or n % 2 == 0:
            raise ValueError(f"paillier_n must be an odd modulus of {MIN_PAILLIER_BITS}-{MAX_PAILLIER_BITS} bits")
        want = self.gates * (self.k_min + 1) * cipher_bytes(n)
        if len(self.data) != want:
            raise ValueError(f"carries {len(self.data)} bytes, {self.gates} gates x {self.k_min + 1} "
                             f"powers need {want}")
        return self


class GatedValues(_Msg):
    """Profile, responder → requester: under the requester's key, one u = Enc_B(ρ·P(count)) per
    gate, then one v = Enc_B(ρ·P(count)·x) per slot (layout order), x the slot's masked sum:
    `(gates + slots)` ciphertexts of equal width."""

    kind: Literal["gated_values"] = "gated_values"
    gates: int = Field(ge=1, le=MAX_GATE_SLOTS)
    slots: int = Field(ge=1, le=MAX_GATE_SLOTS)
    data: bytes = Field(repr=False, max_length=2 * MAX_GATE_SLOTS * MAX_CIPHER_BYTES)

    @model_validator(mode="after")
    def _sizes(self) -> "GatedValues":
        if self.slots < self.gates:
            raise ValueError("every gate gates at least its own slot")
        count = self.gates + self.slots
        if not self.data or len(self.data) % count or len(self.data) // count > MAX_CIPHER_BYTES:
            raise ValueError(f"must carry {count} ciphertexts of equal width (at most {MAX_CIPHER_BYTES} bytes)")
        return self


_PAYLOAD_KINDS = ("points", "masked_sum", "gate_powers", "gated_values")

Message = Annotated[
    Union[Hello, Ready, Points, Result, MaskedSum, Decrypted, GatePowers, GatedValues],
    Field(discriminator="kind"),
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
    if header.get("kind") in _PAYLOAD_KINDS:
        header["data"] = data
    elif data:
        raise ProtocolError("PSI message carries a payload its kind does not have")
    try:
        return _ADAPTER.validate_python(header)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError(f"malformed PSI message: {where}: {first.get('msg')}") from None
