"""`confide demo`: the end-to-end walk-through on one machine.

Starts a coordinator, a brand node and a partner node as separate processes on loopback with
mutual TLS, generates realistic synthetic data, registers the parties, proposes and signs an
agreement at each node, ingests the data, runs every job type the platform has, and writes a
report (terminal + HTML). Each stage is a function; later capabilities add theirs to `STAGES`.
"""

from __future__ import annotations

import csv
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
from party_node import synth

BRAND, PARTNER = "brand", "partner"
ID_COLUMNS = ("phone", "email", "openid", "unionid")
PROFILE_CATEGORICAL = ("income_level", "age_band", "car_insurance_status")
PROFILE_NUMERIC = ("purchase_intent_score", "interest_auto")
# Lead scoring: the brand's lead signals (activity counts and flags, lead grade, budget band) and
# the partner's app, interest, intent, income and car-insurance signals. Each node standardises
# its numeric columns and one-hot encodes its categorical ones itself (party_node.features).
GUEST_FEATURES = tuple(synth.LEAD_MODEL_FEATURES + synth.LEAD_MODEL_CATEGORICAL)
HOST_FEATURES = tuple(synth.PARTNER_MODEL_FEATURES + synth.PARTNER_MODEL_CATEGORICAL)
LEAD_DATASETS = ("brand_leads", "brand_new_leads")
# Data sizes at --scale 1: sized so that a few thousand leads are matched and consented at both
# nodes (the training set) while the whole demo stays within a few minutes on two cores.
MEMBERS, LEADS, NEW_LEADS = 3_000, 12_000, 2_000
PARTNER_FACTOR, OVERLAP, LEAD_OVERLAP = 3.0, 0.35, 0.6
TEST_FRACTION = 0.5  # a large held-out set: steadier metrics, and only training rows are encrypted
SCORE_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


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
    facts: dict[str, Any] = field(default_factory=dict)  # numbers from the jobs, for the summary

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


