"""The meta-gradient's measurement: dU/dmu from validation episodes, along the update's derivative in mu.

`amft_vlm.controller` holds what the controller does with it (`MetaEstimate`, the look-ahead's
derivative `MuTangent`); this module needs the policy and the validation episodes, which the
controller's arithmetic does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from agents.policy import VLMPolicy
from amft_vlm.advantages import leave_one_out_advantages
from amft_vlm.batch import check_images_everywhere, micro_batches, score_trajectories, take_gradients
from amft_vlm.controller import MetaEstimate
from amft_vlm.distributed import Parallel, flat_dot
from amft_vlm.trajectory import Trajectory


def meta_gradient(
    policy: VLMPolicy,
    parameters: Sequence[torch.Tensor],
    parallel: Parallel,
    episodes: Sequence[Trajectory],
    direction: list[torch.Tensor | None],
    *,
    temperature: float,
    micro_batch_count: int,
    training_mode: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> MetaEstimate | None:
    """dU/dmu along `direction` from validation `episodes` (this process's start states) played by the updated policy.

    Each start state i gives ``s_i = < (1/K) sum_j w_ij grad log p(tau_ij), direction >`` with the
    leave-one-out advantages ``w``, one backward pass (in micro-batches) per start state. With W
    processes the states go in rounds of W, one per process: a data-parallel backward pass sums the
    processes' gradients, so a round gives the mean of its W states' values, and the standard error
    is taken over rounds (over single states with one process; dU/dmu itself is the same either way).
    A round whose states all tie gives exactly 0 and is not scored. None when no round has a signal.
    `training_mode` makes the context entered around each start state's backward passes (gradient checkpointing
    acts only in training mode).
    """
    weights = leave_one_out_advantages(torch.tensor([t.episode_return for t in episodes]), [t.group for t in episodes])
    states = [[i for i, trajectory in enumerate(episodes) if trajectory.group == group] for group in sorted({t.group for t in episodes})]
    tied = parallel.all_true([not any(weights[i] != 0 for i in members) for members in states])
    per_round = []
    for members, skip in zip(states, tied, strict=True):
        if skip:
            per_round.append(0.0)
            continue
        check_images_everywhere(parallel, [episodes[i] for i in members])
        with training_mode() if training_mode is not None else contextlib.nullcontext():
            for indices in micro_batches(len(members), micro_batch_count):
                chosen = [members[i] for i in indices]
                scores = score_trajectories(policy, [episodes[i] for i in chosen], temperature=temperature)
                ((weights[chosen].to(scores.logprobs) * scores.episode_logprobs()).sum() / len(members)).backward()
        per_round.append(flat_dot(take_gradients(parameters), direction) / parallel.world)
    return MetaEstimate.from_per_state(per_round)
