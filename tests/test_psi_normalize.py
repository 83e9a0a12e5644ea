"""Identifier normalisation on a messy real-world corpus."""

from __future__ import annotations

import hashlib

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.errors import ValidationError
from psi.normalize import IdType, normalize, normalize_one, normalize_phone

# (raw, expected E.164 or None)
PHONE_CORPUS = [
    ("13812345678", "+8613812345678"),
    ("138 1234 5678", "+8613812345678"),
    ("138-1234-5678", "+8613812345678"),
    ("138.1234.5678", "+8613812345678"),
    (" 13812345678 ", "+8613812345678"),
    ("+86 138 1234 5678", "+8613812345678"),
    ("+86-138-1234-5678", "+8613812345678"),
    ("+8613812345678", "+8613812345678"),
    ("0086 13812345678", "+8613812345678"),
    ("008613812345678", "+8613812345678"),
    ("8613812345678", "+8613812345678"),
    ("１３８１２３４５６７８", "+8613812345678"),  # full-width digits
    ("＋８６ １３８ １２３４ ５６７８", "+8613812345678"),  # full-width plus and ideographic space
    ("(+86) 138-1234-5678", "+8613812345678"),
    ("19912345678", "+8619912345678"),
    ("010-12345678", "+861012345678"),  # Beijing landline
    ("(021) 6123-4567", "+862161234567"),  # Shanghai landline
    ("+86 10 1234 5678", "+861012345678"),
    ("+1 650 253 0000", "+16502530000"),  # foreign numbers with their country code
    ("+44 20 7946 0958", "+442079460958"),
    ("+852 6123 4567", "+85261234567"),
    ("1381234567", None),  # too short
    ("138123456789", None),  # too long
    ("12345678901", None),  # 12x is not a mobile prefix
    ("00000000000", None),
    ("abc", None),
    ("", None),
    ("   ", None),
    ("+86", None),
    ("138-1234-567x", None),
    ("1" * 40, None),
]


@pytest.mark.parametrize("raw,expected", PHONE_CORPUS)
def test_phone_corpus(raw: str, expected: str | None) -> None:
    assert normalize_phone(raw) == expected


def test_phone_region_is_configurable() -> None:
    assert normalize_phone("020 7946 0958", region="GB") == "+442079460958"
    # a bare 11-digit CN mobile is only assumed CN when the default region is CN
    assert normalize_phone("+86 13812345678", region="GB") == "+8613812345678"
    with pytest.raises(ValidationError):
        normalize("phone", ["1"], region="XX")


@given(st.integers(3, 9), st.integers(0, 10**9 - 1))
@settings(max_examples=200, deadline=None)
def test_fast_path_agrees_with_phonenumbers(second: int, rest: int) -> None:
    raw = f"1{second}{rest:09d}"
    num = phonenumbers.parse(raw, "CN")
    if phonenumbers.is_valid_number(num):
        assert normalize_phone(raw) == phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
    else:
        # the fast path accepts the whole 1[3-9] mobile plan shape; still E.164 and the same
        # on both sides
        assert normalize_phone(raw) == "+86" + raw


def test_email() -> None:
    vals = ["  Alice@Example.COM ", "bob@example.com", "no-at.example.com", "a@b", "a b@c.com",
            "x@y.cn", "ＡＢＣ@ＥＸＡＭＰＬＥ.com", "", None, "a@@b.com"]
    n = normalize("email", vals)
    assert n.values == ["alice@example.com", "bob@example.com", None, None, None, "x@y.cn",
                        "abc@example.com", None, None, None]
    assert n.invalid == 6


def test_exact_ids_are_exact() -> None:
    vals = ["oAbC123", "oabc123", " oAbC123", "", "   ", None, "x" * 600]
    n = normalize("openid", vals)
    assert n.values == ["oAbC123", "oabc123", " oAbC123", None, None, None, None]
    for t in (IdType.unionid, IdType.platform_id):
        assert normalize_one(t, "ID-1") == "ID-1"


def test_hashed_phones() -> None:
    md5 = hashlib.md5(b"+8613812345678").hexdigest()
    sha = hashlib.sha256(b"+8613812345678").hexdigest()
    assert normalize_one(IdType.phone_md5, md5.upper()) == md5
    assert normalize_one(IdType.phone_md5, sha) is None  # wrong length
    assert normalize_one(IdType.phone_md5, "z" * 32) is None
    assert normalize_one(IdType.phone_sha256, f" {sha.upper()} ") == sha
    assert normalize_one(IdType.phone_sha256, md5) is None


def test_invalid_counted_per_type_and_unknown_type_refused() -> None:
    n = normalize("phone", ["13812345678", "bad", 13912345678, None, float("nan")])
    assert n.values[0] == "+8613812345678" and n.values[2] == "+8613912345678"
    assert n.invalid == 3 and n.valid == 2
    with pytest.raises(ValidationError, match="unknown identifier type"):
        normalize("imei", ["1"])