def _fmt(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"


def stage_synth(run: DemoRun, progress: Progress) -> None:
    members = max(500, int(MEMBERS * run.scale))
    leads, new_leads = max(1_000, int(LEADS * run.scale)), max(200, int(NEW_LEADS * run.scale))
    run.synth = synth.generate(run.out / "data", members=members, partner_factor=PARTNER_FACTOR, leads=leads,
                               new_leads=new_leads, overlap=OVERLAP, lead_overlap=LEAD_OVERLAP, seed=run.seed,
                               fmt="csv", brand_name=BRAND, partner_name=PARTNER)
    gt = json.loads((run.out / "data" / "ground_truth.json").read_text())
    rows = [[name, f"{info['rows']:,}"] for name, info in run.synth["files"].items() if "rows" in info]
    auc, model_auc = gt["lead_scoring_auc"], gt["lead_scoring_auc_model_features"]
    run.facts["truth"] = {"all": auc, "model": model_auc, "new_leads": gt["new_leads"]}
    ov = gt["overlap"]
    run.section("Synthetic data", f"Generated {members:,} brand members, {leads:,} historical leads (outcome known) "
                f"and {new_leads:,} new leads to score (seed {run.seed}); {_fmt(ov['members_fraction'], '.0%')} of the "
                f"members and {_fmt(ov['leads_fraction'], '.0%')} of the leads are also in the partner population. "
                f"Planted ground truth on the overlapped leads (plaintext logistic regression on pooled data, which "
                f"no party could do): AUC {_fmt(model_auc['brand_only'], '.3f')} with the brand's lead signals only, "
                f"{_fmt(model_auc['with_partner'], '.3f')} with the partner's too — the features the federated model "
                f"uses below; with every column, categorical ones included, {_fmt(auc['brand_only'], '.3f')} → "
                f"{_fmt(auc['with_partner'], '.3f')} (ceiling: the planted propensity, {_fmt(auc['oracle'], '.3f')}).",
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
    plan = {BRAND: ["brand_members", *LEAD_DATASETS], PARTNER: ["partner_population"]}
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
        opted = 0
        prefs = run.out / "data" / f"{party}_preferences.csv"
        if prefs.exists():
            # "No personalised marketing" switches, as a mini-program backend sets them.
            with prefs.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    store.set_preferences(row["subject"], {"no_personalised_marketing": row["no_personalised_marketing"] == "1",
                                                           "channel": row["channel"], "actor": "subject"})
                    opted += 1
        rows.append([party, f"{result.recorded:,}", f"{result.duplicates:,}", f"{opted:,}",
                     f"{time.perf_counter() - t0:.1f}s"])
    run.section("Consent", "Each node imported its consent events (granted / refused / withdrawn, per purpose, "
                "against the notice version shown) and its subjects' \"no personalised marketing\" switches "
                "(PIPL Art. 24); the gate answers from them before any data moves.",
                rows, ["party", "events recorded", "duplicates", "opted out of personalised marketing", "time"])


def agreement_spec(run: DemoRun) -> dict[str, Any]:
    from confide.agreements import JOB_TYPES

    from coordinator.jobtypes import known_types

    jobs = [t for t in known_types() if t in JOB_TYPES]
    purpose_of = {"dataset-stats": "audience.overlap", "overlap": "audience.overlap", "match": "audience.match",
                  "profile": "audience.overlap", "train": "modeling.lead_scoring", "score": "scoring.lead",
                  "lookalike": "modeling.lookalike"}
    return {
        "agreement_id": "auto-x-apptags-2026",
        "title": "Auto brand members and leads x app-interest partner: overlap, lead scoring",
        "parties": [
            {"name": BRAND, "role": "label_holder", "datasets": ["brand_members", *LEAD_DATASETS],
             "identifiers": [{"dataset": "brand_members", "column": c, "type": c} for c in ID_COLUMNS]
             + [{"dataset": d, "column": "phone", "type": "phone"} for d in LEAD_DATASETS],
             "columns": {"brand_leads": [*GUEST_FEATURES, "converted"], "brand_new_leads": list(GUEST_FEATURES)},
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


def _denied(gate: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(gate.items())) or "none"


def stage_train(run: DemoRun, progress: Progress) -> None:
    title = "Job: train (vertical logistic regression, Paillier)"
    match = run_job(run, progress, "match", {"id_types": ["phone"], "dataset": "brand_leads"})
    try:
        job = run_job(run, progress, "train", {
            "match_job": match["id"], "label": "converted", "guest_features": list(GUEST_FEATURES),
            "host_features": {PARTNER: list(HOST_FEATURES)}, "test_fraction": TEST_FRACTION, "seed": run.seed})
    except ConfideError as exc:
        # Too few consented, matched rows: the nodes refuse rather than risk leaking labels.
        run.section(title, f"Refused, as designed, at this data size: {exc.message}. Run the demo with a larger --scale.")
        return
    res = next(iter(private(run, BRAND, job["id"]).values()))
    host = next(iter(private(run, PARTNER, job["id"]).values()))
    joint, gonly = res["metrics"], res["metrics"]["guest_only"]
    run.model = job["id"]
    truth = run.facts.get("truth", {}).get("model", {})
    run.facts["train"] = {
        "matched_rows": res["matched_rows"], "rows": res["rows"], "train_rows": res["train_rows"],
        "test_rows": res["test_rows"], "positive_rate": joint["positive_rate"], "epochs": res["epochs"],
        "joint": {k: joint[k] for k in ("auc", "ks", "pr_auc", "lift_top_decile")},
        "guest_only": {k: gonly[k] for k in ("auc", "ks", "pr_auc", "lift_top_decile")},
        "auc_gain": joint["auc"] - gonly["auc"], "seconds": res["seconds"],
        "setup_seconds": res.get("setup_seconds"), "train_seconds": res.get("train_seconds"),
        "features": {BRAND: len(GUEST_FEATURES), PARTNER: len(HOST_FEATURES)},
    }
    names = {"auc": "AUC", "ks": "KS", "pr_auc": "PR-AUC (average precision)",
             "lift_top_decile": "lift in the top decile (x base rate)"}
    rows = [[names[k], f"{gonly[k]:.3f}", f"{joint[k]:.3f}", f"{joint[k] - gonly[k]:+.3f}"] for k in names]
    rows.append(["planted ground truth AUC (pooled plaintext, same features)", _fmt(truth.get("brand_only"), ".3f"),
                 _fmt(truth.get("with_partner"), ".3f"), ""])
    gate = res["gate"]
    run.section(title,
                f"Match job {match['id'][:8]} aligned the brand's historical leads with the partner by opaque join "
                f"keys: {res['matched_rows']:,} matched leads, {res['rows']:,} of them consented to "
                f"modeling.lead_scoring at both nodes (brand denied: {_denied(gate['denied'])}; partner denied: "
                f"{_denied(host['gate']['denied'])}). Train job {job['id'][:8]} trained on {res['train_rows']:,} "
                f"of them and held out {res['test_rows']:,} (conversion rate {joint['positive_rate']:.1%}): guest = "
                f"brand (labels + {len(GUEST_FEATURES)} lead signals), host = partner ({len(HOST_FEATURES)} app, intent, "
                f"income and insurance signals; each node standardises its numeric columns and one-hot encodes its "
                f"categorical ones itself), arbiter = coordinator (2048-bit Paillier), {res['epochs']} epochs, "
                f"{res['seconds']:.0f}s. The brand-only model is trained the same way on the same rows. With the "
                f"partner's signals the held-out AUC goes from {gonly['auc']:.3f} to {joint['auc']:.3f} "
                f"({joint['auc'] - gonly['auc']:+.3f}) and the top decile holds {joint['lift_top_decile']:.1f}x the "
                f"base rate of buyers instead of {gonly['lift_top_decile']:.1f}x. Metrics stay at the brand; the "
                "partner keeps its weights; the coordinator keeps a registry entry (version, features, sizes).",
                rows, ["held-out metric", "brand only", "brand + partner", "partner's lift"])


def _score_bins(scores: list[float]) -> list[list[Any]]:
    import numpy as np

    counts, _ = np.histogram(np.asarray(scores, dtype=float), bins=np.asarray(SCORE_BINS))
    total = max(1, len(scores))
    return [[f"{lo:.1f}–{hi:.1f}", f"{c:,}", f"{c / total:.1%}", "█" * int(round(40 * c / total))]
            for lo, hi, c in zip(SCORE_BINS[:-1], SCORE_BINS[1:], counts)]


def _realised(run: DemoRun, scores: list[dict[str, Any]]) -> dict[str, Any]:
    """The new leads' scores against what became of them (the synth's outcomes file, which no
    party held at scoring time): AUC overall and per kind of score."""
    from sklearn.metrics import roc_auc_score

    with (run.out / "data" / "brand_new_leads_outcomes.csv").open(newline="") as fh:
        outcome = {r["lead_id"]: int(r["converted"]) for r in csv.DictReader(fh)}
    out: dict[str, Any] = {}
    for name, keep in (("all", lambda x: True), ("joint", lambda x: not x["partner_missing"]),
                       ("partner_missing", lambda x: x["partner_missing"])):
        sel = [x for x in scores if keep(x)]
        y = [outcome[x["lead"]] for x in sel]
        ok = len(set(y)) == 2
        out[name] = {"leads": len(sel), "converted": sum(y),
                     "auc": float(roc_auc_score(y, [x["score"] for x in sel])) if ok else None}
    return out


def stage_score(run: DemoRun, progress: Progress) -> None:
    title = "Job: score (0-1 scores for the new leads)"
    if not run.model:
        run.section(title, "Skipped: no model was trained.")
        return
    match = run_job(run, progress, "match", {"id_types": ["phone"], "dataset": "brand_new_leads"})
    job = run_job(run, progress, "score", {"model": run.model, "dataset": "brand_new_leads", "match_job": match["id"]})
    res = next(iter(private(run, BRAND, job["id"]).values()))
    host = next(iter(private(run, PARTNER, job["id"]).values()))
    scores = res["scores"]
    missing = sum(1 for x in scores if x["partner_missing"])
    realised = _realised(run, scores)
    run.facts["score"] = {"leads": res["leads"], "scored": res["scored"], "partner_missing": res["partner_missing"],
                          "not_scored": res["not_scored"], "denied": res["denied"], "realised": realised,
                          "partner_contributed": host["contributed"], "seconds": res["seconds"]}
    run.section(title,
                f"The brand ingested {res['leads']:,} new leads (the last two weeks, outcome unknown) and matched them "
                f"(job {match['id'][:8]}); score job {job['id'][:8]} with model {run.model[:8]} scored {res['scored']:,}: "
                f"{res['scored'] - missing:,} jointly with the partner's signals (the partner contributed "
                f"{host['contributed']:,} partial scores and learned only which join keys were scored), "
                f"{missing:,} from the brand's part alone (partner_missing: true — the partner does not know them or "
                f"may not use their data). {res['not_scored']:,} leads were not scored: no consent to scoring.lead or "
                f"opted out of personalised marketing ({_denied(res['denied'])}). Scores stay at the brand, each "
                "logged with its model version. Distribution of the scores:",
                _score_bins([x["score"] for x in scores]), ["score", "leads", "share", ""])
    top = sorted(scores, key=lambda x: -x["score"])[:5]
    rows = [[x["lead"], f"{x['score']:.3f}", "yes" if x["partner_missing"] else "no", x["model_version"][:8]] for x in top]
    real = [[k, f"{v['leads']:,}", f"{v['converted']:,}", _fmt(v["auc"], ".3f")] for k, v in realised.items()]
    run.section("New leads: the follow-up list", "The five highest-scored new leads (what the sales team calls "
                "first).", rows, ["lead", "score", "partner missing", "model"])
    oracle = run.facts.get("truth", {}).get("new_leads", {}).get("oracle_auc")
    run.section("New leads: 90 days later",
                "The new leads' scores against what the leads then did — the synthetic data's outcomes file, which no "
                "party held at scoring time; the brand would see this a quarter later. For reference, the planted "
                f"propensity itself reaches AUC {_fmt(oracle, '.3f')} on these leads.",
                real, ["scored leads", "leads", "converted", "realised AUC"])


def stage_summary(run: DemoRun, progress: Progress) -> None:
    t, sc = run.facts.get("train"), run.facts.get("score")
    if not t:
        run.section("The partner's value", "No model was trained at this scale, so there is nothing to compare.")
        return
    truth = run.facts.get("truth", {}).get("model", {})
    rows = [
        ["training rows (matched and consented at both nodes)", f"{t['rows']:,} ({t['train_rows']:,} train / "
                                                                f"{t['test_rows']:,} held out)"],
        ["held-out AUC, brand only → with partner", f"{t['guest_only']['auc']:.3f} → {t['joint']['auc']:.3f} "
                                                    f"({t['auc_gain']:+.3f})"],
        ["held-out KS, brand only → with partner", f"{t['guest_only']['ks']:.3f} → {t['joint']['ks']:.3f}"],
        ["top-decile lift, brand only → with partner", f"{t['guest_only']['lift_top_decile']:.2f}x → "
                                                       f"{t['joint']['lift_top_decile']:.2f}x"],
        ["ground truth AUC (pooled plaintext), brand only → with partner",
         f"{_fmt(truth.get('brand_only'), '.3f')} → {_fmt(truth.get('with_partner'), '.3f')}"],
    ]
    if sc:
        rows += [["new leads: scored jointly / brand part only (partner_missing) / not scored",
                  f"{sc['scored'] - sc['partner_missing']:,} / {sc['partner_missing']:,} / {sc['not_scored']:,}"],
                 ["new leads: realised AUC, joint scores / partner_missing scores",
                  f"{_fmt(sc['realised']['joint']['auc'], '.3f')} / {_fmt(sc['realised']['partner_missing']['auc'], '.3f')}"]]
    (run.out / "facts.json").write_text(json.dumps(run.facts, indent=2, default=str) + "\n")
    run.section("The partner's value", "Every number comes from the jobs above (also in facts.json next to this "
                "report).", rows, ["measure", "value"])


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
    ("score new leads", stage_score),
    ("summary", stage_summary),
]


def write_html(run: DemoRun) -> Path:
    env = Environment(loader=PackageLoader("confide", "templates"), autoescape=select_autoescape())
    html = env.get_template("report.html.j2").render(
        sections=run.sections, timings=run.timings, generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        scale=run.scale, seed=run.seed, facts=run.facts)
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
