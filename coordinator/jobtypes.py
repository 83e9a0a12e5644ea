"""Job types the coordinator can orchestrate.

A job type turns (agreement, params) into a plan of steps; steps of one stage run in
parallel, stages run in order. A step with a party runs at that party's node (`POST
/v1/steps`); the final result is computed by `finalize` from the steps' results, at the
coordinator, and must only contain what the leakage table allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from confide.agreements import AgreementSpec
from confide.errors import ValidationError


@dataclass(frozen=True)
class StepPlan:
    name: str
    party: str | None
    stage: int
    params: dict[str, Any] = field(default_factory=dict)


class JobType(Protocol):
    name: str

    def validate_params(self, spec: AgreementSpec, params: dict[str, Any]) -> dict[str, Any]: ...

    def plan(self, spec: AgreementSpec, params: dict[str, Any]) -> list[StepPlan]: ...

    def finalize(self, spec: AgreementSpec, params: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]: ...

    # Optional: `on_start(coordinator, job_id, spec, params)` runs once when the job starts
    # running (e.g. the vertical-training arbiter); it must return quickly (start a thread).


class DatasetStats:
    """Row counts and schema of each party's contributed datasets; nothing else."""

    name = "dataset-stats"

    def validate_params(self, spec: AgreementSpec, params: dict[str, Any]) -> dict[str, Any]:
        if params:
            raise ValidationError(f"dataset-stats takes no parameters, got {sorted(params)}", field="params")
        return {}

    def plan(self, spec: AgreementSpec, params: dict[str, Any]) -> list[StepPlan]:
        return [StepPlan(f"stats@{p.name}", p.name, 0) for p in spec.parties]

    def finalize(self, spec: AgreementSpec, params: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"parties": {p.name: results[f"stats@{p.name}"] for p in spec.parties}}


_TYPES: dict[str, JobType] = {}


def register(jt: JobType) -> None:
    _TYPES[jt.name] = jt


def job_type(name: str) -> JobType:
    try:
        return _TYPES[name]
    except KeyError:
        raise ValidationError(
            f"unknown job type {name!r}; this coordinator runs: {', '.join(sorted(_TYPES))}", field="type"
        ) from None


def known_types() -> list[str]:
    return sorted(_TYPES)


register(DatasetStats())


def _load_builtin() -> None:
    # Job types of the capability packages register themselves on import.
    import importlib

    import coordinator.psi_jobs  # noqa: F401

    try:
        importlib.import_module("coordinator.vfl_jobs")
    except ModuleNotFoundError as exc:
        if exc.name != "coordinator.vfl_jobs":
            raise


_load_builtin()
