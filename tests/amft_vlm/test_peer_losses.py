"""The peers' loss terms (CHORD-phi, DFT, LUFFY, SRFT) on hand-made flat token tensors, against hand arithmetic."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amft_vlm.losses import (
    SFT_WEIGHTINGS,
    SrftToken,
    dr_grpo_scale,
    luffy_policy_loss,
    sft_loss,
    srft_loss,
    srft_token_counts,
    srft_token_kinds,
    weighted_sft_loss,
)

DEMO, POSITIVE, NEGATIVE, NEUTRAL = SrftToken.DEMO, SrftToken.POSITIVE, SrftToken.NEGATIVE, SrftToken.NEUTRAL


def leaf(values):
    """Log-probs as a leaf tensor, so the gradient lands on them directly."""
    return torch.tensor(values, requires_grad=True)


def log_of(*probabilities):
    return leaf([math.log(p) for p in probabilities])


# weighted_sft_loss: CHORD-phi and DFT


def test_weighted_sft_values_by_hand():
    p = (0.5, 0.2, 0.9)
    nll = -(math.log(0.5) + math.log(0.2) + math.log(0.9)) / 3
    phi = -(0.5 * 0.5 * math.log(0.5) + 0.2 * 0.8 * math.log(0.2) + 0.9 * 0.1 * math.log(0.9)) / 3
    dft = -(0.5 * math.log(0.5) + 0.2 * math.log(0.2) + 0.9 * math.log(0.9)) / 3
    assert weighted_sft_loss(log_of(*p), "nll").item() == pytest.approx(nll)
    assert weighted_sft_loss(log_of(*p), "chord_phi").item() == pytest.approx(phi)
    assert weighted_sft_loss(log_of(*p), "dft").item() == pytest.approx(dft)


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        ("nll", [-1 / 2, -1 / 2]),
        # Detached weight: exactly -p(1-p)/N, no d w/d logp term (which would add -(1 - 2p) p log p / N).
        ("chord_phi", [-0.5 * 0.5 / 2, -0.9 * 0.1 / 2]),
        ("dft", [-0.5 / 2, -0.9 / 2]),
    ],
)
def test_weighted_sft_gradient_is_minus_the_detached_weight_over_n(weighting, expected):
    logprobs = log_of(0.5, 0.9)
    weighted_sft_loss(logprobs, weighting).backward()
    assert logprobs.grad.tolist() == pytest.approx(expected, rel=1e-6)
    assert all(g < 0 for g in logprobs.grad.tolist())  # descent raises every expert token


def test_nll_weighting_is_exactly_sft_loss():
    logprobs = torch.tensor([-0.3, -2.5, -7.0, -0.01])
    assert torch.equal(weighted_sft_loss(logprobs, "nll"), sft_loss(logprobs))


def test_chord_phi_damps_certain_and_far_off_tokens():
    logprobs = log_of(0.01, 0.5, 0.99)
    weighted_sft_loss(logprobs, "chord_phi").backward()
    far_off, middle, certain = (abs(g) for g in logprobs.grad.tolist())
    assert far_off < middle and certain < middle
    assert middle == pytest.approx(0.25 / 3) and far_off == pytest.approx(0.01 * 0.99 / 3)


def test_dft_weight_is_the_probability():
    probabilities = (0.05, 0.3, 0.8)
    logprobs = log_of(*probabilities)
    weighted_sft_loss(logprobs, "dft").backward()
    assert (-3 * logprobs.grad).tolist() == pytest.approx(list(probabilities))


def test_bad_weighting_names_the_choices():
    with pytest.raises(ValueError, match="nll.*chord_phi.*dft"):
        weighted_sft_loss(torch.zeros(2), "phi")
    assert SFT_WEIGHTINGS == ("nll", "chord_phi", "dft")


# luffy_policy_loss


def test_dr_grpo_scale_turns_the_token_mean_into_sum_over_sequences_times_max_length():
    assert dr_grpo_scale(6, 2, 4) == 0.75
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert (dr_grpo_scale(6, 2, 4) * values.mean()).item() == pytest.approx(21 / (2 * 4))
    assert dr_grpo_scale(0, 1, 8) == 0.0
    for bad in ((6, 0, 4), (6, 2, 0), (-1, 2, 4)):
        with pytest.raises(ValueError):
            dr_grpo_scale(*bad)


def test_luffy_value_and_stats_by_hand():
    logprobs = torch.tensor([-1.0, -0.5, math.log(0.3)])
    old = torch.tensor([-1.5, -0.5, 0.0])
    advantages = torch.tensor([2.0, -1.0, 1.5])
    off_policy = torch.tensor([False, False, True])
    loss, stats = luffy_policy_loss(logprobs, old, advantages, off_policy, shaping_gamma=0.1, scale=0.75)
    # On-policy: -2 * e^0.5 and -(-1) * e^0; expert: -1.5 * 0.3 / (0.3 + 0.1).
    expected = 0.75 * (-2 * math.exp(0.5) + 1.0 - 1.5 * 0.3 / 0.4) / 3
    assert loss.item() == pytest.approx(expected)
    assert stats.mean_on_policy_ratio == pytest.approx((math.exp(0.5) + 1.0) / 2)
    assert stats.mean_shaped_probability == pytest.approx(0.75)
    assert stats.expert_token_share == pytest.approx(1 / 3)


def test_luffy_gradient_by_hand():
    logprobs = leaf([-1.0, math.log(0.2)])
    old = torch.tensor([-1.2, 0.0])
    advantages = torch.tensor([1.5, 0.7])
    loss, _ = luffy_policy_loss(logprobs, old, advantages, torch.tensor([False, True]), shaping_gamma=0.1, scale=0.5)
    loss.backward()
    on_policy = -1.5 * math.exp(0.2) / 2 * 0.5  # -A * ratio / N * scale
    expert = -0.7 * (0.1 * 0.2 / (0.2 + 0.1) ** 2) / 2 * 0.5  # -A * gamma p / (p + gamma)^2 / N * scale
    assert logprobs.grad.tolist() == pytest.approx([on_policy, expert], rel=1e-6)


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_luffy_advantage_sign_sets_the_direction_for_both_kinds_of_token(advantage):
    logprobs = leaf([-1.0, -2.0])
    advantages, off_policy = torch.full((2,), advantage), torch.tensor([False, True])
    loss, _ = luffy_policy_loss(logprobs, torch.tensor([-1.0, 0.0]), advantages, off_policy)
    loss.backward()
    # Descent moves logp by -grad: up for A > 0, down for A < 0, on the policy's token and the expert's.
    assert all(math.copysign(1.0, -g) == advantage for g in logprobs.grad.tolist())


def test_luffy_shaping_boosts_low_probability_expert_tokens():
    logprobs = log_of(0.05, 0.9)
    loss, _ = luffy_policy_loss(logprobs, torch.zeros(2), torch.ones(2), torch.tensor([True, True]), shaping_gamma=0.1)
    loss.backward()
    low, high = (-g for g in logprobs.grad.tolist())
    assert low == pytest.approx(0.1 * 0.05 / 0.15**2 / 2) and high == pytest.approx(0.1 * 0.9 / 1.0**2 / 2)
    assert low > high  # shaped, the rare token gets the larger push
    # Unshaped, the plain ratio with pi_behaviour = 1 (old log-prob 0, gradient p / N) gives the reverse.
    plain = log_of(0.05, 0.9)
    loss, _ = luffy_policy_loss(plain, torch.zeros(2), torch.ones(2), torch.tensor([False, False]))
    loss.backward()
    assert (-plain.grad).tolist() == pytest.approx([0.05 / 2, 0.9 / 2])


def test_luffy_ignores_old_logprobs_on_expert_tokens():
    logprobs, advantages, off_policy = torch.tensor([-0.5, -1.0]), torch.tensor([1.0, 1.0]), torch.tensor([False, True])
    loss_a, stats_a = luffy_policy_loss(logprobs, torch.tensor([-0.5, 0.0]), advantages, off_policy)
    loss_b, stats_b = luffy_policy_loss(logprobs, torch.tensor([-0.5, -200.0]), advantages, off_policy)
    assert loss_a.item() == loss_b.item() and stats_a == stats_b and math.isfinite(loss_b.item())


def test_luffy_rejects_bad_inputs():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="bool"):
        luffy_policy_loss(x, x, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shaping_gamma"):
        luffy_policy_loss(x, x, x, torch.tensor([False, True]), shaping_gamma=0.0)


# srft_loss

SRFT_KINDS = [DEMO, DEMO, POSITIVE, NEGATIVE, NEGATIVE, NEUTRAL]
SRFT_LOGPROBS = [math.log(0.5), math.log(0.2), -1.0, -0.5, -2.0, -0.3]
SRFT_ADVANTAGES = [1.0, 1.0, 0.8, -0.6, -0.6, 0.0]
SRFT_COUNTS = {DEMO: 2, POSITIVE: 1, NEGATIVE: 2, NEUTRAL: 1}
ENTROPY = 0.7


def srft_example(logprobs=None, indices=range(6)):
    """The example's tokens at `indices` (a micro-batch), with the whole example's (global) counts."""
    logprobs = leaf(SRFT_LOGPROBS) if logprobs is None else logprobs
    pick = torch.tensor(list(indices), dtype=torch.long)
    loss, stats = srft_loss(
        logprobs[pick],
        torch.tensor(SRFT_ADVANTAGES)[pick],
        torch.tensor([int(k) for k in SRFT_KINDS])[pick],
        entropy=ENTROPY,
        counts=SRFT_COUNTS,
        total_tokens=6,
    )
    return logprobs, loss, stats


def test_srft_is_the_sum_of_subset_means():
    _, loss, stats = srft_example()
    w_sft, w_rl = 0.5 * math.exp(-0.7), 0.1 * math.exp(0.7)  # the paper's signs
    demo_sft = w_sft * -(math.log(0.5) + math.log(0.2)) / 2
    demo_rl = -(1.0 * 0.5 + 1.0 * 0.2) / 2
    self_positive = w_rl * 1.0 / 1
    self_negative = (-0.5 - 2.0) / 2
    assert loss.item() == pytest.approx(demo_sft + demo_rl + self_positive + self_negative)
    assert (stats.w_sft, stats.w_rl) == (pytest.approx(w_sft), pytest.approx(w_rl))
    assert stats.demo_sft == pytest.approx(demo_sft) and stats.demo_rl == pytest.approx(demo_rl)
    assert stats.self_positive == pytest.approx(self_positive) and stats.self_negative == pytest.approx(self_negative)


def test_srft_gradient_by_hand():
    logprobs, loss, _ = srft_example()
    loss.backward()
    w_sft, w_rl = 0.5 * math.exp(-0.7), 0.1 * math.exp(0.7)
    expected = [
        (-w_sft - 1.0 * 0.5) / 2,  # demo: d/dlogp of w_SFT * -logp - A * p, over 2 demo tokens
        (-w_sft - 1.0 * 0.2) / 2,
        -w_rl / 1,  # positive: pushed up
        1 / 2,  # negative: pushed down (descent moves logp by -grad)
        1 / 2,
        0.0,  # neutral: no term
    ]
    assert logprobs.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_srft_micro_batches_weighted_by_token_share_equal_the_whole_batch():
    whole_logprobs, whole_loss, whole_stats = srft_example()
    whole_loss.backward()
    # accumulate_gradient: each micro-batch's loss times its share of the global tokens, summed.
    logprobs, total, negative_term = leaf(SRFT_LOGPROBS), 0.0, 0.0
    for part in ([0, 3], [1, 2, 4, 5]):
        _, loss, stats = srft_example(logprobs, part)
        (loss * len(part) / 6).backward()
        total += loss.item() * len(part) / 6
        negative_term += stats.self_negative * len(part) / 6
    assert total == pytest.approx(whole_loss.item())
    assert negative_term == pytest.approx(whole_stats.self_negative)
    assert logprobs.grad.tolist() == pytest.approx(whole_logprobs.grad.tolist(), rel=1e-6)


def test_srft_kind_with_zero_count_contributes_nothing():
    logprobs = leaf([-1.0, -0.5])
    counts = {DEMO: 0, POSITIVE: 1, NEGATIVE: 1}  # no demonstrations (and NEUTRAL absent) anywhere in the pass
    kinds = torch.tensor([POSITIVE, NEGATIVE])
    loss, stats = srft_loss(logprobs, torch.tensor([0.5, -0.5]), kinds, entropy=0.0, counts=counts, total_tokens=2)
    assert loss.item() == pytest.approx(0.1 * 1.0 + -0.5)
    assert (stats.demo_sft, stats.demo_rl) == (0.0, 0.0)
    loss.backward()
    assert logprobs.grad.tolist() == pytest.approx([-0.1, 1.0])


def test_srft_counts_must_be_global():
    args = (torch.zeros(2), torch.zeros(2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="global"):
        srft_loss(*args, entropy=0.5, counts={DEMO: 1}, total_tokens=2)  # 2 demo tokens here, 1 "globally"
    with pytest.raises(ValueError, match="global"):
        srft_loss(*args, entropy=0.5, counts={DEMO: 2}, total_tokens=1)


def test_srft_rejects_bad_kinds_and_entropy():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="integer"):
        srft_loss(x, x, torch.tensor([0.0, 1.0]), entropy=0.5, counts={DEMO: 1, POSITIVE: 1}, total_tokens=2)
    with pytest.raises(ValueError, match="SrftToken"):
        srft_loss(x, x, torch.tensor([0, 4]), entropy=0.5, counts={DEMO: 2}, total_tokens=2)
    for entropy in (-0.1, math.nan):
        with pytest.raises(ValueError, match="entropy"):
            srft_loss(x, x, torch.tensor([0, 1]), entropy=entropy, counts={DEMO: 1, POSITIVE: 1}, total_tokens=2)


def test_srft_token_kinds_and_counts():
    kinds = srft_token_kinds(torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0]), torch.tensor([False, False, False, True, True]))
    assert kinds.tolist() == [POSITIVE, NEGATIVE, NEUTRAL, DEMO, DEMO]
    assert srft_token_counts(kinds) == {DEMO: 2, POSITIVE: 1, NEGATIVE: 1, NEUTRAL: 1}
    assert srft_token_counts(torch.zeros(0, dtype=torch.long)) == dict.fromkeys(SrftToken, 0)
    with pytest.raises(ValueError, match="bool"):
        srft_token_kinds(torch.zeros(2), torch.tensor([0, 1]))


# All of them: edge cases and finiteness


def all_losses(logprobs, old, advantages, entropy=0.5):
    """Every peer loss on the same tokens (the first half expert / demonstration tokens)."""
    n = logprobs.numel()
    expert = torch.arange(n) < n // 2
    kinds = srft_token_kinds(advantages, expert)
    losses = [weighted_sft_loss(logprobs, weighting) for weighting in SFT_WEIGHTINGS]
    losses.append(luffy_policy_loss(logprobs, old, advantages, expert)[0])
    counts = srft_token_counts(kinds)
    losses.append(srft_loss(logprobs, advantages, kinds, entropy=entropy, counts=counts, total_tokens=n)[0])
    return losses


def test_empty_tensors_give_zero_loss():
    for loss in all_losses(leaf([]), torch.zeros(0), torch.zeros(0)):
        assert loss.item() == 0.0
        loss.backward()


def test_mismatched_shapes_are_rejected():
    two, three = torch.zeros(2), torch.zeros(3)
    with pytest.raises(ValueError, match="shapes"):
        luffy_policy_loss(two, three, two, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="shapes"):
        srft_loss(two, two, torch.zeros(3, dtype=torch.long), entropy=0.5, counts={DEMO: 3}, total_tokens=3)
    with pytest.raises(ValueError, match="shapes"):
        srft_token_kinds(two, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="flat"):
        weighted_sft_loss(torch.zeros(2, 2), "dft")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-50.0, 0.0), st.floats(-50.0, 0.0), st.floats(-5.0, 5.0)),
        min_size=1,
        max_size=6,
    ),
    st.floats(0.0, 10.0),
)
def test_all_losses_and_gradients_are_finite_for_logprobs_down_to_minus_50(tokens, entropy):
    logprobs_values, old_values, advantage_values = zip(*tokens, strict=True)
    for index in range(len(SFT_WEIGHTINGS) + 2):
        logprobs = leaf(list(logprobs_values))
        loss = all_losses(logprobs, torch.tensor(old_values), torch.tensor(advantage_values), entropy)[index]
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logprobs.grad).all()
