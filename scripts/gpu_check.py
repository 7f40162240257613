"""GPU check (``make gpu-check``): the toolkit at 3B size on one CUDA GPU, nothing downloaded.

1. Builds a random-init Qwen2.5-VL-architecture checkpoint at 3B size (36 decoder layers of width 2048,
   MLP 11008, a 32-block vision tower of width 1280; the project's small locally trained tokenizer, so the
   embeddings are small and the parameters sit in the layers: about 3.4B).
2. Plays GeneralPoints-VL (the card image, 16 episodes at once, sampling) with the batched rollout
   engine, with bf16 weights and as the trainer does (float32 weights, bf16 autocast): generated tokens/s.
3. Takes one training step each of SFT and RL on GeneralPoints-VL and of AMFT with a meta-gradient,
   through the real trainer: float32 master weights, bf16 autocast, gradient checkpointing; step time
   and peak GPU memory. The AMFT step plays the test suite's one-turn vowel bandit, whose rewards vary
   even for a random model, so its meta-gradient really scores validation episodes.

Prints a table and one JSON line with every figure; exits non-zero if any stage fails. ``--size tiny
--device cpu`` runs the same stages on a tiny model (the test suite does, so the script does not rot).
It needs torch, transformers, accelerate and the project's small pure-Python dependencies (gymnasium:
``make gpu-wheels`` downloads them to ``.gpu-wheels/`` for a machine without network).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "3b": {"hidden_size": 2048, "num_layers": 36, "num_heads": 16, "num_kv_heads": 2, "intermediate_size": 11008,
           "vision_embed_dim": 1280, "vision_depth": 32, "vision_num_heads": 16, "vocab_size": 1024, "initializer_range": 0.02},
    "tiny": {"hidden_size": 64, "num_layers": 2, "vocab_size": 512},
}
"""Model sizes: 3b for the GPU check, tiny for a dry run on a CPU."""
ENV = {"modality": "vision", "resolution": 448}
"""GeneralPoints-VL with a 448 px card table."""


def _peak_memory(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def rollout_speed(model_dir: Path, device: str, max_new_tokens: int, *, trainer_precision: bool) -> dict:
    """Generated tokens per second of a batched GeneralPoints-VL collection: bf16 weights, or (`trainer_precision`)
    float32 weights under bf16 autocast as in training."""
    from agents.policy import VLMPolicy
    from amft_vlm.rollout.engine import RolloutEngine

    _reset_memory(device)
    cuda = device.startswith("cuda")
    dtype = "bfloat16" if cuda and not trainer_precision else "float32"
    policy = VLMPolicy.from_pretrained(model_dir, dtype=dtype, device=device, max_pixels=448 * 448)
    if cuda and trainer_precision:
        policy.autocast_dtype = torch.bfloat16
    engine = RolloutEngine(policy, "GeneralPoints-v0", env_kwargs=ENV, num_envs=16, max_new_tokens=max_new_tokens)
    engine.collect(range(2), sampling_seed=0, progress=False)  # warm-up: kernels and allocator
    started = time.perf_counter()
    _, stats = engine.collect(range(16), sampling_seed=1, progress=False)
    seconds = time.perf_counter() - started
    del policy, engine
    return {"tokens_per_second": stats.response_tokens / seconds, "episodes": stats.episodes, "seconds": seconds, "peak_gib": _peak_memory(device)}


def training_step(method: str, model_dir: Path, out: Path, device: str, max_new_tokens: int) -> dict:
    """One step of `method` through the trainer: float32 masters, bf16 autocast (on a GPU), gradient checkpointing."""
    from amft_vlm.learning.trainer import Trainer
    from amft_vlm.run.config import ControllerConfig, TrainConfig

    _reset_memory(device)
    amft = method == "amft"
    task = {"env_id": "GeneralPoints-v0", "env_kwargs": {**ENV, "split": "train"}, "validation_env_kwargs": {**ENV, "split": "val"}}
    if amft:
        from amft_vlm.rollout.expert_data import collect
        from tests.amft_vlm import bandit

        expert = out / "bandit-expert"
        if not expert.exists():
            collect(bandit.ENV_ID, {}, bandit.ConstantAgent("aeiou eioua"), episodes=8, seed=0, out_dir=expert, progress=False)
        task = {"env_id": f"tests.amft_vlm.bandit:{bandit.ENV_ID}", "env_kwargs": {}, "validation_env_kwargs": {}, "expert_data": str(expert)}
    config = TrainConfig(
        method="no-warmup" if amft else method,
        model=str(model_dir),
        dtype="float32",
        mixed_precision="bf16" if device.startswith("cuda") else "no",
        gradient_checkpointing=True,
        device=device,
        max_pixels=448 * 448,
        **task,
        expert_episodes=8,
        steps=1,
        episodes_per_step=2,
        group_size=4,
        sft_batch_size=8,
        num_envs=8,
        max_new_tokens=max_new_tokens,
        learning_rate=1e-6,
        gradient_accumulation_steps=4,
        save_every=10**6,
        output_dir=str(out / method),
        controller=ControllerConfig(warmup_steps=0, meta_interval=1, validation_states=2, validation_samples=2, target_entropy_steps=1),
    )
    trainer = Trainer(config, progress=False)
    (metrics,) = trainer.train()
    if amft and metrics.get("meta_dU_dmu") is None:
        raise RuntimeError("the AMFT step scored no validation episode for its meta-gradient")
    del trainer
    return {"step_seconds": metrics["step_time"], "peak_gib": _peak_memory(device), "loss": metrics["loss"], "meta_dU_dmu": metrics.get("meta_dU_dmu")}


def main(argv: list[str] | None = None) -> int:
    """Run every stage; print the figures; 0 when all ran, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device", file=sys.stderr)
        return 1
    import accelerate
    import transformers

    from agents.tiny import build_tiny_model

    figures: dict = {
        "size": args.size,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        out = Path(args.out or scratch)
        try:
            started = time.perf_counter()
            model_dir = build_tiny_model("qwen2.5-vl", out / "model", seed=0, **SIZES[args.size])
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_dir)
            figures["build_seconds"] = time.perf_counter() - started
            figures["layers"] = config.get_text_config().num_hidden_layers
            figures["rollout"] = rollout_speed(model_dir, args.device, args.max_new_tokens, trainer_precision=False)
            figures["rollout_trainer_precision"] = rollout_speed(model_dir, args.device, args.max_new_tokens, trainer_precision=True)
            for method in ("sft", "rl", "amft"):
                figures[method] = training_step(method, model_dir, out, args.device, args.max_new_tokens)
        except Exception as error:  # noqa: BLE001 - report any failure as the check's result
            figures["error"] = f"{type(error).__name__}: {error}"
            print(json.dumps(figures))
            raise
    print(f"gpu-check ({args.size} on {figures['device']}, torch {torch.__version__}, transformers {figures['transformers']}): model built in {figures['build_seconds']:.0f} s")
    for key, label in (("rollout", "bf16 weights"), ("rollout_trainer_precision", "fp32 weights, bf16 autocast")):
        rollout = figures[key]
        print(f"  rollout, GeneralPoints-VL, 16 envs, {label}: {rollout['tokens_per_second']:.0f} generated tokens/s, peak {rollout['peak_gib']} GiB")
    precision = "fp32 masters, bf16 autocast" if args.device.startswith("cuda") else "fp32"
    for method in ("sft", "rl", "amft"):
        step = figures[method]
        print(f"  {method} step ({precision}, gradient checkpointing): {step['step_seconds']:.1f} s, peak {step['peak_gib']} GiB")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
