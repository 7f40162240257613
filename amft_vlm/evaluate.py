"""Evaluation: play a model or a model-free agent on a paper setting and report metrics with standard errors.

`evaluate` plays ``episodes`` episodes of one setting of GeneralPoints-v0 or VIRL-v0 and returns an
`EvalRecord`: what was played (model or agent, environment and its keyword arguments, setting,
split, seeds, decoding), package versions, the date, and the metrics. `write_record` saves it as JSON,
`load_record` reads it back, `EvalRecord.to_markdown` renders it and `comparison_table` puts several
records side by side, one row each.

Who plays:

- a model (``model=`` a checkpoint directory (a LoRA checkpoint's ``lora/`` too), a Hub id, or ``tiny:qwen2-vl`` / ``tiny:qwen2.5-vl`` for a
  tiny random model built on the fly) plays through the batched `amft_vlm.rollout.RolloutEngine`,
  greedy by default, sampling when a ``temperature`` is given (seeded with ``seed``);
- a model-free agent (``agent=`` e.g. `agents.baselines.ExpertAgent`) plays episode by episode through
  `amft_vlm.expert_data.play_dialogues`, with no model at all. The expert and random agents give the
  sanity rows of every table (100% and 0%).

Both paths wrap every environment in `VerdictRecorder`, which keeps each answer's ``info["verdict"]``
and the episode's ``info["success"]``; the metrics are computed from those records only, so a model
and an agent are measured by exactly the same code.

Settings and defaults (the papers' protocol, Chu et al. 2025):

- ``setting`` ``"id"``, ``"ood-rule"`` or ``"ood-visual"`` with ``modality`` ``"language"`` or
  ``"vision"`` names one of the papers' settings, e.g. ``"GP-VL ood-visual"`` or ``"V-IRL-L id"``
  (`environments.general_points.settings.PAPER_SETTINGS`, `environments.virl.settings.PAPER_SETTINGS`);
  ``ood-visual`` exists in vision only.
- Episodes: 234 per GeneralPoints setting; 48 V-IRL routes in distribution and rule OOD, 18 visual OOD.
- Episode ``i`` is reset with seed ``seed + i`` (seeds ``seed .. seed + episodes - 1``). V-IRL draws a
  route from the seed, so a small evaluation can walk a route twice.
- ``split`` (``"train"``, ``"val"``, ``"test"``, ``"all"``) is passed to the environment; ``"all"`` is the
  papers' protocol, ``"val"`` the tuning tasks kept apart from ``"test"``. An environment that has no
  ``split`` argument (or not that split) refuses it rather than ignoring it.

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
- ``verdict_shares``: the share of each verdict (``correct``, ``wrong_numbers``, ``wrong_cards``,
  ``missing_formula``, ..., see each environment's ``VERDICTS``) among all answers.

"Verified" answers are all but ``out_of_attempts`` (the answer after the budget, which is not read).
The standard errors treat episodes, or answers, as independent draws; answers within one episode are
not, so the per-answer errors are somewhat optimistic.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium.envs.registration import load_env_creator
from tqdm import tqdm

import environments  # noqa: F401  (registers the environments)
from agents.base import Agent
from amft_vlm.expert_data import play_dialogues
from environments.general_points import settings as general_points_settings
from environments.general_points.verifier import VERDICTS as GENERAL_POINTS_VERDICTS
from environments.virl import settings as virl_settings
from environments.virl.verifier import VERDICTS as VIRL_VERDICTS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the JSON record layout."""

SETTINGS = ("id", "ood-rule", "ood-visual")
"""Setting names: in distribution, rule out of distribution, visual out of distribution."""

MODALITIES = ("language", "vision")
"""Observation modalities."""

SPLITS = ("train", "val", "test", "all")
"""Hand (or route) splits an environment may offer; ``"all"`` is the papers' protocol, ``"val"`` is for tuning."""

TINY_MODEL_SEED = 0
"""Weight seed of a ``tiny:ARCH`` model built for evaluation (the same as the default training config's)."""

OUT_OF_ATTEMPTS = "out_of_attempts"
"""The verdict of an answer after the attempt budget: it is not read, so it is not a verified answer."""

VALID_FORMULA_VERDICTS = frozenset({"correct", "partial", "no_solution", "wrong_numbers"})
"""GeneralPoints verdicts of an answer whose formula the verifier read and checked against the cards."""

