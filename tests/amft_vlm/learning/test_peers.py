"""What the peers add to a step (amft_vlm/learning/peers.py), on stand-in trajectories and processes."""

from types import SimpleNamespace

import pytest
import torch

from amft_vlm.learning.advantages import ADVANTAGE_ESTIMATORS, EpisodeRewards
from amft_vlm.learning.losses import SrftToken, srft_token_counts, srft_token_kinds
from amft_vlm.learning.methods import get_method
from amft_vlm.learning.peers import (
    expert_start_states,
    expert_token_mask,
    luffy_scale,
    srft_counts,
)
from amft_vlm.run.config import TrainConfig


class TwoProcesses:
    """A `Parallel` stand-in for one of two processes: `sums` adds what the other process contributes."""

    def __init__(self, other):
        self.other = other

    def sums(self, values):
        return [float(a) + float(b) for a, b in zip(values, self.other, strict=True)]


class OneProcess:
    def sums(self, values):
        return [float(v) for v in values]


def episode(turn_lengths, *, expert=False, rewards=None, group=0):
    return SimpleNamespace(
        turn_lengths=tuple(turn_lengths), num_turns=len(turn_lengths), num_response_tokens=sum(turn_lengths),
        sampling_temperature=None if expert else 1.0, turn_rewards=tuple(rewards or [0.0] * len(turn_lengths)), group=group,
    )


def test_start_states_are_a_pure_function_of_seed_and_step():
    assert expert_start_states(10, 3, 4, seed=7) == expert_start_states(10, 3, 4, seed=7)
    assert expert_start_states(10, 3, 4, seed=7) != expert_start_states(10, 4, 4, seed=7)
    assert len(set(expert_start_states(10, 0, 10, seed=0))) == 10  # without repeats when the set is large enough
    with pytest.raises(ValueError, match="expert set is empty"):
        expert_start_states(0, 0, 2, seed=0)


def test_srft_counts_agree_with_the_token_kinds():
    trajectories = [episode([2, 3]), episode([4]), episode([1, 1], expert=True), episode([5])]
    advantages = [torch.tensor([0.5, -1.0]), torch.tensor([0.0]), torch.tensor([2.0, 2.0]), torch.tensor([-0.2])]
    counts, total = srft_counts(OneProcess(), trajectories, advantages)
    per_token = torch.cat([a.repeat_interleave(torch.tensor(t.turn_lengths)) for t, a in zip(trajectories, advantages, strict=True)])
    kinds = srft_token_kinds(per_token, expert_token_mask(trajectories))
    assert counts == srft_token_counts(kinds) and total == 16
    assert counts == {SrftToken.DEMO: 2, SrftToken.POSITIVE: 2, SrftToken.NEGATIVE: 8, SrftToken.NEUTRAL: 4}


def test_luffy_scale_divides_the_token_sum_by_the_longest_answer_and_not_by_the_answers():
    trajectories = [episode([10, 20]), episode([30], expert=True)]  # 60 tokens in 3 answers
    # LUFFY's released normaliser: sum / max_new_tokens, whatever the number of answers.
    assert luffy_scale(OneProcess(), trajectories, max_new_tokens=40, normaliser="max_length") == pytest.approx(60 / 40)
    assert luffy_scale(TwoProcesses([60, 3]), trajectories, max_new_tokens=40, normaliser="max_length") == pytest.approx(120 / 40)
    # Dr.GRPO's: sum / (answers x max_new_tokens).
    assert luffy_scale(OneProcess(), trajectories, max_new_tokens=40, normaliser="dr_grpo") == pytest.approx(60 / (3 * 40))
    assert luffy_scale(TwoProcesses([60, 3]), trajectories, max_new_tokens=40, normaliser="dr_grpo") == pytest.approx(120 / (6 * 40))
    with pytest.raises(ValueError, match="normaliser"):
        luffy_scale(OneProcess(), trajectories, max_new_tokens=40, normaliser="tokens")


def joint_group_advantages(method, group):
    """The advantages `method`'s estimator gives the joint group (its rollouts and its demonstration)."""
    estimator = ADVANTAGE_ESTIMATORS[get_method(method).advantage(TrainConfig(method=method))]
    return estimator.estimate(EpisodeRewards([t.turn_rewards for t in group], [t.group for t in group])).advantages


def test_joint_group_advantages_luffy_mean_centres_srft_scales():
    group = [episode([3], rewards=[0.0]), episode([3], rewards=[0.0]), episode([3], expert=True, rewards=[1.0])]
    luffy = joint_group_advantages("luffy", group)
    assert [float(a[0]) for a in luffy] == pytest.approx([-1 / 3, -1 / 3, 2 / 3])  # the demonstration carries the signal
    srft = joint_group_advantages("srft", group)
    std = torch.tensor([0.0, 0.0, 1.0]).std(unbiased=False).item()
    assert [float(a[0]) for a in srft] == pytest.approx([-1 / 3 / std, -1 / 3 / std, 2 / 3 / std], rel=1e-4)
