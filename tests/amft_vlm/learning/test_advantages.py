"""Advantage estimators on hand-computed values: GRPO per episode and per turn, GAE, leave-one-out."""

import math

import pytest
import torch

from amft_vlm.learning.advantages import (
    ADVANTAGE_ESTIMATORS,
    EpisodeRewards,
    generalized_advantages,
    group_advantages,
    grpo_episode_advantages,
    grpo_turn_advantages,
    leave_one_out_advantages,
    leave_one_out_turn_advantages,
)
from amft_vlm.learning.methods import get_method
from amft_vlm.run.config import load_config


def test_group_advantages_normalise_within_groups_and_zero_variance_is_zero():
    returns = torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 10.0])
    groups = [0, 0, 1, 1, 2, 2]
    advantages = group_advantages(returns, groups)
    assert advantages[:2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert advantages[2:4].tolist() == [0.0, 0.0]
    assert advantages[4:].tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert group_advantages(returns, groups, scale_by_std=False)[:2].tolist() == [-1.0, 1.0]
    assert group_advantages(torch.tensor([7.0]), [0]).tolist() == [0.0]
    with pytest.raises(ValueError, match="one group id per return"):
        group_advantages(returns, [0, 1])


def test_gae_with_lambda_one_is_the_return_minus_value():
    rewards, values = torch.tensor([-1.0, -1.0, 5.0]), torch.tensor([0.5, 1.0, 2.0])
    advantages, returns = generalized_advantages(rewards, values, gamma=1.0, lam=1.0)
    assert returns.tolist() == pytest.approx([3.0, 4.0, 5.0])
    assert advantages.tolist() == pytest.approx([2.5, 3.0, 3.0])
    one_step, _ = generalized_advantages(rewards, values, gamma=0.9, lam=0.0)
    assert one_step.tolist() == pytest.approx([-1 + 0.9 * 1.0 - 0.5, -1 + 0.9 * 2.0 - 1.0, 5.0 - 2.0])


def test_grpo_turn_advantages_compare_each_turn_with_the_same_turn_of_its_group():
    # Group 0: a 3-turn failure (-1, -1, -1) and a 1-turn success (+5); group 1: two 2-turn episodes.
    rewards = [[-1.0, -1.0, -1.0], [5.0], [-1.0, 5.0], [-1.0, -1.0]]
    advantages = grpo_turn_advantages(rewards, [0, 0, 1, 1])
    # Group 0: turn 0 rewards-to-go -3 and 5 (mean 1): centred -4 and +4; turns 1 and 2 are reached by the
    # failure only: 0. Std over (-4, 0, 0, 4) = sqrt(8).
    scale = math.sqrt(8.0)
    assert advantages[0].tolist() == pytest.approx([-4 / scale, 0.0, 0.0])
    assert advantages[1].tolist() == pytest.approx([4 / scale])
    # Group 1: turn 0 to-go 4 and -2 (mean 1): +-3; turn 1 to-go 5 and -1 (mean 2): +-3; std 3.
    assert advantages[2].tolist() == pytest.approx([1.0, 1.0])
    assert advantages[3].tolist() == pytest.approx([-1.0, -1.0])
    # The failing episode's later turns are not credited for their position (pooling would give them +).
    tied = grpo_turn_advantages([[1.0, 1.0], [1.0, 1.0]], [0, 0])
    assert all(a.abs().max() == 0 for a in tied)


def test_episode_credit_gives_every_turn_its_episode_advantage():
    # Group 0: returns -3 and 5 (mean 1, std 4): -1 and +1 for every turn; group 1: one episode, 0.
    advantages = grpo_episode_advantages([[-1.0, -1.0, -1.0], [5.0], [2.0, 1.0]], [0, 0, 1])
    assert advantages[0].tolist() == pytest.approx([-1.0, -1.0, -1.0], abs=1e-5)
    assert advantages[1].tolist() == pytest.approx([1.0], abs=1e-5)
    assert advantages[2].tolist() == [0.0, 0.0]


# Group 0: a 2-turn failure (-1, -1), a 1-turn success (+5) and a demonstration (success, +5); group 1: 0 and 1.
REWARDS = [[-1.0, -1.0], [5.0], [5.0], [0.0], [1.0]]
GROUPS = [0, 0, 0, 1, 1]
STD_0 = math.sqrt(((-2 - 8 / 3) ** 2 + 2 * (5 - 8 / 3) ** 2) / 3)
EPISODE_CREDIT = {  # returns minus the group mean (8/3 and 1/2); GRPO divides by the group's std too
    "grpo": [[(-2 - 8 / 3) / STD_0] * 2, [(5 - 8 / 3) / STD_0], [(5 - 8 / 3) / STD_0], [-1.0], [1.0]],
    "mean_centred": [[-2 - 8 / 3] * 2, [5 - 8 / 3], [5 - 8 / 3], [-0.5], [0.5]],
}


@pytest.mark.parametrize(
    ("method", "settings", "estimator"),
    [
        ("rl", [], "grpo"), ("amft", [], "grpo"), ("srft", [], "grpo"), ("chord-phi", [], "grpo"),
        ("rl", ["advantage=ppo"], "gae"), ("amft", ["advantage=ppo"], "gae"),
        ("luffy", [], "mean_centred"), ("relift", [], "mean_centred"), ("relift", ["relift.rl_loss=paper"], "grpo"),
    ],
)  # fmt: skip
def test_each_method_row_names_its_estimator_and_the_estimator_gives_its_values(method, settings, estimator):
    config = load_config(overrides=[f"method={method}", *settings])
    name = get_method(method).advantage(config)
    assert name == estimator
    entry = ADVANTAGE_ESTIMATORS[name]
    if entry.needs_values:  # GAE with lambda 1 and no discount: the return to go minus the value, then normalised
        values = [torch.full((len(r),), 0.5) for r in REWARDS]
        result = entry.estimate(EpisodeRewards(REWARDS, GROUPS, credit="turn", values=values, gamma=1.0, lam=1.0))
        raw = [-2.5, -1.5, 4.5, 4.5, -0.5, 0.5]
        mean, std = sum(raw) / 6, math.sqrt(sum((a - sum(raw) / 6) ** 2 for a in raw) / 6)
        assert torch.cat(result.advantages).tolist() == pytest.approx([(a - mean) / std for a in raw], rel=1e-5)
        assert [t.tolist() for t in result.value_targets] == [[-2.0, -1.0], [5.0], [5.0], [0.0], [1.0]]
        return
    result = entry.estimate(EpisodeRewards(REWARDS, GROUPS, credit="episode"))
    assert result.value_targets is None
    for got, want in zip(result.advantages, EPISODE_CREDIT[name], strict=True):
        assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_grpo_follows_the_runs_credit():
    by_turn = ADVANTAGE_ESTIMATORS["grpo"].estimate(EpisodeRewards(REWARDS, GROUPS, credit="turn")).advantages
    for got, want in zip(by_turn, grpo_turn_advantages(REWARDS, GROUPS), strict=True):
        assert torch.equal(got, want)
    by_episode = ADVANTAGE_ESTIMATORS["grpo"].estimate(EpisodeRewards(REWARDS, GROUPS, credit="episode")).advantages
    for got, want in zip(by_episode, grpo_episode_advantages(REWARDS, GROUPS), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(by_turn[0], by_episode[0])  # turn credit compares turn 2 of the failure with nothing: 0
    with pytest.raises(ValueError, match="credit must be one of episode, turn"):
        ADVANTAGE_ESTIMATORS["grpo"].estimate(EpisodeRewards(REWARDS, GROUPS, credit="step"))


def test_leave_one_out_turn_advantages_by_hand():
    """Reward to go per turn minus the others' at the same turn; an episode that ended has 0 to go there."""
    turn_rewards = [[-3.0, -1.0], [-2.0], [1.0, 5.0], [2.0]]
    advantages = leave_one_out_turn_advantages(turn_rewards, [0, 0, 0, 1])
    # to go: A (-4, -1), B (-2, 0 after its end), C (6, 5); baselines from the other two of the group.
    expected = [[-4 - (-2 + 6) / 2, -1 - (0 + 5) / 2], [-2 - (-4 + 6) / 2], [6 - (-4 - 2) / 2, 5 - (-1 + 0) / 2], [0.0]]
    for got, want in zip(advantages, expected, strict=True):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # One turn each: the episode form (return minus the others' mean return).
    single = leave_one_out_turn_advantages([[1.0], [2.0], [3.0]], [0, 0, 0])
    torch.testing.assert_close(torch.cat(single), leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0]), [0, 0, 0]))
    with pytest.raises(ValueError, match="one group id per episode"):
        leave_one_out_turn_advantages(turn_rewards, [0, 0])
