"""Peak memory of a training step in bytes per trainable parameter (Qwen2.5-VL architecture, ~150M parameters, CPU)

A random-init Qwen2.5-VL-architecture checkpoint (`agents.tiny.build_tiny_model`: 12 decoder layers of
width 1024, MLP 2816, a 4-block vision tower, float32; about 140M parameters, almost all trainable) takes
one training step of each kind: a plain SFT step (4 expert answers: the baseline), an RL step (2 start
states x 2 rollouts of up to 16 tokens), an AMFT step without and with the meta-gradient (both losses,
and on the meta step 2 validation start states x 2 episodes, a backward pass per state and the
derivative of the update in mu). The task is the test suite's one-turn vowel bandit
(`tests/amft_vlm/bandit.py`, with a constant "aeiou" expert): its rewards vary even for a random model,
so the meta step really scores its validation episodes (on GeneralPoints a random model ties every
validation return and the meta step skips that backward pass), and its short answers keep activations
small, so the figure is what a step keeps per parameter. Every step runs with gradient checkpointing and one trajectory per
micro-batch, as a 3B-7B run would, so that the figure measures what a step keeps per parameter rather
than the activations of a batch (without them, the RL scoring of four 6-turn episodes alone held 18
bytes per parameter of activations in this model). Each step runs in a fresh process: the resident
memory is sampled every millisecond during the step, and its peak minus the process's memory before
the model was loaded, divided by the trainable parameters, is the figure. It covers everything a step
holds: weights, gradients, AdamW's two moments (allocated at the first step) and its temporaries,
activations, the rollouts' key-value caches and the allocator's slack. A plain trainer needs weights +
gradients + two moments = 16 bytes per float32 parameter before activations; AMFT holds one more
parameter-sized buffer (g_SFT while g_RL is computed, then g_SFT - g_RL, then d theta'/d mu), so 20.
The target is AMFT's meta step at most 1.5x the SFT step.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import Measurement

log = logging.getLogger(__name__)

MODEL = {"hidden_size": 1024, "num_layers": 12, "num_heads": 16, "num_kv_heads": 4, "intermediate_size": 2816, "vision_embed_dim": 256, "vision_depth": 4, "vision_num_heads": 4}
"""Sizes of the benchmark's model (about 150M parameters with the 1024-entry tokenizer)."""
STEPS = {
    "sft": ["method=sft"],
    "rl": ["method=rl"],
    "amft": ["method=no-warmup", "controller.meta_interval=1000"],
    "amft-meta": ["method=no-warmup", "controller.meta_interval=1"],
}
"""The measured step kinds and their trainer settings (the controller from the first step, so step 1 is the one measured)."""
BANDIT = "tests.amft_vlm.bandit:VowelBandit-v0"
COMMON = [
    f"env_id={BANDIT}", "env_kwargs={}", "validation_env_kwargs={}", "steps=1", "sft_batch_size=4", "expert_episodes=8", "episodes_per_step=2", "group_size=2", "num_envs=4",
    "max_new_tokens=16", "learning_rate=1e-5", "save_every=1000", "device=cpu", "controller.validation_states=2",
    "controller.validation_samples=2", "controller.target_entropy_steps=1", "gradient_checkpointing=true",
    "gradient_accumulation_steps=4",
]
TARGET_RATIO = 1.5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(kind: str, model_dir: str, output_dir: str) -> dict:
    """In this process: load the trainer, run its one step while sampling the resident memory; the figures as a dict."""
    from amft_vlm.learning.trainer import Trainer
    from amft_vlm.rollout.expert_data import collect
    from amft_vlm.run.config import load_config
    from tests.amft_vlm import bandit

    expert = Path(output_dir) / "expert"
    collect(bandit.ENV_ID, {}, bandit.ConstantAgent("aeiou eioua"), episodes=8, seed=0, out_dir=expert, progress=False)
    before = _rss_bytes()  # imports done, no model yet
    overrides = [*COMMON, *STEPS[kind], f"model={model_dir}", f"output_dir={output_dir}", f"expert_data={expert}"]
    trainer = Trainer(load_config(overrides=overrides), progress=False)
    parameters = sum(p.numel() for p in trainer.parameters)
    peak, running = [_rss_bytes()], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    (metrics,) = trainer.train()
    running[0] = False
    sampler.join()
    if kind == "amft-meta" and metrics.get("meta_dU_dmu") is None:
        raise RuntimeError("the amft-meta step scored no validation episode (all returns tied)")
    return {"kind": kind, "bytes_per_parameter": (peak[0] - before) / parameters, "parameters": parameters, "seconds": time.perf_counter() - started}


def run() -> list[Measurement]:
    """Bytes per trainable parameter at the peak of each step kind, against the plain SFT step."""
    from agents.tiny import build_tiny_model

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_tiny_model("qwen2.5-vl", Path(scratch) / "model", seed=0, **MODEL)
        for kind in STEPS:
            command = [sys.executable, "-m", "benchmarks.bench_memory", kind, str(model_dir), str(Path(scratch) / kind)]
            output = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if output.returncode != 0:
                raise RuntimeError(f"measuring {kind} failed:\n{output.stderr[-3000:]}")
            results[kind] = json.loads(output.stdout.strip().splitlines()[-1])
            log.info("%s: %.1f bytes per parameter (%d parameters, %.1f s)", kind, results[kind]["bytes_per_parameter"], results[kind]["parameters"], results[kind]["seconds"])
    sft = results["sft"]["bytes_per_parameter"]
    millions = results["sft"]["parameters"] / 1e6
    names = {"rl": "RL step (2x2 rollouts)", "amft": "AMFT step (both losses, no meta-gradient)", "amft-meta": "AMFT meta-gradient step (+ 2x2 validation episodes)"}
    measurements = []
    for kind, name in names.items():
        value = results[kind]["bytes_per_parameter"]
        meta = kind == "amft-meta"
        measurements.append(
            Measurement(
                name=f"{name}, peak memory, {millions:.0f}M parameters",
                value=value,
                unit="bytes/param",
                baseline_name="SFT step",
                baseline_value=sft,
                target=f"<= {TARGET_RATIO}x the SFT step" if meta else None,
                met=value <= TARGET_RATIO * sft if meta else None,
                lower_is_better=True,
            )
        )
    return measurements


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(_measure(*sys.argv[1:4])))
