"""`confide node ingest`: load a CSV or Parquet file into this node's database.

A thin shell over `party_node.datasets.ingest`; the lead registers `ingest_command` under
`confide node`. Errors are ConfideError subclasses, printed by the root CLI.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from confide.errors import ConfigurationError

NODE_DB_FILE = "node.db"


def resolve_database_url(
    config: Path | None, data_dir: Path | None, database_url: str | None
) -> str:
    """The node database URL: --database-url, else the node config (+ --data-dir), else
    `sqlite:///<data-dir>/node.db`. Raises ConfigurationError if none is given."""
    if database_url:
        return database_url
    if config is not None:
        from confide.settings import NodeSettings, load_settings

        settings = load_settings(NodeSettings, config, data_dir=data_dir)
        return settings.resolved_database_url(NODE_DB_FILE)
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(data_dir / NODE_DB_FILE).resolve()}"
    raise ConfigurationError(
        "which node database? give --database-url, --config (the node config YAML) or --data-dir"
    )


def _ensure_catalog(engine: Engine) -> None:
    """Bring the node database to the newest schema; it must then hold the dataset catalog."""
    from party_node import storage
    from party_node.datasets import Dataset
    from party_node.storage.base import NodeBase

    ensure_schema = getattr(storage, "ensure_schema", None)
    if ensure_schema is not None:
        ensure_schema(engine)
    else:
        NodeBase.metadata.create_all(engine)
    if not inspect(engine).has_table(Dataset.__tablename__):
        raise ConfigurationError(
            f"the node database has no {Dataset.__tablename__!r} table after migrating: "
            "the node migrations do not include the dataset catalog yet"
        )


def ingest_command(
    data: Path = typer.Argument(..., help="CSV (.csv/.tsv) or Parquet (.parquet) file to load"),
    schema: Path = typer.Option(..., "--schema", help="Dataset schema file (YAML or JSON)"),
    config: Path | None = typer.Option(None, "--config", help="node config YAML"),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Node data directory (holds node.db)"
    ),
    database_url: str | None = typer.Option(
        None, "--database-url", help="SQLAlchemy URL of the node database"
    ),
    replace: bool = typer.Option(
        False, "--replace", help="Replace an existing dataset with a new version"
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON"),
) -> None:
    """Load a CSV or Parquet file into this node's database under a declared schema.

    All or nothing: a bad value (named by file, row and column) leaves the database as it was.

    Columns the schema does not declare are not loaded.
    """
    from confide.db import make_engine
    from party_node.datasets import ingest, load_schema

    declared = load_schema(schema)
    engine = make_engine(resolve_database_url(config, data_dir, database_url))
    err = Console(stderr=True)
    try:
        _ensure_catalog(engine)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]:>12,} rows"),
            TimeElapsedColumn(),
            console=err,
            transient=json_out,
        ) as bar:
            task = bar.add_task(f"ingest {declared.dataset}", total=1.0, rows=0)

            def on_progress(rows: int, fraction: float) -> None:
                bar.update(task, completed=fraction, rows=rows)

            report = ingest(engine, data, declared, replace=replace, progress=on_progress)
    finally:
        engine.dispose()

    if json_out:
        typer.echo(report.model_dump_json(indent=2))
        return
    out = Console()
    what = (
        f"replaced version {report.replaced_version}" if report.replaced_version else "new dataset"
    )
    out.print(
        f"ingested [bold]{report.dataset}[/bold] version {report.version} ({what}): "
        f"{report.rows:,} rows in {report.seconds:.1f} s ({report.rows_per_second:,.0f} rows/s)"
    )
    if report.ignored_columns:
        out.print(f"ignored undeclared column(s): {', '.join(report.ignored_columns)}")
