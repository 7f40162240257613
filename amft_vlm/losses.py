"""The loss terms the trainer calls, as pure functions over flat token tensors.

Names follow the papers: ``L_SFT`` is the negative log-likelihood of the expert's tokens, ``L_RL`` the
clipped policy-gradient surrogate on the policy's own rollouts, and
``L_total = (1 - mu) * L_RL + mu * L_SFT`` (`mix`: AMFT mixes the two gradients with the same weights,
one backward pass each, so its controller can compare them; see `amft_vlm.controller.mixed_adamw_step`).

Every per-token tensor is flat over the trainable tokens of a batch (`amft_vlm.batch.TokenScores`): one
entry per response token, in order, nothing else. Token-level aggregation: a loss is the sum over all
trainable tokens of the batch divided by their count (each generated token weighs the same, whatever
the length of its sequence), as in DAPO and TRL's ``loss_type="dapo"``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
