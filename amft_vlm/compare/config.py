"""The compare config: a base `TrainConfig` plus the ``compare:`` section (`CompareSettings`), checked whole.

`load_compare_config` reads it with ``key=value`` overrides and the command line's ``--methods``, ``--seeds``,
``--jobs`` and ``--threads``; `CompareConfig.grid` lays out its runs (`RunPlan`, methods outer, seeds inner)
and `CompareConfig.eval_settings` its evaluation columns (`EvalSetting`); `check_grid` validates every run's
config before anything runs. Where each run and record lives under ``OUT`` is decided here too.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.tiny import TINY_PREFIX
from amft_vlm.evaluation.evaluate import SETTINGS, SPLITS, paper_setting
from amft_vlm.learning.methods import METHODS
from amft_vlm.learning.resolve import resolve_method
from amft_vlm.run.config import TrainConfig, dataclass_from_dict, load_values
from amft_vlm.run.preflight import effective_environment_arguments

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "compare-tiny-gp-l.yaml"
"""The shipped smoke-scale comparison (``amft-vlm compare`` without ``--config``)."""

SET_PER_RUN = ("method", "output_dir", "warm_start")
"""`TrainConfig` fields the comparison sets for each run, so a compare config leaves them out."""

SHARED_INPUTS = ("model", "env_id", "env_kwargs", "expert_data", "expert_episodes", "seed")
"""`TrainConfig` fields every run of a comparison shares: what it starts from, plays and imitates, and its seeds."""


@dataclass(frozen=True)
class CompareSettings:
    """The ``compare:`` section of a compare config: what is not a `TrainConfig` field."""

    methods: list[str]
    """Methods to compare, names in `amft_vlm.learning.methods.METHODS`, in the order of the table's rows."""
    seeds: list[int]
    """Training seeds, one run per method and seed. In the file either a count N (the base ``seed`` and the
    N - 1 after it) or a list of seeds; ``--seeds`` overrides it."""
    eval_settings: dict[str, str | None] | None = None
    """Paper setting -> split of its evaluation (null: the papers' protocol, every hand or route). None:
    ``id`` on ``test`` (held-out start states), ``ood-rule`` on all, and ``ood-visual`` on all in vision."""
    eval_episodes: int | None = None
    """Episodes per evaluation (seeds ``eval_seed`` ..); None: the papers' number (234 for GeneralPoints)."""
    eval_seed: int = 0
    """Reset seed of the first evaluation episode; every run plays the same episodes."""
    eval_envs: int = 16
    """Environments played together in an evaluation."""
    eval_dtype: str = "float32"
    """dtype the final checkpoints are evaluated in: float32, bfloat16 or float16."""
    thresholds: list[float] = field(default_factory=lambda: [0.5])
    """Training success rates for steps-to-threshold, each in (0, 1]."""
    smoothing: int = 5
    """Window of the trailing mean of the logged training success rate (steps-to-threshold, curves)."""
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings in which one method's runs differ from the base, e.g. ``{chord-phi: {fixed_mu: 0.1}}`` (CHORD's mu
    while fixed-mix keeps the base's); listed under the table. What every run shares (`SHARED_INPUTS`) and what the
    grid sets (`SET_PER_RUN`, ``seed``) cannot differ; a budget setting changed here shows in the budget columns.
    Entries of methods left out of ``methods`` (``--methods``) are ignored."""
    jobs: int = 1
    """Runs trained (and evaluated) at once, each in its own process; 1 runs everything in this process."""
    threads: int | None = None
    """Torch threads in all, shared by the jobs; None: the cores other processes leave free."""

    def validate(self) -> CompareSettings:
        """Raise ValueError naming the first bad field; return self when valid."""
        if not self.methods:
            raise ValueError(f"compare.methods is empty; name one or more of {', '.join(METHODS)}")
        for name in self.methods:
            if name not in METHODS:
                raise ValueError(f"compare.methods: unknown method {name!r}; the methods are {', '.join(METHODS)}")
        if len(set(self.methods)) < len(self.methods):
            raise ValueError(f"compare.methods names a method twice: {self.methods}")
        if not self.seeds:
            raise ValueError("compare.seeds must be at least 1 (a count) or a non-empty list of seeds")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
                raise ValueError(f"compare.seeds: each seed is an integer in [0, 2**32); got {seed!r}")
        if len(set(self.seeds)) < len(self.seeds):
            raise ValueError(f"compare.seeds names a seed twice: {self.seeds}")
        for setting, split in (self.eval_settings or {}).items():
            if setting not in SETTINGS:
                raise ValueError(f"compare.eval_settings: unknown setting {setting!r}; the settings are {', '.join(SETTINGS)}")
            if split is not None and split not in SPLITS:
                raise ValueError(f"compare.eval_settings.{setting}: split must be one of {', '.join(SPLITS)} or null; got {split!r}")
        if self.eval_settings is not None and not self.eval_settings:
            raise ValueError("compare.eval_settings is empty; leave it out for the paper settings, or name some")
        for name in ("eval_envs", "smoothing", "jobs"):
            _at_least_one(f"compare.{name}", getattr(self, name))
        for name in ("eval_episodes", "threads"):
            if getattr(self, name) is not None:
                _at_least_one(f"compare.{name}", getattr(self, name))
        if self.eval_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"compare.eval_dtype must be float32, bfloat16 or float16; got {self.eval_dtype!r}")
        for method, changes in self.method_settings.items():
            if method not in METHODS:
                raise ValueError(f"compare.method_settings: unknown method {method!r}; the methods are {', '.join(METHODS)}")
            if not isinstance(changes, dict):
                raise ValueError(f"compare.method_settings.{method} must be a mapping of settings, like {{fixed_mu: 0.1}}; got {changes!r}")
            fixed = sorted({key.split(".")[0] for key in changes} & {*SET_PER_RUN, *SHARED_INPUTS})
            if fixed:
                raise ValueError(
                    f"compare.method_settings.{method}: {fixed[0]} is the same for every run of a comparison (or set by the grid); "
                    "change it in the base config instead"
                )
        if not self.thresholds:
            raise ValueError("compare.thresholds is empty; give one or more success rates in (0, 1], e.g. [0.5]")
        for threshold in self.thresholds:
            if not 0 < threshold <= 1:
                raise ValueError(f"compare.thresholds: each is a success rate in (0, 1]; got {threshold!r}")
        return self


def _at_least_one(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


@dataclass(frozen=True)
class EvalSetting:
    """One column of the table: a paper setting of the training environment and the split it deals from."""

    setting: str
    """``id``, ``ood-rule`` or ``ood-visual``."""
    split: str | None
    """The environment's split; None: the papers' protocol."""
    name: str
    """The paper's name, e.g. ``GP-L id``."""

    @property
    def title(self) -> str:
        """The column title: ``GP-L id, held-out (test)``, ``GP-L ood-rule``."""
        if self.split is None:
            return self.name
        return f"{self.name}, held-out ({self.split})" if self.split == "test" else f"{self.name} ({self.split})"


