"""What a comparison will do and about how long it takes, before anything runs (``amft-vlm compare --dry-run``).

`grid_plan` counts each run's work from its config the way the trainer will do it (`amft_vlm.learning.methods`: which
steps play rollouts, which train on expert data, which run the meta-gradient's validation episodes) and the
evaluations that follow each run; `CostModel` turns that work into seconds; `estimate_wall_seconds` replays
`amft_vlm.compare.runner`'s order of tasks on ``jobs`` workers (every training queued first, a run's
evaluations queued when it finishes); `plan_text` prints it all.

The cost model is linear in the work and calibrated by measurement (`TINY_CPU_COSTS`: the tiny models on a
CPU, one torch thread per job). For any other model or device there is no calibration: the plan shows the
work and no time.
"""

from __future__ import annotations

import heapq
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from agents.tiny import TINY_PREFIX
from amft_vlm.compare.config import CompareConfig, RunPlan
from amft_vlm.learning.methods import build_controller, method_mu
from amft_vlm.learning.resolve import resolve_method
from amft_vlm.run.config import TrainConfig


@dataclass(frozen=True)
class RunWork:
    """One run's work over all its steps, as the trainer will do it."""

    steps: int
    rollout_episodes: int
    """Episodes the policy plays for its RL batches (the methods' rollouts)."""
    validation_episodes: int
    """Episodes the policy plays for AMFT's meta-gradient."""
    expert_examples: int
    """Expert trajectories trained on: SFT batches, LUFFY's and SRFT's demonstrations in the groups, ReLIFT's
    buffered ones (counted as if every start state failed, the untrained model's case)."""
    checkpoints: int
    max_new_tokens: int

    @property
    def policy_tokens(self) -> int:
        """The generation bound of the episodes the policy plays: episodes x ``max_new_tokens``."""
        return (self.rollout_episodes + self.validation_episodes) * self.max_new_tokens


def run_work(config: TrainConfig) -> RunWork:
    """`config`'s work, step by step: mu (the schedule, or the controller: 1 in its warm-up, inside (0, 1) after)
    says whether a step has an expert batch (mu > 0) and rollouts (mu < 1)."""
    method = resolve_method(config)
    controller = build_controller(method, config)
    members = config.group_size - 1 if method.expert_in_group else config.group_size
    rollouts = validation = expert = 0
    for step in range(config.steps):
        mu = method_mu(method, config, step, controller) if controller is None or controller.in_warmup(step) else 0.5
        if mu > 0:
            expert += config.sft_batch_size
        if mu < 1:
            rollouts += config.episodes_per_step * members
            if method.expert_in_group or method.sft_buffer:
                expert += config.episodes_per_step
        if controller is not None and controller.wants_meta_gradient(step):
            validation += config.controller.validation_states * config.controller.validation_samples
    checkpoints = sum(1 for step in range(1, config.steps + 1) if step % config.save_every == 0 or step == config.steps)
    return RunWork(config.steps, rollouts, validation, expert, checkpoints, config.max_new_tokens)


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work, one torch thread per job; a task's time is the sum of its units' costs."""

    calibration: str
    """Where and on what the constants were measured."""
    run_start: float
    """A training run's fixed cost: its process's trainer, the model and expert set loaded, the end."""
    step: float
    """Every step's fixed cost (logging, the learning-rate schedule, small passes)."""
    policy_token: float
    """Per episode x max_new_tokens the policy plays in training (generating, then scoring and backward)."""
    expert_example: float
    """Per expert trajectory trained on (scoring and backward)."""
    checkpoint: float
    """Per checkpoint written."""
    evaluation_start: float
    """An evaluation's fixed cost (the model loaded, the environments made)."""
    evaluation_token: float
    """Per evaluation episode x max_new_tokens (greedy)."""
    grid_start: float
    """Once per comparison: the checks, the shared tiny model and expert episodes, the job pool, the summary."""

    def training_seconds(self, work: RunWork) -> float:
        """Estimated seconds to train one run from scratch."""
        return (
            self.run_start + self.step * work.steps + self.policy_token * work.policy_tokens
            + self.expert_example * work.expert_examples + self.checkpoint * work.checkpoints
        )  # fmt: skip

    def evaluation_seconds(self, episodes: int, max_new_tokens: int) -> float:
        """Estimated seconds of one evaluation of `episodes` greedy episodes."""
        return self.evaluation_start + self.evaluation_token * episodes * max_new_tokens


TINY_CPU_COSTS = CostModel(
    calibration="measured 2026-12-07 on the 2-core CPU machine under a load average of 3 to 6 (other work running): "
    "tiny:qwen2-vl on GP-L with one attempt per hand (2 turns per untrained episode), 1 torch thread per job",
    run_start=1.6,
    step=0.16,
    policy_token=0.0052,
    expert_example=0.027,
    checkpoint=0.24,
    evaluation_start=1.4,
    evaluation_token=0.0013,
    grid_start=45.0,
)
"""The tiny models on a CPU (the smoke grids); see `calibration`."""


