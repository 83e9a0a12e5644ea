"""`confide node ...` commands: serve a node, and operate it (the operator signs as the node)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from confide.errors import ValidationError

app = typer.Typer(no_args_is_help=True, help="Run and operate a party node.")
agreement_app = typer.Typer(no_args_is_help=True, help="Propose, review and sign collaboration agreements.")
job_app = typer.Typer(no_args_is_help=True, help="Create and follow jobs.")
app.add_typer(agreement_app, name="agreement")
app.add_typer(job_app, name="job")
model_app = typer.Typer(no_args_is_help=True, help="The coordinator's registry of trained models and their cards.")
app.add_typer(model_app, name="model")
out = Console()

CONFIG = typer.Option(..., "--config", help="The node's YAML settings file")


def _settings(config: Path, **overrides: Any):  # type: ignore[no-untyped-def]
    from confide.settings import NodeSettings, load_settings

    return load_settings(NodeSettings, config, **overrides)


def node_client(config: Path):  # type: ignore[no-untyped-def]
    """A client to the node's own API, signed with the node's identity (operator access)."""
    from confide import pki
    from confide.transport import ServiceClient

    settings = _settings(config)
    identity = pki.load_identity(settings.pki_dir)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    scheme = "https" if settings.tls else "http"
    return ServiceClient(identity, identity.name, f"{scheme}://{host}:{settings.port}", timeout=300)


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(obj, indent=2, default=str))
    else:
        out.print(obj)


@app.command("serve")
def serve(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML settings file"),
    name: Optional[str] = typer.Option(None, "--name"),
    pki_dir: Optional[Path] = typer.Option(None, "--pki-dir"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    database_url: Optional[str] = typer.Option(None, "--database-url"),
    host: Optional[str] = typer.Option(None, "--host"),
    port: Optional[int] = typer.Option(None, "--port"),
    coordinator_url: Optional[str] = typer.Option(None, "--coordinator-url"),
    public_url: Optional[str] = typer.Option(None, "--public-url"),
) -> None:
    """Serve this party's node API with mutual TLS."""
    from confide import pki
    from confide.serve import serve as run
    from confide.settings import NodeSettings, load_settings
    from party_node.app import create_app

    settings = load_settings(
        NodeSettings, config, name=name, pki_dir=pki_dir, data_dir=data_dir, database_url=database_url,
        host=host, port=port, coordinator_url=coordinator_url, public_url=public_url,
    )
    identity = pki.load_identity(settings.pki_dir)
    run(create_app(settings, identity=identity), settings, identity)


@app.command("register")
def register(config: Path = CONFIG, as_json: bool = typer.Option(False, "--json")) -> None:
    """Register this node (name, role, endpoint, certificate) with the coordinator."""
    with node_client(config) as c:
        party = c.post("/v1/admin/register")
    _print(party if as_json else f"registered {party['name']} ({party['role']}) at {party['endpoint']}", as_json)


@app.command("datasets")
def datasets(config: Path = CONFIG, as_json: bool = typer.Option(False, "--json")) -> None:
    """List the datasets this node holds (names, row counts, schema)."""
    with node_client(config) as c:
        rows = c.get("/v1/admin/datasets")
    if as_json:
        _print(rows, True)
        return
    table = Table("dataset", "version", "rows", "columns")
    for d in rows:
        table.add_row(d["dataset"], str(d["version"]), f"{d['rows']:,}", str(len(d["columns"])))
    out.print(table)


@app.command("obfuscators")
def obfuscators(config: Path = CONFIG, as_json: bool = typer.Option(False, "--json")) -> None:
    """The idle-time Paillier obfuscator stock: per training agreement's arbiter key, how many are ready."""
    with node_client(config) as c:
        st = c.get("/v1/admin/obfuscators")
    if as_json:
        _print(st, True)
        return
    if not st["capacity_per_key"]:
        out.print("obfuscator stock is off (set obfuscator_stock / CONFIDE_NODE_OBFUSCATOR_STOCK)")
        return
    table = Table("agreement", "key", "bits", "ready", "computed", "expires")
    for k in st["keys"]:
        table.add_row(k["agreement_id"], k["key_id"][:8], str(k["key_bits"]), f"{k['ready']:,} / {st['capacity_per_key']:,}",
                      f"{k['computed']:,}", str(k.get("expires_at") or ""))
    out.print(table)
    if st.get("last_error"):
        out.print(f"[yellow]last error:[/yellow] {st['last_error']}")


