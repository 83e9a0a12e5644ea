"""Identifier normalisation: the first thing that happens to an identifier, on both sides.

Two parties only find each other's customers if they turn the same person's identifier into the
same string, so the rules here are part of the protocol (a change is a protocol-version change).

    phone         E.164 (`+8613812345678`). A fast path handles the common Chinese mobile shapes;
                  everything else goes through `phonenumbers` with a default region (CN unless
                  configured). Any number `phonenumbers` calls valid is accepted — mobile and
                  landline alike (`+861012345678` is a valid Beijing landline).
    email         NFKC, trimmed, lower-cased, one `@`, a dot in the domain, no spaces.
    openid, unionid, platform_id
                  exact strings; empty or whitespace-only values are invalid. Nothing is trimmed
                  (IDs are case- and byte-sensitive; a stray space is a different ID).
    phone_md5, phone_sha256
                  hex digests of the E.164 phone, any case in, lower-case out, length-checked.

Invalid values are counted per type and never matched (they become `None`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

import phonenumbers

from confide.errors import ValidationError


class IdType(str, Enum):
    phone = "phone"
    email = "email"
    openid = "openid"
    unionid = "unionid"
    platform_id = "platform_id"
    phone_md5 = "phone_md5"
    phone_sha256 = "phone_sha256"


def parse_id_type(value: str | IdType) -> IdType:
    """The IdType named `value`; ValidationError naming the known types otherwise."""
    try:
        return IdType(value)
    except ValueError:
        known = ", ".join(t.value for t in IdType)
        raise ValidationError(f"unknown identifier type {value!r}; expected one of: {known}") from None


@dataclass(frozen=True)
class Normalized:
    """Normalised values in input order (`None` where invalid) and the count of invalid ones."""

    id_type: IdType
    values: list[str | None]
    invalid: int

    @property
    def valid(self) -> int:
        return len(self.values) - self.invalid


# Full-width digits and plus sign (common in Chinese input methods) to ASCII, and the separators
# people type inside phone numbers removed. Built once.
_PHONE_TRANSLATE = {0xFF10 + i: ord("0") + i for i in range(10)}
_PHONE_TRANSLATE[0xFF0B] = ord("+")
for _ch in " \t\u3000-\u2010\u2011\u2012\u2013\u2014\u2212\uff0d.()\uff08\uff09/":
    _PHONE_TRANSLATE[ord(_ch)] = None
# 11-digit mainland mobile, optionally behind +86 / 0086 / 86.
_CN_MOBILE = re.compile(r"(?:\+86|0086|86)?(1[3-9][0-9]{9})")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
_HEX = re.compile(r"[0-9a-f]+")
_HEX_LEN = {IdType.phone_md5: 32, IdType.phone_sha256: 64}


def normalize_phone(raw: str, region: str = "CN") -> str | None:
    """E.164 form of `raw`, or None if it is not a valid phone number.

    Fast path (no `phonenumbers` call, ~1 µs): after removing separators and full-width forms,
    an 11-digit `1[3-9]…` mobile optionally prefixed by `+86`, `0086` or `86` — only when the
    default region is CN or the prefix names CN. Everything else: `phonenumbers.parse` with
    `region`, accepted if `is_valid_number`.
    """
    s = raw.translate(_PHONE_TRANSLATE)
    m = _CN_MOBILE.fullmatch(s)
    if m is not None and (region == "CN" or len(s) > 11):
        return "+86" + m.group(1)
    if not s or len(s) > 32:
        return None
    if s.startswith("00"):
        s = "+" + s[2:]
    try:
        num = phonenumbers.parse(s, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(num):
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def normalize_email(raw: str) -> str | None:
    s = unicodedata.normalize("NFKC", raw).strip().lower()
    if len(s) > 254 or _EMAIL.fullmatch(s) is None:
        return None
    return s


def normalize_exact(raw: str) -> str | None:
    if not raw or raw.isspace() or len(raw) > 512:
        return None
    return raw


def normalize_hex(raw: str, length: int) -> str | None:
    s = raw.strip().lower()
    if len(s) != length or _HEX.fullmatch(s) is None:
        return None
    return s


def normalize_one(id_type: IdType, raw: object, *, region: str = "CN") -> str | None:
    """Normalise one value of `id_type`; None (never an exception) if it is invalid or missing."""
    if raw is None or not isinstance(raw, str):
        # CSV readers give floats for empty cells (NaN) and numbers for unquoted phones.
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        else:
            return None
    if id_type is IdType.phone:
        return normalize_phone(raw, region)
    if id_type is IdType.email:
        return normalize_email(raw)
    if id_type in _HEX_LEN:
        return normalize_hex(raw, _HEX_LEN[id_type])
    return normalize_exact(raw)


def normalize(id_type: IdType | str, values: Iterable[object], *, region: str = "CN") -> Normalized:
    """Normalise a column of identifiers of one type.

    Returns the normalised values in input order, `None` for each invalid one, and how many
    were invalid. Raises ValidationError for an unknown identifier type or region.
    """
    t = parse_id_type(id_type)
    if t is IdType.phone and region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValidationError(f"unknown phone region {region!r}; use an ISO 3166 code such as CN")
    out: list[str | None] = [normalize_one(t, v, region=region) for v in values]
    invalid = sum(1 for v in out if v is None)
    return Normalized(t, out, invalid)


def normalize_many(columns: dict[IdType, Sequence[object]], *, region: str = "CN") -> dict[IdType, Normalized]:
    """Normalise several identifier columns of the same records (for waterfall matching)."""
    return {t: normalize(t, vals, region=region) for t, vals in columns.items()}
