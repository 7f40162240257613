"""The comparison's statistics: a mean over seeds with its 95% t-interval, trailing means, steps-to-threshold.

Pure functions over numbers and ``metrics.jsonl`` records; no file is read here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from amft_vlm.evaluation.report import is_finite_number

_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
"""The 0.975 quantile of Student's t with 1..30 degrees of freedom."""


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with `dof` degrees of freedom (a table to 30, then Cornish-Fisher)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be at least 1; got {dof}")
    if dof <= len(_T_975):
        return _T_975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its 95% t-interval; ``low`` and ``high`` are None for one value."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        """The numbers of ``summary.json``."""
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def mean_interval(values: Sequence[float], *, bounds: tuple[float, float] | None = None) -> Interval:
    """Mean of `values` and mean -+ t(0.975, n - 1) x s / sqrt(n), clipped to `bounds` (a rate's [0, 1])."""
    if not values:
        raise ValueError("mean_interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, None, None, 1)
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, n)


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the `window` - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def steps_to_threshold(records: Sequence[dict], threshold: float, window: int) -> dict[str, int] | None:
    """The first logged step whose trailing mean of the training ``success`` reaches `threshold`, or None.

    Only steps that played rollouts log ``success``; the mean runs over the last `window` of those. Returns
    that step and the budget spent by its end: ``env_episodes`` (rollouts plus validation) and ``rollout_episodes``.
    """
    logged = [record for record in records if is_finite_number(record.get("success"))]
    smoothed = trailing_mean([record["success"] for record in logged], window)
    for record, value in zip(logged, smoothed, strict=True):
        if value >= threshold:
            return {
                "step": int(record["step"]),
                "env_episodes": int(record.get("budget_env_episodes") or 0),
                "rollout_episodes": int(record.get("budget_rollout_episodes") or 0),
            }
    return None

