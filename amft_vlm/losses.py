"""The loss terms the trainer calls, as pure functions over flat token tensors.

Names follow the papers: ``L_SFT`` is the negative log-likelihood of the expert's tokens, ``L_RL`` the
clipped policy-gradient surrogate on the policy's own rollouts, and
``L_total = (1 - mu) * L_RL + mu * L_SFT`` (`mix`: AMFT mixes the two gradients with the same weights,
one backward pass each, so its controller can compare them; see `amft_vlm.controller.mixed_adamw_step`).

Every per-token tensor is flat over the trainable tokens of a batch (`amft_vlm.batch.TokenScores`): one
entry per response token, in order, nothing else. Token-level aggregation: a loss is the sum over all
trainable tokens of the batch divided by their count (each generated token weighs the same, whatever
the length of its sequence), as in DAPO and TRL's ``loss_type="dapo"``.

The peers' losses (`weighted_sft_loss` for CHORD-phi and DFT, `luffy_policy_loss`, `srft_loss`; ReLIFT
needs only `sft_loss` and `clipped_policy_loss`) keep that contract: each returns the token mean over the
tokens it is given, so `amft_vlm.batch.accumulate_gradient` (micro-batch loss times its share of the
global tokens) still yields exactly the global value. Two consequences:

- A term averaged over a subset S of the tokens (SRFT's demonstration, positive and negative tokens) is
  written as a per-token coefficient ``N / |S|`` on S's tokens, with N the global trainable token count
  and |S| the global size of S, both counted across processes and micro-batches before the pass and
  passed in as arguments: ``(1 / N) * sum_{t in S} (N / |S|) * v_t`` is S's mean. A micro-batch cannot
  know these counts itself, and its own counts would make the accumulation inexact.
- A different global normalisation (Dr.GRPO's ``sum / (sequences * max_length)``, LUFFY's default) is a
  constant factor on the token mean, `dr_grpo_scale`, computed the same way before the pass.

Weights written ``sg(...)`` in the papers are computed from detached tensors: they scale a token's
gradient but have none of their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

import torch


def token_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens (0 for none)."""
    return values.sum() / max(values.numel(), 1)


def sft_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """``L_SFT``: mean negative log-likelihood of the expert's response tokens."""
    return -token_mean(logprobs)


def mix(rl: torch.Tensor | float, sft: torch.Tensor | float, mu: float) -> torch.Tensor | float:
    """``(1 - mu) * RL + mu * SFT``: the total loss (or gradient) of the mix with weight `mu` on SFT."""
    return (1.0 - mu) * rl + mu * sft


@dataclass(frozen=True)
class PolicyLossStats:
    """Diagnostics of a clipped policy-gradient step (all detached)."""

    clip_fraction: float
    approx_kl: float
    mean_ratio: float


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_epsilon: float = 0.2,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """``L_RL``: the PPO clipped surrogate, negated, averaged over generated tokens.

    ``ratio = exp(logprobs - old_logprobs)``; per token
    ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``, with ``advantages`` per token.
    ``clip_fraction`` is the share of tokens whose clipped term is the one in force (ratio above
    1 + eps with A > 0, or below 1 - eps with A < 0): their gradient is zero. A token outside the
    band on the other side keeps its gradient and is not counted.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
    loss = -token_mean(torch.minimum(unclipped, clipped))
    with torch.no_grad():
        was_clipped = ((ratio > 1.0 + clip_epsilon) & (advantages > 0)) | ((ratio < 1.0 - clip_epsilon) & (advantages < 0))
        stats = PolicyLossStats(
            clip_fraction=float(token_mean(was_clipped.float())),
            approx_kl=float(token_mean((ratio - 1.0) - log_ratio)),  # k3 estimator, >= 0
            mean_ratio=float(token_mean(ratio)),
        )
    return loss, stats


def value_loss(predicted: torch.Tensor, targets: torch.Tensor, old_values: torch.Tensor, *, clip_epsilon: float = 0.2) -> tuple[torch.Tensor, float]:
    """PPO's clipped value loss ``0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2)``, averaged over turns.

    Returns the loss and the number of turns whose clipped error is the larger one (the clip holds them back).
    """
    clipped = old_values + torch.clamp(predicted - old_values, -clip_epsilon, clip_epsilon)
    clipped_error, error = (clipped - targets) ** 2, (predicted - targets) ** 2
    held = float((clipped_error > error).sum())
    return 0.5 * torch.maximum(error, clipped_error).mean(), held


def _check_flat(**tensors: torch.Tensor) -> None:
    """Per-token tensors are flat and aligned: one entry per trainable token, the same count in each."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(shape != first for shape in shapes.values()):
        raise ValueError(
            f"per-token tensors must be flat with one entry per trainable token, all the same length; got shapes {shapes}"
        )


