"""The demo: the whole toolkit end to end on a CPU in minutes, nothing downloaded (``amft-vlm demo``).

`run_demo` does, in one output directory:

1. **Model**: builds a tiny Qwen2-VL (the real architecture and classes, a locally trained
   tokenizer; `DemoSettings` gives the sizes) into ``OUT/initial-model``; every run starts from it.
2. **Expert data**: the oracle expert plays GeneralPoints (language, ``split="train"``) and its
   dialogues are written to ``OUT/expert`` (the ``amft-vlm collect`` format); every run trains on it.
3. **Training** with the same budget (steps, SFT batch, learning rate and its cosine schedule):
   ``sft`` (SFT only) into ``OUT/sft`` and ``amft`` (SFT warm-up, then the mu controller with RL
   rollouts) into ``OUT/amft``. RL alone is left out: without an SFT start it does not learn this
   task (Chu et al. 2025), and its rollouts would not fit the budget.
4. **Evaluation**, greedy: each trained model on training hands (``id``, ``split=train``),
   held-out hands (``id``, ``split=test``) and the rule-OOD setting (J, Q, K = 11, 12, 13), plus the
   oracle expert and a random-text agent as sanity rows. Records go to ``RUN/eval/*.json``
   (``OUT/baselines/eval`` for the agents).
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
from amft_vlm.report import FIGURES, write_report

log = logging.getLogger(__name__)

METHODS = ("sft", "amft")
"""The trained methods, in the order of the table."""

EVALUATIONS = (
    ("train", "id", "train", "training hands"),
    ("test", "id", "test", "held-out hands"),
    ("ood-rule", "ood-rule", None, "rule OOD (J Q K = 11 12 13)"),
)
"""(record name, setting, split, column title) of each evaluation; rule OOD deals from all its hands."""

OUTPUTS = ("initial-model", "expert", "baselines", *METHODS, "report", "demo.md")
"""The entries `run_demo` writes under its output directory (what ``force`` replaces)."""

TRAIN_ENV = {"modality": "language", "split": "train"}
VALIDATION_ENV = {"modality": "language", "split": "val"}


@dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo; `FULL` finishes in about 7 minutes on 2 free CPU cores (2026-11-23).

    Calibration (SFT alone, success on training hands, 2026-11-23): 1000 expert episodes, 600 steps,
    lr 2e-3: 48%; 300 episodes, 400 steps, lr 2e-3: 62%; 300 episodes, 500 steps, lr 3e-3: 97%. More
    episodes hold more distinct hands to memorise; the tokenizer trained on the prompts and the shared
    prompt prefix (`agents.vlm_policy.VLMPolicy.token_logprobs`) make a step about 3x cheaper.
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
    steps: int = 500
    """Optimiser steps of each method."""
    sft_batch_size: int = 32
    """Expert dialogues per step."""
    learning_rate: float = 3e-3
    """Peak AdamW learning rate; cosine decay to 0 at ``steps``."""
    warmup_steps: int = 475
    """AMFT: steps of SFT only before the controller runs."""
    episodes_per_step: int = 2
    """AMFT: start states of RL rollouts per step."""
    group_size: int = 4
    """AMFT: rollouts per start state (GRPO group)."""
    meta_interval: int = 5
    """AMFT: steps between meta-gradient estimates."""
    validation_states: int = 8
    """AMFT: validation start states (``split="val"``) per meta-gradient estimate."""
    validation_samples: int = 2
    """AMFT: episodes per validation start state."""
    mu_init: float = 0.8
    """AMFT: mu when the controller takes over."""
    max_new_tokens: int = 60
    """Longest answer; the expert's longest GP-L answer is 55 tokens with the tiny tokenizer."""
    num_envs: int = 16
    """Environments played together in rollouts and evaluation."""
    eval_episodes: int = 100
    """Episodes per evaluation (seeds 0..N-1); the papers use 234."""

    def train_config(self, method: str, *, model: str, expert_data: str, output_dir: str, seed: int = 0) -> TrainConfig:
        """The trainer's config for `method`: both methods share every budget knob."""
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
                warmup_steps=self.warmup_steps,
                meta_interval=self.meta_interval,
                validation_states=self.validation_states,
                validation_samples=self.validation_samples,
            ),
            output_dir=output_dir,
            save_every=self.steps,
            seed=seed,
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
    """Training wall time per method."""
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
    """Play the three evaluations with a model or the agent `who`; write each record to ``eval_dir/PREFIXNAME.json``."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for name, setting, split, _ in EVALUATIONS:
        record = evaluate(
            setting=setting,
            split=split,
            episodes=settings.eval_episodes,
            model=model,
            agent=baseline_agent(who, seed=0) if model is None else None,
            num_envs=settings.num_envs,
            max_new_tokens=settings.max_new_tokens,
            device="cpu",
            progress=progress,
        )
        record = dataclasses.replace(record, model=label)
        write_record(record, eval_dir / f"{file_prefix}{name}.json")
        records[name] = record
    return records


def demo_table(records: dict[str, dict[str, EvalRecord]], train_seconds: dict[str, float], settings: DemoSettings) -> str:
    """The demo's markdown table: success within the attempts (± standard error) per row and evaluation."""
    header = ["", *(title for *_, title in EVALUATIONS), "answers with a readable formula", "training time"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row, by_name in records.items():
        cells = [row]
        for name, *_ in EVALUATIONS:
            metric = by_name[name].metrics["success_rate"]
            cells.append(f"{100 * metric.value:.1f} ± {100 * metric.stderr:.1f}%")
        # Over all evaluated answers of the row: the share the verifier could read a formula from.
        answers = [(r.verdict_shares, r.verdict_shares["missing_formula"].count) for r in by_name.values()]
        read = sum((1 - s["missing_formula"].value - s["out_of_attempts"].value) * n for s, n in answers)
        verified = sum((1 - s["out_of_attempts"].value) * n for s, n in answers)
        cells.append(f"{max(0.0, 100 * read / verified):.1f}%" if verified else "—")
        cells.append(f"{train_seconds[row]:.0f} s" if row in train_seconds else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Success: episodes solved within 5 attempts, greedy decoding, {settings.eval_episodes} episodes per column "
        f"(seeds 0..{settings.eval_episodes - 1}; the papers use 234); ± is the standard error. "
        f"Both methods: {settings.steps} steps, {settings.sft_batch_size} expert dialogues per step, AdamW lr "
        f"{settings.learning_rate:g} with cosine decay; AMFT: {settings.warmup_steps} warm-up steps of SFT, then "
        f"{settings.episodes_per_step}x{settings.group_size} RL rollouts per step and a meta-gradient every "
        f"{settings.meta_interval} steps.",
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
        warmup = min(steps - 1, max(1, round(settings.warmup_steps * steps / settings.steps)))
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
        for method in METHODS:
            print(f"3/5 training {method}: {settings.steps} steps", flush=True)
            config = settings.train_config(method, model=str(model), expert_data=str(out / "expert"), output_dir=str(out / method), seed=seed)
            method_started = time.perf_counter()
            Trainer(config, progress=progress).train()
            train_seconds[method] = time.perf_counter() - method_started
        print(f"4/5 evaluating: {settings.eval_episodes} greedy episodes per setting", flush=True)
        for who in ("expert", "random"):
            eval_dir = out / "baselines" / "eval"
            records[who] = _evaluate_all(who, who, model=None, settings=settings, eval_dir=eval_dir, file_prefix=f"{who}-", progress=progress)
        for method in METHODS:
            checkpoint = latest_checkpoint(out / method / "checkpoints")
            if checkpoint is None:
                raise RuntimeError(f"training {method} wrote no checkpoint under {out / method / 'checkpoints'}")
            label = f"{method} (step {settings.steps})"
            records[method] = _evaluate_all(method, label, model=str(checkpoint / "policy"), settings=settings, eval_dir=out / method / "eval", file_prefix="", progress=progress)

        print("5/5 writing the report", flush=True)
        baseline_records = sorted((out / "baselines" / "eval").glob("*.json"))
        report = write_report([out / method for method in METHODS], out / "report", eval_files=baseline_records)
        table = demo_table(records, train_seconds, settings)
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
