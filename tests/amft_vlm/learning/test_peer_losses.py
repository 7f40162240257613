"""The peers' loss terms (CHORD-phi, DFT, LUFFY, SRFT) on hand-made flat token tensors, against hand arithmetic:
each method's defining choices pinned by value (its released code's form, and the paper's where they differ)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amft_vlm.learning.losses import (
    SFT_WEIGHTINGS,
    SrftToken,
    dr_grpo_scale,
    entropy_bonus,
    luffy_policy_loss,
    max_length_scale,
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


# luffy_policy_loss, its normalisers and the entropy bonus


def test_the_three_sft_weightings_differ_by_value_on_one_token():
    # One expert token at p = 0.2: the gradient on its log-prob is -w(p) / N, w = 1 (SFT), p (DFT), p(1 - p) (CHORD-phi).
    gradients = {}
    for weighting in SFT_WEIGHTINGS:
        logprobs = log_of(0.2)
        weighted_sft_loss(logprobs, weighting).backward()
        gradients[weighting] = logprobs.grad.item()
    assert gradients == {"nll": pytest.approx(-1.0), "dft": pytest.approx(-0.2), "chord_phi": pytest.approx(-0.16)}


def test_dr_grpo_scale_turns_the_token_mean_into_sum_over_sequences_times_max_length():
    assert dr_grpo_scale(6, 2, 4) == 0.75
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert (dr_grpo_scale(6, 2, 4) * values.mean()).item() == pytest.approx(21 / (2 * 4))
    assert dr_grpo_scale(0, 1, 8) == 0.0
    for bad in ((6, 0, 4), (6, 2, 0), (-1, 2, 4)):
        with pytest.raises(ValueError):
            dr_grpo_scale(*bad)


def test_max_length_scale_divides_the_token_sum_by_the_length_alone():
    # LUFFY's released normaliser: 6 tokens of 2 answers, limit 4 -> sum / 4 (not sum / (2 x 4), Dr.GRPO's).
    assert max_length_scale(6, 4) == 1.5
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert (max_length_scale(6, 4) * values.mean()).item() == pytest.approx(21 / 4)
    assert max_length_scale(0, 8) == 0.0
    for bad in ((6, 0), (-1, 4)):
        with pytest.raises(ValueError):
            max_length_scale(*bad)


def test_entropy_bonus_is_minus_the_coefficient_times_the_mean_entropy():
    entropy = leaf([0.5, 1.0, 1.5])
    bonus = entropy_bonus(entropy, 0.001)
    assert bonus.item() == pytest.approx(-0.001)
    bonus.backward()
    assert entropy.grad.tolist() == pytest.approx([-0.001 / 3] * 3)  # descent raises every token's entropy
    assert entropy_bonus(torch.zeros(0), 0.001).item() == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        entropy_bonus(entropy, -0.1)


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


def test_luffy_shapes_the_expert_tokens_only():
    # The same probability 0.3 on a rollout token (sampled at 0.3: ratio 1) and on an expert token, both A = 1.
    logprobs = torch.tensor([math.log(0.3), math.log(0.3)])
    old = torch.tensor([math.log(0.3), 0.0])
    loss, _ = luffy_policy_loss(logprobs, old, torch.ones(2), torch.tensor([False, True]), shaping_gamma=0.1)
    assert loss.item() == pytest.approx((-1.0 - 0.3 / 0.4) / 2)  # rollout: -A * ratio; expert: -A * p / (p + 0.1)


def test_luffy_gradient_by_hand():
    logprobs = leaf([-1.0, math.log(0.2)])
    old = torch.tensor([-1.2, 0.0])
    advantages = torch.tensor([1.5, 0.7])
    loss, _ = luffy_policy_loss(logprobs, old, advantages, torch.tensor([False, True]), shaping_gamma=0.1, scale=0.5)
    loss.backward()
    on_policy = -1.5 * math.exp(0.2) / 2 * 0.5  # -A * ratio / N * scale: unclipped (a PPO clip would give 0 here)
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


# srft_loss: the released code's form (the defaults) and the paper's

# One pass of six tokens: two demonstration tokens, one positive, two negative, one neutral (A = 0).
SRFT_KINDS = [DEMO, DEMO, POSITIVE, NEGATIVE, NEGATIVE, NEUTRAL]
SRFT_LOGPROBS = [math.log(0.5), math.log(0.2), -1.0, -0.5, -2.0, -0.3]
SRFT_OLD = [0.0, 0.0, -1.2, -0.5, -1.9, -0.3]  # the positive token's ratio e^0.2 = 1.22 is beyond the clip's 1.2
SRFT_ADVANTAGES = [1.0, 1.0, 0.8, -0.6, -0.6, 0.0]
SRFT_ENTROPY = [0.2, 0.6, 1.0, 0.3, 0.4, 0.5]
SRFT_COUNTS = {DEMO: 2, POSITIVE: 1, NEGATIVE: 2, NEUTRAL: 1}
PAPER = {"sft_entropy_sign": -1, "shaping_gamma": None, "self_rl": "sign"}
"""The paper's form: w_SFT = 0.5 exp(-H) (Eq. 8), the plain ratio p on the demonstrations (Eq. 9-10), Eq. 12's self-RL."""


def srft_example(logprobs=None, indices=range(6), entropy=None, **form):
    """The example's tokens at `indices` (a micro-batch), with the whole example's (global) counts; `entropy`
    None gives each token its own H (`SRFT_ENTROPY`), a number one H for all."""
    logprobs = leaf(SRFT_LOGPROBS) if logprobs is None else logprobs
    pick = torch.tensor(list(indices), dtype=torch.long)
    loss, stats = srft_loss(
        logprobs[pick],
        torch.tensor(SRFT_OLD)[pick],
        torch.tensor(SRFT_ADVANTAGES)[pick],
        torch.tensor([int(k) for k in SRFT_KINDS])[pick],
        entropy=torch.tensor(SRFT_ENTROPY)[pick] if entropy is None else entropy,
        counts=SRFT_COUNTS,
        total_tokens=6,
        **form,
    )
    return logprobs, loss, stats


def test_srft_released_form_by_hand():
    _, loss, stats = srft_example()
    # L_SFT^demo: the mean over the 2 demonstration tokens of 0.5 exp(+H_t) (-log p_t), each token its own H.
    demo_sft = 0.5 * (math.exp(0.2) * math.log(2) + math.exp(0.6) * math.log(5)) / 2
    # The policy-gradient terms are one mean over all 6 tokens: shaped demonstrations, then the own tokens'
    # -min(r A, clip(r) A), the positive one clipped at 1.2 and weighted by 0.1 exp(H) = 0.1 e.
    demo_rl = -(0.5 / 0.6 + 0.2 / 0.3) / 6
    self_positive = 0.1 * math.e * -(1.2 * 0.8) / 6
    self_negative = (0.6 * 1.0 + 0.6 * math.exp(-0.1)) / 6
    assert loss.item() == pytest.approx(demo_sft + demo_rl + self_positive + self_negative)
    assert (stats.demo_sft, stats.demo_rl) == (pytest.approx(demo_sft), pytest.approx(demo_rl))
    assert (stats.self_positive, stats.self_negative) == (pytest.approx(self_positive), pytest.approx(self_negative))
    assert stats.w_sft == pytest.approx(0.5 * (math.exp(0.2) + math.exp(0.6)) / 2)
    assert stats.w_rl == pytest.approx(0.1 * math.e) and stats.demo_entropy == pytest.approx(0.4)


def test_srft_released_form_gradient_by_hand():
    logprobs, loss, _ = srft_example()
    loss.backward()
    expected = [
        -0.5 * math.exp(0.2) / 2 - 1.0 * (0.1 * 0.5 / 0.6**2) / 6,  # demo: w_SFT / |demo| and the shaping's slope / N
        -0.5 * math.exp(0.6) / 2 - 1.0 * (0.1 * 0.2 / 0.3**2) / 6,
        0.0,  # positive, ratio beyond the clip: no gradient
        0.6 / 6,  # negative: d(-r A)/dlogp = -r A, pushed down
        0.6 * math.exp(-0.1) / 6,
        0.0,  # neutral
    ]
    assert logprobs.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_srft_paper_form_is_the_sum_of_subset_means():
    _, loss, stats = srft_example(entropy=0.7, **PAPER)
    w_sft, w_rl = 0.5 * math.exp(-0.7), 0.1 * math.exp(0.7)
    demo_sft = w_sft * -(math.log(0.5) + math.log(0.2)) / 2
    demo_rl = -(1.0 * 0.5 + 1.0 * 0.2) / 2
    self_positive = w_rl * 1.0 / 1
    self_negative = (-0.5 - 2.0) / 2
    assert loss.item() == pytest.approx(demo_sft + demo_rl + self_positive + self_negative)
    assert (stats.w_sft, stats.w_rl, stats.demo_entropy) == (pytest.approx(w_sft), pytest.approx(w_rl), pytest.approx(0.7))
    assert stats.demo_sft == pytest.approx(demo_sft) and stats.demo_rl == pytest.approx(demo_rl)
    assert stats.self_positive == pytest.approx(self_positive) and stats.self_negative == pytest.approx(self_negative)


def test_srft_paper_form_gradient_by_hand():
    logprobs, loss, _ = srft_example(entropy=0.7, **PAPER)
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


@pytest.mark.parametrize(("sign", "weight"), [(1, 0.5 * math.exp(0.4)), (-1, 0.5 * math.exp(-0.4))])
def test_srft_sft_weight_is_exp_plus_h_in_the_code_and_exp_minus_h_in_the_paper(sign, weight):
    # One demonstration token, p = 0.5, H = 0.4, A = 0 (no policy-gradient term): L = w_SFT * ln 2.
    loss, stats = srft_loss(
        torch.tensor([math.log(0.5)]), torch.zeros(1), torch.zeros(1), torch.tensor([int(DEMO)]),
        entropy=torch.tensor([0.4]), counts={DEMO: 1}, total_tokens=1, sft_entropy_sign=sign,
    )  # fmt: skip
    assert loss.item() == pytest.approx(weight * math.log(2)) and stats.w_sft == pytest.approx(weight)


def test_srft_weights_read_the_entropy_of_their_own_tokens():
    # The demonstrations' H (0.1, 0.9) differ from the rollouts' (2.0, 0.0): w_SFT reads the demonstrations' own,
    # w_RL the positive token's own. Their mean over all tokens (0.75) or over the rollouts (1.0) gives other values.
    kinds = torch.tensor([int(DEMO), int(DEMO), int(POSITIVE), int(NEGATIVE)])
    logprobs = torch.tensor([math.log(0.5), math.log(0.25), -1.0, -1.0])
    loss, stats = srft_loss(
        logprobs, logprobs, torch.tensor([0.0, 0.0, 1.0, -1.0]), kinds, entropy=torch.tensor([0.1, 0.9, 2.0, 0.0]),
        counts={DEMO: 2, POSITIVE: 1, NEGATIVE: 1}, total_tokens=4,
    )  # fmt: skip
    assert stats.demo_sft == pytest.approx(0.5 * (math.exp(0.1) * math.log(2) + math.exp(0.9) * math.log(4)) / 2)
    assert stats.w_sft == pytest.approx(0.5 * (math.exp(0.1) + math.exp(0.9)) / 2)
    assert stats.w_rl == pytest.approx(0.1 * math.exp(2.0)) and stats.demo_entropy == pytest.approx(0.5)
    assert stats.self_positive == pytest.approx(0.1 * math.exp(2.0) * -1.0 / 4)  # -A r w_RL / N, r = 1
    assert stats.self_negative == pytest.approx(1.0 / 4)  # no weight on the negative token


@pytest.mark.parametrize(("gamma", "shaped"), [(0.1, 0.3 / 0.4), (None, 0.3)])
def test_srft_shapes_the_demonstration_tokens_only(gamma, shaped):
    # A demonstration token and a positive rollout token at the same p = 0.3 (the rollout's ratio 1), A = 1, H = 0.
    logprobs = torch.tensor([math.log(0.3), math.log(0.3)])
    _, stats = srft_loss(
        logprobs, torch.tensor([0.0, math.log(0.3)]), torch.ones(2), torch.tensor([int(DEMO), int(POSITIVE)]),
        entropy=torch.zeros(2), counts={DEMO: 1, POSITIVE: 1}, total_tokens=2, shaping_gamma=gamma,
    )  # fmt: skip
    assert stats.demo_rl == pytest.approx(-shaped / 2)  # -A f(p) / N
    assert stats.self_positive == pytest.approx(-0.1 * 1.0 / 2)  # -A r w_RL / N: the ratio, not shaped


@pytest.mark.parametrize("form", [{}, PAPER], ids=["released", "paper"])
def test_srft_micro_batches_weighted_by_token_share_equal_the_whole_batch(form):
    entropy = None if not form else 0.7
    whole_logprobs, whole_loss, whole_stats = srft_example(entropy=entropy, **form)
    whole_loss.backward()
    # GradientAccumulator: each micro-batch's loss times its share of the global tokens, summed.
    logprobs, total, stat_sums = leaf(SRFT_LOGPROBS), 0.0, dict.fromkeys(("w_sft", "w_rl", "demo_entropy", "self_negative"), 0.0)
    for part in ([0, 3], [1, 2, 4, 5]):
        _, loss, stats = srft_example(logprobs, part, entropy=entropy, **form)
        (loss * len(part) / 6).backward()
        total += loss.item() * len(part) / 6
        for key in stat_sums:
            stat_sums[key] += getattr(stats, key) * len(part) / 6
    assert total == pytest.approx(whole_loss.item())
    assert stat_sums == {key: pytest.approx(getattr(whole_stats, key)) for key in stat_sums}
    assert logprobs.grad.tolist() == pytest.approx(whole_logprobs.grad.tolist(), rel=1e-6)


@pytest.mark.parametrize("form", [{}, PAPER], ids=["released", "paper"])
def test_srft_kind_with_zero_count_contributes_nothing(form):
    logprobs = leaf([-1.0, -0.5])
    counts = {DEMO: 0, POSITIVE: 1, NEGATIVE: 1}  # no demonstrations (and NEUTRAL absent) anywhere in the pass
    kinds = torch.tensor([POSITIVE, NEGATIVE])
    loss, stats = srft_loss(logprobs, logprobs.detach(), torch.tensor([0.5, -0.5]), kinds, entropy=0.0, counts=counts, total_tokens=2, **form)
    assert (stats.demo_sft, stats.demo_rl, stats.w_sft) == (0.0, 0.0, 0.0)
    loss.backward()
    if form:  # w_RL mean_pos(-log p) + mean_neg(log p), w_RL = 0.1
        assert loss.item() == pytest.approx(0.1 * 1.0 + -0.5) and logprobs.grad.tolist() == pytest.approx([-0.1, 1.0])
    else:  # (-A r w_RL - A r) / 2 at r = 1
        assert loss.item() == pytest.approx((-0.5 * 0.1 + 0.5) / 2) and logprobs.grad.tolist() == pytest.approx([-0.025, 0.25])


def test_srft_counts_must_be_global():
    args = (torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="global"):
        srft_loss(*args, entropy=0.5, counts={DEMO: 1}, total_tokens=2)  # 2 demo tokens here, 1 "globally"
    with pytest.raises(ValueError, match="global"):
        srft_loss(*args, entropy=0.5, counts={DEMO: 2}, total_tokens=1)


def test_srft_rejects_bad_kinds_entropy_and_forms():
    x = torch.zeros(2)
    counts = {DEMO: 1, POSITIVE: 1}
    with pytest.raises(ValueError, match="integer"):
        srft_loss(x, x, x, torch.tensor([0.0, 1.0]), entropy=0.5, counts=counts, total_tokens=2)
    with pytest.raises(ValueError, match="SrftToken"):
        srft_loss(x, x, x, torch.tensor([0, 4]), entropy=0.5, counts={DEMO: 2}, total_tokens=2)
    kinds = torch.tensor([0, 1])
    for entropy in (-0.1, math.nan, torch.tensor([0.5, math.inf])):
        with pytest.raises(ValueError, match="entropy"):
            srft_loss(x, x, x, kinds, entropy=entropy, counts=counts, total_tokens=2)
    with pytest.raises(ValueError, match="shapes"):
        srft_loss(x, x, x, kinds, entropy=torch.zeros(3), counts=counts, total_tokens=2)
    for form, message in (({"self_rl": "reinforce"}, "self_rl"), ({"sft_entropy_sign": 0}, "sft_entropy_sign"), ({"shaping_gamma": 0.0}, "shaping_gamma")):
        with pytest.raises(ValueError, match=message):
            srft_loss(x, x, x, kinds, entropy=0.5, counts=counts, total_tokens=2, **form)


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
    per_token = torch.full((n,), float(entropy))
    losses.append(srft_loss(logprobs, old, advantages, kinds, entropy=per_token, counts=counts, total_tokens=n)[0])
    losses.append(srft_loss(logprobs, old, advantages, kinds, entropy=entropy, counts=counts, total_tokens=n, **PAPER)[0])
    return losses


LOSS_COUNT = len(SFT_WEIGHTINGS) + 3
"""How many losses `all_losses` returns."""


def test_empty_tensors_give_zero_loss():
    for loss in all_losses(leaf([]), torch.zeros(0), torch.zeros(0)):
        assert loss.item() == 0.0
        loss.backward()


def test_mismatched_shapes_are_rejected():
    two, three = torch.zeros(2), torch.zeros(3)
    with pytest.raises(ValueError, match="shapes"):
        luffy_policy_loss(two, three, two, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="shapes"):
        srft_loss(two, two, two, torch.zeros(3, dtype=torch.long), entropy=0.5, counts={DEMO: 3}, total_tokens=3)
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
    for index in range(LOSS_COUNT):
        logprobs = leaf(list(logprobs_values))
        loss = all_losses(logprobs, torch.tensor(old_values), torch.tensor(advantage_values), entropy)[index]
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logprobs.grad).all()
