"""Loss terms on hand-made tensors: masking, clipping, group normalisation, GAE, entropy."""

import math

import pytest
import torch

from amft_vlm.losses import (
    clipped_policy_loss,
    generalized_advantages,
    group_advantages,
    group_turn_advantages,
    masked_mean,
    mix_losses,
    sft_loss,
    token_entropy,
    value_loss,
)


def test_sft_loss_counts_only_masked_tokens():
    logprobs = torch.tensor([[-1.0, -2.0, -100.0], [-3.0, -100.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft_loss(logprobs, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3 tokens
    assert masked_mean(logprobs, torch.zeros_like(mask)).item() == 0.0


def test_mix_is_a_convex_combination():
    assert mix_losses(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(2.5)


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


def test_clipped_loss_equals_plain_policy_gradient_on_policy():
    logprobs = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    advantages = torch.tensor([[2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask)
    assert loss.item() == pytest.approx(-2.0)
    loss.backward()
    # d/dlogp of -ratio*A at ratio 1 is -A, averaged over the 2 masked tokens; the masked token gets none.
    assert logprobs.grad.tolist() == [[-1.0, -1.0, 0.0]]
    assert (stats.clip_fraction, stats.mean_ratio) == (0.0, pytest.approx(1.0))


@pytest.mark.parametrize(("advantage", "log_ratio", "expect_gradient"), [(1.0, 0.5, False), (1.0, -0.5, True), (-1.0, -0.5, False), (-1.0, 0.5, True)])
def test_clipping_stops_gradient_only_where_the_objective_is_clipped(advantage, log_ratio, expect_gradient):
    old = torch.tensor([[-1.0]])
    logprobs = (old + log_ratio).clone().requires_grad_(True)
    loss, stats = clipped_policy_loss(logprobs, old, torch.tensor([[advantage]]), torch.tensor([[1]]), clip_epsilon=0.2)
    loss.backward()
    assert (logprobs.grad.abs().item() > 0) == expect_gradient
    # Counted as clipped exactly where the clipped term is in force, i.e. where the gradient stops.
    assert stats.clip_fraction == (0.0 if expect_gradient else 1.0)
    ratio = math.exp(log_ratio)
    expected = -min(ratio * advantage, min(max(ratio, 0.8), 1.2) * advantage)
    assert loss.item() == pytest.approx(expected)


def test_gae_with_lambda_one_is_the_return_minus_value():
    rewards, values = torch.tensor([-1.0, -1.0, 5.0]), torch.tensor([0.5, 1.0, 2.0])
    advantages, returns = generalized_advantages(rewards, values, gamma=1.0, lam=1.0)
    assert returns.tolist() == pytest.approx([3.0, 4.0, 5.0])
    assert advantages.tolist() == pytest.approx([2.5, 3.0, 3.0])
    one_step, _ = generalized_advantages(rewards, values, gamma=0.9, lam=0.0)
    assert one_step.tolist() == pytest.approx([-1 + 0.9 * 1.0 - 0.5, -1 + 0.9 * 2.0 - 1.0, 5.0 - 2.0])


def test_value_loss_is_clipped_like_ppo():
    old, target = torch.tensor([0.0]), torch.tensor([1.0])
    assert value_loss(torch.tensor([1.0]), target, old, clip_epsilon=0.2).item() == pytest.approx(0.5 * 0.8**2)
    assert value_loss(torch.tensor([0.1]), target, old, clip_epsilon=0.2).item() == pytest.approx(0.5 * 0.9**2)


def test_entropy_of_uniform_and_peaked_distributions():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    assert token_entropy(logits).tolist() == pytest.approx([math.log(4), 0.0], abs=1e-6)


def test_clip_fraction_on_a_flat_batch_without_a_mask():
    old = torch.zeros(4)
    logprobs = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    _, stats = clipped_policy_loss(logprobs, old, advantages, clip_epsilon=0.2)
    assert stats.clip_fraction == pytest.approx(0.5)  # the first (A > 0, above) and the last (A < 0, below)


def test_group_turn_advantages_compare_each_turn_with_the_same_turn_of_its_group():
    # Group 0: a 3-turn failure (-1, -1, -1) and a 1-turn success (+5); group 1: two 2-turn episodes.
    rewards = [[-1.0, -1.0, -1.0], [5.0], [-1.0, 5.0], [-1.0, -1.0]]
    advantages = group_turn_advantages(rewards, [0, 0, 1, 1])
    # Group 0: turn 0 rewards-to-go -3 and 5 (mean 1): centred -4 and +4; turns 1 and 2 are reached by the
    # failure only: 0. Std over (-4, 0, 0, 4) = sqrt(8).
    scale = math.sqrt(8.0)
    assert advantages[0].tolist() == pytest.approx([-4 / scale, 0.0, 0.0])
    assert advantages[1].tolist() == pytest.approx([4 / scale])
    # Group 1: turn 0 to-go 4 and -2 (mean 1): +-3; turn 1 to-go 5 and -1 (mean 2): +-3; std 3.
    assert advantages[2].tolist() == pytest.approx([1.0, 1.0])
    assert advantages[3].tolist() == pytest.approx([-1.0, -1.0])
    # The failing episode's later turns are not credited for their position (pooling would give them +).
    tied = group_turn_advantages([[1.0, 1.0], [1.0, 1.0]], [0, 0])
    assert all(a.abs().max() == 0 for a in tied)
