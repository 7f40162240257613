"""The RL objectives ``L_RL`` by name (`amft_vlm.methods.Method.rl_objective`), as the trainer's g_RL pass
uses them.

An objective has two parts:

- ``prepare(run, batch)``, once per pass over every process's batch: what a micro-batch cannot know
  itself (`amft_vlm.batch.accumulate_gradient` takes a token mean per micro-batch), i.e. the global
  normalisers of the peers' terms (`amft_vlm.peers`); it returns
- the micro-batch loss ``(part, scores) -> (token-mean loss, diagnostics)``, one of `amft_vlm.losses`.

| name | prepared once per pass | loss per micro-batch |
|---|---|---|
| ``clipped`` | nothing | `clipped_policy_loss` (PPO-clip) |
| ``luffy`` | its normalisation (`luffy_scale`) | `luffy_policy_loss` with the expert's tokens marked, plus `entropy_bonus` |
| ``srft`` | token count per kind (`srft_counts`); with ``srft.entropy: rollouts``, H on the policy's answers (`mean_token_entropy`) | `srft_loss` (with ``srft.entropy: token``, each token's own H), plus `entropy_bonus` |
| ``relift`` | released form: the token sum over max_new_tokens (`luffy_scale`, ``max_length``); paper form: nothing | `relift_policy_loss` (entropy scored with its graph), or `clipped_policy_loss` |

`RLObjective.loss_of` joins the two into the ``loss_of`` that `accumulate_gradient` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from amft_vlm.batch import LossOf, RolloutBatch, TokenScores, score_trajectories
from amft_vlm.distributed import Parallel
from amft_vlm.losses import (
    clipped_policy_loss,
    entropy_bonus,
    luffy_policy_loss,
    relift_policy_loss,
    srft_loss,
    srft_token_kinds,
)
from amft_vlm.peers import expert_token_mask, is_demonstration, luffy_scale, srft_counts
from amft_vlm.trajectory import Trajectory

if TYPE_CHECKING:
    from agents.policy import VLMPolicy
    from amft_vlm.config import TrainConfig

MicroBatchLoss = Callable[[RolloutBatch, TokenScores], tuple[torch.Tensor, dict[str, float]]]
"""``(micro-batch, its scores) -> (token-mean loss, diagnostics)``."""


@dataclass(frozen=True)
class RLPass:
    """What an objective reads while preparing a pass: the policy (at the pass's parameters), the processes,
    the run's settings, and the temperature the rollouts are scored at (the sampling temperature)."""

    policy: VLMPolicy
    parallel: Parallel
    config: TrainConfig
    temperature: float


def mean_token_entropy(
    policy: VLMPolicy, parallel: Parallel, trajectories: Sequence[Trajectory], *, temperature: float
) -> float:
    """Mean token entropy at `temperature` over `trajectories` of every process (each passes its own share),
    scored without gradient on the full weights."""
    entropy_sum, tokens = 0.0, 0
    if trajectories:
        with torch.no_grad(), parallel.full_weights():
            scores = score_trajectories(policy, trajectories, temperature=temperature)
        entropy_sum, tokens = float(scores.entropy.sum()), scores.num_tokens
    entropy_sum, tokens = parallel.sums([entropy_sum, tokens])
    return entropy_sum / max(tokens, 1)


def _clipped(run: RLPass, batch: RolloutBatch) -> MicroBatchLoss:
    def loss(part: RolloutBatch, scores: TokenScores) -> tuple[torch.Tensor, dict[str, float]]:
        value, stats = clipped_policy_loss(
            scores.logprobs, scores.old_logprobs, scores.advantages, clip_epsilon=run.config.clip_epsilon
        )
        return value, {"clip_fraction": stats.clip_fraction, "approx_kl": stats.approx_kl, "ratio": stats.mean_ratio}

    return loss


def _luffy(run: RLPass, batch: RolloutBatch) -> MicroBatchLoss:
    """LUFFY: the mixed-policy loss over its normalisation (``luffy.normaliser``) plus the entropy bonus."""
    config = run.config
    scale = luffy_scale(run.parallel, batch.trajectories, config.max_new_tokens, normaliser=config.luffy.normaliser)

    def loss(part: RolloutBatch, scores: TokenScores) -> tuple[torch.Tensor, dict[str, float]]:
        expert = expert_token_mask(part.trajectories, scores.logprobs.device)
        value, shaped = luffy_policy_loss(
            scores.logprobs, scores.old_logprobs, scores.advantages, expert,
            shaping_gamma=config.luffy.shaping_gamma, scale=scale,
        )  # fmt: skip
        bonus = entropy_bonus(scores.entropy, config.luffy.entropy_coef)
        return value + bonus, {
            "ratio": shaped.mean_on_policy_ratio, "shaped_probability": shaped.mean_shaped_probability,
            "expert_token_share": shaped.expert_token_share, "luffy_policy_gradient": float(value.detach()),
            "luffy_entropy_bonus": float(bonus.detach()),
        }  # fmt: skip

    return loss


def _srft(run: RLPass, batch: RolloutBatch) -> MicroBatchLoss:
    """SRFT: `srft_loss` in the form the config's ``srft_*`` settings choose, plus the entropy bonus."""
    config = run.config
    counts, total = srft_counts(run.parallel, batch.trajectories, batch.turn_advantages)
    entropy: float | None = None
    if config.srft.entropy == "rollouts":
        # The policy's mean token entropy on its own answers of the whole pass, one number for every
        # micro-batch and process, so SRFT's weights do not depend on how the pass is split.
        own = [t for t in batch.trajectories if not is_demonstration(t)]
        entropy = mean_token_entropy(run.policy, run.parallel, own, temperature=run.temperature)

    def loss(part: RolloutBatch, scores: TokenScores) -> tuple[torch.Tensor, dict[str, float]]:
        kinds = srft_token_kinds(scores.advantages, expert_token_mask(part.trajectories, scores.logprobs.device))
        value, terms = srft_loss(
            scores.logprobs, scores.old_logprobs, scores.advantages, kinds,
            entropy=scores.entropy.detach() if entropy is None else entropy, counts=counts, total_tokens=total,
            sft_entropy_sign=config.srft.sft_entropy_sign, shaping_gamma=config.srft.shaping_gamma,
            self_rl=config.srft.self_rl, clip_epsilon=config.clip_epsilon,
        )  # fmt: skip
        bonus = entropy_bonus(scores.entropy, config.srft.entropy_coef)
        return value + bonus, {
            "srft_w_sft": terms.w_sft, "srft_w_rl": terms.w_rl, "srft_demo_sft": terms.demo_sft, "srft_demo_rl": terms.demo_rl,
            "srft_self_positive": terms.self_positive, "srft_self_negative": terms.self_negative,
            "srft.entropy": terms.demo_entropy, "srft_entropy_bonus": float(bonus.detach()),
        }  # fmt: skip

    return loss


def _relift(run: RLPass, batch: RolloutBatch) -> MicroBatchLoss:
    """ReLIFT's RL steps: its authors' released form (``relift.rl_loss: released``) or the paper's GRPO (PPO-clip)."""
    config = run.config
    if config.relift.rl_loss == "paper":
        clipped = _clipped(run, batch)

        def paper_loss(part: RolloutBatch, scores: TokenScores) -> tuple[torch.Tensor, dict[str, float]]:
            value, metrics = clipped(part, scores)
            return value, {"ratio": metrics["ratio"], "clip_fraction": metrics["clip_fraction"]}

        return paper_loss
    scale = luffy_scale(run.parallel, batch.trajectories, config.max_new_tokens, normaliser="max_length")

    def released_loss(part: RolloutBatch, scores: TokenScores) -> tuple[torch.Tensor, dict[str, float]]:
        value, stats = relift_policy_loss(
            scores.logprobs, scores.old_logprobs, scores.advantages, scores.entropy, scale=scale, entropy_coef=config.relift.entropy_coef
        )
        return value, {"ratio": stats.mean_ratio, "clip_fraction": 0.0}

    return released_loss


def _relift_entropy_grad(config: TrainConfig) -> bool:
    return config.relift.rl_loss == "released" and config.relift.entropy_coef > 0


@dataclass(frozen=True)
class RLObjective:
    """One ``L_RL``: its pass preparation and micro-batch loss (see the module docstring) and the
    diagnostics that loss reports, token-weighted over the pass."""

    prepare: Callable[[RLPass, RolloutBatch], MicroBatchLoss]
    metrics: tuple[str, ...]
    entropy_grad: Callable[[TrainConfig], bool] | None = None
    """Whether a run's loss has an entropy bonus, so the entropies are scored with their graph (None: never)."""

    def loss_of(self, run: RLPass, batch: RolloutBatch) -> LossOf:
        """`accumulate_gradient`'s ``loss_of`` for a pass over `batch`: prepared now, then per micro-batch
        the rollouts (and demonstrations) scored with their advantages and the loss taken."""
        loss = self.prepare(run, batch)
        entropy_grad = self.entropy_grad is not None and self.entropy_grad(run.config)

        def loss_of(indices: Sequence[int]) -> tuple[torch.Tensor, TokenScores, dict[str, float]]:
            part = batch.select(indices)
            scores = score_trajectories(
                run.policy, part.trajectories, temperature=run.temperature, turn_advantages=part.turn_advantages,
                entropy_grad=entropy_grad,
            )
            value, metrics = loss(part, scores)
            return value, scores, metrics

        return loss_of


RL_OBJECTIVES: dict[str, RLObjective] = {
    "clipped": RLObjective(_clipped, ("clip_fraction", "approx_kl", "ratio")),
    "luffy": RLObjective(
        _luffy, ("ratio", "shaped_probability", "expert_token_share", "luffy_policy_gradient", "luffy_entropy_bonus"),
        entropy_grad=lambda config: config.luffy.entropy_coef > 0,
    ),
    "srft": RLObjective(_srft, (
        "srft_w_sft", "srft_w_rl", "srft_demo_sft", "srft_demo_rl", "srft_self_positive", "srft_self_negative", "srft.entropy",
        "srft_entropy_bonus",
    ), entropy_grad=lambda config: config.srft.entropy_coef > 0),  # fmt: skip
    "relift": RLObjective(_relift, ("ratio", "clip_fraction"), entropy_grad=_relift_entropy_grad),
}
"""The objectives by `amft_vlm.methods.Method.rl_objective`."""
