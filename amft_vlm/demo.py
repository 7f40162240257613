"""The demo: the whole toolkit end to end on a CPU in minutes, nothing downloaded (``amft-vlm demo``).

Every number comes from one YAML file, ``configs/demo.yaml`` (`DEFAULT_CONFIG`; ``--config FILE`` and
``key=value`` overrides as for ``amft-vlm train``, read by `load_demo_config`): a `TrainConfig` for
the AMFT run, which the SFT run shares, plus a ``demo:`` section (`DemoSettings`) with the tiny
model's sizes and the evaluations' size. ``--quick`` is the same file with the `QUICK` overrides.

`run_demo` does, in one output directory:

1. **Model**: builds a tiny Qwen2-VL (the real architecture and classes, a locally trained
   tokenizer; the ``demo:`` section gives the sizes) into ``OUT/initial-model``; every run starts from it.
2. **Expert data**: the oracle expert plays GeneralPoints (language, ``split="train"``) and its
   dialogues are written to ``OUT/expert`` (the ``amft-vlm collect`` format); every run trains on it.
3. **Training** with the same budget (steps, SFT batch, learning rate and its cosine schedule):
   ``sft`` (SFT only) into ``OUT/sft`` and ``amft`` (SFT warm-up, then the mu controller with RL
   rollouts for the last quarter of the steps) into ``OUT/amft``. AMFT's warm-up is SFT's first
   ``warmup_steps`` steps exactly (same data, order, optimiser and schedule), so AMFT starts from the
   SFT run's checkpoint at that step (`amft_vlm.config.TrainConfig.warm_start`, tested to equal a run
   from scratch) instead of computing them twice. The controller validates on the ``val`` split.
   RL alone is left out: without an SFT start it does not learn this task (Chu et al. 2025), and its
   rollouts would not fit the budget.
4. **Evaluation** of each trained model on training hands (``id``, ``split=train``) and held-out
   hands (``id``, ``split=test``), greedy and sampled at temperature 1 (the temperature of RL's
   rollouts), and on the rule-OOD setting (J, Q, K = 11, 12, 13) greedy, plus the oracle expert and a
   random-text agent as sanity rows. Records go to ``RUN/eval/*.json`` (``OUT/baselines/eval`` for the
   agents).
5. **Report**: `amft_vlm.report.write_report` over both runs into ``OUT/report`` (``report.md`` and
   PNG plots), and ``OUT/demo.md`` with the table (``amft-vlm demo`` prints it).

``OUT`` must be empty or absent; with ``force=True`` (``--force``) the demo's own entries in it are
replaced and nothing else is touched.

The torch thread count is the number of cores other processes leave free unless given (measured
from ``/proc/stat``): on a shared machine one busy core makes two threads much slower than one
(`choose_threads`, `busy_cores`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from agents.baselines import ExpertAgent, baseline_agent
from agents.tiny import ARCHITECTURES, TINY_PREFIX, build_tiny_model
from amft_vlm.checkpoint import latest_checkpoint
from amft_vlm.config import TrainConfig, dataclass_from_dict, load_values
from amft_vlm.evaluate import EvalRecord, evaluate, write_record
from amft_vlm.expert_data import collect
from amft_vlm.preflight import writable_directory
from amft_vlm.report import FIGURES, load_run, markdown_table, write_report

log = logging.getLogger(__name__)

METHODS = ("sft", "amft")
"""The trained methods, in the order of the table."""

@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the demo: its record name, the paper setting and split, and the decoding."""

    name: str
    setting: str
    split: str | None
    """None: every hand of the setting (rule OOD deals from all its hands)."""
    temperature: float | None
    """None: greedy; else sampled at this temperature (models only: an agent does not sample)."""
    title: str


EVALUATIONS = (
    Evaluation("train", "id", "train", None, "training hands"),
    Evaluation("train-sampled", "id", "train", 1.0, "training hands, T=1"),
    Evaluation("test", "id", "test", None, "held-out hands"),
    Evaluation("test-sampled", "id", "test", 1.0, "held-out hands, T=1"),
    Evaluation("ood-rule", "ood-rule", None, None, "rule OOD (J Q K = 11 12 13)"),
)
"""The evaluations, in the order of the table's columns."""

