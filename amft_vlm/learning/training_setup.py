"""What the trainer builds before its loop and keeps between runs: the run directory it claims and the checkpoint it
starts from (`claim_output_dir`), the policy as it trains, the optimisers with their schedule, the critic, the
expert set, and what a checkpoint holds besides the weights (`save_run`, `restore_run`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from agents.baselines import ExpertAgent
from agents.policy import ChatEncoder, VLMPolicy
from amft_vlm.learning.checkpoint import (
    RELIFT_OPTIMIZER,
    RNG_FILE,
    load_optimizer_state,
    load_state_file,
    load_trainer_state,
    restore_rng_states,
    resumable_checkpoint,
    save_checkpoint,
)
from amft_vlm.learning.critic import Critic
from amft_vlm.learning.distributed import Parallel
from amft_vlm.learning.lora import apply_lora, load_lora, lora_parameters
from amft_vlm.learning.resume import check_resume_settings, warm_start_checkpoint
from amft_vlm.rollout.engine import RolloutEngine
from amft_vlm.rollout.sft_data import load_sft_trajectories
from amft_vlm.rollout.trajectory import Trajectory
from amft_vlm.run.budget import Budget
from amft_vlm.run.config import TrainConfig, config_to_dict
from amft_vlm.run.run_directory import DirectoryLock, start_new_run

log = logging.getLogger(__name__)


class RunState(Protocol):
    """What a checkpoint saves and restores of a training run (`amft_vlm.learning.trainer.Trainer` is one): the weights and
    optimisers, and the loop's own position (step, expert draws, controller, budget, ReLIFT's buffer)."""

    config: TrainConfig
    accelerator: Accelerator
    policy: VLMPolicy
    base_model: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    critic: Critic | None
    controller: Any
    budget: Budget
    collector: Any
    checkpoints: Path
    start_step: int
    relift: Any
    relift_optimizer: torch.optim.Optimizer | None
    relift_sft_updates: int

EXPERT_SEED_BASE = 1 << 29
"""Seeds of the episodes the oracle expert plays for the expert set (never a training or validation seed)."""
UNSUPPORTED_DISTRIBUTED = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
"""accelerate set-ups the trainer refuses (FSDP is mapped to its own fully_shard, `amft_vlm.learning.distributed`)."""


def build_accelerator(config: TrainConfig) -> Accelerator:
    """The run's accelerate ``Accelerator``: processes, device and trackers, refusing the set-ups the trainer does not support.

    Mixed precision is the policy's own autocast (`VLMPolicy.autocast_dtype`): the model is not handed to
    accelerate, whose mixed_precision would only add a grad scaler to an optimiser stepped outside it.
    """
    accelerator = Accelerator(mixed_precision="no", log_with=config.report_to or None, project_dir=str(config.output_dir), cpu=config.device == "cpu")
    if accelerator.distributed_type in UNSUPPORTED_DISTRIBUTED:
        raise ValueError(
            f"accelerate is configured for {accelerator.distributed_type.value}, which the trainer does not "
            "support; use an accelerate config for several processes (DDP) or FSDP (configs/accelerate/), or torchrun"
        )
    return accelerator


def decided_by_main_process(accelerator: Accelerator, decide: Callable[[], Any]) -> Any:
    """`decide()` run on the main process only and its result (or the error it raised) sent to every process,
    so that all go on with the same answer, or all stop with the same message."""
    outcome: list = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [decide(), None]
        except Exception as error:  # sent on, so that no process waits for an answer that never comes
            outcome = [None, error]
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def claim_output_dir(config: TrainConfig, *, resume: bool, overwrite: bool) -> tuple[DirectoryLock, Path | None, bool]:
    """(Main process.) Lock ``output_dir`` against other writers and, unless resuming, make way for a new run there
    (`start_new_run`: a run already there is refused, or deleted with `overwrite`). Returns the lock, the checkpoint
    to start from and whether it is a warm start: with `resume` the run's newest usable one (`resumable_checkpoint`)
    if its settings may continue it (`check_resume_settings`), else ``warm_start``'s, else none."""
    output_dir = Path(config.output_dir)
    lock = DirectoryLock(output_dir, what="output_dir")
    try:
        if not resume:
            start_new_run(output_dir, overwrite=overwrite)
        checkpoints = output_dir / "checkpoints"
        if resume:
            checkpoint = resumable_checkpoint(checkpoints)
            if checkpoint is not None:
                done = load_trainer_state(checkpoint)["step"]
                check_resume_settings(config, output_dir / "config.yaml", done)
                if done == config.steps:
                    log.info("%s is at step %d of %d: nothing left to train", checkpoint, done, config.steps)
                return lock, checkpoint, False
        if config.warm_start is not None:
            return lock, warm_start_checkpoint(config), True
        return lock, None, False
    except BaseException:
        lock.release()
        raise


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


