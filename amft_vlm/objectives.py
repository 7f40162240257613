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
| ``luffy`` | Dr.GRPO's scale (`luffy_scale`) | `luffy_policy_loss` with the expert's tokens marked |
| ``srft`` | token count per kind (`srft_counts`), H on the policy's answers (`mean_token_entropy`) | `srft_loss` |

`RLObjective.loss_of` joins the two into the ``loss_of`` that `accumulate_gradient` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from amft_vlm.batch import LossOf, RolloutBatch, TokenScores, score_trajectories
from amft_vlm.distributed import Parallel
from amft_vlm.losses import clipped_policy_loss, luffy_policy_loss, srft_loss, srft_token_kinds
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
    scale = luffy_scale(run.parallel, batch.trajectories, run.config.max_new_tokens)

    def loss(part: RolloutBatch, scores: TokenScores) -> tuple[torch.Tensor, dict[str, float]]:
        expert = expert_token_mask(part.trajectories, scores.logprobs.device)
        value, shaped = luffy_policy_loss(
            scores.logprobs, scores.old_logprobs, scores.advantages, expert,
            shaping_gamma=run.config.luffy_shaping_gamma, scale=scale,
        )  # fmt: skip
        return value, {
            "ratio": shaped.mean_on_policy_ratio, "shaped_probability": shaped.mean_shaped_probability,
            "expert_token_share": shaped.expert_token_share,
        }  # fmt: skip

    return loss


def _srft(run: RLPass, batch: RolloutBatch) -> MicroBatchLoss:
    counts, total = srft_counts(run.parallel, batch.trajectories, batch.turn_advantages)
    # H: the policy's mean token entropy on its own answers of the whole pass, one number for every
    # micro-batch and process, so SRFT's weights do not depend on how the pass is split.
    own = [t for t in batch.trajectories if not is_demonstration(t)]
    entropy = mean_token_entropy(run.policy, run.parallel, own, temperature=run.temperature)

    def loss(part: RolloutBatch, scores: TokenScores) -> tuple[torch.Tensor, dict[str, float]]:
        kinds = srft_token_kinds(scores.advantages, expert_token_mask(part.trajectories, scores.logprobs.device))
        value, terms = srft_loss(
            scores.logprobs, scores.advantages, kinds, entropy=entropy, counts=counts, total_tokens=total
        )
        return value, {
            "srft_w_sft": terms.w_sft, "srft_w_rl": terms.w_rl, "srft_demo_sft": terms.demo_sft, "srft_demo_rl": terms.demo_rl,
            "srft_self_positive": terms.self_positive, "srft_self_negative": terms.self_negative, "srft_entropy": entropy,
        }  # fmt: skip

    return loss


@dataclass(frozen=True)
class RLObjective:
    """One ``L_RL``: its pass preparation and micro-batch loss (see the module docstring) and the
    diagnostics that loss reports, token-weighted over the pass."""

    prepare: Callable[[RLPass, RolloutBatch], MicroBatchLoss]
    metrics: tuple[str, ...]

    def loss_of(self, run: RLPass, batch: RolloutBatch) -> LossOf:
        """`accumulate_gradient`'s ``loss_of`` for a pass over `batch`: prepared now, then per micro-batch
        the rollouts (and demonstrations) scored with their advantages and the loss taken."""
        loss = self.prepare(run, batch)

        def loss_of(indices: Sequence[int]) -> tuple[torch.Tensor, TokenScores, dict[str, float]]:
            part = batch.select(indices)
            scores = score_trajectories(
                run.policy, part.trajectories, temperature=run.temperature, turn_advantages=part.turn_advantages
            )
            value, metrics = loss(part, scores)
            return value, scores, metrics

        return loss_of


RL_OBJECTIVES: dict[str, RLObjective] = {
    "clipped": RLObjective(_clipped, ("clip_fraction", "approx_kl", "ratio")),
    "luffy": RLObjective(_luffy, ("ratio", "shaped_probability", "expert_token_share")),
    "srft": RLObjective(_srft, (
        "srft_w_sft", "srft_w_rl", "srft_demo_sft", "srft_demo_rl", "srft_self_positive", "srft_self_negative", "srft_entropy",
    )),  # fmt: skip
}
"""The objectives by `amft_vlm.methods.Method.rl_objective`."""