UNCHECKED_FORMULA_VERDICTS = frozenset({"wrong_cards", OUT_OF_ATTEMPTS})
"""GeneralPoints verdicts given before the formula is looked at: left out of ``valid_formula_rate``."""


@dataclass(frozen=True)
class _Benchmark:
    """How one environment names its paper settings and how many episodes the papers evaluate."""

    prefix: str
    paper_settings: dict[str, dict[str, str]]
    paper_episodes: dict[str, int]
    verdicts: tuple[str, ...]


BENCHMARKS: dict[str, _Benchmark] = {
    "GeneralPoints-v0": _Benchmark(
        "GP",
        general_points_settings.PAPER_SETTINGS,
        dict.fromkeys(SETTINGS, general_points_settings.PAPER_EPISODES),
        GENERAL_POINTS_VERDICTS,
    ),
    "VIRL-v0": _Benchmark("V-IRL", virl_settings.PAPER_SETTINGS, virl_settings.PAPER_EPISODES, VIRL_VERDICTS),
}
"""The environments `evaluate` knows, by id."""

ENV_IDS = tuple(BENCHMARKS)
"""Environment ids `evaluate` takes."""


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
    """What one episode produced for the metrics: the verdict of each answer and whether it was solved."""

    seed: int
    verdicts: tuple[str, ...]
    success: bool


