"""One trainer for AMFT and its baselines: the whole loop is `Trainer.train`, top to bottom.

Each training iteration (``steps`` of them):

1. **mu** for this iteration: the method's schedule (``sft`` 1, ``rl`` 0, ``fixed-mix``,
   ``scheduled-mix``, ``sft-then-rl``) or the AMFT controller (1 during warm-up).
2. **Collect**: an expert batch for ``L_SFT`` (if mu > 0) and, if mu < 1, fresh rollouts of the policy
   (``episodes_per_step`` start states x ``group_size``) with group-relative advantages
   (``advantage: grpo``) or GAE over turns from a critic (``advantage: ppo``, `amft_vlm.critic`).
3. **Update**: ``ppo_epochs`` passes over the batch in mini-batches (``mini_batch_size`` rollouts and an
   equal share of the expert batch), one optimiser update each: ``L_SFT`` and ``L_RL`` in separate
   backward passes (``g_SFT``, ``g_RL``; their cosine is logged), the mix ``(1 - mu) g_RL + mu g_SFT``,
   gradient-norm clipping and AdamW. With one pass and one mini-batch (the default) the PPO ratio is 1
   and the clip never acts; with more, it does.
4. **Controller** (AMFT, `amft_vlm.controller`): the entropy term every iteration (H and H* on the same
   tokens at the sampling temperature); every ``meta_interval`` iterations the meta-gradient: grad U on
   validation episodes (the ``val`` split) at the parameters the update landed on, along the exact
   derivative of the update with respect to mu.
5. **Log** to ``metrics.jsonl`` and the trackers, with the budget consumed so far (`Budget`: optimiser
   updates, environment episodes of training rollouts and of validation, expert examples, trained
   tokens), and **checkpoint** atomically every ``save_every`` iterations. The learning-rate schedule
   advances once per iteration.

The model is in training mode during the loss passes (so LoRA dropout acts there) and in eval mode
for sampling and scoring without gradient. Under ``accelerate launch`` or ``torchrun`` each process
collects its share of episodes; the strategy of `amft_vlm.distributed` (ddp or fsdp2) sums every
gradient across processes in its backward pass, so the separate ``g_SFT`` / ``g_RL`` passes stay exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from agents.baselines import ExpertAgent
from agents.tiny import resolve_model_spec
from agents.vlm_policy import VLMPolicy
from amft_vlm.checkpoint import (
    latest_checkpoint,
    load_optimizer_state,
    load_trainer_state,
    restore_rng_states,
    save_checkpoint,
)
from amft_vlm.config import CONTROLLER_METHODS, WARM_START_FIELDS, TrainConfig, config_to_dict, load_config
from amft_vlm.controller import (
    MetaEstimate,
    MuController,
    MuTangent,
    leave_one_out_advantages,
    mixed_adamw_step,
)
from amft_vlm.critic import ValueHead, credited_rewards, decision_states, gae_turn_advantages
from amft_vlm.distributed import Parallel, flat_dot
from amft_vlm.lora import apply_lora, load_lora, lora_parameters
from amft_vlm.losses import clipped_policy_loss, group_advantages, group_turn_advantages, sft_loss, value_loss
from amft_vlm.rollout import RolloutEngine
from amft_vlm.sft_data import load_sft_trajectories
from amft_vlm.trajectory import Trajectory

log = logging.getLogger(__name__)

UNSUPPORTED_DISTRIBUTED = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
"""accelerate set-ups the trainer refuses (FSDP is mapped to its own fully_shard, `amft_vlm.distributed`)."""
MIN_ROUNDS = 3
"""Fewest rounds of validation start states (one per process) the standardized meta signal takes its error over."""
VALIDATION_SEED_BASE = 1 << 30  # validation episodes never share seeds with training rollouts
EXPERT_SEED_BASE = 1 << 29


def method_mu(config: TrainConfig, step: int, controller: MuController | None) -> float:
    """The weight of ``L_SFT`` at ``step`` for the configured method."""
    method = config.method
    if method == "sft":
        return 1.0
    if method == "rl":
        return 0.0
    if method == "sft-then-rl":
        return 1.0 if step < round(config.sft_then_rl_switch * config.steps) else 0.0
    if method == "fixed-mix":
        return config.fixed_mu
    if method == "scheduled-mix":
        horizon = config.schedule_steps or config.steps
        progress = min(step / max(horizon, 1), 1.0)
        return config.schedule_mu_end + (config.schedule_mu_start - config.schedule_mu_end) * 0.5 * (1 + math.cos(math.pi * progress))
    return controller.mu_for_step(step)


def build_controller(config: TrainConfig) -> MuController | None:
    """The mu controller of AMFT and its ablations (None for the fixed baselines)."""
    if config.method not in CONTROLLER_METHODS:
        return None
    return MuController(
        config.controller,
        warmup_steps=0 if config.method == "no-warmup" else None,
        use_meta=config.method != "no-meta-gradient",
        use_entropy=config.method != "no-entropy",
    )


def warm_start_checkpoint(config: TrainConfig) -> Path:
    """``config.warm_start`` after checking that its first N iterations are this run's (see `TrainConfig.warm_start`)."""
    path = Path(config.warm_start)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"warm_start: {str(path)!r} is not a checkpoint; give a RUN/checkpoints/step-N directory written by the trainer")
    source_path = path.parent.parent / "config.yaml"
    if not source_path.is_file():
        raise ValueError(f"warm_start: {str(path)!r} has no {source_path.name} two levels up; give a checkpoint inside its run directory")
    source = load_config(source_path)
    step = int(load_trainer_state(path)["step"])
    differing = [name for name in WARM_START_FIELDS if getattr(source, name) != getattr(config, name)]
    if differing:
        details = "; ".join(f"{name}: {getattr(source, name)!r} there, {getattr(config, name)!r} here" for name in differing)
        raise ValueError(f"warm_start: {str(path)!r} comes from a run with other settings ({details}); its {step} iterations are not this run's")
    for who, run in (("its run", source), ("this run", config)):
        controller = build_controller(run)
        if any(method_mu(run, s, controller) != 1.0 for s in range(step)):
            raise ValueError(
                f"warm_start: {who} ({run.method}) is not pure SFT for the checkpoint's {step} iterations; warm-start from "
                f"an earlier step (an amft run needs controller.warmup_steps >= {step})"
            )
    return path


