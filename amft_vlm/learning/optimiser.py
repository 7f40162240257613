"""The optimiser step every method takes, and its derivative in mu for the meta-gradient's look-ahead.

One update mixes the two gradients, ``g = mu g_SFT + (1 - mu) g_RL`` (a missing part counts as 0), clips
its norm and steps torch's AdamW (`mixed_adamw_step`). The controller (`amft_vlm.learning.controller`) only decides
mu; what a change of mu does to the parameters is computed here, forward through the update
(`MuTangent`, `adamw_tangent`, `ClipDerivative`): the mix goes through the clip and the Adam moments, so a
change of mu moves theta along the *preconditioned* difference of the two gradients. ``lookahead: sgd``
keeps Eq. 6's ``-lr (g_SFT - g_RL)``.

The step works on named buffers (`MixedGradients`): the gradients handed to it are taken over, and their
storage becomes the mix and the difference ``g_SFT - g_RL`` (so no parameter-sized tensor is allocated
beyond what the look-ahead keeps); the difference then becomes the look-ahead's direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from amft_vlm.learning.distributed import flat_dot, flat_dots, local_shard
from amft_vlm.run.config import TrainConfig

Gradients = list[torch.Tensor | None]
"""One gradient per parameter (None where no token reached it)."""


@dataclass(frozen=True)
class MixedGradients:
    """An update's gradient buffers by name."""

    mixed: Gradients
    """``mu g_SFT + (1 - mu) g_RL``: what the optimiser steps with."""
    difference: Gradients | None
    """``g_SFT - g_RL`` (None unless both were given): how the mix changes with mu."""
    cosine: float | None
    """Cosine of g_SFT and g_RL (None unless both were given)."""


def mix_gradients(g_sft: Gradients | None, g_rl: Gradients | None, *, mu: float) -> MixedGradients:
    """The mix of `g_sft` and `g_rl` at `mu`, taking both over: their tensors are reused as the buffers.

    With both, each parameter's ``g_RL`` tensor becomes the difference ``g_SFT - g_RL`` and its ``g_SFT``
    tensor the mix ``g_SFT - (1 - mu) (g_SFT - g_RL)``; a parameter with no gradient on either side stays None,
    one with a single side gets a zero for the other. With one of them, it is scaled by its weight.
    """
    if g_sft is not None and g_rl is not None:
        sft_sq, rl_sq, cross = flat_dots([(g_sft, g_sft), (g_rl, g_rl), (g_sft, g_rl)])
        cosine = cross / math.sqrt(sft_sq * rl_sq) if sft_sq > 0 and rl_sq > 0 else 0.0
        mixed: Gradients = []
        difference: Gradients = []
        for sft, rl in zip(g_sft, g_rl, strict=True):
            if sft is None and rl is None:
                mixed.append(None)
                difference.append(None)
                continue
            if sft is None:
                sft = torch.zeros_like(rl)
            if rl is None:
                rl = torch.zeros_like(sft)
            rl.sub_(sft).neg_()  # rl's storage now holds g_SFT - g_RL
            sft.sub_(rl, alpha=1.0 - mu)  # and sft's the mix
            mixed.append(sft)
            difference.append(rl)
        return MixedGradients(mixed, difference, cosine)
    only, weight = (g_sft, mu) if g_sft is not None else (g_rl, 1.0 - mu)
    if only is None:
        raise ValueError("a step needs g_SFT, g_RL or both")
    if weight != 1.0:
        for gradient in only:
            if gradient is not None:
                gradient.mul_(weight)
    return MixedGradients(list(only), None, None)


@dataclass(frozen=True)
class ClipDerivative:
    """How the gradient-norm clip of ``g(mu)`` changes with mu: ``dg_clipped/dmu = scale * delta + rate * g_clipped``.

    Without clipping (norm <= max_norm) ``scale = 1`` and ``rate = 0``. With it, torch's clip multiplies by
    ``c = max_norm / (n + 1e-6)`` where ``n = |g|``, so ``dc/dmu = -c <g, delta> / (n (n + 1e-6))``.
    """

    scale: float
    rate: float

    @classmethod
    def of(cls, *, total_norm: float, max_norm: float, mix_dot_delta: float) -> ClipDerivative:
        """From the unclipped norm ``n``, the clip's ``max_norm`` (<= 0: no clipping) and ``<g, g_SFT - g_RL>``."""
        coefficient = max_norm / (total_norm + 1e-6) if max_norm > 0 else 1.0
        if coefficient >= 1.0 or total_norm == 0.0:
            return cls(1.0, 0.0)
        return cls(coefficient, -mix_dot_delta / (total_norm * (total_norm + 1e-6)))


