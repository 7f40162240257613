"""What a training run has consumed, so that "the same budget" can be checked between methods."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Budget:
    """Cumulative counts, logged every iteration as the ``budget_*`` metrics and kept in checkpoints."""

    updates: int = 0
    """Optimiser updates."""
    rollout_episodes: int = 0
    """Training episodes played by the policy."""
    validation_episodes: int = 0
    """Validation episodes played for the meta-gradient."""
    expert_examples: int = 0
    """Expert dialogues passed through L_SFT (a dialogue seen in two updates counts twice)."""
    trained_tokens: int = 0
    """Trainable tokens through a gradient pass of L_SFT or L_RL (again per update)."""

    def metrics(self) -> dict[str, int]:
        """The ``budget_*`` metrics; ``budget_env_episodes`` counts training rollouts and validation episodes."""
        return {
            "budget_updates": self.updates,
            "budget_env_episodes": self.rollout_episodes + self.validation_episodes,
            "budget_rollout_episodes": self.rollout_episodes,
            "budget_validation_episodes": self.validation_episodes,
            "budget_expert_examples": self.expert_examples,
            "budget_trained_tokens": self.trained_tokens,
        }
