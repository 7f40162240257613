"""Evaluation: play a model or a model-free agent on a paper setting and report metrics with standard errors.

`evaluate` plays ``episodes`` episodes of one setting of GeneralPoints-v0 or VIRL-v0 and returns an
`EvalRecord`: what was played (model or agent, environment and its keyword arguments, setting,
split, seeds, decoding), package versions, the date, and the metrics. `write_record` saves it as JSON,
`load_record` reads it back, `EvalRecord.to_markdown` renders it and `comparison_table` puts several
records side by side, one row each.

Who plays: a model (``model=`` a checkpoint directory (a LoRA checkpoint's ``lora/`` too), a Hub id, or
``tiny:qwen2-vl`` / ``tiny:qwen2.5-vl`` for a tiny random model built on the fly), greedy by default,
sampling when a ``temperature`` is given (seeded with ``seed``); a model served behind an
OpenAI-compatible API (``served=`` a `amft_vlm.evaluation.served.ServedEndpoint`: vLLM, SGLang or a hosted API;
the same dialogues through the ``openai`` client, with retries, a response cache and token usage, see
`amft_vlm.evaluation.served`); or a model-free agent (``agent=`` e.g.
`agents.baselines.ExpertAgent`), with no model at all, one environment, episode after episode. The
expert and random agents give the sanity rows of every table (100% and 0%). `evaluate` only chooses
the responder (`agents.responder.Responder`: the model's `agents.policy.PolicyResponder`, the served
model's `amft_vlm.evaluation.served.ServedResponder` or the agent itself); all three play through the one episode
loop, `amft_vlm.rollout.engine.RolloutEngine` (the served model and the agent through an engine without a
policy), which records each answer's ``info["verdict"]`` and reward and the episode's
``info["success"]``; the metrics are computed from those records only
(`amft_vlm.rollout.episode_metrics.compute_metrics`), so every answerer is measured by exactly the same code.

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

Metrics (``success_rate``, ``first_attempt_success``, ``retry_success``, ``recognition_accuracy``,
``valid_formula_rate``, ``step_accuracy``, ``mean_turns``, ``mean_return`` and the verdict shares),
each with its standard error, are defined in `amft_vlm.rollout.episode_metrics`. A served model's episodes
that failed by transport (retries exhausted) are left out of them and counted as ``transport_failures``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import environments  # noqa: F401  (registers the environments)
from agents.base import Agent
from amft_vlm.evaluation.served import Sampling, ServedEndpoint, ServedInfo, served_responder
from amft_vlm.rollout.engine import RolloutEngine
from amft_vlm.rollout.episode_metrics import Metric, compute_metrics
from amft_vlm.run.preflight import (
    check_device,
    check_environment,
    check_model_source,
    effective_environment_arguments,
    environment_arguments,
)
from amft_vlm.run.safe_io import load_json_text, read_regular_text, write_text_atomic
from environments.general_points import settings as general_points_settings
from environments.virl import settings as virl_settings

if TYPE_CHECKING:
    from agents.policy import VLMPolicy

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the JSON record layout."""

MAX_RECORD_BYTES = 64 * 2**20
"""Most bytes of an evaluation record read (`load_record`): one with the usage of thousands of served episodes is a few MB."""

SETTINGS = ("id", "ood-rule", "ood-visual")
"""Setting names: in distribution, rule out of distribution, visual out of distribution."""

MODALITIES = ("language", "vision")
"""Observation modalities."""

SPLITS = ("train", "val", "test", "all")
"""Hand (or route) splits an environment may offer; ``"all"`` is the papers' protocol, ``"val"`` is for tuning."""

TINY_MODEL_SEED = 0
"""Weight seed of a ``tiny:ARCH`` model built for evaluation (the same as the default training config's)."""

@dataclass(frozen=True)
class _Benchmark:
    """How one environment names its paper settings and how many episodes the papers evaluate."""

    prefix: str
    paper_settings: dict[str, dict[str, str]]
    paper_episodes: dict[str, int]


BENCHMARKS: dict[str, _Benchmark] = {
    "GeneralPoints-v0": _Benchmark(
        "GP", general_points_settings.PAPER_SETTINGS, dict.fromkeys(SETTINGS, general_points_settings.PAPER_EPISODES)
    ),
    "VIRL-v0": _Benchmark("V-IRL", virl_settings.PAPER_SETTINGS, virl_settings.PAPER_EPISODES),
}
"""The environments `evaluate` knows, by id."""

