"""What the `overlap` job releases: suppression below k_min, optional OpenDP noise."""

from __future__ import annotations

import pytest

from confide.errors import ValidationError
from psi.report import report_overlap


def test_suppressed_below_k_min() -> None:
    assert report_overlap(49, k_min=50).suppressed
    assert report_overlap(49, k_min=50).value is None
    r = report_overlap(50, k_min=50)
    assert not r.suppressed and r.value == 50 and r.epsilon is None


def test_dp_noise_is_integer_and_centred() -> None:
    vals = [report_overlap(10_000, k_min=50, epsilon=1.0) for _ in range(200)]
    assert all(isinstance(v.value, int) and v.epsilon == 1.0 for v in vals)
    mean = sum(v.value for v in vals) / len(vals)  # type: ignore[misc]
    assert abs(mean - 10_000) < 1.0  # discrete Laplace, scale 1: sd ≈ 1.4, mean of 200 ≈ ±0.1
    assert len({v.value for v in vals}) > 1  # it is noised


def test_dp_small_counts_still_suppressed_and_bad_params_refused() -> None:
    assert report_overlap(3, k_min=50, epsilon=0.5).suppressed
    with pytest.raises(ValidationError):
        report_overlap(10, epsilon=0)
    with pytest.raises(ValidationError):
        report_overlap(10, k_min=-1)
