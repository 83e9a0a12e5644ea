"""From a party's rows to protocol items: consent gate first, then normalisation, then
de-duplication.

    data = PartyData(subjects=[...row keys...], identifiers={"phone": [...], "email": [...]})
    prepared = prepare_party(data, gate, purpose="audience.overlap", recipient="partner-a",
                             at=now, id_types=["phone"])
    prepared.items["phone"]   # PreparedItems: distinct normalised values and their rows
    prepared.stats            # counts for the audit record (never identifiers)

The gate sees only the node's own row keys (subject ids), never identifiers. Rows whose subject
the gate does not allow are dropped before any identifier is even normalised.
"""

from __future__ import annotations

import array
import datetime as dt
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from consent.gate import ConsentGate
from confide.errors import ValidationError
from psi.normalize import normalize, parse_id_type


@dataclass
class PreparedItems:
    """Distinct normalised values of one identifier type and the input rows (indices into
    `PartyData.subjects`) carrying each: `first_row[i]` plus, only for values that occur more
    than once, `extra_rows[i]`. (Compact on purpose: 10^7 rows must fit a node's memory.)"""

    id_type: str
    values: list[str]
    first_row: np.ndarray
    extra_rows: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def from_values(cls, id_type: str, values: Sequence[str | None]) -> "PreparedItems":
        """Items from already-gated values (`None` = skip), de-duplicated."""
        index: dict[str, int] = {}
        vals: list[str] = []
        first = array.array("q")  # 8 bytes a row, not a Python int object each
        extra: dict[int, list[int]] = {}
        for r, v in enumerate(values):
            if v is None:
                continue
            i = index.setdefault(v, len(vals))
            if i == len(vals):
                vals.append(v)
                first.append(r)
            else:
                extra.setdefault(i, []).append(r)
        del index
        return cls(id_type, vals, np.frombuffer(first, dtype=np.int64).copy(), extra)

    def rows_of(self, i: int) -> list[int]:
        """All input rows carrying distinct value i."""
        more = self.extra_rows.get(i)
        return [int(self.first_row[i]), *more] if more else [int(self.first_row[i])]

    def without_rows(self, exclude: set[int]) -> "PreparedItems":
        """The items of the rows not in `exclude` (waterfall: already-matched records)."""
        vals: list[str] = []
        first: list[int] = []
        extra: dict[int, list[int]] = {}
        for i, v in enumerate(self.values):
            keep = [r for r in self.rows_of(i) if r not in exclude]
            if keep:
                if len(keep) > 1:
                    extra[len(vals)] = keep[1:]
                vals.append(v)
                first.append(keep[0])
        return PreparedItems(self.id_type, vals, np.asarray(first, dtype=np.int64), extra)


class RowNumbers(Sequence[str]):
    """Row keys "0", "1", … made on demand: the subjects of a file without a key column,
    without materialising millions of strings."""

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            return [str(j) for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return str(i % self._n)


@dataclass
class PartyData:
    """One party's rows: a subject id (its own row key, unique) per row and identifier columns
    by type."""

    subjects: Sequence[str]
    identifiers: dict[str, list[object]]

    def __post_init__(self) -> None:
        for t, col in self.identifiers.items():
            if len(col) != len(self.subjects):
                raise ValidationError(
                    f"identifier column {t!r} has {len(col)} values for {len(self.subjects)} subjects"
                )


@dataclass
class Prepared:
    items: dict[str, PreparedItems]
    stats: dict[str, object] = field(default_factory=dict)


def prepare_party(
    data: PartyData,
    gate: ConsentGate,
    *,
    purpose: str,
    recipient: str | None,
    at: dt.datetime,
    id_types: Sequence[str],
    region: str = "CN",
) -> Prepared:
    """Gate, normalise and de-duplicate a party's identifiers for a PSI job.

    Returns the items per identifier type and the counts for the audit record: input rows,
    consent-denied rows by reason, invalid values per type, distinct items per type.
    Raises ValidationError for an unknown identifier type or a missing column.
    """
    types = [parse_id_type(t).value for t in id_types]
    for t in types:
        if t not in data.identifiers:
            raise ValidationError(f"no {t!r} column in the input")
    decision = gate.allowed(data.subjects, purpose, recipient, at)
    if decision.allowed_count == len(data.subjects):
        # The gate returns an order-preserving subset of the (unique) row keys, so equal
        # length means everyone is allowed: skip building a set of 10^7 keys.
        keep: list[int] = list(range(len(data.subjects)))
    else:
        allowed = set(decision.allowed)
        keep = [r for r, s in enumerate(data.subjects) if s in allowed]
    stats: dict[str, object] = {
        "rows": len(data.subjects),
        "consented_rows": len(keep),
        "denied": dict(decision.denied_counts),
        "invalid": {},
        "distinct": {},
    }
    items: dict[str, PreparedItems] = {}
    for t in types:
        col = data.identifiers[t]
        if len(keep) == len(data.subjects):
            full: list[str | None] = normalize(t, col, region=region).values
            normed = full
        else:
            normed = normalize(t, [col[r] for r in keep], region=region).values
            full = [None] * len(data.subjects)
            for r, v in zip(keep, normed):
                full[r] = v
        # Empty cells are "no identifier of this type", not invalid ones.
        invalid = sum(
            1 for r, v in zip(keep, normed) if v is None and not _blank(col[r])
        )
        items[t] = PreparedItems.from_values(t, full)
        stats["invalid"][t] = invalid  # type: ignore[index]
        stats["distinct"][t] = len(items[t].values)  # type: ignore[index]
    return Prepared(items, stats)


def _blank(v: object) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and v != v:  # NaN from CSV readers
        return True
    return isinstance(v, str) and v.strip() == ""