OUTPUTS = ("initial-model", "expert", "baselines", *METHODS, "report", "demo.md")
"""The entries `run_demo` writes under its output directory (what ``force`` replaces)."""


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
"""The shipped demo config (``make demo``; ``amft-vlm demo`` without ``--config``), calibration notes included."""

QUICK = (
    "expert_episodes=32", "steps=4", "sft_batch_size=8", "controller.warmup_steps=2", "episodes_per_step=2", "group_size=2",
    "controller.meta_interval=1", "controller.validation_states=2", "controller.validation_samples=2", "max_new_tokens=16",
    "num_envs=4", "demo.eval_envs=4", "demo.eval_episodes=3",
)
"""The overrides of ``--quick``: a few steps and episodes, which check that every part runs (the test suite)."""

SET_PER_RUN = ("method", "expert_data", "output_dir", "save_every", "warm_start")
"""`TrainConfig` fields the demo sets for each run (`DemoConfig.train_config`), so a demo config leaves them out."""


@dataclass(frozen=True)
class DemoSettings:
    """The ``demo:`` section of a demo config: what is not a `TrainConfig` field. No defaults: the file says."""

    hidden_size: int
    """Text hidden size of the tiny Qwen2-VL (`agents.tiny.build_tiny_model`)."""
    num_layers: int
    """Text decoder layers."""
    intermediate_size: int
    """Text MLP size."""
    vocab_size: int
    """Tokenizer vocabulary, trained on the environments' text."""
    rope_theta: float
    """Rotary base of the text model."""
    eval_envs: int
    """Environments played together in evaluation."""
    eval_episodes: int
    """Episodes per evaluation (seeds 0..N-1)."""

    def validate(self) -> DemoSettings:
        """Raise ValueError naming the first bad field; return self when valid."""
        for name in ("hidden_size", "num_layers", "intermediate_size", "vocab_size", "eval_envs", "eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo.{name} must be a positive integer; got {getattr(self, name)}")
        if not self.rope_theta > 0:
            raise ValueError(f"demo.rope_theta must be > 0; got {self.rope_theta}")
        return self


@dataclass(frozen=True)
class DemoConfig:
    """A demo's whole configuration, read from one YAML file by `load_demo_config`."""

    train: TrainConfig
    """AMFT's training config; the SFT run's is the same with ``method: sft`` (`train_config`)."""
    demo: DemoSettings
    """The tiny model's sizes and the evaluations' size."""

    @property
    def arch(self) -> str:
        """The tiny architecture the demo builds, from ``model: tiny:ARCH``."""
        return self.train.model[len(TINY_PREFIX) :]

    def train_config(self, method: str, *, model: str, expert_data: str, output_dir: str, warm_start: str | None = None) -> TrainConfig:
        """The trainer's config for `method`: `train` with this run's paths, so both methods share every budget knob.

        The SFT run also saves its checkpoint at ``controller.warmup_steps``, where AMFT's warm-up ends.
        """
        train = self.train
        return dataclasses.replace(
            train,
            method=method,
            model=model,
            expert_data=expert_data,
            output_dir=output_dir,
            save_every=train.controller.warmup_steps if method == "sft" else train.steps,
            warm_start=warm_start,
        ).validate()


