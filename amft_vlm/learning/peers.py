"""What the single-stage peers add to a training step: expert start states, joint groups, their loss
passes' global counts, and ReLIFT's buffer (`amft_vlm.learning.methods` says which method uses which).

- LUFFY and SRFT put one expert trajectory into each group of rollouts. Their start states are drawn
  from the expert set (`expert_start_states`), so the group's demonstration starts where its rollouts
  do; `with_demonstrations` appends it to the process's rollouts with its group id, and the method's
  advantage estimator (`amft_vlm.learning.advantages`) sees the joint group.
- Their losses normalise over global counts that must be known before the pass (`GradientAccumulator`
  takes a token mean per micro-batch): LUFFY's normalisation (`luffy_scale`) and SRFT's token count per
  kind (`srft_counts`), which their objectives compute once per pass (`amft_vlm.learning.objectives`).
- ReLIFT buffers the expert trajectories of start states whose rollouts all failed (`all_failed_groups`,
  `ReliftBuffer`, newest first) and, after the step's RL update, makes one SFT update on the newest
  ``relift.buffer_ratio x episodes_per_step`` of them when it holds that many.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from amft_vlm.learning.distributed import Parallel
from amft_vlm.learning.losses import SrftToken, dr_grpo_scale, max_length_scale
from amft_vlm.rollout.trajectory import Trajectory

START_STATE_STREAM = 3
"""Stream of the step's expert start states in ``default_rng([seed, step, stream])`` (independent of the others)."""


def expert_start_states(expert_count: int, step: int, count: int, seed: int) -> list[int]:
    """Indices into the expert set of the step's `count` start states: a pure function of (seed, step),
    the same on every process and after a resume; without repeats when the set is large enough."""
    if expert_count < 1:
        raise ValueError("the expert set is empty: the method draws its start states from it")
    rng = np.random.default_rng([seed, step, START_STATE_STREAM])
    return rng.choice(expert_count, size=count, replace=expert_count < count).tolist()


def with_demonstrations(rollouts: list[Trajectory], demonstrations: Sequence[Trajectory]) -> list[Trajectory]:
    """The rollouts followed by demonstration ``g`` as a member of group ``g`` (this process's groups are
    numbered in the order of its start states, as `RolloutEngine.collect` numbers them)."""
    return rollouts + [dataclasses.replace(demo, group=group) for group, demo in enumerate(demonstrations)]


def is_demonstration(trajectory: Trajectory) -> bool:
    """Whether the trajectory's answers came from somewhere other than the policy's sampling (an expert)."""
    return trajectory.sampling_temperature is None


def expert_token_mask(trajectories: Sequence[Trajectory], device: torch.device | str = "cpu") -> torch.Tensor:
    """Per trainable token of `trajectories` (in `score_trajectories`' order): True for a demonstration's tokens."""
    flags = [torch.full((t.num_response_tokens,), is_demonstration(t), dtype=torch.bool) for t in trajectories]
    return torch.cat(flags).to(device) if flags else torch.zeros(0, dtype=torch.bool, device=device)


LUFFY_NORMALISERS = ("max_length", "dr_grpo")
"""What `luffy_scale` divides the pass's token sum by (``TrainConfig.luffy.normaliser``)."""


def luffy_scale(parallel: Parallel, trajectories: Sequence[Trajectory], max_new_tokens: int, *, normaliser: str) -> float:
    """The factor that turns the pass's token-mean loss into a token sum over a constant, for the whole pass.

    ``normaliser="max_length"``: global tokens / max_new_tokens (`max_length_scale`), LUFFY's released code (the
    token sum over the padded response length, not also over the number of answers). ``"dr_grpo"``: global tokens
    / (global answers x max_new_tokens) (`dr_grpo_scale`), Dr.GRPO's, where a multi-turn episode is several
    answers, each up to max_new_tokens.
    """
    if normaliser not in LUFFY_NORMALISERS:
        raise ValueError(f"normaliser must be one of {LUFFY_NORMALISERS}; got {normaliser!r}")
    tokens, answers = parallel.sums([sum(t.num_response_tokens for t in trajectories), sum(t.num_turns for t in trajectories)])
    if normaliser == "max_length":
        return max_length_scale(int(tokens), max_new_tokens)
    return dr_grpo_scale(int(tokens), max(int(answers), 1), max_new_tokens)


def srft_counts(parallel: Parallel, trajectories: Sequence[Trajectory], turn_advantages: Sequence[torch.Tensor]) -> tuple[dict[int, int], int]:
    """Global trainable-token count of each `SrftToken` kind over the pass, and the total (the kind of a
    token: DEMO for a demonstration's, else the sign of its turn's advantage, as `srft_token_kinds`)."""
    local = dict.fromkeys(SrftToken, 0)
    for trajectory, advantages in zip(trajectories, turn_advantages, strict=True):
        for length, advantage in zip(trajectory.turn_lengths, advantages.tolist(), strict=True):
            if is_demonstration(trajectory):
                kind = SrftToken.DEMO
            else:
                kind = SrftToken.POSITIVE if advantage > 0 else SrftToken.NEGATIVE if advantage < 0 else SrftToken.NEUTRAL
            local[kind] += length
    values = parallel.sums([local[kind] for kind in SrftToken])
    counts = {kind: int(value) for kind, value in zip(SrftToken, values, strict=True)}
    return counts, sum(counts.values())


def all_failed_groups(rollouts: Sequence[Trajectory], group_count: int) -> list[bool]:
    """Per group ``0 .. group_count - 1`` of `rollouts`: whether every one of its rollouts failed (ReLIFT buffers
    those start states: the authors' "all G rewards equal the failure value", here no rollout a success). A group
    with one success among its failures is not buffered; neither is a group without rollouts."""
    outcomes: list[list[bool]] = [[] for _ in range(group_count)]
    for trajectory in rollouts:
        outcomes[trajectory.group].append(bool(trajectory.success))
    return [bool(successes) and not any(successes) for successes in outcomes]


@dataclasses.dataclass
class ReliftBuffer:
    """ReLIFT's buffer: indices into the expert set of start states on which every rollout failed, newest first.

    As in the authors' code, a step's failures go in front of the older ones (in the order of the step's start
    states), and an SFT update takes the first `capacity` (the newest) and leaves the rest for later.
    """

    capacity: int
    """Start states that trigger an SFT update (``ReliftSettings.buffer_capacity``)."""
    items: list[int] = dataclasses.field(default_factory=list)
    """The buffered start states, newest first."""

    def add_failed(self, parallel: Parallel, states: Sequence[int], shard_failed: Sequence[bool], process: int, processes: int) -> int:
        """Put the step's start states (`states`, global) whose groups failed on every process's share
        (`shard_failed`: this process's groups, start states ``states[process::processes]``) in front; returns how many."""
        flags = [0.0] * len(states)
        for position, failed in zip(range(process, len(states), processes), shard_failed, strict=True):
            flags[position] = float(failed)
        failed_everywhere = parallel.sums(flags)
        added = [state for state, flag in zip(states, failed_everywhere, strict=True) if flag > 0]
        self.items = added + self.items
        return len(added)

    @property
    def full(self) -> bool:
        """Whether it holds at least `capacity` start states (an SFT update is due)."""
        return len(self.items) >= self.capacity

    def drain(self) -> list[int]:
        """The `capacity` newest buffered indices, taken out; the older ones wait for the next update."""
        items, self.items = self.items[: self.capacity], self.items[self.capacity :]
        return items
