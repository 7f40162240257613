"""The loss terms of AMFT and its baselines, as pure functions over tensors.

Names follow the papers: ``L_SFT`` is the masked negative log-likelihood of the expert's tokens,
``L_RL`` the clipped policy-gradient surrogate on the policy's own rollouts (GRPO group-relative
advantages by default, PPO with a value head and GAE as the option), and
``L_total = (1 - mu) * L_RL + mu * L_SFT``.

Per-token tensors are either flat over the trainable tokens of a batch (what the trainer passes: the
loss mask is then None) or ``(batch, length)`` with a ``loss_mask`` of the same shape that is 1 exactly
on the policy's own generated tokens. Token-level aggregation: a loss is the sum over all trainable
tokens of the batch divided by their count (each generated token weighs the same, whatever the length
of its sequence), as in DAPO and TRL's ``loss_type="dapo"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (over all of them without a mask; 0 when empty)."""
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``L_SFT``: mean negative log-likelihood of the expert's response tokens."""
    return -masked_mean(logprobs, loss_mask)


def mix_losses(rl_loss: torch.Tensor, sft_loss_value: torch.Tensor, mu: float) -> torch.Tensor:
    """``L_total = (1 - mu) * L_RL + mu * L_SFT``."""
    return (1.0 - mu) * rl_loss + mu * sft_loss_value


def group_advantages(returns: torch.Tensor, groups: Sequence[int], *, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: each return minus its group's mean, divided by the group's std.

    Episodes of a group start from the same state (same seed). A group whose returns are all equal
    carries no signal: its advantages are exactly 0 (not 0/0). ``scale_by_std=False`` keeps only the
    mean baseline (Dr. GRPO).
    """
    returns = returns.to(torch.float32)
    advantages = torch.zeros_like(returns)
    group_ids = torch.as_tensor(list(groups))
    if group_ids.shape != returns.shape:
        raise ValueError(f"need one group id per return; got {tuple(group_ids.shape)} ids for {tuple(returns.shape)} returns")
    for group in group_ids.unique():
        members = group_ids == group
        values = returns[members]
        centred = values - values.mean()
        if scale_by_std and values.numel() > 1:
            std = values.std(unbiased=False)
            centred = centred / (std + eps) if std > eps else torch.zeros_like(centred)
        advantages[members] = centred
    return advantages


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
    loss_mask: torch.Tensor | None = None,
    *,
    clip_epsilon: float = 0.2,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """``L_RL``: the PPO clipped surrogate, negated, averaged over generated tokens.

    ``ratio = exp(logprobs - old_logprobs)``; per token
    ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``. ``advantages`` is per token (broadcast a
    per-episode advantage over its tokens before calling). ``clip_fraction`` is the share of tokens
    whose clipped term is the one in force (ratio above 1 + eps with A > 0, or below 1 - eps with
    A < 0): their gradient is zero. A token outside the band on the other side keeps its gradient
    and is not counted.
    """
    log_ratio = logprobs - old_logprobs
    if loss_mask is not None:
        log_ratio = log_ratio * loss_mask
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), loss_mask)
    with torch.no_grad():
        was_clipped = (((ratio > 1.0 + clip_epsilon) & (advantages > 0)) | ((ratio < 1.0 - clip_epsilon) & (advantages < 0))).to(torch.float32)
        stats = PolicyLossStats(
            clip_fraction=float(masked_mean(was_clipped, loss_mask)),
            approx_kl=float(masked_mean((ratio - 1.0) - log_ratio, loss_mask)),  # k3 estimator, >= 0
            mean_ratio=float(masked_mean(ratio, loss_mask)),
        )
    return loss, stats


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over one episode's turns: ``(advantages, returns)``, both shaped like ``rewards``.

    ``rewards[t]`` is the reward of turn t and ``values[t]`` the value estimate before it; the
    episode ends after the last turn (value 0 beyond it). ``returns = advantages + values`` are the
    value head's regression targets.
    """
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros((), dtype=torch.float32)
    for t in reversed(range(rewards.shape[0])):
        next_value = values[t + 1] if t + 1 < values.shape[0] else torch.zeros((), dtype=values.dtype)
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values.to(torch.float32)


def value_loss(predicted: torch.Tensor, targets: torch.Tensor, old_values: torch.Tensor, *, clip_epsilon: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss, ``0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2)``, averaged."""
    clipped = old_values + torch.clamp(predicted - old_values, -clip_epsilon, clip_epsilon)
    return 0.5 * torch.maximum((predicted - targets) ** 2, (clipped - targets) ** 2).mean()


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of ``softmax(logits)`` over the last dimension, in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def group_turn_advantages(turn_rewards: Sequence[Sequence[float]], groups: Sequence[int], *, eps: float = 1e-6) -> list[torch.Tensor]:
    """Per-turn credit for GRPO: each turn's reward-to-go against the same turn of the other episodes of its group.

    Turn t of an episode is compared with turn t of the episodes from the same start state that reached
    it: its advantage is its reward-to-go minus their mean reward-to-go at turn t, divided by the std
    of all these centred values in the group. Comparing across turn positions instead (pooling every
    turn of the group) would credit a turn for where it sits: a failing 6-turn GeneralPoints episode
    has rewards-to-go -6, -5, ..., -1, so its later failed attempts would look better than its first
    one by position alone. A turn that no other episode of its group reached gets 0 (nothing to compare
    it with), as does every turn of a group without spread.

    Returns one tensor per episode with one advantage per turn.
    """
    to_go = [torch.flip(torch.cumsum(torch.flip(torch.tensor(r, dtype=torch.float32), [0]), 0), [0]) for r in turn_rewards]
    advantages = [torch.zeros_like(values) for values in to_go]
    by_group: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(int(group), []).append(index)
    for members in by_group.values():
        centred = {i: torch.zeros_like(to_go[i]) for i in members}
        for turn in range(max(to_go[i].numel() for i in members)):
            reached = [i for i in members if to_go[i].numel() > turn]
            baseline = sum(float(to_go[i][turn]) for i in reached) / len(reached)
            for i in reached:
                centred[i][turn] = to_go[i][turn] - baseline
        std = torch.cat(list(centred.values())).std(unbiased=False)
        if std > eps:
            for i in members:
                advantages[i] = centred[i] / std
    return advantages