class VerdictRecorder(gym.Wrapper):
    """Records each answer's ``info["verdict"]`` and the episode's ``info["success"]``, per reset seed.

    Several recorders (one per environment of a rollout engine) may share one `outcomes` dict; an
    episode is keyed by its ``reset`` seed, so every episode must have its own seed.
    """

    def __init__(self, env: gym.Env, outcomes: dict[int, EpisodeOutcome]) -> None:
        super().__init__(env)
        self.outcomes = outcomes
        self._seed: int | None = None
        self._verdicts: list[str] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset the environment and start recording the episode of `seed`."""
        if seed is None or seed in self.outcomes:
            raise ValueError(f"every evaluated episode needs its own reset seed; seed {seed!r} is missing or was already played")
        self._seed, self._verdicts = seed, []
        return super().reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        """Step the environment and record the answer's verdict (and the outcome at the episode's end)."""
        observation, reward, terminated, truncated, info = super().step(action)
        self._verdicts.append(str(info["verdict"]))
        if terminated or truncated:
            self.outcomes[self._seed] = EpisodeOutcome(self._seed, tuple(self._verdicts), bool(info["success"]))
        return observation, reward, terminated, truncated, info


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation: what was played, how, and the metrics; saved as JSON by `write_record`.

    Attributes:
        model: the model spec (checkpoint path, Hub id, ``tiny:ARCH``) or the agent's name.
        model_kind: ``"model"`` or ``"agent"``.
        env_id: ``"GeneralPoints-v0"`` or ``"VIRL-v0"``.
        env_kwargs: the ``gym.make`` keyword arguments the episodes were played with.
        setting: the paper setting's name, e.g. ``"GP-VL ood-visual"``.
        split: the environment's split (``"all"``, ``"train"``, ``"val"``, ``"test"``), None if it has none.
        episodes: number of episodes.
        seeds: the ``reset`` seed of each episode.
        decoding: for a model ``greedy``, ``temperature`` (None when greedy), ``sampling_seed``,
            ``max_new_tokens``, ``num_envs``, ``dtype`` and ``device``; None for an agent.
        versions: versions of python, amft-vlm, torch, transformers and gymnasium.
        date: when the evaluation finished (ISO 8601, UTC).
        wall_seconds: how long it took.
        metrics: ``success_rate``, ``first_attempt_success``, ``retry_success`` (when an episode had
            a failed answer), ``mean_turns``, ``valid_formula_rate`` (GeneralPoints), and
            ``recognition_accuracy`` (GeneralPoints vision) or ``step_accuracy`` (V-IRL).
        verdict_shares: every verdict of the environment (zeros included) -> its share of all answers.
    """

    model: str
    model_kind: str
    env_id: str
    env_kwargs: dict[str, Any]
    setting: str
    split: str | None
    episodes: int
    seeds: tuple[int, ...]
    decoding: dict[str, Any] | None
    versions: dict[str, str | None]
    date: str
    wall_seconds: float
    metrics: dict[str, Metric]
    verdict_shares: dict[str, Metric] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON values (the layout of `write_record`)."""
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "model_kind": self.model_kind,
            "env_id": self.env_id,
            "env_kwargs": self.env_kwargs,
            "setting": self.setting,
            "split": self.split,
            "episodes": self.episodes,
            "seeds": list(self.seeds),
            "decoding": self.decoding,
            "versions": self.versions,
            "date": self.date,
            "wall_seconds": self.wall_seconds,
            "metrics": {name: _metric_dict(metric) for name, metric in self.metrics.items()},
            "verdict_shares": {name: _metric_dict(metric) for name, metric in self.verdict_shares.items()},
        }

    def to_json(self) -> str:
        """The record as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalRecord:
        """The record from `to_dict`'s layout; raises ``ValueError`` naming what is wrong."""
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')!r} is not the supported {FORMAT_VERSION}")
        try:
            return cls(
                model=str(data["model"]),
                model_kind=str(data["model_kind"]),
                env_id=str(data["env_id"]),
                env_kwargs=dict(data["env_kwargs"]),
                setting=str(data["setting"]),
                split=data["split"],
                episodes=int(data["episodes"]),
                seeds=tuple(int(seed) for seed in data["seeds"]),
                decoding=data["decoding"],
                versions=dict(data["versions"]),
                date=str(data["date"]),
                wall_seconds=float(data["wall_seconds"]),
                metrics={name: _metric_from_dict(value) for name, value in data["metrics"].items()},
                verdict_shares={name: _metric_from_dict(value) for name, value in data["verdict_shares"].items()},
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not an evaluation record: {error!r} is missing or malformed") from error

    @property
    def decoding_label(self) -> str:
        """``"agent"``, ``"greedy"`` or ``"T=0.7"``: how the answers were produced."""
        if self.decoding is None:
            return "agent"
        return "greedy" if self.decoding["greedy"] else f"T={self.decoding['temperature']:g}"

    def to_markdown(self) -> str:
        """The record's row of `comparison_table`, then a table of its verdict shares."""
        lines = [comparison_table([self]), "", "| verdict | share of answers |", "|---|---:|"]
        lines += [f"| {name} | {_percent(metric)} |" for name, metric in self.verdict_shares.items()]
        return "\n".join(lines)


def _metric_dict(metric: Metric) -> dict[str, float | int]:
    return {"value": metric.value, "stderr": metric.stderr, "count": metric.count}


def _metric_from_dict(data: dict[str, Any]) -> Metric:
    return Metric(value=float(data["value"]), stderr=float(data["stderr"]), count=int(data["count"]))


def _percent(metric: Metric | None) -> str:
    return "—" if metric is None else f"{100 * metric.value:.1f} ± {100 * metric.stderr:.1f}"


_COMPARISON_COLUMNS = (
    ("success", "success_rate"),
    ("first-attempt success", "first_attempt_success"),
    ("retry success", "retry_success"),
    ("recognition", "recognition_accuracy"),
    ("valid formula", "valid_formula_rate"),
    ("step accuracy", "step_accuracy"),
)


def comparison_table(records: Sequence[EvalRecord], *, verdict_shares: bool = False) -> str:
    """A markdown table with one row per record, in order: what was played and its metrics.

    Rates are percentages with their standard errors (``72.1 ± 2.9``); a metric a setting does not
    have is ``—``. With `verdict_shares`, one more column per verdict seen in any record.
    """
    verdicts: list[str] = []
    if verdict_shares:
        for record in records:
            verdicts += [name for name in record.verdict_shares if name not in verdicts]
    header = ["model", "setting", "split", "decoding", "episodes", *(title for title, _ in _COMPARISON_COLUMNS), "mean turns"]
    header += [f"{name} share" for name in verdicts]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 5 + "---:|" * (len(header) - 5)]
    for record in records:
        turns = record.metrics["mean_turns"]
        cells = [record.model, record.setting, record.split or "—", record.decoding_label, str(record.episodes)]
        cells += [_percent(record.metrics.get(key)) for _, key in _COMPARISON_COLUMNS]
        cells.append(f"{turns.value:.2f} ± {turns.stderr:.2f}")
        cells += [_percent(record.verdict_shares.get(name)) for name in verdicts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_record(record: EvalRecord, path: str | os.PathLike) -> None:
    """Write `record` as JSON to `path`, atomically (a temporary file renamed into place)."""
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{target.parent} does not exist; create it or choose another --out")
    staging = target.with_name(target.name + ".tmp")
    staging.write_text(record.to_json())
    os.replace(staging, target)


def load_record(path: str | os.PathLike) -> EvalRecord:
    """The `EvalRecord` saved at `path` by `write_record`; raises ``ValueError`` naming the file if it is not one."""
    source = Path(path)
    try:
        data = json.loads(source.read_text())
        if not isinstance(data, dict):
            raise ValueError("the JSON is not an object")
        return EvalRecord.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def paper_setting(env_id: str, setting: str, modality: str) -> tuple[str, dict[str, str]]:
    """The paper setting's name and ``gym.make`` keyword arguments, e.g. ``("GP-VL id", {...})``."""
    if env_id not in BENCHMARKS:
        raise ValueError(f"env must be one of {ENV_IDS}; got {env_id!r}")
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}; got {setting!r}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}; got {modality!r}")
    if setting == "ood-visual" and modality != "vision":
        raise ValueError("the ood-visual setting tests what a model sees: it needs modality vision (--modality vision)")
    benchmark = BENCHMARKS[env_id]
    name = f"{benchmark.prefix}-{'L' if modality == 'language' else 'VL'} {setting}"
    return name, dict(benchmark.paper_settings[name])


