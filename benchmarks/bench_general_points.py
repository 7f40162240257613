"""GeneralPoints-v0 throughput (reset + one correct step)

Measured through ``gym.make`` (with Gymnasium's checker and order wrappers, as users run it),
at the default resolution (1200x1200). The correct answer for each hand is prepared before the
clock starts, so the figure is the environment's own cost. The baseline, timed in the same run,
does what the reference implementation did per episode: search every formula of the hand at
reset and, in vision modality, draw the card table from scratch.
"""

from __future__ import annotations

import gymnasium as gym

import environments  # noqa: F401
from benchmarks.bench_renderer import render_table_uncached
from benchmarks.common import Measurement, rate
from environments.general_points import solver
from environments.general_points.cards import Card

WARMUP_EPISODES = 3000  # fills the per-hand solution caches, as any long run does


def _episode_runner(modality: str):
    env = gym.make("GeneralPoints-v0", modality=modality)
    answers: dict[tuple[str, ...], str] = {}
    env.reset(seed=0)

    def episode() -> None:
        _, info = env.reset()
        hand = tuple(info["cards"])
        if hand not in answers:
            answers[hand] = env.unwrapped.expert_response()
        _, reward, terminated, _, _ = env.step(answers[hand])
        assert terminated and reward == 5.0

    for _ in range(WARMUP_EPISODES):
        episode()
    return episode


def _reference_style_runner(modality: str):
    env = gym.make("GeneralPoints-v0", modality=modality)
    env.reset(seed=0)

    def episode() -> None:
        _, info = env.reset()
        solver._formulas.cache_clear()
        solver._solutions.cache_clear()
        formulas = solver.solve(info["numbers"])
        if modality == "vision":
            render_table_uncached([Card.from_code(code) for code in info["cards"]])
        cards = [Card.from_code(code).rank_name for code in info["cards"]]
        answer = f'{{"cards": {cards!r}, "number": {info["numbers"]}, "formula": "{formulas[0]}"}}'.replace("'", '"')
        _, reward, _, _, _ = env.step(answer)
        assert reward == 5.0

    return episode


def run() -> list[Measurement]:
    """Episodes per second in language and vision modality, against the reference-style baseline."""
    measurements = []
    for modality, target in (("language", 5000), ("vision", 300)):
        baseline = rate(_reference_style_runner(modality), 5, min_seconds=2.0)
        value = rate(_episode_runner(modality), 200, min_seconds=3.0)
        measurements.append(
            Measurement(
                name=f"GeneralPoints-v0 {modality}, 1200 px",
                value=value,
                unit="episodes/s",
                baseline_name="search + draw every episode",
                baseline_value=baseline,
                target=f">= {target} episodes/s",
                met=value >= target,
            )
        )
    return measurements
