"""The critic of ``advantage: ppo``: a value per turn from the policy's own hidden state, and GAE over turns.

A multi-turn episode is a sequence of decisions: turn t answers from the dialogue so far and gets the
turn's reward. The critic predicts, for each turn, the return from that decision on, reading the
policy's final hidden state at the decision point (the last token before the response, which is the
state the first response token is sampled from). `amft_vlm.learning.advantages.gae_advantages` then runs GAE over the turns of
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

from agents.policy import VLMPolicy
from amft_vlm.learning.advantages import credited_turn_rewards
from amft_vlm.learning.batch import CriticTargets
from amft_vlm.learning.distributed import Parallel
from amft_vlm.learning.losses import value_loss
from amft_vlm.rollout.trajectory import Trajectory


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
        for segment, sequence in zip(trajectory.segments, trajectory.token_sequences(), strict=True):
            sequences.append(sequence)
            positions.append([start - 1 for start, _ in segment.turn_spans])
            owners.append(index)
    per_segment = policy.hidden_states(sequences, positions) if sequences else []
    parts: list[list[torch.Tensor]] = [[] for _ in trajectories]
    for index, states in zip(owners, per_segment, strict=True):
        parts[index].append(states)
    return [torch.cat(states) for states in parts]


def credited_rewards(trajectory: Trajectory, credit: str) -> torch.Tensor:
    """Per-turn rewards as the critic sees them: each turn's own (``"turn"``) or the return at the end
    (`amft_vlm.learning.advantages.credited_turn_rewards`)."""
    return credited_turn_rewards(trajectory.turn_rewards, credit)


class Critic:
    """The value head with its own AdamW: values per turn of a batch of rollouts (GAE's input,
    `amft_vlm.learning.advantages.gae_advantages`), and its clipped-value update.

    Args:
        hidden_size: the policy's text hidden size.
        learning_rate: the head's AdamW learning rate (``value_learning_rate``).
        clip_epsilon: the value clip around the values at collection.
        device: where the head lives.
    """

    def __init__(self, hidden_size: int, *, learning_rate: float, clip_epsilon: float, device: torch.device | str) -> None:
        self.head = ValueHead(hidden_size).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=learning_rate)
        self.clip_epsilon = clip_epsilon
        self.device = torch.device(device)

    def values(self, policy: VLMPolicy, rollouts: Sequence[Trajectory]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per rollout, the decision states of its turns (the head's inputs) and the head's values of them.

        The policy's hidden states are read without gradient (wrap in the strategy's ``full_weights``).
        """
        features = [states.to(self.device) for states in decision_states(policy, rollouts)]
        with torch.no_grad():
            values = [self.head(states) for states in features]
        return features, values

    def update(self, targets: CriticTargets, parallel: Parallel) -> dict[str, float]:
        """One AdamW step on the global turn mean of the clipped value loss over `targets` of every process."""
        self.optimizer.zero_grad(set_to_none=True)
        turns = sum(int(values.numel()) for values in targets.old_values)
        loss_sum = held = value_sum = 0.0
        (total_turns,) = parallel.sums([turns])
        if turns:
            predicted = torch.cat([self.head(states) for states in targets.features])
            old = torch.cat(targets.old_values)
            loss, held = value_loss(predicted, torch.cat(targets.returns), old, clip_epsilon=self.clip_epsilon)
            (loss * turns / max(total_turns, 1)).backward()
            loss_sum, value_sum = float(loss.detach()) * turns, float(old.sum())
        parallel.sum_gradients(self.head)
        self.optimizer.step()
        loss_sum, held, value_sum = parallel.sums([loss_sum, held, value_sum])
        if not total_turns:
            return {}
        return {"value_loss": loss_sum / total_turns, "value_mean": value_sum / total_turns, "value_clip_fraction": held / total_turns}

    def state_dict(self) -> dict:
        """The head's weights and its optimiser state."""
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Undo `state_dict`."""
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