@dataclass(frozen=True)
class RunPlan:
    """One cell of the grid: a method, a seed, its run directory and its training config."""

    method: str
    seed: int
    run_dir: Path
    config: TrainConfig

    @property
    def name(self) -> str:
        """``METHOD/seed-S``, as in the run directory."""
        return f"{self.method}/seed-{self.seed}"


@dataclass(frozen=True)
class CompareConfig:
    """A comparison's whole configuration, read from one YAML file by `load_compare_config`."""

    train: TrainConfig
    """The base training config every run shares (``method`` and ``output_dir`` are set per run)."""
    compare: CompareSettings
    """The grid, the evaluation, the thresholds and the jobs."""
    source: Path | None = None
    """The file it was read from (the default output directory is named after it)."""
    method_configs: dict[str, TrainConfig] = field(default_factory=dict)
    """A method's base config where ``compare.method_settings`` changes it (the others use `train`)."""

    @property
    def modality(self) -> str:
        """The training environment's observation modality (its ``modality`` argument, default filled in)."""
        return str(effective_environment_arguments(self.train.env_id, self.train.env_kwargs).get("modality", "language"))

    def eval_settings(self) -> list[EvalSetting]:
        """The table's evaluation columns, in order (see `CompareSettings.eval_settings`)."""
        chosen = self.compare.eval_settings
        if chosen is None:
            chosen = {"id": "test", "ood-rule": None, **({"ood-visual": None} if self.modality == "vision" else {})}
        return [
            EvalSetting(setting, split, paper_setting(self.train.env_id, setting, self.modality)[0])
            for setting, split in sorted(chosen.items(), key=lambda item: SETTINGS.index(item[0]))
        ]

    def default_out(self) -> Path:
        """``runs/NAME`` for a config file ``NAME.yaml``."""
        return Path("runs") / (self.source.stem if self.source is not None else "compare")

    def grid(self, out: str | os.PathLike) -> list[RunPlan]:
        """Every run, methods outer and seeds inner, each with its config (not validated: see `check_grid`).

        ``model`` is ``OUT/initial-model`` for a tiny spec and ``expert_data`` is ``OUT/expert`` when the base
        has none: the shared inputs `run_compare` prepares.
        """
        out = Path(out)
        shared: dict[str, Any] = {}
        if self.train.model.startswith(TINY_PREFIX):
            shared["model"] = str(out / "initial-model")
        if self.train.expert_data is None:
            shared["expert_data"] = str(out / "expert")
        runs = []
        for method in self.compare.methods:
            for seed in self.compare.seeds:
                run_dir = out / "runs" / method / f"seed-{seed}"
                base = self.method_configs.get(method, self.train)
                config = dataclasses.replace(base, method=method, seed=seed, output_dir=str(run_dir), **shared)
                runs.append(RunPlan(method, seed, run_dir, config))
        return runs

    def eval_episodes(self, setting: str) -> int:
        """Episodes of each evaluation of `setting`: ``eval_episodes``, or the papers' number."""
        from amft_vlm.evaluation.evaluate import BENCHMARKS

        count = self.compare.eval_episodes
        return BENCHMARKS[self.train.env_id].paper_episodes[setting] if count is None else count


