"""Play environments with model-free agents and summarise how they did."""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
from tqdm import tqdm

from agents.base import Agent
from amft_vlm.expert_data import play_dialogues


@dataclass(frozen=True)
class PlayResult:
    """How one agent did over a number of episodes of one environment setting."""

    setting: str
    agent: str
    episodes: int
    successes: int
    mean_return: float
    mean_answers: float

    @property
    def success_rate(self) -> float:
        """Fraction of episodes solved."""
        return self.successes / self.episodes if self.episodes else 0.0


def play(env: gym.Env, agent: Agent, *, episodes: int, seed: int, setting: str = "", progress: bool = True) -> PlayResult:
    """Run ``episodes`` episodes (seeds ``seed``, ``seed + 1``, ...) of ``agent`` in ``env``."""
    successes, total_return, answers = 0, 0.0, 0
    for episode in tqdm(range(episodes), desc=f"{setting} / {agent.name}", leave=False, disable=not progress):
        dialogues = list(play_dialogues(env, agent, seed=seed + episode))
        rewards = [reward for _, dialogue_rewards, _ in dialogues for reward in dialogue_rewards]
        total_return += sum(rewards)
        answers += len(rewards)
        successes += bool(dialogues[-1][2].get("success"))  # the info after the episode's last answer
    return PlayResult(setting, agent.name, episodes, successes, total_return / max(episodes, 1), answers / max(episodes, 1))


def results_table(results: list[PlayResult]) -> str:
    """A markdown table of play results."""
    lines = [
        "| setting | agent | episodes | success rate | mean return | answers per episode |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.setting} | {r.agent} | {r.episodes} | {100 * r.success_rate:.1f}% | {r.mean_return:+.2f} | {r.mean_answers:.2f} |"
        )
    return "\n".join(lines)
