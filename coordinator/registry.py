"""The model registry and model cards of vertical training (docs/vfl.md §4b).

A trained model's registry entry is the result of its succeeded `train` job (written in the
same transaction that marks the job succeeded, so there is never an entry without a model or
the reverse); the model version is the job id. Served to the parties of the job's agreement:

    GET /v1/models                       entries of the caller's agreements, newest first
    GET /v1/models/{version}             one entry
    GET /v1/models/{version}/card        the model card (JSON)
    GET /v1/models/{version}/card.md     the model card (Markdown)

Anyone else gets 404, as for a version that does not exist.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Depends, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from confide import agreements as ag
from confide.auth import Peer
from confide.db import session_scope
from confide.errors import NotFound
from coordinator import service
from coordinator.storage.models import Job

METRICS = ("auc", "ks", "pr_auc", "lift_top_decile", "brier", "ece")


def entry(job: Job) -> dict[str, Any]:
    """The registry entry of a succeeded train job."""
    res = dict(job.result or {})
    model = res.get("model", {})
    return {
        "version": job.id,
        "agreement_id": job.agreement_id,
        "agreement_version": job.version,
        "requester": job.requester,
        "trained_at": job.finished_at.isoformat() if job.finished_at else None,
        "guest": model.get("guest", job.params.get("guest")),
        "hosts": model.get("hosts", job.params.get("hosts")),
        "label": model.get("label"),
        "match_job": model.get("match_job"),
        "source_columns": model.get("features", {}),
        "feature_counts": model.get("feature_counts", {}),
        "data": res.get("data", {}),
        "training": res.get("training", {}),
        "heldout_metrics": res.get("heldout_metrics", {"suppressed": True, "reason": "not reported"}),
    }


def _readable(session: Session, version: str, party: str) -> tuple[Job, ag.AgreementSpec]:
    try:
        job = service.get_job(session, version, party)  # NotFound unless a party of its agreement
    except NotFound:
        raise NotFound(f"model version {version!r} does not exist") from None
    if job.type != "train" or job.status != "succeeded":
        raise NotFound(f"model version {version!r} does not exist (job {version} is a {job.status} {job.type} job)")
    spec = ag.AgreementSpec.model_validate(service.get_version(session, job.agreement_id, job.version).spec)
    return job, spec


def list_models(session: Session, party: str) -> list[dict[str, Any]]:
    mine = {av.agreement_id for av in service.list_for(session, party)}
    if not mine:
        return []
    jobs = session.scalars(select(Job).where(Job.type == "train", Job.status == "succeeded",
                                             Job.agreement_id.in_(mine)).order_by(Job.finished_at.desc()))
    out = []
    for job in jobs:
        spec = ag.AgreementSpec.model_validate(service.get_version(session, job.agreement_id, job.version).spec)
        if party in {p.name for p in spec.parties}:
            out.append(entry(job))
    return out


def _purpose(spec: ag.AgreementSpec, job_type: str) -> str | None:
    try:
        return spec.rule(job_type).purpose
    except Exception:  # noqa: BLE001 - the agreement does not allow that job
        return None


def card(job: Job, spec: ag.AgreementSpec) -> dict[str, Any]:
    """The model card: what the model is for, what it was trained on, how good it is (and
    compared with the brand's own data alone), its limits and what its training revealed."""
    e = entry(job)
    m = e["heldout_metrics"]
    metrics: dict[str, Any]
    if m.get("suppressed"):
        metrics = {"suppressed": True, "reason": m.get("reason")}
    else:
        go = m.get("guest_only", {})
        metrics = {"heldout_rows": m.get("rows"),
                   "federated": {k: m.get(k) for k in METRICS},
                   "guest_only": {k: go.get(k) for k in METRICS},
                   "partner_gain": {k: round(m[k] - go[k], 6) for k in ("auc", "ks", "pr_auc", "lift_top_decile")
                                    if isinstance(m.get(k), (int, float)) and isinstance(go.get(k), (int, float))}}
    cfg = e["training"].get("config", {})
    hosts = e["hosts"] or []
    train_purpose, score_purpose = _purpose(spec, "train"), _purpose(spec, "score")
    return {
        "model_version": e["version"],
        "title": f"Lead-scoring model {e['version'][:8]} ({spec.title})",
        "intended_use": (f"Scoring {e['guest']}'s leads 0-1 with features held by {', '.join(hosts)}, through "
                         f"`score` jobs under agreement {e['agreement_id']}"
                         + (f" for purpose {score_purpose}" if score_purpose else "")
                         + ". Not for decisions about individuals with legal or similarly significant effects, "
                         "and not outside the agreement."),
        "agreement": {"id": e["agreement_id"], "version": e["agreement_version"], "title": spec.title,
                      "k_min": spec.k_min},
        "consent_purposes": {"training": train_purpose, "scoring": score_purpose},
        "parties": {"guest (labels, own features)": e["guest"], "hosts (features)": hosts},
        "label": e["label"],
        "data": {**e["data"], "aligned_by": f"match job {e['match_job']} (PSI join keys), consent-gated at every node"},
        "features": {"source_columns": e["source_columns"], "model_columns": e["feature_counts"],
                     "encoding": "categorical columns one-hot at their own node (agreed or top values + other); "
                                 "numeric columns standardised on the training rows"},
        "training": {"algorithm": f"vertical logistic regression, loss {cfg.get('loss', 'taylor')}, Paillier "
                                  f"{cfg.get('key_bits')}-bit, arbiter at the coordinator",
                     "epochs": e["training"].get("epochs"), "stop_reason": e["training"].get("stop_reason"),
                     "final_loss": (e["training"].get("losses") or [None])[-1],
                     "config": cfg},
        "metrics": metrics,
        "limitations": [
            "Linear model: interactions between features are not learnt unless given as columns.",
            "Trained only on leads the partner(s) matched and that passed every node's consent gate; leads the "
            "partner does not know are scored with the brand-only model (partner_missing).",
            "Metrics come from one held-out split of the matched rows; they are reported only when the "
            "held-out rows number at least k_min.",
            "Categories unseen in training fall into each column's 'other' indicator.",
        ],
        "leakage": [
            "Per-row feature values and labels never left their nodes; party-to-party ciphertexts were end-to-end "
            "encrypted through the coordinator.",
            "The coordinator (arbiter) decrypted only uniformly masked aggregates; it learnt the per-epoch loss, "
            "the held-out scores and this card's aggregates.",
            "Each party learnt its own gradient's batch aggregates (as in FATE); the partner learnt the number "
            "of training rows and the losses, not labels, scores or metrics beyond this card.",
            "Scores of an additive model let the brand compute the partners' combined partial logit per scored "
            "lead (docs/vfl.md §2).",
        ],
    }


def card_markdown(c: dict[str, Any]) -> str:
    lines = [f"# {c['title']}", "", f"Model version `{c['model_version']}`", "", "## Intended use", "",
             c["intended_use"], "",
             "## Agreement and consent", "",
             f"- Agreement `{c['agreement']['id']}` v{c['agreement']['version']} — {c['agreement']['title']} "
             f"(k_min = {c['agreement']['k_min']})",
             f"- Consent purpose for training: `{c['consent_purposes']['training']}`; for scoring: "
             f"`{c['consent_purposes']['scoring']}`",
             f"- Guest: {c['parties']['guest (labels, own features)']}; hosts: "
             f"{', '.join(c['parties']['hosts (features)'])}", "",
             "## Data", "",
             f"- Label: `{c['label']}`",
             f"- Training rows: {c['data'].get('train_rows')}; held-out rows: {c['data'].get('test_rows')}",
             f"- Rows aligned by {c['data']['aligned_by']}", "",
             "## Features", "", "| party | source columns | model columns |", "|---|---|---|"]
    for party, cols in c["features"]["source_columns"].items():
        lines.append(f"| {party} | {len(cols)} | {c['features']['model_columns'].get(party)} |")
    lines += ["", c["features"]["encoding"], "", "## Training", "",
              f"- {c['training']['algorithm']}",
              f"- Epochs: {c['training']['epochs']} ({c['training']['stop_reason']}); final training loss: "
              f"{c['training']['final_loss']}", "", "## Held-out metrics", ""]
    m = c["metrics"]
    if m.get("suppressed"):
        lines.append(f"Suppressed: {m.get('reason')}.")
    else:
        lines += [f"{m['heldout_rows']} held-out rows.", "", "| metric | federated | guest only | gain |",
                  "|---|---|---|---|"]
        for k in METRICS:
            gain = m["partner_gain"].get(k)
            lines.append(f"| {k} | {m['federated'][k]:.4f} | {m['guest_only'][k]:.4f} | "
                         f"{'' if gain is None else f'{gain:+.4f}'} |")
    lines += ["", "## Limitations", "", *[f"- {x}" for x in c["limitations"]], "", "## Leakage", "",
              *[f"- {x}" for x in c["leakage"]], ""]
    return "\n".join(lines)


def registry_router(coord: Any, party_dep: Callable[..., Any]) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    def models(peer: Peer = Depends(party_dep)) -> list[dict[str, Any]]:
        with session_scope(coord.factory) as s:
            return list_models(s, peer.name)

    @router.get("/v1/models/{version}")
    def model(version: str, peer: Peer = Depends(party_dep)) -> dict[str, Any]:
        with session_scope(coord.factory) as s:
            job, _ = _readable(s, version, peer.name)
            return entry(job)

    @router.get("/v1/models/{version}/card")
    def model_card(version: str, peer: Peer = Depends(party_dep)) -> dict[str, Any]:
        with session_scope(coord.factory) as s:
            job, spec = _readable(s, version, peer.name)
            return card(job, spec)

    @router.get("/v1/models/{version}/card.md")
    def model_card_md(version: str, peer: Peer = Depends(party_dep)) -> Response:
        with session_scope(coord.factory) as s:
            job, spec = _readable(s, version, peer.name)
            text = card_markdown(card(job, spec))
        return Response(content=text, media_type="text/markdown; charset=utf-8")

    return router