def parse_methods(text: str) -> list[str]:
    """``--methods amft,sft`` -> ``["amft", "sft"]`` (commas and/or spaces)."""
    return [name for name in text.replace(",", " ").split() if name]


def parse_seeds(text: str) -> int | list[int]:
    """``--seeds 3`` -> 3 (a count) and ``--seeds 0,5,7`` -> ``[0, 5, 7]`` (the seeds themselves)."""
    parts = [part for part in text.replace(",", " ").split() if part]
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"--seeds takes a count (3) or a comma-separated list of seeds (0,1,2); got {text!r}") from None
    if len(numbers) == 1 and "," not in text:
        return numbers[0]
    return numbers


def load_compare_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    methods: Sequence[str] | None = None,
    seeds: int | Sequence[int] | None = None,
    jobs: int | None = None,
    threads: int | None = None,
) -> CompareConfig:
    """Read a compare config (`DEFAULT_CONFIG` unless `path`), apply overrides, and check it and every run's config.

    Args:
        path: a YAML file: a `TrainConfig` without `SET_PER_RUN` plus a ``compare:`` section (`CompareSettings`).
        overrides: ``key=value`` as for ``amft-vlm train`` (``steps=20``, ``compare.eval_episodes=50``).
        methods, seeds, jobs, threads: the command line's ``--methods``, ``--seeds``, ``--jobs``, ``--threads``,
            which replace the section's (a seeds count N means the base seed and the N - 1 after it).
    """
    path = DEFAULT_CONFIG if path is None else Path(path)
    values = load_values(path, overrides)
    section = values.pop("compare", None)
    if not isinstance(section, dict):
        raise ValueError(f"{path}: a compare config has a compare: section (methods, seeds, ...); see {DEFAULT_CONFIG.name}")
    per_run = [name for name in SET_PER_RUN if name in values]
    if per_run:
        where = {"method": "compare.methods (--methods)", "output_dir": "--out", "warm_start": "nothing: every run starts from the model"}
        raise ValueError(f"{per_run[0]}: the comparison sets it for each run from {where[per_run[0]]}; leave it out of the compare config")
    train = dataclass_from_dict(TrainConfig, values)
    for name, value in (("methods", methods), ("seeds", seeds), ("jobs", jobs), ("threads", threads)):
        if value is not None:
            section[name] = list(value) if isinstance(value, list | tuple) else value
    section["seeds"] = _seed_list(section.get("seeds"), train.seed)
    if not isinstance(section.get("methods"), list):
        raise ValueError(f"compare.methods must be a list of method names (--methods amft,sft); got {section.get('methods')!r}")
    settings = dataclass_from_dict(CompareSettings, section, prefix="compare.").validate()
    method_configs = {}
    for method, changes in settings.method_settings.items():
        if method not in settings.methods:
            continue
        try:
            method_configs[method] = dataclass_from_dict(TrainConfig, _merged(values, changes))
        except ValueError as error:
            raise ValueError(f"compare.method_settings.{method}: {error}") from None
    config = CompareConfig(train, settings, path, method_configs)
    check_grid(config)
    return config


def _merged(values: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of `values` with `changes` applied; dotted keys (``controller.eta_mu``) and nested mappings reach sections."""
    result = copy.deepcopy(values)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _merged(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)
    return result


def _seed_list(value: Any, base: int) -> list[int]:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"compare.seeds must be a count (3) or a list of seeds ([0, 1, 2]); got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"compare.seeds must be at least 1; got {value}")
        return [base + index for index in range(value)]
    if isinstance(value, list):
        return list(value)
    raise ValueError(f"compare.seeds must be a count (3) or a list of seeds ([0, 1, 2]); got {value!r}")


def check_grid(config: CompareConfig, out: str | os.PathLike = "OUT") -> None:
    """Validate every run's config and the evaluation settings (no file is read or written)."""
    for run in config.grid(out):
        # Validated with the base's model and expert data: the shared ones do not exist before `run_compare` makes them.
        resolve_method(dataclasses.replace(run.config, model=config.train.model, expert_data=config.train.expert_data).validate())
    for item in config.eval_settings():
        paper_setting(config.train.env_id, item.setting, config.modality)  # ood-visual in language is refused here


def record_path(out: Path, run: RunPlan, item: EvalSetting) -> Path:
    """``OUT/eval/METHOD-seed-S-SETTING.json``."""
    return out / "eval" / f"{run.method}-seed-{run.seed}-{item.setting}.json"

