"""`confide demo`: the end-to-end walk-through on one machine.

Starts a coordinator, a brand node and a partner node as separate processes on loopback with
mutual TLS, generates realistic synthetic data, registers the parties, proposes and signs an
agreement at each node, ingests the data, runs every job type the platform has, and writes a
report (terminal + HTML). Each stage is a function; later capabilities add theirs to `STAGES`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jinja2 import Environment, PackageLoader, select_autoescape
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from confide.errors import ConfideError, RemoteError
from confide.localnet import LocalNet

BRAND, PARTNER = "brand", "partner"
ID_COLUMNS = ("phone", "email", "openid", "unionid")
PROFILE_CATEGORICAL = ("income_level", "age_band", "car_insurance_status")
PROFILE_NUMERIC = ("purchase_intent_score", "interest_auto")
# Lead scoring: the brand's lead signals and the partner's app/interest signals (all small-range).
GUEST_FEATURES = ("test_drive_booked", "dealer_visits", "calls_answered", "wechat_interactions",
                  "configurator_sessions", "brochure_downloaded", "price_quote_requested", "financing_inquiry",
                  "trade_in_inquiry")
HOST_FEATURES = ("interest_auto", "interest_new_energy", "interest_luxury", "interest_finance",
                 "app_autohome_active", "app_dongchedi_active", "car_owner")


@dataclass
class DemoRun:
    out: Path
    scale: float
    seed: int
    console: Console
    net: LocalNet | None = None
    synth: dict[str, Any] = field(default_factory=dict)
    sections: list[dict[str, Any]] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)
    agreement: dict[str, Any] = field(default_factory=dict)
    model: str = ""

    def section(self, title: str, summary: str, rows: list[list[Any]] | None = None,
                header: list[str] | None = None) -> None:
        self.sections.append({"title": title, "summary": summary, "rows": rows or [], "header": header or []})
        table = Table(title=title, title_justify="left", show_header=bool(header))
        for h in header or [""]:
            table.add_column(str(h))
        for r in rows or []:
            table.add_row(*[str(c) for c in r])
        self.console.print(summary)
        if rows:
            self.console.print(table)

    def node(self, party: str):  # type: ignore[no-untyped-def]
        assert self.net is not None
        return self.net.client(party)

    def wait_job(self, job_id: str, progress: Progress, task: Any, timeout: float = 1800) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.node(BRAND) as c:
            while True:
                job = c.get(f"/v1/admin/jobs/{job_id}")
                done = sum(s["status"] == "succeeded" for s in job["steps"])
                progress.update(task, total=max(1, len(job["steps"])), completed=done)
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    return job
                if time.monotonic() > deadline:
                    raise ConfideError(f"job {job_id} did not finish in {timeout:.0f}s")
                time.sleep(0.25)


# --- stages -------------------------------------------------------------------------------------


def stage_synth(run: DemoRun, progress: Progress) -> None:
    from party_node import synth

    members = max(500, int(5_000 * run.scale))
    run.synth = synth.generate(run.out / "data", members=members, partner_factor=3.0, leads=members,
                               overlap=0.35, seed=run.seed, fmt="csv", brand_name=BRAND, partner_name=PARTNER)
    gt = json.loads((run.out / "data" / "ground_truth.json").read_text())
    files = sorted(p for p in (run.out / "data").iterdir() if p.suffix == ".csv")
    rows = [[p.name, f"{sum(1 for _ in p.open()) - 1:,}"] for p in files]
    auc = gt.get("lead_scoring_auc") or {}
    ov = gt.get("overlap") or {}

    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "n/a (too few rows)"

    run.section("Synthetic data", f"Generated {members:,} brand members (seed {run.seed}); "
                f"{num(ov.get('members_fraction'), '.0%')} of them are also in the partner population. Planted "
                f"ground truth on overlapped leads: achievable AUC {num(auc.get('brand_only'), '.3f')} with brand "
                f"features only, {num(auc.get('with_partner'), '.3f')} with the partner's too.",
                rows, ["file", "rows"])


def stage_services(run: DemoRun, progress: Progress) -> None:
    run.net = LocalNet(run.out / "deploy", [(BRAND, "brand"), (PARTNER, "partner")],
                       coordinator_settings={"poll_interval_s": 0.2})
    run.net.start_all()
    rows = [[name, svc.kind, svc.url, str(svc.config)] for name, svc in run.net.services.items()]
    run.section("Services", "Coordinator and two party nodes running as separate processes with mutual TLS.",
                rows, ["service", "kind", "url", "config"])


def stage_register(run: DemoRun, progress: Progress) -> None:
    rows = []
    for party in (BRAND, PARTNER):
        with run.node(party) as c:
            p = c.post("/v1/admin/register")
        rows.append([p["name"], p["role"], p["endpoint"], p["fingerprint"][:16] + "…"])
    run.section("Registry", "Both parties registered with their CA-issued certificates.", rows,
                ["party", "role", "endpoint", "cert fingerprint"])


def stage_ingest(run: DemoRun, progress: Progress) -> None:
    from confide import db
    from party_node import datasets as ds
    from party_node.storage import ensure_schema

    assert run.net is not None
    plan = {BRAND: ["brand_members", "brand_leads"], PARTNER: ["partner_population"]}
    rows = []
    for party, names in plan.items():
        from confide.settings import NodeSettings, load_settings

        settings = load_settings(NodeSettings, run.net.config(party))
        engine = db.make_engine(settings.resolved_database_url("node.db"))
        ensure_schema(engine)
        for name in names:
            schema = ds.load_schema(run.out / "data" / f"{name}.schema.yaml")
            report = ds.ingest(engine, run.out / "data" / f"{name}.csv", schema, replace=True)
            rows.append([party, schema.dataset, f"{report.rows:,}", f"{report.seconds:.2f}s"])
        engine.dispose()
    run.section("Ingest", "Each party loaded its own files into its own node database.", rows,
                ["party", "dataset", "rows", "time"])


def stage_consent(run: DemoRun, progress: Progress) -> None:
    """Each node imports its own consent records (events against exact notice versions)."""
    from consent.cli import open_store
    from consent.importer import import_file, read_notices

    from confide.settings import NodeSettings, load_settings

    assert run.net is not None
    rows = []
    for party in (BRAND, PARTNER):
        settings = load_settings(NodeSettings, run.net.config(party))
        other = PARTNER if party == BRAND else BRAND
        store = open_store(settings.database_url, settings.data_dir, None, [other])
        for notice in read_notices(run.out / "data" / f"{party}_notices.yaml"):
            store.register_notice(notice)
        t0 = time.perf_counter()
        result = import_file(store, run.out / "data" / f"{party}_consent.csv")
        rows.append([party, f"{result.recorded:,}", f"{result.duplicates:,}", f"{time.perf_counter() - t0:.1f}s"])
    run.section("Consent", "Each node imported its consent events (granted / refused / withdrawn, per purpose, "
                "against the notice version shown); the gate answers from them before any data moves.",
                rows, ["party", "events recorded", "duplicates", "time"])


def agreement_spec(run: DemoRun) -> dict[str, Any]:
    from confide.agreements import JOB_TYPES

    from coordinator.jobtypes import known_types

    jobs = [t for t in known_types() if t in JOB_TYPES]
    purpose_of = {"dataset-stats": "audience.overlap", "overlap": "audience.overlap", "match": "audience.match",
                  "profile": "audience.overlap", "train": "modeling.lead_scoring", "score": "scoring.lead",
                  "lookalike": "modeling.lookalike"}
    return {
        "agreement_id": "coffee-x-apptags-2026",
        "title": "Coffee chain members x app-interest partner: overlap, lead scoring",
        "parties": [
            {"name": BRAND, "role": "label_holder", "datasets": ["brand_members", "brand_leads"],
             "identifiers": [{"dataset": "brand_members", "column": c, "type": c} for c in ID_COLUMNS]
             + [{"dataset": "brand_leads", "column": "phone", "type": "phone"}],
             "columns": {"brand_leads": [*GUEST_FEATURES, "converted"]},
             "impact_assessment": "PIA-BRAND-2026-014"},
            {"name": PARTNER, "role": "feature_holder", "datasets": ["partner_population"],
             "identifiers": [{"dataset": "partner_population", "column": c, "type": c} for c in ID_COLUMNS],
             "columns": {"partner_population": list(dict.fromkeys(PROFILE_CATEGORICAL + PROFILE_NUMERIC
                                                                  + HOST_FEATURES))},
             "impact_assessment": "PIA-PARTNER-2026-003"},
        ],
        "purposes": ["audience", "modeling", "scoring"],
        "allowed_jobs": [{"type": t, "purpose": purpose_of.get(t, "audience.overlap"), "outputs": []} for t in jobs],
        "k_min": 50,
        "expires_at": (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=180)).isoformat(),
    }


def stage_agreement(run: DemoRun, progress: Progress) -> None:
    with run.node(BRAND) as c:
        doc = c.post("/v1/admin/agreements", agreement_spec(run))
        c.post(f"/v1/admin/agreements/{doc['agreement_id']}/versions/{doc['version']}/sign", {"digest": doc["digest"]})
    with run.node(PARTNER) as c:
        doc = c.post(f"/v1/admin/agreements/{doc['agreement_id']}/versions/{doc['version']}/sign",
                     {"digest": doc["digest"]})
    run.agreement = doc
    rows = [[p["name"], p["role"], ", ".join(p["datasets"]), p["impact_assessment"]] for p in doc["spec"]["parties"]]
    run.section("Agreement", f"{doc['agreement_id']} v{doc['version']} is {doc['status']}: signed by "
                f"{', '.join(sorted(doc['signatures']))} and counter-signed by the coordinator; digest "
                f"{doc['digest'][:16]}…; allowed jobs: {', '.join(j['type'] for j in doc['spec']['allowed_jobs'])}; "
                f"k_min {doc['spec']['k_min']}.", rows, ["party", "role", "datasets", "impact assessment"])


def run_job(run: DemoRun, progress: Progress, job_type: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    with run.node(BRAND) as c:
        job = c.post("/v1/admin/jobs", {"type": job_type, "agreement_id": run.agreement["agreement_id"],
                                        "params": params or {}})
    task = progress.add_task(f"job {job_type}", total=1)
    job = run.wait_job(job["id"], progress, task)
    if job["status"] != "succeeded":
        raise ConfideError(f"{job_type} job {job['id']} {job['status']}: {job['error']}")
    return job


def stage_dataset_stats(run: DemoRun, progress: Progress) -> None:
    job = run_job(run, progress, "dataset-stats")
    rows = []
    for party, res in job["result"]["parties"].items():
        for d in res["datasets"]:
            roles: dict[str, int] = {}
            for col in d["columns"]:
                roles[col["role"]] = roles.get(col["role"], 0) + 1
            rows.append([party, d["dataset"], f"{d['rows']:,}", ", ".join(f"{v} {k}" for k, v in sorted(roles.items()))])
    run.section("Job: dataset-stats", f"Job {job['id'][:8]} succeeded: row counts and schema per party, nothing else.",
                rows, ["party", "dataset", "rows", "columns"])


def private(run: DemoRun, party: str, job_id: str) -> dict[str, Any]:
    with run.node(party) as c:
        return c.get(f"/v1/admin/jobs/{job_id}/private")


def stage_overlap(run: DemoRun, progress: Progress) -> None:
    job = run_job(run, progress, "overlap", {"id_types": ["phone"]})
    mine = next(iter(private(run, BRAND, job["id"]).values()))
    theirs = next(iter(private(run, PARTNER, job["id"]).values()))
    ov = mine["overlap"]
    shown = "suppressed (below k_min)" if ov["suppressed"] else f"{ov['intersection_size']:,}"
    rows = [[BRAND, f"{mine['gate']['rows']:,}", f"{mine['gate']['consented_rows']:,}",
             json.dumps(mine['gate']['denied']), shown],
            [PARTNER, f"{theirs['gate']['rows']:,}", f"{theirs['gate']['consented_rows']:,}",
             json.dumps(theirs['gate']['denied']), "not told (agreement)"]]
    run.section("Job: overlap (PSI cardinality on phone)",
                f"Job {job['id'][:8]}: X25519 commutative blinding over the encrypted relay, "
                f"{mine['bytes_sent'] + mine['bytes_received']:,} bytes exchanged, {mine['seconds']}s. The brand "
                f"learns |A∩B| = {shown} among consented members; the coordinator saw only set sizes "
                f"{job['result']['set_sizes']}.", rows,
                ["party", "rows", "consented (audience.overlap)", "denied by reason", "overlap learned"])


def stage_match(run: DemoRun, progress: Progress) -> None:
    job = run_job(run, progress, "match", {"id_types": list(ID_COLUMNS)})
    rows = []
    for party in (BRAND, PARTNER):
        res = next(iter(private(run, party, job["id"]).values()))
        rows.append([party, f"{res['gate']['consented_rows']:,}", f"{res['matched_rows']:,}",
                     ", ".join(f"{k} {v:,}" for k, v in res["matched_by_type"].items())])
    run.section("Job: match (waterfall phone → email → OpenID → UnionID)",
                f"Job {job['id'][:8]}: each side learned which of its own consented rows matched and stored one "
                "opaque join key per matched pair at its node (for training and scoring); nothing about other rows.",
                rows, ["party", "consented rows", "matched rows", "matched by key type"])


def stage_profile(run: DemoRun, progress: Progress) -> None:
    job = run_job(run, progress, "profile", {"id_types": ["phone"], "categorical": list(PROFILE_CATEGORICAL),
                                             "numeric": list(PROFILE_NUMERIC)})
    prof = next(iter(private(run, BRAND, job["id"]).values()))["profile"]
    rows = []
    for c in prof["cells"]:
        val = "suppressed (< k_min)" if c["suppressed"] else (
            f"{c['result']:,.2f}" if isinstance(c["result"], float) else f"{c['result']:,}")
        rows.append([c["column"], c["kind"], c["value"] or "", val])
    run.section("Job: profile (partner attributes of the overlap)",
                f"Job {job['id'][:8]}: Paillier intersection-sum; the brand learns aggregates of the partner's agreed "
                f"columns over |A∩B| = {prof['intersection_size']}, each cell below k_min suppressed; the partner "
                "learns only |A∩B|; no per-person value leaves the partner.", rows, ["column", "aggregate", "value", "result"])


def stage_train(run: DemoRun, progress: Progress) -> None:
    match = run_job(run, progress, "match", {"id_types": ["phone"], "dataset": "brand_leads"})
    try:
        job = run_job(run, progress, "train", {
            "match_job": match["id"], "label": "converted", "guest_features": list(GUEST_FEATURES),
            "host_features": {PARTNER: list(HOST_FEATURES)}, "test_fraction": 0.3, "seed": run.seed})
    except ConfideError as exc:
        # Too few consented, matched rows: the nodes refuse rather than risk leaking labels.
        run.section("Job: train (vertical logistic regression, Paillier)",
                    f"Refused, as designed, at this data size: {exc.message}. Run the demo with a larger --scale.")
        return
    res = next(iter(private(run, BRAND, job["id"]).values()))
    metrics = res.get("metrics", res)
    run.model = job["id"]
    keys = ("auc", "guest_only_auc", "ks", "pr_auc", "lift_top_decile")
    rows = [[k, f"{metrics[k]:.3f}" if isinstance(metrics.get(k), (int, float)) else str(metrics.get(k))]
            for k in keys if k in metrics]
    reg = job["result"]
    rows.append(["rows: matched / consented at both nodes / train / held-out",
                 f"{res.get('matched_rows')} / {res.get('rows')} / {res.get('train_rows')} / {res.get('test_rows')}"])
    run.section("Job: train (vertical logistic regression, Paillier)",
                f"Match job {match['id'][:8]} aligned the brand's leads with the partner by opaque join keys; train "
                f"job {job['id'][:8]} ran guest (brand labels + lead signals), host (partner signals) and the "
                "arbiter at the coordinator (2048-bit Paillier). Held-out metrics stay at the brand; the coordinator "
                "keeps only a registry entry (version, agreement, features, sizes, config). At demo scale the set of "
                "leads known to both parties and consented at both is small, so these metrics are noisy; "
                "bench/RESULTS.md has the quality benchmark on real data (default-credit).",
                rows, ["metric (held-out)", "value"])


def stage_score(run: DemoRun, progress: Progress) -> None:
    if not run.model:
        run.section("Job: score (0-1 lead scores for the brand)", "Skipped: no model was trained.")
        return
    job = run_job(run, progress, "score", {"model": run.model, "dataset": "brand_leads"})
    res = next(iter(private(run, BRAND, job["id"]).values()))
    scores = res.get("scores", [])
    missing = sum(1 for x in scores if x.get("partner_missing"))
    top = sorted(scores, key=lambda x: -x.get("score", 0))[:5]
    rows = [[x.get("lead", x.get("row_key", "?")), f"{x.get('score', 0):.3f}", str(x.get("partner_missing"))]
            for x in top]
    run.section("Job: score (0-1 lead scores for the brand)",
                f"Scored {len(scores):,} leads with model {run.model[:8]}: {len(scores) - missing:,} with the "
                f"partner's signals, {missing:,} from the brand's part alone (partner_missing); leads opted out of "
                "personalised marketing were not scored. Top leads:", rows, ["lead", "score", "partner missing"])


STAGES: list[tuple[str, Callable[[DemoRun, Progress], None]]] = [
    ("generate synthetic data", stage_synth),
    ("start services (mTLS)", stage_services),
    ("register parties", stage_register),
    ("ingest datasets", stage_ingest),
    ("import consent records", stage_consent),
    ("propose and sign agreement", stage_agreement),
    ("dataset-stats job", stage_dataset_stats),
    ("overlap job (PSI)", stage_overlap),
    ("match job (PSI waterfall)", stage_match),
    ("profile job (PSI + Paillier)", stage_profile),
    ("train job (vertical FL)", stage_train),
    ("score job", stage_score),
]


def write_html(run: DemoRun) -> Path:
    env = Environment(loader=PackageLoader("confide", "templates"), autoescape=select_autoescape())
    html = env.get_template("report.html.j2").render(
        sections=run.sections, timings=run.timings, generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        scale=run.scale, seed=run.seed)
    path = run.out / "report.html"
    path.write_text(html)
    return path


def demo(out: Path, *, scale: float = 1.0, seed: int = 42, keep: bool = False) -> Path:
    """Run the whole demo; returns the HTML report's path. Raises ConfideError on failure."""
    console = Console()
    if out.exists() and not keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    run = DemoRun(out=out, scale=scale, seed=seed, console=console)
    try:
        with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as progress:
            overall = progress.add_task("demo", total=len(STAGES))
            for name, fn in STAGES:
                progress.update(overall, description=name)
                t0 = time.perf_counter()
                fn(run, progress)
                run.timings.append((name, time.perf_counter() - t0))
                progress.advance(overall)
        path = write_html(run)
        table = Table("stage", "seconds", title="Demo timings", title_justify="left")
        for name, secs in run.timings:
            table.add_row(name, f"{secs:.1f}")
        console.print(table)
        console.print(f"[green]Demo finished.[/green] HTML report: {path}")
        return path
    except (ConfideError, RemoteError):
        if run.net is not None:
            for name in run.net.services:
                console.print(f"--- last log lines of {name} ---\n{run.net.tail(name)}")
        raise
    finally:
        if run.net is not None:
            run.net.stop_all()