def load_demo_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *, quick: bool = False, steps: int | None = None
) -> DemoConfig:
    """Read a demo config (`DEFAULT_CONFIG` unless `path`) with ``key=value`` overrides, and check it.

    Args:
        path: a YAML file: a `TrainConfig` (AMFT's run, without `SET_PER_RUN`) plus a ``demo:`` section.
        overrides: ``key=value`` as for ``amft-vlm train`` (``steps=200``, ``controller.eta_h=0.02``,
            ``demo.eval_episodes=20``), applied after `quick`'s.
        quick: apply `QUICK` first.
        steps: optimiser steps of each method instead of the config's; AMFT's warm-up keeps its share.
    """
    path = DEFAULT_CONFIG if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demo config {path} not found; pass --config FILE (the repository ships configs/demo.yaml)")
    values = load_values(path, [*(QUICK if quick else ()), *overrides])
    section = values.pop("demo", None)
    if not isinstance(section, dict):
        raise ValueError(f"{path}: a demo config has a demo: section (the tiny model's sizes, eval_envs, eval_episodes); see {DEFAULT_CONFIG.name}")
    per_run = [name for name in SET_PER_RUN if name in values]
    if per_run:
        raise ValueError(f"{per_run[0]}: the demo sets it for each run (sft and amft); leave it out of the demo config")
    train = dataclass_from_dict(TrainConfig, values)
    if not train.model.startswith(TINY_PREFIX) or train.model[len(TINY_PREFIX) :] not in ARCHITECTURES:
        raise ValueError(f"model: the demo builds a tiny model, {' or '.join(TINY_PREFIX + arch for arch in ARCHITECTURES)}; got {train.model!r}")
    # The demo's evaluation and its table are GeneralPoints in language (GP-L's paper settings): train on that.
    for name, kwargs in (("env_kwargs", train.env_kwargs), ("validation_env_kwargs", train.validation_env_kwargs)):
        if train.env_id != "GeneralPoints-v0" or kwargs.get("modality") != "language":
            raise ValueError(
                f"env_id / {name}: the demo trains and evaluates GeneralPoints-v0 in language modality (its table is GP-L's "
                f"paper settings); got {train.env_id} {kwargs}. Train other tasks with `amft-vlm train`"
            )
    if steps is not None:
        if steps < 2:
            raise ValueError(f"steps must be at least 2 (AMFT needs a warm-up step and a controller step); got {steps}")
        warmup = train.controller.warmup_steps
        warmup = min(steps - 1, max(1, round(warmup * steps / train.steps)))  # keeps the controller's share of the steps
        train = dataclasses.replace(train, steps=steps, controller=dataclasses.replace(train.controller, warmup_steps=warmup))
    return DemoConfig(train.validate(), dataclass_from_dict(DemoSettings, section, prefix="demo.").validate())


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` produced."""

    out_dir: Path
    table: str
    """The markdown tables (also in ``OUT/demo.md``)."""
    records: dict[str, dict[str, EvalRecord]]
    """Evaluation records by row (``expert``, ``random``, ``sft``, ``amft``) and evaluation name."""
    report: Path
    """``OUT/report/report.md``."""
    train_seconds: dict[str, float]
    """Training wall time per method (AMFT's own steps; its warm-up is the SFT run's)."""
    wall_seconds: float
    """Wall time of the whole demo."""
    threads: int
    """Torch threads it ran with."""


def busy_cores(window: float = 0.5) -> float:
    """How many cores other processes keep busy now: from ``/proc/stat`` over `window` seconds.

    The load average would do, but it lags by a minute: right after ``make demo``'s install step it
    still reads about 1 on an idle machine. Without ``/proc/stat`` it is the fallback (0 without either).
    """
    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = sample()
    if first is not None:
        time.sleep(window)
        second = sample()
        if second is not None and second[0] > first[0]:
            total, idle = second[0] - first[0], second[1] - first[1]
            return (os.cpu_count() or 1) * (total - idle) / total
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def choose_threads(requested: int | None = None) -> int:
    """Torch threads for the demo: `requested`, or the cores other processes leave free now (at least 1)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be at least 1; got {requested}")
        return requested
    cores = os.cpu_count() or 1
    return max(1, min(cores, round(cores - busy_cores())))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch threads, and give the previous count back after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose a directory for --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; choose another --out or pass --force to replace the demo's files in it")
    writable_directory(out, what="--out")
    for name in OUTPUTS if force else ():
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _evaluate_all(who: str, label: str, *, model: str | None, config: DemoConfig, eval_dir: Path, file_prefix: str, progress: bool) -> dict[str, EvalRecord]:
    """Play the evaluations with a model (all) or the agent `who` (the greedy ones); write each to ``eval_dir/PREFIXNAME.json``."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for evaluation in EVALUATIONS:
        if model is None and evaluation.temperature is not None:
            continue
        record = evaluate(
            setting=evaluation.setting,
            split=evaluation.split,
            episodes=config.demo.eval_episodes,
            model=model,
            agent=baseline_agent(who, seed=0) if model is None else None,
            num_envs=config.demo.eval_envs,
            max_new_tokens=config.train.max_new_tokens,
            temperature=evaluation.temperature,
            device=config.train.device,
            progress=progress,
        )
        record = dataclasses.replace(record, model=label)
        write_record(record, eval_dir / f"{file_prefix}{evaluation.name}.json")
        records[evaluation.name] = record
    return records


def _cell(record: EvalRecord | None, metric: str) -> str:
    value = record.metrics.get(metric) if record is not None else None
    return "—" if value is None else f"{100 * value.value:.1f} ± {100 * value.stderr:.1f}%"


BUDGET = (
    ("budget_updates", "optimiser updates"),
    ("budget_expert_examples", "expert dialogues"),
    ("budget_rollout_episodes", "RL rollout episodes"),
    ("budget_validation_episodes", "validation episodes"),
    ("budget_trained_tokens", "trained tokens"),
)


def demo_table(
    records: dict[str, dict[str, EvalRecord]],
    train_seconds: dict[str, float],
    config: DemoConfig,
    budgets: dict[str, dict[str, int]] | None = None,
    shared_seconds: float | None = None,
) -> str:
    """The demo's tables: success (± standard error) per row and evaluation, what RL changed, and each run's budget.

    ``shared_seconds`` is the SFT run's time for the warm-up steps AMFT starts from.
    """
    rows = []
    for row, by_name in records.items():
        seconds = train_seconds.get(row)
        time_cell = "—" if seconds is None else f"{seconds:.0f} s"
        if row == "amft" and shared_seconds is not None and seconds is not None:
            time_cell = f"{shared_seconds:.0f} s shared with sft + {seconds:.0f} s"
        rows.append([row, *(_cell(by_name.get(e.name), "success_rate") for e in EVALUATIONS), time_cell])
    lines = ["Success rate: episodes solved within 5 attempts.", ""]
    lines += markdown_table(["", *(e.title for e in EVALUATIONS), "training time"], rows)

    changed = [
        [row, *(_cell(by_name.get(name), metric) for metric in ("retry_success", "valid_formula_rate") for name in ("train", "test"))]
        for row, by_name in records.items()
    ]
    lines += ["", "What the answers look like (greedy): success after a failed first answer, among episodes with one; "
              "answers whose formula the verifier could read and check against the cards, among all answers.", ""]
    lines += markdown_table(["", "retry success, training hands", "retry success, held-out", "valid formula, training hands", "valid formula, held-out"], changed)
    if budgets:
        lines += ["", "Budget each run consumed (counted by the trainer; validation episodes are AMFT's meta-gradient).", ""]
        lines += markdown_table(["", *(title for _, title in BUDGET)], [[row, *(f"{budget.get(key, 0):,}" for key, _ in BUDGET)] for row, budget in budgets.items()])
    lines += ["", settings_note(config)]
    return "\n".join(lines)


def settings_note(config: DemoConfig) -> str:
    """The line under the demo's tables that says what each column played and each run's budget."""
    train, controller, episodes = config.train, config.train.controller, config.demo.eval_episodes
    return (
        f"{episodes} episodes per column (seeds 0..{episodes - 1}; the papers use 234); ± is the standard "
        f"error; — where it does not apply (an agent does not sample; no episode failed its first answer). Both methods: "
        f"{train.steps} steps, {train.sft_batch_size} expert dialogues per step, AdamW lr {train.learning_rate:g} "
        f"{'with cosine decay' if train.lr_schedule == 'cosine' else 'constant'}; AMFT: the first {controller.warmup_steps} steps are SFT's, then {train.episodes_per_step}x"
        f"{train.group_size} RL rollouts per step and a meta-gradient every {controller.meta_interval} steps on "
        f"{controller.validation_states}x{controller.validation_samples} validation episodes (split "
        f"{train.validation_env_kwargs.get('split', 'all')})."
    )


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    config: DemoConfig | None = None,
    *,
    threads: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> DemoResult:
    """Run the demo (see the module docstring) into `out_dir`, logging each stage; the table is in the result.

    Args:
        out_dir: output directory; must be empty or absent unless `force`.
        config: what to run (`load_demo_config`); None: the shipped `DEFAULT_CONFIG`.
        threads: torch threads; None uses the cores other processes leave free (`choose_threads`).
        force: replace the demo's own files in a non-empty `out_dir`.
        progress: show progress bars.
    """
    config = load_demo_config() if config is None else config
    train, settings = config.train, config.demo
    warmup = train.controller.warmup_steps
    thread_count = choose_threads(threads)
    out = Path(out_dir)
    _prepare(out, force)
    with torch_threads(thread_count):
        log.info("amft-vlm demo: %d torch thread(s) on %d cores; output in %s", thread_count, os.cpu_count(), out)
        started = time.perf_counter()
        log.info("1/5 building the tiny %s and its tokenizer", config.arch)
        model = build_tiny_model(
            config.arch,
            out / "initial-model",
            seed=train.seed,
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            intermediate_size=settings.intermediate_size,
            vocab_size=settings.vocab_size,
            rope_theta=settings.rope_theta,
        )
        log.info("2/5 collecting %d expert episodes on %s %s", train.expert_episodes, train.env_id, train.env_kwargs)
        collect(train.env_id, dict(train.env_kwargs), ExpertAgent(), episodes=train.expert_episodes, seed=train.seed, out_dir=out / "expert", progress=progress)

        from amft_vlm.trainer import Trainer  # loads accelerate: only once the cheap steps have run

        records: dict[str, dict[str, EvalRecord]] = {}
        train_seconds: dict[str, float] = {}
        warm_start = out / "sft" / "checkpoints" / f"step-{warmup:06d}"
        for method in METHODS:
            own = train.steps - (warmup if method == "amft" else 0)
            log.info("3/5 training %s: %d steps%s", method, own, f" after sft's first {warmup}" if method == "amft" else "")
            run_config = config.train_config(
                method,
                model=str(model),
                expert_data=str(out / "expert"),
                output_dir=str(out / method),
                warm_start=str(warm_start) if method == "amft" else None,
            )
            method_started = time.perf_counter()
            Trainer(run_config, progress=progress).train()
            train_seconds[method] = time.perf_counter() - method_started
        shared_seconds = sum(m["step_time"] for m in load_run(out / "sft").records if m["step"] <= warmup)
        log.info("4/5 evaluating: %d episodes per setting, greedy and sampled (T=1)", settings.eval_episodes)
        for who in ("expert", "random"):
            eval_dir = out / "baselines" / "eval"
            records[who] = _evaluate_all(who, who, model=None, config=config, eval_dir=eval_dir, file_prefix=f"{who}-", progress=progress)
        budgets = {}
        for method in METHODS:
            checkpoint = latest_checkpoint(out / method / "checkpoints")
            if checkpoint is None:
                raise RuntimeError(f"training {method} wrote no checkpoint under {out / method / 'checkpoints'}")
            label = f"{method} (step {train.steps})"
            records[method] = _evaluate_all(method, label, model=str(checkpoint / "policy"), config=config, eval_dir=out / method / "eval", file_prefix="", progress=progress)
            last = load_run(out / method).records[-1]
            budgets[method] = {key: int(last.get(key) or 0) for key, _ in BUDGET}

        log.info("5/5 writing the report")
        baseline_records = sorted((out / "baselines" / "eval").glob("*.json"))
        report = write_report([out / method for method in METHODS], out / "report", eval_files=baseline_records)
        table = demo_table(records, train_seconds, config, budgets, shared_seconds)
        (out / "demo.md").write_text("# amft-vlm demo\n\n" + table + "\n")
    wall = time.perf_counter() - started
    plots = [report.parent / f"{figure.name}.png" for figure in FIGURES if (report.parent / f"{figure.name}.png").is_file()]
    log.info("done in %.1f min. Table: %s; report: %s; plots: %s", wall / 60, out / "demo.md", report, ", ".join(str(p) for p in plots))
    log.info("runs (metrics.jsonl, checkpoints, eval records): %s", ", ".join(str(out / m) for m in METHODS))
    return DemoResult(out, table, records, report, train_seconds, wall, thread_count)
