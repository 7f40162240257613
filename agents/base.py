"""What a model-free agent is: something that answers an environment's observation with text."""

from __future__ import annotations

from concurrent.futures import Future

import gymnasium as gym

from agents.responder import Answer, Request, answered


class Agent:
    """A model-free agent: answers one observation of a text environment at a time with its response text.

    Subclasses set `name` and write `act`; `respond` makes the agent a `agents.responder.Responder`
    by asking `act` for each request of a batch, in order (so an agent drawing from its own
    generator draws in the engine's slot order).
    """

    name: str = "agent"
    answers_in_tokens = False

    def act(self, observation: dict, env: gym.Env) -> str:
        """The response text to `observation`; ``env`` is the environment being played.

        Oracle agents may ask it for the correct answer (``env.unwrapped.expert_response()``), others ignore it.
        """
        raise NotImplementedError(f"{type(self).__name__} must define act(observation, env)")

    def respond(self, requests: list[Request]) -> list[Future[Answer]]:
        """`act`'s answer to each request's observation, in order, already done."""
        return [answered(self.act(request.observation, request.env)) for request in requests]
