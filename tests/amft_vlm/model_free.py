"""Model-free play recorded before `RolloutEngine` became the only episode loop, and how to compare with it.

``data/model_free_play.json`` was written by the per-episode loop that the engine replaced
(``expert_data.play_dialogues`` with ``evaluate.VerdictRecorder``, ``play.play``, ``expert_data.collect``
and ``evaluate.evaluate`` over them). It holds, per case, every episode's dialogues (texts and images
as SHA-256 digests), rewards, verdicts and success; agent evaluation metrics; ``amft-vlm play``
results; and two collected datasets. The engine must reproduce all of it for the same seeds.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from agents.base import Agent
from agents.baselines import ExpertAgent, GeneralPointsFormatAgent, RandomTextAgent

ORACLE = json.loads((Path(__file__).parent / "data" / "model_free_play.json").read_text())


class OnceWrongThenExpert(Agent):
    """Answers wrong, then right, then wrong...: a retry at every V-IRL decision point (and a fresh dialogue after it)."""

    name = "once-wrong"

    def __init__(self):
        self.wrong = True

    def act(self, observation, env):
        answer = "no idea" if self.wrong else env.unwrapped.expert_response()
        self.wrong = not self.wrong
        return answer


AGENTS = {
    "expert": ExpertAgent,
    "random": lambda: RandomTextAgent(seed=0),
    "format-only": lambda: GeneralPointsFormatAgent(seed=0),
    "once-wrong": OnceWrongThenExpert,
}
"""A fresh agent by the oracle's name for it (the random ones seeded 0, as when the oracle was written)."""


def text_digest(text):
    """The oracle's digest of a text: the first 16 hex digits of its UTF-8 SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_digest(image):
    """The oracle's digest of an image: SHA-256 of its pixel bytes followed by its shape."""
    if image is None:
        return None
    pixels = np.ascontiguousarray(np.asarray(image))
    return hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()[:16]


def episode_summary(episode):
    """A `rollout.Episode` of an engine without a policy in the oracle's layout."""
    return {
        "seed": episode.outcome.seed,
        "dialogues": [
            {
                "turns": [[turn.role, text_digest(turn.text)] for turn in recorded.dialogue.turns],
                "image": image_digest(recorded.dialogue.image),
                "rewards": list(recorded.rewards),
            }
            for recorded in episode.dialogues
        ],
        "verdicts": list(episode.outcome.verdicts),
        "success": episode.outcome.success,
    }
