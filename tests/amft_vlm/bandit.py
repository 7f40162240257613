"""A one-turn text environment that is easy to learn: the reward is the share of target letters in the answer."""

import string

import gymnasium as gym
from gymnasium import spaces

from agents.base import Agent

ENV_ID = "VowelBandit-v0"

TARGETS = {"vowels": set("aeiou"), "consonants": set(string.ascii_lowercase) - set("aeiou")}


class VowelBandit(gym.Env):
    """Answer once; reward = fraction of the answer's letters that are `target` letters (0 for no letters).

    ``target="vowels"`` (the default) or ``"consonants"``: an expert for one is a wrong expert for the other.
    """

    def __init__(self, target: str = "vowels"):
        self.letters = TARGETS[target]
        self.observation_space = spaces.Dict({"text": spaces.Text(max_length=100, charset=string.printable)})
        self.action_space = spaces.Text(max_length=100, charset=string.printable)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return {"text": "Say something."}, {}

    def step(self, action):
        letters = [c for c in action.lower() if c.isalpha()]
        reward = sum(c in self.letters for c in letters) / len(letters) if letters else 0.0
        return {"text": "Thanks."}, reward, True, False, {"success": reward > 0.5}


class ConstantAgent(Agent):
    """A model-free agent that always gives the same answer (an expert for the bandit, or a wrong one)."""

    def __init__(self, text: str):
        self.text = text
        self.name = f"constant {text!r}"

    def act(self, observation, env):
        return self.text


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=VowelBandit)
