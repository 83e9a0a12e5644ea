"""A party node's datasets: declared schemas, the catalog, ingest (CSV/Parquet -> DB), describe.

A dataset is a file the party loads into its own database under a declared schema
(`DatasetSchema`): one key column (unique, non-null row id), identifier columns (what PSI
matches on), feature columns and label columns. Each ingest makes one content table with typed
columns, named `ds_<dataset>_v<version>` (not part of `NodeBase.metadata`), and one row in the
`datasets` catalog. An ingest is one transaction: it either completes (table filled, catalog
row written, the replaced version dropped) or leaves nothing behind.

Speed: the file is read in chunks with pyarrow (CSV streaming reader / Parquet batches), each
chunk is validated with vectorised pyarrow/pandas operations, and written with the raw driver:
`executemany` on SQLite, `COPY` on PostgreSQL (psycopg 3). The unique index on the key is built
once at the end. Duplicate keys across chunks are found with a sorted array of 64-bit key hashes
(8+8 bytes per row), every hash hit being confirmed against the table, so memory stays bounded
by the chunk size plus that index.

Values never appear in errors for key and identifier columns (they are personal data); feature
and label errors quote the offending value, shortened.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Double,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.types import TypeEngine

from confide.errors import ConfigurationError, Conflict, NotFound, ValidationError
from party_node.storage.base import DATA_TABLE_PREFIX, NodeBase

__all__ = [
    "Dataset",
    "DatasetInfo",
    "DatasetSchema",
    "FeatureColumn",
    "IdentifierColumn",
    "IngestReport",
    "LabelColumn",
    "dataset_table_name",
    "describe",
    "ingest",
    "list_datasets",
    "load_frame",
    "load_schema",
    "parse_schema",
]

# --------------------------------------------------------------------------------------------
# Declared schema
# --------------------------------------------------------------------------------------------

IdentifierType = Literal[
    "phone", "email", "openid", "unionid", "platform_id", "phone_md5", "phone_sha256"
]
FeatureType = Literal["int", "float", "bool", "category", "string", "date"]
LabelType = Literal["binary", "float"]
Role = Literal["key", "identifier", "feature", "label"]
KEY_TYPE = "string"  # the key is an opaque row id, stored as text

# Unicode letters/digits/_ (CSV headers are often not ASCII), not starting with a digit.
_COLUMN_NAME = re.compile(r"[^\W\d]\w*")
_PG_IDENTIFIER_BYTES = 63  # PostgreSQL silently truncates longer names: two could collide


def _check_column_name(name: str) -> str:
    if not _COLUMN_NAME.fullmatch(name) or len(name.encode()) > _PG_IDENTIFIER_BYTES:
        raise ValueError(
            f"column name {name!r} is not allowed: use letters, digits and _, not starting "
            f"with a digit, at most {_PG_IDENTIFIER_BYTES} bytes"
        )
    return name


class _DeclaredColumn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str = Field(description="Column name in the data file")

    @field_validator("column")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_column_name(v)


class IdentifierColumn(_DeclaredColumn):
    type: IdentifierType = Field(description="Identifier domain; values stored as given (text)")


class FeatureColumn(_DeclaredColumn):
    type: FeatureType


class LabelColumn(_DeclaredColumn):
    type: LabelType


class DatasetSchema(BaseModel):
    """The declared schema of a dataset (what the schema YAML/JSON file holds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(pattern=r"^[a-z0-9_]{1,40}$", description="Dataset name at the node")
    key: str = Field(description="Unique, non-null row id column")
    identifiers: list[IdentifierColumn] = Field(default_factory=list)
    features: list[FeatureColumn] = Field(default_factory=list)
    labels: list[LabelColumn] = Field(default_factory=list)

    @field_validator("key")
    @classmethod
    def _key_name(cls, v: str) -> str:
        return _check_column_name(v)

    @field_validator("identifiers", "features", "labels", mode="before")
    @classmethod
    def _empty_section(cls, v: Any) -> Any:
        return [] if v is None else v  # "labels:" with nothing under it

    @model_validator(mode="after")
    def _unique_columns(self) -> DatasetSchema:
        # Case-insensitive: SQLite column names are, and a file with both would be a trap.
        seen: dict[str, str] = {self.key.lower(): "key"}
        for group in ("identifiers", "features", "labels"):
            for i, col in enumerate(getattr(self, group)):
                where = f"{group}[{i}]"
                if col.column.lower() in seen:
                    raise ValueError(
                        f"column {col.column!r} is declared twice ({seen[col.column.lower()]} and {where})"
                    )
                seen[col.column.lower()] = where
        return self

    def columns(self) -> list[tuple[str, Role, str]]:
        """(column, role, type) for every declared column: key, identifiers, features, labels."""
        out: list[tuple[str, Role, str]] = [(self.key, "key", KEY_TYPE)]
        out += [(c.column, "identifier", c.type) for c in self.identifiers]
        out += [(c.column, "feature", c.type) for c in self.features]
        out += [(c.column, "label", c.type) for c in self.labels]
        return out


def parse_schema(raw: Any, source: str = "schema") -> DatasetSchema:
    """Validate a schema mapping; `source` (usually the file name) is named in errors.

    Raises ValidationError naming the source and the offending field.
    """
    if not isinstance(raw, dict):
        raise ValidationError(
            f"{source}: a dataset schema must be a mapping with dataset, key, identifiers, "
            "features and labels",
            file=source,
        )
    try:
        return DatasetSchema.model_validate(raw)
    except PydanticValidationError as exc:
        problems = []
        first_field = ""
        for err in exc.errors():
            field = _loc_text(err["loc"], raw)
            first_field = first_field or field
            msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
            problems.append(f"{field}: {msg}" if field else msg)
        raise ValidationError(
            f"{source}: " + "; ".join(problems), file=source, field=first_field
        ) from None


def _loc_text(loc: Sequence[Any], raw: dict[str, Any]) -> str:
    text = ""
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("column"), str):
                text += f" (column {node['column']!r})"
        else:
            text += ("." if text else "") + str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text


