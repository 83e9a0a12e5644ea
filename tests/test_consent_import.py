"""Import from CSV / JSONL: idempotent by event id, bad rows named, nothing half-written."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import func, select

from confide.db import make_engine
from confide.errors import Conflict, ValidationError
from consent.importer import COLUMNS, import_file, write_csv
from consent.models import ConsentEvent, ConsentState, SubjectKey, ensure_tables
from consent.store import ConsentStore

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _store(url: str) -> ConsentStore:
    engine = make_engine(url)
    ensure_tables(engine)
    s = ConsentStore(engine, secret_key=b"import-secret-0123456789abcdefgh", recipients={"partner"})
    s.register_notice({
        "notice": "member", "version": "member/1", "published_at": T0,
        "purposes": [
            {"purpose": "modeling", "data_categories": ["orders"]},
            {"purpose": "sharing.third_party", "recipients": ["partner"], "data_categories": ["phone"]},
        ],
    })
    return s


def _rows(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        t = (T0 + dt.timedelta(hours=i)).isoformat()
        sharing = i % 3 == 0
        rows.append({
            "event_id": f"imp-{i}", "subject": f"m{i % 7}", "identifier": f"1380000{i:04d}" if i % 2 else "",
            "purpose": "sharing.third_party" if sharing else "modeling", "recipient": "partner" if sharing else "",
            "action": "withdrawn" if i % 5 == 4 else "granted", "channel": "import",
            "notice_version": "" if i % 5 == 4 else "member/1", "valid_from": "", "valid_until": "",
            "received_at": t,
        })
    return rows


def _snapshot(s: ConsentStore) -> tuple[Any, ...]:
    with s.factory() as sess:
        events = sess.execute(select(ConsentEvent.event_id, ConsentEvent.content_hash).order_by(ConsentEvent.event_id)).all()
        state = sess.execute(
            select(ConsentState.subject_ref, ConsentState.purpose, ConsentState.event_id).order_by(
                ConsentState.subject_ref, ConsentState.purpose
            )
        ).all()
        keys = sess.scalar(select(func.count()).select_from(SubjectKey))
    return tuple(events), tuple(state), keys


def test_csv_import_is_idempotent(db_url: str, tmp_path: Path) -> None:
    s = _store(db_url)
    path = tmp_path / "events.csv"
    with path.open("w", newline="") as fh:
        write_csv(_rows(40), fh)
    first = import_file(s, path)
    snap = _snapshot(s)
    again = import_file(s, path)
    assert (first.recorded, first.duplicates) == (40, 0)
    assert (again.recorded, again.duplicates) == (0, 40)
    assert _snapshot(s) == snap
    assert len(snap[0]) == 40 and len(snap[1]) == 14 and snap[2] == 7  # 7 subjects x 2 purposes; 7 keys
    d = s.allowed([f"m{i}" for i in range(7)], "modeling.lookalike", None, T0 + dt.timedelta(days=5))
    assert d.allowed_count + d.denied_counts.get("withdrawn", 0) == 7


def test_jsonl_gz_import_matches_csv(db_url: str, tmp_path: Path) -> None:
    s = _store(db_url)
    path = tmp_path / "events.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in _rows(12):
            fh.write(json.dumps(r) + "\n")
    assert import_file(s, path).recorded == 12
    assert import_file(s, path).recorded == 0


def _write(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    path = tmp_path / "bad.csv"
    with path.open("w", newline="") as fh:
        write_csv(rows, fh)
    return path


BAD_CHANGES = [
    ({"purpose": "modeling.nope"}, "purpose"),
    ({"valid_from": "01/02/2026"}, "valid_from"),
    ({"valid_from": "2026-02-01T00:00:00", "valid_until": "2026-01-01T00:00:00"}, "valid_until"),
    ({"recipient": "stranger"}, "recipient"),
    ({"action": "grant"}, "action"),
]


def test_bad_row_is_named_and_nothing_is_written(db_url: str, tmp_path: Path) -> None:
    s = _store(db_url)
    for change, field in BAD_CHANGES:
        rows = _rows(30)
        rows[25] = {**rows[25], **change}  # data line 27 (line 1 is the header)
        with pytest.raises(ValidationError) as exc:
            import_file(s, _write(tmp_path, rows))
        assert exc.value.details["field"] == f"bad.csv line 27.{field}", exc.value.message
        assert _snapshot(s) == ((), (), 0), field


def test_conflicting_duplicate_in_file_is_refused(db_url: str, tmp_path: Path) -> None:
    s = _store(db_url)
    rows = _rows(5) + [{**_rows(5)[2], "purpose": "modeling", "recipient": "", "received_at": T0.isoformat()}]
    with pytest.raises(Conflict) as exc:
        import_file(s, _write(tmp_path, rows))
    assert "imp-2" in exc.value.message and "line 7" in exc.value.message
    assert _snapshot(s) == ((), (), 0)


def test_file_shape_errors(tmp_path: Path, db_url: str) -> None:
    s = _store(db_url)
    unknown = tmp_path / "x.csv"
    unknown.write_text(",".join(COLUMNS) + ",colour\n")
    with pytest.raises(ValidationError, match="colour"):
        import_file(s, unknown)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValidationError, match="expected a .csv or .jsonl"):
        import_file(s, tmp_path / "x.txt")
    broken = tmp_path / "y.jsonl"
    broken.write_text('{"event_id": "a"}\n{not json\n')
    with pytest.raises(ValidationError, match="line 1"):  # first row already lacks fields
        import_file(s, broken)


def test_multi_chunk_import_is_pipelined_in_order_and_all_or_nothing(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small chunks force the prepare/write pipeline through many chunks: the result equals a
    one-chunk import; a conflict found by the writer in an early chunk wins over a bad row in a
    later chunk, and nothing is written either way."""
    from consent import store as store_mod

    rows = _rows(40)
    one = _store(f"sqlite:///{tmp_path / 'one-chunk.db'}")  # the oracle: the same file in one chunk
    import_file(one, _write(tmp_path, rows))
    expected = _snapshot(one)
    monkeypatch.setattr(store_mod, "_IMPORT_CHUNK", 3)
    s = _store(db_url)
    # A repeat of an event across chunks counts as a duplicate, not an error.
    res = import_file(s, _write(tmp_path, rows + [rows[1]]))
    assert (res.recorded, res.duplicates) == (40, 1)
    assert _snapshot(s) == expected
    # Re-import with a conflicting id in chunk 2 (written by the writer thread) and a bad row in
    # chunk 9 (found while preparing): the earlier problem is reported; nothing is added.
    fresh = [{**r, "event_id": f"new-{i}"} for i, r in enumerate(rows)]
    fresh[4] = {**rows[4], "channel": "app"}  # imp-4 already recorded with other content
    fresh[26] = {**fresh[26], "purpose": "modeling.nope"}
    with pytest.raises(Conflict) as exc:
        import_file(s, _write(tmp_path, fresh))
    assert "imp-4" in exc.value.message
    assert _snapshot(s)[0] == expected[0]
    fresh[4] = {**fresh[4], "event_id": "new-4"}
    with pytest.raises(ValidationError) as bad:
        import_file(s, _write(tmp_path, fresh))
    assert bad.value.details["field"] == "bad.csv line 28.purpose"
    assert _snapshot(s)[0] == expected[0]