def adamw_tangent(
    delta: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    clip: ClipDerivative,
    exp_avg_tangent: torch.Tensor | None = None,
    exp_avg_sq_tangent: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Derivatives in mu of one parameter's AdamW step just taken (torch's AdamW, amsgrad off).

    The step was ``theta' = theta (1 - lr wd) - lr / b1 * m / (sqrt(v) / sqrt(b2) + eps)`` with
    ``m = beta1 m_prev + (1 - beta1) g``, ``v = beta2 v_prev + (1 - beta2) g^2``, ``b_i = 1 - beta_i^step``
    and ``g`` the clipped gradient ``(1 - mu) g_RL + mu g_SFT``. Arguments are the values *after* the
    step: ``grad`` the clipped g, ``exp_avg``/``exp_avg_sq`` m and v; ``delta = g_SFT - g_RL``;
    ``exp_avg_tangent``/``exp_avg_sq_tangent`` the derivatives of m_prev and v_prev in mu (None: 0, the
    first update after mu was chosen). Returns (d of the step's change of theta, dm, dv); the weight
    decay factor does not depend on mu.
    """
    beta1, beta2 = betas
    bias1, bias2_sqrt = 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)
    dtype = torch.promote_types(grad.dtype, torch.float32)  # half-precision state is differentiated in float32
    grad, exp_avg = grad.to(dtype), exp_avg.to(dtype)
    dgrad = clip.scale * delta.to(dtype) + clip.rate * grad
    dexp_avg = (1.0 - beta1) * dgrad
    dexp_avg_sq = 2.0 * (1.0 - beta2) * grad * dgrad
    if exp_avg_tangent is not None:
        dexp_avg = dexp_avg + beta1 * exp_avg_tangent
    if exp_avg_sq_tangent is not None:
        dexp_avg_sq = dexp_avg_sq + beta2 * exp_avg_sq_tangent
    root = exp_avg_sq.to(dtype).sqrt()
    denom = root / bias2_sqrt + eps
    # d sqrt(v) = dv / (2 sqrt(v)); where v = 0 every gradient so far was 0 and the step did not move.
    droot = torch.where(root > 0, dexp_avg_sq / (2.0 * root.clamp_min(1e-30)), torch.zeros_like(root))
    dstep = -(lr / bias1) * (dexp_avg / denom - exp_avg * (droot / bias2_sqrt) / denom**2)
    return dstep, dexp_avg, dexp_avg_sq


class MuTangent:
    """``d theta/d mu`` carried forward through one iteration's optimiser updates (forward mode).

    Each update adds its own dependence on mu: through the mix and the clip of its gradient and, for
    ``lookahead="adam"``, through AdamW's moments, whose derivatives are carried from one update to
    the next (kept only while more updates follow). The gradients themselves are treated as fixed:
    how an earlier update's change of theta moves a later gradient (a Hessian term) is left out, so
    with one update per iteration (the default) the result is exact and with several it is the
    linearisation the look-ahead stands for. ``lookahead="sgd"`` is Eq. 6's ``-lr (g_SFT - g_RL)`` per update.
    """

    def __init__(self, lookahead: str) -> None:
        if lookahead not in ("adam", "sgd"):
            raise ValueError(f"lookahead must be 'adam' or 'sgd'; got {lookahead!r}")
        self.lookahead = lookahead
        self.theta: Gradients | None = None
        """d theta/d mu per parameter so far (None before the first update or after an invalid one)."""
        self.valid = True
        self._exp_avg: Gradients | None = None
        self._exp_avg_sq: Gradients | None = None

    def invalidate(self) -> None:
        """An update without both gradients: mu did not enter it the way the look-ahead assumes."""
        self.valid, self.theta, self._exp_avg, self._exp_avg_sq = False, None, None, None

    def advance(self, parameters: Sequence[torch.Tensor], adamw: torch.optim.Optimizer, difference: Gradients, clip: ClipDerivative, *, more_updates: bool) -> None:
        """Add the update just taken, whose ``g_SFT - g_RL`` is `difference`; the tangent takes `difference`'s
        tensors over as the storage of its new ``d theta/d mu``."""
        if not self.valid:
            return
        (group,) = adamw.param_groups
        lr, decay = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
        direction = difference
        exp_avg: Gradients = []
        exp_avg_sq: Gradients = []
        for index, (parameter, buffer) in enumerate(zip(parameters, direction, strict=True)):
            if buffer is None:  # no gradient on either side: the step did not involve mu here
                exp_avg.append(None)
                exp_avg_sq.append(None)
                continue
            local = local_shard(buffer)  # shard-local arithmetic: the same on a DTensor's shards
            if self.lookahead == "sgd":
                local.mul_(-lr)
            else:
                state = adamw.state[parameter]
                dstep, dm, dv = adamw_tangent(
                    local,
                    local_shard(parameter.grad),
                    local_shard(state["exp_avg"]),
                    local_shard(state["exp_avg_sq"]),
                    step=int(state["step"]),
                    lr=lr,
                    betas=group["betas"],
                    eps=group["eps"],
                    clip=clip,
                    exp_avg_tangent=self._exp_avg[index] if self._exp_avg is not None else None,
                    exp_avg_sq_tangent=self._exp_avg_sq[index] if self._exp_avg_sq is not None else None,
                )
                local.copy_(dstep)
                exp_avg.append(dm if more_updates else None)
                exp_avg_sq.append(dv if more_updates else None)
            if self.theta is not None and self.theta[index] is not None:
                local.add_(local_shard(self.theta[index]), alpha=decay if self.lookahead == "adam" else 1.0)
        self.theta = direction
        self._exp_avg, self._exp_avg_sq = (exp_avg, exp_avg_sq) if more_updates and self.lookahead == "adam" else (None, None)


@dataclass(frozen=True)
class MixedStep:
    """What `mixed_adamw_step` did."""

    grad_norm: float | None
    """Norm of the mixed gradient before clipping (None without clipping)."""
    cos_sft_rl: float | None
    """Cosine of g_SFT and g_RL (None unless both were given)."""


def mixed_adamw_step(
    parameters: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    g_sft: Gradients | None,
    g_rl: Gradients | None,
    *,
    mu: float,
    max_grad_norm: float,
    tangent: MuTangent | None = None,
    more_updates: bool = False,
) -> MixedStep:
    """One update: ``g = mu g_SFT + (1 - mu) g_RL`` (`mix_gradients`), norm clip, optimiser step.

    The gradients are taken over (`mix_gradients`): pass tensors nothing else reads afterwards. With a
    `tangent` it also carries ``d theta/d mu`` through this update (`MuTangent.advance`; `more_updates`
    says whether the iteration has more updates after this one). ``optimizer`` is a plain torch AdamW
    (amsgrad off) over `parameters` in one group (any optimiser without a tangent).
    """
    if tangent is not None and tangent.lookahead == "adam" and (
        not isinstance(optimizer, torch.optim.AdamW) or optimizer.param_groups[0]["amsgrad"] or optimizer.param_groups[0]["maximize"]
    ):
        raise ValueError(f"lookahead 'adam' differentiates torch.optim.AdamW without amsgrad or maximize; got {optimizer!r}")
    buffers = mix_gradients(g_sft, g_rl, mu=mu)
    if tangent is not None and buffers.difference is None:
        tangent.invalidate()
    track = tangent is not None and tangent.valid
    mix_dot_delta = flat_dot(buffers.mixed, buffers.difference) if track and tangent.lookahead == "adam" else 0.0
    for parameter, gradient in zip(parameters, buffers.mixed, strict=True):
        parameter.grad = gradient
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)) if max_grad_norm > 0 else None
    optimizer.step()
    if track:
        clip = ClipDerivative.of(total_norm=grad_norm or 0.0, max_norm=max_grad_norm, mix_dot_delta=mix_dot_delta)
        tangent.advance(parameters, optimizer, buffers.difference, clip, more_updates=more_updates)
    optimizer.zero_grad(set_to_none=True)
    return MixedStep(grad_norm, buffers.cosine)


def build_optimizer(config: TrainConfig, parameters: Sequence[torch.Tensor], *, fused: bool) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """torch's AdamW over `parameters` and the learning-rate schedule (cosine or constant after warm-up).

    Updates go through torch's AdamW itself, not accelerate's wrapper: the loss is never scaled, and the
    look-ahead differentiates exactly this step. `fused` (CUDA) avoids the parameter-sized temporary of the
    default foreach kernel. The scheduler is not accelerate's either: its wrapper advances once per process,
    which assumes each process adds its own batch; here the global batch is fixed and sharded.
    """
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)
    return optimizer, _learning_rate_schedule(config, optimizer)


def build_relift_optimizer(config: TrainConfig, parameters: Sequence[torch.Tensor], *, fused: bool) -> torch.optim.AdamW:
    """ReLIFT's AdamW for its SFT updates: the authors' second optimiser, with moments of its own."""
    return torch.optim.AdamW(parameters, lr=config.relift.sft_lr_ratio * config.learning_rate, weight_decay=config.weight_decay, fused=fused)


def _learning_rate_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    if config.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.steps)
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=config.lr_warmup_steps)


def learning_rate_factors(config: TrainConfig, count: int) -> list[float]:
    """The schedule's multiple of ``learning_rate`` at iterations 0 .. `count` - 1, as `build_optimizer` sets it up."""
    schedule = _learning_rate_schedule(config, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    return [schedule.lr_lambdas[0](step) for step in range(count)]
