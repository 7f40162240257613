"""One trainer for AMFT and its baselines: the whole loop is `Trainer.train`, top to bottom.

Each training iteration (``steps`` of them):

1. **mu** for this iteration: the method's schedule or the AMFT controller (`amft_vlm.methods`).
2. **Collect**: an expert batch for ``L_SFT`` (if mu > 0) and, if mu < 1, fresh rollouts of the policy
   (``episodes_per_step`` start states x ``group_size``) with one advantage per turn: GRPO's
   (`amft_vlm.advantages`) or GAE over turns from a critic (``advantage: ppo``, `amft_vlm.critic`).
   LUFFY and SRFT put a demonstration into each group, ReLIFT buffers those of all-failed groups
   (`amft_vlm.peers`; its released form mean-centres the group rewards without the std).
3. **Update**: ``ppo_epochs`` passes over the batch in mini-batches (``mini_batch_size`` rollouts and an
   equal share of the expert batch), one optimiser update each: ``L_SFT`` (`amft_vlm.losses`) and the
   method's ``L_RL`` (`amft_vlm.objectives`) in separate backward passes (``g_SFT``, ``g_RL``; their
   cosine is logged), the mix ``(1 - mu) g_RL + mu g_SFT``, gradient-norm clipping and AdamW. With one
   pass and one mini-batch (the default) the PPO ratio is 1 and the clip never acts; with more, it does.
   ReLIFT adds, after that update, one SFT update with its own AdamW whenever its buffer is full.
4. **Controller** (AMFT, `amft_vlm.controller`): the entropy term every iteration (H and H* on the same
   tokens at the sampling temperature); every ``meta_interval`` iterations the meta-gradient: grad U on
   validation episodes (the ``val`` split) at the parameters the update landed on, along the exact
   derivative of the update with respect to mu.
5. **Log** to ``metrics.jsonl`` and the trackers, with the budget consumed so far (`amft_vlm.budget`),
   and **checkpoint** atomically every ``save_every`` iterations. The learning-rate schedule advances
   once per iteration. ``resume=True`` continues from the newest usable checkpoint (a damaged one is
   skipped with a warning) with settings a resumed run may change (`amft_vlm.checkpoint.RESUME_MAY_CHANGE`).

The main process locks ``output_dir`` for the trainer's life (`amft_vlm.run_directory.DirectoryLock`: a second
writer is refused, naming this one) and, unless resuming, refuses to start over a run already there
(``overwrite=True`` deletes that run's files first).

The model is in training mode during the loss passes (so LoRA dropout acts there) and in eval mode
for sampling and scoring without gradient. Under ``accelerate launch`` or ``torchrun`` each process
collects its share of episodes; the strategy of `amft_vlm.distributed` (ddp or fsdp2) sums every
gradient across processes in its backward pass, so the separate ``g_SFT`` / ``g_RL`` passes stay exact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from tqdm import tqdm

from agents.baselines import ExpertAgent
from agents.tiny import resolve_model_spec
from amft_vlm.advantages import GROUP_ADVANTAGES
from amft_vlm.batch import (
    RolloutBatch,
    accumulate_gradient,
    score_trajectories,
)
from amft_vlm.budget import Budget
from amft_vlm.checkpoint import (
    RELIFT_OPTIMIZER,
    RNG_FILE,
    MetricsLog,
    check_resume_settings,
    load_optimizer_state,
    load_state_file,
    load_trainer_state,
    restore_rng_states,
    resumable_checkpoint,
    save_checkpoint,
    warm_start_checkpoint,
    write_text_atomic,
)
from amft_vlm.config import TrainConfig, config_to_dict
from amft_vlm.controller import MetaEvidence, MuTangent, mixed_adamw_step
from amft_vlm.critic import Critic
from amft_vlm.distributed import Parallel, check_training_layout
from amft_vlm.losses import mix, relift_sft_loss, weighted_sft_loss
from amft_vlm.meta import MetaMeasurement, meta_gradient
from amft_vlm.methods import build_controller, method_mu
from amft_vlm.objectives import RL_OBJECTIVES, RLPass, mean_token_entropy
from amft_vlm.peers import (
    ReliftBuffer,
    all_failed_groups,
    expert_start_states,
    joint_group_advantages,
    with_demonstrations,
)
from amft_vlm.preflight import check_run_inputs
from amft_vlm.resolve import resolve_method
from amft_vlm.rollout import RolloutEngine
from amft_vlm.run_directory import TRACKER_PROJECT, DirectoryLock, start_new_run
from amft_vlm.sft_data import load_sft_trajectories
from amft_vlm.training_setup import build_optimizer, load_training_policy
from amft_vlm.trajectory import Trajectory

log = logging.getLogger(__name__)

UNSUPPORTED_DISTRIBUTED = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
"""accelerate set-ups the trainer refuses (FSDP is mapped to its own fully_shard, `amft_vlm.distributed`)."""
VALIDATION_SEED_BASE = 1 << 30  # validation episodes never share seeds with training rollouts
EXPERT_SEED_BASE = 1 << 29
T = TypeVar("T")


GLOO_RELEASE_SECONDS = 0.2
"""How long `Trainer.close` leaves the GIL to gloo's worker threads to drop the last collectives' buffers."""


class Trainer:
    """Trains a `VLMPolicy` with the configured method; see the module docstring for the loop.

    Args:
        config: the run's settings.
        resume: continue the run in ``output_dir`` from its newest usable checkpoint.
        overwrite: delete the run already in ``output_dir`` (its metrics, checkpoints, config.yaml and tiny
            initial model; nothing else) and start again; without it (or `resume`) a run there is refused.
        progress: show a progress bar.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> None:
        if resume and overwrite:
            raise ValueError("resume continues the run in output_dir and overwrite deletes it: choose one (--resume or --overwrite)")
        self.config = config.validate()
        self.method = resolve_method(config)  # the method's row, once: everything below reads it, not the name
        check_run_inputs(config, uses_expert_data=self.method.uses_expert_data)  # before any model loads
        self.progress = progress
        self.output_dir = Path(config.output_dir)
        self.checkpoints = self.output_dir / "checkpoints"
        # Mixed precision is the policy's own autocast (`VLMPolicy.autocast_dtype`): the model is not handed
        # to accelerate, whose mixed_precision would only add a grad scaler to an optimiser we step ourselves.
        self.accelerator = Accelerator(mixed_precision="no", log_with=config.report_to or None, project_dir=str(self.output_dir), cpu=config.device == "cpu")
        self._closed = False
        if self.accelerator.distributed_type in UNSUPPORTED_DISTRIBUTED:
            raise ValueError(
                f"accelerate is configured for {self.accelerator.distributed_type.value}, which the trainer does not "
                "support; use an accelerate config for several processes (DDP) or FSDP (configs/accelerate/), or torchrun"
            )
        self.parallel = Parallel(config.distributed, self.accelerator)
        check_training_layout(config, self.method.controller, self.parallel)
        set_seed(config.seed)
        self.start_step, self.sft_position, self.budget = 0, 0, Budget()
        # Decided by the main process alone (its warnings once) and sent to the others: all load the same one, or all
        # stop with its error (another process writes output_dir, a run is there already, ...).
        self.output_lock: DirectoryLock | None = None
        checkpoint, warm_start = _decided_by_main_process(self.accelerator, lambda: self._claim_output_dir(resume, overwrite))

        with self.accelerator.main_process_first():  # one process builds a tiny model, the others load it
            self.base_model = resolve_model_spec(config.model, self.output_dir / "initial-model", seed=config.seed)
        # With LoRA the policy is always the base model plus adapters (fresh, or the checkpoint's).
        model_path = str(checkpoint / "policy") if checkpoint and not config.lora_rank else self.base_model
        lora = (checkpoint / "lora") if checkpoint and config.lora_rank else None
        self.policy, self.parameters = load_training_policy(config, model_path, self.parallel, device=str(self.accelerator.device), lora_checkpoint=lora)
        self.optimizer, self.scheduler = build_optimizer(config, self.parameters, fused=self.accelerator.device.type == "cuda")
        self.critic = None
        if config.advantage == "ppo" and self.method.collects_rollouts:
            hidden_size = self.policy.model.config.get_text_config().hidden_size
            self.critic = Critic(
                hidden_size, learning_rate=config.value_learning_rate, clip_epsilon=config.clip_epsilon,
                gamma=config.gamma, lam=config.gae_lambda, credit=config.credit, device=self.accelerator.device,
            )  # fmt: skip
        self.controller = build_controller(self.method, config)

        engine_kwargs = {"num_envs": config.num_envs, "temperature": config.temperature, "max_new_tokens": config.max_new_tokens}
        self.engine = RolloutEngine(self.policy, config.env_id, env_kwargs=config.env_kwargs, **engine_kwargs)
        self.validation_engine = RolloutEngine(self.policy, config.env_id, env_kwargs=config.validation_env_kwargs, **engine_kwargs)
        self.expert = self._expert_trajectories(config.expert_data) if self.method.uses_expert_data else []
        # The controlled test of `expert_data_after_warmup`: another expert set once the warm-up ends.
        self.expert_after_warmup = self._expert_trajectories(config.expert_data_after_warmup) if config.expert_data_after_warmup else None
        # A fixed probe of expert dialogues for entropy_source=expert: the first ones, the same at every step.
        probe = self.expert[: config.controller.entropy_probe_size] if self.controller else []
        self.entropy_probe = [t.with_image_inputs(self.policy.encoder) for t in probe]

        # ReLIFT: the buffer, and an AdamW of its own for the SFT updates (the authors' second optimiser: own moments).
        self.relift = ReliftBuffer(config.relift.buffer_capacity(config.episodes_per_step)) if self.method.sft_buffer else None
        self.relift_optimizer = None
        self.relift_sft_updates = 0
        if self.relift is not None:
            self.relift_optimizer = torch.optim.AdamW(
                self.parameters, lr=config.relift.sft_lr_ratio * config.learning_rate, weight_decay=config.weight_decay,
                fused=self.accelerator.device.type == "cuda",
            )  # fmt: skip
        if checkpoint is not None:
            self._restore(checkpoint)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_log = MetricsLog(self.output_dir, is_main=self.accelerator.is_main_process)
        if self.accelerator.is_main_process:
            write_text_atomic(self.output_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
        self.metrics_log.keep_until(self.start_step, source=checkpoint.parent.parent if warm_start else self.output_dir)
        self.accelerator.init_trackers(TRACKER_PROJECT, config=_flat_config(config))

    # ----------------------------------------------------------------------------------------------
    # The loop.

    def train(self, *, stop_after: int | None = None) -> list[dict]:
        """Run from the current iteration to ``config.steps`` (or to `stop_after`, with a checkpoint there: the run
        can be resumed, or warm-started from, exactly as if it had gone on); returns the metrics of the iterations run."""
        config, controller, history = self.config, self.controller, []
        last = config.steps if stop_after is None else min(stop_after, config.steps)
        bar = tqdm(range(self.start_step, last), desc=f"train {config.method}", disable=not (self.progress and self.accelerator.is_main_process))
        for step in bar:
            started = time.perf_counter()
            mu = method_mu(self.method, config, step, controller)
            metrics: dict = {"step": step + 1, "mu": mu, "lr": self.scheduler.get_last_lr()[0]}
            controlled = controller is not None and not controller.in_warmup(step)

            # Collect: expert batch for L_SFT, on-policy rollouts with advantages for L_RL. Whether a part
            # exists is decided by mu (the same on every process); a process's share of it may be empty.
            sft_batch = self._next_sft_batch(step) if mu > 0 else None
            rl_batch = None
            if mu < 1:
                rl_batch, rollout_metrics = self._collect_rollouts(step)
                metrics.update(rollout_metrics)
            wants_probe = controlled and controller.use_entropy and config.controller.entropy_source == "expert"
            probe_entropy = self._probe_entropy() if wants_probe else None

            # Update: ppo_epochs x mini-batches of (g_SFT, g_RL) -> mix -> clip -> AdamW; on meta-gradient
            # iterations also d theta'/d mu of the update(s).
            meta_step = controller is not None and controller.wants_meta_gradient(step)
            update_metrics, direction = self._update(step, mu, sft_batch, rl_batch, lookahead=meta_step)
            metrics.update(update_metrics)
            if self.relift is not None and self.relift.full:  # ReLIFT: after the RL update, one SFT update on the newest buffered
                metrics.update(self._relift_update())

            # Controller: H* over the first controller steps, the entropy term every step, the meta term every k.
            if controlled:
                entropy = probe_entropy if config.controller.entropy_source == "expert" else update_metrics.get("entropy_rl")
                if controller.needs_target_entropy(step) and entropy is not None:
                    controller.observe_target_entropy(entropy)
                signal = None
                if meta_step:
                    signal, meta_metrics = self._meta_signal(step, direction, learning_rate=metrics["lr"]) if direction is not None else (None, {})
                    direction = None  # a parameter-sized buffer: free it before the next iteration
                    metrics.update(meta_signal=signal, **meta_metrics)
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
                loss=mix(metrics.get("loss_rl", 0.0), metrics.get("loss_sft", 0.0), mu),
                **self.budget.metrics(),
            )
            metrics = self.metrics_log.append(metrics)
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=metrics["step"])
            history.append(metrics)
            bar.set_postfix(mu=f"{mu:.2f}", loss=f"{metrics['loss']:.3f}", reward=_shown(metrics.get("reward")))
            if (step + 1) % config.save_every == 0 or step + 1 == last:
                self.save(step + 1)
        self.close()
        return history

    # ----------------------------------------------------------------------------------------------
    # Collecting.

    def _next_sft_batch(self, step: int) -> list[Trajectory]:
        """This process's share of the next ``sft_batch_size`` expert trajectories: epoch-wise permutations seeded by (seed, epoch)
        of the step's expert set (``expert_data_after_warmup``'s once the warm-up is over, if there is one)."""
        expert = self.expert
        if self.expert_after_warmup is not None and not self.controller.in_warmup(step):
            expert = self.expert_after_warmup
        size, count = self.config.sft_batch_size, len(expert)
        indices, orders = [], {}
        for position in range(self.sft_position, self.sft_position + size):
            epoch, offset = divmod(position, count)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.config.seed, epoch]).permutation(count)
            indices.append(orders[epoch][offset])
        self.sft_position += size
        return self._expert_share(indices, expert)

    def _collect_rollouts(self, step: int) -> tuple[RolloutBatch, dict]:
        """This process's share of the iteration's rollouts with one advantage per turn, and the global episode metrics."""
        config, method = self.config, self.method
        states, seeds = self._start_states(step)
        shard = self._share(seeds)
        members = config.group_size - 1 if method.expert_in_group else config.group_size  # LUFFY, SRFT: G - 1 + the demonstration
        self.budget.rollout_episodes += config.episodes_per_step * members
        with self.parallel.full_weights():
            rollouts, stats = self.engine.collect(shard, group_size=members, sampling_seed=_mix_seed(config.seed, step, 1), progress=False)
        extra: dict = {"rollout_digest": self.parallel.digest([t.token_digest for t in rollouts])}
        if self.relift is not None:  # ReLIFT: start states on which every rollout failed wait in its buffer
            failed = all_failed_groups(rollouts, len(shard))
            process, processes = self.accelerator.process_index, self.accelerator.num_processes
            extra["relift_added"] = self.relift.add_failed(self.parallel, states, failed, process, processes)
            extra["relift_buffer"] = len(self.relift.items)
        if method.expert_in_group:  # LUFFY, SRFT: the demonstration joins its group; advantages over the joint group
            rollouts = with_demonstrations(rollouts, self._expert_share(states))
            self.budget.expert_examples += config.episodes_per_step
            advantages = joint_group_advantages(rollouts, credit=config.credit, scale_by_std=method.rl_objective != "luffy")
            batch = RolloutBatch(rollouts, advantages)
        elif self.critic is not None:
            with self.parallel.full_weights():
                advantages, critic_targets = self.critic.advantages(self.policy, rollouts)
            batch = RolloutBatch(rollouts, advantages, critic_targets)
        elif method.sft_buffer and config.relift.rl_loss == "released":  # ReLIFT's code: mean-centred, no std
            batch = RolloutBatch(rollouts, joint_group_advantages(rollouts, credit=config.credit, scale_by_std=False))
        else:
            estimator = GROUP_ADVANTAGES[config.credit]
            batch = RolloutBatch(rollouts, estimator([t.turn_rewards for t in rollouts], [t.group for t in rollouts]))
        episodes, returns, successes, turns = self.parallel.sums(
            [stats.episodes, stats.mean_return * stats.episodes, stats.successes, stats.mean_turns * stats.episodes]
        )
        return batch, {"reward": returns / episodes, "success": successes / episodes, "turns": turns / episodes, **extra}

    def _start_states(self, step: int) -> tuple[list[int] | None, list[int]]:
        """The iteration's start states (every process's): the expert-set indices they come from (None for the
        methods that play fresh training seeds) and their environment seeds."""
        config = self.config
        if not self.method.rollouts_from_expert_states:
            return None, [config.seed * 1_000_003 + step * config.episodes_per_step + i for i in range(config.episodes_per_step)]
        states = expert_start_states(len(self.expert), step, config.episodes_per_step, config.seed)
        return states, [self.expert[i].seed for i in states]  # each group starts where its demonstration does

    def _share(self, items: Sequence[T]) -> Sequence[T]:
        """This process's share of `items` (which every process holds in full): every num_processes-th, from its index."""
        return items[self.accelerator.process_index :: self.accelerator.num_processes]

    def _expert_share(self, indices: Sequence[int], expert: Sequence[Trajectory] | None = None) -> list[Trajectory]:
        """This process's share of the expert trajectories at `indices` (of `expert`, the run's set by default), with their images prepared."""
        expert = self.expert if expert is None else expert
        return [expert[i].with_image_inputs(self.policy.encoder) for i in self._share(indices)]

    # ----------------------------------------------------------------------------------------------
    # Updating.

    def _update(
        self, step: int, mu: float, sft_batch: list[Trajectory] | None, rl_batch: RolloutBatch | None, *, lookahead: bool
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
        parts = self._mini_batch_count()
        tangent = MuTangent(config.controller.lookahead) if lookahead else None
        averaged: dict[str, list[float]] = {}
        first_pass: dict[str, float] = {}
        updates = config.ppo_epochs * parts
        for epoch in range(config.ppo_epochs):
            sft_parts = _mini_batches(len(sft_batch or ()), parts, seed=(config.seed, step, epoch, 0))
            rl_parts = _mini_batches(len(rl_batch or ()), parts, seed=(config.seed, step, epoch, 1))
            for part, (sft_indices, rl_indices) in enumerate(zip(sft_parts, rl_parts, strict=True)):
                g_sft = g_rl = None
                sft_metrics = rl_metrics = critic_metrics = {}
                with self._training_mode():
                    if sft_batch is not None:
                        g_sft, sft_metrics = self._sft_gradient([sft_batch[i] for i in sft_indices])
                    if rl_batch is not None:
                        g_rl, rl_metrics = self._rl_gradient(rl_batch.select(rl_indices))
                if self.critic is not None and rl_batch is not None:
                    critic_metrics = self.critic.update(rl_batch.critic.select(rl_indices), self.parallel)
                more_updates = epoch * parts + part + 1 < updates
                update = mixed_adamw_step(
                    self.parameters, self.optimizer, g_sft, g_rl, mu=mu, max_grad_norm=config.max_grad_norm, tangent=tangent, more_updates=more_updates
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

    def _sft_gradient(self, batch: list[Trajectory]) -> tuple[list[torch.Tensor | None], dict]:
        """g_SFT: the gradient of `amft_vlm.losses.sft_loss` over the expert batch of every process."""

        def loss_of(indices):
            scores = score_trajectories(self.policy, [batch[i] for i in indices], temperature=1.0)
            return weighted_sft_loss(scores.logprobs, self.method.sft_weighting), scores, {}

        gradient, totals = accumulate_gradient(self.parallel, self.parameters, batch, loss_of, micro_batch_count=self.config.gradient_accumulation_steps)
        self.budget.expert_examples += totals["examples"]
        self.budget.trained_tokens += totals["tokens"]
        return gradient, {"loss_sft": totals["loss"], "entropy_sft": totals["entropy_sum"], "tokens_sft": totals["tokens"]}

    def _rl_gradient(self, batch: RolloutBatch) -> tuple[list[torch.Tensor | None], dict]:
        """g_RL: the gradient of the method's RL objective (`amft_vlm.objectives`) over the rollouts (with
        LUFFY's and SRFT's demonstrations) of every process."""
        objective = RL_OBJECTIVES[self.method.rl_objective]
        run = RLPass(self.policy, self.parallel, self.config, temperature=self.engine.sampling_temperature)
        loss_of = objective.loss_of(run, batch)
        gradient, totals = accumulate_gradient(
            self.parallel, self.parameters, batch.trajectories, loss_of,
            micro_batch_count=self.config.gradient_accumulation_steps, extra_keys=objective.metrics,
        )  # fmt: skip
        self.budget.trained_tokens += totals["tokens"]
        metrics = {"loss_rl": totals["loss"], "entropy_rl": totals["entropy_sum"], "tokens_rl": totals["tokens"]}
        return gradient, {**metrics, **{key: totals[key] for key in objective.metrics}}

    def _relift_update(self) -> dict:
        """ReLIFT: one SFT update on the newest ``capacity`` buffered demonstrations (this process's share of them),
        taken out of the buffer, with ReLIFT's own AdamW at ``relift.sft_lr_ratio`` x the step's learning rate."""
        config = self.config
        items = self.relift.drain()
        batch = self._expert_share(items)
        coef = config.relift.entropy_coef

        def loss_of(indices):
            scores = score_trajectories(self.policy, [batch[i] for i in indices], temperature=1.0, entropy_grad=coef > 0)
            return relift_sft_loss(scores.logprobs, scores.entropy, entropy_coef=coef), scores, {}

        with self._training_mode():
            g_sft, totals = accumulate_gradient(self.parallel, self.parameters, batch, loss_of, micro_batch_count=config.gradient_accumulation_steps)
        for group in self.relift_optimizer.param_groups:
            group["lr"] = config.relift.sft_lr_ratio * self.scheduler.get_last_lr()[0]
        update = mixed_adamw_step(self.parameters, self.relift_optimizer, g_sft, None, mu=1.0, max_grad_norm=config.relift.sft_max_grad_norm)
        self.budget.updates += 1
        self.budget.expert_examples += totals["examples"]
        self.budget.trained_tokens += totals["tokens"]
        self.relift_sft_updates += 1
        return {
            "relift_sft_loss": totals["loss"], "relift_sft_entropy": totals["entropy_sum"] / max(totals["tokens"], 1),
            "relift_sft_examples": len(items), "relift_grad_norm": update.grad_norm, "relift_sft_lr": self.relift_optimizer.param_groups[0]["lr"],
        }  # fmt: skip

    # ----------------------------------------------------------------------------------------------
    # The controller's measurements.

    def _probe_entropy(self) -> float:
        """Mean token entropy at the sampling temperature on the fixed expert probe (no gradient)."""
        probe = self._share(self.entropy_probe)
        return mean_token_entropy(self.policy, self.parallel, probe, temperature=self.engine.sampling_temperature)

    def _meta_signal(self, step: int, direction: list[torch.Tensor | None], *, learning_rate: float) -> tuple[float | None, dict]:
        """dU/dmu along ``direction`` from validation episodes (this process's start states) of the updated policy,
        weighed by the controller (pooled with the earlier meta steps' evidence): the meta signal (None: none)
        and the meta step's metrics (`_evidence_metrics`)."""
        c = self.config.controller
        shard = self._share([VALIDATION_SEED_BASE + i for i in range(c.validation_states)])
        with self.parallel.full_weights():
            episodes, _ = self.validation_engine.collect(shard, group_size=c.validation_samples, sampling_seed=_mix_seed(self.config.seed, step, 2), progress=False)
        self.budget.validation_episodes += c.validation_states * c.validation_samples
        measurement = meta_gradient(
            self.policy, self.parameters, self.parallel, episodes, direction,
            temperature=self.validation_engine.sampling_temperature,
            micro_batch_count=self.config.gradient_accumulation_steps,
            credit=c.meta_credit,
            # Training mode only so that gradient checkpointing acts (transformers checks it); LoRA dropout too.
            training_mode=self._training_mode if self.config.gradient_checkpointing else None,
        )  # fmt: skip
        evidence = self.controller.weigh_meta_evidence(measurement.values, learning_rate=learning_rate)
        return evidence.signal, _evidence_metrics(evidence, measurement, self.parallel.digest([t.token_digest for t in episodes]))

    # ----------------------------------------------------------------------------------------------
    # Set-up, checkpoints.

    def _expert_trajectories(self, dataset: str | None) -> list[Trajectory]:
        """The expert set of `dataset` (None: collected with the oracle expert), its images kept prepared if they
        fit in ``image_cache_mb`` (else prepared per draw)."""
        config = self.config
        if dataset is not None:
            expert = load_sft_trajectories(dataset, self.policy.encoder)
        else:
            seeds = [EXPERT_SEED_BASE + i for i in range(config.expert_episodes)]
            trajectories, _ = self.engine.collect(seeds, responder=ExpertAgent(), progress=self.progress)
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

    def _mini_batch_count(self) -> int:
        """Mini-batches per pass: rollouts per iteration / mini_batch_size, rounded up (1 without a size)."""
        size = self.config.mini_batch_size
        return 1 if size is None else math.ceil(self.config.episodes_per_step * self.config.group_size / size)

    @contextlib.contextmanager
    def _training_mode(self):
        """The model in training mode for a loss pass (LoRA dropout acts), back in eval mode afterwards."""
        self.policy.model.train()
        try:
            yield
        finally:
            self.policy.model.eval()

    def close(self) -> None:
        """End the run (idempotent): finish the trackers, on several processes tear the process group down, and
        release the lock on ``output_dir``.

        Before that, every process meets at a barrier and then sleeps briefly with the GIL released. Gloo's
        worker threads drop a finished collective's buffers just after it completes (a barrier keeps the
        collectives before it until it is dropped), and dropping a tensor Python has seen takes the GIL;
        one still doing so when the interpreter shuts down aborts the process ("terminate called without an
        active exception", 1 run in 8 of the two-process tests ended so). The last save ends with a
        collective, so without this pause a finished run could end in that abort."""
        if self._closed:
            return
        self._closed = True
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()
            time.sleep(GLOO_RELEASE_SECONDS)
        self.accelerator.end_training()
        if self.output_lock is not None:
            self.output_lock.release()

    def save(self, step: int) -> Path | None:
        """Write checkpoint ``step`` (every process takes part when the model is sharded)."""
        self.accelerator.wait_for_everyone()
        state = {
            "step": step,
            "sft_position": self.sft_position,
            "controller": self.controller.state_dict() if self.controller else None,
            "budget": asdict(self.budget),
            "relift_buffer": list(self.relift.items) if self.relift is not None else None,
            "relift_sft_updates": self.relift_sft_updates,
        }
        # ReLIFT's optimiser once it has stepped: saving an unstepped one would initialise its state (a zero step).
        relift_optimizer = {RELIFT_OPTIMIZER: self.relift_optimizer} if self.relift_sft_updates else {}
        return save_checkpoint(
            self.checkpoints,
            step,
            policy=self.policy,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=state,
            extra={"critic": self.critic.state_dict()} if self.critic is not None else {},
            extra_optimizers=relift_optimizer,
            lora_base_model=self.base_model if self.config.lora_rank else None,
            is_main=self.accelerator.is_main_process,
        )

    def _claim_output_dir(self, resume: bool, overwrite: bool) -> tuple[Path | None, bool]:
        """(Main process.) Lock ``output_dir`` against other writers; unless resuming make way for a new run there
        (`start_new_run`: a run already there is refused, or deleted with `overwrite`); then `_starting_checkpoint`."""
        self.output_lock = DirectoryLock(self.output_dir, what="output_dir")
        try:
            if not resume:
                start_new_run(self.output_dir, overwrite=overwrite)
            return self._starting_checkpoint(resume)
        except BaseException:
            self.output_lock.release()
            raise

    def _starting_checkpoint(self, resume: bool) -> tuple[Path | None, bool]:
        """The checkpoint to start from and whether it is a warm start: with `resume` this run's newest usable
        one (`resumable_checkpoint`) if its settings may continue it (`check_resume_settings`), else
        ``warm_start``'s, else none."""
        config = self.config
        if resume:
            checkpoint = resumable_checkpoint(self.checkpoints)
            if checkpoint is not None:
                done = load_trainer_state(checkpoint)["step"]
                check_resume_settings(config, self.output_dir / "config.yaml", done)
                if done == config.steps:
                    log.info("%s is at step %d of %d: nothing left to train", checkpoint, done, config.steps)
                return checkpoint, False
            log.info("no checkpoint under %s; starting from step 0", self.checkpoints)
        if config.warm_start is not None:
            return warm_start_checkpoint(config), True
        return None, False

    def _restore(self, checkpoint: Path) -> None:
        """Load everything but the weights from `checkpoint` (checked by `amft_vlm.checkpoint.check_checkpoint`)."""
        state = load_trainer_state(checkpoint)
        self.start_step, self.sft_position = state["step"], state["sft_position"]
        self.budget = Budget(**state.get("budget", {}))
        if self.relift is not None:
            self.relift.items = list(state.get("relift_buffer") or [])
            self.relift_sft_updates = state.get("relift_sft_updates", 0)
        load_optimizer_state(checkpoint, self.policy, self.optimizer)
        if self.relift_sft_updates:
            load_optimizer_state(checkpoint, self.policy, self.relift_optimizer, name=RELIFT_OPTIMIZER)
        self.scheduler.load_state_dict(load_state_file(checkpoint / "scheduler.pt"))
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])
        if self.critic is not None and (checkpoint / "critic.pt").is_file():  # an SFT run's checkpoint has none
            self.critic.load_state_dict(load_state_file(checkpoint / "critic.pt"))
        restore_rng_states(load_state_file(checkpoint / RNG_FILE))
        log.info("resumed from %s at step %d", checkpoint, self.start_step)


def _decided_by_main_process(accelerator: Accelerator, decide: Callable[[], Any]) -> Any:
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


def _mini_batches(count: int, parts: int, *, seed: tuple[int, ...]) -> list[list[int]]:
    """``parts`` near-equal index lists covering ``range(count)``: in order for one part, else a seeded shuffle."""
    order = np.arange(count) if parts == 1 else np.random.default_rng(list(seed)).permutation(count)
    return [part.tolist() for part in np.array_split(order, parts)]


def _evidence_metrics(evidence: MetaEvidence, measurement: MetaMeasurement, digest: str) -> dict:
    """A meta step's metrics: its own dU/dmu, standard error and t, the pooled t (and effective states) the
    signal comes from, the share of validation states that tied, and the validation episodes' token digest."""
    own, pooled = evidence.step, evidence.pooled
    return {
        "meta_dU_dmu": own and own.value,
        "meta_stderr": own and own.stderr,
        "meta_t": own and _finite_or_none(own.t_statistic),
        "meta_pooled_t": pooled and _finite_or_none(pooled.t_statistic),
        "meta_pooled_states": pooled and pooled.states,
        "meta_tied_share": measurement.tied_states / max(measurement.states, 1),
        "validation_digest": digest,
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


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
