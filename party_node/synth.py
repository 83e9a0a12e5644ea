"""Realistic, deterministic synthetic data for one brand and one data partner.

`generate()` writes, for a fixed seed, byte-identical files:

- ``brand_members``      the brand's member centre: messy identifiers, demographics, RFM and
                         behaviour features and the ``high_value`` seed label (> 1,000 CNY spent in
                         the last 3 months);
- ``brand_leads``        an auto lead table (test drives, dealer visits, lead grade ...) with the
                         ``converted`` outcome (historical leads, 91-450 days old);
- ``brand_new_leads``    fresh leads (the last two weeks) to score, without an outcome; what became
                         of them is in ``brand_new_leads_outcomes`` (lead_id, converted), a file no
                         party holds at scoring time — it lets a demo check the scores afterwards;
- ``brand_preferences``  subjects who turned on "no personalised marketing" (PIPL Art. 24):
                         subject, no_personalised_marketing, channel, changed_at;
- ``partner_population`` the partner's people (default 3x the members): app-interest tags, income,
                         purchase intent, car insurance, car-app usage, keyed by ``partner_id``;
- ``brand_consent`` / ``partner_consent``  one row per consent event, in the columns
                         ``consent.importer`` reads, with ``brand_notices.yaml`` /
                         ``partner_notices.yaml`` holding the notice versions the events cite;
- ``ground_truth.json``  overlap sizes, expected identifier matches and the achievable lead-scoring
                         AUC with and without the partner's features;
- ``<dataset>.schema.yaml`` per data file, in the format ``confide node ingest`` reads.

Flags are written as 0/1, dates as ``YYYY-MM-DD``, consent times as ISO 8601 UTC
(``2026-01-02T03:04:05Z``), missing values as empty CSV fields / Parquet nulls.

How the data is built: one universe of *people* carries everything that belongs to a person (the
real mobile number, e-mail, WeChat ids, age, city, and four latent traits). Each table takes a
subset of people and renders its own rows from them, with its own formatting habits, so the same
person has the same normalised phone everywhere. The latent traits plant the ground truth:

- ``z_val``  spending power: brand monetary features, partner income / consumption / luxury tags;
- ``z_eng``  engagement with the brand: opens, clicks, coupons;
- ``u_b``    purchase intent the brand can observe (test drives, dealer visits, lead grade);
- ``u_p``    purchase intent only the partner can observe (intent score, insurance expiring,
             car-app usage, auto-interest tags).

Lead conversion is ``sigmoid(-2.3 + u_b + 1.1 u_p + 0.35 z_val)``, so the partner's features
carry signal the brand cannot get on its own (``ground_truth.json`` reports how much, with all
features and with the smaller set the demo's federated model uses: ``LEAD_MODEL_*``,
``PARTNER_MODEL_*``). The signal sits in categorical columns
(lead grade, source, insurance status, income level) and in numeric ones (test drives, dealer
visits, auto-interest score, app activity, insurance due within 90 days).

Consent: members, leads and the partner's users each follow a policy of ask / grant / withdraw
rates per purpose; leads are asked on the lead form and grant the lead purposes more often; one
person's decisions are correlated (a latent privacy attitude); the partner's grants for the
other party's matching, modelling and scoring name that party as recipient.

Everything is vectorised numpy / Arrow compute; there are no per-row Python loops, so a million
members take seconds. Consent logs (about 7 events per subject) are rendered and written in
chunks of a million rows to bound memory.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from confide.errors import ValidationError

# Fixed reference date: the data describes the world as of this instant, whatever today is, so
# that a seed always gives the same files.
AS_OF = np.datetime64("2026-11-01T00:00:00", "s")
AS_OF_DAY = AS_OF.astype("datetime64[D]")

FORMATS = ("csv", "parquet")
DATASETS = ("brand_members", "brand_leads", "partner_population", "brand_consent", "partner_consent")

# Purposes (taxonomy keys of consent/purposes.yaml). Own-use purposes are asked at sign-up;
# collaboration purposes are first asked when the collaboration programme starts (with notice
# v3.0). Only `sharing.*` needs a separate consent naming the recipient (PIPL Art. 23), as in
# the purpose registry; other rows leave `recipient` empty.
COLLAB_PURPOSES = ("audience.overlap", "audience.match", "modeling.lead_scoring", "scoring.lead",
                   "modeling.lookalike", "sharing.third_party")
OWN_PURPOSES = ("marketing.personalized",)
RECIPIENT_PURPOSES = ("sharing.third_party",)
PURPOSES = COLLAB_PURPOSES + OWN_PURPOSES

# Share of members whose phones are rendered in each way (messy CRM / mini-program imports).
# (name, template, weight, valid). In templates `d` is the next digit of the 11-digit number;
# `F` marks a template whose digits are rendered full-width; `None` = missing; a template
# without `d` is a literal junk value.
_MEMBER_PHONE_FORMATS: tuple[tuple[str, Optional[str], float, bool], ...] = (
    ("plain", "ddddddddddd", 0.38, True),
    ("cc_spaced", "+86 ddd dddd dddd", 0.12, True),
    ("e164", "+86ddddddddddd", 0.10, True),
    ("intl_00", "0086-ddddddddddd", 0.05, True),
    ("dashed", "ddd-dddd-dddd", 0.08, True),
    ("spaced", "ddd dddd dddd", 0.07, True),
    ("cc_bare", "86ddddddddddd", 0.03, True),
    ("cc_paren", "(+86) ddddddddddd", 0.025, True),
    ("fullwidth", "Fddddddddddd", 0.015, True),
    ("fullwidth_cc", "F＋８６ ddd dddd dddd", 0.005, True),
    ("short10", "dddddddddd", 0.012, False),
    ("short9", "ddd-dddd-dd", 0.008, False),
    ("junk_na", "N/A", 0.003, False),
    ("junk_dash", "-", 0.002, False),
    ("missing", None, 0.05, False),
)
# Leads come from web forms and auto platforms: the phone is the lead key, rarely missing.
_LEAD_PHONE_FORMATS: tuple[tuple[str, Optional[str], float, bool], ...] = (
    ("plain", "ddddddddddd", 0.55, True),
    ("cc_spaced", "+86 ddd dddd dddd", 0.12, True),
    ("e164", "+86ddddddddddd", 0.12, True),
    ("intl_00", "0086-ddddddddddd", 0.03, True),
    ("dashed", "ddd-dddd-dddd", 0.07, True),
    ("spaced", "ddd dddd dddd", 0.05, True),
    ("fullwidth", "Fddddddddddd", 0.02, True),
    ("short10", "dddddddddd", 0.02, False),
    ("missing", None, 0.02, False),
)
# The partner normalises phones itself, but two ways: plain 11 digits or E.164.
_PARTNER_PHONE_FORMATS: tuple[tuple[str, Optional[str], float, bool], ...] = (
    ("plain", "ddddddddddd", 0.62, True),
    ("e164", "+86ddddddddddd", 0.35, True),
    ("missing", None, 0.03, False),
)

_MOBILE_PREFIXES = np.array(
    [130, 131, 132, 133, 134, 135, 136, 137, 138, 139, 150, 151, 152, 153, 155, 156, 157, 158,
     159, 166, 170, 173, 175, 176, 177, 178, 180, 181, 182, 183, 184, 185, 186, 187, 188, 189,
     191, 193, 195, 198, 199],
    dtype=np.int64,
)

_SURNAMES = np.array(
    ["wang", "li", "zhang", "liu", "chen", "yang", "huang", "zhao", "wu", "zhou", "xu", "sun",
     "ma", "zhu", "hu", "guo", "he", "lin", "luo", "gao", "zheng", "liang", "xie", "song", "tang"]
)
_GIVEN = np.array(
    ["wei", "fang", "na", "min", "jing", "li", "qiang", "lei", "jun", "yang", "yong", "yan",
     "jie", "tao", "ming", "chao", "xiu", "hui", "hua", "ping", "gang", "xin", "yu", "hao",
     "jia", "yi", "ting", "lu", "bo", "kai", "xiaoming", "lili", "jianguo", "haiyan", "zihan"]
)
_DOMAINS = np.array(
    ["qq.com", "163.com", "126.com", "sina.com", "foxmail.com", "gmail.com", "outlook.com",
     "hotmail.com", "icloud.com", "139.com", "yeah.net", "sohu.com"]
)
_DOMAIN_P = np.array([0.36, 0.20, 0.08, 0.05, 0.05, 0.05, 0.05, 0.04, 0.05, 0.03, 0.02, 0.02])

_CITIES: dict[int, list[str]] = {
    1: ["Beijing", "Shanghai", "Guangzhou", "Shenzhen"],
    2: ["Chengdu", "Hangzhou", "Chongqing", "Wuhan", "Xi'an", "Suzhou", "Tianjin", "Nanjing",
        "Changsha", "Zhengzhou", "Dongguan", "Qingdao", "Shenyang", "Ningbo", "Kunming"],
    3: ["Wuxi", "Foshan", "Hefei", "Dalian", "Fuzhou", "Xiamen", "Harbin", "Jinan", "Wenzhou",
        "Nanning", "Changchun", "Quanzhou", "Shijiazhuang", "Guiyang", "Nanchang"],
    4: ["Zhuhai", "Zhongshan", "Yangzhou", "Luoyang", "Weifang", "Baoding", "Xuzhou", "Yantai",
        "Shantou", "Zhuzhou", "Jiangmen", "Huizhou", "Liuzhou", "Mianyang"],
    5: ["Anshun", "Hegang", "Sanmenxia", "Baise", "Jiuquan", "Yichun", "Tongren", "Heihe",
        "Shangluo", "Lincang"],
}
_TIER_P = np.array([0.13, 0.25, 0.24, 0.21, 0.17])

_ALPHABET = np.array(
    [ord(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"],
    dtype=np.uint32,
)

# Stream ids: each stage draws from its own generator so adding a column to one table does not
# shift every other table's random numbers.
_S_PEOPLE, _S_MEMBERS, _S_LEADS, _S_PARTNER, _S_CONSENT_B, _S_CONSENT_P, _S_SELECT = range(1, 8)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective scramble of uint64, used to render per-person strings."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _choice(rng: np.random.Generator, labels: Sequence[Any], p: Sequence[float], n: int) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    return np.asarray(labels)[rng.choice(len(p), size=n, p=p / p.sum())]


def _gumbel_pick(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    """Per-row categorical draw from an (n, k) logit matrix (Gumbel-max trick)."""
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)


# ----------------------------------------------------------------------------------------------
# People


@dataclass(frozen=True)
class People:
    """The universe of underlying persons; tables are views on subsets of it (by index)."""

    seed: int
    phone: np.ndarray  # int64, the true 11-digit mobile number
    gender: np.ndarray  # 'F' / 'M'
    age: np.ndarray  # int16, 18..75
    city_tier: np.ndarray  # int8, 1..5
    city: np.ndarray  # str
    z_val: np.ndarray  # spending power
    z_eng: np.ndarray  # engagement with the brand
    u_b: np.ndarray  # intent visible to the brand
    u_p: np.ndarray  # intent visible only to the partner

    def __len__(self) -> int:
        return int(self.phone.shape[0])


def _unique_phones(rng: np.random.Generator, n: int) -> np.ndarray:
    def draw(k: int) -> np.ndarray:
        # Older 13x/15x/18x ranges are the most common.
        w = np.where(_MOBILE_PREFIXES < 160, 3.0, np.where(_MOBILE_PREFIXES >= 180, 2.5, 1.0))
        pre = _MOBILE_PREFIXES[rng.choice(len(w), size=k, p=w / w.sum())]
        return pre * 100_000_000 + rng.integers(0, 100_000_000, size=k, dtype=np.int64)

    phones = draw(n)
    while True:  # a handful of redraws at most: collisions are rare in 4e9 numbers
        _, first = np.unique(phones, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        if not dup.any():
            return phones
        phones[dup] = draw(int(dup.sum()))


def make_people(n: int, seed: int) -> People:
    """Draw `n` persons with unique phone numbers and their demographics and latent traits."""
    rng = _rng(seed, _S_PEOPLE)
    phone = _unique_phones(rng, n)
    z_val = rng.standard_normal(n)
    z_eng = rng.standard_normal(n)
    u_b = rng.standard_normal(n)
    u_p = rng.standard_normal(n)
    gender = np.where(rng.random(n) < 0.52, "F", "M")
    age = np.clip(np.rint(rng.normal(35.0, 10.5, n) + 1.5 * z_val), 18, 75).astype(np.int16)
    # Richer people live in bigger cities: tier from a latent correlated with z_val.
    from scipy.special import ndtri

    cut = ndtri(np.cumsum(_TIER_P)[:-1])
    latent = -0.45 * z_val + np.sqrt(1 - 0.45**2) * rng.standard_normal(n)
    city_tier = (np.searchsorted(cut, latent) + 1).astype(np.int8)
    city = np.empty(n, dtype=object)
    for tier, names in _CITIES.items():
        m = city_tier == tier
        city[m] = np.asarray(names)[rng.integers(0, len(names), int(m.sum()))]
    return People(seed, phone, gender, age, city_tier, city.astype(str), z_val, z_eng, u_b, u_p)


# ----------------------------------------------------------------------------------------------
# Rendering identifiers


def _digit_matrix(numbers: np.ndarray) -> np.ndarray:
    """(n, 11) array of the digits of 11-digit numbers, as ASCII code points."""
    out = np.empty((numbers.shape[0], 11), dtype=np.uint32)
    x = numbers.astype(np.int64, copy=True)
    for k in range(10, -1, -1):
        out[:, k] = (x % 10) + 48
        x //= 10
    return out


def _render_template(digits: np.ndarray, template: str) -> np.ndarray:
    """Fill `template` (`d` = next digit) for every row of a digit matrix; returns a str array."""
    fullwidth = template.startswith("F")
    if fullwidth:
        template = template[1:]
    n, w = digits.shape[0], len(template)
    out = np.empty((n, w), dtype=np.uint32)
    k = 0
    for i, ch in enumerate(template):
        if ch == "d":
            out[:, i] = digits[:, k] + (0xFF10 - 48 if fullwidth else 0)
            k += 1
        else:
            out[:, i] = ord(ch)
    return np.ascontiguousarray(out).view(f"<U{w}").ravel()


def render_phones(
    rng: np.random.Generator,
    numbers: np.ndarray,
    formats: Sequence[tuple[str, Optional[str], float, bool]],
) -> tuple[np.ndarray, np.ndarray]:
    """Render true numbers in a random mix of `formats`.

    Returns (object array of strings with None for missing, bool array: the value normalises to
    the true number).
    """
    n = numbers.shape[0]
    weights = np.array([f[2] for f in formats])
    which = rng.choice(len(formats), size=n, p=weights / weights.sum())
    digits = _digit_matrix(numbers)
    out = np.empty(n, dtype=object)
    valid = np.zeros(n, dtype=bool)
    for i, (_name, template, _w, ok) in enumerate(formats):
        m = which == i
        if not m.any():
            continue
        if template is None:
            out[m] = None
        elif "d" not in template:
            out[m] = template
        else:
            out[m] = _render_template(digits[m], template).astype(object)
        valid[m] = ok
    return out, valid


def _random_ids(keys: np.ndarray, salt: int, prefix: str, length: int = 28) -> np.ndarray:
    """WeChat-style ids: `prefix` (fixed per app) + base64url chars derived from a per-person key."""
    n = keys.shape[0]
    body = length - len(prefix)
    out = np.empty((n, length), dtype=np.uint32)
    for i, ch in enumerate(prefix):
        out[:, i] = ord(ch)
    base = keys.astype(np.uint64) * np.uint64(8) + np.uint64(salt & 0xFFFFFFFF) * np.uint64(1 << 40)
    for w in range((body + 9) // 10):  # 10 six-bit chars per 64-bit word
        word = _mix64(base + np.uint64(w))
        for j in range(min(10, body - 10 * w)):
            out[:, len(prefix) + 10 * w + j] = _ALPHABET[((word >> np.uint64(6 * j)) & np.uint64(63)).astype(np.intp)]
    return np.ascontiguousarray(out).view(f"<U{length}").ravel()


def _app_prefix(seed: int, tag: int) -> str:
    """Ids of one WeChat app share a short prefix (e.g. `o6_bm...`)."""
    word = int(_mix64(np.array([seed * 131 + tag], dtype=np.uint64))[0])
    return "o" + "".join(chr(_ALPHABET[(word >> (6 * j)) & 63]) for j in range(5))


def openids(people: People, idx: np.ndarray) -> np.ndarray:
    """The brand mini-program's OpenID of each person (28 chars, `o` + app prefix + random)."""
    return _random_ids(idx, people.seed * 2 + 1, _app_prefix(people.seed, 1))


