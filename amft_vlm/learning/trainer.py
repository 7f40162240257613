"""One trainer for AMFT and its baselines: the whole loop is `Trainer.train`, top to bottom.

Each training iteration (``steps`` of them):

1. **mu** for this iteration: the method's schedule or the AMFT controller (`amft_vlm.learning.methods`).
2. **Collect**: an expert batch for ``L_SFT`` (if mu > 0) and, if mu < 1, fresh rollouts of the policy
   (``episodes_per_step`` start states x ``group_size``). LUFFY and SRFT put a demonstration into each group,
   ReLIFT buffers those of all-failed groups (`amft_vlm.learning.peers`).
3. **Advantages**: one per turn, from the estimator the method's row names (`amft_vlm.learning.advantages`; GAE reads
   the critic's values, `amft_vlm.learning.critic`).
4. **Objectives**: ``ppo_epochs`` passes over the batch in mini-batches (``mini_batch_size`` rollouts and an
   equal share of the expert batch): the row's ``L_SFT`` and ``L_RL`` (`amft_vlm.learning.objectives`) in separate
   backward passes (``g_SFT``, ``g_RL``; their cosine is logged). With one pass and one mini-batch (the
   default) the PPO ratio is 1 and the clip never acts; with more, it does.
5. **Step**: per mini-batch the mix ``(1 - mu) g_RL + mu g_SFT``, gradient-norm clipping and AdamW
   (`amft_vlm.learning.optimiser`). ReLIFT adds, after that update, one SFT update with its own AdamW whenever its
   buffer is full.
6. **Controller** (AMFT, `amft_vlm.learning.controller`): the entropy term every iteration (H and H* on the same
   tokens at the sampling temperature); every ``meta_interval`` iterations the meta-gradient: grad U on
   validation episodes (the ``val`` split) at the parameters the update landed on, along the exact
   derivative of the update with respect to mu (`amft_vlm.learning.meta`).
7. **Log** to ``metrics.jsonl``, the trackers and the progress bar, with the budget consumed so far
   (`amft_vlm.run.budget`), and **checkpoint** atomically every ``save_every`` iterations. The learning-rate
   schedule advances once per iteration. ``resume=True`` continues from the newest usable checkpoint (a
   damaged one is skipped with a warning) with settings a resumed run may change
   (`amft_vlm.learning.resume.RESUME_MAY_CHANGE`).

The main process locks ``output_dir`` for the trainer's life (`amft_vlm.run.run_directory.DirectoryLock`: a second
writer is refused, naming this one) and, unless resuming, refuses to start over a run already there
(``overwrite=True`` deletes that run's files first).

The model is in training mode during the loss passes (so LoRA dropout acts there) and in eval mode
for sampling and scoring without gradient. Under ``accelerate launch`` or ``torchrun`` each process
collects its share of episodes; the strategy of `amft_vlm.learning.distributed` (ddp or fsdp2) sums every
gradient across processes in its backward pass, so the separate ``g_SFT`` / ``g_RL`` passes stay exact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
import yaml
from accelerate.utils import set_seed
from tqdm import tqdm

from agents.tiny import resolve_model_spec
from amft_vlm.learning.advantages import ADVANTAGE_ESTIMATORS
from amft_vlm.learning.batch import PassResult, RolloutBatch, mini_batches
from amft_vlm.learning.checkpoint import MetricsLog, write_text_atomic
from amft_vlm.learning.collection import VALIDATION_STREAM, Collector, mix_seed
from amft_vlm.learning.distributed import Parallel, check_training_layout
from amft_vlm.learning.losses import mix
from amft_vlm.learning.meta import evidence_metrics, meta_gradient
from amft_vlm.learning.methods import build_controller, method_mu
from amft_vlm.learning.objectives import (
    OBJECTIVES,
    PassContext,
    UpdateMetrics,
    mean_token_entropy,
    objective_gradient,
)
from amft_vlm.learning.optimiser import MuTangent, build_optimizer, build_relift_optimizer, mixed_adamw_step
from amft_vlm.learning.peers import ReliftBuffer
from amft_vlm.learning.resolve import resolve_method
from amft_vlm.learning.training_setup import (
    build_accelerator,
    build_critic,
    claim_output_dir,
    decided_by_main_process,
    load_expert_set,
    load_training_policy,
    restore_run,
    save_run,
    tracker_config,
)
from amft_vlm.rollout.engine import RolloutEngine
from amft_vlm.run.budget import Budget
from amft_vlm.run.config import TrainConfig, config_to_dict
from amft_vlm.run.preflight import check_run_inputs
from amft_vlm.run.run_directory import TRACKER_PROJECT, DirectoryLock

log = logging.getLogger(__name__)

VALIDATION_SEED_BASE = 1 << 30  # validation episodes never share seeds with training rollouts


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
        self.accelerator = build_accelerator(config)
        self._closed = False
        self.parallel = Parallel(config.distributed, self.accelerator)
        check_training_layout(config, self.method.controller, self.parallel)
        set_seed(config.seed)
        self.start_step, self.budget = 0, Budget()
        # Decided by the main process alone (its warnings once) and sent to the others: all load the same one, or all
        # stop with its error (another process writes output_dir, a run is there already, ...).
        self.output_lock: DirectoryLock | None = None

        def claim() -> tuple[Path | None, bool]:
            self.output_lock, checkpoint, warm_start = claim_output_dir(config, resume=resume, overwrite=overwrite)
            if resume and (checkpoint is None or warm_start):
                log.info("no checkpoint under %s; starting from step 0", self.checkpoints)
            return checkpoint, warm_start

        checkpoint, warm_start = decided_by_main_process(self.accelerator, claim)

        with self.accelerator.main_process_first():  # one process builds a tiny model, the others load it
            self.base_model = resolve_model_spec(config.model, self.output_dir / "initial-model", seed=config.seed)
        # With LoRA the policy is always the base model plus adapters (fresh, or the checkpoint's).
        model_path = str(checkpoint / "policy") if checkpoint and not config.lora_rank else self.base_model
        lora = (checkpoint / "lora") if checkpoint and config.lora_rank else None
        self.policy, self.parameters = load_training_policy(config, model_path, self.parallel, device=str(self.accelerator.device), lora_checkpoint=lora)
        fused = self.accelerator.device.type == "cuda"
        self.optimizer, self.scheduler = build_optimizer(config, self.parameters, fused=fused)
        reads_values = ADVANTAGE_ESTIMATORS[self.method.advantage(config)].needs_values and self.method.collects_rollouts
        self.critic = build_critic(config, self.policy, device=self.accelerator.device) if reads_values else None
        self.controller = build_controller(self.method, config)

        engine_kwargs = {"num_envs": config.num_envs, "temperature": config.temperature, "max_new_tokens": config.max_new_tokens}
        self.engine = RolloutEngine(self.policy, config.env_id, env_kwargs=config.env_kwargs, **engine_kwargs)
        self.validation_engine = RolloutEngine(self.policy, config.env_id, env_kwargs=config.validation_env_kwargs, **engine_kwargs)
        encoder = self.policy.encoder
        self.expert = load_expert_set(config, config.expert_data, encoder, self.engine, progress=progress) if self.method.uses_expert_data else []
        # The controlled test of `expert_data_after_warmup`: another expert set once the warm-up ends.
        after = config.expert_data_after_warmup
        self.expert_after_warmup = load_expert_set(config, after, encoder, self.engine, progress=progress) if after else None
        # A fixed probe of expert dialogues for entropy_source=expert: the first ones, the same at every step.
        probe = self.expert[: config.controller.entropy_probe_size] if self.controller else []
        self.entropy_probe = [t.with_image_inputs(encoder) for t in probe]

        # ReLIFT: the buffer, and an AdamW of its own for the SFT updates (the authors' second optimiser: own moments).
        self.relift = ReliftBuffer(config.relift.buffer_capacity(config.episodes_per_step)) if self.method.sft_buffer else None
        self.relift_optimizer = build_relift_optimizer(config, self.parameters, fused=fused) if self.relift is not None else None
        self.relift_sft_updates = 0
        sft_position = restore_run(self, checkpoint) if checkpoint is not None else 0
        self.collector = Collector(
            config, self.method, self.parallel, self.policy, self.engine, self.expert, expert_after_warmup=self.expert_after_warmup,
            controller=self.controller, critic=self.critic, relift=self.relift, budget=self.budget, sft_position=sft_position,
        )  # fmt: skip
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_log = MetricsLog(self.output_dir, is_main=self.accelerator.is_main_process)
        if self.accelerator.is_main_process:
            write_text_atomic(self.output_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
        self.metrics_log.keep_until(self.start_step, source=checkpoint.parent.parent if warm_start else self.output_dir)
        self.accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config(config))

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

            # Collect: expert batch for L_SFT, on-policy rollouts with their advantages for L_RL. Whether a part
            # exists is decided by mu (the same on every process); a process's share of it may be empty.
            sft_batch = self.collector.sft_batch(step) if mu > 0 else None
            rl_batch = None
            if mu < 1:
                rl_batch, rollout_metrics = self.collector.rollouts(step)
                metrics.update(rollout_metrics)
            wants_probe = controlled and controller.use_entropy and config.controller.entropy_source == "expert"
            probe_entropy = self._probe_entropy() if wants_probe else None

            # Objectives and steps: ppo_epochs x mini-batches of (g_SFT, g_RL) -> mix -> clip -> AdamW; on
            # meta-gradient iterations also d theta'/d mu of the update(s).
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
                metrics.update(controller.step_metrics(controlled=controlled))
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
    # Objectives and optimiser steps.

    def _update(
        self, step: int, mu: float, sft_batch: RolloutBatch | None, rl_batch: RolloutBatch | None, *, lookahead: bool
    ) -> tuple[dict, list[torch.Tensor] | None]:
        """``ppo_epochs`` passes over the iteration's batch in mini-batches, one optimiser update each.

        `sft_batch` and `rl_batch` are this process's shares (possibly empty) or None when the iteration
        has no such part (decided from mu, the same on every process, so every process makes the same
        collective calls). Returns the metrics (`UpdateMetrics`) and, with `lookahead`, ``d theta'/d mu``
        through all the updates (`MuTangent`; None when an update lacked g_SFT or g_RL).
        """
        config = self.config
        parts = 1 if config.mini_batch_size is None else math.ceil(config.episodes_per_step * config.group_size / config.mini_batch_size)
        tangent = MuTangent(config.controller.lookahead) if lookahead else None
        metrics, updates = UpdateMetrics(), config.ppo_epochs * parts
        for epoch in range(config.ppo_epochs):
            sft_parts = mini_batches(len(sft_batch or ()), parts, seed=(config.seed, step, epoch, 0))
            rl_parts = mini_batches(len(rl_batch or ()), parts, seed=(config.seed, step, epoch, 1))
            for part, (sft_indices, rl_indices) in enumerate(zip(sft_parts, rl_parts, strict=True)):
                sft = rl = None
                critic_metrics = {}
                with self._training_mode():
                    if sft_batch is not None:
                        sft = self._pass(self.method.sft_objective, sft_batch.select(sft_indices))
                    if rl_batch is not None:
                        rl = self._pass(self.method.rl_objective, rl_batch.select(rl_indices))
                if self.critic is not None and rl_batch is not None:
                    critic_metrics = self.critic.update(rl_batch.critic.select(rl_indices), self.parallel)
                more_updates = epoch * parts + part + 1 < updates
                taken = mixed_adamw_step(
                    self.parameters, self.optimizer, sft and sft.gradient, rl and rl.gradient,
                    mu=mu, max_grad_norm=config.max_grad_norm, tangent=tangent, more_updates=more_updates,
                )  # fmt: skip
                self.budget.updates += 1
                metrics.add(first_pass=epoch == 0, sft=sft, rl=rl, critic=critic_metrics, step=taken)
        return metrics.as_dict(), tangent.theta if tangent is not None else None

    def _pass(self, objective: str, batch: RolloutBatch) -> PassResult:
        """One pass of `OBJECTIVES[objective]` over `batch` (this process's share) at the current parameters,
        counted in the budget (its tokens; an SFT pass's examples too)."""
        entry = OBJECTIVES[objective]
        context = PassContext(self.policy, self.parallel, self.config, self.engine.sampling_temperature)
        result = objective_gradient(entry, context, batch, self.parameters, micro_batch_count=self.config.gradient_accumulation_steps)
        if not entry.on_rollouts:
            self.budget.expert_examples += result.examples
        self.budget.trained_tokens += result.tokens
        return result

    def _relift_update(self) -> dict:
        """ReLIFT: one SFT update on the newest ``capacity`` buffered demonstrations (this process's share of them),
        taken out of the buffer, with ReLIFT's own AdamW at ``relift.sft_lr_ratio`` x the step's learning rate."""
        config = self.config
        items = self.relift.drain()
        with self._training_mode():
            result = self._pass("relift_sft", RolloutBatch(self.collector.expert_share(items)))
        for group in self.relift_optimizer.param_groups:
            group["lr"] = config.relift.sft_lr_ratio * self.scheduler.get_last_lr()[0]
        taken = mixed_adamw_step(self.parameters, self.relift_optimizer, result.gradient, None, mu=1.0, max_grad_norm=config.relift.sft_max_grad_norm)
        self.budget.updates += 1
        self.relift_sft_updates += 1
        return {
            "relift_sft_loss": result.loss, "relift_sft_entropy": result.entropy_sum / max(result.tokens, 1),
            "relift_sft_examples": len(items), "relift_grad_norm": taken.grad_norm, "relift_sft_lr": self.relift_optimizer.param_groups[0]["lr"],
        }  # fmt: skip

    # ----------------------------------------------------------------------------------------------
    # The controller's measurements.

    def _probe_entropy(self) -> float:
        """Mean token entropy at the sampling temperature on the fixed expert probe (no gradient)."""
        probe = self.collector.share(self.entropy_probe)
        return mean_token_entropy(self.policy, self.parallel, probe, temperature=self.engine.sampling_temperature)

    def _meta_signal(self, step: int, direction: list[torch.Tensor | None], *, learning_rate: float) -> tuple[float | None, dict]:
        """dU/dmu along ``direction`` from validation episodes (this process's start states) of the updated policy,
        weighed by the controller (pooled with the earlier meta steps' evidence): the meta signal (None: none)
        and the meta step's metrics (`amft_vlm.learning.meta.evidence_metrics`)."""
        c = self.config.controller
        shard = self.collector.share([VALIDATION_SEED_BASE + i for i in range(c.validation_states)])
        seed = mix_seed(self.config.seed, step, VALIDATION_STREAM)
        with self.parallel.full_weights():
            episodes, _ = self.validation_engine.collect(shard, group_size=c.validation_samples, sampling_seed=seed, progress=False)
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
        return evidence.signal, evidence_metrics(evidence, measurement, self.parallel.digest([t.token_digest for t in episodes]))

    @contextlib.contextmanager
    def _training_mode(self):
        """The model in training mode for a loss pass (LoRA dropout acts), back in eval mode afterwards."""
        self.policy.model.train()
        try:
            yield
        finally:
            self.policy.model.eval()

    # ----------------------------------------------------------------------------------------------
    # Checkpoints and the end of the run.

    def close(self) -> None:
        """End the run (idempotent): finish the trackers, on several processes tear the process group down
        (`amft_vlm.learning.distributed.Parallel.close`), and release the lock on ``output_dir``."""
        if self._closed:
            return
        self._closed = True
        self.parallel.close()
        if self.output_lock is not None:
            self.output_lock.release()

    def save(self, step: int) -> Path | None:
        """Write checkpoint ``step`` (every process takes part when the model is sharded; `save_run`)."""
        return save_run(self, step)


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
