"""Feature preparation at a party's own node, before anything is encrypted (docs/vfl.md §4b).

A training job names source columns; this module turns them into the numeric matrix the
protocol needs, and the same transform is stored with the model part so scoring applies it
unchanged:

- **categorical** columns (declared `type: category` in the dataset schema, or listed in the
  job's `categories`) become indicator columns over a vocabulary: the one the job gives for
  that column (agreed in the job parameters), or this node's `max_categories` most frequent
  values among the *training* rows (ties by value). Every value outside the vocabulary —
  including values first seen at scoring time and missing values — goes to one `other`
  indicator, kept only when some training row needed it.
- **numeric** columns (int, float, bool) are standardised with the mean and standard
  deviation of the training rows only (a constant column is centred, not scaled).
  Missing values in a numeric column are refused with the column name: impute them at
  ingest (no silent imputation: a guessed value would quietly change the model).

The expanded names (`tier=gold`, `tier=<other>`) never leave the node; only the number of
columns does (the protocol's `PartyHello` carries a feature count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from confide.errors import ValidationError

OTHER = "<other>"
MAX_CATEGORIES = 16  # default cap on a node-chosen vocabulary (the job may set 1..256)
MAX_CATEGORIES_LIMIT = 256
CATEGORICAL_TYPES = ("category",)
NUMERIC_TYPES = ("int", "float", "bool")


@dataclass
class Column:
    """How one source column becomes model columns."""

    name: str
    kind: str  # "numeric" | "categorical"
    mean: float = 0.0
    scale: float = 1.0
    vocabulary: list[str] = field(default_factory=list)
    other: bool = False

    @property
    def width(self) -> int:
        return 1 if self.kind == "numeric" else len(self.vocabulary) + int(self.other)

    def names(self) -> list[str]:
        if self.kind == "numeric":
            return [self.name]
        return [f"{self.name}={v}" for v in self.vocabulary] + ([f"{self.name}={OTHER}"] if self.other else [])

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "numeric":
            return {"name": self.name, "kind": "numeric", "mean": self.mean, "scale": self.scale}
        return {"name": self.name, "kind": "categorical", "vocabulary": list(self.vocabulary), "other": self.other}


@dataclass
class Encoder:
    """A fitted transform from a frame of source columns to the model's feature matrix."""

    columns: list[Column]

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns)

    @property
    def names(self) -> list[str]:
        return [n for c in self.columns for n in c.names()]

    @property
    def sources(self) -> list[str]:
        return [c.name for c in self.columns]

    def transform(self, frame: pd.DataFrame, what: str) -> np.ndarray:
        """The feature matrix (rows of `frame`, columns `names`). Raises ValidationError naming
        the column for a missing column, a missing or non-numeric value in a numeric column."""
        missing = [c.name for c in self.columns if c.name not in frame.columns]
        if missing:
            raise ValidationError(f"{what}: no column(s) {missing}", field="features")
        parts: list[np.ndarray] = []
        for col in self.columns:
            if col.kind == "numeric":
                values = _numeric(frame[col.name], col.name, what)
                parts.append(((values - col.mean) / col.scale).reshape(-1, 1))
            else:
                text = _as_text(frame[col.name])
                block = np.zeros((len(frame), col.width), dtype=np.float64)
                pos = {v: i for i, v in enumerate(col.vocabulary)}
                idx = np.array([pos.get(v, -1) if v is not None else -1 for v in text], dtype=np.int64)
                known = idx >= 0
                block[np.nonzero(known)[0], idx[known]] = 1.0
                if col.other:
                    block[~known, -1] = 1.0
                parts.append(block)
        if not parts:
            return np.zeros((len(frame), 0))
        return np.hstack(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": [c.to_dict() for c in self.columns]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Encoder":
        cols = []
        for c in data["columns"]:
            if c["kind"] == "numeric":
                cols.append(Column(c["name"], "numeric", mean=float(c["mean"]), scale=float(c["scale"])))
            else:
                cols.append(Column(c["name"], "categorical", vocabulary=[str(v) for v in c["vocabulary"]],
                                   other=bool(c["other"])))
        return cls(cols)

    @classmethod
    def identity(cls, columns: Sequence[str]) -> "Encoder":
        """Raw numeric columns, unscaled (model parts trained before encoders existed)."""
        return cls([Column(c, "numeric") for c in columns])


def _as_text(series: pd.Series) -> list[str | None]:
    out: list[str | None] = []
    for v in series.tolist():
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            out.append(None)
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))  # 3.0 and "3" are the same category
        else:
            out.append(str(v))
    return out


def _numeric(series: pd.Series, name: str, what: str) -> np.ndarray:
    n_missing = int(series.isna().sum())
    if n_missing:
        raise ValidationError(f"{what}: numeric feature column {name!r} has {n_missing} missing values; impute "
                              f"them at ingest, or declare the column categorical (missing -> {OTHER})",
                              field="features")
    try:
        values = pd.to_numeric(series, errors="raise").astype("float64").to_numpy()
    except (TypeError, ValueError):
        bad = int(pd.to_numeric(series, errors="coerce").isna().sum())
        raise ValidationError(f"{what}: feature column {name!r} has {bad} non-numeric values; declare it "
                              f"categorical (type: category, or the job's categories) or fix the data",
                              field="features") from None
    if not np.isfinite(values).all():
        raise ValidationError(f"{what}: feature column {name!r} has non-finite values", field="features")
    return values


