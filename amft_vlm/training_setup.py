"""What the trainer builds before its loop: the policy as it trains, and the optimiser with its schedule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from agents.policy import VLMPolicy
from amft_vlm.config import TrainConfig
from amft_vlm.distributed import Parallel
from amft_vlm.lora import apply_lora, load_lora, lora_parameters


def load_training_policy(
    config: TrainConfig, model_path: str, parallel: Parallel, *, device: str, lora_checkpoint: Path | None = None
) -> tuple[VLMPolicy, list[torch.Tensor]]:
    """The policy at `model_path` set up to train as `config` says, and the parameters it trains.

    In order: dtype, device and attention; bf16 autocast over the weights (``mixed_precision: bf16``);
    LoRA adapters (fresh, or `lora_checkpoint`'s) or a frozen vision tower; gradient checkpointing; the
    shared-prefix scoring shortcut (off where processes must make the same forward calls, and under
    checkpointing, which drops the cache it relies on); and the distributed strategy's wrap, after which
    the parameters are new objects.
    """
    policy = VLMPolicy.from_pretrained(
        model_path,
        dtype=config.dtype,
        device=device,
        attn_implementation=config.attn_implementation,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
    )
    if config.mixed_precision == "bf16":
        policy.autocast_dtype = torch.bfloat16
    if config.lora_rank:
        if lora_checkpoint is not None:
            load_lora(policy, lora_checkpoint)
        else:
            apply_lora(policy, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout)
    elif config.freeze_vision_tower:
        for parameter in policy.model.model.visual.parameters():
            parameter.requires_grad_(False)
    if config.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.share_prefix = not (parallel.sharded or config.gradient_checkpointing)
    parallel.wrap(policy.model)
    parameters = lora_parameters(policy) if config.lora_rank else [p for p in policy.model.parameters() if p.requires_grad]
    return policy, parameters


def build_optimizer(config: TrainConfig, parameters: Sequence[torch.Tensor], *, fused: bool) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """torch's AdamW over `parameters` and the learning-rate schedule (cosine or constant after warm-up).

    Updates go through torch's AdamW itself, not accelerate's wrapper: the loss is never scaled, and the
    look-ahead differentiates exactly this step. `fused` (CUDA) avoids the parameter-sized temporary of the
    default foreach kernel. The scheduler is not accelerate's either: its wrapper advances once per process,
    which assumes each process adds its own batch; here the global batch is fixed and sharded.
    """
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)
    return optimizer, _learning_rate_schedule(config, optimizer)


def _learning_rate_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    if config.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps)
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=config.lr_warmup_steps)


def learning_rate_factors(config: TrainConfig, count: int) -> list[float]:
    """The schedule's multiple of ``learning_rate`` at iterations 0 .. `count` - 1, as `build_optimizer` sets it up."""
    schedule = _learning_rate_schedule(config, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    return [schedule.lr_lambdas[0](step) for step in range(count)]
