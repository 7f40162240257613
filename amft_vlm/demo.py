"""The demo: the whole toolkit end to end on a CPU in minutes, nothing downloaded (``amft-vlm demo``).

`run_demo` does, in one output directory:

1. **Model**: builds a tiny Qwen2-VL (the real architecture and classes, a locally trained
   tokenizer; `DemoSettings` gives the sizes) into ``OUT/initial-model``; every run starts from it.
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
   PNG plots), and ``OUT/demo.md`` with the table `run_demo` prints.

``OUT`` must be empty or absent; with ``force=True`` (``--force``) the demo's own entries in it are
replaced and nothing else is touched.

The torch thread count is chosen from the machine's load unless given: on a shared machine one
busy core makes two threads much slower than one (`choose_threads`, `busy_cores`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from agents.baselines import ExpertAgent, baseline_agent
from agents.tiny import build_tiny_model
from amft_vlm.checkpoint import latest_checkpoint
from amft_vlm.config import ControllerConfig, TrainConfig
from amft_vlm.evaluate import EvalRecord, evaluate, write_record
from amft_vlm.expert_data import collect
from amft_vlm.report import FIGURES, load_run, write_report

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

TRAIN_ENV = {"modality": "language", "split": "train"}
VALIDATION_ENV = {"modality": "language", "split": "val"}


@dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo; `FULL` finishes in under 10 minutes on 2 free CPU cores (see the README).

    Calibration (SFT alone, greedy success on training hands): 1000 expert episodes, 600 steps of 32,
    lr 2e-3: 48%; 300 episodes, 400 x 32, lr 2e-3: 62%; 300 episodes, 500 x 32, lr 3e-3: 97% (2026-11-23);
    300 episodes, 400 x 32, lr 3e-3: 48%; 350 x 48, lr 3e-3: 82%; 350 x 48, lr 4e-3: 89% (2026-11-30).
    The last is the demo's: 500 x 32 leaves no room for AMFT's controller to run a quarter of the steps
    within 10 minutes (a controller step, with its 8 rollouts of up to 6 answers, costs about 2.8 s
    against 0.36 s for an SFT step of 48 dialogues).
    """

    hidden_size: int = 128
    """Text hidden size of the tiny Qwen2-VL."""
    num_layers: int = 4
    """Text decoder layers."""
    intermediate_size: int = 384
    """Text MLP size."""
    vocab_size: int = 1024
    """Tokenizer vocabulary, trained on the environments' text: a GeneralPoints prompt is about 250 tokens
    (about 350 with the tests' 512). With the sizes above: about 1.05M text parameters."""
    rope_theta: float = 1e4
    """Rotary base; with Qwen's 1e6 the tiny model learns to copy the cards more slowly."""
    expert_episodes: int = 300
    """Expert episodes (seeds 0..N-1) on training hands; the training-hands evaluation replays seeds
    0..eval_episodes-1, so it asks for hands the models were trained on."""
    steps: int = 350
    """Optimiser steps of each method."""
    sft_batch_size: int = 48
    """Expert dialogues per step."""
    learning_rate: float = 4e-3
    """Peak AdamW learning rate; cosine decay to 0 at ``steps``."""
    warmup_steps: int = 262
    """AMFT: steps of SFT only before the controller runs (shared with the SFT run); the controller and RL
    rollouts run for the last quarter of the steps."""
    episodes_per_step: int = 2
    """AMFT: start states of RL rollouts per step."""
    group_size: int = 4
    """AMFT: rollouts per start state (GRPO group)."""
    meta_interval: int = 8
    """AMFT: steps between meta-gradient estimates (11 in the demo's 88 controller steps)."""
    validation_states: int = 6
    """AMFT: validation start states (``split="val"``) per meta-gradient estimate."""
    validation_samples: int = 2
    """AMFT: episodes per validation start state."""
    mu_init: float = 0.8
    """AMFT: mu when the controller takes over."""
    eta_h: float = 0.01
    """AMFT: entropy step size; larger than the released 5e-4 so that, over the demo's 88 controller
    steps, the entropy term moves mu about as far as the meta term (with 0.05 the rollout entropy's
    fall below H*, ~0.1 nats, drove mu to mu_max within 40 steps on its own, 2026-11-30)."""
    eta_mu: float = 0.01
    """AMFT: meta step size on the standardized signal."""
    max_new_tokens: int = 60
    """Longest answer; the expert's longest GP-L answer is 55 tokens with the tiny tokenizer."""
    num_envs: int = 16
    """Environments played together in rollouts."""
    eval_envs: int = 100
    """Environments played together in evaluation (decoding a tiny model is latency-bound: 100 rows cost
    little more than 16, and one wave plays every episode)."""
    eval_episodes: int = 100
    """Episodes per evaluation (seeds 0..N-1); the papers use 234."""

    def train_config(
        self, method: str, *, model: str, expert_data: str, output_dir: str, seed: int = 0, warm_start: str | None = None
    ) -> TrainConfig:
        """The trainer's config for `method`: both methods share every budget knob (`WARM_START_FIELDS`).

        The SFT run also saves its checkpoint at ``warmup_steps``, where AMFT's warm-up ends.
        """
        return TrainConfig(
            method=method,
            model=model,
            device="cpu",
            env_kwargs=dict(TRAIN_ENV),
            validation_env_kwargs=dict(VALIDATION_ENV),
            expert_data=expert_data,
            steps=self.steps,
            episodes_per_step=self.episodes_per_step,
            group_size=self.group_size,
            sft_batch_size=self.sft_batch_size,
            num_envs=self.num_envs,
            max_new_tokens=self.max_new_tokens,
            learning_rate=self.learning_rate,
            lr_schedule="cosine",
            controller=ControllerConfig(
                mu_init=self.mu_init,
                eta_h=self.eta_h,
                eta_mu=self.eta_mu,
                warmup_steps=self.warmup_steps,
                meta_interval=self.meta_interval,
                validation_states=self.validation_states,
                validation_samples=self.validation_samples,
            ),
            output_dir=output_dir,
            save_every=self.warmup_steps if method == "sft" else self.steps,
            seed=seed,
            warm_start=warm_start,
        ).validate()


