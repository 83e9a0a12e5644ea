"""PSI job types: `overlap` (cardinality) and `match` (join keys, multi-key waterfall).

Both run as one stage: the requester's and the other party's nodes each run their role and
exchange the protocol messages through the end-to-end encrypted relay. What the coordinator
records is only what the leakage table gives it: set sizes. The overlap size (or the match
counts) stay at the nodes, readable by each party's operator alone.
"""

from __future__ import annotations

from typing import Any

from confide.agreements import IDENTIFIER_TYPES, AgreementSpec
from confide.errors import ValidationError
from coordinator.jobtypes import StepPlan, register


def _other_party(spec: AgreementSpec, requester: str | None, params: dict[str, Any]) -> str:
    names = [p.name for p in spec.parties]
    partner = params.get("partner")
    if partner is not None:
        if partner not in names or partner == params.get("requester"):
            raise ValidationError(f"partner {partner!r} is not another party of the agreement", field="partner")
        return str(partner)
    others = [p.name for p in spec.parties if p.role == "feature_holder"]
    if len(others) != 1:
        raise ValidationError("the agreement has several feature holders: name one with params.partner",
                              field="partner")
    return others[0]


def _common_types(spec: AgreementSpec, a: str, b: str, dataset: str | None = None) -> list[str]:
    ta = [i.type for i in spec.party(a).identifiers if dataset is None or i.dataset == dataset]
    tb = {i.type for i in spec.party(b).identifiers}
    return [t for t in ta if t in tb]


class _PsiJob:
    name = ""

    def validate_params(self, spec: AgreementSpec, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - {"id_types", "partner", "dataset"}
        if unknown:
            raise ValidationError(f"{self.name} takes id_types, partner and dataset, not {sorted(unknown)}",
                                  field="params")
        label_holder = next(p.name for p in spec.parties if p.role == "label_holder")
        dataset = params.get("dataset")
        if dataset is not None and dataset not in {i.dataset for i in spec.party(label_holder).identifiers}:
            raise ValidationError(f"dataset {dataset!r} is not one the agreement lets {label_holder!r} match on",
                                  field="dataset")
        partner = _other_party(spec, label_holder, params)
        common = _common_types(spec, label_holder, partner, dataset)
        id_types = params.get("id_types") or common[:1]
        if not isinstance(id_types, list) or not id_types or not all(isinstance(t, str) for t in id_types):
            raise ValidationError("id_types must be a non-empty list of identifier types", field="id_types")
        for t in id_types:
            if t not in IDENTIFIER_TYPES:
                raise ValidationError(f"unknown identifier type {t!r}", field="id_types")
            if t not in common:
                raise ValidationError(f"both parties must contribute {t!r} identifiers under the agreement",
                                      field="id_types")
        if len(set(id_types)) != len(id_types):
            raise ValidationError("id_types lists a type twice", field="id_types")
        if self.name == "overlap" and len(id_types) != 1:
            raise ValidationError("overlap counts one identifier type; use a match job for a waterfall",
                                  field="id_types")
        out = {"id_types": id_types, "partner": partner, "requester_party": label_holder}
        if dataset is not None:
            out["dataset"] = dataset
        return out

    def plan(self, spec: AgreementSpec, params: dict[str, Any]) -> list[StepPlan]:
        return [
            StepPlan(f"psi@{params['requester_party']}", params["requester_party"], 0, {"role": "requester"}),
            StepPlan(f"psi@{params['partner']}", params["partner"], 0, {"role": "responder"}),
        ]

    def finalize(self, spec: AgreementSpec, params: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        # Only what the coordinator may learn: each side's set size.
        return {"set_sizes": {p: results[f"psi@{p}"].get("set_size") for p in
                              (params["requester_party"], params["partner"])},
                "id_types": params["id_types"],
                "results_at": "each party's node (confide node job result)"}


class OverlapJob(_PsiJob):
    name = "overlap"


class MatchJob(_PsiJob):
    name = "match"


class ProfileJob(_PsiJob):
    """Aggregates of agreed partner columns over the overlap, for the brand (k_min per cell)."""

    name = "profile"

    def validate_params(self, spec: AgreementSpec, params: dict[str, Any]) -> dict[str, Any]:
        cols = {k: params.get(k) or [] for k in ("categorical", "numeric")}
        base = super().validate_params(spec, {k: v for k, v in params.items()
                                              if k in ("id_types", "partner", "dataset")})
        unknown = set(params) - {"id_types", "partner", "dataset", "categorical", "numeric", "categories"}
        if unknown:
            raise ValidationError(f"profile takes id_types, partner, categorical, numeric; not {sorted(unknown)}",
                                  field="params")
        if not (cols["categorical"] or cols["numeric"]):
            raise ValidationError("name at least one partner column in categorical or numeric", field="params")
        partner = spec.party(base["partner"])
        agreed = {c for cs in partner.columns.values() for c in cs}
        for c in cols["categorical"] + cols["numeric"]:
            if not isinstance(c, str) or c not in agreed:
                raise ValidationError(f"column {c!r} is not among the partner's agreed columns {sorted(agreed)}",
                                      field="params")
        if len(base["id_types"]) != 1:
            raise ValidationError("profile matches on one identifier type", field="id_types")
        # The agreed vocabulary of each categorical column; without it the partner's own values
        # of the column would be revealed to the brand as cell labels.
        categories = params.get("categories") or {}
        if not isinstance(categories, dict) or any(
            c not in cols["categorical"] or not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v)
            for c, v in categories.items()
        ):
            raise ValidationError("categories maps categorical columns to non-empty lists of values", field="categories")
        return {**base, **cols, "categories": categories}


register(OverlapJob())
register(ProfileJob())
register(MatchJob())
