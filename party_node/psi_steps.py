"""A node's side of the PSI jobs (`overlap`, `match`): consent gate, normalise, run the role
over the relay, keep the result at the node.

Only the set size goes back to the coordinator; the overlap size (for the requester, and for
the responder only if the agreement's outputs say `overlap_size_to_partner`) and the match
counts stay in the node's private step result; join keys go to `psi_matches`.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from sqlalchemy import delete

from confide.db import session_scope
from confide.errors import AgreementError, ValidationError
from party_node.relay import RelayChannel
from party_node.steps import PRIVATE, StepContext, register
from party_node.storage.models import PsiMatch

REVEAL_TO_PARTNER = "overlap_size_to_partner"
SMALL = 50_000  # below this many items per side, blinding in-process beats starting a pool


def _inputs(ctx: StepContext, id_types: list[str], extra: list[str] = ()) -> tuple[str, str, Any]:  # type: ignore[assignment]
    """The dataset, its key column and the frame of key + identifier columns for `id_types`."""
    from party_node import datasets as ds

    me = ctx.me
    specs = {}
    wanted = ctx.params.get("dataset") if me.name == ctx.params.get("requester_party") else None
    for t in id_types:
        found = [i for i in me.identifiers if i.type == t and (wanted is None or i.dataset == wanted)]
        if not found:
            raise AgreementError(f"the agreement names no {t!r} identifier of {me.name!r}")
        specs[t] = found[0]
    datasets = {s.dataset for s in specs.values()}
    if len(datasets) != 1:
        raise ValidationError("a PSI job matches records of one dataset: the agreed identifier types "
                              f"come from {sorted(datasets)}")
    dataset = datasets.pop()
    with session_scope(ctx.node.factory) as s:
        info = ds.describe(s, dataset)
    key = next(c["column"] for c in info["columns"] if c["role"] == "key")
    cols = [key] + [specs[t].column for t in id_types] + list(extra)
    frame = ds.load_frame(ctx.node.engine, dataset, list(dict.fromkeys(cols)))
    return dataset, key, (frame, {t: specs[t].column for t in id_types})


def _drive(role: Any, channel: RelayChannel, peer: str, first: list[Any]) -> None:
    from psi.messages import decode, encode

    for m in first:
        channel.send(peer, encode(m))
    while not role.done:
        for m in role.handle(decode(channel.recv(peer, timeout=600))):
            channel.send(peer, encode(m))


def psi_step(ctx: StepContext) -> dict[str, Any]:
    from psi.executor import InProcessExecutor, ProcessPoolExecutor
    from psi.inputs import PartyData, prepare_party
    from psi.messages import Mode
    from psi.profile import ProfileRequester, ProfileResponder, ProfileSpec
    from psi.report import report_overlap
    from psi.roles import Requester, Responder, SessionParams
    from psi.waterfall import WaterfallRequester, WaterfallResponder

    t0 = time.perf_counter()
    job_type = ctx.job_type
    params = ctx.params
    id_types: list[str] = params["id_types"]
    me = ctx.node.identity.name
    requester = params["requester_party"]
    peer = params["partner"] if me == requester else requester
    if me not in (requester, params["partner"]):
        raise AgreementError(f"{me!r} has no role in this PSI job")
    rule = ctx.agreement.spec.rule(job_type)
    profile_cols = (params.get("categorical", []) + params.get("numeric", [])) if job_type == "profile" else []
    dataset, key, (frame, columns) = _inputs(ctx, id_types, profile_cols if me != requester else [])
    subjects = frame[key].astype(str).tolist()
    data = PartyData(subjects, {t: frame[c].tolist() for t, c in columns.items()})
    prepared = prepare_party(data, ctx.node.consent, purpose=rule.purpose, recipient=peer,
                             at=dt.datetime.now(dt.timezone.utc), id_types=id_types)
    # Record of processing activities: which subjects entered this job, for which purpose.
    entered = sorted({r for items in prepared.items.values() for i in range(len(items.values))
                      for r in items.rows_of(i)})
    ctx.node.consent.record_usage(ctx.job_id, rule.purpose, [subjects[r] for r in entered],
                                  agreement_id=ctx.agreement.agreement_id, recipient=peer)
    values = {c: frame[c].tolist() for c in profile_cols} if me != requester else {}
    del frame, data
    n_items = max((len(p.values) for p in prepared.items.values()), default=0)
    mode = {"match": Mode.match, "profile": Mode.profile}.get(job_type, Mode.cardinality)
    # Paillier encryption of the partner's rows is ~100x dearer than blinding: use every core sooner.
    heavy = n_items >= SMALL or (mode is Mode.profile and me != requester and n_items >= 1_000)
    executor = ProcessPoolExecutor() if heavy else InProcessExecutor()
    base = SessionParams(session=f"{ctx.job_id}/psi", agreement_id=ctx.agreement.agreement_id, job_id=ctx.job_id,
                         id_type=id_types[0], mode=mode,
                         reveal_to_responder=REVEAL_TO_PARTNER in rule.outputs)
    channel = RelayChannel(ctx.node, ctx.job_id, "psi", ctx.cancelled)
    try:
        if mode is Mode.match:
            if me == requester:
                role: Any = WaterfallRequester(base, id_types, prepared.items, executor)
                _drive(role, channel, peer, role.start())
            else:
                role = WaterfallResponder(base, id_types, prepared.items, executor)
                _drive(role, channel, peer, [])
        elif mode is Mode.profile:
            spec = ProfileSpec(categorical=tuple(params.get("categorical", [])),
                               numeric=tuple(params.get("numeric", [])), k_min=ctx.agreement.spec.k_min,
                               categories={c: tuple(v) for c, v in (params.get("categories") or {}).items()})
            items = prepared.items[id_types[0]]
            if me == requester:
                role = ProfileRequester(base, items, spec, executor)
                _drive(role, channel, peer, [role.hello(), *role.round_one()])
            else:
                role = ProfileResponder(base, items, values, spec, executor)
                _drive(role, channel, peer, [])
        else:
            items = prepared.items[id_types[0]]
            if me == requester:
                role = Requester(base, items, executor)
                _drive(role, channel, peer, [role.hello(), *role.round_one()])
            else:
                role = Responder(base, items, executor)
                _drive(role, channel, peer, [])
    finally:
        executor.close()
    private: dict[str, Any] = {"dataset": dataset, "id_types": id_types, "gate": prepared.stats,
                               "bytes_sent": channel.bytes_sent, "bytes_received": channel.bytes_received,
                               "seconds": round(time.perf_counter() - t0, 2)}
    audit: dict[str, Any] = {"job_id": ctx.job_id, "job_type": job_type, "agreement_id": ctx.agreement.agreement_id,
                             "version": ctx.agreement.version, "purpose": rule.purpose, "peer": peer,
                             "rows": prepared.stats.get("rows"), "consented_rows": prepared.stats.get("consented_rows"),
                             "denied": prepared.stats.get("denied")}
    if mode is Mode.match:
        outcome = role.outcome
        matched = outcome.matched  # own row index -> (id type, join key)
        with session_scope(ctx.node.factory) as s:
            s.execute(delete(PsiMatch).where(PsiMatch.job_id == ctx.job_id))  # a re-run replaces
            s.add_all(PsiMatch(job_id=ctx.job_id, row_key=subjects[r], agreement_id=ctx.agreement.agreement_id,
                               dataset=dataset, id_type=t, join_key=k) for r, (t, k) in matched.items())
        private.update(matched_rows=len(matched), matched_by_type=dict(outcome.counts))
        # as pairs: the audit log refuses keys that name identifier types
        audit.update(matched_rows=len(matched), matched_per_key_type=sorted(outcome.counts.items()))
    elif mode is Mode.profile:
        if me == requester:
            result = role.result.to_json()
            private["profile"] = result
            audit.update(cells=len(result["cells"]), suppressed_cells=sum(c["suppressed"] for c in result["cells"]))
        else:
            size = role.outcome.intersection_size if role.outcome is not None else None
            private["overlap"] = {"intersection_size": size}
    else:
        out = role.outcome
        if out.intersection_size is not None:
            rep = report_overlap(out.intersection_size, k_min=ctx.agreement.spec.k_min,
                                 epsilon=ctx.agreement.spec.dp_epsilon)
            private["overlap"] = rep.to_json()
            audit["overlap_released"] = rep.value
            audit["suppressed"] = rep.suppressed
    ctx.node.audit.append(f"psi.{job_type}", audit)
    return {"set_size": n_items, PRIVATE: private}


register("overlap", psi_step)
register("match", psi_step)
register("profile", psi_step)