def unionids(people: People, idx: np.ndarray) -> np.ndarray:
    """The WeChat open-platform UnionID of each person (28 chars)."""
    return _random_ids(idx, people.seed * 2 + 2, _app_prefix(people.seed, 2))


def _pick(vocab: np.ndarray, codes: np.ndarray) -> pa.Array:
    return pc.take(pa.array(vocab, type=pa.string()), pa.array(codes.astype(np.int64)))


def emails(people: People, idx: np.ndarray) -> pa.Array:
    """Each person's canonical (lower-case, trimmed) e-mail address, unique per person."""
    idx = idx.astype(np.uint64)
    h = _mix64(idx + np.uint64(people.seed) * np.uint64(0x9E3779B97F4A7C15 & 0xFFFFFFFF))
    # A bijection of the person index: unique numbers that do not look sequential.
    uniq = ((idx * np.uint64(387420489) + np.uint64(people.seed % 1000003)) % np.uint64(10**9)).astype(np.int64)
    sur = _pick(_SURNAMES, h % np.uint64(len(_SURNAMES)))
    giv = _pick(_GIVEN, (h >> np.uint64(8)) % np.uint64(len(_GIVEN)))
    u01 = ((h >> np.uint64(16)) & np.uint64(0xFFFF)).astype(float) / 65536.0
    dom_idx = np.minimum(np.searchsorted(np.cumsum(_DOMAIN_P / _DOMAIN_P.sum()), u01, side="right"), len(_DOMAINS) - 1)
    style = ((h >> np.uint64(32)) % np.uint64(3)).astype(np.intp)
    num = pc.cast(pa.array(uniq + 10_000), pa.string())
    # QQ mail addresses are usually the QQ number itself; others are pinyin name + number.
    local = pc.if_else(
        pa.array(_DOMAINS[dom_idx] == "qq.com"), num,
        pc.if_else(pa.array(style == 0), pc.binary_join_element_wise(sur, giv, num, ""),
                   pc.if_else(pa.array(style == 1), pc.binary_join_element_wise(giv, ".", sur, num, ""),
                              pc.binary_join_element_wise(sur, "_", giv, num, ""))))
    return pc.binary_join_element_wise(local, _pick(_DOMAINS, dom_idx), "@")


def mess_emails(rng: np.random.Generator, canonical: pa.Array, present: np.ndarray) -> pa.Array:
    """Mixed case and stray whitespace, as typed into forms; null where not `present`."""
    n = len(canonical)
    style = rng.choice(6, size=n, p=[0.62, 0.10, 0.05, 0.10, 0.08, 0.05])
    title = pc.utf8_title(canonical)
    variants = (
        canonical,
        pc.utf8_capitalize(canonical),
        pc.utf8_upper(canonical),
        pc.binary_join_element_wise(" ", canonical, ""),
        pc.binary_join_element_wise("  ", title, " ", ""),
        pc.binary_join_element_wise(title, "\t", ""),
    )
    out = variants[0]
    for st in range(1, len(variants)):
        out = pc.if_else(pa.array(style == st), variants[st], out)
    return pc.if_else(pa.array(present), out, pa.scalar(None, pa.string()))


def _optional(values: np.ndarray | pa.Array, present: np.ndarray) -> pa.Array:
    """A string column with nulls where `present` is False."""
    if isinstance(values, pa.Array):
        return pc.if_else(pa.array(present), values, pa.scalar(None, values.type))
    return pa.array(values, type=pa.string(), mask=~present)


