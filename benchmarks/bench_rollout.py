"""Rollout engine throughput (tiny Qwen2-VL on CPU, GeneralPoints-v0 language)

A tiny random Qwen2-VL checkpoint (`agents.tiny`, float32, CPU) plays GeneralPoints-v0 in language
modality, sampling at temperature 1 with up to 48 new tokens per response; the random model never
solves a hand, so every episode runs the full attempt budget (6 answers). The engine with 16
environments (one batched ``generate`` over all of them per round) is compared with the engine
with 1 environment, measured in the same run. "Outside the model" is the wall time not spent in
the model's forward passes (timed with forward hooks on the model): environment steps,
tokenisation, batching, and ``generate``'s own per-token bookkeeping (sampling, stopping checks,
cache copies); the engine's own share (wall time outside ``generate``) is listed too. The engine
keeps each dialogue's key-value cache between its turns; the same N=16 collection re-encoding every
turn from scratch (``reuse_cache=False``) shows what that saves. Torch runs on one thread: on a
shared two-core machine that is faster and far steadier for a model this small.
"""

from __future__ import annotations

import logging
import tempfile
import time

import torch

from agents.tiny import build_tiny_model
from agents.vlm_policy import VLMPolicy
from amft_vlm.rollout import RolloutEngine, RolloutStats
from benchmarks.common import Measurement

log = logging.getLogger(__name__)

ENV_ID = "GeneralPoints-v0"
ENV_KWARGS = {"modality": "language"}
MAX_NEW_TOKENS = 48
EPISODES = {1: 12, 16: 48}
"""Episodes timed per setting: N=1 plays 12 one after another, N=16 three waves of 16."""


class ForwardTimer:
    """Accumulates the wall time of a module's forward calls (forward pre-hook to forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._started = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._start),
            module.register_forward_hook(self._stop),
        ]

    def _start(self, module: torch.nn.Module, args: tuple) -> None:
        self._started = time.perf_counter()

    def _stop(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        self.seconds += time.perf_counter() - self._started

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


def _collect(
    policy: VLMPolicy, num_envs: int, timer: ForwardTimer, *, reuse_cache: bool = True
) -> tuple[RolloutStats, float]:
    """Stats of one timed collection and the share of its wall time outside model forward passes."""
    engine = RolloutEngine(
        policy,
        ENV_ID,
        env_kwargs=ENV_KWARGS,
        num_envs=num_envs,
        temperature=1.0,
        max_new_tokens=MAX_NEW_TOKENS,
        reuse_cache=reuse_cache,
    )
    engine.collect(range(1000, 1000 + num_envs), sampling_seed=1, progress=False)  # warm-up
    timer.seconds = 0.0
    _, stats = engine.collect(range(EPISODES[num_envs]), sampling_seed=0, progress=False)
    engine.close()
    outside = 1.0 - timer.seconds / stats.wall_seconds
    log.info(
        "N=%d%s: %s; %.1f%% of wall time outside forward passes, %.1f%% outside generate",
        num_envs,
        "" if reuse_cache else " (no cache reuse)",
        stats.summary(),
        100 * outside,
        100 * (1.0 - stats.generate_seconds / stats.wall_seconds),
    )
    return stats, outside


def run() -> list[Measurement]:
    """Episodes/s and generated tokens/s with 1 and 16 environments, and the overhead share at 16."""
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        policy = VLMPolicy.from_pretrained(build_tiny_model("qwen2-vl", checkpoint_dir, seed=0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    timer = ForwardTimer(policy.model)
    try:
        single, single_outside = _collect(policy, 1, timer)
        batched, batched_outside = _collect(policy, 16, timer)
        uncached, _ = _collect(policy, 16, timer, reuse_cache=False)
    finally:
        timer.remove()
        torch.set_num_threads(threads)
    speedup = batched.episodes_per_second / single.episodes_per_second
    return [
        Measurement(
            name=f"engine, N=16 envs, {MAX_NEW_TOKENS} new tokens",
            value=batched.episodes_per_second,
            unit="episodes/s",
            baseline_name="N=1",
            baseline_value=single.episodes_per_second,
            target=">= 6x N=1",
            met=speedup >= 6,
        ),
        Measurement(
            name="engine, N=16 envs, dialogue caches kept between turns",
            value=batched.episodes_per_second,
            unit="episodes/s",
            baseline_name="every turn re-encoded",
            baseline_value=uncached.episodes_per_second,
        ),
        Measurement(
            name="engine, N=16 envs, generated tokens",
            value=batched.response_tokens_per_second,
            unit="tokens/s",
            baseline_name="N=1",
            baseline_value=single.response_tokens_per_second,
        ),
        Measurement(
            name="engine, N=16 envs, wall time outside model forward passes",
            value=100 * batched_outside,
            unit="%",
            baseline_name="N=1",
            baseline_value=100 * single_outside,
            target="< 15%",
            met=batched_outside < 0.15,
            lower_is_better=True,
        ),
        Measurement(
            name="engine, N=16 envs, wall time outside generate (the engine's own work)",
            value=100 * (1.0 - batched.generate_seconds / batched.wall_seconds),
            unit="%",
            baseline_name="N=1",
            baseline_value=100 * (1.0 - single.generate_seconds / single.wall_seconds),
            lower_is_better=True,
        ),
    ]
