"""The answering seam: a `Responder` answers a batch of dialogues, each answer possibly still on its way.

Every answerer plays through the one episode loop (`amft_vlm.rollout.engine.RolloutEngine`): the VLM policy in
this process (`agents.policy.PolicyResponder`, token ids in, token ids with their sampling log-probs
out), the model-free agents (`agents.base.Agent`: text), and a model behind an OpenAI-compatible API
(`amft_vlm.evaluation.served.ServedResponder`: text). The engine hands a responder one `Request` per episode
that waits for an answer and gets one future per request back; it steps an environment as soon as
its answer is ready. A responder that computes its answers in the call (the policy, the agents)
returns futures that are already done, so the engine plays it round by round, one batch per round;
one that answers in the background (a served model, one request in flight per row) returns pending
futures, and the engine gives a row its next request as soon as its last answer is in, without
waiting for the slowest row. A vLLM or SGLang engine in this process would be one more token
responder: prompts (and their caches) in, `Generation`s out.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, Union

import gymnasium as gym

from agents.chat import Dialogue

if TYPE_CHECKING:
    import torch

    from agents.policy.encoder import TokenSequence
    from agents.policy.generation import Generation
    from agents.policy.kv_cache import DialogueCache

T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    """One episode waiting for an answer: the dialogue so far and what each kind of responder reads of it.

    Attributes:
        episode: the episode's place in the engine's queue (unique within one ``play``).
        seed: the ``reset`` seed of the episode.
        member: its place in its group (GRPO's G episodes per seed).
        turn: answers the episode has had so far (0 for its first).
        dialogue: the dialogue so far, ending with a user turn: what a text responder answers.
        observation: the environment's last observation.
        env: the environment being played; an oracle may ask it for the correct answer
            (``env.unwrapped.expert_response()``), every other responder ignores it.
        prompt: the current dialogue as tokens (image included), from an engine that records tokens
            (one with a policy); what a token responder answers. None otherwise.
        cache: the dialogue's keys and values from its last answer, when the responder kept them.
        generator: where the answer's tokens are drawn from (seeded per episode), or None for torch's
            global generator.
    """

    episode: int
    seed: int
    member: int
    turn: int
    dialogue: Dialogue
    observation: dict[str, Any]
    env: gym.Env
    prompt: TokenSequence | None = None
    cache: DialogueCache | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class NoAnswer:
    """A responder could not answer a request (e.g. a served model's request failed on every attempt).

    The engine ends the episode there, unsolved, with `verdict` as the last answer's verdict and a
    reward of 0; the metrics decide what that verdict counts as (`amft_vlm.rollout.episode_metrics`).
    """

    verdict: str
    reason: str


Answer = Union[str, "Generation", NoAnswer]
"""What a responder answers a request with: text, a `Generation` (token responders) or `NoAnswer`."""


class Responder(Protocol):
    """Answers a batch of dialogues: one future per request, in order.

    Attributes:
        name: who answers, e.g. ``"expert"`` or a served model's name (the trajectories' ``source``).
        answers_in_tokens: True for a responder that reads `Request.prompt` and answers with a
            `Generation` (token ids and their sampling log-probs); it then also has
            ``sampling_temperature``, the temperature of the distribution its tokens were drawn from.
            False for one that reads `Request.dialogue` (or the environment) and answers with text.
    """

    name: str
    answers_in_tokens: bool

    def respond(self, requests: list[Request]) -> list[Future[Answer]]:
        """One future per request, in order; each resolves to the request's `Answer` (or raises what stopped it)."""
        ...


def answered(value: T) -> Future[T]:
    """A future that is already done with `value`: the answer of a responder that computed it in the call."""
    future: Future[T] = Future()
    future.set_result(value)
    return future