def _ids(prefix: str, n: int, width: int) -> pa.Array:
    """`prefix` + 1-based zero-padded row numbers (M00000001 ...)."""
    numbers = pc.cast(pa.array(np.arange(1, n + 1, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(numbers, width, "0"), "")


def e164(numbers: np.ndarray, present: np.ndarray) -> pa.Array:
    """E.164 strings (`+8613800138000`) for present numbers, null elsewhere."""
    digits = pc.cast(pa.array(numbers.astype(np.int64)), pa.string())
    return pc.if_else(pa.array(present), pc.binary_join_element_wise("+86", digits, ""),
                      pa.scalar(None, pa.string()))


def _iso(ts: np.ndarray, present: Optional[np.ndarray] = None) -> pa.Array:
    """ISO 8601 UTC strings from datetime64 or int64 epoch seconds (`2026-01-02T03:04:05Z`), built as a fixed-width byte matrix
    (datetime_as_string / strftime cost ~1 us per value; this is ~20x faster)."""
    t = ts if ts.dtype.kind == "i" else ts.astype("datetime64[s]").astype(np.int64)
    n = t.shape[0]
    days, secs = np.divmod(t, 86400)
    # Civil date from days since 1970-01-01 (H. Hinnant's algorithm): integer arithmetic only,
    # much cheaper than numpy's datetime64[Y]/[M] casts.
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    month = np.where(mp < 10, mp + 3, mp - 9)
    fields = (
        (0, 4, yoe + era * 400 + (month <= 2)),
        (5, 2, month),
        (8, 2, doy - (153 * mp + 2) // 5 + 1),
        (11, 2, secs // 3600),
        (14, 2, secs // 60 % 60),
        (17, 2, secs % 60),
    )
    mat = np.empty((n, 20), dtype=np.uint8)
    for pos, ch in ((4, "-"), (7, "-"), (10, "T"), (13, ":"), (16, ":"), (19, "Z")):
        mat[:, pos] = ord(ch)
    pairs = np.array([[48 + v // 10, 48 + v % 10] for v in range(100)], dtype=np.uint8)
    for pos, width, value in fields:
        if width == 2:
            mat[:, pos:pos + 2] = pairs[value]
        else:
            mat[:, pos:pos + 2] = pairs[value // 100]
            mat[:, pos + 2:pos + 4] = pairs[value % 100]
    offsets = np.arange(0, 20 * (n + 1), 20, dtype=np.int32)
    bitmap = None if present is None else pa.py_buffer(np.packbits(present, bitorder="little"))
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(mat.tobytes()),
                                       bitmap, -1 if present is not None else 0)


def _table(columns: dict[str, Any]) -> pa.Table:
    """Build an Arrow table; numpy str/object arrays become strings (None = null)."""
    out = {}
    for name, v in columns.items():
        if isinstance(v, np.ndarray) and v.dtype == object:
            v = pa.array(v, type=pa.string())
        elif isinstance(v, np.ndarray) and v.dtype.kind == "U":
            v = pa.array(v, type=pa.string())
        elif isinstance(v, np.ndarray) and v.dtype.kind == "M":
            v = pa.array(v.astype("datetime64[D]"), type=pa.date32())
        elif not isinstance(v, (pa.Array, pa.ChunkedArray)):
            v = pa.array(v)
        out[name] = v
    return pa.table(out)


def column(table: pa.Table, name: str) -> np.ndarray:
    """A column as numpy (strings as object with None)."""
    return table.column(name).to_numpy(zero_copy_only=False)


# ----------------------------------------------------------------------------------------------
# Brand members


@dataclass(frozen=True)
class Table:
    """A generated dataset plus what the ground truth needs to know about its rows."""

    name: str
    data: pa.Table
    person: np.ndarray  # universe index of each row
    phone_ok: np.ndarray  # the phone column normalises to the person's number
    email_ok: np.ndarray  # the e-mail column is present
    openid_ok: np.ndarray
    unionid_ok: np.ndarray


def brand_members(people: People, idx: np.ndarray, seed: int) -> Table:
    """The brand's member table for the persons `idx` (row order = order of `idx`)."""
    rng = _rng(seed, _S_MEMBERS)
    n = idx.shape[0]
    z_val, z_eng = people.z_val[idx], people.z_eng[idx]
    age = people.age[idx]
    phone, phone_ok = render_phones(rng, people.phone[idx], _MEMBER_PHONE_FORMATS)
    email_ok = rng.random(n) < 0.55
    email = mess_emails(rng, emails(people, idx), email_ok)
    openid_ok = rng.random(n) < 0.72  # joined via the mini-program
    unionid_ok = openid_ok & (rng.random(n) < 0.80)
    openid = _optional(openids(people, idx), openid_ok)
    unionid = _optional(unionids(people, idx), unionid_ok)

    gender = _optional(people.gender[idx], rng.random(n) >= 0.03)
    age_col = pa.array(age.astype(np.int64), mask=rng.random(n) < 0.06)  # birthday never filled in

    reg_days = np.minimum((rng.exponential(900.0, n) + rng.integers(0, 60, n)).astype(np.int64), 3650)
    registration_date = AS_OF_DAY - reg_days.astype("timedelta64[D]")
    registration_channel = _choice(
        rng, ["wechat_miniprogram", "app", "store", "tmall", "jd", "web"],
        [0.40, 0.16, 0.22, 0.10, 0.07, 0.05], n)

    # Orders in the last 12 months: engaged and wealthier members buy more often.
    lam = np.exp(0.55 + 0.55 * z_eng + 0.25 * z_val + 0.3 * rng.standard_normal(n))
    frequency = rng.poisson(lam)
    active_days = np.minimum(reg_days, 365)
    frequency = np.where(active_days < 365, np.rint(frequency * active_days / 365.0), frequency).astype(np.int64)
    aov = np.exp(np.log(330.0) + 0.55 * z_val + 0.35 * rng.standard_normal(n))  # CNY per order
    bought = frequency > 0
    # Last purchase: the most recent of `frequency` uniform times in the active window.
    last = (active_days * rng.beta(1.0, np.maximum(frequency, 1))).astype(np.int64)
    recency = np.where(bought, last, reg_days)  # never bought: days since joining
    in_3m = np.where(bought & (recency <= 90), 1 + rng.binomial(np.maximum(frequency - 1, 0), 90.0 / 365.0), 0)
    in_3m = np.minimum(in_3m, frequency)
    order_noise = np.exp(0.25 * rng.standard_normal(n))
    spend_3m = np.round(in_3m * aov * order_noise, 2)
    monetary = np.round(spend_3m + (frequency - in_3m) * aov * np.exp(0.25 * rng.standard_normal(n)), 2)
    high_value = (spend_3m > 1000.0).astype(np.int8)

    categories = np.where(bought, np.minimum(frequency, 1 + rng.poisson(0.4 + 0.25 * np.maximum(frequency - 1, 0))), 0)
    coupons_claimed = rng.poisson(np.exp(0.6 + 0.5 * z_eng))
    coupons_redeemed = np.minimum(coupons_claimed, rng.binomial(frequency, _sigmoid(-0.8 + 0.6 * z_eng)))
    points = np.round(monetary * rng.uniform(0.6, 1.0, n) + rng.integers(0, 200, n)).astype(np.int64)
    browse = np.exp(0.9 + 0.6 * z_eng + 0.15 * z_val + 0.4 * rng.standard_normal(n))
    page_views = rng.poisson(browse * 3.0)
    add_to_cart = rng.poisson(browse * 0.35)
    favourites = rng.poisson(browse * 0.2)
    cancelled = rng.binomial(frequency, 0.05)
    opens = rng.binomial(8, _sigmoid(-0.9 + 0.9 * z_eng))
    ad_clicks = rng.poisson(np.exp(-1.3 + 0.5 * z_eng + 0.2 * z_val))
    campaigns = rng.poisson(np.exp(-0.5 + 0.6 * z_eng))

    # Tier: rule-based on 12-month spend, with a little legacy noise (old tiers kept for a year).
    tier_score = np.log1p(monetary) + 0.4 * rng.standard_normal(n)
    member_tier = np.asarray(["normal", "silver", "gold", "platinum", "diamond"])[
        np.searchsorted([5.5, 7.0, 8.2, 9.3], tier_score)]
    married = rng.random(n) < _sigmoid((age.astype(float) - 29.0) / 4.0)
    marital = np.where(married, "married", "single")
    children = np.where(married, rng.binomial(2, 0.55, n), 0)

    frame = _table({
        "member_id": _ids("M", n, 8),
        "phone": phone,
        "email": email,
        "openid": openid,
        "unionid": unionid,
        "gender": gender,
        "age": age_col,
        "city": people.city[idx],
        "city_tier": people.city_tier[idx].astype(np.int64),
        "marital_status": marital,
        "children_at_home": children.astype(np.int64),
        "member_tier": member_tier,
        "registration_date": registration_date,
        "registration_channel": registration_channel,
        "recency_days": recency,
        "frequency_12m": frequency,
        "monetary_12m": monetary,
        "spend_3m": spend_3m,
        "avg_order_value": np.round(np.where(bought, monetary / np.maximum(frequency, 1), 0.0), 2),
        "categories_12m": categories.astype(np.int64),
        "coupons_claimed_12m": coupons_claimed,
        "coupons_redeemed_12m": coupons_redeemed.astype(np.int64),
        "points_balance": points,
        "page_views_30d": page_views,
        "add_to_cart_30d": add_to_cart,
        "favourites_30d": favourites,
        "cancelled_orders_12m": cancelled.astype(np.int64),
        "message_opens_30d": opens.astype(np.int64),
        "ad_clicks_30d": ad_clicks,
        "campaigns_12m": campaigns,
        "high_value": high_value,
    })
    return Table("brand_members", frame, idx, phone_ok, email_ok, openid_ok, unionid_ok)


MEMBER_SCHEMA = {
    "key": "member_id",
    "identifiers": [("phone", "phone"), ("email", "email"), ("openid", "openid"), ("unionid", "unionid")],
    "features": [
        ("gender", "category"), ("age", "int"), ("city", "category"), ("city_tier", "category"),
        ("marital_status", "category"), ("children_at_home", "int"), ("member_tier", "category"),
        ("registration_date", "date"), ("registration_channel", "category"),
        ("recency_days", "int"), ("frequency_12m", "int"), ("monetary_12m", "float"),
        ("spend_3m", "float"), ("avg_order_value", "float"), ("categories_12m", "int"),
        ("coupons_claimed_12m", "int"), ("coupons_redeemed_12m", "int"), ("points_balance", "int"),
        ("page_views_30d", "int"), ("add_to_cart_30d", "int"), ("favourites_30d", "int"),
        ("cancelled_orders_12m", "int"), ("message_opens_30d", "int"), ("ad_clicks_30d", "int"),
        ("campaigns_12m", "int"),
    ],
    "labels": [("high_value", "binary")],
}


# ----------------------------------------------------------------------------------------------
# Brand leads (auto)

_SOURCES = np.array(["autohome", "dongchedi", "yiche", "douyin_ad", "official_site", "wechat_miniprogram",
                     "dealer_walk_in", "call_centre", "referral", "auto_show"])
_SOURCE_BASE = np.array([1.2, 1.0, 0.4, 0.8, 0.5, 0.7, 0.3, 0.0, -0.4, -0.5])
_SOURCE_INTENT = np.array([0.0, 0.0, 0.0, -0.4, 0.1, 0.0, 0.6, 0.2, 0.7, 0.3])
_MODELS = np.array(["compact_sedan", "midsize_sedan", "compact_suv", "midsize_suv", "mpv", "ev_sedan", "ev_suv"])


def lead_conversion_logit(people: People, idx: np.ndarray) -> np.ndarray:
    """The planted truth: log-odds that a lead of each person converts within 90 days."""
    return -2.3 + 1.0 * people.u_b[idx] + 1.1 * people.u_p[idx] + 0.35 * people.z_val[idx]


def brand_leads(people: People, idx: np.ndarray, member_ids: pa.Array, seed: int,
                new: Optional[np.ndarray] = None) -> Table:
    """Auto leads for persons `idx`; `member_ids` holds the member_id (or null) per lead.

    Rows where `new` is True are fresh leads (created in the last two weeks, outcome not yet
    known); the others are historical leads created 91-450 days ago, whose 90-day outcome
    `converted` is known. The caller splits the two (`generate` writes `brand_new_leads`)."""
    rng = _rng(seed, _S_LEADS)
    n = idx.shape[0]
    u_b, z_val, z_eng = people.u_b[idx], people.z_val[idx], people.z_eng[idx]
    age = people.age[idx].astype(float)
    phone, phone_ok = render_phones(rng, people.phone[idx], _LEAD_PHONE_FORMATS)
    email_ok = rng.random(n) < 0.35
    email = mess_emails(rng, emails(people, idx), email_ok)
    openid_ok = rng.random(n) < 0.40
    unionid_ok = openid_ok & (rng.random(n) < 0.75)

    source = _SOURCES[_gumbel_pick(rng, _SOURCE_BASE[None, :] + _SOURCE_INTENT[None, :] * u_b[:, None])]
    is_new = np.zeros(n, dtype=bool) if new is None else np.asarray(new, dtype=bool)
    created = AS_OF_DAY - np.where(is_new, rng.integers(1, 15, n), rng.integers(91, 451, n)).astype("timedelta64[D]")
    # Speed to lead: how many days until the lead first answered; keen buyers answer at once.
    days_to_contact = rng.poisson(np.exp(1.0 - 0.45 * u_b))
    m_logits = np.stack([
        -0.3 * z_val, 0.5 * z_val, 0.3 - 0.2 * z_val, 0.2 + 0.4 * z_val, -0.8 + 0.01 * (age - 35),
        -0.2 - 0.02 * (age - 35), 0.1 - 0.02 * (age - 35) + 0.2 * z_val], axis=1)
    model_interest = _MODELS[_gumbel_pick(rng, m_logits)]
    budget = np.asarray(["<150k", "150-250k", "250-400k", ">400k"])[
        np.searchsorted([-0.8, 0.3, 1.3], 0.8 * z_val + 0.6 * rng.standard_normal(n))]

    test_drive = (rng.random(n) < _sigmoid(-0.9 + 1.0 * u_b)).astype(np.int8)
    dealer_visits = rng.poisson(np.exp(-0.7 + 0.45 * u_b + 0.5 * test_drive))
    calls_answered = rng.binomial(4, _sigmoid(-0.2 + 0.5 * u_b))
    wechat = rng.poisson(np.exp(0.4 + 0.35 * u_b + 0.3 * z_eng))
    configurator = rng.poisson(np.exp(-0.4 + 0.4 * u_b))
    brochure = (rng.random(n) < _sigmoid(-0.6 + 0.3 * u_b)).astype(np.int8)
    quote = (rng.random(n) < _sigmoid(-1.2 + 0.7 * u_b)).astype(np.int8)
    financing = (rng.random(n) < _sigmoid(-1.4 + 0.3 * u_b - 0.4 * z_val)).astype(np.int8)
    trade_in = (rng.random(n) < _sigmoid(-1.6 + 0.3 * u_b + 0.3 * z_val)).astype(np.int8)
    # The sales team's own H/A/B/C grade: a noisy read of the same brand-visible intent.
    grade = np.asarray(["H", "A", "B", "C"])[np.searchsorted([-0.9, 0.0, 0.9], -(0.8 * u_b + 0.6 * rng.standard_normal(n)))]

    converted = (rng.random(n) < _sigmoid(lead_conversion_logit(people, idx))).astype(np.int8)

    frame = _table({
        "lead_id": _ids("L", n, 8),
        "member_id": member_ids,
        "phone": phone,
        "email": email,
        "openid": _optional(openids(people, idx), openid_ok),
        "unionid": _optional(unionids(people, idx), unionid_ok),
        "gender": people.gender[idx],
        "age": people.age[idx].astype(np.int64),
        "city": people.city[idx],
        "city_tier": people.city_tier[idx].astype(np.int64),
        "created_date": created,
        "source_channel": source,
        "model_interest": model_interest,
        "budget_band": budget,
        "lead_grade": grade,
        "days_to_first_contact": days_to_contact,
        "test_drive_booked": test_drive,
        "dealer_visits": dealer_visits,
        "calls_answered": calls_answered.astype(np.int64),
        "wechat_interactions": wechat,
        "configurator_sessions": configurator,
        "brochure_downloaded": brochure,
        "price_quote_requested": quote,
        "financing_inquiry": financing,
        "trade_in_inquiry": trade_in,
        "converted": converted,
    })
    return Table("brand_leads", frame, idx, phone_ok, email_ok, openid_ok, unionid_ok)


LEAD_SCHEMA = {
    "key": "lead_id",
    "identifiers": [("phone", "phone"), ("email", "email"), ("openid", "openid"), ("unionid", "unionid")],
    "features": [
        ("member_id", "string"), ("gender", "category"), ("age", "int"), ("city", "category"),
        ("city_tier", "category"), ("created_date", "date"), ("source_channel", "category"),
        ("model_interest", "category"), ("budget_band", "category"), ("lead_grade", "category"),
        ("days_to_first_contact", "int"), ("test_drive_booked", "bool"), ("dealer_visits", "int"),
        ("calls_answered", "int"), ("wechat_interactions", "int"), ("configurator_sessions", "int"),
        ("brochure_downloaded", "bool"), ("price_quote_requested", "bool"),
        ("financing_inquiry", "bool"), ("trade_in_inquiry", "bool"),
    ],
    "labels": [("converted", "binary")],
}
# Brand-side lead features the ground-truth model uses (what the brand's own model could use).
LEAD_NUMERIC = ["age", "days_to_first_contact", "test_drive_booked", "dealer_visits",
                "calls_answered", "wechat_interactions", "configurator_sessions",
                "brochure_downloaded", "price_quote_requested", "financing_inquiry",
                "trade_in_inquiry"]
LEAD_CATEGORICAL = ["gender", "city_tier", "source_channel", "model_interest", "budget_band", "lead_grade"]
# The brand's lead signals the demo's model uses (see PARTNER_MODEL_FEATURES).
LEAD_MODEL_FEATURES = ["test_drive_booked", "dealer_visits", "calls_answered", "wechat_interactions",
                       "configurator_sessions", "brochure_downloaded", "price_quote_requested",
                       "financing_inquiry", "trade_in_inquiry"]
LEAD_MODEL_CATEGORICAL = ["lead_grade", "budget_band"]
# Fresh leads to score: the same columns, no outcome yet.
NEW_LEAD_SCHEMA = {**LEAD_SCHEMA, "labels": []}


def _rows(table: Table, rows: np.ndarray, name: str) -> Table:
    """The rows `rows` of a generated table, as a table of its own."""
    take = pa.array(rows.astype(np.int64))
    return Table(name, table.data.take(take), table.person[rows], table.phone_ok[rows], table.email_ok[rows],
                 table.openid_ok[rows], table.unionid_ok[rows])


# ----------------------------------------------------------------------------------------------
# Partner population


def partner_population(people: People, idx: np.ndarray, brand_unionid_ok: np.ndarray,
                       brand_openid_ok: np.ndarray, seed: int) -> Table:
    """The partner's people `idx`. `brand_*_ok` say, per row, whether the brand holds that WeChat
    id for the person; the partner sees the same UnionID/OpenID for some of those (shared open
    platform / co-branded mini-program), and its own ids for people the brand does not know."""
    rng = _rng(seed, _S_PARTNER)
    n = idx.shape[0]
    u_p, z_val = people.u_p[idx], people.z_val[idx]
    age = people.age[idx]
    phone, phone_ok = render_phones(rng, people.phone[idx], _PARTNER_PHONE_FORMATS)
    email_ok = rng.random(n) < 0.30
    email = _optional(emails(people, idx), email_ok)
    unionid_ok = np.where(brand_unionid_ok, rng.random(n) < 0.35, rng.random(n) < 0.20)
    openid_ok = np.where(brand_openid_ok, rng.random(n) < 0.12, False)
    unionid = _optional(unionids(people, idx), unionid_ok)
    openid = _optional(openids(people, idx), openid_ok)

    age_band = np.asarray(["18-24", "25-29", "30-34", "35-39", "40-49", "50+"])[
        np.searchsorted([25, 30, 35, 40, 50], age, side="right")]
    income = (np.searchsorted([-1.1, -0.3, 0.5, 1.3], 0.85 * z_val + 0.5 * rng.standard_normal(n)) + 1).astype(np.int64)
    consumption = np.asarray(["low", "mid", "high", "premium"])[
        np.searchsorted([-0.7, 0.4, 1.3], 0.75 * z_val + 0.65 * rng.standard_normal(n))]
    young = (age < 30).astype(float)
    female = people.gender[idx] == "F"

    def score(x: np.ndarray) -> np.ndarray:
        return np.round(_sigmoid(x), 3)

    interest_auto = score(-0.2 + 0.9 * u_p + 0.6 * rng.standard_normal(n))
    interest_new_energy = score(-0.4 + 0.35 * u_p + 0.4 * young + 0.7 * rng.standard_normal(n))
    interest_luxury = score(-1.0 + 0.8 * z_val + 0.6 * rng.standard_normal(n))
    interest_travel = score(-0.4 + 0.4 * z_val + 0.8 * rng.standard_normal(n))
    interest_finance = score(-0.6 + 0.5 * z_val + 0.8 * rng.standard_normal(n))
    interest_parenting = score(-1.2 + 1.2 * ((age >= 27) & (age <= 42)) + 0.4 * female + 0.6 * rng.standard_normal(n))
    interest_beauty = score(-1.0 + 1.4 * female + 0.6 * rng.standard_normal(n))
    interest_sports = score(-0.6 + 0.6 * young + 0.8 * rng.standard_normal(n))
    interest_gaming = score(-0.8 + 1.0 * young - 0.3 * female + 0.8 * rng.standard_normal(n))
    app_autohome = (rng.random(n) < _sigmoid(-1.3 + 0.8 * u_p)).astype(np.int8)
    app_dongchedi = (rng.random(n) < _sigmoid(-1.1 + 0.7 * u_p + 0.3 * young)).astype(np.int8)
    app_luxury = (rng.random(n) < _sigmoid(-2.0 + 0.9 * z_val)).astype(np.int8)
    app_travel = (rng.random(n) < _sigmoid(-1.0 + 0.5 * z_val)).astype(np.int8)
    intent = np.clip(np.rint(50 + 14 * u_p + 12 * rng.standard_normal(n)), 0, 100).astype(np.int64)

    car_owner = rng.random(n) < _sigmoid(0.1 + 0.9 * z_val + 0.02 * (age - 30))
    # Insurance renewing soon is the classic "in market for a car" signal.
    soon = car_owner & (rng.random(n) < _sigmoid(-1.4 + 0.9 * u_p))
    lapsed = car_owner & ~soon & (rng.random(n) < 0.05)
    status = np.where(~car_owner, "none", np.where(soon, "expiring_soon", np.where(lapsed, "lapsed", "active")))
    months_ahead = np.where(soon, rng.integers(0, 3, n), np.where(lapsed, -rng.integers(1, 7, n), rng.integers(3, 12, n)))
    expiry = (AS_OF.astype("datetime64[M]") + months_ahead.astype("timedelta64[M]"))
    expiry_str = _optional(np.datetime_as_string(expiry, unit="M"), car_owner)
    car_app = np.minimum(rng.poisson(np.exp(0.6 + 0.75 * u_p)) * (rng.random(n) < 0.8), 30).astype(np.int64)
    registered = AS_OF_DAY - rng.integers(30, 2900, n).astype("timedelta64[D]")

    frame = _table({
        "partner_id": _ids("P", n, 9),
        "phone": phone,
        "email": email,
        "openid": openid,
        "unionid": unionid,
        "gender": people.gender[idx],
        "age_band": age_band,
        "city_tier": people.city_tier[idx].astype(np.int64),
        "income_level": income,
        "consumption_level": consumption,
        "registered_date": registered,
        "interest_auto": interest_auto,
        "interest_new_energy": interest_new_energy,
        "interest_luxury": interest_luxury,
        "interest_travel": interest_travel,
        "interest_finance": interest_finance,
        "interest_parenting": interest_parenting,
        "interest_beauty": interest_beauty,
        "interest_sports": interest_sports,
        "interest_gaming": interest_gaming,
        "app_autohome_active": app_autohome,
        "app_dongchedi_active": app_dongchedi,
        "app_luxury_shopping_active": app_luxury,
        "app_travel_active": app_travel,
        "purchase_intent_score": intent,
        "car_owner": car_owner.astype(np.int8),
        "car_insurance_status": status,
        "insurance_expiry_month": expiry_str,
        "car_app_usage_days_30d": car_app,
        "insurance_due_90d": soon.astype(np.int8),
    })
    return Table("partner_population", frame, idx, phone_ok, email_ok, openid_ok, unionid_ok)


PARTNER_SCHEMA = {
    "key": "partner_id",
    "identifiers": [("phone", "phone"), ("email", "email"), ("openid", "openid"), ("unionid", "unionid")],
    "features": [
        ("gender", "category"), ("age_band", "category"), ("city_tier", "category"),
        ("income_level", "category"), ("consumption_level", "category"), ("registered_date", "date"),
        ("interest_auto", "float"), ("interest_new_energy", "float"), ("interest_luxury", "float"),
        ("interest_travel", "float"), ("interest_finance", "float"), ("interest_parenting", "float"),
        ("interest_beauty", "float"), ("interest_sports", "float"), ("interest_gaming", "float"),
        ("app_autohome_active", "bool"), ("app_dongchedi_active", "bool"),
        ("app_luxury_shopping_active", "bool"), ("app_travel_active", "bool"),
        ("purchase_intent_score", "int"), ("car_owner", "bool"), ("car_insurance_status", "category"),
        ("insurance_expiry_month", "string"), ("car_app_usage_days_30d", "int"),
        ("insurance_due_90d", "bool"),
    ],
    "labels": [],
}
PARTNER_NUMERIC = ["interest_auto", "interest_new_energy", "interest_luxury", "interest_travel",
                   "interest_finance", "interest_parenting", "interest_beauty", "interest_sports",
                   "interest_gaming", "app_autohome_active", "app_dongchedi_active",
                   "app_luxury_shopping_active", "app_travel_active", "purchase_intent_score",
                   "car_owner", "car_app_usage_days_30d", "insurance_due_90d"]
PARTNER_CATEGORICAL = ["income_level", "consumption_level", "car_insurance_status"]
# The partner signals the demo's lead-scoring model uses (numeric ones are standardised and
# categorical ones one-hot encoded at the node, as `party_node.features` does).
PARTNER_MODEL_FEATURES = ["interest_auto", "interest_new_energy", "interest_luxury", "interest_finance",
                          "app_autohome_active", "app_dongchedi_active", "car_owner", "insurance_due_90d",
                          "purchase_intent_score", "car_app_usage_days_30d"]
PARTNER_MODEL_CATEGORICAL = ["car_insurance_status", "income_level"]


# ----------------------------------------------------------------------------------------------
# Consent


@dataclass(frozen=True)
class _PurposePolicy:
    ask: float  # share of subjects ever asked
    grant: float  # share of those asked who grant
    withdraw: float  # share of grants later withdrawn
    regrant: float  # share of refusals later granted
    validity_days: int
    later: float = 0.2  # share asked weeks after sign-up rather than at once


_BRAND_POLICY = {
    "audience.overlap": _PurposePolicy(0.97, 0.86, 0.03, 0.05, 730),
    "audience.match": _PurposePolicy(0.95, 0.74, 0.05, 0.04, 730),
    "modeling.lead_scoring": _PurposePolicy(0.95, 0.78, 0.04, 0.04, 730),
    "scoring.lead": _PurposePolicy(0.95, 0.76, 0.05, 0.04, 365),
    "modeling.lookalike": _PurposePolicy(0.93, 0.70, 0.05, 0.03, 730),
    "marketing.personalized": _PurposePolicy(0.98, 0.68, 0.08, 0.06, 730),
    "sharing.third_party": _PurposePolicy(0.90, 0.52, 0.07, 0.03, 365),
}
_PARTNER_POLICY = {
    "audience.overlap": _PurposePolicy(0.96, 0.82, 0.03, 0.04, 730),
    "audience.match": _PurposePolicy(0.94, 0.70, 0.05, 0.03, 730),
    "modeling.lead_scoring": _PurposePolicy(0.92, 0.72, 0.05, 0.03, 730),
    "scoring.lead": _PurposePolicy(0.92, 0.70, 0.05, 0.03, 730),  # asked with the programme, valid as long
    "modeling.lookalike": _PurposePolicy(0.94, 0.74, 0.04, 0.03, 730),
    "marketing.personalized": _PurposePolicy(0.98, 0.72, 0.07, 0.05, 730),
    "sharing.third_party": _PurposePolicy(0.90, 0.48, 0.08, 0.03, 365),
}
# Leads are asked on the lead form itself, right when they ask to be contacted about a car, for
# the purposes that handling a lead needs (matching, scoring, the scoring model); they grant these
# more often than members asked later in a programme message. Same purposes, same order.
_LEAD_POLICY = {
    "audience.overlap": _PurposePolicy(0.98, 0.90, 0.02, 0.05, 730, later=0.02),
    "audience.match": _PurposePolicy(0.98, 0.88, 0.03, 0.05, 730, later=0.02),
    "modeling.lead_scoring": _PurposePolicy(0.98, 0.88, 0.03, 0.05, 730, later=0.02),
    "scoring.lead": _PurposePolicy(0.98, 0.87, 0.04, 0.05, 365, later=0.02),
    "modeling.lookalike": _PurposePolicy(0.90, 0.66, 0.05, 0.03, 730, later=0.02),
    "marketing.personalized": _PurposePolicy(0.98, 0.72, 0.06, 0.05, 730, later=0.02),
    "sharing.third_party": _PurposePolicy(0.90, 0.45, 0.07, 0.03, 365, later=0.02),
}
# Processing together with the other party (matching, modelling, scoring, sharing) provides it
# personal information, so each party asks for it naming the other party (PIPL Art. 23; the
# `separate_consent` purposes of consent/purposes.yaml) — e.g. the partner asks its app users
# whether the brand's lead-scoring model may use their signals. Counting the overlap is exempt.
NAMED_PURPOSES = tuple(p for p in COLLAB_PURPOSES if p != "audience.overlap")
# How strongly one person's decisions go together (a latent privacy attitude shared by all
# purposes): people who refuse one purpose tend to refuse the others.
_ATTITUDE_WEIGHT = 0.8
# Share of subjects who turned on "no personalised marketing" (PIPL Art. 24) in their settings.
_OPT_OUT_RATE = {"members": 0.02, "leads": 0.03}
# Notice versions and the day each came into force (PIPL took effect on 2021-11-01).
_NOTICES = (("1.0", "2015-01-01"), ("2.0", "2021-11-01"), ("2.1", "2023-09-01"), ("3.0", "2025-02-20"))
# Cross-party purposes are first asked when the collaboration programme starts.
_COLLAB_START = np.datetime64("2025-03-01T00:00:00", "s")
CONSENT_COLUMNS = ["event_id", "subject", "identifier", "purpose", "recipient", "action", "channel",
                   "notice_version", "valid_from", "valid_until", "received_at"]


_DATA_CATEGORIES = {
    "brand": ["phone", "email", "wechat_ids", "demographics", "purchase_history", "behaviour"],
    "partner": ["phone", "email", "wechat_ids", "demographics", "app_interests", "car_insurance"],
}


def _notice_version(party: str, version: str) -> str:
    return f"{party}-privacy-notice-v{version}"


def notices(party: str, other: str, role: str) -> list[dict[str, Any]]:
    """The party's privacy-notice versions that the consent events reference, in the shape
    `consent.importer.read_notices` reads. Versions before 3.0 cover own marketing only; 3.0
    adds the collaboration purposes and names `other` as the recipient of NAMED_PURPOSES."""
    categories = _DATA_CATEGORIES[role]
    named = set(RECIPIENT_PURPOSES) | set(NAMED_PURPOSES)
    out = []
    for version, day in _NOTICES:
        covered = list(OWN_PURPOSES) + (list(COLLAB_PURPOSES) if version >= "3" else [])
        out.append({
            "notice": f"{party}-privacy-notice",
            "version": _notice_version(party, version),
            "published_at": f"{day}T00:00:00Z",
            "purposes": [{"purpose": p, "recipients": [other] if p in named else [],
                          "data_categories": list(categories)} for p in covered],
        })
    return out


CHANNELS = np.array(["wechat_miniprogram", "app", "store", "call_centre", "web"])


def _vocab(values: Sequence[Any], codes: np.ndarray) -> pa.Array:
    """Low-cardinality string column from integer codes, dictionary-encoded (cheap to build and
    to write; `write_table` decodes it for Parquet so readers see plain strings)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(values), type=pa.string()))


@dataclass(frozen=True)
class ConsentPlan:
    """The consent events of one party as integer columns, in time order (rendered to strings
    chunk by chunk by `consent_batches`, so tens of millions of events fit in memory)."""

    row: np.ndarray  # index of the subject
    purpose: np.ndarray  # index into the policy's purposes
    action: np.ndarray  # 0 granted, 1 refused, 2 withdrawn
    t: np.ndarray  # event time, seconds since the epoch (UTC)
    channel: np.ndarray  # index into CHANNELS
    valid_days: np.ndarray  # validity of a grant
    lag: np.ndarray  # seconds until the consent service received it

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def action_rates(self) -> dict[str, float]:
        counts = np.bincount(self.action, minlength=3) / max(1, len(self))
        return {a: round(float(c), 4) for a, c in zip(("granted", "refused", "withdrawn"), counts)}


def consent_plan(rng: np.random.Generator, since: np.ndarray, channel: np.ndarray,
                 policy: dict[str, _PurposePolicy] | Sequence[dict[str, _PurposePolicy]],
                 group: Optional[np.ndarray] = None) -> ConsentPlan:
    """Consent events for subjects known since `since` (datetime64[s]) who signed up through
    `channel` (indices into CHANNELS). `policy` is one policy, or a list of policies with the
    same purposes in the same order and `group` giving each subject's policy index.

    Subjects are asked per purpose at sign-up (own-use purposes) or once the collaboration
    programme starts (collaboration purposes); people not asked by the as-of date have no
    event. A person's decisions are correlated (a latent privacy attitude), each purpose keeping
    its policy's grant rate. Some grants are later withdrawn, some refusals later granted, often
    via another channel (the app's privacy settings, the call centre).
    """
    from scipy.special import ndtri

    n = since.shape[0]
    policies = [policy] if isinstance(policy, dict) else list(policy)
    purposes = list(policies[0])
    if any(list(p) != purposes for p in policies):
        raise ValueError("consent policies must list the same purposes in the same order")
    g = np.zeros(n, dtype=np.intp) if group is None else np.asarray(group, dtype=np.intp)
    attitude = rng.standard_normal(n)
    horizon = AS_OF - np.timedelta64(3600, "s")
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("row", "purpose", "action", "t", "channel", "valid_days")}

    def add(rows: np.ndarray, p_i: int, action: np.ndarray, t: np.ndarray, chan: np.ndarray, days: np.ndarray) -> None:
        cols["row"].append(rows.astype(np.int32))
        cols["purpose"].append(np.full(rows.shape[0], p_i, dtype=np.int8))
        cols["action"].append(action.astype(np.int8))
        cols["t"].append(t.astype("datetime64[s]").astype(np.int64))
        cols["channel"].append(chan.astype(np.int8))
        cols["valid_days"].append(days.astype(np.int16))

    for p_i, purpose in enumerate(purposes):
        def rate(attr: str) -> np.ndarray:
            return np.array([getattr(pol[purpose], attr) for pol in policies], dtype=float)[g]

        ask, grant, withdraw, regrant, days = (rate(a) for a in ("ask", "grant", "withdraw", "regrant", "validity_days"))
        asked = np.flatnonzero(rng.random(n) < ask)
        k = asked.shape[0]
        start = since[asked]
        if purpose in COLLAB_PURPOSES:
            start = np.maximum(start, _COLLAB_START)
        # Consent is mostly captured at sign-up, within a few hours; later asks spread over weeks.
        later = rate("later")[asked]
        delay = np.where(rng.random(k) >= later, rng.integers(0, 6 * 3600, k), rng.integers(0, 60 * 86400, k))
        t0 = start + delay.astype("timedelta64[s]")
        w = _ATTITUDE_WEIGHT
        leaning = w * attitude[asked] + np.sqrt(1.0 - w * w) * rng.standard_normal(k)
        granted = leaning < ndtri(grant[asked])
        due = t0 < horizon
        asked, t0, granted, k = asked[due], t0[due], granted[due], int(due.sum())
        add(asked, p_i, np.where(granted, 0, 1), t0, channel[asked], days[asked])
        # Second events: withdrawal of a grant, or a later grant after a refusal.
        second = np.where(granted, rng.random(k) < withdraw[asked], rng.random(k) < regrant[asked])
        second &= (horizon - t0) > np.timedelta64(60, "s")
        sec = np.flatnonzero(second)
        span = (horizon - t0[sec]).astype(np.int64)
        t1 = t0[sec] + (1 + rng.random(sec.shape[0]) * (span - 1)).astype(np.int64).astype("timedelta64[s]")
        chan = np.where(rng.random(sec.shape[0]) < 0.6, channel[asked[sec]], rng.choice([0, 1, 3, 4], size=sec.shape[0]))
        add(asked[sec], p_i, np.where(granted[sec], 2, 0), t1, chan, days[asked[sec]])

    merged = {k: np.concatenate(v) for k, v in cols.items()}
    order = np.lexsort((merged["purpose"], merged["row"], merged["t"]))
    merged = {k: v[order] for k, v in merged.items()}
    lag = rng.integers(0, 5, order.shape[0]).astype(np.int8)
    return ConsentPlan(lag=lag, **merged)


def consent_batches(plan: ConsentPlan, party: str, other: str, subjects: pa.Array, identifier: pa.Array,
                    policy: dict[str, _PurposePolicy], chunk: int = 1_000_000, named: Sequence[str] = ()):
    """Render `plan` as Arrow record batches of `chunk` rows with the CONSENT_COLUMNS.

    `subjects` are the subject ids (row keys), `identifier` their E.164 phones (null if
    unknown). Events of `sharing.*` and of the `named` purposes name `other` as the recipient.
    Event ids number the events in time order: `<party>-ce-0000000001`, ...
    """
    purposes = list(policy)
    notice_days = np.array([np.datetime64(d, "s").astype(np.int64) for _, d in _NOTICES])
    recipient_of = np.array([p in RECIPIENT_PURPOSES or p in named for p in purposes])
    for lo in range(0, len(plan), chunk):
        hi = min(lo + chunk, len(plan))
        t = plan.t[lo:hi]
        grant = plan.action[lo:hi] == 0
        take = pa.array(plan.row[lo:hi].astype(np.int64))
        ids = pc.cast(pa.array(np.arange(lo + 1, hi + 1, dtype=np.int64)), pa.string())
        yield pa.record_batch({
            "event_id": pc.binary_join_element_wise(f"{party}-ce-", pc.utf8_lpad(ids, 10, "0"), ""),
            "subject": pc.take(subjects, take),
            "identifier": pc.take(identifier, take),
            "purpose": _vocab(purposes, plan.purpose[lo:hi]),
            "recipient": pc.if_else(pa.array(recipient_of[plan.purpose[lo:hi]]), pa.scalar(other, pa.string()),
                                    pa.scalar(None, pa.string())),
            "action": _vocab(["granted", "refused", "withdrawn"], plan.action[lo:hi]),
            "channel": _vocab(CHANNELS, plan.channel[lo:hi]),
            "notice_version": _vocab([_notice_version(party, v) for v, _ in _NOTICES],
                                     np.searchsorted(notice_days, t, side="right") - 1),
            "valid_from": _iso(t),
            "valid_until": _iso(t + plan.valid_days[lo:hi].astype(np.int64) * 86400, grant),
            "received_at": _iso(t + plan.lag[lo:hi]),
        })


CONSENT_SCHEMA = {
    "key": "event_id",
    "identifiers": [("identifier", "phone")],
    "features": [
        ("subject", "string"), ("purpose", "category"), ("recipient", "category"),
        ("action", "category"), ("channel", "category"), ("notice_version", "category"),
        ("valid_from", "date"), ("valid_until", "date"), ("received_at", "date"),
    ],
    "labels": [],
}


# ----------------------------------------------------------------------------------------------
# Ground truth


def _design(frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> np.ndarray:
    num = frame[numeric].astype(float).to_numpy()
    if not categorical:
        return num
    cat = pd.get_dummies(frame[categorical].astype(str), dtype=float).to_numpy()
    return np.hstack([num, cat])


def achievable_auc(brand_x: np.ndarray, partner_x: np.ndarray, y: np.ndarray, seed: int,
                   test_size: float = 0.3) -> dict[str, float]:
    """Held-out AUC of a logistic regression on brand features alone and with partner features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    idx_train, idx_test = train_test_split(np.arange(y.shape[0]), test_size=test_size,
                                           random_state=seed % (2**32), stratify=y)
    out = {}
    for name, x in (("brand_only", brand_x), ("with_partner", np.hstack([brand_x, partner_x]))):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(x[idx_train], y[idx_train])
        out[name] = float(roc_auc_score(y[idx_test], model.predict_proba(x[idx_test])[:, 1]))
    return out


def _match_counts(brand: Table, partner_pos: np.ndarray, partner: Table) -> dict[str, int]:
    """How many brand rows a perfect PSI on each identifier (after normalisation) would match."""
    pos = partner_pos[brand.person]
    inp = pos >= 0
    pp = np.where(inp, pos, 0)
    phone = inp & brand.phone_ok & partner.phone_ok[pp]
    email = inp & brand.email_ok & partner.email_ok[pp]
    openid = inp & brand.openid_ok & partner.openid_ok[pp]
    unionid = inp & brand.unionid_ok & partner.unionid_ok[pp]
    return {
        "in_partner": int(inp.sum()),
        "phone": int(phone.sum()),
        "email": int(email.sum()),
        "openid": int(openid.sum()),
        "unionid": int(unionid.sum()),
        "any": int((phone | email | openid | unionid).sum()),
    }


# ----------------------------------------------------------------------------------------------
# Output


def schema_yaml(dataset: str, spec: dict[str, Any]) -> str:
    """The dataset schema in the format `confide node ingest` reads."""
    lines = [f"dataset: {dataset}", f"key: {spec['key']}", "identifiers:"]
    lines += [f"  - {{column: {c}, type: {t}}}" for c, t in spec["identifiers"]]
    lines.append("features:")
    lines += [f"  - {{column: {c}, type: {t}}}" for c, t in spec["features"]]
    if spec["labels"]:
        lines.append("labels:")
        lines += [f"  - {{column: {c}, type: {t}}}" for c, t in spec["labels"]]
    else:
        lines.append("labels: []")
    return "\n".join(lines) + "\n"


def _plain(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Dictionary columns decoded to strings, so Parquet readers see plain string columns."""
    cols = [c.cast(pa.string()) if pa.types.is_dictionary(c.type) else c for c in batch.columns]
    return pa.record_batch(cols, names=batch.schema.names)


def write_batches(batches: Iterable[pa.RecordBatch], path: Path, fmt: str,
                  schema: Optional[pa.Schema] = None) -> int:
    """Stream record batches to CSV (UTF-8, header, nulls as empty fields) or Parquet (zstd);
    byte-stable for the same batches. With no batches, a file with just the columns of
    `schema`. Returns the number of rows written."""
    writer: Any = None
    rows = 0
    if schema is not None:
        batches = itertools.chain(batches, [pa.RecordBatch.from_pylist([], schema=schema)])
    try:
        for batch in batches:
            if batch.num_rows == 0 and (writer is not None or schema is None):
                continue
            if fmt == "parquet":
                batch = _plain(batch)
            if writer is None:
                if fmt == "csv":
                    import pyarrow.csv as pcsv

                    writer = pcsv.CSVWriter(str(path), batch.schema, write_options=pcsv.WriteOptions(quoting_style="needed"))
                else:
                    import pyarrow.parquet as pq

                    writer = pq.ParquetWriter(str(path), batch.schema, compression="zstd")
            writer.write_batch(batch)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def write_table(table: pa.Table, path: Path, fmt: str) -> int:
    """Write one table (see `write_batches`)."""
    return write_batches(table.to_batches(max_chunksize=1_000_000), path, fmt)


def _validate(out_dir: Any, members: Any, partner_factor: Any, leads: Any, overlap: Any, seed: Any,
              fmt: Any, brand_name: Any, partner_name: Any, new_leads: Any = None, lead_overlap: Any = None) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_fraction(v: Any) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 <= v <= 1.0

    if out_dir is None or str(out_dir).strip() == "":
        raise ValidationError("out_dir: an output directory is required")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValidationError(f"out_dir: {out_dir} exists and is not a directory")
    if not is_int(members) or members <= 0:
        raise ValidationError(f"members: must be a positive integer, got {members!r}")
    if members > 50_000_000:
        raise ValidationError(f"members: at most 50,000,000 per run, got {members}")
    if leads is not None and (not is_int(leads) or leads <= 0):
        raise ValidationError(f"leads: must be a positive integer, got {leads!r}")
    if new_leads is not None and (not is_int(new_leads) or new_leads < 0):
        raise ValidationError(f"new_leads: must be a non-negative integer, got {new_leads!r}")
    if isinstance(partner_factor, bool) or not isinstance(partner_factor, (int, float)) \
            or not np.isfinite(partner_factor) or partner_factor <= 0:
        raise ValidationError(f"partner_factor: must be a positive number, got {partner_factor!r}")
    if not is_fraction(overlap):
        raise ValidationError(f"overlap: must be a fraction in [0, 1], got {overlap!r}")
    if lead_overlap is not None and not is_fraction(lead_overlap):
        raise ValidationError(f"lead_overlap: must be a fraction in [0, 1], got {lead_overlap!r}")
    if not is_int(seed) or seed < 0:
        raise ValidationError(f"seed: must be a non-negative integer, got {seed!r}")
    if fmt not in FORMATS:
        raise ValidationError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for field, name in (("brand_name", brand_name), ("partner_name", partner_name)):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValidationError(f"{field}: 1-64 letters, digits, '_', '.', '-' (starting with a "
                                  f"letter or digit), got {name!r}")
    if brand_name == partner_name:
        raise ValidationError("brand_name and partner_name must differ")


def _scoring_auc(leads: pa.Table, partner: pa.Table, rows: np.ndarray, partner_rows: np.ndarray,
                 y: np.ndarray, seed: int, numeric: tuple[list[str], list[str]],
                 categorical: tuple[list[str], list[str]]) -> dict[str, float]:
    bx = _design(leads.take(pa.array(rows)).to_pandas(), numeric[0], categorical[0])
    px = _design(partner.take(pa.array(partner_rows)).to_pandas(), numeric[1], categorical[1])
    return achievable_auc(bx, px, y, seed)


def generate(out_dir: str | Path, *, members: int = 20_000, partner_factor: float = 3.0,
             leads: Optional[int] = None, overlap: float = 0.35, seed: int = 42, fmt: str = "csv",
             brand_name: str = "brand", partner_name: str = "partner", new_leads: Optional[int] = None,
             lead_overlap: Optional[float] = None) -> dict[str, Any]:
    """Generate the brand's and the partner's datasets into `out_dir`.

    Same arguments => byte-identical files. `leads` (historical leads with a known outcome)
    defaults to members // 4, `new_leads` (fresh leads to score, outcome unknown) to leads // 10.
    `overlap` is the share of brand members who are also in the partner population;
    `lead_overlap` (default `overlap`) the share of leads who are not members that the partner
    also knows (a lead who is a member is known with the members' rate).

    Returns a summary dict: files (path, rows), overlap counts, expected identifier matches and
    the achievable AUCs (also written to ``ground_truth.json``).

    Raises ValidationError for bad options (overlap outside [0, 1], non-positive sizes, a partner
    population too small to hold the overlap, unknown format, bad party names).
    """
    _validate(out_dir, members, partner_factor, leads, overlap, seed, fmt, brand_name, partner_name,
              new_leads, lead_overlap)
    members = int(members)
    seed = int(seed)
    n_leads = int(leads) if leads is not None else max(1, members // 4)
    n_new = int(new_leads) if new_leads is not None else n_leads // 10
    n_all = n_leads + n_new
    lead_overlap = overlap if lead_overlap is None else lead_overlap
    n_partner = int(round(members * float(partner_factor)))
    if n_partner < 1:
        raise ValidationError(f"partner_factor: {partner_factor} x {members} members gives an empty partner population")

    sel = _rng(seed, _S_SELECT)
    # A quarter of leads (at most all members) are existing members; the rest are new people.
    n_lead_members = min(members, int(round(0.25 * n_all)))
    n_lead_new = n_all - n_lead_members
    n_ov_members = int(round(overlap * members))
    n_ov_new = int(round(lead_overlap * n_lead_new))
    if n_ov_members + n_ov_new > n_partner:
        field = "overlap" if n_ov_members > n_partner or lead_overlap == overlap else "lead_overlap"
        raise ValidationError(
            f"{field}: overlap {overlap} / lead overlap {lead_overlap} need {n_ov_members + n_ov_new} shared "
            f"people but the partner population has only {n_partner}; raise --partner-factor or lower the overlap")
    n_fresh = n_partner - n_ov_members - n_ov_new
    n_people = members + n_lead_new + n_fresh
    people = make_people(n_people, seed)

    # Universe layout: [members | new lead people | partner-only people]. Leads (historical and
    # new) are one shuffled list; its last `n_new` rows are the new leads.
    member_idx = np.arange(members)
    lead_member_rows = np.sort(sel.choice(members, size=n_lead_members, replace=False))
    lead_idx = np.concatenate([lead_member_rows, np.arange(members, members + n_lead_new)])
    lead_perm = sel.permutation(n_all)
    lead_idx = lead_idx[lead_perm]
    lead_member_row = np.concatenate([lead_member_rows, np.full(n_lead_new, -1)])[lead_perm]
    is_new = np.arange(n_all) >= n_leads

    ov_members = sel.choice(members, size=n_ov_members, replace=False)
    ov_new = members + sel.choice(n_lead_new, size=n_ov_new, replace=False) if n_lead_new else np.empty(0, np.int64)
    partner_idx = np.concatenate([ov_members, ov_new, np.arange(members + n_lead_new, n_people)]).astype(np.int64)
    partner_idx = partner_idx[sel.permutation(n_partner)]

    bm = brand_members(people, member_idx, seed)
    member_ids = bm.data.column("member_id").combine_chunks()
    lead_mid = pc.take(member_ids, pa.array(lead_member_row, mask=lead_member_row < 0))
    all_leads = brand_leads(people, lead_idx, lead_mid, seed, new=is_new)
    lead_ids = pa.concat_arrays([_ids("L", n_leads, 8), _ids("NL", n_new, 7)])
    all_leads = Table(all_leads.name, all_leads.data.set_column(0, "lead_id", lead_ids), all_leads.person,
                      all_leads.phone_ok, all_leads.email_ok, all_leads.openid_ok, all_leads.unionid_ok)
    bl = _rows(all_leads, np.arange(n_leads), "brand_leads")
    nl = _rows(all_leads, np.arange(n_leads, n_all), "brand_new_leads")
    new_outcomes = nl.data.select(["lead_id", "converted"])
    nl = Table(nl.name, nl.data.drop_columns(["converted"]), nl.person, nl.phone_ok, nl.email_ok, nl.openid_ok,
               nl.unionid_ok)
    lead_idx = lead_idx[:n_leads]

    # Which WeChat ids the brand holds for each person (members or leads).
    b_union = np.zeros(n_people, dtype=bool)
    b_open = np.zeros(n_people, dtype=bool)
    for t in (bm, all_leads):
        b_union[t.person[t.unionid_ok]] = True
        b_open[t.person[t.openid_ok]] = True
    pp = partner_population(people, partner_idx, b_union[partner_idx], b_open[partner_idx], seed)

    # Consent: members and leads (members' and leads' policies) on the brand side; everyone on
    # the partner side. A subject's first consent comes with sign-up, through its channel.
    chan_code = {c: i for i, c in enumerate(CHANNELS)}
    rng_b = _rng(seed, _S_CONSENT_B)
    b_subjects = pa.concat_arrays([member_ids, all_leads.data.column("lead_id").combine_chunks()])
    b_ident = pa.concat_arrays([e164(people.phone[member_idx], bm.phone_ok),
                                e164(people.phone[all_leads.person], all_leads.phone_ok)])
    b_since = np.concatenate([
        column(bm.data, "registration_date").astype("datetime64[s]"),
        column(all_leads.data, "created_date").astype("datetime64[s]"),
    ]) + rng_b.integers(8 * 3600, 22 * 3600, members + n_all).astype("timedelta64[s]")
    reg = column(bm.data, "registration_channel").astype(str)
    src = column(all_leads.data, "source_channel").astype(str)
    b_channel = np.concatenate([
        np.select([reg == "wechat_miniprogram", reg == "app", reg == "store"],
                  [chan_code["wechat_miniprogram"], chan_code["app"], chan_code["store"]], chan_code["web"]),
        np.select([np.isin(src, ["dealer_walk_in", "auto_show"]), src == "wechat_miniprogram", src == "call_centre"],
                  [chan_code["store"], chan_code["wechat_miniprogram"], chan_code["call_centre"]], chan_code["web"]),
    ])
    b_group = np.concatenate([np.zeros(members, np.intp), np.ones(n_all, np.intp)])
    b_plan = consent_plan(rng_b, b_since, b_channel, [_BRAND_POLICY, _LEAD_POLICY], b_group)
    # Opt-outs of personalised marketing (PIPL Art. 24), set in the app / mini-program settings.
    opt_rate = np.where(b_group == 0, _OPT_OUT_RATE["members"], _OPT_OUT_RATE["leads"])
    opted = np.flatnonzero(rng_b.random(members + n_all) < opt_rate)
    opted_at = b_since[opted] + (1 + rng_b.random(opted.shape[0]) * (AS_OF - np.timedelta64(3600, "s") - b_since[opted])
                                 .astype(np.int64)).astype(np.int64).astype("timedelta64[s]")
    preferences = pa.table({
        "subject": pc.take(b_subjects, pa.array(opted.astype(np.int64))),
        "no_personalised_marketing": pa.array(np.ones(opted.shape[0], dtype=np.int8)),
        "channel": pa.array(CHANNELS[np.where(rng_b.random(opted.shape[0]) < 0.7, 1, 0)], type=pa.string()),
        "changed_at": _iso(opted_at),
    }).sort_by("changed_at")
    rng_p = _rng(seed, _S_CONSENT_P)
    p_subjects = pp.data.column("partner_id").combine_chunks()
    p_ident = e164(people.phone[partner_idx], pp.phone_ok)
    p_since = column(pp.data, "registered_date").astype("datetime64[s]") + \
        rng_p.integers(7 * 3600, 23 * 3600, n_partner).astype("timedelta64[s]")
    p_channel = _choice(rng_p, [chan_code[c] for c in ("app", "web", "wechat_miniprogram", "call_centre")],
                        [0.72, 0.12, 0.12, 0.04], n_partner)
    p_plan = consent_plan(rng_p, p_since, p_channel, _PARTNER_POLICY)

    # Ground truth.
    partner_pos = np.full(n_people, -1, dtype=np.int64)
    partner_pos[partner_idx] = np.arange(n_partner)
    lead_pos = partner_pos[lead_idx]
    ov_leads = np.flatnonzero(lead_pos >= 0)
    y = column(bl.data, "converted")[ov_leads].astype(int)
    auc: dict[str, Any] = {"brand_only": None, "with_partner": None, "oracle": None}
    auc_model: dict[str, Any] = {"brand_only": None, "with_partner": None}
    auc_note = None
    if ov_leads.shape[0] >= 200 and 20 <= y.sum() <= y.shape[0] - 20:
        from sklearn.metrics import roc_auc_score

        auc.update(_scoring_auc(bl.data, pp.data, ov_leads, lead_pos[ov_leads], y, seed,
                                (LEAD_NUMERIC, PARTNER_NUMERIC), (LEAD_CATEGORICAL, PARTNER_CATEGORICAL)))
        auc["oracle"] = float(roc_auc_score(y, lead_conversion_logit(people, lead_idx[ov_leads])))
        auc = {k: round(v, 4) for k, v in auc.items()}
        auc_model = {k: round(v, 4) for k, v in _scoring_auc(
            bl.data, pp.data, ov_leads, lead_pos[ov_leads], y, seed,
            (LEAD_MODEL_FEATURES, PARTNER_MODEL_FEATURES), (LEAD_MODEL_CATEGORICAL, PARTNER_MODEL_CATEGORICAL)).items()}
    else:
        auc_note = "too few overlapped leads (need >= 200 with >= 20 of each outcome); raise --leads"
    new_pos = partner_pos[nl.person]
    y_new = column(new_outcomes, "converted").astype(int)
    new_truth: dict[str, Any] = {
        "rows": n_new, "in_partner": int((new_pos >= 0).sum()),
        "conversion_rate": round(float(y_new.mean()), 4) if n_new else None,
        "oracle_auc": None,
    }
    if n_new and 0 < y_new.sum() < n_new:
        from sklearn.metrics import roc_auc_score

        new_truth["oracle_auc"] = round(float(roc_auc_score(y_new, lead_conversion_logit(people, nl.person))), 4)

    ground_truth = {
        "seed": seed,
        "as_of": str(AS_OF) + "Z",
        "brand": brand_name,
        "partner": partner_name,
        "rows": {"brand_members": members, "brand_leads": n_leads, "brand_new_leads": n_new,
                 "partner_population": n_partner, "brand_consent": len(b_plan), "partner_consent": len(p_plan),
                 "brand_preferences": preferences.num_rows},
        "overlap": {
            "requested": overlap,
            "lead_overlap_requested": lead_overlap,
            "members_in_partner": n_ov_members,
            "members_fraction": round(n_ov_members / members, 4),
            "leads_in_partner": int(ov_leads.shape[0]),
            "leads_fraction": round(ov_leads.shape[0] / n_leads, 4),
            "leads_that_are_members": int((lead_member_row[:n_leads] >= 0).sum()),
        },
        # What a perfect PSI on each normalised identifier would match (persons, not rows).
        "expected_matches": {
            "brand_members": _match_counts(bm, partner_pos, pp),
            "brand_leads": _match_counts(bl, partner_pos, pp),
            "brand_new_leads": _match_counts(nl, partner_pos, pp),
        },
        "labels": {
            "high_value_rate": round(float(column(bm.data, "high_value").mean()), 4),
            "lead_conversion_rate": round(float(column(bl.data, "converted").mean()), 4),
        },
        "lead_scoring_auc": {
            **auc,
            "note": auc_note or "logistic regression, 70/30 stratified split of the leads also in the "
                                "partner population; oracle = the planted conversion log-odds",
            "n_overlapped_leads": int(ov_leads.shape[0]),
            "brand_features": LEAD_NUMERIC + LEAD_CATEGORICAL,
            "partner_features": PARTNER_NUMERIC + PARTNER_CATEGORICAL,
        },
        # The same with the smaller feature set the demo's federated model uses.
        "lead_scoring_auc_model_features": {
            **auc_model,
            "brand_features": LEAD_MODEL_FEATURES + LEAD_MODEL_CATEGORICAL,
            "partner_features": PARTNER_MODEL_FEATURES + PARTNER_MODEL_CATEGORICAL,
        },
        # The new leads' outcomes (in brand_new_leads_outcomes, which no party holds at scoring time).
        "new_leads": new_truth,
        "consent_action_rates": {"brand": b_plan.action_rates(), "partner": p_plan.action_rates()},
    }

    # Write, releasing each big table once it is on disk.
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}

    def emit(name: str, spec: Optional[dict[str, Any]], batches: Iterable[pa.RecordBatch],
             schema: Optional[pa.Schema] = None) -> None:
        path = out / f"{name}.{fmt}"
        rows = write_batches(batches, path, fmt, schema)
        files[name] = {"path": str(path), "rows": rows}
        if spec is not None:
            schema_path = out / f"{name}.schema.yaml"
            schema_path.write_text(schema_yaml(name, spec), encoding="utf-8")
            files[name]["schema"] = str(schema_path)

    del people
    for name, table, spec in (("brand_members", bm, MEMBER_SCHEMA), ("brand_leads", bl, LEAD_SCHEMA),
                              ("brand_new_leads", nl, NEW_LEAD_SCHEMA), ("partner_population", pp, PARTNER_SCHEMA)):
        emit(name, spec, table.data.to_batches(max_chunksize=1_000_000), table.data.schema)
    del bm, bl, nl, all_leads, pp, table
    emit("brand_new_leads_outcomes", None, new_outcomes.to_batches(), new_outcomes.schema)
    emit("brand_preferences", None, preferences.to_batches(), preferences.schema)
    emit("brand_consent", CONSENT_SCHEMA,
         consent_batches(b_plan, brand_name, partner_name, b_subjects, b_ident, _BRAND_POLICY,
                         named=NAMED_PURPOSES))
    del b_plan, b_subjects, b_ident
    emit("partner_consent", CONSENT_SCHEMA,
         consent_batches(p_plan, partner_name, brand_name, p_subjects, p_ident, _PARTNER_POLICY,
                         named=NAMED_PURPOSES))
    for party, other, role in ((brand_name, partner_name, "brand"), (partner_name, brand_name, "partner")):
        path = out / f"{role}_notices.yaml"
        path.write_text(yaml.safe_dump(notices(party, other, role), sort_keys=False), encoding="utf-8")
        files[f"{role}_notices"] = {"path": str(path)}
    gt_path = out / "ground_truth.json"
    gt_path.write_text(json.dumps(ground_truth, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    files["ground_truth"] = {"path": str(gt_path)}
    return {"out_dir": str(out), "format": fmt, "files": files, **ground_truth}