SFT_WEIGHTINGS = ("nll", "chord_phi", "dft")
"""The token weightings `weighted_sft_loss` knows: plain NLL, CHORD-phi's ``p * (1 - p)``, DFT's ``p``."""


def weighted_sft_loss(logprobs: torch.Tensor, weighting: str) -> torch.Tensor:
    """``-mean_t sg(w(p_t)) * log p_t`` over the expert's tokens, ``p_t = exp(logprobs)``.

    `weighting` (one of `SFT_WEIGHTINGS`): ``"nll"`` w = 1, exactly `sft_loss`; ``"chord_phi"`` w = p(1 - p),
    CHORD-phi, which damps tokens the policy is already sure of (p near 1) and tokens far off its
    distribution (p near 0); ``"dft"`` w = p, DFT, which cancels the 1/p of the NLL's gradient.
    The weight is detached: the gradient with respect to a token's log-prob is ``-w(p_t) / N``.
    """
    if weighting not in SFT_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {SFT_WEIGHTINGS}; got {weighting!r}")
    _check_flat(logprobs=logprobs)
    if weighting == "nll":
        return sft_loss(logprobs)
    probabilities = torch.exp(logprobs.detach())
    weights = probabilities * (1.0 - probabilities) if weighting == "chord_phi" else probabilities
    return -token_mean(weights * logprobs)


def dr_grpo_scale(total_tokens: int, sequences: int, max_length: int) -> float:
    """The factor that turns a token-mean loss into Dr.GRPO's ``sum / (sequences * max_length)``.

    ``total_tokens / (sequences * max_length)``, with all three global (every process and micro-batch of
    the pass): `total_tokens` the trainable tokens, `sequences` the response sequences they belong to,
    `max_length` the generation limit per sequence. A token mean times this factor is the sum over tokens
    divided by a constant, so a long response no longer weighs each of its tokens less (Dr.GRPO's point),
    and micro-batch accumulation stays exact because the factor is the same for every micro-batch.
    """
    if sequences <= 0 or max_length <= 0:
        raise ValueError(f"sequences and max_length must be positive; got sequences={sequences}, max_length={max_length}")
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be a count (>= 0); got {total_tokens}")
    return total_tokens / (sequences * max_length)


@dataclass(frozen=True)
class LuffyLossStats:
    """Diagnostics of a LUFFY step (all detached)."""

    mean_on_policy_ratio: float
    """Mean ``exp(logprobs - old_logprobs)`` over the policy's own tokens (0 when there are none)."""
    mean_shaped_probability: float
    """Mean ``f(p) = p / (p + gamma)`` over the expert's tokens (0 when there are none)."""
    expert_token_share: float
    """Share of the tokens that are the expert's (off-policy)."""


