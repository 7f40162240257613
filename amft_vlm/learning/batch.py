"""What a loss pass consumes: a typed `RolloutBatch`, and trajectories scored into flat token tensors.

The data path from trajectories to a gradient, one shape per stage:

- `RolloutBatch`: an iteration's rollouts with one advantage per turn (and, for ``advantage: ppo``, the
  critic's inputs and targets per turn);
- `score_trajectories`: a batch of trajectories -> `TokenScores`, flat over their trainable tokens
  (teacher-forced log-probs with gradients, entropies, the sampling log-probs, each turn's advantage
  spread over its tokens);
- `GradientAccumulator`: the gradient of a token-mean loss over a batch split across processes and
  micro-batches, exactly the global token mean, with the pass's totals and its objective's statistics
  (a dataclass of floats, token-weighted) in a `PassResult`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agents.policy import VLMPolicy
from amft_vlm.learning.distributed import Parallel
from amft_vlm.rollout.trajectory import Trajectory


@dataclass(frozen=True)
class CriticTargets:
    """``advantage: ppo``: per trajectory, what the value head reads and is regressed on, one row per turn."""

    features: list[torch.Tensor]
    """The decision states of each trajectory's turns (detached)."""
    old_values: list[torch.Tensor]
    """The value head's estimates when the batch was collected (the value clip's anchor)."""
    returns: list[torch.Tensor]
    """GAE returns: the regression targets."""

    def select(self, indices: Sequence[int]) -> CriticTargets:
        """The rows of `indices`, in that order."""
        return CriticTargets(*([values[i] for i in indices] for values in (self.features, self.old_values, self.returns)))


@dataclass(frozen=True)
class RolloutBatch:
    """An iteration's rollouts (this process's share) with one advantage per turn, or an expert batch without."""

    trajectories: list[Trajectory]
    turn_advantages: list[torch.Tensor] | None = None
    """Per trajectory, ``(num_turns,)``: every token of turn t gets ``turn_advantages[i][t]`` (None: an SFT batch)."""
    critic: CriticTargets | None = None
    """``advantage: ppo`` only."""

    def __post_init__(self) -> None:
        if self.turn_advantages is None:
            return
        if len(self.turn_advantages) != len(self.trajectories):
            raise ValueError(f"{len(self.turn_advantages)} advantage rows for {len(self.trajectories)} trajectories")
        for index, (trajectory, advantages) in enumerate(zip(self.trajectories, self.turn_advantages, strict=True)):
            if advantages.shape != (trajectory.num_turns,):
                raise ValueError(f"trajectory {index} has {trajectory.num_turns} turns but advantages of shape {tuple(advantages.shape)}")

    def __len__(self) -> int:
        return len(self.trajectories)

    def select(self, indices: Sequence[int]) -> RolloutBatch:
        """The trajectories of `indices` with their advantages (and critic rows), in that order."""
        return RolloutBatch(
            [self.trajectories[i] for i in indices],
            [self.turn_advantages[i] for i in indices] if self.turn_advantages is not None else None,
            self.critic.select(indices) if self.critic is not None else None,
        )


@dataclass(frozen=True)
class TokenScores:
    """Teacher-forced scores of a batch of trajectories, flat over their trainable tokens (in order)."""

    logprobs: torch.Tensor
    """Log-probs at the scoring temperature, with gradients when scored with grad enabled."""
    entropy: torch.Tensor
    """Entropy of the same distributions (no graph, unless scored with ``entropy_grad``)."""
    old_logprobs: torch.Tensor
    """The sampling log-probs recorded at collection (0 for expert tokens)."""
    advantages: torch.Tensor
    """Each token's turn advantage (0 when scored without advantages)."""
    episode_lengths: list[int]
    """Trainable tokens of each trajectory: split `logprobs` by these for per-episode sums."""

    @property
    def num_tokens(self) -> int:
        """Trainable tokens in the batch."""
        return int(self.logprobs.numel())

    def episode_logprobs(self) -> torch.Tensor:
        """``(trajectories,)``: the sum of each trajectory's token log-probs (log p of its responses)."""
        return torch.stack([part.sum() for part in self.logprobs.split(self.episode_lengths)])