def load_schema(path: str | Path) -> DatasetSchema:
    """Read a schema file (YAML, or JSON if it ends in .json).

    Raises NotFound if the file does not exist, ValidationError (naming file and field) if it is
    not a valid schema.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"schema file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{p}: cannot read schema file: {exc}", file=str(p)) from None
    try:
        raw = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if p.suffix.lower() == ".json" else "YAML"
        raise ValidationError(f"{p}: not valid {kind}: {exc}", file=str(p)) from None
    return parse_schema(raw, source=str(p))


# --------------------------------------------------------------------------------------------
# Catalog (table model) and API schemas
# --------------------------------------------------------------------------------------------


class Dataset(NodeBase):
    """Catalog row: one per dataset name, describing its current version."""

    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("name", name="uq_datasets_name"),
        UniqueConstraint("table_name", name="uq_datasets_table_name"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(40), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    table_name: Mapped[str] = mapped_column(String(63), nullable=False)
    schema_json: Mapped[str] = mapped_column(Text, nullable=False)
    row_count: Mapped[int] = mapped_column(BigInteger, nullable=False)
    source_name: Mapped[str] = mapped_column(String(255), nullable=False)
    source_format: Mapped[str] = mapped_column(String(16), nullable=False)
    source_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class DatasetInfo(BaseModel):
    """What `list_datasets` reports about one dataset: its shape, never its values."""

    name: str
    version: int
    rows: int
    key: str
    identifier_types: list[str]
    features: int
    labels: int
    source_name: str
    source_format: str
    source_sha256: str
    created_at: datetime


class IngestReport(BaseModel):
    """Outcome of a successful `ingest`."""

    dataset: str
    version: int
    rows: int
    seconds: float
    ignored_columns: list[str]
    replaced_version: int | None = None
    source_sha256: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rows_per_second(self) -> float:
        return round(self.rows / self.seconds, 1) if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Reading the source file
# --------------------------------------------------------------------------------------------

_CSV_SUFFIXES = {".csv": ",", ".txt": ",", ".tsv": "\t"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_CSV_BLOCK_BYTES = 4 << 20


@dataclass
class _Source:
    path: Path
    fmt: Literal["csv", "parquet"]
    header: list[str]
    delimiter: str = ","
    total_rows: int | None = None  # Parquet knows it
    size: int = 0

    @property
    def file(self) -> str:
        return str(self.path)

    def line_of(self, row: int) -> int | None:
        """Line of a CSV file on which data row `row` starts (error path only: reads the file).

        Usually row + 1, but a quoted value may span lines.
        """
        if self.fmt != "csv":
            return None
        with open(self.path, newline="", encoding="utf-8-sig", errors="replace") as fh:
            reader = csv.reader(fh, delimiter=self.delimiter)
            next(reader, None)
            start = reader.line_num + 1
            i = 0
            for fields in reader:
                if fields:  # blank lines are skipped, as pyarrow does
                    i += 1
                    if i == row:
                        return start
                start = reader.line_num + 1
        return None

    def where(self, row: int) -> tuple[str, int | None]:
        """("row N (line L)", L) for CSV, ("row N", None) for Parquet."""
        line = self.line_of(row)
        return (f"row {row} (line {line})" if line is not None else f"row {row}"), line


def _open_source(path: Path) -> _Source:
    if not path.is_file():
        raise NotFound(f"data file not found: {path}")
    suffix = path.suffix.lower()
    size = path.stat().st_size
    if suffix in _PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise ValidationError(
                f"{path}: not a readable Parquet file: {exc}", file=str(path)
            ) from None
        return _Source(
            path, "parquet", list(pf.schema_arrow.names), total_rows=pf.metadata.num_rows, size=size
        )
    if suffix in _CSV_SUFFIXES:
        delimiter = _CSV_SUFFIXES[suffix]
        header = _csv_header(path, delimiter)
        return _Source(path, "csv", header, delimiter=delimiter, size=size)
    raise ValidationError(
        f"{path}: unsupported data file type {suffix or '(none)'!r}; use .csv, .tsv or .parquet",
        file=str(path),
    )


def _csv_header(path: Path, delimiter: str) -> list[str]:
    with open(path, "rb") as fh:
        first = fh.readline()
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValidationError(
            f"{path}: line 1 (header) is not UTF-8; save the file as UTF-8",
            file=str(path),
            row=0,
            line=1,
        ) from None
    header = next(csv.reader([text], delimiter=delimiter), None)
    if not header or header == [""]:
        raise ValidationError(
            f"{path}: the file is empty (no header line)", file=str(path), row=0, line=1
        )
    return header


def _csv_batches(src: _Source, columns: list[str]) -> Iterator[tuple[pa.RecordBatch, float]]:
    import pyarrow.csv as pcsv

    read = pcsv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=True)
    # Quoted values may span lines (measured: no slower here); blank lines are skipped, and the
    # error path's csv-module scans count rows the same way.
    parse = pcsv.ParseOptions(
        delimiter=src.delimiter, newlines_in_values=True, ignore_empty_lines=True
    )
    # Everything declared is read as text and converted here, so that e.g. phone numbers keep
    # their leading zeros / '+' and bad values can be reported by row.
    convert = pcsv.ConvertOptions(
        include_columns=columns,
        column_types={c: pa.string() for c in columns},
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        null_values=[""],
    )
    rows_read = 0
    stream = pa.OSFile(str(src.path))
    try:
        try:
            reader = pcsv.open_csv(
                stream, read_options=read, parse_options=parse, convert_options=convert
            )
            for batch in reader:
                rows_read += batch.num_rows
                yield batch, min(stream.tell() / max(src.size, 1), 1.0)
        except pa.ArrowInvalid as exc:
            _raise_csv_error(src, rows_read, exc)
    finally:
        stream.close()


def _raise_csv_error(src: _Source, rows_read: int, exc: Exception) -> NoReturn:
    """Turn a pyarrow CSV error into one that names the line, without echoing row content."""
    msg = str(exc)
    if "UTF8" in msg or "UTF-8" in msg:
        with open(src.path, "rb") as fh:
            for line, raw in enumerate(fh, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValidationError(
                        f"{src.file}: line {line} is not valid UTF-8; save the file as UTF-8",
                        file=src.file,
                        line=line,
                    ) from None
        raise ValidationError(
            f"{src.file}: not valid UTF-8; save the file as UTF-8", file=src.file
        ) from None
    # pyarrow does not say which row broke; find it with the csv module (error path only).
    width = len(src.header)
    with open(src.path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh, delimiter=src.delimiter)
        next(reader, None)
        start = reader.line_num + 1
        row = 0
        for fields in reader:
            if not fields:  # blank line, skipped
                start = reader.line_num + 1
                continue
            row += 1
            if len(fields) != width:
                raise ValidationError(
                    f"{src.file}: row {row} (line {start}): expected {width} fields as in the header, "
                    f"found {len(fields)}",
                    file=src.file,
                    row=row,
                    line=start,
                ) from None
            start = reader.line_num + 1
    cleaned = re.sub(r"(got \d+ columns?)\s*:.*", r"\1", msg, flags=re.DOTALL)
    raise ValidationError(
        f"{src.file}: cannot parse CSV after data row {rows_read}: {cleaned}", file=src.file
    ) from None


def _parquet_batches(
    src: _Source, columns: list[str], chunk_rows: int
) -> Iterator[tuple[pa.RecordBatch, float]]:
    import pyarrow.parquet as pq

    total = max(src.total_rows or 0, 1)
    done = 0
    try:
        pf = pq.ParquetFile(src.path)
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            done += batch.num_rows
            yield batch, min(done / total, 1.0)
    except (pa.ArrowException, OSError) as exc:
        raise ValidationError(
            f"{src.file}: cannot read Parquet data after row {done}: {exc}", file=src.file
        ) from None


def _chunks(
    batches: Iterator[tuple[pa.RecordBatch, float]], chunk_rows: int
) -> Iterator[tuple[pa.Table, float]]:
    """Regroup reader batches into tables of exactly `chunk_rows` rows (the last one fewer)."""
    pending: pa.Table | None = None
    fraction = 0.0
    for batch, fraction in batches:
        if batch.num_rows == 0:
            continue
        table = pa.Table.from_batches([batch])
        pending = table if pending is None else pa.concat_tables([pending, table])
        while pending.num_rows >= chunk_rows:
            yield pending.slice(0, chunk_rows), fraction
            pending = pending.slice(chunk_rows)
    if pending is not None and pending.num_rows:
        yield pending, fraction


# --------------------------------------------------------------------------------------------
# Validation and conversion (vectorised, per chunk)
# --------------------------------------------------------------------------------------------

_SQL_TYPES: dict[str, Callable[[], TypeEngine[Any]]] = {
    "string": Text,  # key
    "phone": Text,
    "email": Text,
    "openid": Text,
    "unionid": Text,
    "platform_id": Text,
    "phone_md5": Text,
    "phone_sha256": Text,
    "category": Text,
    "int": BigInteger,
    "float": Double,
    "bool": Boolean,
    "date": Date,
    "binary": SmallInteger,
}

_TRUE = pa.array(["true", "1", "yes"])
_FALSE = pa.array(["false", "0", "no"])
_INT64_LIMIT = 2.0**63


@dataclass(frozen=True)
class _Col:
    name: str
    role: Role
    type: str

    @property
    def conv(self) -> str:
        """Which converter: text, int, float, bool, date or binary."""
        if self.role in ("key", "identifier") or self.type in ("string", "category"):
            return "text"
        return self.type


def _plan(schema: DatasetSchema) -> list[_Col]:
    return [_Col(name, role, typ) for name, role, typ in schema.columns()]


class _BadValues(Exception):
    """Raised by a converter: positions (in the chunk) of bad values and why."""

    def __init__(self, positions: np.ndarray, reason: str) -> None:
        super().__init__(reason)
        self.positions = positions
        self.reason = reason


def _plain(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_null(arr.type):  # an all-null Parquet column has no value type
        return pa.nulls(len(arr), pa.string())
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    return arr


def _where(mask: Any) -> np.ndarray:
    """Positions where a (possibly null-bearing) boolean arrow array / numpy mask is true."""
    if isinstance(mask, (pa.Array, pa.ChunkedArray)):
        mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
    return np.flatnonzero(mask)


def _null_mask(arr: pa.Array) -> np.ndarray:
    return arr.is_null().to_numpy(zero_copy_only=False)


def _to_text(arr: pa.Array) -> pa.Array:
    t = arr.type
    if pa.types.is_string(t):
        out = arr
    elif pa.types.is_floating(t):
        # Numbers stored as floats (e.g. phone 13800138000.0) are written without ".0" when whole.
        vals = arr.to_numpy(zero_copy_only=False)
        whole = np.isfinite(vals) & (np.floor(vals) == vals) & (np.abs(vals) < 2**53)
        ok = whole | _null_mask(arr)
        out = (
            pc.cast(pc.cast(arr, pa.int64(), safe=False), pa.string())
            if ok.all()
            else pc.cast(arr, pa.string())
        )
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        try:
            out = pc.cast(arr, pa.string())
        except pa.ArrowInvalid:
            raise _BadValues(np.arange(len(arr)), "value is not valid UTF-8 text") from None
    elif (
        pa.types.is_integer(t)
        or pa.types.is_boolean(t)
        or pa.types.is_temporal(t)
        or pa.types.is_decimal(t)
    ):
        out = pc.cast(arr, pa.string())
    else:
        raise _BadValues(np.arange(len(arr)), f"cannot store a column of type {t} as text")
    nul = pc.match_substring(out, "\x00")
    if pc.any(nul).as_py():  # PostgreSQL cannot store it; refuse on every database alike
        raise _BadValues(_where(nul), "text contains a NUL character")
    return pc.if_else(pc.equal(out, ""), pa.scalar(None, pa.string()), out)


def _text_to_float(arr: pa.Array) -> np.ndarray:
    """float64 values of a text column (NaN where null); bad text raises _BadValues."""
    try:
        return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        pass
    text = pd.Series(pc.utf8_trim_whitespace(arr).to_numpy(zero_copy_only=False), dtype=object)
    num = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    lowered = text.str.lower()
    bad = np.isnan(num) & text.notna().to_numpy() & ~lowered.isin(["nan", ""]).to_numpy()
    if bad.any():
        raise _BadValues(np.flatnonzero(bad), "not a number")
    return num


def _numeric_values(arr: pa.Array) -> np.ndarray:
    """float64 view of any numeric/bool/text column, NaN where null."""
    t = arr.type
    if pa.types.is_string(t):
        return _text_to_float(arr)
    if (
        pa.types.is_integer(t)
        or pa.types.is_boolean(t)
        or pa.types.is_floating(t)
        or pa.types.is_decimal(t)
    ):
        return pc.cast(arr, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    raise _BadValues(np.arange(len(arr)), f"a column of type {t} is not numeric")


def _to_float(arr: pa.Array) -> pa.Array:
    vals = _numeric_values(arr)
    inf = np.isinf(vals)
    if inf.any():
        raise _BadValues(np.flatnonzero(inf), "not a finite number")
    return pa.array(vals, type=pa.float64(), from_pandas=True)  # NaN -> null


def _to_int(arr: pa.Array) -> pa.Array:
    t = arr.type
    if pa.types.is_string(t):
        try:
            return pc.cast(arr, pa.int64())
        except pa.ArrowInvalid:
            pass
    elif pa.types.is_integer(t):
        if pa.types.is_uint64(t):
            too_big = pc.greater(arr, pa.scalar(2**63 - 1, pa.uint64()))
            if pc.any(too_big).as_py():
                raise _BadValues(_where(too_big), "integer out of range (64-bit)")
        return pc.cast(arr, pa.int64())
    elif pa.types.is_boolean(t):
        return pc.cast(arr, pa.int64())
    vals = _numeric_values(arr)
    nulls = np.isnan(vals)
    with np.errstate(invalid="ignore"):
        bad = ~nulls & (~np.isfinite(vals) | (np.floor(vals) != vals))
    if bad.any():
        raise _BadValues(np.flatnonzero(bad), "not an integer")
    big = ~nulls & (np.abs(vals) >= min(_INT64_LIMIT, 2.0**53))
    if big.any():
        # Beyond 2**53 a float no longer holds every integer exactly.
        raise _BadValues(
            np.flatnonzero(big), "integer too large to read exactly (write it without decimals)"
        )
    return pa.array(np.where(nulls, 0, vals).astype(np.int64), type=pa.int64(), mask=nulls)


def _to_bool(arr: pa.Array) -> pa.Array:
    t = arr.type
    if pa.types.is_boolean(t):
        return arr
    if pa.types.is_string(t):
        norm = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
        is_true = pc.is_in(norm, value_set=_TRUE)
        is_false = pc.is_in(norm, value_set=_FALSE)
        bad = pc.and_(pc.is_valid(norm), pc.invert(pc.or_(is_true, is_false)))
        if pc.any(bad).as_py():
            raise _BadValues(_where(bad), "not a boolean (use true/false, 1/0 or yes/no)")
        return pc.if_else(pc.is_valid(norm), is_true, pa.scalar(None, pa.bool_()))
    vals = _numeric_values(arr)
    nulls = np.isnan(vals)
    bad = ~nulls & (vals != 0) & (vals != 1)
    if bad.any():
        raise _BadValues(np.flatnonzero(bad), "not a boolean (use true/false, 1/0 or yes/no)")
    return pa.array(vals == 1, type=pa.bool_(), mask=nulls)


def _to_binary(arr: pa.Array) -> pa.Array:
    vals = _numeric_values(arr)
    nulls = np.isnan(vals)
    bad = ~nulls & (vals != 0) & (vals != 1)
    if bad.any():
        raise _BadValues(np.flatnonzero(bad), "binary label must be 0 or 1")
    return pa.array(np.where(nulls, 0, vals).astype(np.int64), type=pa.int64(), mask=nulls)


_DATE_START = re.compile(r"^\d{4}-\d{1,2}-\d{1,2}")


def _to_date(arr: pa.Array) -> pa.Array:
    t = arr.type
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        return pc.cast(arr, pa.date32(), safe=False)
    if not pa.types.is_string(t):
        raise _BadValues(np.arange(len(arr)), f"a column of type {t} is not a date")
    try:
        return pc.cast(arr, pa.date32())
    except pa.ArrowInvalid:
        pass
    # Slower, more forgiving: surrounding blanks, YYYY/MM/DD, a time part (dropped).
    norm = pc.replace_substring(pc.utf8_trim_whitespace(arr), "/", "-")
    for target in (pa.date32(), pa.timestamp("s")):
        try:
            return pc.cast(pc.cast(norm, target), pa.date32(), safe=False)
        except pa.ArrowInvalid:
            pass
    text = pd.Series(norm.to_numpy(zero_copy_only=False), dtype=object)
    parsed = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True)
    shaped = text.str.match(_DATE_START.pattern).fillna(False).astype(bool).to_numpy()
    bad = text.notna().to_numpy() & (parsed.isna().to_numpy() | ~shaped)
    if bad.any():
        raise _BadValues(np.flatnonzero(bad), "not a date (use YYYY-MM-DD)")
    return pa.array(parsed.dt.date.to_numpy(dtype=object), type=pa.date32(), from_pandas=True)


_CONVERTERS: dict[str, Callable[[pa.Array], pa.Array]] = {
    "text": _to_text,
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "date": _to_date,
    "binary": _to_binary,
}


class _Checker:
    """Validates chunks; remembers key hashes to find duplicates across chunks."""

    def __init__(self, src: _Source, cols: list[_Col]) -> None:
        self.src = src
        self.cols = cols
        self.key_hashes = np.empty(0, dtype=np.uint64)
        self.key_rows = np.empty(0, dtype=np.int64)

    def fail(
        self,
        col: _Col,
        first_row: int,
        n_rows: int,
        positions: np.ndarray,
        reason: str,
        raw: pa.Array | None,
    ) -> NoReturn:
        i = int(positions[0])
        row = first_row + i
        where, line = self.src.where(row)
        msg = f"{self.src.file}: {where}, column {col.name!r}: {reason}"
        # Key and identifier values are personal data: never echoed.
        if raw is not None and col.role in ("feature", "label"):
            value = raw[i].as_py()
            if value is not None:
                shown = str(value)
                msg += f" (got {shown[:40] + '...' if len(shown) > 40 else shown!r})"
        if len(positions) > 1:
            msg += f"; {len(positions) - 1} more such row(s) among rows {first_row}-{first_row + n_rows - 1}"
        details: dict[str, Any] = {"file": self.src.file, "row": row, "column": col.name}
        if line is not None:
            details["line"] = line
        raise ValidationError(msg, **details)

    def convert(self, chunk: pa.Table, first_row: int) -> pa.Table:
        out: list[pa.Array] = []
        for col in self.cols:
            raw = _plain(chunk.column(col.name))
            try:
                arr = _CONVERTERS[col.conv](raw)
            except _BadValues as bad:
                self.fail(col, first_row, len(raw), bad.positions, bad.reason, raw)
            out.append(arr)
        return pa.Table.from_arrays(out, names=[c.name for c in self.cols])

    def check_keys(
        self, keys: pa.Array, first_row: int, exists: Callable[[list[str]], set[str]]
    ) -> None:
        key_col = self.cols[0]
        nulls = _null_mask(keys)
        if nulls.any():
            self.fail(key_col, first_row, len(keys), np.flatnonzero(nulls), "key is empty", None)
        values = keys.to_numpy(zero_copy_only=False)
        series = pd.Series(values, dtype=object)
        dup = series.duplicated(keep="first").to_numpy()
        if dup.any():
            i = int(np.flatnonzero(dup)[0])
            j = int(np.flatnonzero((series == values[i]).to_numpy())[0])
            self.fail(
                key_col,
                first_row,
                len(keys),
                np.array([i]),
                f"duplicate key (same as row {first_row + j})",
                None,
            )
        hashes = pd.util.hash_array(values, categorize=False)  # keys are unique: no gain
        if len(self.key_hashes):
            pos = np.searchsorted(self.key_hashes, hashes).clip(max=len(self.key_hashes) - 1)
            hit = np.flatnonzero(self.key_hashes[pos] == hashes)
            if len(hit):
                # 64-bit hashes can collide: confirm against the rows already written.
                present = exists([values[i] for i in hit])
                real = [i for i in hit if values[i] in present]
                if real:
                    i = int(real[0])
                    earlier = int(self.key_rows[pos[i]])
                    self.fail(
                        key_col,
                        first_row,
                        len(keys),
                        np.array([i]),
                        f"duplicate key (same as row {earlier})",
                        None,
                    )
        rows = np.arange(first_row, first_row + len(values), dtype=np.int64)
        all_hashes = np.concatenate([self.key_hashes, hashes])
        order = np.argsort(all_hashes, kind="stable")
        self.key_hashes = all_hashes[order]
        self.key_rows = np.concatenate([self.key_rows, rows])[order]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _content_table(table_name: str, cols: Sequence[_Col]) -> Table:
    return Table(
        table_name,
        MetaData(),
        *[Column(c.name, _SQL_TYPES[c.type](), nullable=c.role != "key") for c in cols],
    )


def _pylist(arr: pa.Array) -> list[Any]:
    """Python values for the sqlite3 driver (None for null; dates as ISO text, as SQLAlchemy stores them)."""
    if pa.types.is_date(arr.type):
        arr = pc.cast(arr, pa.string())
    if arr.null_count == 0 or pa.types.is_string(arr.type):
        return arr.to_numpy(zero_copy_only=False).tolist()
    nulls = _null_mask(arr)
    values = pc.fill_null(
        arr, pa.scalar(0 if not pa.types.is_boolean(arr.type) else False, arr.type)
    )
    obj = values.to_numpy(zero_copy_only=False).astype(object)
    obj[nulls] = None
    return obj.tolist()


_SQLITE_SLICE_ROWS = 50_000


class _Writer:
    """Appends converted chunks to the content table with the fastest path of the driver."""

    def __init__(self, conn: Connection, table: Table) -> None:
        self.conn = conn
        self.table = table
        quote = conn.dialect.identifier_preparer.quote
        self.qtable = quote(table.name)
        self.qcols = ", ".join(quote(c.name) for c in table.columns)
        self.kind = conn.dialect.name
        driver = conn.dialect.driver
        if (
            self.kind == "postgresql"
            and driver != "psycopg"
            or self.kind not in ("sqlite", "postgresql")
        ):
            self.kind = "generic"

    def write(self, chunk: pa.Table) -> None:
        if self.kind == "sqlite":
            marks = ", ".join("?" for _ in self.table.columns)
            sql = f"INSERT INTO {self.qtable} ({self.qcols}) VALUES ({marks})"
            cur = self.conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                # Python objects cost ~50x their Arrow size: convert a slice at a time.
                for start in range(0, chunk.num_rows, _SQLITE_SLICE_ROWS):
                    part = chunk.slice(start, _SQLITE_SLICE_ROWS)
                    columns = [_pylist(c.combine_chunks()) for c in part.columns]
                    cur.executemany(sql, zip(*columns, strict=True))
            finally:
                cur.close()
        elif self.kind == "postgresql":
            import pyarrow.csv as pcsv

            buf = io.BytesIO()
            # Nulls are written as unquoted empty fields, which COPY's CSV format reads as NULL;
            # text is always quoted, so no text value can be mistaken for NULL.
            pcsv.write_csv(
                chunk, buf, pcsv.WriteOptions(include_header=False, quoting_style="needed")
            )
            raw = self.conn.connection.dbapi_connection
            with raw.cursor() as cur:  # type: ignore[union-attr]
                with cur.copy(f"COPY {self.qtable} ({self.qcols}) FROM STDIN (FORMAT csv)") as copy:
                    copy.write(buf.getbuffer())
        else:
            names = [c.name for c in self.table.columns]
            cols = [_pylist(chunk.column(i).combine_chunks()) for i in range(chunk.num_columns)]
            self.conn.execute(
                self.table.insert(),
                [dict(zip(names, r, strict=True)) for r in zip(*cols, strict=True)],
            )

    def existing_keys(self, keys: list[str]) -> set[str]:
        key = self.table.columns[0]
        found: set[str] = set()
        for i in range(0, len(keys), 500):
            found.update(self.conn.execute(select(key).where(key.in_(keys[i : i + 500]))).scalars())
        return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _begin(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        # pysqlite defers BEGIN to the first DML, so CREATE TABLE would run outside the
        # transaction and survive a rollback. Take the write lock up front instead.
        raw = conn.connection.dbapi_connection
        if not raw.in_transaction:  # type: ignore[union-attr]
            try:
                raw.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
            except (
                conn.dialect.loaded_dbapi.OperationalError
            ) as exc:  # locked past the busy timeout
                raise Conflict(
                    f"the node database is busy (another write is running): {exc}"
                ) from None


def ingest(
    engine: Engine,
    data_path: str | Path,
    schema: DatasetSchema,
    *,
    replace: bool = False,
    chunk_rows: int = 200_000,
    progress: Callable[[int, float], None] | None = None,
) -> IngestReport:
    """Load a CSV/TSV or Parquet file into the node database under `schema`, atomically.

    Declared columns are validated and converted chunk by chunk; undeclared columns are not
    read (they are reported in `ignored_columns`). If the dataset exists, `replace=True` makes a
    new version that replaces the old one in the same transaction; otherwise Conflict.
    `progress(rows_done, fraction_done)` is called after each chunk.

    Raises NotFound (missing file), ValidationError (naming file, row and column), Conflict.
    The catalog table must exist (migrations / `NodeBase.metadata.create_all`).
    """
    started = time.perf_counter()
    path = Path(data_path)
    if chunk_rows < 1:
        raise ValidationError("chunk_rows must be at least 1")
    src = _open_source(path)
    cols = _plan(schema)
    names = [c.name for c in cols]

    counts: dict[str, int] = {}
    for n in src.header:
        counts[n] = counts.get(n, 0) + 1
    twice = [n for n in names if counts.get(n, 0) > 1]
    if twice:
        raise ValidationError(
            f"{src.file}: line 1 (header): column(s) {', '.join(map(repr, twice))} appear more than once",
            file=src.file,
            row=0,
            line=1,
            column=twice[0],
        )
    missing = [n for n in names if n not in counts]
    if missing:
        raise ValidationError(
            f"{src.file}: {'line 1 (header)' if src.fmt == 'csv' else 'columns'}: declared column(s) "
            f"{', '.join(map(repr, missing))} missing from the file",
            file=src.file,
            row=0,
            column=missing[0],
            missing=missing,
        )
    declared = set(names)
    ignored = [n for n in src.header if n not in declared]
    sha = _sha256(path)
    batches = (
        _csv_batches(src, names) if src.fmt == "csv" else _parquet_batches(src, names, chunk_rows)
    )

    catalog = Dataset.__table__
    with engine.connect() as conn:
        try:
            _begin(conn)
            query = select(catalog).where(catalog.c.name == schema.dataset)
            if conn.dialect.name == "postgresql":
                query = (
                    query.with_for_update()
                )  # a concurrent replace waits, then makes the next version
            try:
                old = conn.execute(query).one_or_none()
            except (OperationalError, ProgrammingError) as exc:  # no catalog table
                reason = str(exc.orig).splitlines()[0]
                raise ConfigurationError(
                    f"cannot read the dataset catalog ({reason}); bring the node database to the "
                    "newest schema first (party_node.storage.ensure_schema)"
                ) from exc
            if old is not None and not replace:
                raise Conflict(
                    f"dataset {schema.dataset!r} already exists (version {old.version}, {old.row_count} rows); "
                    "use --replace to load a new version in its place"
                )
            version = old.version + 1 if old is not None else 1
            table = _content_table(f"{DATA_TABLE_PREFIX}{schema.dataset}_v{version}", cols)
            try:
                table.create(conn)
            except DBAPIError as exc:  # e.g. a concurrent ingest of a new dataset by this name
                raise Conflict(
                    f"cannot create table {table.name!r} for dataset {schema.dataset!r}: it exists already "
                    "(another ingest of this dataset running?)"
                ) from exc
            writer = _Writer(conn, table)
            checker = _Checker(src, cols)
            rows = 0
            for chunk, fraction in _chunks(batches, chunk_rows):
                converted = checker.convert(chunk, rows + 1)
                checker.check_keys(
                    converted.column(0).combine_chunks(), rows + 1, writer.existing_keys
                )
                try:
                    writer.write(converted)
                except (DBAPIError, conn.dialect.loaded_dbapi.Error) as exc:
                    raise _db_rejected(src, rows + 1, rows + chunk.num_rows, exc) from None
                rows += chunk.num_rows
                if progress is not None:
                    progress(rows, fraction)
            quote = conn.dialect.identifier_preparer.quote
            conn.exec_driver_sql(
                f"CREATE UNIQUE INDEX {quote('ix_' + table.name + '_key')} "
                f"ON {quote(table.name)} ({quote(schema.key)})"
            )
            record = {
                "version": version,
                "table_name": table.name,
                "schema_json": schema.model_dump_json(),
                "row_count": rows,
                "source_name": path.name,
                "source_format": src.fmt,
                "source_sha256": sha,
                "created_at": datetime.now(timezone.utc),
            }
            if old is None:
                try:
                    conn.execute(catalog.insert().values(name=schema.dataset, **record))
                except IntegrityError as exc:
                    raise _concurrent(schema.dataset) from exc
            else:
                done = conn.execute(
                    catalog.update()
                    .where(catalog.c.id == old.id, catalog.c.version == old.version)
                    .values(**record)
                )
                if done.rowcount != 1:
                    raise Conflict(
                        f"dataset {schema.dataset!r} was changed by another ingest; try again"
                    )
                conn.exec_driver_sql(f"DROP TABLE {quote(old.table_name)}")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    if progress is not None:
        progress(rows, 1.0)
    return IngestReport(
        dataset=schema.dataset,
        version=version,
        rows=rows,
        seconds=round(time.perf_counter() - started, 3),
        ignored_columns=ignored,
        replaced_version=old.version if old is not None else None,
        source_sha256=sha,
    )


def _concurrent(name: str) -> Conflict:
    return Conflict(
        f"dataset {name!r} was created by another ingest at the same time; use --replace to load a new version"
    )


def _db_rejected(src: _Source, first: int, last: int, exc: Exception) -> ValidationError:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    diag = getattr(orig, "diag", None)
    reason = getattr(diag, "message_primary", None) or str(orig).splitlines()[0]
    return ValidationError(
        f"{src.file}: the database rejected a value in rows {first}-{last}: {reason}",
        file=src.file,
        row=first,
    )


# --------------------------------------------------------------------------------------------
# Reading the catalog and the data
# --------------------------------------------------------------------------------------------


def _record(session_or_conn: Session | Connection, name: str) -> Any:
    catalog = Dataset.__table__
    rec = session_or_conn.execute(select(catalog).where(catalog.c.name == name)).one_or_none()
    if rec is None:
        raise NotFound(f"no dataset named {name!r} at this node")
    return rec


def list_datasets(session: Session) -> list[DatasetInfo]:
    """Every dataset at this node (current versions), by name. Shapes only, never values."""
    out = []
    for rec in session.execute(select(Dataset).order_by(Dataset.name)).scalars():
        schema = DatasetSchema.model_validate_json(rec.schema_json)
        out.append(
            DatasetInfo(
                name=rec.name,
                version=rec.version,
                rows=rec.row_count,
                key=schema.key,
                identifier_types=[c.type for c in schema.identifiers],
                features=len(schema.features),
                labels=len(schema.labels),
                source_name=rec.source_name,
                source_format=rec.source_format,
                source_sha256=rec.source_sha256,
                created_at=rec.created_at,
            )
        )
    return out


def describe(session: Session, name: str) -> dict[str, Any]:
    """The schema of a dataset: name, version, row count and its columns (no values).

    Raises NotFound for an unknown dataset.
    """
    rec = _record(session, name)
    schema = DatasetSchema.model_validate_json(rec.schema_json)
    return {
        "dataset": rec.name,
        "version": rec.version,
        "rows": rec.row_count,
        "columns": [{"column": c, "role": role, "type": t} for c, role, t in schema.columns()],
    }


def dataset_table_name(session: Session, name: str) -> str:
    """Name of the content table holding the current version of `name`; NotFound if unknown."""
    return str(_record(session, name).table_name)


def load_frame(engine: Engine, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The current version of a dataset as a DataFrame (all declared columns, or `columns`).

    dtypes: text -> str, int/binary -> Int64, float -> float64, bool -> boolean, date ->
    datetime64. Raises NotFound for an unknown dataset or column.
    """
    with engine.connect() as conn:
        rec = _record(conn, name)
        cols = _plan(DatasetSchema.model_validate_json(rec.schema_json))
        by_name = {c.name: c for c in cols}
        if columns is not None:
            if not columns:
                raise ValidationError("load_frame: name at least one column (or None for all)")
            unknown = [c for c in columns if c not in by_name]
            if unknown:
                raise NotFound(
                    f"dataset {name!r} has no column(s) {', '.join(map(repr, unknown))}; "
                    f"it has {', '.join(by_name)}"
                )
            cols = [by_name[c] for c in columns]
        quote = conn.dialect.identifier_preparer.quote
        sql = f"SELECT {', '.join(quote(c.name) for c in cols)} FROM {quote(rec.table_name)}"
        rows = conn.exec_driver_sql(sql).fetchall()
    data: dict[str, Any] = {}
    columns_values = list(zip(*rows, strict=True)) if rows else [() for _ in cols]
    for col, values in zip(cols, columns_values, strict=True):
        if col.conv == "text":
            data[col.name] = pd.array(values, dtype="str")
        elif col.conv in ("int", "binary"):
            data[col.name] = pd.array(values, dtype="Int64")
        elif col.conv == "float":
            data[col.name] = np.array(
                [math.nan if v is None else v for v in values], dtype=np.float64
            )
        elif col.conv == "bool":
            data[col.name] = pd.array(
                [None if v is None else bool(v) for v in values], dtype="boolean"
            )
        else:  # date: ISO text on SQLite, date objects on PostgreSQL
            data[col.name] = pd.to_datetime(
                pd.Series([None if v is None else str(v) for v in values], dtype=object),
                format="%Y-%m-%d",
            )
    return pd.DataFrame(data, columns=[c.name for c in cols])
