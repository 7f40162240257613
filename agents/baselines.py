"""Agents that need no model: the oracle expert and the random baselines."""

from __future__ import annotations

import json
import string

import gymnasium as gym
import numpy as np

from agents.base import Agent
from environments.general_points.cards import RANK_NAMES


class ExpertAgent(Agent):
    """The oracle: answers with the environment's own correct answer (``expert_response()``).

    Both environments provide it: GeneralPoints gives the true cards, their values and a solution
    formula from the solver; VIRL gives the correct observation, instruction and action.
    """

    name = "expert"

    def act(self, observation: dict, env: gym.Env) -> str:
        """The correct answer for the environment's current state."""
        return env.unwrapped.expert_response()


class RandomTextAgent(Agent):
    """Answers with random printable text (0 to ``max_length`` characters): a floor for any metric."""

    name = "random"

    def __init__(self, seed: int | None = None, max_length: int = 120) -> None:
        self.rng = np.random.default_rng(seed)
        self.max_length = max_length
        self._alphabet = np.array(list(string.printable))

    def act(self, observation: dict, env: gym.Env) -> str:
        """A random string; ignores the observation."""
        length = int(self.rng.integers(0, self.max_length + 1))
        return "".join(self.rng.choice(self._alphabet, size=length))


class GeneralPointsFormatAgent(Agent):
    """Answers GeneralPoints in the right JSON format with random cards, numbers and formula.

    It shows what format alone earns: every answer parses, and it scores only by luck.
    """

    name = "format-only"

    def __init__(self, seed: int | None = None, num_cards: int = 4) -> None:
        self.rng = np.random.default_rng(seed)
        self.num_cards = num_cards

    def act(self, observation: dict, env: gym.Env) -> str:
        """A well-formed JSON answer with a random formula over random numbers."""
        ranks = self.rng.integers(1, 14, size=self.num_cards)
        numbers = [min(int(rank), 10) for rank in ranks]
        operators = self.rng.choice(list("+-*/"), size=self.num_cards - 1)
        formula = str(numbers[0]) + "".join(f"{op}{n}" for op, n in zip(operators, numbers[1:], strict=False))
        return json.dumps({"cards": [RANK_NAMES[r - 1] for r in ranks], "number": numbers, "formula": formula})


BASELINE_AGENTS = {"expert": ExpertAgent, "random": RandomTextAgent, "format-only": GeneralPointsFormatAgent}
"""The model-free agents by name (the ``--agent`` choices of the command line)."""


def baseline_agent(name: str, seed: int | None = None) -> ExpertAgent | RandomTextAgent | GeneralPointsFormatAgent:
    """A new model-free agent by name; the random ones draw from `seed`.

    Raises:
        ValueError: for a name not in `BASELINE_AGENTS`.
    """
    if name not in BASELINE_AGENTS:
        raise ValueError(f"unknown agent {name!r}; choose one of {sorted(BASELINE_AGENTS)}")
    return ExpertAgent() if name == "expert" else BASELINE_AGENTS[name](seed=seed)
