"""The objectives by name: the table a method's row picks its ``L_SFT`` and ``L_RL`` from, and the loss pass.

An `Objective` is two pure functions and the type of what it reports:

- ``prepare(context, batch)``, once per pass over every process's batch: what a micro-batch cannot know
  itself (`GradientAccumulator` takes a token mean per micro-batch), i.e. the global normalisers of the
  peers' terms (`amft_vlm.learning.peers`); most objectives need nothing;
- ``loss(part, scores, prepared, config) -> (token-mean loss, stats)`` on one micro-batch, one of
  `amft_vlm.learning.losses` on its flat token tensors;
- ``stats``: the dataclass of floats that loss reports; its field names are the names the metrics carry.

`objective_gradient` is the pass itself, a straight chain: prepare, then per micro-batch select, score,
loss, backward (`amft_vlm.learning.batch.GradientAccumulator`), then the gradient and the token-weighted stats.

| name | kind | prepared once per pass | loss per micro-batch |
|---|---|---|---|
| ``nll``, ``chord_phi``, ``dft`` | ``L_SFT`` | nothing | `weighted_sft_loss` (token weight 1, sg(p(1-p)), sg(p)) |
| ``relift_sft`` | ReLIFT's SFT update | nothing | `relift_sft_loss` (NLL minus its entropy bonus) |
| ``clipped`` | ``L_RL`` | nothing | `clipped_policy_loss` (PPO-clip) |
| ``luffy`` | ``L_RL`` | its normalisation (`luffy_scale`) | `luffy_policy_loss` with the expert's tokens marked, plus `entropy_bonus` |
| ``srft`` | ``L_RL`` | token count per kind (`srft_counts`); with ``srft.entropy: rollouts``, H on the policy's answers (`mean_token_entropy`) | `srft_loss` (with ``srft.entropy: token``, each token's own H), plus `entropy_bonus` |
| ``relift`` | ``L_RL`` | released form: the token sum over max_new_tokens (`luffy_scale`, ``max_length``); paper form: nothing | `relift_policy_loss` (entropy scored with its graph), or `clipped_policy_loss` |

`UpdateMetrics` gathers an iteration's passes and optimiser steps into the metrics it logs, by type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from amft_vlm.learning.batch import (
    GradientAccumulator,
    PassResult,
    RolloutBatch,
    TokenScores,
    micro_batches,
    score_trajectories,
)
from amft_vlm.learning.distributed import Parallel
from amft_vlm.learning.losses import (
    clipped_policy_loss,
    entropy_bonus,
    luffy_policy_loss,
    relift_policy_loss,
    relift_sft_loss,
    srft_loss,
    srft_token_kinds,
    weighted_sft_loss,
)
from amft_vlm.learning.peers import expert_token_mask, is_demonstration, luffy_scale, srft_counts
from amft_vlm.rollout.trajectory import Trajectory

if TYPE_CHECKING:
    from agents.policy import VLMPolicy
    from amft_vlm.learning.optimiser import MixedStep
    from amft_vlm.run.config import TrainConfig


@dataclass(frozen=True)
class PassContext:
    """What a pass reads besides its batch: the policy (at the pass's parameters), the processes, the run's
    settings, and the sampling temperature (the RL objectives score the rollouts at it; the SFT ones at 1)."""

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


# ------------------------------------------------------------------------------------------------------
# What each objective reports: the field names are the metric names.


@dataclass(frozen=True)
class ClippedStats:
    """PPO-clip's diagnostics."""

    clip_fraction: float
    approx_kl: float
    ratio: float


@dataclass(frozen=True)
class LuffyStats:
    """LUFFY's diagnostics and its two terms."""

    ratio: float
    shaped_probability: float
    expert_token_share: float
    luffy_policy_gradient: float
    luffy_entropy_bonus: float


@dataclass(frozen=True)
class SrftStats:
    """SRFT's weights, its four terms and its entropy bonus."""

    srft_w_sft: float
    srft_w_rl: float
    srft_demo_sft: float
    srft_demo_rl: float
    srft_self_positive: float
    srft_self_negative: float
    srft_entropy: float
    srft_entropy_bonus: float


@dataclass(frozen=True)
class ReliftStats:
    """ReLIFT's RL steps: the mean ratio, and the clip's share (0 in the released form, which has no clip)."""

    ratio: float
    clip_fraction: float


# ------------------------------------------------------------------------------------------------------
# The objectives' functions.

Loss = tuple[torch.Tensor, Any]
"""A micro-batch's token-mean loss and its stats (None for an objective without)."""


def nothing_to_prepare(context: PassContext, batch: RolloutBatch) -> None:
    """The pass needs no global value before its micro-batches."""
    return None


def never(config: TrainConfig) -> bool:
    """No entropy bonus: the entropies are scored without their graph."""
    return False


def _sft_loss(weighting: str) -> Callable[[RolloutBatch, TokenScores, Any, TrainConfig], Loss]:
    def loss(part: RolloutBatch, scores: TokenScores, prepared: Any, config: TrainConfig) -> Loss:
        return weighted_sft_loss(scores.logprobs, weighting), None

    loss.__doc__ = f"``L_SFT`` with the {weighting} token weight (`amft_vlm.learning.losses.weighted_sft_loss`)."
    return loss


def relift_sft(part: RolloutBatch, scores: TokenScores, prepared: Any, config: TrainConfig) -> Loss:
    """ReLIFT's SFT update: the NLL minus ``relift.entropy_coef`` x the mean entropy."""
    return relift_sft_loss(scores.logprobs, scores.entropy, entropy_coef=config.relift.entropy_coef), None


def clipped(part: RolloutBatch, scores: TokenScores, prepared: Any, config: TrainConfig) -> Loss:
    """PPO-clip on the rollouts' advantages."""
    value, stats = clipped_policy_loss(scores.logprobs, scores.old_logprobs, scores.advantages, clip_epsilon=config.clip_epsilon)
    return value, ClippedStats(stats.clip_fraction, stats.approx_kl, stats.mean_ratio)


def prepare_luffy(context: PassContext, batch: RolloutBatch) -> float:
    """LUFFY's normalisation of the pass (``luffy.normaliser``)."""
    config = context.config
    return luffy_scale(context.parallel, batch.trajectories, config.max_new_tokens, normaliser=config.luffy.normaliser)


def luffy(part: RolloutBatch, scores: TokenScores, scale: float, config: TrainConfig) -> Loss:
    """LUFFY: the mixed-policy loss over its normalisation plus the entropy bonus."""
    expert = expert_token_mask(part.trajectories, scores.logprobs.device)
    value, shaped = luffy_policy_loss(
        scores.logprobs, scores.old_logprobs, scores.advantages, expert, shaping_gamma=config.luffy.shaping_gamma, scale=scale
    )
    bonus = entropy_bonus(scores.entropy, config.luffy.entropy_coef)
    stats = LuffyStats(
        shaped.mean_on_policy_ratio, shaped.mean_shaped_probability, shaped.expert_token_share, float(value.detach()), float(bonus.detach())
    )
    return value + bonus, stats


@dataclass(frozen=True)
class SrftPass:
    """What SRFT counts once per pass: the tokens of each kind, their total, and (``srft.entropy: rollouts``) H."""

    counts: dict[int, int]
    total: int
    entropy: float | None


def prepare_srft(context: PassContext, batch: RolloutBatch) -> SrftPass:
    """SRFT's global token counts per kind and, with ``srft.entropy: rollouts``, the policy's mean token entropy on
    its own answers of the whole pass (one number for every micro-batch and process, so SRFT's weights do not
    depend on how the pass is split)."""
    counts, total = srft_counts(context.parallel, batch.trajectories, batch.turn_advantages)
    entropy = None
    if context.config.srft.entropy == "rollouts":
        own = [t for t in batch.trajectories if not is_demonstration(t)]
        entropy = mean_token_entropy(context.policy, context.parallel, own, temperature=context.temperature)
    return SrftPass(counts, total, entropy)


def srft(part: RolloutBatch, scores: TokenScores, prepared: SrftPass, config: TrainConfig) -> Loss:
    """SRFT: `srft_loss` in the form the config's ``srft_*`` settings choose, plus the entropy bonus."""
    kinds = srft_token_kinds(scores.advantages, expert_token_mask(part.trajectories, scores.logprobs.device))
    value, terms = srft_loss(
        scores.logprobs, scores.old_logprobs, scores.advantages, kinds,
        entropy=scores.entropy.detach() if prepared.entropy is None else prepared.entropy,
        counts=prepared.counts, total_tokens=prepared.total,
        sft_entropy_sign=config.srft.sft_entropy_sign, shaping_gamma=config.srft.shaping_gamma,
        self_rl=config.srft.self_rl, clip_epsilon=config.clip_epsilon,
    )  # fmt: skip
    bonus = entropy_bonus(scores.entropy, config.srft.entropy_coef)
    stats = SrftStats(
        terms.w_sft, terms.w_rl, terms.demo_sft, terms.demo_rl, terms.self_positive, terms.self_negative, terms.demo_entropy, float(bonus.detach())
    )
    return value + bonus, stats


def prepare_relift(context: PassContext, batch: RolloutBatch) -> float | None:
    """ReLIFT's released form: the token sum over max_new_tokens (the paper's form needs nothing)."""
    if context.config.relift.rl_loss == "paper":
        return None
    return luffy_scale(context.parallel, batch.trajectories, context.config.max_new_tokens, normaliser="max_length")


def relift(part: RolloutBatch, scores: TokenScores, scale: float | None, config: TrainConfig) -> Loss:
    """ReLIFT's RL steps: its authors' released form (``relift.rl_loss: released``) or the paper's GRPO (PPO-clip)."""
    if config.relift.rl_loss == "paper":
        value, stats = clipped(part, scores, None, config)
        return value, ReliftStats(stats.ratio, stats.clip_fraction)
    value, released = relift_policy_loss(
        scores.logprobs, scores.old_logprobs, scores.advantages, scores.entropy, scale=scale, entropy_coef=config.relift.entropy_coef
    )
    return value, ReliftStats(released.mean_ratio, 0.0)


@dataclass(frozen=True)
class Objective:
    """An entry of `OBJECTIVES` (see the module docstring)."""

    loss: Callable[[RolloutBatch, TokenScores, Any, TrainConfig], Loss]
    prepare: Callable[[PassContext, RolloutBatch], Any] = nothing_to_prepare
    stats: type | None = None
    """The dataclass `loss` reports (None: nothing beyond the loss)."""
    entropy_grad: Callable[[TrainConfig], bool] = never
    """Whether a run's loss has an entropy bonus, so the entropies are scored with their graph."""
    on_rollouts: bool = True
    """Scored at the sampling temperature with the batch's advantages (an RL objective); else at 1 (SFT)."""


OBJECTIVES: dict[str, Objective] = {
    "nll": Objective(_sft_loss("nll"), on_rollouts=False),
    "chord_phi": Objective(_sft_loss("chord_phi"), on_rollouts=False),
    "dft": Objective(_sft_loss("dft"), on_rollouts=False),
    "relift_sft": Objective(relift_sft, entropy_grad=lambda config: config.relift.entropy_coef > 0, on_rollouts=False),
    "clipped": Objective(clipped, stats=ClippedStats),
    "luffy": Objective(luffy, prepare_luffy, LuffyStats, entropy_grad=lambda config: config.luffy.entropy_coef > 0),
    "srft": Objective(srft, prepare_srft, SrftStats, entropy_grad=lambda config: config.srft.entropy_coef > 0),
    "relift": Objective(
        relift, prepare_relift, ReliftStats, entropy_grad=lambda config: config.relift.rl_loss == "released" and config.relift.entropy_coef > 0
    ),
}
"""The objectives by the names `amft_vlm.learning.methods.Method` rows give (``sft_objective``, ``rl_objective``)."""


def objective_gradient(
    objective: Objective, context: PassContext, batch: RolloutBatch, parameters: Sequence[torch.Tensor], *, micro_batch_count: int
) -> PassResult:
    """One pass of `objective` over `batch` (this process's share of it): its gradient and totals over every process."""
    prepared = objective.prepare(context, batch)
    temperature = context.temperature if objective.on_rollouts else 1.0
    entropy_grad = objective.entropy_grad(context.config)
    accumulator = GradientAccumulator(context.parallel, batch.trajectories, objective.stats)
    for indices in micro_batches(len(batch), micro_batch_count):
        part = batch.select(indices)
        scores = score_trajectories(
            context.policy, part.trajectories, temperature=temperature, turn_advantages=part.turn_advantages, entropy_grad=entropy_grad
        )
        loss, stats = objective.loss(part, scores, prepared, context.config)
        accumulator.add(loss, scores, stats)
    return accumulator.finish(parameters)


@dataclass
class UpdateMetrics:
    """An iteration's metrics over its optimiser updates.

    The losses, the RL objective's stats, the critic's and the step's metrics are averaged over the updates;
    the entropies and token counts are summed over the first pass over the batch (whose first mini-batch is
    scored by the policy that collected the rollouts, later ones after the earlier updates).
    """

    averaged: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    first_pass: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """Per kind (``sft``, ``rl``): the entropy sum and the token count of the first pass."""

    def add(self, *, first_pass: bool, sft: PassResult | None, rl: PassResult | None, critic: dict[str, float], step: MixedStep) -> None:
        """One update: its SFT and RL passes (None: the iteration has no such part), the critic's update, the step."""
        values: dict[str, float] = {}
        for kind, result in (("sft", sft), ("rl", rl)):
            if result is None:
                continue
            values[f"loss_{kind}"] = result.loss
            if result.stats is not None:
                values.update(dataclasses.asdict(result.stats))
            if first_pass:
                sums = self.first_pass.setdefault(kind, [0.0, 0.0])
                sums[0] += result.entropy_sum
                sums[1] += result.tokens
        values.update(critic)
        values.update({name: value for name, value in (("grad_norm", step.grad_norm), ("cos_sft_rl", step.cos_sft_rl)) if value is not None})
        for name, value in values.items():
            self.averaged.setdefault(name, []).append(value)

    def as_dict(self) -> dict[str, float]:
        """The averages, then per kind its first pass's tokens and mean token entropy (``tokens_*``, ``entropy_*``)."""
        metrics = {name: sum(values) / len(values) for name, values in self.averaged.items()}
        for kind, (entropy_sum, tokens) in self.first_pass.items():
            metrics[f"tokens_{kind}"] = int(tokens)
            metrics[f"entropy_{kind}"] = entropy_sum / max(tokens, 1)
        return metrics