FULL = DemoSettings()
"""The settings of ``amft-vlm demo``."""

QUICK = DemoSettings(
    expert_episodes=32,
    steps=4,
    sft_batch_size=8,
    warmup_steps=2,
    episodes_per_step=2,
    group_size=2,
    meta_interval=1,
    validation_states=2,
    validation_samples=2,
    max_new_tokens=16,
    num_envs=4,
    eval_envs=4,
    eval_episodes=3,
)
"""A few steps and episodes: checks that every part runs (``--quick``; the test suite)."""


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` produced."""

    out_dir: Path
    table: str
    """The markdown table it printed (also in ``OUT/demo.md``)."""
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


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose a directory for --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; choose another --out or pass --force to replace the demo's files in it")
        for name in OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _evaluate_all(who: str, label: str, *, model: str | None, settings: DemoSettings, eval_dir: Path, file_prefix: str, progress: bool) -> dict[str, EvalRecord]:
    """Play the evaluations with a model (all) or the agent `who` (the greedy ones); write each to ``eval_dir/PREFIXNAME.json``."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for evaluation in EVALUATIONS:
        if model is None and evaluation.temperature is not None:
            continue
        record = evaluate(
            setting=evaluation.setting,
            split=evaluation.split,
            episodes=settings.eval_episodes,
            model=model,
            agent=baseline_agent(who, seed=0) if model is None else None,
            num_envs=settings.eval_envs,
            max_new_tokens=settings.max_new_tokens,
            temperature=evaluation.temperature,
            device="cpu",
            progress=progress,
        )
        record = dataclasses.replace(record, model=label)
        write_record(record, eval_dir / f"{file_prefix}{evaluation.name}.json")
        records[evaluation.name] = record
    return records


def _cell(record: EvalRecord | None, metric: str) -> str:
    value = record.metrics.get(metric) if record is not None else None
    return "—" if value is None else f"{100 * value.value:.1f} ± {100 * value.stderr:.1f}%"


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1), *("| " + " | ".join(row) + " |" for row in rows)]


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
    settings: DemoSettings,
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
    lines += _markdown(["", *(e.title for e in EVALUATIONS), "training time"], rows)

    changed = [
        [row, *(_cell(by_name.get(name), metric) for metric in ("retry_success", "valid_formula_rate") for name in ("train", "test"))]
        for row, by_name in records.items()
    ]
    lines += ["", "What the answers look like (greedy): success after a failed first answer, among episodes with one; "
              "answers whose formula the verifier could read and check against the cards, among all answers.", ""]
    lines += _markdown(["", "retry success, training hands", "retry success, held-out", "valid formula, training hands", "valid formula, held-out"], changed)
    if budgets:
        lines += ["", "Budget each run consumed (counted by the trainer; validation episodes are AMFT's meta-gradient).", ""]
        lines += _markdown(["", *(title for _, title in BUDGET)], [[row, *(f"{budget.get(key, 0):,}" for key, _ in BUDGET)] for row, budget in budgets.items()])
    lines += [
        "",
        f"{settings.eval_episodes} episodes per column (seeds 0..{settings.eval_episodes - 1}; the papers use 234); ± is the standard "
        f"error; — where it does not apply (an agent does not sample; no episode failed its first answer). Both methods: "
        f"{settings.steps} steps, {settings.sft_batch_size} expert dialogues per step, AdamW lr {settings.learning_rate:g} with cosine "
        f"decay; AMFT: the first {settings.warmup_steps} steps are SFT's, then {settings.episodes_per_step}x{settings.group_size} RL "
        f"rollouts per step and a meta-gradient every {settings.meta_interval} steps on {settings.validation_states}x"
        f"{settings.validation_samples} validation episodes (split val).",
    ]
    return "\n".join(lines)


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    *,
    steps: int | None = None,
    threads: int | None = None,
    quick: bool = False,
    force: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> DemoResult:
    """Run the demo (see the module docstring) into `out_dir`, print its table and where the files are.

    Args:
        out_dir: output directory; must be empty or absent unless `force`.
        steps: optimiser steps of each method instead of the settings' (the AMFT warm-up keeps its
            share of the steps).
        threads: torch threads; None uses the cores other processes leave free (`choose_threads`).
        quick: a few steps and episodes (`QUICK`): checks that everything runs, learns nothing.
        force: replace the demo's own files in a non-empty `out_dir`.
        progress: show progress bars.
        seed: seed of the model's weights and of training.
    """
    settings = QUICK if quick else FULL
    if steps is not None:
        if steps < 2:
            raise ValueError(f"steps must be at least 2 (AMFT needs a warm-up step and a controller step); got {steps}")
        warmup = min(steps - 1, max(1, round(settings.warmup_steps * steps / settings.steps)))  # keeps the last quarter for the controller
        settings = dataclasses.replace(settings, steps=steps, warmup_steps=warmup)
    thread_count = choose_threads(threads)
    out = Path(out_dir)
    _prepare(out, force)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(thread_count)
    print(f"amft-vlm demo: {thread_count} torch thread(s) on {os.cpu_count()} cores; output in {out}", flush=True)
    started = time.perf_counter()
    try:
        print("1/5 building the tiny Qwen2-VL and its tokenizer", flush=True)
        model = build_tiny_model(
            "qwen2-vl",
            out / "initial-model",
            seed=seed,
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            intermediate_size=settings.intermediate_size,
            vocab_size=settings.vocab_size,
            rope_theta=settings.rope_theta,
        )
        print(f"2/5 collecting {settings.expert_episodes} expert episodes on GeneralPoints (language, split=train)", flush=True)
        collect("GeneralPoints-v0", dict(TRAIN_ENV), ExpertAgent(), episodes=settings.expert_episodes, seed=seed, out_dir=out / "expert", progress=progress)

        from amft_vlm.trainer import Trainer  # loads accelerate: only once the cheap steps have run

        records: dict[str, dict[str, EvalRecord]] = {}
        train_seconds: dict[str, float] = {}
        warm_start = out / "sft" / "checkpoints" / f"step-{settings.warmup_steps:06d}"
        for method in METHODS:
            own = settings.steps - (settings.warmup_steps if method == "amft" else 0)
            print(f"3/5 training {method}: {own} steps" + (f" after sft's first {settings.warmup_steps}" if method == "amft" else ""), flush=True)
            config = settings.train_config(
                method,
                model=str(model),
                expert_data=str(out / "expert"),
                output_dir=str(out / method),
                seed=seed,
                warm_start=str(warm_start) if method == "amft" else None,
            )
            method_started = time.perf_counter()
            Trainer(config, progress=progress).train()
            train_seconds[method] = time.perf_counter() - method_started
        shared_seconds = sum(m["step_time"] for m in load_run(out / "sft").records if m["step"] <= settings.warmup_steps)
        modes = "greedy and sampled (T=1)"
        print(f"4/5 evaluating: {settings.eval_episodes} episodes per setting, {modes}", flush=True)
        for who in ("expert", "random"):
            eval_dir = out / "baselines" / "eval"
            records[who] = _evaluate_all(who, who, model=None, settings=settings, eval_dir=eval_dir, file_prefix=f"{who}-", progress=progress)
        budgets = {}
        for method in METHODS:
            checkpoint = latest_checkpoint(out / method / "checkpoints")
            if checkpoint is None:
                raise RuntimeError(f"training {method} wrote no checkpoint under {out / method / 'checkpoints'}")
            label = f"{method} (step {settings.steps})"
            records[method] = _evaluate_all(method, label, model=str(checkpoint / "policy"), settings=settings, eval_dir=out / method / "eval", file_prefix="", progress=progress)
            last = load_run(out / method).records[-1]
            budgets[method] = {key: int(last.get(key) or 0) for key, _ in BUDGET}

        print("5/5 writing the report", flush=True)
        baseline_records = sorted((out / "baselines" / "eval").glob("*.json"))
        report = write_report([out / method for method in METHODS], out / "report", eval_files=baseline_records)
        table = demo_table(records, train_seconds, settings, budgets, shared_seconds)
        (out / "demo.md").write_text("# amft-vlm demo\n\n" + table + "\n")
    finally:
        torch.set_num_threads(previous_threads)
    wall = time.perf_counter() - started
    plots = [report.parent / f"{figure.name}.png" for figure in FIGURES if (report.parent / f"{figure.name}.png").is_file()]
    print()
    print(table)
    print()
    print(f"Done in {wall / 60:.1f} min. Table: {out / 'demo.md'}; report: {report}; plots: {', '.join(str(p) for p in plots)}")
    print(f"Runs (metrics.jsonl, checkpoints, eval records): {', '.join(str(out / m) for m in METHODS)}")
    return DemoResult(out, table, records, report, train_seconds, wall, thread_count)
