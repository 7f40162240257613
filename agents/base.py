"""What an agent is: something that answers an environment's observation with text."""

from __future__ import annotations

from typing import Protocol

import gymnasium as gym


class Agent(Protocol):
    """An agent answers one observation of a text environment with its response text.

    ``env`` is the environment being played; oracle agents may ask it for the correct answer
    (``env.unwrapped.expert_response()``), others ignore it.
    """

    name: str

    def act(self, observation: dict, env: gym.Env) -> str:
        """The response text to ``observation``."""
        ...