def _load_spec(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValidationError(f"agreement file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ValidationError(f"{path}: not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError(f"{path}: an agreement must be a mapping")
    return data


@agreement_app.command("propose")
def propose(spec: Path = typer.Argument(..., help="Agreement YAML/JSON"), config: Path = CONFIG,
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Propose an agreement (or a new version of one) to every party it names."""
    with node_client(config) as c:
        doc = c.post("/v1/admin/agreements", _load_spec(spec))
    _print(doc if as_json else f"proposed {doc['agreement_id']} v{doc['version']} digest {doc['digest']}", as_json)


@agreement_app.command("list")
def list_agreements(config: Path = CONFIG, as_json: bool = typer.Option(False, "--json")) -> None:
    """Agreements this node is party to, with their status and who signed."""
    with node_client(config) as c:
        docs = c.get("/v1/admin/agreements")
    if as_json:
        _print(docs, True)
        return
    table = Table("agreement", "version", "status", "signed by", "signed by me", "expires", "digest")
    for d in docs:
        table.add_row(d["agreement_id"], str(d["version"]), d["status"], ", ".join(sorted(d["signatures"])),
                      "yes" if d["signed_by_me"] else "no", d["spec"]["expires_at"], d["digest"][:16] + "…")
    out.print(table)


@agreement_app.command("sign")
def sign(agreement_id: str = typer.Argument(...), version: int = typer.Option(..., "--version"),
         digest: Optional[str] = typer.Option(None, "--digest", help="The digest you reviewed"),
         config: Path = CONFIG, as_json: bool = typer.Option(False, "--json")) -> None:
    """Review-and-sign at this node: checks the agreement, signs it with the node's identity key."""
    with node_client(config) as c:
        doc = c.post(f"/v1/admin/agreements/{agreement_id}/versions/{version}/sign", {"digest": digest})
    _print(doc if as_json else f"signed {agreement_id} v{version}; status now {doc['status']}", as_json)


@job_app.command("create")
def create_job(
    type_: str = typer.Option(..., "--type", help="Job type, e.g. dataset-stats"),
    agreement_id: str = typer.Option(..., "--agreement"),
    version: Optional[int] = typer.Option(None, "--version"),
    params: str = typer.Option("{}", "--params", help="JSON object of job parameters"),
    wait: bool = typer.Option(False, "--wait", help="Wait until the job ends"),
    timeout: float = typer.Option(600.0, "--timeout"),
    config: Path = CONFIG,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create a job at the coordinator under an agreement."""
    try:
        p = json.loads(params)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"--params is not JSON: {exc}") from None
    with node_client(config) as c:
        job = c.post("/v1/admin/jobs", {"type": type_, "agreement_id": agreement_id, "version": version, "params": p})
        if wait:
            job = wait_job(c, job["id"], timeout)
    _print(job if as_json else f"job {job['id']} {job['status']}", as_json)
    if wait and job["status"] != "succeeded":
        raise typer.Exit(1)


def wait_job(client: Any, job_id: str, timeout: float, on_update: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/admin/jobs/{job_id}")
        if on_update:
            on_update(job)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise ValidationError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
        time.sleep(0.3)


@job_app.command("status")
def job_status(job_id: str = typer.Argument(...), config: Path = CONFIG,
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Show a job, its steps and its result."""
    with node_client(config) as c:
        job = c.get(f"/v1/admin/jobs/{job_id}")
    _print(job, as_json)


@job_app.command("result")
def job_result(job_id: str = typer.Argument(...), config: Path = CONFIG) -> None:
    """What the job produced for this party alone (kept at this node, never at the coordinator)."""
    with node_client(config) as c:
        _print(c.get(f"/v1/admin/jobs/{job_id}/private"), True)


@job_app.command("cancel")
def cancel_job(job_id: str = typer.Argument(...), config: Path = CONFIG) -> None:
    """Cancel a job that has not ended."""
    with node_client(config) as c:
        job = c.post(f"/v1/admin/jobs/{job_id}/cancel")
    out.print(f"job {job['id']} {job['status']}")


def _register() -> None:
    from party_node.ingest_cli import ingest_command

    app.command("ingest", help="Load a CSV or Parquet file into this node's database with a declared schema.")(
        ingest_command
    )


_register()


# -- model registry (the coordinator serves it to the parties of each model's agreement) --------


def coordinator_client(config: Path):  # type: ignore[no-untyped-def]
    """A client to the coordinator, signed with the node's identity (as the node itself calls it)."""
    from confide import pki
    from confide.transport import ServiceClient

    settings = _settings(config)
    return ServiceClient(pki.load_identity(settings.pki_dir), "coordinator", settings.coordinator_url, timeout=60)


@model_app.command("list")
def model_list(config: Path = CONFIG, as_json: bool = typer.Option(False, "--json")) -> None:
    """Trained models of this party's agreements: version, agreement, sizes, epochs, AUC."""
    with coordinator_client(config) as c:
        models = c.get("/v1/models")
    if as_json:
        _print(models, True)
        return
    for m in models:  # one line per model, the full version first (`model show` takes it)
        hm = m.get("heldout_metrics") or {}
        auc = "suppressed" if hm.get("suppressed") else f"{hm['auc']:.4f} (guest only {hm['guest_only']['auc']:.4f})"
        typer.echo(f"{m['version']}  {m['agreement_id']} v{m['agreement_version']}  guest={m['guest']}  "
                   f"hosts={','.join(m['hosts'] or [])}  train_rows={m['data'].get('train_rows')}  "
                   f"features={'+'.join(str(v) for v in m['feature_counts'].values())}  "
                   f"epochs={m['training'].get('epochs')}  auc={auc}")


@model_app.command("show")
def model_show(version: str = typer.Argument(..., help="model version (the train job id)"), config: Path = CONFIG,
               as_json: bool = typer.Option(False, "--json")) -> None:
    """One model's registry entry."""
    with coordinator_client(config) as c:
        _print(c.get(f"/v1/models/{version}"), as_json)


@model_app.command("card")
def model_card(version: str = typer.Argument(..., help="model version (the train job id)"), config: Path = CONFIG,
               as_json: bool = typer.Option(False, "--json", help="JSON instead of Markdown"),
               output: Optional[Path] = typer.Option(None, "--output", "-o", help="write to this file")) -> None:
    """The model card: intended use, data sizes, feature counts, metrics vs guest-only,
    limitations, consent purposes, leakage notes."""
    with coordinator_client(config) as c:
        if as_json:
            text = json.dumps(c.get(f"/v1/models/{version}/card"), indent=2)
        else:
            text = c.request("GET", f"/v1/models/{version}/card.md", raw=True).decode()
    if output is not None:
        output.write_text(text)
        typer.echo(f"wrote {output}")
    else:
        typer.echo(text)
