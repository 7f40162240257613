"""Running the comparison (`run_compare`): check everything, prepare the shared inputs, train, evaluate, summarise.

A run already in ``OUT`` is resumed from its newest checkpoint or skipped when finished (`run_progress`); an
evaluation record that is current for its checkpoint and settings is kept (`record_is_current`). Training
and evaluation tasks go through `amft_vlm.run.jobs.JobPool` (``--jobs``). ``OUT`` is locked for the whole call
(`amft_vlm.run.run_directory.DirectoryLock`): a second compare into it is refused, naming the first; each run's
trainer locks its own directory too.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agents.baselines import ExpertAgent
from agents.tiny import TINY_PREFIX, resolve_model_spec
from amft_vlm.compare.config import CompareConfig, EvalSetting, RunPlan, load_compare_config, record_path
from amft_vlm.compare.curves import plot_curves
from amft_vlm.compare.summary import comparison_table, summarize
from amft_vlm.evaluation.evaluate import evaluate, load_record, paper_setting, write_record
from amft_vlm.learning.checkpoint import load_trainer_state, resumable_checkpoint
from amft_vlm.learning.resume import check_resume_settings
from amft_vlm.rollout.expert_data import collect, read_manifest
from amft_vlm.run.config import TrainConfig
from amft_vlm.run.jobs import JobPool, choose_threads
from amft_vlm.run.preflight import (
    check_environment,
    check_expert_dataset,
    check_model_source,
    writable_directory,
)
from amft_vlm.run.run_directory import DirectoryLock
from amft_vlm.run.safe_io import output_directory, output_file_target, resolve_inside, write_text_atomic

log = logging.getLogger(__name__)


def run_progress(run: RunPlan) -> int:
    """Iterations run `run` has done: the step of its newest usable checkpoint (0 without one).

    Raises:
        ResumeSettingsError: the run was trained with settings this grid would not continue.
        CheckpointError: it has checkpoints, but none is usable.
    """
    root = run.run_dir / "checkpoints"
    checkpoint = resumable_checkpoint(root) if root.is_dir() else None
    if checkpoint is None:
        return 0
    done = int(load_trainer_state(checkpoint)["step"])
    check_resume_settings(run.config, run.run_dir / "config.yaml", done)
    return done


def final_model(run: RunPlan) -> Path:
    """The model of `run`'s checkpoint at ``steps`` (its ``policy/``, or ``lora/`` for a LoRA run)."""
    checkpoint = resumable_checkpoint(run.run_dir / "checkpoints")
    if checkpoint is None or load_trainer_state(checkpoint)["step"] != run.config.steps:
        raise RuntimeError(f"run {run.name} has no checkpoint at step {run.config.steps} under {run.run_dir / 'checkpoints'}")
    return checkpoint / "lora" if (checkpoint / "lora").is_dir() else checkpoint / "policy"


@dataclass(frozen=True)
class EvalTask:
    """One evaluation of one run's final model, everything `evaluate` needs (sent to a worker process)."""

    model: str
    env_id: str
    setting: str
    modality: str
    split: str | None
    episodes: int
    seed: int
    env_kwargs: dict[str, Any]
    num_envs: int
    max_new_tokens: int
    dtype: str
    device: str
    path: Path


@dataclass(frozen=True)
class CompareResult:
    """What `run_compare` produced."""

    out_dir: Path
    table: str
    """The markdown table (also in ``OUT/compare.md``)."""
    summary: dict[str, Any]
    """Every number of the table (also ``OUT/summary.json``)."""
    curves: Path | None
    """``OUT/curves.png``; None when no run logged a curve."""
    trained: list[str]
    """Runs trained or resumed by this call (``METHOD/seed-S``)."""
    evaluated: list[str]
    """Evaluation records written by this call (file names)."""
    wall_seconds: float
    """Wall time of the call."""
    threads: int
    """Torch threads of each job."""


