"""Vertical training job type `train` (coordinated hetero logistic regression, docs/vfl.md).

One stage, one step per party: `train@<guest>` (the label holder, the brand) and
`train@<host>` per feature holder named in `host_features`. The arbiter (Paillier private key)
runs at the coordinator, started by `on_start` in a background thread (`coordinator.arbiter`).

    params = {"match_job": "<id of a succeeded match job>",  # several partners: {partner: job id}
              "label": "converted",
              "guest_features": ["x0", ...], "host_features": {"partner": ["x0", ...]},
              "test_fraction": 0.2, "seed": 42, "train": {<federated.roles.TrainConfig fields>},
              "categories": {"partner": {"income_level": ["1", "2", "3"], "city": None}},
              "max_categories": 16, "standardize": true}

Categorical columns (schema type `category`, or named in `categories`) are one-hot encoded at
their own node over the given vocabulary (None: the node's most frequent values, at most
`max_categories`, plus an "other" indicator; values with fewer than k_min rows in a mini-batch
fold into "other"); numeric columns are standardised on the training rows
(`party_node.features`). The expanded names stay at the node; only counts cross.

What the coordinator keeps (`finalize`): a model registry entry — model version (= the job id),
agreement, data sizes, source columns and feature counts per party, training config, epochs,
stop reason, per-epoch losses (every party and the arbiter learn them anyway) and the brand's
aggregate held-out metrics when the held-out rows number at least k_min (`coordinator.registry`
serves it and the model card). The model parts (weights, mask seeds, expanded feature names,
encoders) stay in each party's private step result.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from confide.agreements import AgreementSpec
from confide.errors import ConfideError, ValidationError
from coordinator.jobtypes import StepPlan, register

# Paillier keys below 2048 bits (`train.allow_short_keys`) only where the operator started the
# service with this variable set to 1 (the test suite); the nodes check it too.
SHORT_KEYS_ENV = "CONFIDE_TEST_SHORT_KEYS"
MAX_CATEGORIES, MAX_CATEGORIES_LIMIT = 16, 256  # as party_node.features (the node checks again)
PARAMS = {"match_job", "label", "guest_features", "host_features", "test_fraction", "seed", "train",
          "categories", "max_categories", "standardize", "publish_metrics"}


def _agreed(spec: AgreementSpec, party: str) -> set[str]:
    return {c for cols in spec.party(party).columns.values() for c in cols}


def _names(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise ValidationError(f"{what} must be a non-empty list of column names", field=what)
    if len(set(value)) != len(value):
        raise ValidationError(f"{what} lists a column twice", field=what)
    return list(value)


def check_short_keys_allowed(requested: bool) -> None:
    if requested and os.environ.get(SHORT_KEYS_ENV) != "1":
        raise ValidationError(f"allow_short_keys is for tests only: this service was not started with "
                              f"{SHORT_KEYS_ENV}=1", field="train")


def _check_categories(value: Any, features: Mapping[str, Sequence[str]]) -> dict[str, dict[str, list[str] | None]]:
    """Validate a job's `categories` = {party: {column: [values] | null}} against each party's
    feature columns; raises ValidationError naming the field."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError("categories maps each party to {column: [values] or null}", field="categories")
    out: dict[str, dict[str, list[str] | None]] = {}
    for party, cols in value.items():
        if party not in features:
            raise ValidationError(f"categories names {party!r}, which has no features in this job", field="categories")
        if not isinstance(cols, dict):
            raise ValidationError(f"categories.{party} maps columns to [values] or null", field="categories")
        out[party] = {}
        for col, vocab in cols.items():
            if col not in features[party]:
                raise ValidationError(f"categories.{party}: {col!r} is not one of {party}'s features",
                                      field="categories")
            if vocab is not None:
                if not isinstance(vocab, list) or not vocab:
                    raise ValidationError(f"categories.{party}.{col}: the vocabulary is empty (give values, or null "
                                          "for the node's most frequent values)", field="categories")
                if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in vocab):
                    raise ValidationError(f"categories.{party}.{col}: values must be strings or integers",
                                          field="categories")
                vocab = [str(v) for v in vocab]
                if len(set(vocab)) != len(vocab) or len(vocab) > MAX_CATEGORIES_LIMIT:
                    raise ValidationError(f"categories.{party}.{col}: values must be distinct, at most "
                                          f"{MAX_CATEGORIES_LIMIT}", field="categories")
            out[party][col] = vocab
    return out


def _match_jobs_ok(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items())
    return isinstance(value, str) and bool(value)


