"""The critic of ``advantage: ppo``: a value per turn from the policy's own hidden state, and GAE over turns.

A multi-turn episode is a sequence of decisions: turn t answers from the dialogue so far and gets the
turn's reward. The critic predicts, for each turn, the return from that decision on, reading the
policy's final hidden state at the decision point (the last token before the response, which is the
state the first response token is sampled from). `gae_turn_advantages` then runs GAE over the turns of
each episode (``gamma``, ``lambda`` per turn, value 0 after the last turn) and normalises the
advantages over the batch; every token of a turn gets its turn's advantage, exactly as GRPO's
group-normalised advantages are spread.

Design choice: the critic reads the hidden states detached. It is a linear head with its own AdamW
(``value_learning_rate``), so the value loss never moves the policy and the policy gradient stays the
clipped surrogate alone. That keeps ``g_RL`` comparable to ``g_SFT`` in AMFT's mix and meta-gradient,
at the price of a critic limited to what the policy's features already say.

Credit: with ``credit: turn`` each turn's reward enters at that turn; with ``credit: episode`` the
episode return enters at the last turn (the same total, given later).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from agents.vlm_policy import VLMPolicy
from amft_vlm.losses import generalized_advantages
from amft_vlm.trajectory import Trajectory


class ValueHead(nn.Module):
    """``V(h) = w . h + b`` on the policy's final hidden state, zero-initialised (V = 0 at the start)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Values ``(...)`` of features ``(..., hidden_size)``."""
        return self.linear(features.float()).squeeze(-1)


def decision_states(policy: VLMPolicy, trajectories: Sequence[Trajectory]) -> list[torch.Tensor]:
    """For each trajectory, the hidden state ``(num_turns, hidden_size)`` its turns were decided from."""
    sequences, positions, owners = [], [], []
    for index, trajectory in enumerate(trajectories):
        for segment, sequence in zip(trajectory.segments, trajectory.token_sequences(policy), strict=True):
            sequences.append(sequence)
            positions.append([start - 1 for start, _ in segment.turn_spans])
            owners.append(index)
    per_segment = policy.hidden_states(sequences, positions) if sequences else []
    parts: list[list[torch.Tensor]] = [[] for _ in trajectories]
    for index, states in zip(owners, per_segment, strict=True):
        parts[index].append(states)
    return [torch.cat(states) for states in parts]


def credited_rewards(trajectory: Trajectory, credit: str) -> torch.Tensor:
    """Per-turn rewards as the critic sees them: each turn's own (``"turn"``) or the return at the end."""
    rewards = torch.tensor(trajectory.turn_rewards, dtype=torch.float32)
    if credit == "turn":
        return rewards
    if credit == "episode":
        credited = torch.zeros_like(rewards)
        credited[-1] = float(trajectory.episode_return)
        return credited
    raise ValueError(f"credit must be 'turn' or 'episode'; got {credit!r}")


def gae_turn_advantages(
    rewards: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    *,
    gamma: float,
    lam: float,
    normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """GAE per episode over its turns: (advantages, value targets), one tensor per episode.

    With `normalize`, advantages are shifted and scaled to mean 0, std 1 over all turns of the batch
    (left as they are when all are equal); the value targets ``advantages + values`` use the raw GAE.
    """
    advantages, targets = [], []
    for episode_rewards, episode_values in zip(rewards, values, strict=True):
        advantage, target = generalized_advantages(episode_rewards, episode_values.detach().float(), gamma=gamma, lam=lam)
        advantages.append(advantage)
        targets.append(target)
    if normalize and advantages:
        pooled = torch.cat(advantages)
        mean, std = pooled.mean(), pooled.std(unbiased=False)
        if std > eps:
            advantages = [(advantage - mean) / std for advantage in advantages]
    return advantages, targets