def threads_per_job(total: int, jobs: int) -> int:
    """Torch threads of each of `jobs` processes sharing `total` threads (at least 1)."""
    return max(1, total // jobs)


def run_compare(config: CompareConfig | None = None, out_dir: str | os.PathLike | None = None, *, progress: bool = True) -> CompareResult:
    """Run the comparison (see the module docstring) into `out_dir`; finished runs and current records are kept.

    Args:
        config: what to run (`load_compare_config`); None: the shipped `DEFAULT_CONFIG`.
        out_dir: output directory; None: ``runs/NAME`` for config ``NAME.yaml``.
        progress: show a progress bar over the grid (and, with one job, each run's own).
    """
    config = load_compare_config() if config is None else config
    started = time.perf_counter()
    out = writable_directory(config.default_out() if out_dir is None else out_dir, what="--out")
    with DirectoryLock(out, what="--out"):
        return _run_grid(config, out, started, progress=progress)


def _run_grid(config: CompareConfig, out: Path, started: float, *, progress: bool) -> CompareResult:
    """`run_compare` in `out`, which the caller has locked."""
    for name in ("compare.json", "summary.json", "compare.md", "curves.png"):
        output_file_target(out / name)  # a FIFO, device or directory there is refused now, not after the training
    settings = config.compare
    grid = config.grid(out)
    items = config.eval_settings()

    # Everything is checked before anything runs: inputs, evaluation settings, what each run has done.
    train = config.train
    check_environment(train.env_id, train.env_kwargs, what="env_kwargs", id_what="env_id")
    check_environment(train.env_id, train.validation_env_kwargs, what="validation_env_kwargs", id_what="env_id")
    check_model_source(train.model)
    if train.expert_data is not None:
        check_expert_dataset(train.expert_data, train.env_id, train.env_kwargs)
    for item in items:
        check_environment(train.env_id, _eval_env_kwargs(config, item), what=f"evaluation {item.name}")
    done = {run.name: run_progress(run) for run in grid}
    finished = {run.name for run in grid if done[run.name] == run.config.steps}
    log.info(
        "amft-vlm compare: %d methods x %d seeds, %d steps each, into %s; %d of %d runs finished already",
        len(settings.methods), len(settings.seeds), train.steps, out, len(finished), len(grid),
    )  # fmt: skip

    _prepare_shared_inputs(config, out, progress=progress)
    grid = [dataclasses.replace(run, config=run.config.validate()) for run in grid]
    write_text_atomic(out / "compare.json", json.dumps(_config_dict(config), indent=2) + "\n")
    output_directory(out / "eval")

    threads = choose_threads(settings.threads)
    each = threads_per_job(threads, settings.jobs)
    log.info("%d job(s) with %d torch thread(s) each", settings.jobs, each)
    trained: list[str] = []
    evaluated: list[str] = []
    pending: dict[concurrent.futures.Future, tuple[str, RunPlan]] = {}
    bar = tqdm(total=len(grid) * (1 + len(items)), desc="compare", unit="task", disable=not progress)

    def evaluate_later(run: RunPlan) -> None:
        for item in items:
            task = _evaluation_task(config, out, run, item)
            if record_is_current(task, out):
                bar.update(1)
                continue
            log.info("%s: evaluating %s, %d episodes", run.name, item.title, task.episodes)
            pending[executor.submit(_evaluate_run, task, log_file=run.run_dir / "compare.log")] = ("eval", run)

    def handle_finished(*, block: bool) -> None:
        """Take every finished task's result (waiting for one if `block`); a finished run's evaluations follow it."""
        while pending:
            finished, _ = concurrent.futures.wait(pending, timeout=None if block else 0, return_when=concurrent.futures.FIRST_COMPLETED)
            if not finished:
                return
            for future in finished:
                kind, run = pending.pop(future)
                result = future.result()
                bar.update(1)
                if kind == "train":
                    trained.append(run.name)
                    log.info("%s: trained %d steps in %.0f s", run.name, run.config.steps - done[run.name], result)
                    evaluate_later(run)
                else:
                    evaluated.append(result.name)

    executor = JobPool(settings.jobs, each)
    try:
        with executor:
            for run in grid:
                if run.name in finished:
                    log.info("%s: finished (step %d), skipped", run.name, run.config.steps)
                    bar.update(1)
                    evaluate_later(run)
                else:
                    log.info("%s: training %s", run.name, f"from step {done[run.name]}" if done[run.name] else "from the start")
                    # A run's own progress bar only in this process: bars of parallel workers would garble the grid's.
                    run_bar = progress and settings.jobs == 1
                    pending[executor.submit(_train_run, run.config, run_bar, log_file=run.run_dir / "compare.log")] = ("train", run)
                handle_finished(block=False)  # with one job every task has run by now
            handle_finished(block=True)
    finally:
        bar.close()

    summary = summarize(config, out, grid)
    table = comparison_table(summary)
    curves = plot_curves(config, grid, out / "curves.png")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    figure = f"\n![Training success, reward and mu of every method (mean over seeds, band: min-max)]({curves.name})\n" if curves else ""
    write_text_atomic(out / "compare.md", "# amft-vlm compare\n\n" + table + "\n" + figure)
    wall = time.perf_counter() - started
    log.info("done in %.1f min: %s, %s, %s", wall / 60, out / "compare.md", out / "summary.json", curves or "no curves")
    return CompareResult(out, table, summary, curves, trained, evaluated, wall, each)


def _prepare_shared_inputs(config: CompareConfig, out: Path, *, progress: bool) -> None:
    """Build the tiny model into ``OUT/initial-model`` and record the expert data into ``OUT/expert``, once."""
    train = config.train
    if train.model.startswith(TINY_PREFIX):
        resolve_model_spec(train.model, out / "initial-model", seed=train.seed)  # kept when already complete
    if train.expert_data is None:
        expert = out / "expert"
        if not (expert / "manifest.json").is_file():
            log.info("recording %d expert episodes on %s %s into %s", train.expert_episodes, train.env_id, train.env_kwargs, expert)
            collect(train.env_id, dict(train.env_kwargs), ExpertAgent(), episodes=train.expert_episodes, seed=train.seed, out_dir=expert, progress=progress)
        elif read_manifest(expert).get("episodes") != train.expert_episodes:
            raise ValueError(
                f"{expert} holds {read_manifest(expert).get('episodes')} expert episodes, but expert_episodes is "
                f"{train.expert_episodes}; choose another --out (the runs there trained on that set)"
            )
        check_expert_dataset(expert, train.env_id, train.env_kwargs)


def _extra_env_kwargs(config: CompareConfig, item: EvalSetting) -> dict[str, Any]:
    """The training environment's arguments that `item`'s paper setting and split leave open (e.g. a resolution)."""
    _, setting_kwargs = paper_setting(config.train.env_id, item.setting, config.modality)
    return {key: value for key, value in config.train.env_kwargs.items() if key not in setting_kwargs and key != "split"}


def _eval_env_kwargs(config: CompareConfig, item: EvalSetting) -> dict[str, Any]:
    """The ``gym.make`` arguments an evaluation plays: the paper setting's, its split, and `_extra_env_kwargs`."""
    _, setting_kwargs = paper_setting(config.train.env_id, item.setting, config.modality)
    return {**setting_kwargs, **_extra_env_kwargs(config, item), **({"split": item.split} if item.split is not None else {})}


def _evaluation_task(config: CompareConfig, out: Path, run: RunPlan, item: EvalSetting) -> EvalTask:
    return EvalTask(
        model=str(final_model(run)),
        env_id=config.train.env_id,
        setting=item.setting,
        modality=config.modality,
        split=item.split,
        episodes=config.eval_episodes(item.setting),
        seed=config.compare.eval_seed,
        env_kwargs=_extra_env_kwargs(config, item),
        num_envs=config.compare.eval_envs,
        max_new_tokens=config.train.max_new_tokens,
        dtype=config.compare.eval_dtype,
        device=config.train.device,
        path=record_path(out, run, item),
    )


def record_is_current(task: EvalTask, out: Path) -> bool:
    """Whether `task`'s record exists and is of this checkpoint, written after it, with these settings."""
    if not task.path.is_file():
        return False
    try:
        record = load_record(resolve_inside(out, task.path, what="--out"))  # a link elsewhere is not this grid's record
    except ValueError as error:
        log.warning("%s does not read (%s); evaluating again", task.path, error)
        return False
    model = Path(task.model)
    relative = model.relative_to(out).parts if model.is_relative_to(out) else model.parts
    trained = (model.parent / "trainer_state.json").stat().st_mtime
    decoding = record.decoding or {}
    return (
        Path(record.model).parts[-len(relative) :] == relative
        and task.path.stat().st_mtime >= trained
        and record.episodes == task.episodes
        and record.seeds == tuple(range(task.seed, task.seed + task.episodes))
        and (task.split is None or record.split == task.split)
        and record.setting == paper_setting(task.env_id, task.setting, task.modality)[0]
        and decoding.get("greedy") is True
        and decoding.get("max_new_tokens") == task.max_new_tokens
        and decoding.get("dtype") == task.dtype
    )


def _train_run(config: TrainConfig, progress: bool) -> float:
    """Train (or resume) one run to ``config.steps``; returns the seconds it took."""
    from amft_vlm.learning import trainer as trainer_module  # accelerate loads only when a run trains

    started = time.perf_counter()
    trainer = trainer_module.Trainer(config, resume=True, progress=progress)
    try:
        trainer.train()
    finally:
        trainer.close()
    return time.perf_counter() - started


def _evaluate_run(task: EvalTask) -> Path:
    """Play one evaluation and write its record; returns the record's path."""
    record = evaluate(
        env_id=task.env_id,
        setting=task.setting,
        modality=task.modality,
        split=task.split,
        episodes=task.episodes,
        seed=task.seed,
        model=task.model,
        env_kwargs=task.env_kwargs,
        num_envs=task.num_envs,
        max_new_tokens=task.max_new_tokens,
        dtype=task.dtype,
        device=task.device,
        progress=False,
    )
    write_record(record, task.path)
    return task.path


def _config_dict(config: CompareConfig) -> dict[str, Any]:
    """The comparison's settings as plain data (``OUT/compare.json``)."""
    return {"train": dataclasses.asdict(config.train), "compare": dataclasses.asdict(config.compare), "source": str(config.source)}