def _accepts_keyword(env_id: str, keyword: str) -> bool:
    """Whether the registered environment's constructor takes `keyword`."""
    creator = load_env_creator(gym.spec(env_id).entry_point)
    return keyword in inspect.signature(creator).parameters


def package_versions() -> dict[str, str | None]:
    """Versions of python and of the packages behind a result (None for one not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("amft-vlm", "torch", "transformers", "gymnasium"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


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


def compute_metrics(outcomes: Sequence[EpisodeOutcome], env_id: str, modality: str) -> tuple[dict[str, Metric], dict[str, Metric]]:
    """The metrics and verdict shares of `outcomes` (see the module docstring for the definitions).

    A conditional metric whose condition no episode or answer meets (``retry_success``,
    ``valid_formula_rate``) is left out of the metrics rather than reported as 0.
    """
    if not outcomes:
        raise ValueError("no episodes to measure")
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
    names = list(BENCHMARKS[env_id].verdicts)
    names += sorted(set(answers) - set(names))  # a verdict the table does not know still counts
    shares = {name: Metric.proportion(answers.count(name), len(answers)) for name in names}
    return metrics, shares


def evaluate(
    *,
    env_id: str = "GeneralPoints-v0",
    setting: str = "id",
    modality: str = "language",
    split: str | None = None,
    episodes: int | None = None,
    seed: int = 0,
    agent: Agent | None = None,
    model: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    num_envs: int = 8,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    dtype: str = "float32",
    device: str = "auto",
    progress: bool = True,
) -> EvalRecord:
    """Play one paper setting with a model or a model-free agent and measure it.

    Args:
        env_id: ``"GeneralPoints-v0"`` or ``"VIRL-v0"``.
        setting: ``"id"``, ``"ood-rule"`` or ``"ood-visual"`` (vision only).
        modality: ``"language"`` or ``"vision"``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``, passed to the environment; None keeps its default
            (``"all"``, the papers' protocol). An environment without a split refuses one.
        episodes: episodes to play; None for the papers' number (234 for GeneralPoints; 48 V-IRL
            routes, 18 for ood-visual).
        seed: episode ``i`` is reset with seed ``seed + i``; also seeds sampling.
        agent: a model-free agent to play (give either `agent` or `model`).
        model: a checkpoint directory, a Hub id, or ``tiny:qwen2-vl`` / ``tiny:qwen2.5-vl``.
        env_kwargs: more ``gym.make`` keyword arguments (e.g. ``{"resolution": 448}``); they may not
            override the setting's own or ``split``.
        num_envs: environments played together by the model (the batch of each ``generate`` call).
        max_new_tokens: the most tokens per model answer.
        temperature: sample at this temperature; None decodes greedily.
        dtype: the model's dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        progress: show a progress bar.

    Returns:
        The evaluation record.
    """
    if (agent is None) == (model is None):
        raise ValueError("give either a model (--model) or a model-free agent (--agent), not both or neither")
    if agent is not None and temperature is not None:
        raise ValueError("temperature applies to a model; a model-free agent does not sample from one")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be positive (leave it out for greedy decoding); got {temperature}")
    setting_name, kwargs = paper_setting(env_id, setting, modality)
    extra = dict(env_kwargs or {})
    clashes = sorted(set(extra) & {*kwargs, "split"})
    if clashes:
        raise ValueError(f"env arguments {clashes} are set by the setting or split; choose them with --setting, --modality and --split")
    kwargs.update(extra)
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        if not _accepts_keyword(env_id, "split"):
            raise ValueError(f"{env_id} has no split argument yet; leave out --split (its episodes are the papers' protocol)")
        kwargs["split"] = split
    count = BENCHMARKS[env_id].paper_episodes[setting] if episodes is None else episodes
    if count < 1:
        raise ValueError(f"episodes must be at least 1; got {count}")
    seeds = [seed + index for index in range(count)]

    probe = gym.make(env_id, **kwargs)  # checks the arguments before any model is loaded
    env_split = getattr(probe.unwrapped, "split", None)
    start = time.perf_counter()
    if agent is not None:
        outcomes = _play_agent(VerdictRecorder(probe, {}), agent, seeds, progress=progress)
        decoding = None
    else:
        probe.close()
        decoding = {
            "greedy": temperature is None,
            "temperature": temperature,
            "sampling_seed": None if temperature is None else seed,
            "max_new_tokens": max_new_tokens,
            "num_envs": num_envs,
            "dtype": dtype,
            "device": device,
        }
        outcomes = _play_model(model, env_id, kwargs, seeds, decoding, progress=progress)
    metrics, shares = compute_metrics(outcomes, env_id, modality)
    return EvalRecord(
        model=agent.name if agent is not None else model,
        model_kind="agent" if agent is not None else "model",
        env_id=env_id,
        env_kwargs=kwargs,
        setting=setting_name,
        split=env_split,
        episodes=count,
        seeds=tuple(seeds),
        decoding=decoding,
        versions=package_versions(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=time.perf_counter() - start,
        metrics=metrics,
        verdict_shares=shares,
    )


def _play_agent(env: VerdictRecorder, agent: Agent, seeds: Sequence[int], *, progress: bool) -> list[EpisodeOutcome]:
    """Play one episode per seed with a model-free agent, one after the other."""
    for seed in tqdm(seeds, desc=f"eval {env.spec.id if env.spec else ''} / {agent.name}", disable=not progress):
        for _ in play_dialogues(env, agent, seed=seed):
            pass  # the recorder keeps what the metrics need
    env.close()
    return [env.outcomes[seed] for seed in seeds]


def _play_model(
    model: str, env_id: str, env_kwargs: dict[str, Any], seeds: Sequence[int], decoding: dict[str, Any], *, progress: bool
) -> list[EpisodeOutcome]:
    """Play one episode per seed with a model through the batched rollout engine; fills ``decoding["device"]``."""
    # torch and transformers load only when a model plays, so agent evaluations and the CLI start fast.
    import torch

    from agents.tiny import resolve_model_spec
    from amft_vlm.lora import load_policy
    from amft_vlm.rollout import RolloutEngine

    if decoding["device"] == "auto":
        decoding["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="amft-vlm-eval-") as tiny_dir:
        path = resolve_model_spec(model, tiny_dir, seed=TINY_MODEL_SEED)
        try:
            policy = load_policy(path, dtype=decoding["dtype"], device=decoding["device"])
        except OSError as error:
            raise ValueError(
                f"could not load model {model!r} ({error}); give a checkpoint directory, a Hub id, or tiny:qwen2-vl / tiny:qwen2.5-vl"
            ) from error
    outcomes: dict[int, EpisodeOutcome] = {}
    engine = RolloutEngine(
        policy,
        lambda: VerdictRecorder(gym.make(env_id, **env_kwargs), outcomes),
        num_envs=decoding["num_envs"],
        temperature=decoding["temperature"] or 1.0,
        max_new_tokens=decoding["max_new_tokens"],
        greedy=decoding["greedy"],
    )
    with engine:
        trajectories, stats = engine.collect(seeds, sampling_seed=decoding["sampling_seed"], progress=progress)
    for trajectory in trajectories:
        outcome = outcomes[trajectory.seed]
        if len(outcome.verdicts) != trajectory.num_turns or outcome.success != trajectory.success:
            raise RuntimeError(f"episode {trajectory.seed}: the recorded verdicts disagree with the trajectory")
    logger.info("eval %s (%s): %s", env_id, model, stats.summary())
    return [outcomes[seed] for seed in seeds]
