"""Training step time (tiny Qwen2-VL on CPU, GeneralPoints-v0 language): sft, rl and amft

The real `Trainer` trains a tiny random Qwen2-VL checkpoint (`tiny:qwen2-vl`, float32, CPU) with
each method on the same batch: 4 start states x 4 rollouts per step (16 episodes, one wave of 16
environments) with up to 48 new tokens per response, and 32 expert dialogues per step for L_SFT.
``sft`` scores the expert batch only, ``rl`` collects and scores the rollouts only, ``amft`` does
both every step and, every 5 steps, the meta-gradient: the exact derivative of the real clipped AdamW
step with respect to mu (the look-ahead is the update itself: no parameters saved or restored), 4
validation start states (split val) x 2 samples played by the updated policy, and per start state one
backward pass of the leave-one-out policy gradient of their returns, dotted with that derivative. The controller
has no warm-up (``warmup_steps=0``), so every timed amft step mixes both losses and the timed steps
hold the meta-gradient at exactly its 1-in-5 rate.

Each method runs 12 steps; the first 2 warm the code paths up and are not timed, the other 10 (two
whole meta-gradient periods) are averaged. The three trainers take their steps in turn (sft, rl,
amft, sft, ...), each resuming where it stopped, so a change in the load of the shared machine hits
all three alike instead of whichever ran during it. A step's time is the trainer's own
``step_time``: the wall time from choosing mu to the optimiser update, which covers collection,
every forward and backward pass and the controller, and leaves out logging and checkpointing.
One-time set-up (model build, collecting the 64 oracle-expert episodes the SFT batches are drawn
from) happens in the trainer's constructor and is not timed, nor is the checkpoint each one-step
``train`` call ends with. The learning rate is the released 1e-6, so the policy does not change
enough in 12 steps to shorten its responses: all three methods roll out and score the same number of
tokens. Torch runs on one thread, as in the rollout benchmark. On the shared machine the absolute
times move by 10-30% from run to run; the ratios move less.

A start state whose validation returns all tie contributes exactly zero and is not scored; the random
tiny model fails every episode, but with different penalties, so most start states are scored here,
as they would be for a trained model.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path

import torch

from amft_vlm.learning.trainer import Trainer
from amft_vlm.run.config import ControllerConfig, TrainConfig
from benchmarks.common import Measurement

log = logging.getLogger(__name__)

WARMUP_STEPS = 2
"""Steps run first and not timed (first calls of generate, autograd and AdamW are slower)."""
TIMED_STEPS = 10
"""Steps averaged: a multiple of META_INTERVAL, so meta-gradient steps come at their true rate."""
META_INTERVAL = 5
METHODS = ("sft", "rl", "amft")
TARGET_RATIO = 1.3
"""amft may take at most this many times the step time of rl."""


def _config(method: str, output_dir: Path) -> TrainConfig:
    """The shared batch; only ``method`` differs between the runs."""
    return TrainConfig(
        method=method,
        model="tiny:qwen2-vl",
        device="cpu",
        env_id="GeneralPoints-v0",
        env_kwargs={"modality": "language", "split": "train"},
        validation_env_kwargs={"modality": "language", "split": "val"},
        expert_episodes=64,
        steps=WARMUP_STEPS + TIMED_STEPS,
        episodes_per_step=4,
        group_size=4,
        sft_batch_size=32,
        num_envs=16,
        max_new_tokens=48,
        learning_rate=1e-6,
        lr_schedule="constant",
        save_every=1000,
        seed=0,
        controller=ControllerConfig(warmup_steps=0, meta_interval=META_INTERVAL, validation_states=4, validation_samples=2),
        output_dir=str(output_dir / method),
    )


def _next_step(trainer: Trainer) -> dict:
    """Run the trainer's next step alone, as a resume from ``start_step`` would, and return its metrics."""
    trainer.config.steps = trainer.start_step + 1
    (metrics,) = trainer.train()
    trainer.start_step += 1
    return metrics


def _timed_steps(output_dir: Path) -> dict[str, list[dict]]:
    """Metrics of the timed steps of each method (set-up and warm-up steps excluded), steps taken in turn."""
    trainers = {method: Trainer(_config(method, output_dir), progress=False) for method in METHODS}
    history: dict[str, list[dict]] = {method: [] for method in METHODS}
    for _ in range(WARMUP_STEPS + TIMED_STEPS):
        for method, trainer in trainers.items():
            history[method].append(_next_step(trainer))
    timed = {method: steps[WARMUP_STEPS:] for method, steps in history.items()}
    for method, steps in timed.items():
        tokens = statistics.mean(m.get("tokens_sft", 0) + m.get("tokens_rl", 0) for m in steps)
        log.info("%s: %.3f s/step over %d steps, %.0f tokens scored per step", method, _mean_step_time(steps), len(steps), tokens)
    return timed


def _mean_step_time(steps: list[dict]) -> float:
    return statistics.mean(m["step_time"] for m in steps)


def run() -> list[Measurement]:
    """Seconds per training step of sft, rl and amft on the same batch; amft's meta-gradient steps apart."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as runs:
            steps = _timed_steps(Path(runs))
    finally:
        torch.set_num_threads(threads)
    seconds = {method: _mean_step_time(timed) for method, timed in steps.items()}
    meta_steps = [m for m in steps["amft"] if "meta_signal" in m]
    other_steps = [m for m in steps["amft"] if "meta_signal" not in m]
    if len(meta_steps) * META_INTERVAL != TIMED_STEPS:
        raise RuntimeError(f"expected {TIMED_STEPS // META_INTERVAL} meta-gradient steps among the timed amft steps; got {len(meta_steps)}")
    log.info("amft / rl = %.2fx (target <= %.1fx)", seconds["amft"] / seconds["rl"], TARGET_RATIO)
    batch = "16 rollouts + 32 expert dialogues"
    return [
        Measurement(
            name=f"amft, meta-gradient every {META_INTERVAL} steps, {batch}",
            value=seconds["amft"],
            unit="s/step",
            baseline_name="rl",
            baseline_value=seconds["rl"],
            target=f"<= {TARGET_RATIO}x rl's time (>= {1 / TARGET_RATIO:.2f}x)",
            met=seconds["amft"] <= TARGET_RATIO * seconds["rl"],
            lower_is_better=True,
        ),
        Measurement(
            name="sft, 32 expert dialogues",
            value=seconds["sft"],
            unit="s/step",
            baseline_name="rl",
            baseline_value=seconds["rl"],
            lower_is_better=True,
        ),
        Measurement(
            name="amft, meta-gradient steps only (4x2 validation episodes)",
            value=_mean_step_time(meta_steps),
            unit="s/step",
            baseline_name="amft, other steps",
            baseline_value=_mean_step_time(other_steps),
            lower_is_better=True,
        ),
    ]
