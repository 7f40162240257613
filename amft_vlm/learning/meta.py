"""The meta-gradient's measurement: dU/dmu from validation episodes, along the update's derivative in mu.

`amft_vlm.learning.controller` holds what the controller does with it (`MetaEstimate`, the pooling across meta
steps) and `amft_vlm.learning.optimiser` the look-ahead's derivative (`MuTangent`); this module needs the policy and
the validation episodes, which their arithmetic does not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from agents.policy import VLMPolicy
from amft_vlm.learning.advantages import leave_one_out_advantages, leave_one_out_turn_advantages
from amft_vlm.learning.batch import check_images_everywhere, micro_batches, score_trajectories, take_gradients
from amft_vlm.learning.controller import MetaEvidence
from amft_vlm.learning.distributed import Parallel, flat_dot
from amft_vlm.rollout.trajectory import Trajectory


def _episode_credit(episodes: Sequence[Trajectory]) -> list[torch.Tensor]:
    """Every turn of an episode weighted by its return minus the mean return of the others from its start state."""
    weights = leave_one_out_advantages(torch.tensor([t.episode_return for t in episodes], dtype=torch.float64), [t.group for t in episodes])
    return [weights[i].expand(t.num_turns).clone() for i, t in enumerate(episodes)]


def _turn_credit(episodes: Sequence[Trajectory]) -> list[torch.Tensor]:
    """Each turn weighted by its reward-to-go minus the others' at the same turn (`leave_one_out_turn_advantages`)."""
    return leave_one_out_turn_advantages([t.turn_rewards for t in episodes], [t.group for t in episodes])


META_CREDITS: dict[str, Callable[[Sequence[Trajectory]], list[torch.Tensor]]] = {
    "episode": _episode_credit,
    "turn": _turn_credit,
}
"""``controller.meta_credit`` -> the REINFORCE weight of each validation turn (float64, one tensor per episode)."""


@dataclass(frozen=True)
class MetaMeasurement:
    """One meta step's validation evidence, before the controller pools it."""

    values: list[float]
    """Per round of start states (one state per process), the mean of its states' ``<grad U_i, d theta'/d mu>``;
    exactly 0 for a round whose states all tie."""
    states: int
    """Validation start states played, over all processes."""
    tied_states: int
    """Of them, those whose episodes all got the same credit (no information: their REINFORCE weights are all 0)."""


def meta_gradient(
    policy: VLMPolicy,
    parameters: Sequence[torch.Tensor],
    parallel: Parallel,
    episodes: Sequence[Trajectory],
    direction: list[torch.Tensor | None],
    *,
    temperature: float,
    micro_batch_count: int,
    credit: str = "episode",
    training_mode: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> MetaMeasurement:
    """dU/dmu along `direction` from validation `episodes` (this process's start states) played by the updated policy.

    Each start state i gives ``s_i = < (1/K) sum_j sum_t w_ijt grad log p(answer t of tau_ij), direction >``
    with the leave-one-out weights ``w`` of `credit` (`META_CREDITS`: the episode's return, or the reward
    to go from each answer, minus the others' from the same state), one backward pass (in micro-batches)
    per start state. With W processes the states go in rounds of W, one per process: a data-parallel
    backward pass sums the processes' gradients, so a round gives the mean of its W states' values, and
    the standard error is taken over rounds (over single states with one process; dU/dmu itself is the
    same either way). A round whose states all tie gives exactly 0 and is not scored.
    `training_mode` makes the context entered around each start state's backward passes (gradient
    checkpointing acts only in training mode).
    """
    if credit not in META_CREDITS:
        raise ValueError(f"meta credit must be one of {', '.join(META_CREDITS)}; got {credit!r}")
    weights = META_CREDITS[credit](episodes)
    states = [[i for i, trajectory in enumerate(episodes) if trajectory.group == group] for group in sorted({t.group for t in episodes})]
    own_tied = [not any(bool((weights[i] != 0).any()) for i in members) for members in states]
    tied = parallel.all_true(own_tied)
    per_round = []
    for members, skip in zip(states, tied, strict=True):
        if skip:
            per_round.append(0.0)
            continue
        check_images_everywhere(parallel, [episodes[i] for i in members])
        with training_mode() if training_mode is not None else contextlib.nullcontext():
            for indices in micro_batches(len(members), micro_batch_count):
                chosen = [members[i] for i in indices]
                scores = score_trajectories(policy, [episodes[i] for i in chosen], temperature=temperature, turn_advantages=[weights[i] for i in chosen])
                ((scores.advantages * scores.logprobs).sum() / len(members)).backward()
        per_round.append(flat_dot(take_gradients(parameters), direction) / parallel.world)
    total_states, tied_states = parallel.sums([len(states), sum(own_tied)])
    return MetaMeasurement(per_round, int(total_states), int(tied_states))


def evidence_metrics(evidence: MetaEvidence, measurement: MetaMeasurement, digest: str) -> dict:
    """A meta step's metrics: its own dU/dmu, standard error and t, the pooled t (and effective states) the
    signal comes from, the share of validation states that tied, and the validation episodes' token digest."""
    own, pooled = evidence.step, evidence.pooled
    return {
        "meta_dU_dmu": own and own.value,
        "meta_stderr": own and own.stderr,
        "meta_t": own and _finite_or_none(own.t_statistic),
        "meta_pooled_t": pooled and _finite_or_none(pooled.t_statistic),
        "meta_pooled_states": pooled and pooled.states,
        "meta_tied_share": measurement.tied_states / max(measurement.states, 1),
        "validation_digest": digest,
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