def score_trajectories(
    policy: VLMPolicy,
    trajectories: Sequence[Trajectory],
    *,
    temperature: float,
    turn_advantages: Sequence[torch.Tensor] | None = None,
    entropy_grad: bool = False,
) -> TokenScores:
    """Log-probs and entropies of every trainable token of `trajectories` (one forward pass over all
    their dialogues), with the sampling log-probs and each turn's advantage alongside.

    Every trajectory's images come prepared (`Trajectory.image_inputs`): nothing is re-processed here, and a
    trajectory without its prepared images is an error (`Trajectory.with_image_inputs` attaches them).
    With `entropy_grad` the entropies keep their graph, for a loss with an entropy bonus.
    """
    sequences, positions = [], []
    old, advantages, lengths = [], [], []
    for index, trajectory in enumerate(trajectories):
        for segment, sequence in zip(trajectory.segments, trajectory.token_sequences(), strict=True):
            sequences.append(sequence)
            positions.append(segment.trainable_positions)
            old.append(segment.response_logprobs)
        lengths.append(trajectory.num_response_tokens)
        if turn_advantages is not None:
            turn_values = turn_advantages[index]
            advantages.append(torch.repeat_interleave(turn_values, torch.tensor(trajectory.turn_lengths, device=turn_values.device)))
    logprobs, entropies = policy.token_logprobs(sequences, positions, temperature=temperature, with_entropy=True, entropy_grad=entropy_grad)
    flat = torch.cat(logprobs) if logprobs else torch.zeros(0)
    return TokenScores(
        logprobs=flat,
        entropy=torch.cat(entropies) if entropies else torch.zeros(0),
        old_logprobs=torch.cat(old).to(flat.device) if old else torch.zeros(0),
        # float32 advantages, or float64 ones with a float64 model (the meta-gradient's weights are float64).
        advantages=torch.cat(advantages).to(flat.device, torch.promote_types(flat.dtype, torch.float32)) if advantages else torch.zeros_like(flat.detach()),
        episode_lengths=lengths,
    )


def mini_batches(count: int, parts: int, *, seed: Sequence[int]) -> list[list[int]]:
    """``parts`` near-equal index lists covering ``range(count)`` (empty ones kept, so every process makes the same
    number of updates): in order for one part, else a permutation seeded by `seed`."""
    order = np.arange(count) if parts == 1 else np.random.default_rng(list(seed)).permutation(count)
    return [part.tolist() for part in np.array_split(order, parts)]


def micro_batches(count: int, parts: int) -> list[list[int]]:
    """Indices of `parts` near-equal micro-batches of ``range(count)`` (empty ones dropped)."""
    return [part.tolist() for part in np.array_split(np.arange(count), parts) if len(part)]


@dataclass(frozen=True)
class PassResult:
    """One loss pass over every process's batch: its gradient and its global totals."""

    gradient: list[torch.Tensor | None]
    """Per parameter (None where no token reached it); handed to the optimiser step, which takes it over."""
    loss: float
    """The token-mean loss."""
    entropy_sum: float
    """Sum of the token entropies."""
    tokens: int
    """Trainable tokens."""
    examples: int
    """Trajectories."""
    stats: Any
    """The objective's statistics (its stats dataclass), token-weighted over the pass; None for an objective without."""


class GradientAccumulator:
    """The gradient of a token-mean loss over a batch split across processes and micro-batches.

    Each micro-batch's loss (`add`) is weighted by its share of the global trainable tokens and its backward
    pass adds into the parameters' ``.grad`` (summed over processes by the distributed strategy), so the
    result is exactly the global token mean. `finish` takes the gradients out of ``.grad`` (no copies, no
    zero lists) with the pass's global totals.

    Args:
        parallel: the processes.
        trajectories: this process's whole batch for the pass.
        stats_type: the dataclass of floats the objective reports per micro-batch (None: none); every process
            reduces its fields, whether or not it has a micro-batch.
    """

    def __init__(self, parallel: Parallel, trajectories: Sequence[Trajectory], stats_type: type | None = None) -> None:
        check_images_everywhere(parallel, trajectories)
        self.parallel, self.stats_type, self.examples = parallel, stats_type, len(trajectories)
        (self.total_tokens,) = parallel.sums([sum(t.num_response_tokens for t in trajectories)])
        self.loss = self.entropy_sum = 0.0
        self.stat_sums = dict.fromkeys((field.name for field in dataclasses.fields(stats_type)) if stats_type else (), 0.0)

    def add(self, loss: torch.Tensor, scores: TokenScores, stats: Any = None) -> None:
        """Back-propagate one micro-batch's token-mean `loss` at its token share and add its statistics."""
        weight = scores.num_tokens / max(self.total_tokens, 1)
        (loss * weight).backward()
        self.loss += float(loss.detach()) * weight
        self.entropy_sum += float(scores.entropy.detach().sum())
        for name in self.stat_sums:
            self.stat_sums[name] += getattr(stats, name) * weight

    def finish(self, parameters: Sequence[torch.Tensor]) -> PassResult:
        """The gradient (taken out of ``.grad``) and the pass's totals over every process."""
        gradients = take_gradients(parameters)
        loss, entropy_sum, *stat_values, examples = self.parallel.sums([self.loss, self.entropy_sum, *self.stat_sums.values(), self.examples])
        stats = self.stats_type(**dict(zip(self.stat_sums, stat_values, strict=True))) if self.stats_type else None
        return PassResult(gradients, loss, entropy_sum, int(self.total_tokens), int(examples), stats)


def check_images_everywhere(parallel: Parallel, trajectories: Sequence[Trajectory]) -> None:
    """Sharded runs: images in a pass on every process or on none (the vision tower's collectives must pair up)."""
    if parallel.sharded:
        has_images = any(t.images for t in trajectories)
        parallel.check_same(float(has_images), what="whether a pass has images (mix image and text-only data per run, not per process)")


def take_gradients(parameters: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """The parameters' ``.grad`` tensors, which are then cleared (the next backward starts from none)."""
    gradients = [parameter.grad for parameter in parameters]
    for parameter in parameters:
        parameter.grad = None
    return gradients
