"""What a node does for each job type's step. Executors run in the node's step pool.

An executor gets a `StepContext` (the verified agreement, the job's params, the node) and
returns the step's result: only what the leakage table lets leave the node.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from confide.agreements import SignedAgreement
from confide.db import session_scope
from confide.errors import ValidationError

if TYPE_CHECKING:
    from party_node.node import Node

Executor = Callable[["StepContext"], dict[str, Any]]
# A step result may carry, under this key, what stays at the node for its own operator only
# (e.g. the overlap size the brand asked for): it is stored locally, never sent to the coordinator.
PRIVATE = "_private"


@dataclass
class StepContext:
    node: "Node"
    job_id: str
    step: str
    agreement: SignedAgreement
    params: dict[str, Any]
    requester: str
    cancelled: threading.Event
    job_type: str = ""

    @property
    def me(self):  # type: ignore[no-untyped-def]
        return self.agreement.spec.party(self.node.identity.name)


def dataset_stats(ctx: StepContext) -> dict[str, Any]:
    """Row count and schema (column names, roles, types) of each dataset this party contributes."""
    from party_node import datasets as ds

    out = []
    with session_scope(ctx.node.factory) as s:
        for name in ctx.me.datasets:
            info = ds.describe(s, name)
            out.append({"dataset": name, "rows": int(info["rows"]), "columns": info["columns"]})
    ctx.node.audit.append("dataset.stats", {"job_id": ctx.job_id, "datasets": [d["dataset"] for d in out]})
    return {"datasets": out}


_EXECUTORS: dict[str, Executor] = {"dataset-stats": dataset_stats}


def register(job_type: str, fn: Executor) -> None:
    _EXECUTORS[job_type] = fn


def _load_builtin() -> None:
    import importlib

    import party_node.psi_steps  # noqa: F401  (registers overlap, match, profile)

    try:
        importlib.import_module("party_node.vfl_steps")
    except ModuleNotFoundError as exc:
        if exc.name != "party_node.vfl_steps":
            raise


def executor_for(job_type: str) -> Executor:
    if not _EXECUTORS.keys() - {"dataset-stats"}:
        _load_builtin()
    try:
        return _EXECUTORS[job_type]
    except KeyError:
        raise ValidationError(f"this node cannot run {job_type!r} steps") from None
