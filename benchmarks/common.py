"""What a benchmark measures and how it is timed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Measurement:
    """One benchmark figure, optionally compared with a baseline measured in the same run.

    ``ratio`` is value / baseline_value, so for rates (higher is better) a ratio above 1 means
    faster than the baseline; ``target`` states the goal in words, e.g. ">= 5000 episodes/s".
    """

    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline_value: float | None = None
    target: str | None = None
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        """value / baseline_value, or None without a baseline."""
        if self.baseline_value in (None, 0):
            return None
        return self.value / self.baseline_value


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
