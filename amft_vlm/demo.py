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
   SFT run's checkpoint at that step (`amft_vlm.run.config.TrainConfig.warm_start`, tested to equal a run
   from scratch) instead of computing them twice. The controller validates on the ``val`` split.
   RL alone is left out: without an SFT start it does not learn this task (Chu et al. 2025), and its
   rollouts would not fit the budget.
4. **Evaluation** of each trained model on training hands (``id``, ``split=train``) and held-out
   hands (``id``, ``split=test``), greedy and sampled at temperature 1 (the temperature of RL's
   rollouts), and on the rule-OOD setting (J, Q, K = 11, 12, 13) greedy, plus the oracle expert and a
   random-text agent as sanity rows. Records go to ``RUN/eval/*.json`` (``OUT/baselines/eval`` for the
   agents).
5. **Report**: `amft_vlm.evaluation.report.write_report` over both runs into ``OUT/report`` (``report.md`` and
   PNG plots), and ``OUT/demo.md`` with the table (``amft-vlm demo`` prints it).

``OUT`` must be empty or absent; with ``force=True`` (``--force``) the demo's own entries in it are
replaced and nothing else is touched (a FIFO, device or symlink under one of their names is refused; links to
``demo.md`` and ``summary.json`` are kept and written through). The demo locks ``OUT`` while it runs
(`amft_vlm.run.run_directory.DirectoryLock`; each run's trainer locks its own directory too): a second demo
into it is refused, naming the first.

The torch thread count is the number of cores other processes leave free unless given (measured
from ``/proc/stat``): on a shared machine one busy core makes two threads much slower than one
(`choose_threads`, `busy_cores`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.baselines import ExpertAgent, baseline_agent
from agents.tiny import ARCHITECTURES, TINY_PREFIX, build_tiny_model, tiny_model_problem
from amft_vlm.evaluation.evaluate import EvalRecord, evaluate, write_record
from amft_vlm.evaluation.report import FIGURES, load_run, markdown_table, write_report
from amft_vlm.learning.checkpoint import latest_checkpoint
from amft_vlm.learning.resolve import resolve_method
from amft_vlm.rollout.expert_data import collect, corrupt_dataset
from amft_vlm.run.config import TrainConfig, dataclass_from_dict, load_values
from amft_vlm.run.jobs import JobPool, choose_threads, machine_description, torch_threads
from amft_vlm.run.preflight import writable_directory
from amft_vlm.run.run_directory import DirectoryLock, is_empty
from amft_vlm.run.safe_io import (
    OutputPathError,
    output_directory,
    output_file_target,
    read_regular_text,
    write_text_atomic,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DemoRun:
    """One training run of the demo: its directory and table row, its method and which expert it imitates."""

    name: str
    method: str
    expert: str
    """``clean``, or ``corrupted``: the `Corruption` of the expert replaces it once AMFT's warm-up ends."""


RUNS = (DemoRun("sft", "sft", "clean"), DemoRun("amft", "amft", "clean"), DemoRun("amft-corrupted", "amft", "corrupted"))
"""The trained runs, in the order of the table. Both AMFT runs start from the SFT run's warm-up checkpoint."""

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
    Evaluation("ood-rule", "ood-rule", None, None, "rule OOD (J Q K = 11 12 13)"),
)
"""The evaluations, in the order of the table's columns."""

OUTPUTS = ("initial-model", "expert", "expert-corrupted", "baselines", *(run.name for run in RUNS), "report", "demo.md", "summary.json")
"""The entries `run_demo` writes under its output directory (what ``force`` replaces)."""


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
"""The shipped demo config (``make demo``; ``amft-vlm demo`` without ``--config``), calibration notes included."""

QUICK = (
    "expert_episodes=32", "steps=4", "sft_batch_size=8", "controller.warmup_steps=2", "episodes_per_step=2", "group_size=2",
    "controller.meta_interval=1", "controller.validation_states=2", "controller.validation_samples=2", "max_new_tokens=16",
    "num_envs=4", "demo.eval_envs=4", "demo.eval_episodes=3",
)
"""The overrides of ``--quick``: a few steps and episodes, which check that every part runs (the test suite)."""

SET_PER_RUN = ("method", "expert_data", "expert_data_after_warmup", "output_dir", "save_every", "warm_start")
"""`TrainConfig` fields the demo sets for each run (`DemoConfig.train_config`), so a demo config leaves them out."""


@dataclass(frozen=True)
class Corruption:
    """The ``demo.corruption`` section: how the second AMFT run's expert is poisoned after the shared warm-up
    (`amft_vlm.rollout.expert_data.corrupt_dataset`)."""

    kind: str
    """``random`` (a random-text agent's answers), ``shuffled`` (another hand's solution) or ``single-quoted``."""
    share: float
    """Share of the expert dialogues whose answers are replaced."""
    seed: int
    """Which dialogues (and the random text)."""

    def validate(self) -> Corruption:
        """Raise ValueError naming the first bad field; return self when valid."""
        from amft_vlm.rollout.expert_data import CORRUPTIONS

        if self.kind not in CORRUPTIONS:
            raise ValueError(f"demo.corruption.kind must be one of {', '.join(CORRUPTIONS)}; got {self.kind!r}")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"demo.corruption.share must be in (0, 1]; got {self.share!r}")
        return self


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
    corruption: Corruption
    """The corrupted-expert AMFT run's expert after the warm-up."""

    def validate(self) -> DemoSettings:
        """Raise ValueError naming the first bad field; return self when valid."""
        for name in ("hidden_size", "num_layers", "intermediate_size", "vocab_size", "eval_envs", "eval_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo.{name} must be a positive integer; got {getattr(self, name)}")
        if not self.rope_theta > 0:
            raise ValueError(f"demo.rope_theta must be > 0; got {self.rope_theta}")
        self.corruption.validate()
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

    def train_config(
        self, method: str, *, model: str, expert_data: str, output_dir: str, warm_start: str | None = None, expert_after_warmup: str | None = None
    ) -> TrainConfig:
        """The trainer's config for `method`: `train` with this run's paths, so every run shares every budget knob.

        The SFT run also saves its checkpoint at ``controller.warmup_steps``, where AMFT's warm-up ends;
        `expert_after_warmup` is the corrupted run's expert after it (``expert_data_after_warmup``).
        """
        train = self.train
        return dataclasses.replace(
            train,
            method=method,
            model=model,
            expert_data=expert_data,
            expert_data_after_warmup=expert_after_warmup,
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
        raise ValueError(f"{per_run[0]}: the demo sets it for each run ({', '.join(run.name for run in RUNS)}); leave it out of the demo config")
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
    resolve_method(train.validate())  # the checks that depend on the method (AMFT's warm-up within its steps, ...), now
    return DemoConfig(train, dataclass_from_dict(DemoSettings, section, prefix="demo.").validate())


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
    summary: dict
    """``OUT/summary.json``: per run its method, expert, mu and the controller's evidence (`demo_summary`)."""


def _prepare(out: Path, force: bool) -> DirectoryLock:
    """Lock `out` for the demo (made if needed) once it is empty, or with `force` once the demo's own entries are gone."""
    output_directory(out, create=False)  # a FIFO, device or file at --out is refused; a symlink to a directory is followed
    if not is_empty(out) and not force:
        raise FileExistsError(f"{out} is not empty; choose another --out or pass --force to replace the demo's files in it")
    writable_directory(out, what="--out")
    lock = DirectoryLock(out, what="--out")
    try:
        if not is_empty(out) and not force:  # another demo began writing it since the check above
            raise FileExistsError(f"{out} is not empty; choose another --out or pass --force to replace the demo's files in it")
        for name in OUTPUTS if force else ():
            _make_way(out / name)
    except BaseException:
        lock.release()
        raise
    return lock


def _make_way(path: Path) -> None:
    """Make way for the demo's entry `path` under ``--force``: a directory or a file there is removed; a symlink to a
    file is kept for ``demo.md`` and ``summary.json`` (written through at the end, as any output: `amft_vlm.run.safe_io`).
    Anything else, which the demo did not write, is refused: a FIFO, socket or device, another symlink."""
    if path.is_symlink():
        if path.name not in ("demo.md", "summary.json"):
            raise OutputPathError(f"{path} is a symbolic link, which --force does not replace; move it away or choose another --out")
        output_file_target(path)  # a link to a FIFO, device, directory... is refused now, not after the demo
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        output_file_target(path)  # a FIFO, socket or device is refused, a file removed
        path.unlink()


def _evaluate_all(who: str, label: str, *, model: str | None, config: DemoConfig, eval_dir: Path, file_prefix: str, progress: bool) -> dict[str, EvalRecord]:
    """Play the evaluations with a model (all) or the agent `who` (the greedy ones); write each to ``eval_dir/PREFIXNAME.json``."""
    output_directory(eval_dir)
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


def prepare_inputs(out: Path, config: DemoConfig, *, progress: bool) -> tuple[Path, Path, Path]:
    """The tiny model, the expert dataset and its corrupted copy under `out` (each built unless already there):
    ``initial-model``, ``expert`` and ``expert-corrupted``."""
    train, settings = config.train, config.demo
    model = out / "initial-model"
    if tiny_model_problem(model) is not None:
        log.info("building the tiny %s and its tokenizer", config.arch)
        build_tiny_model(
            config.arch, model, seed=train.seed, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
            intermediate_size=settings.intermediate_size, vocab_size=settings.vocab_size, rope_theta=settings.rope_theta,
        )  # fmt: skip
    expert, corrupted = out / "expert", out / "expert-corrupted"
    if not (expert / "manifest.json").is_file():
        log.info("collecting %d expert episodes on %s %s", train.expert_episodes, train.env_id, train.env_kwargs)
        collect(train.env_id, dict(train.env_kwargs), ExpertAgent(), episodes=train.expert_episodes, seed=train.seed, out_dir=expert, progress=progress)
    if not (corrupted / "manifest.json").is_file():
        corruption = settings.corruption
        count = corrupt_dataset(expert, corrupted, share=corruption.share, kind=corruption.kind, seed=corruption.seed)
        log.info("corrupted expert: %d of its dialogues' answers replaced (%s)", count, corruption.kind)
    return model, expert, corrupted


@dataclass(frozen=True)
class RunOutcome:
    """What one run's task (`_train_and_evaluate`) hands back: its time, evaluations and budget."""

    train_seconds: float
    records: dict[str, EvalRecord]
    budget: dict[str, int]


def _run_config(run: DemoRun, config: DemoConfig, out: Path, inputs: tuple[Path, Path, Path]) -> TrainConfig:
    model, expert, corrupted = inputs
    warm_start = out / "sft" / "checkpoints" / f"step-{config.train.controller.warmup_steps:06d}"
    return config.train_config(
        run.method,
        model=str(model),
        expert_data=str(expert),
        output_dir=str(out / run.name),
        warm_start=str(warm_start) if run.method != "sft" else None,
        expert_after_warmup=str(corrupted) if run.expert == "corrupted" else None,
    )


def _train_and_evaluate(run: DemoRun, config: DemoConfig, out: Path, inputs: tuple[Path, Path, Path], progress: bool) -> RunOutcome:
    """Train `run` to the end (the SFT run resumes from its warm-up checkpoint, the AMFT runs start from it), then
    play every evaluation with its final checkpoint. Runs in a worker process when the demo runs side by side."""
    from amft_vlm.learning.trainer import Trainer  # loads accelerate: only where a run trains

    started = time.perf_counter()
    Trainer(_run_config(run, config, out, inputs), resume=run.method == "sft", progress=progress).train()
    seconds = time.perf_counter() - started
    checkpoint = latest_checkpoint(out / run.name / "checkpoints")
    if checkpoint is None:
        raise RuntimeError(f"training {run.name} wrote no checkpoint under {out / run.name / 'checkpoints'}")
    label = f"{run.name} (step {config.train.steps})"
    records = _evaluate_all(run.name, label, model=str(checkpoint / "policy"), config=config, eval_dir=out / run.name / "eval", file_prefix="", progress=progress)
    last = load_run(out / run.name).records[-1]
    return RunOutcome(seconds, records, {key: int(last.get(key) or 0) for key, _ in BUDGET})


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


def controller_summary(run_dir: Path, warmup_steps: int) -> dict[str, Any]:
    """What the controller did in an AMFT run, from its ``metrics.jsonl``: mu when it took over and at the end,
    each term's total contribution, and the meta-gradient's evidence (its pooled t at the end, each step's t)."""
    records = [m for m in load_run(run_dir).records if m["step"] > warmup_steps]
    if not records:
        return {}
    meta = [m for m in records if m.get("meta_signal") is not None]
    return {
        "mu_start": records[0]["mu"],
        "mu_end": records[-1]["next_mu"],
        "entropy_term_sum": sum(m.get("entropy_term") or 0.0 for m in records),
        "meta_term_sum": sum(m.get("meta_term") or 0.0 for m in records),
        "meta_steps": len(meta),
        "meta_t": [m.get("meta_t") for m in meta],
        "meta_pooled_t_end": meta[-1].get("meta_pooled_t") if meta else None,
        "meta_tied_share": statistics.fmean(m.get("meta_tied_share") or 0.0 for m in meta) if meta else None,
        "entropy_end": records[-1].get("entropy"),
        "target_entropy": records[-1].get("target_entropy"),
    }


def demo_table(
    records: dict[str, dict[str, EvalRecord]],
    train_seconds: dict[str, float],
    config: DemoConfig,
    budgets: dict[str, dict[str, int]] | None = None,
    shared_seconds: float | None = None,
    controllers: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The demo's tables: success (± standard error) per row and evaluation, what the answers look like, what each
    AMFT run's controller did, and each run's budget.

    ``shared_seconds`` is the SFT run's time for the warm-up steps the AMFT runs start from.
    """
    rows = []
    for row, by_name in records.items():
        seconds = train_seconds.get(row)
        time_cell = "—" if seconds is None else f"{seconds:.0f} s"
        if row.startswith("amft") and shared_seconds is not None and seconds is not None:
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
    if controllers:
        lines += ["", "What the controller did after the warm-up (each term's total contribution to mu; the meta-gradient's "
                      "evidence: its t-statistic per meta step, and pooled over the meta steps at the end).", ""]
        lines += markdown_table(
            ["", "expert", "mu", "entropy term", "meta term", "H at the end (H*)", "meta steps", "t per step (mean, range)", "pooled t at the end", "tied validation states"],
            [[name, summary["expert"], f"{summary['mu_start']:.2f} -> {summary['mu_end']:.2f}", f"{summary['entropy_term_sum']:+.3f}",
              f"{summary['meta_term_sum']:+.3f}", _entropy_cell(summary), str(summary["meta_steps"]), _t_cell(summary["meta_t"]),
              _number_cell(summary["meta_pooled_t_end"]), _share_cell(summary["meta_tied_share"])]
             for name, summary in controllers.items()],
        )  # fmt: skip
    if budgets:
        lines += ["", "Budget each run consumed (counted by the trainer; validation episodes are AMFT's meta-gradient).", ""]
        lines += markdown_table(["", *(title for _, title in BUDGET)], [[row, *(f"{budget.get(key, 0):,}" for key, _ in BUDGET)] for row, budget in budgets.items()])
    lines += ["", settings_note(config)]
    return "\n".join(lines)


def _number_cell(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _share_cell(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _entropy_cell(summary: dict[str, Any]) -> str:
    entropy, target = summary.get("entropy_end"), summary.get("target_entropy")
    return "—" if entropy is None or target is None else f"{entropy:.2f} ({target:.2f})"


def _t_cell(values: Sequence[float | None]) -> str:
    finite = [v for v in values if v is not None]
    return "—" if not finite else f"{statistics.fmean(finite):+.2f} ({min(finite):+.2f} to {max(finite):+.2f})"


def settings_note(config: DemoConfig) -> str:
    """The line under the demo's tables that says what each column played and each run's budget."""
    train, controller, episodes, corruption = config.train, config.train.controller, config.demo.eval_episodes, config.demo.corruption
    return (
        f"{episodes} episodes per column (seeds 0..{episodes - 1}; the papers use 234); ± is the standard "
        f"error; — where it does not apply (an agent does not sample; no episode failed its first answer). Every run: "
        f"{train.steps} steps, {train.sft_batch_size} expert dialogues per step, AdamW lr {train.learning_rate:g} "
        f"{'with cosine decay' if train.lr_schedule == 'cosine' else 'constant'}; AMFT: the first {controller.warmup_steps} steps are SFT's, then {train.episodes_per_step}x"
        f"{train.group_size} RL rollouts per step and a meta-gradient every {controller.meta_interval} steps on "
        f"{controller.validation_states}x{controller.validation_samples} validation episodes (split "
        f"{train.validation_env_kwargs.get('split', 'all')}); amft-corrupted imitates, after the warm-up, the expert with "
        f"{100 * corruption.share:.0f}% of its dialogues' answers replaced ({corruption.kind})."
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
        threads: torch threads; None uses the cores other processes leave free (`choose_threads`). With two or
            more, the runs after the warm-up train side by side, one process and one thread each (decoding the tiny
            model is latency-bound: two AMFT runs side by side on one thread each make 1.4x the steps of one
            after the other on two threads).
        force: replace the demo's own files in a non-empty `out_dir`.
        progress: show progress bars.
    """
    config = load_demo_config() if config is None else config
    thread_count = choose_threads(threads)
    out = Path(out_dir)
    with _prepare(out, force):  # held until the demo ends: a second demo into `out` is refused, naming this one
        return _run_locked(out, config, thread_count, progress=progress)


def _run_locked(out: Path, config: DemoConfig, thread_count: int, *, progress: bool) -> DemoResult:
    """`run_demo` in `out`, prepared and locked by the caller."""
    train = config.train
    warmup = train.controller.warmup_steps
    started = time.perf_counter()
    with torch_threads(thread_count):
        log.info("amft-vlm demo: %d torch thread(s) on %d cores; output in %s", thread_count, os.cpu_count(), out)
        log.info("1/5 the tiny model, the expert data and its corrupted copy")
        inputs = prepare_inputs(out, config, progress=progress)

        from amft_vlm.learning.trainer import Trainer  # loads accelerate: only once the cheap steps have run

        log.info("2/5 training sft's first %d steps (the AMFT runs' warm-up)", warmup)
        warmup_started = time.perf_counter()
        Trainer(_run_config(RUNS[0], config, out, inputs), progress=progress).train(stop_after=warmup)
        shared_seconds = time.perf_counter() - warmup_started

    jobs = len(RUNS) if thread_count > 1 else 1  # all at once: the SFT run's rest is short, the AMFT runs are not
    log.info("3/5 training %s from step %d to %d%s, then evaluating each", ", ".join(run.name for run in RUNS), warmup, train.steps,
             f" side by side ({jobs} processes, 1 thread each)" if jobs > 1 else "")  # fmt: skip
    outcomes = _run_side_by_side(config, out, inputs, jobs=jobs, threads=thread_count, progress=progress)

    with torch_threads(thread_count):
        log.info("4/5 evaluating the expert and random agents")
        records: dict[str, dict[str, EvalRecord]] = {}
        for who in ("expert", "random"):
            records[who] = _evaluate_all(who, who, model=None, config=config, eval_dir=out / "baselines" / "eval", file_prefix=f"{who}-", progress=progress)
        records.update({name: outcome.records for name, outcome in outcomes.items()})
        train_seconds = {name: outcome.train_seconds for name, outcome in outcomes.items()}
        train_seconds["sft"] += shared_seconds
        budgets = {name: outcome.budget for name, outcome in outcomes.items()}
        controllers = {run.name: {"expert": run.expert, **controller_summary(out / run.name, warmup)} for run in RUNS if run.method == "amft"}

        log.info("5/5 writing the report")
        baseline_records = sorted((out / "baselines" / "eval").glob("*.json"))
        report = write_report([out / run.name for run in RUNS], out / "report", eval_files=baseline_records)
        table = demo_table(records, train_seconds, config, budgets, shared_seconds, controllers)
        write_text_atomic(out / "demo.md", "# amft-vlm demo\n\n" + table + "\n")
    wall = time.perf_counter() - started
    summary = demo_summary(config, records, controllers, train_seconds, wall=wall, threads=thread_count)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plots = [report.parent / f"{figure.name}.png" for figure in FIGURES if (report.parent / f"{figure.name}.png").is_file()]
    log.info("done in %.1f min. Table: %s; summary: %s; report: %s; plots: %s", wall / 60, out / "demo.md", out / "summary.json", report, ", ".join(str(p) for p in plots))
    log.info("runs (metrics.jsonl, checkpoints, eval records): %s", ", ".join(str(out / run.name) for run in RUNS))
    return DemoResult(out, table, records, report, train_seconds, wall, thread_count, summary)


def _run_side_by_side(config: DemoConfig, out: Path, inputs: tuple[Path, Path, Path], *, jobs: int, threads: int, progress: bool) -> dict[str, RunOutcome]:
    """Every run's rest and evaluations: in this process one after the other (one job), or in `jobs` worker
    processes, while this one shows the steps done (read from the runs' ``metrics.jsonl``)."""
    with JobPool(jobs, 1 if jobs > 1 else threads) as pool:
        futures = {run.name: pool.submit(_train_and_evaluate, run, config, out, inputs, progress and jobs == 1, log_file=out / run.name / "demo.log") for run in RUNS}
        if jobs > 1:
            warmup = config.train.controller.warmup_steps
            _show_progress(futures, [out / run.name for run in RUNS], warmup=warmup, total=len(RUNS) * (config.train.steps - warmup), disable=not progress)
        return {name: future.result() for name, future in futures.items()}


def _show_progress(futures: dict[str, Any], run_dirs: Sequence[Path], *, warmup: int, total: int, disable: bool) -> None:
    """A progress bar over the steps the side-by-side runs have logged, until every task is done."""
    from tqdm import tqdm

    with tqdm(total=total, desc="train " + ", ".join(directory.name for directory in run_dirs), unit="step", disable=disable) as bar:
        while not all(future.done() for future in futures.values()):
            time.sleep(2.0)
            done = sum(_logged_steps(directory, warmup) for directory in run_dirs) - bar.n
            bar.update(max(0, min(done, total - bar.n)))


def _logged_steps(run_dir: Path, warmup: int) -> int:
    """Steps a run has logged beyond the shared warm-up (its ``metrics.jsonl`` holds one line per step from step 1)."""
    try:
        lines = read_regular_text(run_dir / "metrics.jsonl", 256 * 1024 * 1024, what="metrics.jsonl").count("\n")
    except OSError:  # not there yet (or not a regular file: training refuses it with a message)
        return 0
    return max(0, lines - warmup)


def demo_summary(
    config: DemoConfig, records: dict[str, dict[str, EvalRecord]], controllers: dict[str, dict[str, Any]], train_seconds: dict[str, float],
    *, wall: float, threads: int,
) -> dict[str, Any]:
    """``OUT/summary.json``: per run its name, method, expert, mu (start and end, for AMFT), each controller term's
    total, the meta-gradient's evidence and every evaluation's success rate; with the machine, seed and times."""
    runs = []
    for run in RUNS:
        summary = controllers.get(run.name, {})
        runs.append(
            {
                "name": run.name,
                "method": run.method,
                "expert": run.expert,
                "mu_start": summary.get("mu_start", 1.0),
                "mu_end": summary.get("mu_end", 1.0),
                **{key: value for key, value in summary.items() if key not in ("mu_start", "mu_end", "expert")},
                "success": {name: record.metrics["success_rate"].value for name, record in records[run.name].items()},
                "train_seconds": train_seconds[run.name],
            }
        )
    return {"runs": runs, "seed": config.train.seed, "machine": machine_description(), "wall_seconds": wall, "threads": threads}
