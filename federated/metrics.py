"""Held-out quality of a lead-scoring model, computed by the guest from its own labels and the
0-1 scores the arbiter returns (no pooled data, no partner partials)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from confide.errors import ValidationError


def evaluate(y: Any, scores: Any, bins: int = 10) -> dict[str, Any]:
    """AUC, KS, PR-AUC (average precision), lift in the top decile, Brier score, expected
    calibration error and a calibration table (mean score vs positive rate per score decile).
    Raises ValidationError if there are no rows or a single class."""
    yy = np.asarray(y, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(yy) != len(s) or len(yy) == 0:
        raise ValidationError(f"{len(yy)} labels for {len(s)} scores")
    if yy.min() == yy.max():
        raise ValidationError("held-out rows contain a single class; metrics are undefined")
    fpr, tpr, _ = roc_curve(yy, s)
    order = np.argsort(-s, kind="stable")
    top = order[: max(1, int(np.ceil(0.1 * len(s))))]
    base = float(yy.mean())
    edges = np.quantile(s, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges[1:-1], s, side="right"), 0, bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        mean_s, rate = float(s[sel].mean()), float(yy[sel].mean())
        table.append({"bin": b, "rows": int(sel.sum()), "mean_score": round(mean_s, 4), "positive_rate": round(rate, 4)})
        ece += sel.mean() * abs(mean_s - rate)
    return {
        "rows": int(len(yy)),
        "positive_rate": round(base, 4),
        "auc": float(roc_auc_score(yy, s)),
        "ks": float(np.max(tpr - fpr)),
        "pr_auc": float(average_precision_score(yy, s)),
        "lift_top_decile": float(yy[top].mean() / base) if base > 0 else 0.0,
        "brier": float(np.mean((s - yy) ** 2)),
        "ece": float(ece),
        "calibration": table,
    }