class TrainJob:
    name = "train"

    def validate_params(self, spec: AgreementSpec, params: dict[str, Any]) -> dict[str, Any]:
        from federated.roles import TrainConfig

        unknown = set(params) - PARAMS
        if unknown:
            raise ValidationError(f"train takes {sorted(PARAMS)}, not {sorted(unknown)}", field="params")
        match_job = params.get("match_job")
        if not _match_jobs_ok(match_job):
            raise ValidationError("name the match job whose join keys align the rows (params.match_job; with several "
                                  "partners a mapping partner -> its match job with the brand)", field="match_job")
        guests = [p.name for p in spec.parties if p.role == "label_holder"]
        if len(guests) != 1:
            raise ValidationError("vertical training needs exactly one label holder in the agreement")
        guest = guests[0]
        label = params.get("label")
        if not isinstance(label, str) or not label:
            raise ValidationError("name the label column (params.label)", field="label")
        guest_features = _names(params.get("guest_features"), "guest_features")
        agreed = _agreed(spec, guest)
        for c in [label, *guest_features]:
            if c not in agreed:
                raise ValidationError(f"column {c!r} is not among {guest}'s agreed columns {sorted(agreed)}",
                                      field="guest_features" if c != label else "label")
        if label in guest_features:
            raise ValidationError("the label cannot also be a feature", field="label")
        hf = params.get("host_features")
        if not isinstance(hf, dict) or not hf:
            raise ValidationError("host_features maps each partner to its feature columns", field="host_features")
        host_features: dict[str, list[str]] = {}
        for host, cols in hf.items():
            names = {p.name: p.role for p in spec.parties}
            if names.get(host) != "feature_holder":
                raise ValidationError(f"{host!r} is not a feature holder of the agreement", field="host_features")
            cols = _names(cols, f"host_features.{host}")
            agreed = _agreed(spec, host)
            for c in cols:
                if c not in agreed:
                    raise ValidationError(f"column {c!r} is not among {host}'s agreed columns {sorted(agreed)}",
                                          field="host_features")
            host_features[host] = cols
        tf = params.get("test_fraction", 0.2)
        if not isinstance(tf, (int, float)) or isinstance(tf, bool) or not 0.0 < float(tf) < 1.0:
            raise ValidationError("test_fraction must be in (0, 1): the held-out rows give the metrics",
                                  field="test_fraction")
        seed = params.get("seed", 42)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValidationError("seed must be an integer", field="seed")
        raw = params.get("train") or {}
        if not isinstance(raw, dict):
            raise ValidationError("train must be a mapping of training settings", field="train")
        try:
            cfg = TrainConfig(**{"k_min": spec.k_min, **raw, "seed": seed})
        except ConfideError:
            raise
        except Exception as exc:  # pydantic's error names the bad field
            raise ValidationError(f"bad training settings: {exc}", field="train") from None
        if cfg.k_min < spec.k_min:
            raise ValidationError(f"train.k_min may not be below the agreement's k_min={spec.k_min}", field="train")
        cfg.check_keys()
        check_short_keys_allowed(cfg.allow_short_keys)
        categories = _check_categories(params.get("categories"), {guest: guest_features, **host_features})
        max_categories = params.get("max_categories", MAX_CATEGORIES)
        if not isinstance(max_categories, int) or isinstance(max_categories, bool) \
                or not 1 <= max_categories <= MAX_CATEGORIES_LIMIT:
            raise ValidationError(f"max_categories must be an integer in 1..{MAX_CATEGORIES_LIMIT}",
                                  field="max_categories")
        standardize = params.get("standardize", True)
        if not isinstance(standardize, bool):
            raise ValidationError("standardize must be true or false", field="standardize")
        if isinstance(match_job, dict) and set(match_job) != set(host_features):
            raise ValidationError(f"match_job names {sorted(match_job)}; the partners training are "
                                  f"{sorted(host_features)}", field="match_job")
        publish_metrics = params.get("publish_metrics", False)
        if not isinstance(publish_metrics, bool):
            raise ValidationError("publish_metrics is true or false", field="publish_metrics")
        if len(host_features) > 1 and not isinstance(match_job, dict):
            raise ValidationError("several partners match the brand in separate match jobs: give match_job as "
                                  "{partner: match job id}", field="match_job")
        return {"match_job": match_job, "label": label, "guest": guest, "hosts": sorted(host_features),
                "guest_features": guest_features, "host_features": host_features,
                "test_fraction": float(tf), "seed": seed, "train": cfg.model_dump(mode="json"),
                "categories": categories, "max_categories": max_categories, "standardize": standardize,
                "publish_metrics": publish_metrics}

    def plan(self, spec: AgreementSpec, params: dict[str, Any]) -> list[StepPlan]:
        return [StepPlan(f"train@{p}", p, 0, {}) for p in [params["guest"], *params["hosts"]]]

    def on_start(self, coordinator: Any, job_id: str, spec: AgreementSpec, params: dict[str, Any]) -> None:
        from coordinator import arbiter

        mj = params["match_job"]
        for job in (mj.values() if isinstance(mj, dict) else [mj]):
            arbiter.check_match_job(coordinator, job_id, job)
        arbiter.start_session(coordinator, job_id, {**params, "agreement_id": spec.agreement_id})

    def finalize(self, spec: AgreementSpec, params: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The job's result is the model's registry entry (`coordinator.registry`): what the
        coordinator may know. The model parts stay at the nodes."""
        guest = results.get(f"train@{params['guest']}", {})
        parties = [params["guest"], *params["hosts"]]
        sizes = {(results.get(f"train@{p}") or {}).get("train_rows") for p in parties}
        if len(sizes) != 1:
            raise ValidationError("the parties report different numbers of training rows")
        return {
            "model": {
                "version": guest.get("model_version"),
                "agreement_id": spec.agreement_id,
                "match_job": params["match_job"],
                "label": params["label"],
                "guest": params["guest"],
                "hosts": params["hosts"],
                "features": {params["guest"]: params["guest_features"], **params["host_features"]},
                "feature_counts": {p: (results.get(f"train@{p}") or {}).get("features") for p in parties},
                "parts_at": {p: "the party's node (private step result)" for p in parties},
            },
            "data": {"train_rows": guest.get("train_rows"), "test_rows": guest.get("test_rows")},
            "training": {"config": params["train"], "test_fraction": params["test_fraction"],
                         "seed": params["seed"], "categories": params.get("categories") or {},
                         "max_categories": params.get("max_categories"),
                         "standardize": params.get("standardize", True),
                         "epochs": guest.get("epochs"), "stop_reason": guest.get("stop_reason"),
                         "losses": guest.get("losses")},
            # Reported by the brand: aggregates over >= k_min held-out rows, or marked suppressed.
            "heldout_metrics": guest.get("heldout_metrics") or {"suppressed": True, "reason": "not reported"},
            "evaluation_at": f"{params['guest']}'s node (private step result)",
        }


class ScoreJob:
    """`score`: 0-1 scores for the brand's leads with a trained model (docs/vfl.md §1).

        params = {"model": "<succeeded train job id>", "dataset": "<brand dataset of leads>",
                  "match_job": "<optional: a match job of `dataset` with the partners>"}

    Every row of `dataset` is a lead (the brand ingests the leads to score as a dataset, so no
    row id ever travels to the coordinator in the job's parameters). Leads are aligned with the
    partners by the join keys of `match_job` — by default the model's own match job; fresh leads
    (another dataset, e.g. this week's leads) need a match job of their own first.

    Leads with a join key from the model's match job that every partner knows (and may use)
    get the joint score: each party sends masked partial logits to the arbiter, which returns
    the scores to the brand only; other leads get the brand's guest-only score with
    `partner_missing: true`. Leads whose subjects may not be scored (consent gate, e.g. opted out
    of personalised marketing) are not scored. The scores stay at the brand's node; the
    coordinator keeps counts and the model version."""

    name = "score"

    def validate_params(self, spec: AgreementSpec, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - {"model", "dataset", "match_job"}
        if unknown:
            raise ValidationError(f"score takes model, dataset and match_job, not {sorted(unknown)}", field="params")
        match_job = params.get("match_job")
        if match_job is not None and not _match_jobs_ok(match_job):
            raise ValidationError("match_job must be the id of a match job of the leads (or, several partners, "
                                  "a mapping partner -> match job)", field="match_job")
        model = params.get("model")
        if not isinstance(model, str) or not model:
            raise ValidationError("name the model version (the train job id) in params.model", field="model")
        guests = [p for p in spec.parties if p.role == "label_holder"]
        if len(guests) != 1:
            raise ValidationError("scoring needs exactly one label holder in the agreement")
        dataset = params.get("dataset")
        if not isinstance(dataset, str) or dataset not in guests[0].datasets:
            raise ValidationError(f"dataset must be one of {guests[0].name}'s datasets {guests[0].datasets}",
                                  field="dataset")
        hosts = sorted(p.name for p in spec.parties if p.role == "feature_holder")
        out = {"model": model, "dataset": dataset, "guest": guests[0].name, "hosts": hosts}
        return {**out, "match_job": match_job} if match_job else out

    def plan(self, spec: AgreementSpec, params: dict[str, Any]) -> list[StepPlan]:
        return [StepPlan(f"score@{p}", p, 0, {}) for p in [params["guest"], *params["hosts"]]]

    def on_start(self, coordinator: Any, job_id: str, spec: AgreementSpec, params: dict[str, Any]) -> None:
        from coordinator import arbiter

        arbiter.check_model(coordinator, job_id, params["model"], params["hosts"])
        mj = params.get("match_job")
        for job in (mj.values() if isinstance(mj, dict) else [mj] if mj else []):
            arbiter.check_match_job(coordinator, job_id, job)
        arbiter.start_session(coordinator, job_id, {**params, "train": {}, "mode": "score"})

    def finalize(self, spec: AgreementSpec, params: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        guest = results.get(f"score@{params['guest']}", {})
        return {"model_version": params["model"], "scored": guest.get("scored"),
                "scores_at": f"{params['guest']}'s node (private step result)"}


register(TrainJob())
register(ScoreJob())