@dataclass
class Budget:
    """What a run has consumed so far, logged cumulatively every iteration so "same budget" can be checked."""

    updates: int = 0
    """Optimiser updates."""
    rollout_episodes: int = 0
    """Training episodes played by the policy."""
    validation_episodes: int = 0
    """Validation episodes played for the meta-gradient."""
    expert_examples: int = 0
    """Expert dialogues passed through L_SFT (a dialogue seen in two updates counts twice)."""
    trained_tokens: int = 0
    """Trainable tokens through a gradient pass of L_SFT or L_RL (again per update)."""

    def metrics(self) -> dict[str, int]:
        """The ``budget_*`` metrics; ``budget_env_episodes`` counts training rollouts and validation episodes."""
        return {
            "budget_updates": self.updates,
            "budget_env_episodes": self.rollout_episodes + self.validation_episodes,
            "budget_rollout_episodes": self.rollout_episodes,
            "budget_validation_episodes": self.validation_episodes,
            "budget_expert_examples": self.expert_examples,
            "budget_trained_tokens": self.trained_tokens,
        }


@dataclass
class RLBatch:
    """An iteration's rollouts with one advantage per turn (and, for ppo, the critic's inputs and targets)."""

    trajectories: list[Trajectory]
    turn_advantages: list[torch.Tensor]
    critic_features: list[torch.Tensor] | None = None
    """ppo: the decision states of each trajectory's turns (detached), read by the value head."""
    old_values: list[torch.Tensor] | None = None
    """ppo: the value head's estimates when the batch was collected (the value clip's anchor)."""
    value_targets: list[torch.Tensor] | None = None
    """ppo: GAE returns, the value head's regression targets."""


