"""Advantage estimators on hand-computed values: GRPO per episode and per turn, GAE, leave-one-out."""

import math

import pytest
import torch

from amft_vlm.advantages import (
    GROUP_ADVANTAGES,
    generalized_advantages,
    group_advantages,
    grpo_episode_advantages,
    grpo_turn_advantages,
    leave_one_out_advantages,
    leave_one_out_turn_advantages,
)


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


def test_the_table_maps_each_credit_to_its_estimator():
    assert {"episode": grpo_episode_advantages, "turn": grpo_turn_advantages} == GROUP_ADVANTAGES


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
