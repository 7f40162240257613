"""What a benchmark measures and how it is timed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Measurement:
    """One benchmark figure, optionally compared with a baseline measured in the same run.

    ``ratio`` is how many times better than the baseline the value is: value / baseline for
    rates, baseline / value when ``lower_is_better`` (times); ``target`` states the goal in words,
    e.g. ">= 5000 episodes/s", and ``met`` whether it was reached.
    """

    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline_value: float | None = None
    target: str | None = None
    met: bool | None = None
    lower_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        """Times better than the baseline (above 1 means better), or None without a baseline."""
        if not self.baseline_value or not self.value:
            return None
        return self.baseline_value / self.value if self.lower_is_better else self.value / self.baseline_value


def rate(work: Callable[[], None], count: int, *, min_seconds: float = 1.0, warmup: int = 1) -> float:
    """Calls per second of ``work``, timed over batches of ``count`` calls for at least ``min_seconds``."""
    for _ in range(warmup):
        work()
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(count):
            work()
        calls += count
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls / elapsed


def seconds_per_call(work: Callable[[], None], count: int, *, min_seconds: float = 1.0, warmup: int = 1) -> float:
    """Mean seconds per call of ``work`` (the inverse of :func:`rate`)."""
    return 1.0 / rate(work, count, min_seconds=min_seconds, warmup=warmup)
