"""Import consent events from CSV or JSON Lines (optionally gzip-compressed).

Columns / keys: event_id, subject, identifier, purpose, recipient, action, channel,
notice_version, valid_from, valid_until, received_at, and optionally legal_basis and actor.
Empty cells mean "not given". The whole file is one transaction and idempotent by event_id:
importing the same file again records nothing new.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import IO, Any, Iterator

from pydantic import ValidationError as PydanticValidationError

from confide.errors import ValidationError
from consent.schemas import ConsentEventIn, NoticeIn
from consent.schemas import RecordResult
from consent.store import ConsentStore, pydantic_error

COLUMNS = (
    "event_id", "subject", "identifier", "purpose", "recipient", "action", "channel",
    "notice_version", "valid_from", "valid_until", "received_at",
)
OPTIONAL_COLUMNS = ("legal_basis", "actor")
_REQUIRED = ("event_id", "subject", "purpose", "action", "channel")


def import_file(store: ConsentStore, path: Path | str) -> RecordResult:
    """Record every event in `path` (see the module docstring). Raises ValidationError naming
    the file, line and field of the first bad row; nothing is written then."""
    return store.import_events(read_events(path))


def read_events(path: Path | str) -> Iterator[tuple[str, ConsentEventIn]]:
    """(label, event) for each row of a CSV or JSONL file; label is `FILE line N`."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"file: {path} does not exist", field="file")
    kind = _kind(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:  # type: ignore[operator]
        if kind == "csv":
            yield from _csv_rows(path.name, fh)
        else:
            yield from _jsonl_rows(path.name, fh)


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


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if v is not None and v != ""}


def _parse(label: str, row: dict[str, Any]) -> tuple[str, ConsentEventIn]:
    try:
        return label, ConsentEventIn.model_validate(row)
    except PydanticValidationError as exc:
        raise pydantic_error(exc, label) from None


def _csv_rows(name: str, fh: IO[str]) -> Iterator[tuple[str, ConsentEventIn]]:
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
    width = len(header)
    validate = ConsentEventIn.model_validate
    for lineno, values in enumerate(reader, start=2):
        if len(values) != width:
            if not values:
                continue
            raise ValidationError(
                f"{name} line {lineno}: expected {width} fields, found {len(values)}", field=f"line {lineno}"
            )
        row = {k: v for k, v in zip(header, values) if v}
        try:
            yield f"{name} line {lineno}", validate(row)
        except PydanticValidationError as exc:
            raise pydantic_error(exc, f"{name} line {lineno}") from None


def _jsonl_rows(name: str, fh: IO[str]) -> Iterator[tuple[str, ConsentEventIn]]:
    for lineno, line in enumerate(fh, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{name} line {lineno}: not valid JSON ({exc.msg})", field=f"line {lineno}") from None
        if not isinstance(obj, dict):
            raise ValidationError(f"{name} line {lineno}: expected a JSON object", field=f"line {lineno}")
        yield _parse(f"{name} line {lineno}", _clean(obj))


def write_csv(rows: list[dict[str, Any]], fh: IO[str] | io.StringIO) -> None:
    """Write event dicts in the import format (used by tests and the benchmark)."""
    w = csv.DictWriter(fh, fieldnames=list(COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