@pytest.mark.parametrize("remember", [2_000_000, 4])
def test_repeats_across_chunks_of_a_first_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, remember: int) -> None:
    """Into an empty table the import remembers the ids it wrote (or, past the bound, asks the
    database about every id): a repeat in a later chunk is a duplicate if identical and a
    Conflict naming its line if not."""
    from consent import store as store_mod

    monkeypatch.setattr(store_mod, "_IMPORT_CHUNK", 3)
    monkeypatch.setattr(store_mod, "_REMEMBER_IDS", remember)
    rows = _rows(12)
    s = _store(f"sqlite:///{tmp_path / 'same.db'}")
    res = import_file(s, _write(tmp_path, rows + [rows[0], rows[7]]))
    assert (res.recorded, res.duplicates) == (12, 2)
    other = _store(f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(Conflict) as exc:
        import_file(other, _write(tmp_path, rows + [{**rows[1], "channel": "app"}]))
    assert "imp-1" in exc.value.message and "line 14" in exc.value.message
    assert _snapshot(other) == ((), (), 0)


# --------------------------------------------------------------------------- worker processes


def _full_snapshot(s: ConsentStore) -> tuple[Any, ...]:
    """Every stored column except the random ones (identifier ciphertexts, batch ids, wrapped
    keys), plus the identifiers decrypted through access requests."""
    with s.factory() as sess:
        events = sess.execute(
            select(
                ConsentEvent.event_id, ConsentEvent.subject_ref, ConsentEvent.purpose, ConsentEvent.recipient,
                ConsentEvent.action, ConsentEvent.legal_basis, ConsentEvent.channel, ConsentEvent.notice_version,
                ConsentEvent.valid_from, ConsentEvent.valid_until, ConsentEvent.actor, ConsentEvent.received_at,
                ConsentEvent.content_hash, ConsentEvent.identifier_ct.is_(None),
            ).order_by(ConsentEvent.event_id)
        ).all()
        state = sess.execute(select(ConsentState).order_by(ConsentState.subject_ref, ConsentState.purpose)).scalars()
        state_rows = [
            (r.purpose, r.recipient, r.subject_ref, r.action, r.event_id, r.notice_version, r.valid_from_us,
             r.valid_until_us, r.order_key)
            for r in state
        ]
    idents = [[(e.event_id, e.identifier) for e in s.access(f"m{i}").events] for i in range(7)]
    return tuple(events), tuple(state_rows), idents


def _varied_rows(n: int) -> list[dict[str, Any]]:
    """Rows exercising every field: offsets, naive and date-only times, defaults, escapes."""
    rows = _rows(n)
    for i, r in enumerate(rows):
        if i % 4 == 1:
            r["received_at"] = (T0 + dt.timedelta(hours=i)).astimezone(dt.timezone(dt.timedelta(hours=8))).isoformat()
        if i % 6 == 2:
            r["valid_from"] = (T0 + dt.timedelta(days=1)).date().isoformat()
            r["valid_until"] = (T0 + dt.timedelta(days=30, seconds=0.25)).replace(tzinfo=None).isoformat()
        if i % 9 == 3:
            r["received_at"] = ""  # recorded at the store's clock
        r["actor"] = ["", "agent\\7", "ops\tdesk"][i % 3]
        r["legal_basis"] = ["", "consent", "contract"][i % 3]
    return rows


def _write_full(tmp_path: Path, rows: list[dict[str, Any]], name: str = "bad.csv") -> Path:
    import csv

    cols = [*COLUMNS, "legal_basis", "actor"]
    path = tmp_path / name
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    return path


def _clocked_store(url: str) -> ConsentStore:
    s = _store(url)
    s.clock = lambda: T0 + dt.timedelta(days=3)
    return s


@pytest.fixture
def second_url(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """Another empty database on the same backend as `db_url`."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'second.db'}"
        return
    from sqlalchemy import create_engine, text

    admin_url = request.getfixturevalue("pg_admin_url")
    name = f"confide_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_worker_processes_store_the_same_rows_as_in_process(
    db_url: str, second_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """A multi-chunk import prepared by worker processes stores exactly what the same import
    prepared in-process stores, column for column (and re-importing records nothing)."""
    from consent import store as store_mod

    rows = _varied_rows(60) + [_varied_rows(60)[10]]  # an identical repeat in a later chunk
    if fmt == "csv":
        path = _write_full(tmp_path, rows)
    else:
        path = tmp_path / "events.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(store_mod, "_IMPORT_CHUNK", 7)
    monkeypatch.setattr(store_mod, "_IMPORT_WORKERS", 0)
    local = _clocked_store(second_url)
    res_local = import_file(local, path)
    monkeypatch.setattr(store_mod, "_IMPORT_WORKERS", 2)
    s = _clocked_store(db_url)
    res = import_file(s, path)
    assert (res.recorded, res.duplicates) == (res_local.recorded, res_local.duplicates) == (60, 1)
    assert res.event_ids == res_local.event_ids
    assert _full_snapshot(s) == _full_snapshot(local)
    again = import_file(s, path)
    assert (again.recorded, again.duplicates) == (0, 61)


def test_bad_row_in_a_worker_chunk_fails_the_whole_import(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consent import store as store_mod

    monkeypatch.setattr(store_mod, "_IMPORT_CHUNK", 4)
    monkeypatch.setattr(store_mod, "_IMPORT_WORKERS", 2)
    s = _store(db_url)
    for change, field in BAD_CHANGES + [({"event_id": "bad id"}, "event_id"), ({"subject": "x" * 257}, "subject")]:
        rows = _rows(40)
        rows[33] = {**rows[33], **change}  # data line 35, in the ninth chunk
        with pytest.raises(ValidationError) as exc:
            import_file(s, _write(tmp_path, rows))
        assert exc.value.details["field"] == f"bad.csv line 35.{field}", exc.value.message
        assert _snapshot(s) == ((), (), 0), field
    path = _write(tmp_path, _rows(40))
    path.write_text(path.read_text().replace("imp-30,", "imp-30,extra,", 1))
    with pytest.raises(ValidationError) as exc:
        import_file(s, path)
    assert exc.value.details["field"] == "line 32" and "expected 11 fields, found 12" in exc.value.message
    assert _snapshot(s) == ((), (), 0)


def test_fast_path_errors_are_pydantics(tmp_path: Path, db_url: str) -> None:
    """A row the fast path refuses is judged by the model: the message is the model's own."""
    from pydantic import ValidationError as PydanticValidationError

    from consent.prepare import pydantic_error
    from consent.schemas import ConsentEventIn

    s = _store(db_url)
    cases = [
        {"event_id": "-starts-with-dash"}, {"event_id": "ok\n"}, {"subject": "s" * 257}, {"identifier": "i" * 257},
        {"purpose": "p" * 129}, {"recipient": "r" * 65}, {"action": "Granted"}, {"channel": "fax"},
        {"notice_version": "n" * 65}, {"received_at": "yesterday"}, {"valid_until": "2026-13-01"},
    ]
    for change in cases:
        row = {**_rows(1)[0], **change}
        with pytest.raises(ValidationError) as exc:
            import_file(s, _write(tmp_path, [row]))
        with pytest.raises(PydanticValidationError) as model_exc:
            ConsentEventIn.model_validate({k: v for k, v in row.items() if v})
        assert exc.value.message == pydantic_error(model_exc.value, "bad.csv line 2").message, change


def test_fast_path_rules_match_the_model() -> None:
    from consent import prepare
    from consent.schemas import ConsentEventIn

    props = ConsentEventIn.model_json_schema()["properties"]

    def limit(name: str) -> int:
        p = props[name]
        return next((o["maxLength"] for o in p.get("anyOf", [p]) if "maxLength" in o))

    assert set(prepare._FIELDS) == set(props)
    assert {k: limit(k) for k in prepare._MAX_LEN} == prepare._MAX_LEN
    assert set(props["action"]["enum"]) == prepare._ACTIONS
    assert set(props["channel"]["enum"]) == prepare._CHANNELS
    assert set(props["legal_basis"]["enum"]) == prepare._LEGAL_BASES
    assert props["event_id"]["pattern"] == "^" + prepare._ID_OK.__self__.pattern + "$"


def test_quoted_multiline_fields_keep_record_numbers(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quoted field may span lines: rows are numbered by CSV record, as before."""
    from consent import store as store_mod

    monkeypatch.setattr(store_mod, "_IMPORT_CHUNK", 3)
    monkeypatch.setattr(store_mod, "_IMPORT_WORKERS", 2)
    rows = _rows(12)
    rows[1] = {**rows[1], "subject": "two\nlines"}
    rows[4] = {**rows[4], "subject": "a, \"quoted\" one"}
    rows[9] = {**rows[9], "action": "grant"}
    s = _store(db_url)
    with pytest.raises(ValidationError) as exc:
        import_file(s, _write(tmp_path, rows))
    assert exc.value.details["field"] == "bad.csv line 11.action"
    rows[9] = _rows(12)[9]
    assert import_file(s, _write(tmp_path, rows)).recorded == 12
    assert [e.event_id for e in s.history("two\nlines")] == ["imp-1"]


def test_reimport_overlapping_a_recorded_file(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file sharing some events with what is stored records only the new ones, and the
    projection ends as if everything had been imported at once."""
    from consent import store as store_mod

    monkeypatch.setattr(store_mod, "_IMPORT_CHUNK", 5)
    rows = _rows(30)
    oracle = _store(f"sqlite:///{tmp_path / 'oracle.db'}")
    import_file(oracle, _write(tmp_path, rows))
    s = _store(db_url)
    import_file(s, _write(tmp_path, rows[::2]))
    res = import_file(s, _write(tmp_path, rows))
    assert (res.recorded, res.duplicates) == (15, 15)
    assert _snapshot(s) == _snapshot(oracle)
    # identifiers of the second import were encrypted under the subjects' stored keys
    assert _full_snapshot(s)[2] == _full_snapshot(oracle)[2]