def build_critic(config: TrainConfig, policy: VLMPolicy, *, device: torch.device | str) -> Critic:
    """The value head of ``advantage: ppo`` on `policy`'s text hidden size, with its own AdamW."""
    hidden_size = policy.model.config.get_text_config().hidden_size
    return Critic(hidden_size, learning_rate=config.value_learning_rate, clip_epsilon=config.clip_epsilon, device=device)


def load_expert_set(config: TrainConfig, dataset: str | None, encoder: ChatEncoder, engine: RolloutEngine, *, progress: bool) -> list[Trajectory]:
    """The expert set of `dataset` (None: ``expert_episodes`` collected with the oracle expert on `engine`, its
    successes kept), its images kept prepared if they fit in ``image_cache_mb`` (else prepared per draw)."""
    if dataset is not None:
        expert = load_sft_trajectories(dataset, encoder)
    else:
        seeds = [EXPERT_SEED_BASE + i for i in range(config.expert_episodes)]
        trajectories, _ = engine.collect(seeds, responder=ExpertAgent(), progress=progress)
        expert = [t for t in trajectories if t.success]
        if not expert:
            raise ValueError(f"the expert solved none of {config.expert_episodes} episodes of {config.env_id} {config.env_kwargs}: SFT has nothing to imitate")
    prepared = sum(t.image_input_bytes for t in expert)
    if prepared > config.image_cache_mb * 2**20:
        log.warning(
            "the expert set's prepared images take %.0f MB, more than image_cache_mb=%d: keeping uint8 images "
            "and preparing each SFT batch's images once per draw", prepared / 2**20, config.image_cache_mb,
        )  # fmt: skip
        expert = [t.without_image_inputs() for t in expert]
    return expert


def tracker_config(config: TrainConfig) -> dict:
    """The config flattened for the trackers: scalar settings, nested sections' as ``section.key``."""
    flat = {}
    for key, value in config_to_dict(config).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, int | float | str | bool)})
        elif isinstance(value, int | float | str | bool):
            flat[key] = value
    return flat


def save_run(trainer: RunState, step: int) -> Path | None:
    """Write `trainer`'s checkpoint ``step``: the weights, optimisers and schedule, and the loop's own state (the
    step, the SFT position, the controller, the budget, ReLIFT's buffer), every process taking part."""
    trainer.accelerator.wait_for_everyone()
    relift = trainer.relift
    state = {
        "step": step,
        "sft_position": trainer.collector.sft_position,
        "controller": trainer.controller.state_dict() if trainer.controller else None,
        "budget": asdict(trainer.budget),
        "relift_buffer": list(relift.items) if relift is not None else None,
        "relift_sft_updates": trainer.relift_sft_updates,
    }
    # ReLIFT's optimiser once it has stepped: saving an unstepped one would initialise its state (a zero step).
    relift_optimizer = {RELIFT_OPTIMIZER: trainer.relift_optimizer} if trainer.relift_sft_updates else {}
    return save_checkpoint(
        trainer.checkpoints, step, policy=trainer.policy, optimizer=trainer.optimizer, scheduler=trainer.scheduler, trainer_state=state,
        extra={"critic": trainer.critic.state_dict()} if trainer.critic is not None else {}, extra_optimizers=relift_optimizer,
        lora_base_model=trainer.base_model if trainer.config.lora_rank else None, is_main=trainer.accelerator.is_main_process,
    )  # fmt: skip


def restore_run(trainer: RunState, checkpoint: Path) -> int:
    """Load everything but the weights from `checkpoint` (checked by `amft_vlm.learning.checkpoint.check_checkpoint`) into
    `trainer`; returns the expert examples drawn so far (where the next SFT batch starts)."""
    state = load_trainer_state(checkpoint)
    trainer.start_step = state["step"]
    trainer.budget = Budget(**state.get("budget", {}))
    if trainer.relift is not None:
        trainer.relift.items = list(state.get("relift_buffer") or [])
        trainer.relift_sft_updates = state.get("relift_sft_updates", 0)
    load_optimizer_state(checkpoint, trainer.policy, trainer.optimizer)
    if trainer.relift_sft_updates:
        load_optimizer_state(checkpoint, trainer.policy, trainer.relift_optimizer, name=RELIFT_OPTIMIZER)
    trainer.scheduler.load_state_dict(load_state_file(checkpoint / "scheduler.pt"))
    if trainer.controller is not None and state["controller"] is not None:
        trainer.controller.load_state_dict(state["controller"])
    if trainer.critic is not None and (checkpoint / "critic.pt").is_file():  # an SFT run's checkpoint has none
        trainer.critic.load_state_dict(load_state_file(checkpoint / "critic.pt"))
    restore_rng_states(load_state_file(checkpoint / RNG_FILE))
    log.info("resumed from %s at step %d", checkpoint, trainer.start_step)
    return state["sft_position"]