def cost_model(config: CompareConfig) -> CostModel | None:
    """The calibrated cost model for `config`'s model and device, or None where there is none."""
    if config.train.model.startswith(TINY_PREFIX) and config.train.device == "cpu":
        return TINY_CPU_COSTS
    return None


@dataclass(frozen=True)
class GridPlan:
    """A comparison's tasks before it runs: each run with its work and the evaluations that follow it."""

    runs: list[RunPlan]
    work: dict[str, RunWork]
    """By run name (``METHOD/seed-S``)."""
    evaluations: list[tuple[str, int]]
    """Each evaluation column's title and episodes; every run gets one of each."""

    @property
    def task_count(self) -> int:
        """Trainings plus evaluations."""
        return len(self.runs) * (1 + len(self.evaluations))


def grid_plan(config: CompareConfig, out: str | os.PathLike = "OUT") -> GridPlan:
    """The runs of `config` (as `CompareConfig.grid` lays them out under `out`), their work and evaluations."""
    runs = config.grid(out)
    evaluations = [(item.title, config.eval_episodes(item.setting)) for item in config.eval_settings()]
    return GridPlan(runs, {run.name: run_work(run.config) for run in runs}, evaluations)


def estimate_wall_seconds(plan: GridPlan, costs: CostModel, jobs: int, max_new_tokens: int) -> tuple[float, float]:
    """(wall seconds, task seconds summed) of `plan` on `jobs` workers, in `run_compare`'s order: every training is
    queued first, in grid order, and a run's evaluations join the end of the queue when it finishes. The wall time
    includes the grid's own ``grid_start``."""
    evaluations = [costs.evaluation_seconds(episodes, max_new_tokens) for _, episodes in plan.evaluations]
    queue = deque((True, costs.training_seconds(plan.work[run.name])) for run in plan.runs)
    busy: list[tuple[float, int, bool]] = []  # (finish time, order, whether a training) of the tasks under way
    idle, clock, total, order = jobs, 0.0, 0.0, 0
    while queue or busy:
        while idle and queue:
            training, seconds = queue.popleft()
            heapq.heappush(busy, (clock + seconds, order, training))
            idle, total, order = idle - 1, total + seconds, order + 1
        clock, _, training = heapq.heappop(busy)
        idle += 1
        if training:
            queue.extend((False, seconds) for seconds in evaluations)
    return costs.grid_start + clock, total


def plan_text(config: CompareConfig, out: str | os.PathLike) -> str:
    """What ``amft-vlm compare --dry-run`` prints: the grid, the task count, each method's work and the estimate."""
    plan = grid_plan(config, out)
    settings = config.compare
    costs = cost_model(config)
    train = config.train
    lines = [
        f"amft-vlm compare --dry-run: {config.source or 'the default config'} into {Path(out)} (nothing is run or written)",
        f"grid: {len(settings.methods)} methods x {len(settings.seeds)} seeds {settings.seeds} = {len(plan.runs)} runs of "
        f"{train.steps} steps, each evaluated on {len(plan.evaluations)} settings: "
        + "; ".join(f"{title}, {episodes} episodes" for title, episodes in plan.evaluations),
        f"tasks: {plan.task_count} ({len(plan.runs)} trainings + {len(plan.runs) * len(plan.evaluations)} evaluations), "
        f"{settings.jobs} job(s) at once",
        "",
        "| method | rollout episodes | validation episodes | expert examples | policy tokens (bound) | checkpoints |"
        + (" est. training s | est. evaluations s |" if costs else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if costs else ""),
    ]
    for method in settings.methods:
        work = next(plan.work[run.name] for run in plan.runs if run.method == method)  # the seeds do the same work
        row = (
            f"| {method} | {work.rollout_episodes:,} | {work.validation_episodes:,} | {work.expert_examples:,} | "
            f"{work.policy_tokens:,} | {work.checkpoints} |"
        )
        if costs:
            evaluations = sum(costs.evaluation_seconds(episodes, train.max_new_tokens) for _, episodes in plan.evaluations)
            row += f" {costs.training_seconds(work):.0f} | {evaluations:.0f} |"
        lines.append(row)
    lines.append("")
    if costs is None:
        lines.append(
            f"estimated time: none. The cost model is calibrated for tiny models on a CPU only; {train.model} on "
            f"device {train.device} is not (the work above is what the grid does)"
        )
    else:
        wall, total = estimate_wall_seconds(plan, costs, settings.jobs, train.max_new_tokens)
        lines.append(
            f"estimated time: {_minutes(wall)} on {settings.jobs} job(s) ({_minutes(total)} of tasks in all, and the grid's own "
            f"{costs.grid_start:g} s), for the whole grid; a rerun skips what is finished"
        )
        lines.append(
            f"cost model ({costs.calibration}): per run {costs.run_start:g} s + {costs.step:g} s per step + "
            f"{costs.policy_token:g} s per policy token (episodes x max_new_tokens) + {costs.expert_example:g} s per expert "
            f"example + {costs.checkpoint:g} s per checkpoint; per evaluation {costs.evaluation_start:g} s + "
            f"{costs.evaluation_token:g} s per episode token; {costs.grid_start:g} s per grid"
        )
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{math.ceil(seconds)} s"
