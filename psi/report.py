"""What the `overlap` job reports: |A∩B| suppressed below k_min, optionally DP-noised.

Noise comes from OpenDP (the discrete Laplace mechanism on integers, sensitivity 1: one person
more or less changes |A∩B| by at most 1), never from a hand-rolled sampler. Suppression is
decided on the value that is released (the noisy one when DP is on), which keeps the release
a post-processing of the DP mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass

from confide.errors import ValidationError


@dataclass(frozen=True)
class OverlapReport:
    value: int | None  # None when suppressed
    suppressed: bool
    k_min: int
    epsilon: float | None = None  # the DP budget spent, if noised

    def to_json(self) -> dict[str, object]:
        return {
            "intersection_size": self.value,
            "suppressed": self.suppressed,
            "k_min": self.k_min,
            "epsilon": self.epsilon,
        }


def report_overlap(size: int, *, k_min: int = 50, epsilon: float | None = None) -> OverlapReport:
    """The released overlap. With `epsilon`, adds discrete Laplace noise of scale 1/epsilon
    through OpenDP (ε-DP for a count of sensitivity 1). Raises ValidationError for a
    non-positive epsilon or a negative k_min."""
    if k_min < 0:
        raise ValidationError("k_min must be >= 0")
    released = size
    if epsilon is not None:
        if not epsilon > 0:
            raise ValidationError("epsilon must be > 0")
        import opendp.prelude as dp

        dp.enable_features("contrib")
        meas = dp.m.make_laplace(
            dp.atom_domain(T=int), dp.absolute_distance(T=int), scale=1.0 / epsilon
        )
        released = max(0, int(meas(size)))
    if released < k_min:
        return OverlapReport(None, True, k_min, epsilon)
    return OverlapReport(released, False, k_min, epsilon)