def luffy_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    off_policy: torch.Tensor,
    *,
    shaping_gamma: float = 0.1,
    scale: float = 1.0,
) -> tuple[torch.Tensor, LuffyLossStats]:
    """LUFFY's mixed-policy policy-gradient loss, ``scale * token_mean(values)``.

    `off_policy` (bool, per token) marks the expert's tokens. On the policy's own tokens
    ``value = -A * exp(logprobs - old_logprobs)``, unclipped (LUFFY's reported default); on the expert's,
    policy shaping with the behaviour probability taken as 1 and no clip: ``value = -A * f(p)``,
    ``f(p) = p / (p + gamma)``, whose gradient ``d f / d log p = gamma * p / (p + gamma)^2`` is larger for
    a low-probability token than the plain ``p`` would give. `old_logprobs` are ignored on expert tokens.
    `scale` is the global normalisation, `dr_grpo_scale` for LUFFY's Dr.GRPO default, 1 for a token mean.
    """
    _check_flat(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, off_policy=off_policy)
    if off_policy.dtype != torch.bool:
        raise ValueError(f"off_policy must be a bool tensor (True on the expert's tokens); got dtype {off_policy.dtype}")
    if shaping_gamma <= 0:
        raise ValueError(f"shaping_gamma must be positive (f(p) = p / (p + gamma)); got {shaping_gamma}")
    # Expert tokens have no sampling log-prob: keep their (unused) ratio at 1 so it cannot overflow.
    log_ratio = torch.where(off_policy, torch.zeros_like(logprobs), logprobs - old_logprobs)
    ratio = torch.exp(log_ratio)
    probabilities = torch.exp(logprobs)
    shaped = probabilities / (probabilities + shaping_gamma)
    loss = scale * token_mean(-advantages * torch.where(off_policy, shaped, ratio))
    with torch.no_grad():
        on_policy = ~off_policy
        experts = int(off_policy.sum())
        stats = LuffyLossStats(
            mean_on_policy_ratio=float(ratio[on_policy].sum()) / max(off_policy.numel() - experts, 1),
            mean_shaped_probability=float(shaped[off_policy].sum()) / max(experts, 1),
            expert_token_share=experts / max(off_policy.numel(), 1),
        )
    return loss, stats


class SrftToken(IntEnum):
    """What an SRFT token is, and so which term of the loss it enters."""

    DEMO = 0
    """The expert's demonstration: SFT term and off-policy policy-gradient term."""
    POSITIVE = 1
    """The policy's own sample with advantage > 0: weighted NLL (pushed up)."""
    NEGATIVE = 2
    """The policy's own sample with advantage < 0: log-likelihood (pushed down)."""
    NEUTRAL = 3
    """The policy's own sample with advantage 0: no term."""


def srft_token_kinds(advantages: torch.Tensor, is_demo: torch.Tensor) -> torch.Tensor:
    """Each token's `SrftToken` (int64): DEMO where `is_demo`, else by the sign of its advantage."""
    _check_flat(advantages=advantages, is_demo=is_demo)
    if is_demo.dtype != torch.bool:
        raise ValueError(f"is_demo must be a bool tensor (True on demonstration tokens); got dtype {is_demo.dtype}")
    kinds = torch.full(advantages.shape, int(SrftToken.NEUTRAL), dtype=torch.long, device=advantages.device)
    kinds[advantages > 0] = SrftToken.POSITIVE
    kinds[advantages < 0] = SrftToken.NEGATIVE
    kinds[is_demo] = SrftToken.DEMO
    return kinds


def srft_token_counts(kinds: torch.Tensor) -> dict[SrftToken, int]:
    """How many tokens of each `SrftToken` `kinds` holds: this process's share of `srft_loss`'s `counts`
    (sum them over processes and micro-batches before the pass)."""
    found = torch.bincount(kinds.long(), minlength=len(SrftToken)).tolist() if kinds.numel() else [0] * len(SrftToken)
    return {kind: int(found[kind]) for kind in SrftToken}


@dataclass(frozen=True)
class SrftLossStats:
    """Diagnostics of an SRFT step (all detached).

    The four terms are their shares of the returned loss (they add up to it); weighted by micro-batch token
    share like the loss, their sums over a pass are the global subset means.
    """

    w_sft: float
    """``0.5 * exp(-H)``, the demonstrations' NLL weight."""
    w_rl: float
    """``0.1 * exp(H)``, the positive samples' NLL weight."""
    demo_sft: float
    """``w_SFT * mean_demo(-log p)``."""
    demo_rl: float
    """``mean_demo(-A * p)``: the off-policy policy-gradient term."""
    self_positive: float
    """``w_RL * mean_positive(-log p)``."""
    self_negative: float
    """``mean_negative(log p)``."""