def _rare_folded(text: list[str | None], vocab: list[str], min_count: int,
                 batches: Sequence[np.ndarray] | None) -> tuple[list[str], bool]:
    """Fold vocabulary values with fewer than `min_count` rows (in the training rows, and in
    every mini-batch) into `other`; keep `other` only if it passes the same test.

    Why: a party learns its gradient, a batch aggregate X^T d, per column. An indicator that is
    1 on a handful of rows of a batch would hand the partner those rows' residuals (label
    information); at least k_min rows per indicator keeps every column an aggregate."""
    groups = list(batches) if batches else [np.arange(len(text))]
    known = set(vocab)
    labels = np.array([v if v in known else None for v in text], dtype=object)

    def enough(mask: np.ndarray) -> bool:
        return all(int(mask[g].sum()) >= min_count for g in groups)

    kept = [v for v in vocab if enough(labels == v)]
    rest = ~np.isin(labels, np.array(kept, dtype=object)) if kept else np.ones(len(text), dtype=bool)
    # `other` is kept when it is an aggregate too, or when no training row needs it (its weight
    # then stays 0, and scoring may meet values the training rows did not have).
    return kept, bool(enough(rest) or not rest.any())


def fit(
    frame: pd.DataFrame,
    columns: Sequence[str],
    types: Mapping[str, str],
    *,
    categories: Mapping[str, Sequence[str] | None] | None = None,
    max_categories: int = MAX_CATEGORIES,
    standardize: bool = True,
    min_count: int = 1,
    batches: Sequence[np.ndarray] | None = None,
    what: str = "features",
) -> Encoder:
    """Fit the transform on the training rows `frame`.

    `types` maps a column to its schema type; `categories` lists columns to one-hot encode
    (value: the agreed vocabulary, or None for this node's top values). Values with fewer than
    `min_count` rows in the training rows (in each of `batches`, positions within `frame`, if
    given) fold into `other`, which is dropped if it is that rare too. Raises ValidationError
    naming the column for an unknown column, an empty vocabulary, a column of a type that is
    neither numeric nor categorical, or bad numeric values (see `Encoder.transform`)."""
    categories = dict(categories or {})
    if not 1 <= max_categories <= MAX_CATEGORIES_LIMIT:
        raise ValidationError(f"max_categories must be in 1..{MAX_CATEGORIES_LIMIT}", field="max_categories")
    unknown = [c for c in [*columns, *categories] if c not in types]
    if unknown:
        raise ValidationError(f"{what}: unknown column(s) {sorted(set(unknown))}", field="features")
    stray = [c for c in categories if c not in columns]
    if stray:
        raise ValidationError(f"{what}: categories names column(s) {stray} that are not features of the job",
                              field="categories")
    if len(frame) == 0:
        raise ValidationError(f"{what}: no training rows to fit the features on", field="features")
    out: list[Column] = []
    for name in columns:
        kind = types[name]
        if name in categories or kind in CATEGORICAL_TYPES:
            vocab = categories.get(name)
            text = _as_text(frame[name])
            if vocab is not None:
                vocab = [str(v) for v in vocab]
                if not vocab:
                    raise ValidationError(f"{what}: the vocabulary of {name!r} is empty", field="categories")
                if len(set(vocab)) != len(vocab):
                    raise ValidationError(f"{what}: the vocabulary of {name!r} lists a value twice",
                                          field="categories")
            else:
                counts = pd.Series([v for v in text if v is not None], dtype=object).value_counts()
                ranked = sorted(counts.items(), key=lambda kv: (-int(kv[1]), str(kv[0])))
                vocab = [str(v) for v, _ in ranked[:max_categories]]
                if not vocab:
                    raise ValidationError(f"{what}: categorical column {name!r} has no values among the training "
                                          "rows: its vocabulary would be empty", field="categories")
            vocab, other = _rare_folded(text, vocab, min_count, batches)
            if not vocab:  # only `other` left: a constant column, no information
                raise ValidationError(f"{what}: categorical column {name!r} has no value with at least {min_count} "
                                      "training rows in every mini-batch; leave it out or agree a coarser vocabulary",
                                      field="categories")
            out.append(Column(name, "categorical", vocabulary=vocab, other=other))
        elif kind in NUMERIC_TYPES:
            values = _numeric(frame[name], name, what)
            mean, std = (float(values.mean()), float(values.std())) if standardize else (0.0, 1.0)
            out.append(Column(name, "numeric", mean=mean, scale=std if std > 1e-12 else 1.0))
        else:
            raise ValidationError(f"{what}: column {name!r} has type {kind!r}, which is neither numeric nor "
                                  "categorical; declare it categorical or leave it out", field="features")
    return Encoder(out)
