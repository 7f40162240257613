"""A one-turn text environment that is easy to learn: the reward is the share of vowels in the answer."""

import string

import gymnasium as gym
from gymnasium import spaces

ENV_ID = "VowelBandit-v0"


class VowelBandit(gym.Env):
    """Answer once; reward = fraction of the answer's letters that are vowels (0 for no letters)."""

    def __init__(self):
        self.observation_space = spaces.Dict({"text": spaces.Text(max_length=100, charset=string.printable)})
        self.action_space = spaces.Text(max_length=100, charset=string.printable)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return {"text": "Say something."}, {}

    def step(self, action):
        letters = [c for c in action.lower() if c.isalpha()]
        reward = sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0
        return {"text": "Thanks."}, reward, True, False, {"success": reward > 0.5}


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=VowelBandit)