def srft_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    kinds: torch.Tensor,
    *,
    entropy: float,
    counts: Mapping[int, int],
    total_tokens: int,
) -> tuple[torch.Tensor, SrftLossStats]:
    """SRFT's ``L = L_SFT^demo + L_RL^demo + L_RL^self``, as a token mean (see the module docstring).

    ``L_SFT^demo = w_SFT * mean_demo(-log p)``, ``L_RL^demo = mean_demo(-A * p)`` (the demonstrations'
    advantages from the joint group; behaviour probability taken as 1, no clip),
    ``L_RL^self = w_RL * mean_positive(-log p) + mean_negative(log p)``; NEUTRAL tokens get no term.
    ``w_SFT = 0.5 * exp(-H)`` and ``w_RL = 0.1 * exp(H)``, H = `entropy`, the policy's mean token entropy
    on the step's rollouts (a detached float). ``exp(-H)`` is the paper's sign (arXiv 2506.19767): SFT
    weighs less while the policy is uncertain; SRFT's public code is reported to use ``exp(+H)``, and we
    follow the paper.

    `kinds` holds each token's `SrftToken` (`srft_token_kinds`). `counts` maps each kind to its GLOBAL
    token count and `total_tokens` is the global token total (`srft_token_counts`, summed over processes
    and micro-batches): each token of kind k carries the coefficient ``total_tokens / counts[k]``, so the
    global token mean of `accumulate_gradient` is the sum of the subset means. A kind with count 0 (or
    absent from `counts`) contributes nothing.
    """
    _check_flat(logprobs=logprobs, advantages=advantages, kinds=kinds)
    if kinds.dtype.is_floating_point or kinds.dtype == torch.bool:
        raise ValueError(f"kinds must be an integer tensor of SrftToken values; got dtype {kinds.dtype}")
    if kinds.numel() and (int(kinds.min()) < 0 or int(kinds.max()) >= len(SrftToken)):
        choices = [int(kind) for kind in SrftToken]
        raise ValueError(f"kinds must hold SrftToken values {choices}; got values outside them")
    if not math.isfinite(entropy) or entropy < 0:
        raise ValueError(f"entropy must be the policy's mean token entropy, a finite number >= 0; got {entropy}")
    local = srft_token_counts(kinds)
    global_counts = {kind: int(counts.get(kind, 0)) for kind in SrftToken}
    if any(local[kind] > global_counts[kind] for kind in SrftToken) or total_tokens < kinds.numel():
        here = {kind.name: local[kind] for kind in SrftToken}
        everywhere = {kind.name: global_counts[kind] for kind in SrftToken}
        raise ValueError(
            "counts and total_tokens must be global (summed over every process and micro-batch of the pass); "
            f"this batch alone has {here} of {kinds.numel()} tokens but counts say {everywhere} of {total_tokens}"
        )
    w_sft = 0.5 * math.exp(-entropy)
    w_rl = 0.1 * math.exp(entropy)
    subset_weights = [total_tokens / global_counts[kind] if global_counts[kind] else 0.0 for kind in SrftToken]
    coefficients = torch.tensor(subset_weights, dtype=logprobs.dtype, device=logprobs.device)[kinds.long()]
    zeros = torch.zeros_like(logprobs)
    demo = kinds == SrftToken.DEMO
    demo_sft = token_mean(torch.where(demo, coefficients * w_sft * -logprobs, zeros))
    demo_rl = token_mean(torch.where(demo, coefficients * -advantages * torch.exp(logprobs), zeros))
    self_positive = token_mean(torch.where(kinds == SrftToken.POSITIVE, coefficients * w_rl * -logprobs, zeros))
    self_negative = token_mean(torch.where(kinds == SrftToken.NEGATIVE, coefficients * logprobs, zeros))
    loss = demo_sft + demo_rl + self_positive + self_negative
    stats = SrftLossStats(
        w_sft=w_sft,
        w_rl=w_rl,
        demo_sft=float(demo_sft.detach()),
        demo_rl=float(demo_rl.detach()),
        self_positive=float(self_positive.detach()),
        self_negative=float(self_negative.detach()),
    )
    return loss, stats
