"""Dataset ingest: schema files, validation errors, atomicity, replace, Parquet, describe, CLI."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
import yaml
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from confide.db import make_engine
from confide.errors import Conflict, NotFound, ValidationError
from party_node.datasets import (
    Dataset,
    DatasetSchema,
    dataset_table_name,
    describe,
    ingest,
    list_datasets,
    load_frame,
    load_schema,
    parse_schema,
)
from party_node.ingest_cli import ingest_command
from party_node.storage.base import DATA_TABLE_PREFIX, NodeBase

SCHEMA: dict[str, Any] = {
    "dataset": "brand_members",
    "key": "member_id",
    "identifiers": [{"column": "phone", "type": "phone"}, {"column": "email", "type": "email"}],
    "features": [
        {"column": "recency_days", "type": "int"},
        {"column": "spend", "type": "float"},
        {"column": "vip", "type": "bool"},
        {"column": "tier", "type": "category"},
        {"column": "city", "type": "string"},
        {"column": "signup", "type": "date"},
    ],
    "labels": [{"column": "converted", "type": "binary"}, {"column": "ltv", "type": "float"}],
}

HEADER = "member_id,phone,email,recency_days,spend,vip,tier,city,signup,converted,ltv,crm_note"
GOOD_ROWS = [
    "M1,+8613800138000,a@x.com,3,1.5,true,gold,上海,2024-01-05,1,120.25,vip caller",
    "M2,013800138001,,,2.25,No,,Beijing,2023-12-31,0,0,",
    'M3,,c@x.com,-7,,1,silver,"Guangzhou, GD",,,,x',
    "M4,13900000004,d@x.com,0,1e3,FALSE,gold,,2020-02-29,1,,",
]


@pytest.fixture
def schema() -> DatasetSchema:
    return parse_schema(SCHEMA)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    NodeBase.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    NodeBase.metadata.create_all(eng)
    yield eng
    eng.dispose()


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def content_tables(engine: Engine) -> list[str]:
    return [t for t in inspect(engine).get_table_names() if t.startswith(DATA_TABLE_PREFIX)]


def catalog_names(engine: Engine) -> list[str]:
    with Session(engine) as s:
        return list(s.execute(select(Dataset.name)).scalars())


# ---------------------------------------------------------------------------- schema files


def test_schema_yaml_and_json_files_give_the_same_schema(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SCHEMA))
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))

    from_yaml = load_schema(tmp_path / "s.yaml")
    from_json = load_schema(tmp_path / "s.json")

    assert from_yaml == from_json
    assert from_yaml.columns()[0] == ("member_id", "key", "string")
    assert ("converted", "label", "binary") in from_yaml.columns()


def _variant(**changes: Any) -> dict[str, Any]:
    return {**SCHEMA, **changes}


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (
            _variant(features=[{"column": "age", "type": "integer"}]),
            "features[0] (column 'age').type",
            "'int'",
        ),
        (
            _variant(identifiers=[{"column": "phone", "type": "mobile"}]),
            "identifiers[0] (column 'phone').type",
            "phone",
        ),
        (
            _variant(labels=[{"column": "converted", "type": "multiclass"}]),
            "labels[0] (column 'converted').type",
            "binary",
        ),
        (_variant(labels=[{"column": "phone", "type": "binary"}]), "", "'phone' is declared twice"),
        (_variant(features=[{"column": "Member_ID", "type": "int"}]), "", "declared twice"),
        (_variant(dataset="Brand-Members"), "dataset", "pattern"),
        (_variant(dataset="x" * 41), "dataset", "pattern"),
        (
            _variant(features=[{"column": "recency days", "type": "int"}]),
            "features[0] (column 'recency days').column",
            "not allowed",
        ),
        (
            _variant(features=[{"column": "1st", "type": "int"}]),
            "features[0] (column '1st').column",
            "not allowed",
        ),
        (_variant(feature=[]), "feature", "Extra inputs"),
        (
            _variant(features=[{"column": "age", "type": "int", "unit": "y"}]),
            "features[0] (column 'age').unit",
            "Extra",
        ),
    ],
)
def test_bad_schema_names_file_and_field(
    tmp_path: Path, raw: dict[str, Any], field: str, words: str
) -> None:
    path = tmp_path / "bad_schema.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))

    with pytest.raises(ValidationError) as err:
        load_schema(path)

    assert str(path) in err.value.message
    assert field in err.value.message
    assert words in err.value.message
    assert err.value.details["file"] == str(path)


def test_schema_sections_may_be_empty(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "dataset: leads\nkey: lead_id\nidentifiers:\n  - {column: phone, type: phone}\nlabels:\n"
    )

    schema = load_schema(path)

    assert schema.features == [] and schema.labels == []
    assert schema.columns() == [("lead_id", "key", "string"), ("phone", "identifier", "phone")]


def test_schema_file_missing_or_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load_schema(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValidationError, match="list.yaml: a dataset schema must be a mapping"):
        load_schema(tmp_path / "list.yaml")


# ---------------------------------------------------------------------------- round trip


def test_csv_round_trip_values_and_types(
    engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    data = write_csv(tmp_path / "members.csv", GOOD_ROWS)

    report = ingest(engine, data, schema, chunk_rows=2)
    df = load_frame(engine, "brand_members").sort_values("member_id").reset_index(drop=True)

    assert (report.rows, report.version, report.ignored_columns) == (4, 1, ["crm_note"])
    assert list(df.columns) == [c for c, _, _ in schema.columns()]
    # identifiers as given (leading zero, '+'), empty -> NULL
    assert df["phone"].tolist()[:2] == ["+8613800138000", "013800138001"]
    assert df["phone"].isna().tolist() == [False, False, True, False]
    assert df["email"].isna().tolist() == [False, True, False, False]
    assert df["recency_days"].dtype == "Int64"
    assert df["recency_days"].tolist()[0] == 3 and df["recency_days"].tolist()[2] == -7
    assert pd.isna(df["recency_days"][1])
    assert df["spend"].dtype == np.float64
    assert df["spend"][0] == 1.5 and df["spend"][3] == 1000.0 and np.isnan(df["spend"][2])
    assert df["vip"].dtype == "boolean"
    assert df["vip"].tolist() == [True, False, True, False]
    assert df["tier"].tolist()[0] == "gold" and pd.isna(df["tier"][1])
    assert df["city"].tolist()[:3] == ["上海", "Beijing", "Guangzhou, GD"]
    assert df["signup"].dt.date.tolist()[:2] == [dt.date(2024, 1, 5), dt.date(2023, 12, 31)]
    assert df["signup"].dt.date.tolist()[3] == dt.date(2020, 2, 29) and pd.isna(df["signup"][2])
    assert df["converted"].dtype == "Int64"
    assert df["converted"].tolist()[:2] == [1, 0] and pd.isna(df["converted"][2])
    assert df["ltv"][0] == 120.25 and np.isnan(df["ltv"][3])


def test_undeclared_columns_never_enter_the_database(
    engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    data = write_csv(tmp_path / "members.csv", GOOD_ROWS)

    report = ingest(engine, data, schema)

    with Session(engine) as s:
        table = dataset_table_name(s, "brand_members")
    stored = {c["name"] for c in inspect(engine).get_columns(table)}
    assert report.ignored_columns == ["crm_note"]
    assert "crm_note" not in stored
    assert stored == {c for c, _, _ in schema.columns()}


def test_parquet_input_with_native_types(
    engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    table = pa.table(
        {
            "member_id": pa.array([101, 102, 103], pa.int64()),  # numeric key -> stored as text
            "phone": pa.array([13800138000.0, None, 13900000001.0]),  # float phones -> digits
            "email": pa.array(["a@x.com", "", None]),
            "recency_days": pa.array([1.0, None, 3.0]),
            "spend": pa.array([0.1, float("nan"), 2.5]),
            "vip": pa.array([True, None, False]),
            "tier": pa.array(["a", "b", None]).dictionary_encode(),
            "city": pa.array(["x", "y", "z"], pa.large_string()),
            "signup": pa.array([dt.datetime(2024, 3, 1, 13, 5), None, dt.datetime(2021, 1, 2)]),
            "converted": pa.array([True, False, None]),
            "ltv": pa.array([1, 2, None], pa.int32()),
            "extra": pa.array([1, 2, 3]),
        }
    )
    pq.write_table(table, tmp_path / "members.parquet", row_group_size=2)

    report = ingest(engine, tmp_path / "members.parquet", schema, chunk_rows=2)
    df = load_frame(engine, "brand_members").sort_values("member_id").reset_index(drop=True)

    assert (report.rows, report.ignored_columns) == (3, ["extra"])
    assert df["member_id"].tolist() == ["101", "102", "103"]
    assert df["phone"][0] == "13800138000" and pd.isna(df["phone"][1])
    assert df["email"].isna().tolist() == [False, True, True]
    assert df["recency_days"][0] == 1 and pd.isna(df["recency_days"][1])
    assert np.isnan(df["spend"][1])
    assert df["vip"].isna().tolist() == [False, True, False] and df["vip"][0] and not df["vip"][2]
    assert df["tier"][1] == "b"
    assert df["signup"].dt.date.tolist()[0] == dt.date(2024, 3, 1)
    assert df["converted"].tolist()[:2] == [1, 0]
    assert df["ltv"][1] == 2.0


def test_load_frame_selected_columns_and_not_found(
    sqlite_engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    ingest(sqlite_engine, write_csv(tmp_path / "m.csv", GOOD_ROWS), schema)

    df = load_frame(sqlite_engine, "brand_members", columns=["phone", "member_id"])

    assert list(df.columns) == ["phone", "member_id"]
    with pytest.raises(NotFound, match="no column.*'crm_note'"):
        load_frame(sqlite_engine, "brand_members", columns=["crm_note"])
    with pytest.raises(NotFound, match="no dataset named 'other'"):
        load_frame(sqlite_engine, "other")
    with Session(sqlite_engine) as s, pytest.raises(NotFound):
        describe(s, "other")


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("rows", "row", "column", "words"),
    [
        (
            ["M1,1,a,1,1.0,true,g,c,2024-01-01,1,1", ",2,b,2,2.0,true,g,c,2024-01-01,0,1"],
            2,
            "member_id",
            "key is empty",
        ),
        (
            ["M1,1,a,1,1.0,true,g,c,2024-01-01,1,1", "M1,2,b,2,2.0,true,g,c,2024-01-01,0,1"],
            2,
            "member_id",
            "duplicate key (same as row 1)",
        ),
        (
            ["M1,1,a,1,1.0,true,g,c,2024-01-01,1,1", "M2,2,b,two,2.0,true,g,c,2024-01-01,0,1"],
            2,
            "recency_days",
            "not a number (got 'two')",
        ),
        (
            ["M1,1,a,1.5,1.0,true,g,c,2024-01-01,1,1"],
            1,
            "recency_days",
            "not an integer (got '1.5')",
        ),
        (
            ["M1,1,a,1,1.0,true,g,c,2024-01-01,1,1", "M2,2,b,2,1.0.0,true,g,c,2024-01-01,0,1"],
            2,
            "spend",
            "not a number",
        ),
        (["M1,1,a,1,inf,true,g,c,2024-01-01,1,1"], 1, "spend", "not a finite number"),
        (["M1,1,a,1,1.0,true,g,c,2024-01-01,2,1"], 1, "converted", "must be 0 or 1 (got '2')"),
        (["M1,1,a,1,1.0,true,g,c,2024-01-01,yes,1"], 1, "converted", "not a number"),
        (["M1,1,a,1,1.0,true,g,c,2024-02-30,1,1"], 1, "signup", "not a date"),
        (["M1,1,a,1,1.0,true,g,c,05/01/2024,1,1"], 1, "signup", "not a date"),
        (["M1,1,a,1,1.0,maybe,g,c,2024-01-01,1,1"], 1, "vip", "not a boolean"),
        (
            ["M1,1,a,1,1.0,true,g,c,2024-01-01,1,1", "M2,2,b,2,1.0,true,g,c,2024-01-01,0,abc"],
            2,
            "ltv",
            "not a number",
        ),
    ],
)
def test_bad_value_names_file_row_and_column(
    sqlite_engine: Engine,
    schema: DatasetSchema,
    tmp_path: Path,
    rows: list[str],
    row: int,
    column: str,
    words: str,
) -> None:
    data = write_csv(tmp_path / "bad.csv", rows, header=HEADER.rsplit(",", 1)[0])

    with pytest.raises(ValidationError) as err:
        ingest(sqlite_engine, data, schema)

    msg = err.value.message
    assert msg.startswith(f"{data}: row {row} (line {row + 1}), column '{column}': ")
    assert words in msg
    assert (err.value.details["row"], err.value.details["line"], err.value.details["column"]) == (
        row,
        row + 1,
        column,
    )
    assert content_tables(sqlite_engine) == [] and catalog_names(sqlite_engine) == []


def test_key_and_identifier_values_are_not_echoed_in_errors(
    sqlite_engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    rows = [
        "SECRETKEY,1,a,1,1.0,true,g,c,2024-01-01,1,1",
        "SECRETKEY,2,b,2,2.0,true,g,c,2024-01-01,0,1",
    ]
    data = write_csv(tmp_path / "bad.csv", rows, header=HEADER.rsplit(",", 1)[0])

    with pytest.raises(ValidationError) as err:
        ingest(sqlite_engine, data, schema)

    assert "duplicate key" in err.value.message
    assert "SECRETKEY" not in err.value.message


def test_missing_declared_columns_are_all_named(
    sqlite_engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    data = write_csv(tmp_path / "m.csv", ["M1,1,a"], header="member_id,phone,email")

    with pytest.raises(ValidationError) as err:
        ingest(sqlite_engine, data, schema)

    assert err.value.message.startswith(
        f"{data}: line 1 (header): declared column(s) 'recency_days'"
    )
    assert err.value.details["missing"] == [
        "recency_days",
        "spend",
        "vip",
        "tier",
        "city",
        "signup",
        "converted",
        "ltv",
    ]
    assert err.value.details["column"] == "recency_days"


def test_ragged_csv_row_is_located_by_line(
    sqlite_engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    rows = [GOOD_ROWS[0], GOOD_ROWS[1], "M9,1,a,1"]
    data = write_csv(tmp_path / "ragged.csv", rows)

    with pytest.raises(ValidationError) as err:
        ingest(sqlite_engine, data, schema)

    assert (
        err.value.message == f"{data}: row 3 (line 4): expected 12 fields as in the header, found 4"
    )


def test_duplicate_key_across_chunks(
    sqlite_engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    rows = [f"M{i},1,a,1,1.0,true,g,c,2024-01-01,1,1" for i in range(1, 8)] + [
        "M3,1,a,1,1.0,true,g,c,2024-01-01,1,1"
    ]
    data = write_csv(tmp_path / "dup.csv", rows, header=HEADER.rsplit(",", 1)[0])

    written: list[int] = []

    with pytest.raises(ValidationError) as err:
        ingest(
            sqlite_engine, data, schema, chunk_rows=3, progress=lambda rows, _: written.append(rows)
        )

    assert written == [3, 6]  # rows 1-6 were written before the third chunk brought the duplicate
    assert err.value.message.startswith(
        f"{data}: row 8 (line 9), column 'member_id': duplicate key (same as row 3)"
    )


def test_unsupported_or_missing_data_file(
    sqlite_engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(ValidationError, match="unsupported data file type '.xlsx'"):
        ingest(sqlite_engine, tmp_path / "data.xlsx", schema)
    with pytest.raises(NotFound, match="data file not found"):
        ingest(sqlite_engine, tmp_path / "absent.csv", schema)


# ---------------------------------------------------------------------------- atomicity, replace


def _many_rows(n: int, bad_at: int | None = None) -> list[str]:
    rows = []
    for i in range(1, n + 1):
        recency = "oops" if i == bad_at else str(i % 365)
        rows.append(
            f"M{i:05d},138{i:08d},u{i}@x.com,{recency},{i / 7:.3f},{i % 2},t{i % 3},c,2024-01-01,{i % 2},{i}"
        )
    return rows


def test_failure_in_last_chunk_leaves_nothing(
    engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    data = write_csv(
        tmp_path / "m.csv", _many_rows(1000, bad_at=990), header=HEADER.rsplit(",", 1)[0]
    )

    written: list[int] = []

    with pytest.raises(ValidationError, match=r"row 990 \(line 991\), column 'recency_days'"):
        ingest(engine, data, schema, chunk_rows=100, progress=lambda rows, _: written.append(rows))

    assert written == list(
        range(100, 1000, 100)
    )  # nine chunks were in the table before the failure
    assert content_tables(engine) == []
    assert catalog_names(engine) == []


def test_failed_replace_keeps_the_old_version(
    engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    ingest(engine, write_csv(tmp_path / "v1.csv", GOOD_ROWS), schema)
    bad = write_csv(
        tmp_path / "v2.csv", _many_rows(500, bad_at=450), header=HEADER.rsplit(",", 1)[0]
    )

    with pytest.raises(ValidationError, match="row 450"):
        ingest(engine, bad, schema, replace=True, chunk_rows=100)

    assert content_tables(engine) == [f"{DATA_TABLE_PREFIX}brand_members_v1"]
    with Session(engine) as s:
        assert describe(s, "brand_members")["version"] == 1
    assert sorted(load_frame(engine, "brand_members")["member_id"]) == ["M1", "M2", "M3", "M4"]


def test_reingest_needs_replace_and_then_makes_a_new_version(
    engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    ingest(engine, write_csv(tmp_path / "v1.csv", GOOD_ROWS), schema)
    v2 = write_csv(tmp_path / "v2.csv", _many_rows(10), header=HEADER.rsplit(",", 1)[0])

    with pytest.raises(Conflict, match="already exists.*--replace"):
        ingest(engine, v2, schema)
    report = ingest(engine, v2, schema, replace=True)

    assert (report.version, report.replaced_version, report.rows) == (2, 1, 10)
    assert content_tables(engine) == [f"{DATA_TABLE_PREFIX}brand_members_v2"]
    with Session(engine) as s:
        infos = list_datasets(s)
        assert dataset_table_name(s, "brand_members") == f"{DATA_TABLE_PREFIX}brand_members_v2"
    assert [(i.name, i.version, i.rows, i.source_name) for i in infos] == [
        ("brand_members", 2, 10, "v2.csv")
    ]
    assert len(load_frame(engine, "brand_members")) == 10


# ---------------------------------------------------------------------------- describe / list


def test_describe_and_list_hold_no_values(
    engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    ingest(engine, write_csv(tmp_path / "m.csv", GOOD_ROWS), schema)

    with Session(engine) as s:
        desc = describe(s, "brand_members")
        listing = [i.model_dump(mode="json") for i in list_datasets(s)]

    assert desc["dataset"] == "brand_members" and desc["version"] == 1 and desc["rows"] == 4
    assert desc["columns"][:2] == [
        {"column": "member_id", "role": "key", "type": "string"},
        {"column": "phone", "role": "identifier", "type": "phone"},
    ]
    assert {"column": "converted", "role": "label", "type": "binary"} in desc["columns"]
    assert listing[0]["identifier_types"] == ["phone", "email"] and listing[0]["rows"] == 4
    dumped = json.dumps([desc, listing], ensure_ascii=False)
    for value in ("M1", "8613800138000", "a@x.com", "gold", "上海", "120.25", "2024-01-05"):
        assert value not in dumped


# ---------------------------------------------------------------------------- CLI


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("ingest")(ingest_command)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps "ingest" a named subcommand
        pass

    return app


def test_cli_ingest_with_data_dir_prints_json(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SCHEMA))
    node_dir = tmp_path / "node"

    result = CliRunner().invoke(
        _cli(),
        [
            "ingest",
            str(data),
            "--schema",
            str(tmp_path / "s.yaml"),
            "--data-dir",
            str(node_dir),
            "--json",
        ],
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["dataset"], report["rows"], report["ignored_columns"]) == (
        "brand_members",
        4,
        ["crm_note"],
    )
    engine = make_engine(f"sqlite:///{node_dir / 'node.db'}")
    assert len(load_frame(engine, "brand_members")) == 4
    engine.dispose()


def test_cli_errors_are_confide_errors(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "m.csv", GOOD_ROWS)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SCHEMA))
    args = [
        "ingest",
        str(data),
        "--schema",
        str(tmp_path / "s.yaml"),
        "--data-dir",
        str(tmp_path / "node"),
    ]
    assert CliRunner().invoke(_cli(), args).exit_code == 0

    again = CliRunner().invoke(_cli(), args)
    no_db = CliRunner().invoke(_cli(), args[:4])
    replaced = CliRunner().invoke(_cli(), [*args, "--replace"])

    assert isinstance(again.exception, Conflict)
    assert no_db.exception is not None and "--database-url" in str(no_db.exception)
    assert replaced.exit_code == 0 and "version 2" in replaced.stdout


def test_cli_database_url_resolution(tmp_path: Path) -> None:
    from confide.errors import ConfigurationError
    from party_node.ingest_cli import resolve_database_url

    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {"name": "brand", "pki_dir": str(tmp_path / "pki"), "data_dir": str(tmp_path / "a")}
        )
    )

    assert resolve_database_url(config, tmp_path / "b", "sqlite:///x.db") == "sqlite:///x.db"
    assert (
        resolve_database_url(config, None, None)
        == f"sqlite:///{(tmp_path / 'a' / 'node.db').resolve()}"
    )
    assert (
        resolve_database_url(config, tmp_path / "b", None)
        == f"sqlite:///{(tmp_path / 'b' / 'node.db').resolve()}"
    )
    assert (
        resolve_database_url(None, tmp_path / "c", None)
        == f"sqlite:///{(tmp_path / 'c' / 'node.db').resolve()}"
    )
    with pytest.raises(ConfigurationError, match="--database-url, --config"):
        resolve_database_url(None, None, None)


def test_header_only_file_makes_an_empty_dataset(
    sqlite_engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    report = ingest(sqlite_engine, write_csv(tmp_path / "empty.csv", []), schema)

    df = load_frame(sqlite_engine, "brand_members")

    assert report.rows == 0
    assert df.empty and list(df.columns) == [c for c, _, _ in schema.columns()]
    assert df["recency_days"].dtype == "Int64"


def test_parquet_all_null_columns(
    sqlite_engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    cols = {c: pa.nulls(2) for c, _, _ in schema.columns()}
    cols["member_id"] = pa.array(["a", "b"])
    pq.write_table(pa.table(cols), tmp_path / "nulls.parquet")

    ingest(sqlite_engine, tmp_path / "nulls.parquet", schema)
    df = load_frame(sqlite_engine, "brand_members")

    assert df["member_id"].tolist() == ["a", "b"]
    assert df.drop(columns="member_id").isna().all().all()


def test_unusual_column_names_are_quoted(engine: Engine, tmp_path: Path) -> None:
    schema = parse_schema(
        {
            "dataset": "odd",
            "key": "Order",
            "identifiers": [{"column": "手机号", "type": "phone"}],
            "features": [
                {"column": "select", "type": "int"},
                {"column": "Group_Size", "type": "float"},
            ],
            "labels": [{"column": "user", "type": "binary"}],
        }
    )
    data = write_csv(
        tmp_path / "odd.csv",
        ["A,13800000000,1,2.5,1", "B,,2,,0"],
        header="Order,手机号,select,Group_Size,user",
    )

    ingest(engine, data, schema)
    df = load_frame(engine, "odd").sort_values("Order")

    assert list(df.columns) == ["Order", "手机号", "select", "Group_Size", "user"]
    assert df["手机号"].tolist()[0] == "13800000000" and pd.isna(df["手机号"].tolist()[1])
    assert df["select"].tolist() == [1, 2] and df["user"].tolist() == [1, 0]


def test_interrupted_ingest_leaves_nothing(
    engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    data = write_csv(tmp_path / "m.csv", _many_rows(500), header=HEADER.rsplit(",", 1)[0])
    seen: list[int] = []

    def stop_after_three_chunks(rows: int, fraction: float) -> None:
        seen.append(rows)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(engine, data, schema, chunk_rows=100, progress=stop_after_three_chunks)

    assert seen == [100, 200, 300]
    assert content_tables(engine) == [] and catalog_names(engine) == []


def test_line_numbers_count_blank_lines_and_multiline_values(
    sqlite_engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    header = HEADER.rsplit(",", 1)[0]
    text = f'{header}\n\nM1,1,a,1,1.0,true,g,"two\nlines",2024-01-01,1,1\n\nM2,2,b,x,1.0,true,g,c,2024-01-01,0,1\n'
    (tmp_path / "mixed.csv").write_text(text, encoding="utf-8")

    with pytest.raises(ValidationError) as err:
        ingest(sqlite_engine, tmp_path / "mixed.csv", schema)

    assert err.value.message.startswith(
        f"{tmp_path / 'mixed.csv'}: row 2 (line 6), column 'recency_days'"
    )
    assert err.value.details["line"] == 6


def test_invalid_utf8_is_located_by_line(
    sqlite_engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    rows = [r.encode() for r in GOOD_ROWS[:2]] + [b"M9,1,a,1,1.0,true,g\xff\xfe,c,2024-01-01,1,1,"]
    (tmp_path / "latin.csv").write_bytes(b"\n".join([HEADER.encode(), *rows]) + b"\n")

    with pytest.raises(ValidationError) as err:
        ingest(sqlite_engine, tmp_path / "latin.csv", schema)

    assert (
        err.value.message
        == f"{tmp_path / 'latin.csv'}: line 4 is not valid UTF-8; save the file as UTF-8"
    )
    assert content_tables(sqlite_engine) == []


def test_nul_character_is_refused_on_every_database(
    engine: Engine, schema: DatasetSchema, tmp_path: Path
) -> None:
    rows = [GOOD_ROWS[0], "M2,1,a,1,1.0,true,g\x00x,c,2024-01-01,1,1,"]
    data = write_csv(tmp_path / "nul.csv", rows)

    with pytest.raises(ValidationError) as err:
        ingest(engine, data, schema)

    assert err.value.message.startswith(
        f"{data}: row 2 (line 3), column 'tier': text contains a NUL"
    )
    assert content_tables(engine) == []


def test_missing_catalog_is_a_configuration_error(
    db_url: str, schema: DatasetSchema, tmp_path: Path
) -> None:
    from confide.errors import ConfigurationError

    engine = make_engine(db_url)  # no tables created
    try:
        with pytest.raises(ConfigurationError, match="cannot read the dataset catalog"):
            ingest(engine, write_csv(tmp_path / "m.csv", GOOD_ROWS), schema)
        assert content_tables(engine) == []
    finally:
        engine.dispose()
