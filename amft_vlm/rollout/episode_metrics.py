"""Every episode metric, computed in one place (`compute_metrics`) from one record per episode (`EpisodeOutcome`).

The rollout engine (`amft_vlm.rollout.engine.RolloutEngine`) produces an `EpisodeOutcome` for every episode
it plays, whoever answers (the policy or a model-free agent), and everything that reports on episodes
reads its numbers from `compute_metrics` over those records: the engine's `RolloutStats` (training
logs, benchmarks), evaluation records (`amft_vlm.evaluation.evaluate`), ``amft-vlm play`` and ``amft-vlm
collect``. So a trained model, the oracle expert and the trainer's rollouts are measured by exactly
the same code. This module sits below both the engine and evaluation (it needs neither torch nor a
model), which is why it is not part of `amft_vlm.evaluation.evaluate`: the engine's statistics depend on it, and
evaluation depends on the engine.

Metrics, each a `Metric` with its standard error (``sqrt(p (1 - p) / n)`` for a proportion over ``n``
items, ``std / sqrt(n)`` for a mean):

- ``success_rate``: episodes solved within the attempt budget (for V-IRL: route success).
- ``first_attempt_success``: episodes solved without a single wrong answer (GeneralPoints: the first
  answer is correct; V-IRL: every point right at its first attempt).
- ``retry_success``: among the episodes with at least one answer that is not ``correct``, the share
  solved in the end; its count is those episodes. GeneralPoints: episodes whose first answer failed
  (a correct answer ends the episode) that a later attempt solved; V-IRL: routes with a failed
  attempt at some point that were still walked to the end. It shows whether a model uses the
  feedback. Absent when no episode had a failed answer (there is nothing to measure).
- ``recognition_accuracy`` (GeneralPoints vision): 1 - answers with wrongly reported cards / verified
  answers.
- ``valid_formula_rate`` (GeneralPoints): among verified answers other than ``wrong_cards``, the share
  whose formula the verifier read and checked against the cards: verdict ``correct``, ``partial``,
  ``no_solution`` or ``wrong_numbers``. ``grammar_error``, ``illegal_formula`` and ``missing_formula``
  (and any verdict the environment does not list) count as invalid. ``wrong_cards`` answers are left
  out of both counts: the card check comes first and nothing else is checked, so whether their
  formula was valid is unknown. Absent when no answer is left to count.
- ``step_accuracy`` (V-IRL): correct answers / verified answers, retries included: the papers' headline.
- ``mean_turns``: answers per episode.
- ``mean_return``: the sum of an episode's rewards, averaged over episodes.
- verdict shares: the share of each verdict (``correct``, ``wrong_numbers``, ``wrong_cards``,
  ``missing_formula``, ..., see each environment's ``VERDICTS``) among all answers.

Episodes that a served model's transport failed (`TRANSPORT_FAILURE`, `amft_vlm.evaluation.served`) are left out
of every metric and every share above (their denominators included): the model never got to finish
them. ``transport_failures`` is their share of all episodes, reported only when there is one.

"Verified" answers are all but ``out_of_attempts`` (the answer after the budget, which is not read).
The standard errors treat episodes, or answers, as independent draws; answers within one episode are
not, so the per-answer errors are somewhat optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from environments.general_points.verifier import VERDICTS as GENERAL_POINTS_VERDICTS
from environments.virl.verifier import VERDICTS as VIRL_VERDICTS

OUT_OF_ATTEMPTS = "out_of_attempts"
"""The verdict of an answer after the attempt budget: it is not read, so it is not a verified answer."""

VALID_FORMULA_VERDICTS = frozenset({"correct", "partial", "no_solution", "wrong_numbers"})
"""GeneralPoints verdicts of an answer whose formula the verifier read and checked against the cards."""

UNCHECKED_FORMULA_VERDICTS = frozenset({"wrong_cards", OUT_OF_ATTEMPTS})
"""GeneralPoints verdicts given before the formula is looked at: left out of ``valid_formula_rate``."""

TRANSPORT_FAILURE = "transport_failure"
"""The last verdict of an episode that a served model's transport failed (retries exhausted): not the model's failure."""

ENV_VERDICTS: dict[str, tuple[str, ...]] = {"GeneralPoints-v0": GENERAL_POINTS_VERDICTS, "VIRL-v0": VIRL_VERDICTS}
"""Every verdict each known environment gives, best first: the verdict shares list all of them (zeros included)."""


@dataclass(frozen=True)
class Metric:
    """One measured number with its standard error.

    Attributes:
        value: the estimate (a fraction for rates and shares, a count for ``mean_turns``).
        stderr: its standard error.
        count: the number of items it is measured over (episodes or answers).
    """

    value: float
    stderr: float
    count: int

    @classmethod
    def proportion(cls, hits: int, count: int) -> Metric:
        """``hits / count`` with the binomial standard error ``sqrt(p (1 - p) / count)``."""
        if count < 1:
            raise ValueError(f"a proportion needs at least one item; got count={count}")
        p = hits / count
        return cls(p, math.sqrt(p * (1 - p) / count), count)

    @classmethod
    def mean(cls, values: Sequence[float]) -> Metric:
        """The mean of `values` with the standard error ``std / sqrt(n)`` (sample std; 0 for one value)."""
        if not values:
            raise ValueError("a mean needs at least one value")
        count = len(values)
        mean = sum(values) / count
        variance = sum((v - mean) ** 2 for v in values) / (count - 1) if count > 1 else 0.0
        return cls(mean, math.sqrt(variance / count), count)


@dataclass(frozen=True)
class EpisodeOutcome:
    """What one episode produced for the metrics: each answer's verdict and reward, and whether it was solved.

    Attributes:
        seed: the episode's ``reset`` seed.
        verdicts: ``info["verdict"]`` after each answer, in order (``""`` from an environment that gives none).
        rewards: the reward of each answer, in order.
        success: ``info["success"]`` after the last answer.
    """

    seed: int
    verdicts: tuple[str, ...]
    rewards: tuple[float, ...]
    success: bool

    def __post_init__(self) -> None:
        if len(self.verdicts) != len(self.rewards):
            raise ValueError(f"one verdict per reward: got {len(self.verdicts)} verdicts and {len(self.rewards)} rewards")

    @property
    def transport_failed(self) -> bool:
        """Whether the episode ended because no answer could be fetched (its last verdict is `TRANSPORT_FAILURE`)."""
        return bool(self.verdicts) and self.verdicts[-1] == TRANSPORT_FAILURE

    @property
    def episode_return(self) -> float:
        """Sum of the rewards."""
        return float(sum(self.rewards))


def retry_success(outcomes: Sequence[EpisodeOutcome]) -> Metric | None:
    """Among the episodes with at least one answer that is not ``correct``, the share solved in the end.

    GeneralPoints: a correct answer ends the episode, so these are the episodes whose first answer
    failed, solved by a later attempt. V-IRL: routes with a failed attempt at some point, walked to
    the end all the same. The count is the episodes with a failed answer; None when there are none.
    """
    retried = [outcome for outcome in outcomes if any(verdict != "correct" for verdict in outcome.verdicts)]
    if not retried:
        return None
    return Metric.proportion(sum(outcome.success for outcome in retried), len(retried))


def valid_formula_rate(verdicts: Sequence[str]) -> Metric | None:
    """The share of GeneralPoints answers whose formula the verifier read and checked against the cards.

    Valid: ``correct``, ``partial``, ``no_solution`` and ``wrong_numbers``. Invalid: ``grammar_error``,
    ``illegal_formula``, ``missing_formula`` and any other verdict. Not counted at all: ``out_of_attempts``
    (not read) and ``wrong_cards`` (the card check comes first and ends the judging, so the formula's
    validity is unknown). None when no answer is left to count.
    """
    checked = [verdict for verdict in verdicts if verdict not in UNCHECKED_FORMULA_VERDICTS]
    if not checked:
        return None
    return Metric.proportion(sum(verdict in VALID_FORMULA_VERDICTS for verdict in checked), len(checked))


def compute_metrics(
    outcomes: Sequence[EpisodeOutcome], env_id: str = "", modality: str | None = None
) -> tuple[dict[str, Metric], dict[str, Metric]]:
    """The metrics and verdict shares of `outcomes` (see the module docstring for the definitions).

    Args:
        outcomes: one record per episode.
        env_id: the environment played; its own metrics (``valid_formula_rate`` for GeneralPoints-v0,
            ``step_accuracy`` for VIRL-v0) and its full verdict list need it. Any other id gets the
            metrics every environment has, and shares of the verdicts seen.
        modality: ``"vision"`` adds ``recognition_accuracy`` for GeneralPoints-v0.

    A conditional metric whose condition no episode or answer meets (``retry_success``,
    ``valid_formula_rate``) is left out of the metrics rather than reported as 0. Episodes that failed
    by transport are left out of everything but ``transport_failures`` (present only when there are
    some); when every episode failed so, that is the only metric and there are no shares.
    """
    if not outcomes:
        raise ValueError("no episodes to measure")
    failed = sum(outcome.transport_failed for outcome in outcomes)
    if failed:
        transport = {"transport_failures": Metric.proportion(failed, len(outcomes))}
        measured = [outcome for outcome in outcomes if not outcome.transport_failed]
        if not measured:
            return transport, {}
        metrics, shares = compute_metrics(measured, env_id, modality)
        return {**metrics, **transport}, shares
    answers = [verdict for outcome in outcomes for verdict in outcome.verdicts]
    verified = [verdict for verdict in answers if verdict != OUT_OF_ATTEMPTS]
    metrics = {
        "success_rate": Metric.proportion(sum(outcome.success for outcome in outcomes), len(outcomes)),
        "first_attempt_success": Metric.proportion(
            sum(outcome.success and all(v == "correct" for v in outcome.verdicts) for outcome in outcomes), len(outcomes)
        ),
    }
    retried = retry_success(outcomes)
    if retried is not None:
        metrics["retry_success"] = retried
    if env_id == "GeneralPoints-v0" and modality == "vision":
        metrics["recognition_accuracy"] = Metric.proportion(sum(v != "wrong_cards" for v in verified), len(verified))
    if env_id == "GeneralPoints-v0":
        valid = valid_formula_rate(answers)
        if valid is not None:
            metrics["valid_formula_rate"] = valid
    if env_id == "VIRL-v0":
        metrics["step_accuracy"] = Metric.proportion(verified.count("correct"), len(verified))
    metrics["mean_turns"] = Metric.mean([len(outcome.verdicts) for outcome in outcomes])
    metrics["mean_return"] = Metric.mean([outcome.episode_return for outcome in outcomes])
    names = list(ENV_VERDICTS.get(env_id, ()))
    names += sorted(set(answers) - set(names))  # a verdict the table does not know still counts
    shares = {name: Metric.proportion(answers.count(name), len(answers)) for name in names}
    return metrics, shares


@dataclass(frozen=True)
class RolloutStats:
    """Episode statistics of one collection and how long it took.

    Attributes:
        episodes: episodes played.
        successes: episodes solved.
        mean_return: mean episode return.
        mean_turns: mean responses per episode.
        response_tokens: trainable tokens produced (generated by the policy, or the agent's
            response tokens); 0 for an engine without a policy (it has no tokens).
        total_tokens: all tokens of all segments (prompts and environment messages included); 0
            without a policy.
        wall_seconds: wall time of the collection.
        generate_seconds: time spent inside `VLMPolicy.generate` (0 with a model-free agent).
        generate_calls: number of batched ``generate`` calls.
    """

    episodes: int
    successes: int
    mean_return: float
    mean_turns: float
    response_tokens: int
    total_tokens: int
    wall_seconds: float
    generate_seconds: float
    generate_calls: int

    @classmethod
    def from_outcomes(
        cls,
        outcomes: Sequence[EpisodeOutcome],
        *,
        response_tokens: int = 0,
        total_tokens: int = 0,
        wall_seconds: float,
        generate_seconds: float = 0.0,
        generate_calls: int = 0,
    ) -> RolloutStats:
        """The statistics of `outcomes` (from `compute_metrics`) with the given token counts and timings."""
        metrics = compute_metrics(outcomes)[0] if outcomes else {}
        return cls(
            episodes=len(outcomes),
            successes=sum(outcome.success for outcome in outcomes),
            mean_return=metrics["mean_return"].value if outcomes else 0.0,
            mean_turns=metrics["mean_turns"].value if outcomes else 0.0,
            response_tokens=response_tokens,
            total_tokens=total_tokens,
            wall_seconds=wall_seconds,
            generate_seconds=generate_seconds,
            generate_calls=generate_calls,
        )

    @property
    def success_rate(self) -> float:
        """Fraction of episodes solved."""
        return self.successes / self.episodes if self.episodes else 0.0

    @property
    def episodes_per_second(self) -> float:
        """Episodes per second of wall time."""
        return self.episodes / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def response_tokens_per_second(self) -> float:
        """Response (generated) tokens per second of wall time."""
        return self.response_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for a log (token counts only when the episodes were recorded as tokens)."""
        if not self.total_tokens:
            return (
                f"{self.episodes} episodes: success rate {100 * self.success_rate:.1f}%, mean return "
                f"{self.mean_return:+.2f}, {self.mean_turns:.2f} turns per episode; {self.episodes_per_second:.2f} episodes/s"
            )
        return (
            f"{self.episodes} episodes: success rate {100 * self.success_rate:.1f}%, mean return "
            f"{self.mean_return:+.2f}, {self.mean_turns:.2f} turns and {self.response_tokens / max(self.episodes, 1):.1f} "
            f"response tokens per episode; {self.episodes_per_second:.2f} episodes/s, "
            f"{self.response_tokens_per_second:.0f} response tokens/s"
        )
