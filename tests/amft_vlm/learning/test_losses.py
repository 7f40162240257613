"""Loss terms on hand-made flat token tensors: SFT, the mix, clipping, the value loss."""

import math

import pytest
import torch

from amft_vlm.learning.losses import clipped_policy_loss, mix, sft_loss, token_mean, value_loss


def test_sft_loss_is_the_token_mean_negative_log_likelihood():
    logprobs = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    loss = sft_loss(logprobs)
    assert loss.item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3 tokens
    loss.backward()
    assert logprobs.grad.tolist() == pytest.approx([-1 / 3] * 3)  # every token pushed up equally
    assert token_mean(torch.zeros(0)).item() == 0.0


def test_mix_is_a_convex_combination():
    assert mix(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(2.5)  # 0.75 RL + 0.25 SFT
    assert mix(2.0, 4.0, 0.0) == 2.0 and mix(2.0, 4.0, 1.0) == 4.0




def test_clipped_loss_equals_plain_policy_gradient_on_policy():
    logprobs = torch.tensor([-1.0, -0.5], requires_grad=True)
    advantages = torch.tensor([2.0, -2.0])
    loss, stats = clipped_policy_loss(logprobs, logprobs.detach(), advantages)
    assert loss.item() == pytest.approx(0.0)  # -(2 - 2) / 2
    loss.backward()
    # d/dlogp of -ratio*A at ratio 1 is -A, averaged over the 2 tokens: up for A > 0, down for A < 0.
    assert logprobs.grad.tolist() == [-1.0, 1.0]
    assert (stats.clip_fraction, stats.mean_ratio) == (0.0, pytest.approx(1.0))


@pytest.mark.parametrize(("advantage", "log_ratio", "expect_gradient"), [(1.0, 0.5, False), (1.0, -0.5, True), (-1.0, -0.5, False), (-1.0, 0.5, True)])
def test_clipping_stops_gradient_only_where_the_objective_is_clipped(advantage, log_ratio, expect_gradient):
    old = torch.tensor([-1.0])
    logprobs = (old + log_ratio).clone().requires_grad_(True)
    loss, stats = clipped_policy_loss(logprobs, old, torch.tensor([advantage]), clip_epsilon=0.2)
    loss.backward()
    assert (logprobs.grad.abs().item() > 0) == expect_gradient
    # Counted as clipped exactly where the clipped term is in force, i.e. where the gradient stops.
    assert stats.clip_fraction == (0.0 if expect_gradient else 1.0)
    ratio = math.exp(log_ratio)
    expected = -min(ratio * advantage, min(max(ratio, 0.8), 1.2) * advantage)
    assert loss.item() == pytest.approx(expected)




def test_value_loss_is_clipped_like_ppo():
    old, target = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, held = value_loss(torch.tensor([1.0, 0.1]), target, old, clip_epsilon=0.2)
    # Turn 1 moved 1.0 from its old value: clipped to 0.2, error 0.8 (the larger, in force); turn 2 moved 0.1: unclipped, 0.9.
    assert loss.item() == pytest.approx(0.5 * (0.8**2 + 0.9**2) / 2)
    assert held == 1.0


def test_clip_fraction_counts_the_tokens_held_back():
    old = torch.zeros(4)
    logprobs = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    _, stats = clipped_policy_loss(logprobs, old, advantages, clip_epsilon=0.2)
    assert stats.clip_fraction == pytest.approx(0.5)  # the first (A > 0, above) and the last (A < 0, below)


