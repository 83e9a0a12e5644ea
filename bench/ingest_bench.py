"""Benchmark of `confide node ingest`: a 1M-row member CSV into SQLite and PostgreSQL.

    .venv/bin/python bench/ingest_bench.py [--rows 1000000] [--parquet] [--no-postgres] [--no-results]

Generates a realistic brand member file with numpy (16 columns: key, 3 identifiers, 10
features, 2 labels, plus one undeclared column that ingest must ignore), times `ingest` on a
fresh SQLite file and on a fresh PostgreSQL database (with --parquet also the same rows as a
Parquet file into SQLite), prints seconds and rows/s, and writes the numbers into the "Ingest"
section of bench/RESULTS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text

from confide.db import make_engine
from party_node.datasets import DatasetSchema, ingest, parse_schema
from party_node.storage.base import NodeBase

SECTION = "## Ingest (`confide node ingest`)"
PG_ADMIN_URL = os.environ.get(
    "CONFIDE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

SCHEMA = {
    "dataset": "brand_members",
    "key": "member_id",
    "identifiers": [
        {"column": "phone", "type": "phone"},
        {"column": "email", "type": "email"},
        {"column": "openid", "type": "openid"},
    ],
    "features": [
        {"column": "recency_days", "type": "int"},
        {"column": "frequency_12m", "type": "int"},
        {"column": "monetary_12m", "type": "float"},
        {"column": "avg_order_value", "type": "float"},
        {"column": "age", "type": "int"},
        {"column": "gender", "type": "category"},
        {"column": "city_tier", "type": "category"},
        {"column": "channel", "type": "category"},
        {"column": "is_vip", "type": "bool"},
        {"column": "signup_date", "type": "date"},
    ],
    "labels": [
        {"column": "converted", "type": "binary"},
        {"column": "ltv_180d", "type": "float"},
    ],
}

_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
_MOBILE_PREFIXES = np.array(
    ["134", "135", "136", "138", "139", "150", "151", "158", "159", "182", "186", "188", "199"]
)
_MAIL_DOMAINS = np.array(["qq.com", "163.com", "126.com", "gmail.com", "outlook.com", "sina.com"])


def _random_strings(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    codes = _ALPHABET[rng.integers(0, len(_ALPHABET), size=(n, length))]
    return np.ascontiguousarray(codes).view(f"<U{length}").ravel()


def _with_missing(rng: np.random.Generator, values: np.ndarray, share: float) -> pa.Array:
    return pa.array(values, mask=rng.random(len(values)) < share)


def make_members_csv(path: Path, rows: int, seed: int = 7) -> None:
    """Write a member file shaped like a brand CRM export (identifiers partly missing)."""
    rng = np.random.default_rng(seed)
    n = rows
    member_id = np.char.add("M", np.char.zfill(rng.permutation(n).astype(str), 9))
    phone = np.char.add(
        _MOBILE_PREFIXES[rng.integers(0, len(_MOBILE_PREFIXES), n)],
        np.char.zfill(rng.integers(0, 10**8, n).astype(str), 8),
    )
    email = np.char.add(
        np.char.add(_random_strings(rng, n, 8), "@"),
        _MAIL_DOMAINS[rng.integers(0, len(_MAIL_DOMAINS), n)],
    )
    openid = np.char.add("o", _random_strings(rng, n, 27))
    recency = rng.integers(0, 730, n)
    frequency = rng.poisson(3.0, n)
    aov = np.round(rng.lognormal(5.0, 0.6, n), 2)
    monetary = np.round(aov * frequency, 2)
    age = rng.integers(18, 75, n)
    signup = (
        np.datetime64("2015-01-01") + rng.integers(0, 3650, n).astype("timedelta64[D]")
    ).astype("datetime64[D]")
    logit = -2.0 - recency / 365 + 0.3 * frequency
    converted = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    ltv = np.round(converted * rng.lognormal(6.0, 0.8, n), 2)
    table = pa.table(
        {
            "member_id": member_id,
            "phone": _with_missing(rng, phone, 0.05),
            "email": _with_missing(rng, email, 0.45),
            "openid": _with_missing(rng, openid, 0.30),
            "recency_days": recency,
            "frequency_12m": frequency,
            "monetary_12m": monetary,
            "avg_order_value": aov,
            "age": _with_missing(rng, age, 0.12),
            "gender": np.array(["F", "M", "U"])[rng.choice(3, n, p=[0.55, 0.40, 0.05])],
            "city_tier": np.array(["1", "2", "3", "4", "5"])[rng.integers(0, 5, n)],
            "channel": np.array(["mini_program", "app", "store", "call_centre"])[
                rng.integers(0, 4, n)
            ],
            "is_vip": rng.random(n) < 0.08,
            "signup_date": pa.array(signup, type=pa.date32()),
            "converted": converted,
            "ltv_180d": ltv,
            "crm_note": np.array(["", "called", "do not call"])[
                rng.integers(0, 3, n)
            ],  # undeclared
        }
    )
    pcsv.write_csv(table, path, pcsv.WriteOptions(quoting_style="none"))


def _time_ingest(url: str, data: Path, schema: DatasetSchema) -> tuple[float, int]:
    engine = make_engine(url)
    try:
        NodeBase.metadata.create_all(engine)
        t0 = time.perf_counter()
        report = ingest(engine, data, schema)
        seconds = time.perf_counter() - t0
        with engine.connect() as conn:
            count = conn.execute(
                text(f'SELECT count(*) FROM "ds_{schema.dataset}_v1"')
            ).scalar_one()
        assert count == report.rows, (count, report.rows)
        return seconds, report.rows
    finally:
        engine.dispose()


def _bench_postgres(data: Path, schema: DatasetSchema) -> tuple[float, int]:
    name = f"confide_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        return _time_ingest(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name, data, schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _write_results(path: Path, body: str) -> None:
    """Replace our section of RESULTS.md in place (or append it), keeping every other section."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.splitlines()
    ours = [i for i, line in enumerate(lines) if line.strip() == SECTION]
    if not ours:
        text = old.rstrip() + "\n\n" + body.rstrip() + "\n"
    else:
        begin = ours[0]
        after = next(
            (i for i in range(begin + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        rest = "\n".join(lines[after:])
        text = (
            "\n".join(lines[:begin]) + "\n" + body.rstrip() + "\n" + ("\n" + rest if rest else "")
        )
    path.write_text(text.rstrip() + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--parquet", action="store_true", help="also time the same data as Parquet")
    ap.add_argument("--no-results", action="store_true", help="do not touch bench/RESULTS.md")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    ap.add_argument("--generate-only", type=Path, metavar="CSV", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        make_members_csv(args.generate_only, args.rows)
        if args.parquet:
            import pyarrow.parquet as pq

            table = pcsv.read_csv(args.generate_only)
            pq.write_table(
                table, args.generate_only.with_suffix(".parquet"), row_group_size=100_000
            )
        return

    schema = parse_schema(SCHEMA, source="bench schema")
    with tempfile.TemporaryDirectory(prefix="confide-ingest-bench-") as tmp:
        data = Path(tmp) / "brand_members.csv"
        t0 = time.perf_counter()
        # In a child process, so that this process's peak RSS is that of ingest alone.
        subprocess.run(
            [sys.executable, __file__, "--rows", str(args.rows), "--generate-only", str(data)]
            + (["--parquet"] if args.parquet else []),
            check=True,
        )
        mb = data.stat().st_size / 1e6
        print(
            f"generated {args.rows:,} rows x {len(schema.columns())} declared columns "
            f"(+1 undeclared), {mb:.0f} MB CSV in {time.perf_counter() - t0:.1f} s"
        )

        results: list[tuple[str, float, int]] = []
        seconds, rows = _time_ingest(f"sqlite:///{Path(tmp) / 'node.db'}", data, schema)
        results.append(("SQLite (file, WAL)", seconds, rows))
        print(f"SQLite:     {seconds:6.1f} s  {rows / seconds:>10,.0f} rows/s")
        if args.parquet:
            seconds, rows = _time_ingest(
                f"sqlite:///{Path(tmp) / 'node_pq.db'}", data.with_suffix(".parquet"), schema
            )
            results.append(("SQLite, Parquet input", seconds, rows))
            print(f"SQLite (Parquet input): {seconds:6.1f} s  {rows / seconds:>10,.0f} rows/s")
        if not args.no_postgres:
            seconds, rows = _bench_postgres(data, schema)
            results.append(("PostgreSQL (local, COPY)", seconds, rows))
            print(f"PostgreSQL: {seconds:6.1f} s  {rows / seconds:>10,.0f} rows/s")
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of the ingesting process: {peak_mb:.0f} MB")

    if args.no_results:
        return
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    table = "\n".join(f"| {db} | {rows:,} | {s:.1f} | {rows / s:,.0f} |" for db, s, rows in results)
    body = f"""{SECTION}

`bench/ingest_bench.py`: {args.rows:,}-row brand member CSV ({mb:.0f} MB; {len(schema.columns())}
declared columns: key, 3 identifiers, 10 features, 2 labels; 1 undeclared column ignored),
validated and loaded in one transaction with the default 200,000-row chunks. Time includes
hashing the file, validation, the key index and the catalog row. Peak RSS of the ingesting
process (all runs, file generated in a child process): {peak_mb:.0f} MB.
Machine: {os.cpu_count()} cores (shared with other work; 1-min load average {load:.1f} at the end), {platform.machine()}, Python
{platform.python_version()}; run {now}.

| database | rows | seconds | rows/s |
|---|---:|---:|---:|
{table}
"""
    _write_results(args.results, body)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