ENV_IDS = tuple(BENCHMARKS)
"""Environment ids `evaluate` takes."""


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation: what was played, how, and the metrics; saved as JSON by `write_record`.

    Attributes:
        model: the model spec (checkpoint path, Hub id, ``tiny:ARCH``), the served model's name, or the agent's name.
        model_kind: ``"model"``, ``"served"`` or ``"agent"``.
        env_id: ``"GeneralPoints-v0"`` or ``"VIRL-v0"``.
        env_kwargs: the ``gym.make`` keyword arguments the episodes were played with.
        setting: the paper setting's name, e.g. ``"GP-VL ood-visual"``.
        split: the environment's split (``"all"``, ``"train"``, ``"val"``, ``"test"``), None if it has none.
        episodes: number of episodes.
        seeds: the ``reset`` seed of each episode.
        decoding: for a model ``greedy``, ``temperature`` (None when greedy), ``sampling_seed``,
            ``max_new_tokens``, ``num_envs``, ``dtype`` and ``device`` (a served model: ``greedy``,
            ``temperature``, ``sampling_seed``, ``max_new_tokens`` and ``extra_body``, the fields every
            request carried besides those: the local path's decoding for vLLM and SGLang, and
            ``--extra-body``'s); None for an agent.
        versions: versions of python, amft-vlm, torch, transformers and gymnasium (and openai for a served model).
        date: when the evaluation finished (ISO 8601, UTC).
        wall_seconds: how long it took.
        metrics: ``success_rate``, ``first_attempt_success``, ``retry_success`` (when an episode had
            a failed answer), ``mean_turns``, ``mean_return``, ``valid_formula_rate`` (GeneralPoints), and
            ``recognition_accuracy`` (GeneralPoints vision) or ``step_accuracy`` (V-IRL); see
            `amft_vlm.rollout.episode_metrics` (records written before ``mean_return`` existed lack it).
        verdict_shares: every verdict of the environment (zeros included) -> its share of all answers.
        served: for a served model, the endpoint settings (the URL without its credentials and the key's
            variable name, never the key) and what the run did (requests, retries, cache hits, refusals,
            faults, transport failures, the server's identity, tokens spent and replayed from the cache,
            in all and per episode): `amft_vlm.evaluation.served.ServedInfo`; None otherwise.
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
    served: ServedInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON values (the layout of `write_record`); ``served`` only for a served model."""
        data = {
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
        if self.served is not None:
            data["served"] = self.served.to_dict()
        return data

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
                served=None if data.get("served") is None else ServedInfo.from_dict(data["served"]),
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
        if self.served is not None:
            lines += ["", _served_summary(self.served, self.episodes)]
        return "\n".join(lines)


def _served_summary(served: ServedInfo, episodes: int) -> str:
    """The sentence under a served model's record: requests, retries, replays, faults, refusals, transport failures and why."""
    faults = ", ".join(f"{name} x{count}" for name, count in served.faults.items()) or "none"
    reasons = Counter(usage.transport_failure for usage in served.episode_usage if usage.transport_failure)
    why = "; ".join(f"{count} x {reason}" for reason, count in reasons.items())
    return (
        f"Served by {served.api_base}: {served.requests_sent} requests sent, {served.retries} retries, "
        f"{served.answers_from_cache} answers replayed from the cache ({served.replayed_prompt_tokens:,} + "
        f"{served.replayed_completion_tokens:,} tokens, not counted as spent); faults: {faults}; refusals (judged "
        f"as answers): {served.refusals}; episodes failed by transport (left out of the rates): "
        f"{served.transport_failures} of {episodes}" + (f" ({why})." if why else ".")
    )


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
    have is ``—``. With `verdict_shares`, one more column per verdict seen in any record. When a
    record is of a served model, two more columns: the episodes that failed by transport (left out
    of the rates; ``0/N`` when none) and the tokens the API reported for the requests sent in the run
    (prompt + completion; answers replayed from the cache are not counted, see the record's ``replayed_*``).
    """
    verdicts: list[str] = []
    if verdict_shares:
        for record in records:
            verdicts += [name for name in record.verdict_shares if name not in verdicts]
    header = ["model", "setting", "split", "decoding", "episodes", *(title for title, _ in _COMPARISON_COLUMNS), "mean turns"]
    served = any(record.served is not None for record in records)
    header += [f"{name} share" for name in verdicts]
    if served:
        header += ["transport failures", "tokens spent (prompt + completion)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 5 + "---:|" * (len(header) - 5)]
    for record in records:
        turns = record.metrics.get("mean_turns")
        cells = [record.model, record.setting, record.split or "—", record.decoding_label, str(record.episodes)]
        cells += [_percent(record.metrics.get(key)) for _, key in _COMPARISON_COLUMNS]
        cells.append("—" if turns is None else f"{turns.value:.2f} ± {turns.stderr:.2f}")
        cells += [_percent(record.verdict_shares.get(name)) for name in verdicts]
        if served:
            cells += _served_cells(record)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _served_cells(record: EvalRecord) -> list[str]:
    """The transport-failure and token cells of a record's row (``—`` for a record that is not of a served model)."""
    if record.served is None:
        return ["—", "—"]
    served = record.served
    return [f"{served.transport_failures}/{record.episodes}", f"{served.prompt_tokens:,} + {served.completion_tokens:,}"]


def summary_table(records: Sequence[EvalRecord]) -> str:
    """A short markdown table, one row per record: setting, who played, success rate, mean return, answers per episode.

    The table of ``amft-vlm play``; a record without ``mean_return`` (written before it existed) shows ``—``.
    """
    lines = [
        "| setting | agent | episodes | success rate | mean return | answers per episode |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for record in records:
        mean_return, success, turns = (record.metrics.get(name) for name in ("mean_return", "success_rate", "mean_turns"))
        lines.append(
            f"| {record.setting} | {record.model} | {record.episodes} | {'—' if success is None else f'{100 * success.value:.1f}%'} | "
            f"{'—' if mean_return is None else f'{mean_return.value:+.2f}'} | {'—' if turns is None else f'{turns.value:.2f}'} |"
        )
    return "\n".join(lines)


def write_record(record: EvalRecord, path: str | os.PathLike) -> None:
    """Write `record` as JSON to `path`, atomically (`amft_vlm.run.safe_io.write_text_atomic`: a temporary file renamed
    into place; a symlink is written through).

    Raises:
        amft_vlm.run.safe_io.OutputPathError: `path` is (or leads to) a directory, FIFO, socket or device, or its
            directory does not exist.
    """
    write_text_atomic(path, record.to_json())


def load_record(path: str | os.PathLike) -> EvalRecord:
    """The `EvalRecord` saved at `path` by `write_record`.

    The file is read as untrusted input (`amft_vlm.run.safe_io`): a regular file of at most `MAX_RECORD_BYTES`, JSON
    nested no deeper than a record is, without NaN or Infinity.

    Raises:
        FileNotFoundError: nothing is at `path`.
        amft_vlm.run.safe_io.InputFileError: `path` is a FIFO, device or directory (not waited on), or is too long.
        ValueError: naming the file, when it is not an evaluation record.
    """
    source = Path(path)
    text = read_regular_text(source, MAX_RECORD_BYTES, what="an evaluation record")
    try:
        data = load_json_text(text)
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


def paper_settings(env_id: str) -> dict[str, tuple[str, str]]:
    """Every paper setting of `env_id` by name -> its ``setting`` and ``modality``, e.g. ``"GP-VL id": ("id", "vision")``."""
    return {
        paper_setting(env_id, setting, modality)[0]: (setting, modality)
        for modality in MODALITIES
        for setting in SETTINGS
        if not (setting == "ood-visual" and modality == "language")
    }


def package_versions(*extra: str) -> dict[str, str | None]:
    """Versions of python and of the packages behind a result, and of the `extra` packages (None for one not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("amft-vlm", "torch", "transformers", "gymnasium", *extra):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


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
    served: ServedEndpoint | None = None,
    env_kwargs: dict[str, Any] | None = None,
    num_envs: int = 8,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    extra_body: dict[str, Any] | None = None,
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
        agent: a model-free agent to play (give exactly one of `agent`, `model` and `served`).
        model: a checkpoint directory, a Hub id, or ``tiny:qwen2-vl`` / ``tiny:qwen2.5-vl``.
        served: a model behind an OpenAI-compatible API (its URL, name, concurrency, retries, cache,
            pixel budget); `max_new_tokens`, `temperature` and `seed` apply to it, `num_envs`,
            `dtype` and `device` do not.
        env_kwargs: more ``gym.make`` keyword arguments (e.g. ``{"resolution": 448}``); they may not
            override the setting's own or ``split``.
        num_envs: environments played together by the model (the batch of each ``generate`` call).
        max_new_tokens: the most tokens per model answer.
        temperature: sample at this temperature; None decodes greedily.
        extra_body: a served model only: more fields for every request's JSON body (``--extra-body``), on top
            of those the client sends to vLLM and SGLang (`amft_vlm.evaluation.served.Sampling.extra_body`).
        dtype: the model's dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        progress: show a progress bar.

    Returns:
        The evaluation record.
    """
    if sum(who is not None for who in (agent, model, served)) != 1:
        raise ValueError(
            "give one of a model (--model), a served model (--api-base with --model) or a model-free agent (--agent)"
        )
    if agent is not None and temperature is not None:
        raise ValueError("temperature applies to a model; a model-free agent does not sample from one")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be positive (leave it out for greedy decoding); got {temperature}")
    if extra_body is not None and served is None:
        raise ValueError("extra_body (--extra-body) is sent to a served model; add --api-base URL")
    setting_name, kwargs = paper_setting(env_id, setting, modality)
    extra = dict(env_kwargs or {})
    clashes = sorted(set(extra) & {*kwargs, "split"})
    if clashes:
        raise ValueError(f"env arguments {clashes} are set by the setting or split; choose them with --setting, --modality and --split")
    kwargs.update(extra)
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        if "split" not in environment_arguments(env_id):
            raise ValueError(f"{env_id} has no split argument yet; leave out --split (its episodes are the papers' protocol)")
        kwargs["split"] = split
    count = BENCHMARKS[env_id].paper_episodes[setting] if episodes is None else episodes
    if count < 1:
        raise ValueError(f"episodes must be at least 1; got {count}")
    seeds = [seed + index for index in range(count)]

    check_environment(env_id, kwargs, what="env_kwargs (--env-arg)")  # before any model is loaded
    env_split = effective_environment_arguments(env_id, kwargs).get("split")
    if model is not None:
        check_model_source(model)
        check_device(device)
    start = time.perf_counter()
    sampling_seed = None if temperature is None else seed
    decoding = None if agent is not None else {
        "greedy": temperature is None,
        "temperature": temperature,
        "sampling_seed": sampling_seed,
        "max_new_tokens": max_new_tokens,
    }
    with contextlib.ExitStack() as stack:
        # Evaluation chooses who answers; the rollout engine plays every one of them the same way.
        if agent is not None:
            # One environment, episode after episode: an agent drawing from its own generator answers in that order.
            policy, responder, envs_together = None, agent, 1
        elif served is not None:
            sampling = Sampling(temperature=temperature, max_tokens=max_new_tokens, sampling_seed=sampling_seed, extra_body=dict(extra_body or {}))
            responder = stack.enter_context(served_responder(served, sampling, seeds))
            policy, envs_together = None, max(1, min(served.concurrency, count))
            decoding["extra_body"] = dict(responder.client.extra_body)
        else:
            envs_together = num_envs
            decoding.update(num_envs=num_envs, dtype=dtype, device=_resolved_device(device))
            policy = _load_policy(model, dtype=dtype, device=decoding["device"])
            responder = policy.responder(temperature=temperature or 1.0, max_new_tokens=max_new_tokens, greedy=temperature is None)
        engine = stack.enter_context(RolloutEngine(policy, env_id, env_kwargs=kwargs, num_envs=envs_together))
        outcomes, _ = engine.play(seeds, responder=responder, sampling_seed=None if policy is None else sampling_seed, progress=progress)
        run = responder.run(outcomes) if served is not None else None
    metrics, shares = compute_metrics(outcomes, env_id, modality)
    return EvalRecord(
        model=agent.name if agent is not None else served.model if served is not None else model,
        model_kind="agent" if agent is not None else "served" if served is not None else "model",
        env_id=env_id,
        env_kwargs=kwargs,
        setting=setting_name,
        split=env_split,
        episodes=count,
        seeds=tuple(seeds),
        decoding=decoding,
        versions=package_versions() if served is None else package_versions("openai"),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=time.perf_counter() - start,
        metrics=metrics,
        verdict_shares=shares,
        served=None if run is None else run.info(served),
    )


def _resolved_device(device: str) -> str:
    """`device`, with ``"auto"`` resolved to ``"cuda"`` when CUDA is available and ``"cpu"`` otherwise."""
    if device != "auto":
        return device
    # torch loads only when a model plays, so agent evaluations and the CLI start fast.
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_policy(model: str, *, dtype: str, device: str) -> VLMPolicy:
    """The policy of a checkpoint directory, a Hub id or a ``tiny:ARCH`` model (built on the fly)."""
    # transformers loads only when a model plays, so agent evaluations and the CLI start fast.
    from agents.tiny import resolve_model_spec
    from amft_vlm.learning.lora import load_policy

    with tempfile.TemporaryDirectory(prefix="amft-vlm-eval-") as tiny_dir:
        path = resolve_model_spec(model, tiny_dir, seed=TINY_MODEL_SEED)
        try:
            return load_policy(path, dtype=dtype, device=device)
        except OSError as error:
            raise ValueError(
                f"could not load model {model!r} ({error}); give a checkpoint directory, a Hub id, or tiny:qwen2-vl / tiny:qwen2.5-vl"
            ) from error
