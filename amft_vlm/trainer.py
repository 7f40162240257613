"""One trainer for AMFT and its baselines: the whole loop is `Trainer.train`, top to bottom.

Each optimiser step:

1. **mu** for this step: the method's schedule (``sft`` 1, ``rl`` 0, ``fixed-mix``, ``scheduled-mix``,
   ``sft-then-rl``) or the AMFT controller (1 during warm-up).
2. **Collect**: an SFT batch of expert trajectories (if mu > 0) and, if mu < 1, fresh rollouts of
   the policy (``episodes_per_step`` start states x ``group_size``) with group-relative advantages
   (``advantage: grpo``) or GAE over turns from a critic (``advantage: ppo``, `amft_vlm.critic`).
3. **Losses**: ``L_SFT`` and ``L_RL`` in separate backward passes, so ``g_SFT`` and ``g_RL`` are both
   known (their cosine is logged) and the step's gradient is ``(1 - mu) g_RL + mu g_SFT``.
4. **Controller** (AMFT): at the end of warm-up ``H*`` = mean token entropy on expert data; every
   step the entropy term; every ``meta_interval`` steps the meta-gradient through a look-ahead
   ``theta' = theta - alpha * grad L_total`` with ``grad U(theta')`` estimated by an on-policy policy
   gradient on held-out validation episodes.
5. **Update** (clip, AdamW, lr schedule), **log** to ``metrics.jsonl`` and the trackers, and
   **checkpoint** atomically every ``save_every`` steps.

Every method runs the same number of optimiser steps with the same batch sizes. Under
``accelerate launch`` each process collects its share of episodes and gradients are averaged across
processes explicitly after each backward pass (what DDP does, kept explicit so the separate
``g_SFT`` / ``g_RL`` passes and the look-ahead stay exact).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
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
from amft_vlm.checkpoint import latest_checkpoint, load_trainer_state, restore_rng_states, save_checkpoint
from amft_vlm.config import TrainConfig, config_to_dict
from amft_vlm.controller import MuController, flat_dot, meta_gradient
from amft_vlm.critic import ValueHead, credited_rewards, decision_states, gae_turn_advantages
from amft_vlm.lora import apply_lora, load_lora
from amft_vlm.losses import clipped_policy_loss, group_advantages, group_turn_advantages, value_loss
from amft_vlm.rollout import RolloutEngine
from amft_vlm.sft_data import load_sft_trajectories
from amft_vlm.trajectory import Trajectory

log = logging.getLogger(__name__)

UNSUPPORTED_DISTRIBUTED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
"""accelerate set-ups that shard parameters; the trainer refuses them with a message."""
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
    if config.method not in ("amft", "no-meta-gradient", "no-entropy", "no-warmup"):
        return None
    c = config.controller
    return MuController(
        mu_init=c.mu_init,
        mu_min=c.mu_min,
        mu_max=c.mu_max,
        eta_mu=c.eta_mu,
        eta_h=c.eta_h,
        warmup_steps=0 if config.method == "no-warmup" else c.warmup_steps,
        meta_interval=c.meta_interval,
        entropy_sign=c.entropy_sign,
        use_meta=config.method != "no-meta-gradient",
        use_entropy=config.method != "no-entropy",
    )


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
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=config.report_to or None,
            project_dir=str(self.output_dir),
            cpu=config.device == "cpu",
        )
        if self.accelerator.distributed_type in UNSUPPORTED_DISTRIBUTED:
            raise ValueError(
                f"accelerate is configured for {self.accelerator.distributed_type.value}, which the trainer does not "
                "support: AMFT needs the full gradients g_SFT and g_RL and a look-ahead step on every process, and "
                "sharded parameters do not give them. Use a multi-GPU/multi-CPU (DDP) accelerate config or torchrun."
            )
        set_seed(config.seed)
        self.start_step = 0
        self.sft_position = 0
        checkpoint = latest_checkpoint(self.checkpoints) if resume else None
        if resume and checkpoint is None:
            log.info("no checkpoint under %s; starting from step 0", self.checkpoints)
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
        if config.lora_rank:
            self.parameters = (
                load_lora(self.policy, checkpoint / "lora")
                if checkpoint
                else apply_lora(self.policy, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout)
            )
        else:
            if config.freeze_vision_tower:
                for parameter in self.policy.model.model.visual.parameters():
                    parameter.requires_grad_(False)
            self.parameters = [p for p in self.policy.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        schedule = get_cosine_schedule_with_warmup if config.lr_schedule == "cosine" else get_constant_schedule_with_warmup
        schedule_kwargs = {"num_training_steps": config.steps} if config.lr_schedule == "cosine" else {}
        scheduler = schedule(optimizer, num_warmup_steps=config.lr_warmup_steps, **schedule_kwargs)
        # The scheduler is not handed to accelerate: its wrapper advances the schedule once per process,
        # which assumes each process adds its own batch; here the global batch is fixed and sharded.
        self.optimizer, self.scheduler = self.accelerator.prepare(optimizer), scheduler
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

        if checkpoint is not None:
            self._restore(checkpoint)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
            self._truncate_metrics(self.start_step)
        self.accelerator.init_trackers("amft-vlm", config=_flat_config(config))

    # ----------------------------------------------------------------------------------------------
    # The loop.

    def train(self) -> list[dict]:
        """Run from the current step to ``config.steps``; returns the metrics of the steps run."""
        config, history = self.config, []
        bar = tqdm(range(self.start_step, config.steps), desc=f"train {config.method}", disable=not self.progress)
        for step in bar:
            started = time.perf_counter()
            mu = method_mu(config, step, self.controller)
            metrics: dict = {"step": step + 1, "mu": mu, "lr": self.scheduler.get_last_lr()[0]}

            # Collect: expert batch for L_SFT, on-policy rollouts for L_RL.
            sft_batch = self._next_sft_batch() if mu > 0 or self._needs_target_entropy(step) else []
            rollouts, rollout_stats = ([], None) if mu >= 1 else self._collect_rollouts(step)

            # Losses, each in its own backward pass: g_SFT and g_RL.
            g_sft, sft_metrics = self._backward_sft(sft_batch) if sft_batch else (None, {})
            g_rl, rl_metrics = self._backward_rl(rollouts) if rollouts else (None, {})
            metrics.update(sft_metrics)
            metrics.update(rl_metrics)
            if rollout_stats is not None:
                metrics.update(reward=rollout_stats.mean_return, success=rollout_stats.success_rate, turns=rollout_stats.mean_turns)
            if g_sft is not None and g_rl is not None:
                metrics["cos_sft_rl"] = _cosine(g_sft, g_rl)
            combined = _mix(g_sft, g_rl, mu, self.parameters)

            # Controller: H* at the end of warm-up, then the entropy term every step and the meta-gradient every k.
            if self.controller is not None:
                if self._needs_target_entropy(step):
                    self.controller.set_target_entropy(sft_metrics["entropy_sft"])
                if not self.controller.in_warmup(step):
                    entropy = rl_metrics.get("entropy_rl", sft_metrics.get("entropy_sft"))
                    meta = self._meta_signal(step, combined, g_sft, g_rl) if self.controller.wants_meta_gradient(step) else None
                    self.controller.update(entropy=entropy, meta_signal=meta)
                    metrics.update(entropy=entropy, meta_signal=meta)
                state = self.controller.state
                metrics.update(
                    target_entropy=state.target_entropy,
                    entropy_term=state.last_entropy_term,
                    meta_term=state.last_meta_term,
                    next_mu=state.mu,
                )

            # Update.
            for parameter, gradient in zip(self.parameters, combined, strict=True):
                parameter.grad = gradient
            if config.max_grad_norm > 0:
                metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            # Log and checkpoint.
            elapsed = time.perf_counter() - started
            tokens = metrics.get("tokens_sft", 0) + metrics.get("tokens_rl", 0)
            metrics.update(step_time=elapsed, tokens_per_second=tokens / elapsed if elapsed > 0 else 0.0, loss=mu * metrics.get("loss_sft", 0.0) + (1 - mu) * metrics.get("loss_rl", 0.0))
            self._log(metrics)
            history.append(metrics)
            bar.set_postfix(mu=f"{mu:.2f}", loss=f"{metrics['loss']:.3f}", reward=f"{metrics.get('reward', float('nan')):.2f}")
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                self.save(step + 1)
        self.accelerator.end_training()
        return history

    # ----------------------------------------------------------------------------------------------
    # The parts.

    def _needs_target_entropy(self, step: int) -> bool:
        return self.controller is not None and step == self.controller.warmup_steps and self.controller.state.target_entropy is None

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
        return self.engine.collect(shard, group_size=config.group_size, sampling_seed=_mix_seed(config.seed, step, 1), progress=False)

    def _gradients(self, loss: torch.Tensor, *, reduction: str = "sum") -> list[torch.Tensor]:
        """Gradients of ``loss`` over the trainable parameters, combined across processes.

        ``"sum"`` for losses already divided by the global token count (so the sum over processes is
        the global token mean); ``"mean"`` for per-process estimates of the same quantity.
        """
        gradients = torch.autograd.grad(loss, self.parameters, allow_unused=True)
        gradients = [torch.zeros_like(p) if g is None else g for p, g in zip(self.parameters, gradients, strict=True)]
        if self.accelerator.num_processes > 1:
            gradients = [self.accelerator.reduce(g, reduction=reduction) for g in gradients]
        return gradients

    def _global_sum(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        return float(self.accelerator.reduce(torch.tensor(value, dtype=torch.float64, device=self.accelerator.device), reduction="sum"))

    def _micro_batches(self, trajectories: list[Trajectory]) -> list[list[int]]:
        """Indices of ``gradient_accumulation_steps`` near-equal micro-batches (empty ones dropped)."""
        parts = np.array_split(np.arange(len(trajectories)), self.config.gradient_accumulation_steps)
        return [part.tolist() for part in parts if len(part)]

    def _accumulate(self, trajectories: list[Trajectory], loss_of) -> tuple[list[torch.Tensor], dict]:
        """Gradient of the token-mean loss over all trajectories, one micro-batch forward at a time.

        ``loss_of(indices)`` returns (token-mean loss of those trajectories, their TokenScores,
        extra metrics); each micro-batch is weighted by its share of trainable tokens, so the sum is
        exactly the full batch's token mean.
        """
        # Weights use the token count of the whole batch over all processes, so summing the
        # processes' gradients gives exactly the single-process token mean.
        total_tokens = self._global_sum(sum(t.num_response_tokens for t in trajectories))
        gradients = [torch.zeros_like(p) for p in self.parameters]
        loss_sum, entropy_sum, extras = 0.0, 0.0, {}
        for indices in self._micro_batches(trajectories):
            loss, scores, extra = loss_of(indices)
            weight = scores.num_tokens / max(total_tokens, 1)
            for gradient, part in zip(gradients, self._gradients(loss * weight), strict=True):
                gradient.add_(part)
            loss_sum += float(loss.detach()) * weight
            entropy_sum += float(scores.entropy.detach().sum())
            for key, value in extra.items():
                extras[key] = extras.get(key, 0.0) + value * weight
        parts = {"loss": self._global_sum(loss_sum), "entropy": self._global_sum(entropy_sum) / max(total_tokens, 1), "tokens": int(total_tokens)}
        return gradients, {**parts, **{key: self._global_sum(value) for key, value in extras.items()}}

    def _backward_sft(self, batch: list[Trajectory]) -> tuple[list[torch.Tensor], dict]:
        def loss_of(indices):
            scores = score_trajectories(self.policy, [batch[i] for i in indices], temperature=1.0)
            return -scores.logprobs.mean(), scores, {}

        gradients, parts = self._accumulate(batch, loss_of)
        return gradients, {"loss_sft": parts["loss"], "entropy_sft": parts["entropy"], "tokens_sft": parts["tokens"]}

    def _backward_rl(self, rollouts: list[Trajectory]) -> tuple[list[torch.Tensor], dict]:
        config = self.config
        groups = [t.group for t in rollouts]
        critic_metrics = {}
        if self.critic is not None:
            turn_advantages, critic_metrics = self._ppo_advantages(rollouts)
        elif config.credit == "episode":
            per_episode = group_advantages(torch.tensor([t.episode_return for t in rollouts]), groups)
            turn_advantages = [per_episode[i].expand(t.num_turns) for i, t in enumerate(rollouts)]
        else:
            turn_advantages = group_turn_advantages([t.turn_rewards for t in rollouts], groups)

        def loss_of(indices):
            scores = score_trajectories(
                self.policy,
                [rollouts[i] for i in indices],
                temperature=self.engine.sampling_temperature,
                turn_advantages=[turn_advantages[i] for i in indices],
            )
            ones = torch.ones_like(scores.logprobs)
            loss, stats = clipped_policy_loss(scores.logprobs, scores.old_logprobs, scores.advantages, ones, clip_epsilon=config.clip_epsilon)
            return loss, scores, {"clip_fraction": stats.clip_fraction, "approx_kl": stats.approx_kl}

        gradients, parts = self._accumulate(rollouts, loss_of)
        return gradients, {
            "loss_rl": parts["loss"],
            "entropy_rl": parts["entropy"],
            "tokens_rl": parts["tokens"],
            "clip_fraction": parts["clip_fraction"],
            "approx_kl": parts["approx_kl"],
            **critic_metrics,
        }

    def _ppo_advantages(self, rollouts: list[Trajectory]) -> tuple[list[torch.Tensor], dict]:
        """GAE turn advantages from the critic's values, then one critic step towards the GAE returns."""
        config = self.config
        features = [states.to(self.accelerator.device) for states in decision_states(self.policy, rollouts)]
        with torch.no_grad():
            old_values = [self.critic(states) for states in features]
        rewards = [credited_rewards(t, config.credit).to(self.accelerator.device) for t in rollouts]
        advantages, targets = gae_turn_advantages(rewards, old_values, gamma=config.gamma, lam=config.gae_lambda)
        predicted = torch.cat([self.critic(states) for states in features])
        loss = value_loss(predicted, torch.cat(targets), torch.cat(old_values), clip_epsilon=config.clip_epsilon)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.accelerator.num_processes > 1:
            for parameter in self.critic.parameters():
                parameter.grad = self.accelerator.reduce(parameter.grad, reduction="mean")
        self.critic_optimizer.step()
        return advantages, {"value_loss": float(loss.detach()), "value_mean": float(torch.cat(old_values).mean())}

    def _meta_signal(self, step: int, combined: list[torch.Tensor], g_sft, g_rl) -> float | None:
        """dU/dmu through the look-ahead theta' = theta - alpha * grad L_total; None without both gradients."""
        if g_sft is None or g_rl is None:
            return None
        c = self.config.controller
        alpha = c.meta_alpha if c.meta_alpha is not None else self.scheduler.get_last_lr()[0]
        saved = [p.detach().clone() for p in self.parameters]
        try:
            with torch.no_grad():
                for parameter, gradient in zip(self.parameters, combined, strict=True):
                    parameter.sub_(alpha * gradient)
            grad_u = self._utility_gradient(step)
        finally:
            with torch.no_grad():
                for parameter, original in zip(self.parameters, saved, strict=True):
                    parameter.copy_(original)
        return meta_gradient(grad_u, g_sft, g_rl, alpha=alpha, normalize=c.normalize_meta)

    def _utility_gradient(self, step: int) -> list[torch.Tensor]:
        """grad U: on-policy policy gradient of the mean validation return (baseline: the batch mean)."""
        c = self.config.controller
        seeds = [VALIDATION_SEED_BASE + i for i in range(c.validation_episodes)]
        shard = seeds[self.accelerator.process_index :: self.accelerator.num_processes]
        episodes, _ = self.validation_engine.collect(shard, sampling_seed=_mix_seed(self.config.seed, step, 2), progress=False)
        returns = torch.tensor([t.episode_return for t in episodes])
        weights = returns - returns.mean()
        if not weights.any():
            # Every episode scored the same: the estimate is exactly zero, so skip the scoring pass
            # (all processes still join the reduction).
            zeros = [torch.zeros_like(p) for p in self.parameters]
            if self.accelerator.num_processes > 1:
                zeros = [self.accelerator.reduce(g, reduction="mean") for g in zeros]
            return zeros
        scores = score_trajectories(self.policy, episodes, temperature=self.validation_engine.sampling_temperature)
        utility = sum(w * lp.sum() for w, lp in zip(weights, scores.episode_token_logprobs, strict=True)) / len(episodes)
        return self._gradients(utility, reduction="mean")

    def _log(self, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=metrics["step"])

    def _truncate_metrics(self, step: int) -> None:
        """Keep only the metric lines of steps up to ``step`` (a resumed run rewrites what came after)."""
        path = self.output_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)

    def save(self, step: int) -> Path | None:
        """Write checkpoint ``step`` (main process only)."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        state = {"step": step, "sft_position": self.sft_position, "controller": self.controller.state_dict() if self.controller else None}
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
        )

    def _restore(self, checkpoint: Path) -> None:
        state = load_trainer_state(checkpoint)
        self.start_step, self.sft_position = state["step"], state["sft_position"]
        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])
        if self.critic is not None:
            critic = torch.load(checkpoint / "critic.pt", weights_only=False)
            self.critic.load_state_dict(critic["head"])
            self.critic_optimizer.load_state_dict(critic["optimizer"])
        restore_rng_states(torch.load(checkpoint / "rng.pt", weights_only=False))
        log.info("resumed from %s at step %d", checkpoint, self.start_step)


def _mix(g_sft, g_rl, mu: float, parameters) -> list[torch.Tensor]:
    """The step's gradient ``(1 - mu) g_RL + mu g_SFT`` (a missing part counts as zero)."""
    zeros = [torch.zeros_like(p) for p in parameters]
    g_sft = g_sft or zeros
    g_rl = g_rl or zeros
    return [mu * s + (1 - mu) * r for s, r in zip(g_sft, g_rl, strict=True)]


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    norm = math.sqrt(flat_dot(a, a) * flat_dot(b, b))
    return flat_dot(a, b) / norm if norm > 0 else 0.0


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