@dataclass
class TokenScores:
    """Teacher-forced scores of a batch of trajectories, flattened over their trainable tokens."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    episode_token_logprobs: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        """Trainable tokens in the batch."""
        return int(self.logprobs.numel())


def score_trajectories(
    policy: VLMPolicy,
    trajectories: list[Trajectory],
    *,
    temperature: float,
    turn_advantages: list[torch.Tensor] | None = None,
) -> TokenScores:
    """Log-probs and entropies of every trainable token (gradients flow), with per-token advantages.

    ``turn_advantages[i][t]`` is broadcast over the tokens of turn t of trajectory i.
    """
    sequences, positions, owners = [], [], []
    for index, trajectory in enumerate(trajectories):
        for segment, sequence in zip(trajectory.segments, trajectory.token_sequences(policy), strict=True):
            sequences.append(sequence)
            positions.append(segment.trainable_positions)
            owners.append((index, segment))
    logprobs, entropies = policy.token_logprobs(sequences, positions, temperature=temperature, with_entropy=True)
    old, advantages = [], []
    per_episode: list[list[torch.Tensor]] = [[] for _ in trajectories]
    turn_counter = [0] * len(trajectories)
    for (index, segment), segment_logprobs in zip(owners, logprobs, strict=True):
        old.append(segment.sampling_logprobs[segment.loss_mask.bool()].float())
        per_episode[index].append(segment_logprobs)
        if turn_advantages is not None:
            for start, end in segment.turn_spans:
                turn = turn_counter[index]
                trainable = int(segment.loss_mask[start:end].sum())
                advantages.append(turn_advantages[index][turn].expand(trainable))
                turn_counter[index] += 1
    flat = torch.cat(logprobs) if logprobs else torch.zeros(0)
    return TokenScores(
        logprobs=flat,
        entropy=torch.cat(entropies) if entropies else torch.zeros(0),
        old_logprobs=torch.cat(old).to(flat.device) if old else torch.zeros(0),
        advantages=torch.cat(advantages).to(flat.device) if advantages else torch.zeros_like(flat),
        episode_token_logprobs=[torch.cat(parts) if parts else torch.zeros(0) for parts in per_episode],
    )


class Trainer:
    """Trains a `VLMPolicy` with the configured method; see the module docstring for the loop."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, progress: bool = True) -> None:
        self.config = config.validate()
        self.progress = progress
        self.output_dir = Path(config.output_dir)
        self.checkpoints = self.output_dir / "checkpoints"
        # Mixed precision is the policy's own autocast (`VLMPolicy.autocast_dtype`): the model is not handed
        # to accelerate, whose mixed_precision would only add a grad scaler to an optimiser we step ourselves.
        self.accelerator = Accelerator(
            mixed_precision="no",
            log_with=config.report_to or None,
            project_dir=str(self.output_dir),
            cpu=config.device == "cpu",
        )
        if self.accelerator.distributed_type in UNSUPPORTED_DISTRIBUTED:
            raise ValueError(
                f"accelerate is configured for {self.accelerator.distributed_type.value}, which the trainer does not "
                "support; use an accelerate config for several processes (DDP) or FSDP (configs/accelerate/), or torchrun"
            )
        self.parallel = Parallel(config.distributed, self.accelerator)
        self._check_parallel_settings()
        set_seed(config.seed)
        self.start_step = 0
        self.sft_position = 0
        self.budget = Budget()
        checkpoint = latest_checkpoint(self.checkpoints) if resume else None
        if resume and checkpoint is None:
            log.info("no checkpoint under %s; starting from step 0", self.checkpoints)
        warm_start = checkpoint is None and config.warm_start is not None
        if warm_start:
            checkpoint = warm_start_checkpoint(config)
        # With LoRA the policy is always the base model plus adapters (fresh, or the checkpoint's).
        self.base_model = self._initial_model_path()
        model_path = str(checkpoint / "policy") if checkpoint and not config.lora_rank else self.base_model
        self.policy = VLMPolicy.from_pretrained(
            model_path,
            dtype=config.dtype,
            device=str(self.accelerator.device),
            attn_implementation=config.attn_implementation,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
        )
        if config.mixed_precision == "bf16":
            self.policy.autocast_dtype = torch.bfloat16
        if config.lora_rank:
            if checkpoint:
                load_lora(self.policy, checkpoint / "lora")
            else:
                apply_lora(self.policy, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout)
        elif config.freeze_vision_tower:
            for parameter in self.policy.model.model.visual.parameters():
                parameter.requires_grad_(False)
        if config.gradient_checkpointing:
            self.policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # The shared-prefix shortcut makes one or two forward calls depending on the batch: off where every
        # process must make the same calls, and where checkpointing drops the cache it relies on.
        self.policy.share_prefix = not (self.parallel.sharded or config.gradient_checkpointing)
        self.parallel.wrap(self.policy.model)  # parameters are new objects from here on
        self.parameters = lora_parameters(self.policy) if config.lora_rank else [p for p in self.policy.model.parameters() if p.requires_grad]
        # Updates go through torch's AdamW itself (not accelerate's wrapper): the loss is never scaled, and
        # the look-ahead differentiates exactly this step.
        # On CUDA the fused kernel: the default foreach one allocates a parameter-sized temporary.
        fused = self.accelerator.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)
        schedule = get_cosine_schedule_with_warmup if config.lr_schedule == "cosine" else get_constant_schedule_with_warmup
        schedule_kwargs = {"num_training_steps": config.steps} if config.lr_schedule == "cosine" else {}
        # The scheduler is not handed to accelerate either: its wrapper advances the schedule once per process,
        # which assumes each process adds its own batch; here the global batch is fixed and sharded.
        self.scheduler = schedule(self.optimizer, num_warmup_steps=config.lr_warmup_steps, **schedule_kwargs)
        self.critic, self.critic_optimizer = None, None
        if config.advantage == "ppo":
            hidden_size = self.policy.model.config.get_text_config().hidden_size
            self.critic = ValueHead(hidden_size).to(self.accelerator.device)
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=config.value_learning_rate)
        self.controller = build_controller(config)

        engine_kwargs = {"num_envs": config.num_envs, "temperature": config.temperature, "max_new_tokens": config.max_new_tokens}
        self.engine = RolloutEngine(self.policy, config.env_id, env_kwargs=config.env_kwargs, **engine_kwargs)
        self.validation_engine = RolloutEngine(self.policy, config.env_id, env_kwargs=config.validation_env_kwargs, **engine_kwargs)
        self.expert = self._expert_trajectories() if config.method != "rl" else []
        # A fixed probe of expert dialogues for entropy_source=expert: the first ones, the same at every step.
        self.entropy_probe = self.expert[: config.controller.entropy_probe_size] if self.controller else []

        if checkpoint is not None:
            self._restore(checkpoint)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
            self._keep_metrics(self.start_step, source=checkpoint.parent.parent if warm_start else self.output_dir)
        self.accelerator.init_trackers("amft-vlm", config=_flat_config(config))

    # ----------------------------------------------------------------------------------------------
    # The loop.

    def train(self) -> list[dict]:
        """Run from the current iteration to ``config.steps``; returns the metrics of the iterations run."""
        config, controller, history = self.config, self.controller, []
        bar = tqdm(range(self.start_step, config.steps), desc=f"train {config.method}", disable=not (self.progress and self.accelerator.is_main_process))
        for step in bar:
            started = time.perf_counter()
            mu = method_mu(config, step, controller)
            metrics: dict = {"step": step + 1, "mu": mu, "lr": self.scheduler.get_last_lr()[0]}
            controlled = controller is not None and not controller.in_warmup(step)

            # Collect: expert batch for L_SFT, on-policy rollouts (with advantages) for L_RL.
            # Whether a part exists is decided by mu (global); a process's share of it may be empty.
            sft_batch = self._next_sft_batch() if mu > 0 else None
            rollouts, rollout_stats = self._collect_rollouts(step) if mu < 1 else ([], None)
            rl_batch = self._rl_batch(rollouts) if mu < 1 else None
            if rollout_stats is not None:
                episodes, returns, successes, turns = self._global_sums(
                    [rollout_stats.episodes, rollout_stats.mean_return * rollout_stats.episodes, rollout_stats.successes, rollout_stats.mean_turns * rollout_stats.episodes]
                )
                metrics.update(reward=returns / episodes, success=successes / episodes, turns=turns / episodes)
            wants_entropy = controlled and controller.use_entropy
            probe_entropy = self._probe_entropy() if wants_entropy and config.controller.entropy_source == "expert" else None

            # Update: ppo_epochs x mini-batches of (g_SFT, g_RL) -> mix -> clip -> AdamW. On meta-gradient
            # iterations it also returns d theta'/d mu of the update(s).
            meta_step = controller is not None and controller.wants_meta_gradient(step)
            update_metrics, direction = self._update(step, mu, sft_batch, rl_batch, lookahead=meta_step)
            metrics.update(update_metrics)

            # Controller: H* at the first controller step, the entropy term every step, the meta term every k.
            if controlled:
                entropy = probe_entropy if config.controller.entropy_source == "expert" else update_metrics.get("entropy_rl")
                if controller.needs_target_entropy(step) and entropy is not None:
                    controller.observe_target_entropy(entropy)
                signal = None
                if meta_step:
                    estimate = self._meta_estimate(step, direction) if direction is not None else None
                    direction = None  # a parameter-sized buffer: free it before the next iteration
                    signal = estimate.signal(config.controller.meta_signal, config.controller.meta_clip) if estimate else None
                    metrics.update(
                        meta_signal=signal,
                        meta_dU_dmu=estimate.value if estimate else None,
                        meta_stderr=estimate.stderr if estimate else None,
                    )
                controller.update(entropy=entropy, meta_signal=signal)
                self.parallel.check_same(controller.state.mu, what="mu")
                metrics["entropy"] = entropy
            if controller is not None:
                state = controller.state
                metrics.update(
                    target_entropy=state.target_entropy,
                    entropy_term=state.last_entropy_term if controlled else 0.0,
                    meta_term=state.last_meta_term if controlled else 0.0,
                    skipped_signals=state.skipped_signals,
                    next_mu=state.mu,
                )
            self.scheduler.step()

            # Log and checkpoint.
            elapsed = time.perf_counter() - started
            tokens = metrics.get("tokens_sft", 0) + metrics.get("tokens_rl", 0)
            metrics.update(
                step_time=elapsed,
                tokens_per_second=tokens / elapsed if elapsed > 0 else 0.0,
                loss=mu * metrics.get("loss_sft", 0.0) + (1 - mu) * metrics.get("loss_rl", 0.0),
                **self.budget.metrics(),
            )
            self._log(metrics)
            history.append(metrics)
            bar.set_postfix(mu=f"{mu:.2f}", loss=f"{metrics['loss']:.3f}", reward=f"{metrics.get('reward', float('nan')):.2f}")
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                self.save(step + 1)
        self.accelerator.end_training()
        return history

    # ----------------------------------------------------------------------------------------------
    # Collecting.

    def _check_parallel_settings(self) -> None:
        """Batches that split evenly over the processes, and what the sharded strategies do not support yet."""
        config = self.config
        if not self.parallel.sharded:
            return
        if config.lora_rank:
            raise ValueError(
                f"LoRA trains on one process for now (distributed: {self.parallel.strategy} was chosen for "
                f"{self.parallel.world} processes); launch one process, or train all weights"
            )
        counts = {"sft_batch_size": config.sft_batch_size, "episodes_per_step": config.episodes_per_step}
        if config.method in CONTROLLER_METHODS:
            counts["controller.validation_states"] = config.controller.validation_states
        self.parallel.check_even(**counts)
        rounds = config.controller.validation_states // self.parallel.world
        if config.method in ("amft", "no-entropy", "no-warmup") and config.controller.meta_signal == "standardized" and rounds < MIN_ROUNDS:
            raise ValueError(
                f"controller.validation_states ({config.controller.validation_states}) gives {rounds} round(s) of one start state "
                f"per process on {self.parallel.world} processes; the standardized meta signal takes its standard error over "
                f"rounds and needs at least {MIN_ROUNDS}: set validation_states to {MIN_ROUNDS * self.parallel.world} or more, "
                "or controller.meta_signal: raw"
            )

    def _initial_model_path(self) -> str:
        with self.accelerator.main_process_first():  # one process builds a tiny model, the others load it
            return resolve_model_spec(self.config.model, self.output_dir / "initial-model", seed=self.config.seed)

    def _expert_trajectories(self) -> list[Trajectory]:
        config = self.config
        if config.expert_data is not None:
            return load_sft_trajectories(config.expert_data, self.policy)
        seeds = [EXPERT_SEED_BASE + i for i in range(config.expert_episodes)]
        trajectories, _ = self.engine.collect(seeds, responder=ExpertAgent(), progress=self.progress)
        return [t for t in trajectories if t.success]

    def _next_sft_batch(self) -> list[Trajectory]:
        """The next ``sft_batch_size`` expert trajectories: epoch-wise permutations seeded by (seed, epoch)."""
        size, count = self.config.sft_batch_size, len(self.expert)
        batch, orders = [], {}
        for position in range(self.sft_position, self.sft_position + size):
            epoch, offset = divmod(position, count)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.config.seed, epoch]).permutation(count)
            batch.append(self.expert[orders[epoch][offset]])
        self.sft_position += size
        return batch[self.accelerator.process_index :: self.accelerator.num_processes]

    def _collect_rollouts(self, step: int):
        config = self.config
        seeds = [config.seed * 1_000_003 + step * config.episodes_per_step + i for i in range(config.episodes_per_step)]
        shard = seeds[self.accelerator.process_index :: self.accelerator.num_processes]
        self.budget.rollout_episodes += config.episodes_per_step * config.group_size
        with self.parallel.full_weights():
            return self.engine.collect(shard, group_size=config.group_size, sampling_seed=_mix_seed(config.seed, step, 1), progress=False)

    def _rl_batch(self, rollouts: list[Trajectory]) -> RLBatch:
        """The rollouts with per-turn advantages: GRPO (episode or turn credit) or, with a critic, GAE."""
        config = self.config
        groups = [t.group for t in rollouts]
        if self.critic is not None:
            with self.parallel.full_weights():
                features = [states.to(self.accelerator.device) for states in decision_states(self.policy, rollouts)]
            with torch.no_grad():
                old_values = [self.critic(states) for states in features]
            rewards = [credited_rewards(t, config.credit).to(self.accelerator.device) for t in rollouts]
            advantages, targets = gae_turn_advantages(rewards, old_values, gamma=config.gamma, lam=config.gae_lambda)
            return RLBatch(rollouts, advantages, features, old_values, targets)
        if config.credit == "episode":
            per_episode = group_advantages(torch.tensor([t.episode_return for t in rollouts]), groups)
            return RLBatch(rollouts, [per_episode[i].expand(t.num_turns) for i, t in enumerate(rollouts)])
        return RLBatch(rollouts, group_turn_advantages([t.turn_rewards for t in rollouts], groups))

    # ----------------------------------------------------------------------------------------------
    # Updating.

    def _update(
        self, step: int, mu: float, sft_batch: list[Trajectory] | None, rl_batch: RLBatch | None, *, lookahead: bool
    ) -> tuple[dict, list[torch.Tensor] | None]:
        """``ppo_epochs`` passes over the iteration's batch in mini-batches, one optimiser update each.

        `sft_batch` and `rl_batch` are this process's shares (possibly empty) or None when the iteration
        has no such part (decided from mu, the same on every process, so every process makes the same
        collective calls). Returns the metrics (losses and diagnostics averaged over the updates;
        entropies and token counts summed over the first pass, whose first mini-batch is scored by the
        policy that collected the rollouts and later ones after the earlier updates) and, with
        `lookahead`, ``d theta'/d mu`` through all the updates (`MuTangent`; None when an update lacked
        g_SFT or g_RL).
        """
        config = self.config
        rollouts = rl_batch.trajectories if rl_batch is not None else []
        parts = self._mini_batch_count()
        tangent = MuTangent(config.controller.lookahead) if lookahead else None
        averaged: dict[str, list[float]] = {}
        first_pass: dict[str, float] = {}
        updates = config.ppo_epochs * parts
        for epoch in range(config.ppo_epochs):
            sft_parts = _mini_batches(len(sft_batch or ()), parts, seed=(config.seed, step, epoch, 0))
            rl_parts = _mini_batches(len(rollouts), parts, seed=(config.seed, step, epoch, 1))
            for part, (sft_indices, rl_indices) in enumerate(zip(sft_parts, rl_parts, strict=True)):
                with self._training_mode():
                    g_sft, sft_metrics = self._backward_sft([sft_batch[i] for i in sft_indices]) if sft_batch is not None else (None, {})
                    g_rl, rl_metrics = self._backward_rl(rl_batch, rl_indices) if rl_batch is not None else (None, {})
                critic_metrics = self._critic_update(rl_batch, rl_indices) if self.critic is not None and rl_batch is not None else {}
                update = mixed_adamw_step(
                    self.parameters,
                    self.optimizer,
                    g_sft,
                    g_rl,
                    mu=mu,
                    max_grad_norm=config.max_grad_norm,
                    tangent=tangent,
                    more_updates=epoch * parts + part + 1 < updates,
                )
                g_sft = g_rl = None  # consumed (g_rl's buffer lives on in the tangent); free the rest now
                self.budget.updates += 1
                step_metrics = {key: value for key, value in (("grad_norm", update.grad_norm), ("cos_sft_rl", update.cos_sft_rl)) if value is not None}
                for key, value in {**sft_metrics, **rl_metrics, **critic_metrics, **step_metrics}.items():
                    if key.startswith(("entropy_", "tokens_")):
                        if epoch == 0:
                            first_pass[key] = first_pass.get(key, 0.0) + value
                    else:
                        averaged.setdefault(key, []).append(value)
        metrics = {key: sum(values) / len(values) for key, values in averaged.items()}
        for kind in ("sft", "rl"):
            tokens = first_pass.get(f"tokens_{kind}")
            if tokens is not None:
                metrics[f"tokens_{kind}"] = int(tokens)
                metrics[f"entropy_{kind}"] = first_pass[f"entropy_{kind}"] / max(tokens, 1)
        return metrics, tangent.theta if tangent is not None else None

    def _mini_batch_count(self) -> int:
        """Mini-batches per pass: rollouts per iteration / mini_batch_size, rounded up (1 without a size)."""
        size = self.config.mini_batch_size
        return 1 if size is None else math.ceil(self.config.episodes_per_step * self.config.group_size / size)

    @contextmanager
    def _training_mode(self):
        """The model in training mode for a loss pass (LoRA dropout acts), back in eval mode afterwards."""
        self.policy.model.train()
        try:
            yield
        finally:
            self.policy.model.eval()

    def _global_sums(self, values: Sequence[float]) -> list[float]:
        """Each value summed over all processes, in one reduction."""
        return self.parallel.sums(values)

    def _micro_batches(self, trajectories: list[Trajectory]) -> list[list[int]]:
        """Indices of ``gradient_accumulation_steps`` near-equal micro-batches (empty ones dropped)."""
        parts = np.array_split(np.arange(len(trajectories)), self.config.gradient_accumulation_steps)
        return [part.tolist() for part in parts if len(part)]

    def _accumulate(self, trajectories: list[Trajectory], loss_of, extra_keys: Sequence[str] = ()) -> tuple[list[torch.Tensor | None], dict]:
        """Gradient of the token-mean loss over all trajectories (of every process), one micro-batch at a time.

        ``loss_of(indices)`` returns (token-mean loss of those trajectories, their TokenScores, extra
        metrics with the keys `extra_keys`); each micro-batch is weighted by its share of the global
        trainable tokens and its backward pass adds into the parameters' ``.grad`` (summed over processes
        by the distributed strategy), so the result is exactly the global token mean. The gradients are
        then taken out of ``.grad`` (None for a parameter no token reached): no copies, no zero lists.
        """
        self._check_images(trajectories)
        (total_tokens,) = self._global_sums([sum(t.num_response_tokens for t in trajectories)])
        sums = dict.fromkeys(("loss", "entropy_sum", *extra_keys), 0.0)
        for indices in self._micro_batches(trajectories):
            loss, scores, extra = loss_of(indices)
            weight = scores.num_tokens / max(total_tokens, 1)
            (loss * weight).backward()
            sums["loss"] += float(loss.detach()) * weight
            sums["entropy_sum"] += float(scores.entropy.sum())
            for key in extra_keys:
                sums[key] += extra[key] * weight
        gradients = self._take_gradients()
        *values, examples = self._global_sums([*sums.values(), len(trajectories)])
        totals = dict(zip(sums, values, strict=True))
        totals["tokens"], totals["examples"] = int(total_tokens), int(examples)
        self.budget.trained_tokens += totals["tokens"]
        return gradients, totals

    def _check_images(self, trajectories: list[Trajectory]) -> None:
        """Sharded runs: images in this pass on every process or on none (the vision tower's collectives
        must pair up across processes)."""
        if self.parallel.sharded:
            has_images = any(t.images for t in trajectories)
            self.parallel.check_same(float(has_images), what="whether a pass has images (mix image and text-only data per run, not per process)")

    def _take_gradients(self) -> list[torch.Tensor | None]:
        """The parameters' ``.grad`` tensors, which are then cleared (the next backward starts from none)."""
        gradients = [parameter.grad for parameter in self.parameters]
        for parameter in self.parameters:
            parameter.grad = None
        return gradients

    def _backward_sft(self, batch: list[Trajectory]) -> tuple[list[torch.Tensor], dict]:
        def loss_of(indices):
            scores = score_trajectories(self.policy, [batch[i] for i in indices], temperature=1.0)
            return sft_loss(scores.logprobs), scores, {}

        gradients, parts = self._accumulate(batch, loss_of)
        self.budget.expert_examples += parts["examples"]
        return gradients, {"loss_sft": parts["loss"], "entropy_sft": parts["entropy_sum"], "tokens_sft": parts["tokens"]}

    def _backward_rl(self, batch: RLBatch, indices: Sequence[int]) -> tuple[list[torch.Tensor], dict]:
        trajectories = [batch.trajectories[i] for i in indices]
        advantages = [batch.turn_advantages[i] for i in indices]

        def loss_of(micro):
            scores = score_trajectories(
                self.policy,
                [trajectories[i] for i in micro],
                temperature=self.engine.sampling_temperature,
                turn_advantages=[advantages[i] for i in micro],
            )
            loss, stats = clipped_policy_loss(scores.logprobs, scores.old_logprobs, scores.advantages, clip_epsilon=self.config.clip_epsilon)
            return loss, scores, {"clip_fraction": stats.clip_fraction, "approx_kl": stats.approx_kl, "ratio": stats.mean_ratio}

        gradients, parts = self._accumulate(trajectories, loss_of, extra_keys=("clip_fraction", "approx_kl", "ratio"))
        return gradients, {
            "loss_rl": parts["loss"],
            "entropy_rl": parts["entropy_sum"],
            "tokens_rl": parts["tokens"],
            "clip_fraction": parts["clip_fraction"],
            "approx_kl": parts["approx_kl"],
            "ratio": parts["ratio"],
        }

    def _critic_update(self, batch: RLBatch, indices: Sequence[int]) -> dict:
        """One AdamW step of the value head on the turns of ``indices`` of every process (the global turn
        mean of the clipped value loss, around the values at collection)."""
        self.critic_optimizer.zero_grad(set_to_none=True)
        turns = sum(int(batch.old_values[i].numel()) for i in indices)
        loss_sum = held_sum = value_sum = 0.0
        (total_turns,) = self._global_sums([turns])
        if turns:
            predicted = torch.cat([self.critic(batch.critic_features[i]) for i in indices])
            targets = torch.cat([batch.value_targets[i] for i in indices])
            old = torch.cat([batch.old_values[i] for i in indices])
            epsilon = self.config.clip_epsilon
            loss = value_loss(predicted, targets, old, clip_epsilon=epsilon)
            (loss * turns / max(total_turns, 1)).backward()
            with torch.no_grad():  # turns whose clipped error is the larger one: the clip holds them back
                clipped = old + (predicted - old).clamp(-epsilon, epsilon)
                held_sum = float(((clipped - targets) ** 2 > (predicted - targets) ** 2).float().sum())
            loss_sum, value_sum = float(loss.detach()) * turns, float(old.sum())
        self.parallel.sum_gradients(self.critic)
        self.critic_optimizer.step()
        loss_sum, held_sum, value_sum = self._global_sums([loss_sum, held_sum, value_sum])
        if not total_turns:
            return {}
        return {"value_loss": loss_sum / total_turns, "value_mean": value_sum / total_turns, "value_clip_fraction": held_sum / total_turns}

    # ----------------------------------------------------------------------------------------------
    # The controller's measurements.

    def _probe_entropy(self) -> float:
        """Mean token entropy at the sampling temperature on the fixed expert probe (no gradient)."""
        probe = self.entropy_probe[self.accelerator.process_index :: self.accelerator.num_processes]
        entropy_sum, tokens = 0.0, 0
        if probe:
            with torch.no_grad(), self.parallel.full_weights():
                scores = score_trajectories(self.policy, probe, temperature=self.engine.sampling_temperature)
            entropy_sum, tokens = float(scores.entropy.sum()), scores.num_tokens
        entropy_sum, tokens = self._global_sums([entropy_sum, tokens])
        return entropy_sum / max(tokens, 1)

    def _meta_estimate(self, step: int, direction: list[torch.Tensor | None]) -> MetaEstimate | None:
        """dU/dmu along ``direction`` from validation episodes played by the current (updated) policy.

        Each start state i gives ``s_i = < (1/K) sum_j w_ij grad log p(tau_ij), direction >`` with the
        leave-one-out advantages ``w``, one backward pass (in micro-batches) per start state. With W
        processes the states go in rounds of W, one per process: a data-parallel backward pass sums the
        processes' gradients, so a round gives the mean of its W states' values, and the standard error
        is taken over rounds (over single states with one process; dU/dmu itself is the same either way).
        A round whose states all tie gives exactly 0 and is not scored. None when no round has a signal.
        """
        c = self.config.controller
        seeds = [VALIDATION_SEED_BASE + i for i in range(c.validation_states)]
        shard = seeds[self.accelerator.process_index :: self.accelerator.num_processes]
        with self.parallel.full_weights():
            episodes, _ = self.validation_engine.collect(shard, group_size=c.validation_samples, sampling_seed=_mix_seed(self.config.seed, step, 2), progress=False)
        self.budget.validation_episodes += c.validation_states * c.validation_samples
        weights = leave_one_out_advantages(torch.tensor([t.episode_return for t in episodes]), [t.group for t in episodes])
        states = [[i for i, trajectory in enumerate(episodes) if trajectory.group == group] for group in range(len(shard))]
        tied = self.parallel.all_true([not any(weights[i] != 0 for i in members) for members in states])
        temperature = self.validation_engine.sampling_temperature
        per_round = []
        for members, skip in zip(states, tied, strict=True):
            if skip:
                per_round.append(0.0)
                continue
            self._check_images([episodes[i] for i in members])
            # Training mode only so that gradient checkpointing acts (transformers checks it); it also
            # turns LoRA dropout on here.
            with self._training_mode() if self.config.gradient_checkpointing else contextlib.nullcontext():
                for micro in self._micro_batches(members):
                    chosen = [members[i] for i in micro]
                    scores = score_trajectories(self.policy, [episodes[i] for i in chosen], temperature=temperature)
                    logprobs = torch.stack([part.sum() for part in scores.episode_token_logprobs])
                    ((weights[chosen].to(logprobs) * logprobs).sum() / len(members)).backward()
            per_round.append(flat_dot(self._take_gradients(), direction) / self.parallel.world)
        return MetaEstimate.from_per_state(per_round)

    # ----------------------------------------------------------------------------------------------
    # Logging and checkpoints.

    def _log(self, metrics: dict) -> None:
        # Non-finite numbers are written as null: JSON has no NaN, and a missing signal is not a number.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        metrics.update(clean)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(clean) + "\n")
        self.accelerator.log({k: v for k, v in clean.items() if isinstance(v, int | float)}, step=metrics["step"])

    def _keep_metrics(self, step: int, *, source: Path) -> None:
        """Keep only the metric lines of steps up to ``step``, from this run's file or a warm start's source run."""
        path = source / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = (self.output_dir / "metrics.jsonl").with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.output_dir / "metrics.jsonl")

    def save(self, step: int) -> Path | None:
        """Write checkpoint ``step`` (every process takes part when the model is sharded)."""
        self.accelerator.wait_for_everyone()
        is_main = self.accelerator.is_main_process
        state = {
            "step": step,
            "sft_position": self.sft_position,
            "controller": self.controller.state_dict() if self.controller else None,
            "budget": asdict(self.budget),
        }
        extra = {}
        if self.critic is not None:
            extra["critic"] = {"head": self.critic.state_dict(), "optimizer": self.critic_optimizer.state_dict()}
        return save_checkpoint(
            self.checkpoints,
            step,
            policy=self.policy,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=state,
            extra=extra,
            lora_base_model=self.base_model if self.config.lora_rank else None,
            is_main=is_main,
            barrier=self.accelerator.wait_for_everyone,
        )

    def _restore(self, checkpoint: Path) -> None:
        state = load_trainer_state(checkpoint)
        self.start_step, self.sft_position = state["step"], state["sft_position"]
        self.budget = Budget(**state.get("budget", {}))
        load_optimizer_state(checkpoint, self.policy, self.optimizer)
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])
        if self.critic is not None and (checkpoint / "critic.pt").is_file():  # an SFT run's checkpoint has none
            critic = torch.load(checkpoint / "critic.pt", weights_only=False)
            self.critic.load_state_dict(critic["head"])
            self.critic_optimizer.load_state_dict(critic["optimizer"])
        restore_rng_states(torch.load(checkpoint / "rng.pt", weights_only=False))
        log.info("resumed from %s at step %d", checkpoint, self.start_step)


def _mini_batches(count: int, parts: int, *, seed: tuple[int, ...]) -> list[list[int]]:
    """``parts`` near-equal index lists covering ``range(count)``: in order for one part, else a seeded shuffle."""
    order = np.arange(count) if parts == 1 else np.random.default_rng(list(seed)).permutation(count)
    return [part.tolist() for part in np.array_split(order, parts)]


def _mix_seed(seed: int, step: int, stream: int) -> int:
    """A sampling seed that depends only on (seed, step, stream), so a resumed run samples the same."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


def _flat_config(config: TrainConfig) -> dict:
    flat = {}
    for key, value in config_to_dict(config).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, int | float | str | bool)})
        elif isinstance(value, int | float | str | bool):
            flat[key] = value
    return flat
