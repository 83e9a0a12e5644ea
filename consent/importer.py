"""Import consent events from CSV or JSON Lines (optionally gzip-compressed).

Columns / keys: event_id, subject, identifier, purpose, recipient, action, channel,
notice_version, valid_from, valid_until, received_at, and optionally legal_basis and actor.
Empty cells mean "not given". The whole file is one transaction and idempotent by event_id:
importing the same file again records nothing new.

The file is read here in chunks of raw lines (`read_chunks`); parsing and validating them is
part of preparing a chunk (`consent.prepare`), which a big import runs in worker processes.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
from pathlib import Path
from typing import IO, Any, Iterator

from pydantic import ValidationError as PydanticValidationError

from confide.errors import ValidationError
from consent import store as _store
from consent.prepare import pydantic_error
from consent.schemas import NoticeIn, RecordResult
from consent.store import ConsentStore

COLUMNS = (
    "event_id", "subject", "identifier", "purpose", "recipient", "action", "channel",
    "notice_version", "valid_from", "valid_until", "received_at",
)
OPTIONAL_COLUMNS = ("legal_basis", "actor")
_REQUIRED = ("event_id", "subject", "purpose", "action", "channel")


def import_file(store: ConsentStore, path: Path | str) -> RecordResult:
    """Record every event in `path` (see the module docstring). Raises ValidationError naming
    the file, line and field of the first bad row; nothing is written then."""
    return store.import_chunks(read_chunks(path))


def read_chunks(path: Path | str, size: int | None = None) -> Iterator[tuple[Any, ...]]:
    """The raw chunks of a CSV or JSONL file, `size` lines each (default: the store's import
    chunk), in the forms `consent.prepare` describes. The CSV header is checked here."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"file: {path} does not exist", field="file")
    kind = _kind(path)
    size = size or _store._IMPORT_CHUNK
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:  # type: ignore[operator]
        if kind == "csv":
            yield from _csv_chunks(path.name, fh, size)
        else:
            lineno = 1
            while block := list(itertools.islice(fh, size)):
                yield ("jsonl", path.name, lineno, "".join(block))
                lineno += len(block)


def read_notices(path: Path | str) -> list[NoticeIn]:
    """Notice versions from a YAML or JSON file holding one notice or a list of them."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValidationError(f"file: cannot read notices from {path}: {exc}", field="file") from exc
    items = data if isinstance(data, list) else [data]
    out = []
    for i, item in enumerate(items):
        try:
            out.append(NoticeIn.model_validate(item))
        except PydanticValidationError as exc:
            raise pydantic_error(exc, f"{path.name}[{i}]") from None
    return out


def _kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise ValidationError(f"file: {path.name}: expected a .csv or .jsonl file (optionally .gz)", field="file")


def _csv_chunks(name: str, fh: IO[str], size: int) -> Iterator[tuple[Any, ...]]:
    """Line numbers count CSV records from the header's 1 (a quoted field may span lines)."""
    reader = csv.reader(fh)
    try:
        header = next(reader)
    except StopIteration:
        return
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in COLUMNS and h not in OPTIONAL_COLUMNS]
    if unknown:
        raise ValidationError(
            f"{name}: unknown column(s) {', '.join(unknown)}; expected {', '.join(COLUMNS + OPTIONAL_COLUMNS)}",
            field="columns",
        )
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise ValidationError(f"{name}: missing column(s) {', '.join(missing)}", field="columns")
    lines = iter(fh)
    lineno = 2
    while block := list(itertools.islice(lines, size)):
        text = "".join(block)
        if '"' not in text:  # no quoting: every line is one record
            yield ("csv", name, header, lineno, text)
            lineno += len(block)
            continue
        # Quoted fields may span lines: let csv find where the block's last record ends
        # (pulling further lines if it runs on) and ship parsed records.
        records = csv.reader(itertools.chain(block, lines))
        rows = []
        for values in records:
            rows.append(values)
            if records.line_num >= len(block):
                break
        yield ("csvrows", name, header, lineno, rows)
        lineno += len(rows)


def write_csv(rows: list[dict[str, Any]], fh: IO[str] | io.StringIO) -> None:
    """Write event dicts in the import format (used by tests and the benchmark)."""
    w = csv.DictWriter(fh, fieldnames=list(COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
