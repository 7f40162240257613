"""The loss terms the trainer calls, as pure functions over flat token tensors.

Names follow the papers: ``L_SFT`` is the negative log-likelihood of the expert's tokens, ``L_RL`` the
clipped policy-gradient surrogate on the policy's own rollouts, and
``L_total = (1 - mu) * L_RL + mu * L_SFT`` (`mix`: AMFT mixes the two gradients with the same weights,
one backward pass each, so its controller can compare them; see `amft_vlm.learning.optimiser.mixed_adamw_step`).

Every per-token tensor is flat over the trainable tokens of a batch (`amft_vlm.learning.batch.TokenScores`): one
entry per response token, in order, nothing else. Token-level aggregation: a loss is the sum over all
trainable tokens of the batch divided by their count (each generated token weighs the same, whatever
the length of its sequence), as in DAPO and TRL's ``loss_type="dapo"``.

The peers' losses (`weighted_sft_loss` for CHORD-phi and DFT, `luffy_policy_loss`, `srft_loss`, ReLIFT's
`relift_policy_loss` and `relift_sft_loss`) keep that contract: each returns the token mean over the
tokens it is given, so `amft_vlm.learning.batch.GradientAccumulator` (micro-batch loss times its share of the
global tokens) still yields exactly the global value. Two consequences:

- A term averaged over a subset S of the tokens (SRFT's demonstration, positive and negative tokens) is
  written as a per-token coefficient ``N / |S|`` on S's tokens, with N the global trainable token count
  and |S| the global size of S, both counted across processes and micro-batches before the pass and
  passed in as arguments: ``(1 / N) * sum_{t in S} (N / |S|) * v_t`` is S's mean. A micro-batch cannot
  know these counts itself, and its own counts would make the accumulation inexact.
- A different global normalisation is a constant factor on the token mean, computed the same way before
  the pass: `max_length_scale` for LUFFY's released ``sum / max_length``, `dr_grpo_scale` for Dr.GRPO's
  ``sum / (sequences * max_length)``.
- An entropy bonus (LUFFY's and SRFT's released code) is `entropy_bonus`, added by the objective to the
  method's loss: the entropies then carry their graph (scored with ``entropy_grad``).

Weights written ``sg(...)`` in the papers are computed from detached tensors: they scale a token's
gradient but have none of their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

import torch


def token_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens (0 for none)."""
    return values.sum() / max(values.numel(), 1)


def sft_loss(logprobs: torch.Tensor) -> torch.Tensor:
    """``L_SFT``: mean negative log-likelihood of the expert's response tokens."""
    return -token_mean(logprobs)


def mix(rl: torch.Tensor | float, sft: torch.Tensor | float, mu: float) -> torch.Tensor | float:
    """``(1 - mu) * RL + mu * SFT``: the total loss (or gradient) of the mix with weight `mu` on SFT."""
    return (1.0 - mu) * rl + mu * sft


@dataclass(frozen=True)
class PolicyLossStats:
    """Diagnostics of a clipped policy-gradient step (all detached)."""

    clip_fraction: float
    approx_kl: float
    mean_ratio: float


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_epsilon: float = 0.2,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """``L_RL``: the PPO clipped surrogate, negated, averaged over generated tokens.

    ``ratio = exp(logprobs - old_logprobs)``; per token
    ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``, with ``advantages`` per token.
    ``clip_fraction`` is the share of tokens whose clipped term is the one in force (ratio above
    1 + eps with A > 0, or below 1 - eps with A < 0): their gradient is zero. A token outside the
    band on the other side keeps its gradient and is not counted.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
    loss = -token_mean(torch.minimum(unclipped, clipped))
    with torch.no_grad():
        was_clipped = ((ratio > 1.0 + clip_epsilon) & (advantages > 0)) | ((ratio < 1.0 - clip_epsilon) & (advantages < 0))
        stats = PolicyLossStats(
            clip_fraction=float(token_mean(was_clipped.float())),
            approx_kl=float(token_mean((ratio - 1.0) - log_ratio)),  # k3 estimator, >= 0
            mean_ratio=float(token_mean(ratio)),
        )
    return loss, stats


def value_loss(predicted: torch.Tensor, targets: torch.Tensor, old_values: torch.Tensor, *, clip_epsilon: float = 0.2) -> tuple[torch.Tensor, float]:
    """PPO's clipped value loss ``0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2)``, averaged over turns.

    Returns the loss and the number of turns whose clipped error is the larger one (the clip holds them back).
    """
    clipped = old_values + torch.clamp(predicted - old_values, -clip_epsilon, clip_epsilon)
    clipped_error, error = (clipped - targets) ** 2, (predicted - targets) ** 2
    held = float((clipped_error > error).sum())
    return 0.5 * torch.maximum(error, clipped_error).mean(), held


def _check_flat(**tensors: torch.Tensor) -> None:
    """Per-token tensors are flat and aligned: one entry per trainable token, the same count in each."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(shape != first for shape in shapes.values()):
        raise ValueError(
            f"per-token tensors must be flat with one entry per trainable token, all the same length; got shapes {shapes}"
        )


SFT_WEIGHTINGS = ("nll", "chord_phi", "dft")
"""The token weightings `weighted_sft_loss` knows: plain NLL, CHORD-phi's ``p * (1 - p)``, DFT's ``p``."""


def weighted_sft_loss(logprobs: torch.Tensor, weighting: str) -> torch.Tensor:
    """``-mean_t sg(w(p_t)) * log p_t`` over the expert's tokens, ``p_t = exp(logprobs)``.

    `weighting` (one of `SFT_WEIGHTINGS`): ``"nll"`` w = 1, exactly `sft_loss`; ``"chord_phi"`` w = p(1 - p),
    CHORD-phi, which damps tokens the policy is already sure of (p near 1) and tokens far off its
    distribution (p near 0); ``"dft"`` w = p, DFT, which cancels the 1/p of the NLL's gradient.
    The weight is detached: the gradient with respect to a token's log-prob is ``-w(p_t) / N``.
    """
    if weighting not in SFT_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {SFT_WEIGHTINGS}; got {weighting!r}")
    _check_flat(logprobs=logprobs)
    if weighting == "nll":
        return sft_loss(logprobs)
    probabilities = torch.exp(logprobs.detach())
    weights = probabilities * (1.0 - probabilities) if weighting == "chord_phi" else probabilities
    return -token_mean(weights * logprobs)


def dr_grpo_scale(total_tokens: int, sequences: int, max_length: int) -> float:
    """The factor that turns a token-mean loss into Dr.GRPO's ``sum / (sequences * max_length)``.

    ``total_tokens / (sequences * max_length)``, with all three global (every process and micro-batch of
    the pass): `total_tokens` the trainable tokens, `sequences` the response sequences they belong to,
    `max_length` the generation limit per sequence. A token mean times this factor is the sum over tokens
    divided by a constant, so a long response no longer weighs each of its tokens less (Dr.GRPO's point),
    and micro-batch accumulation stays exact because the factor is the same for every micro-batch.
    """
    if sequences <= 0 or max_length <= 0:
        raise ValueError(f"sequences and max_length must be positive; got sequences={sequences}, max_length={max_length}")
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be a count (>= 0); got {total_tokens}")
    return total_tokens / (sequences * max_length)


def max_length_scale(total_tokens: int, max_length: int) -> float:
    """The factor that turns a token-mean loss into ``sum / max_length``: LUFFY's released normalisation.

    ``total_tokens / max_length``, `total_tokens` global over the pass. LUFFY's code (``loss_remove_token_mean``)
    divides each micro-batch's token sum by the padded response length (its ``max_response_length``, 8192), and
    not also by the number of answers as Dr.GRPO does (`dr_grpo_scale`); here `max_length` is the generation
    limit per answer (``max_new_tokens``). The code's further division by its 8 processes (FSDP averages their
    gradients) is left out, so a run's loss does not depend on how many processes share it.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive; got {max_length}")
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be a count (>= 0); got {total_tokens}")
    return total_tokens / max_length


def entropy_bonus(entropy: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``-coefficient * token_mean(H)``: the entropy bonus of LUFFY's and SRFT's released code (0.001 each).

    `entropy` is each token's entropy with its graph, over every token of the pass (the expert's included, as
    the code's ``masked_mean(entropy, response_mask)``), so descent raises the policy's entropy.
    """
    if coefficient < 0:
        raise ValueError(f"the entropy bonus coefficient must be >= 0; got {coefficient}")
    _check_flat(entropy=entropy)
    return -coefficient * token_mean(entropy)


@dataclass(frozen=True)
class LuffyLossStats:
    """Diagnostics of a LUFFY step (all detached)."""

    mean_on_policy_ratio: float
    """Mean ``exp(logprobs - old_logprobs)`` over the policy's own tokens (0 when there are none)."""
    mean_shaped_probability: float
    """Mean ``f(p) = p / (p + gamma)`` over the expert's tokens (0 when there are none)."""
    expert_token_share: float
    """Share of the tokens that are the expert's (off-policy)."""


def luffy_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    off_policy: torch.Tensor,
    *,
    shaping_gamma: float = 0.1,
    scale: float = 1.0,
) -> tuple[torch.Tensor, LuffyLossStats]:
    """LUFFY's mixed-policy policy-gradient loss, ``scale * token_mean(values)``.

    `off_policy` (bool, per token) marks the expert's tokens. On the policy's own tokens
    ``value = -A * exp(logprobs - old_logprobs)``, unclipped (LUFFY's script: ``loss_remove_clip``); on the
    expert's, policy shaping with the behaviour probability taken as 1 and no clip: ``value = -A * f(p)``,
    ``f(p) = p / (p + gamma)``, whose gradient ``d f / d log p = gamma * p / (p + gamma)^2`` is larger for
    a low-probability token than the plain ``p`` would give. `old_logprobs` are ignored on expert tokens.
    `scale` is the global normalisation: `max_length_scale` for LUFFY's released ``sum / max_length``,
    `dr_grpo_scale` for Dr.GRPO's, 1 for a token mean. The advantages come in as they are (LUFFY's: the joint
    group's mean-centred returns, `amft_vlm.learning.advantages.mean_centred_advantages`).
    """
    _check_flat(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, off_policy=off_policy)
    if off_policy.dtype != torch.bool:
        raise ValueError(f"off_policy must be a bool tensor (True on the expert's tokens); got dtype {off_policy.dtype}")
    if shaping_gamma <= 0:
        raise ValueError(f"shaping_gamma must be positive (f(p) = p / (p + gamma)); got {shaping_gamma}")
    # Expert tokens have no sampling log-prob: keep their (unused) ratio at 1 so it cannot overflow.
    log_ratio = torch.where(off_policy, torch.zeros_like(logprobs), logprobs - old_logprobs)
    ratio = torch.exp(log_ratio)
    probabilities = torch.exp(logprobs)
    shaped = probabilities / (probabilities + shaping_gamma)
    loss = scale * token_mean(-advantages * torch.where(off_policy, shaped, ratio))
    with torch.no_grad():
        on_policy = ~off_policy
        experts = int(off_policy.sum())
        stats = LuffyLossStats(
            mean_on_policy_ratio=float(ratio[on_policy].sum()) / max(off_policy.numel() - experts, 1),
            mean_shaped_probability=float(shaped[off_policy].sum()) / max(experts, 1),
            expert_token_share=experts / max(off_policy.numel(), 1),
        )
    return loss, stats


class SrftToken(IntEnum):
    """What an SRFT token is, and so which term of the loss it enters."""

    DEMO = 0
    """The expert's demonstration: SFT term and off-policy policy-gradient term."""
    POSITIVE = 1
    """The policy's own sample with advantage > 0: the self-RL term, weighted by ``w_RL``."""
    NEGATIVE = 2
    """The policy's own sample with advantage < 0: the self-RL term, unweighted."""
    NEUTRAL = 3
    """The policy's own sample with advantage 0: no term."""


SRFT_SELF_RL_FORMS = ("advantage", "sign")
"""The forms of SRFT's self-RL term `srft_loss` knows: the authors' released code's and the paper's (Eq. 12)."""


def srft_token_kinds(advantages: torch.Tensor, is_demo: torch.Tensor) -> torch.Tensor:
    """Each token's `SrftToken` (int64): DEMO where `is_demo`, else by the sign of its advantage."""
    _check_flat(advantages=advantages, is_demo=is_demo)
    if is_demo.dtype != torch.bool:
        raise ValueError(f"is_demo must be a bool tensor (True on demonstration tokens); got dtype {is_demo.dtype}")
    kinds = torch.full(advantages.shape, int(SrftToken.NEUTRAL), dtype=torch.long, device=advantages.device)
    kinds[advantages > 0] = SrftToken.POSITIVE
    kinds[advantages < 0] = SrftToken.NEGATIVE
    kinds[is_demo] = SrftToken.DEMO
    return kinds


def srft_token_counts(kinds: torch.Tensor) -> dict[SrftToken, int]:
    """How many tokens of each `SrftToken` `kinds` holds: this process's share of `srft_loss`'s `counts`
    (sum them over processes and micro-batches before the pass)."""
    found = torch.bincount(kinds.long(), minlength=len(SrftToken)).tolist() if kinds.numel() else [0] * len(SrftToken)
    return {kind: int(found[kind]) for kind in SrftToken}


@dataclass(frozen=True)
class SrftLossStats:
    """Diagnostics of an SRFT step (all detached).

    Each is this micro-batch's share of a global value, like the loss: weighted by the micro-batch's share of the
    pass's tokens and summed over the pass, it is the global value. The four terms add up to the loss.
    """

    w_sft: float
    """Mean over the demonstration tokens of ``w_SFT = 0.5 * exp(+-H)``."""
    w_rl: float
    """Mean over the positive tokens of ``w_RL = 0.1 * exp(H)``."""
    demo_entropy: float
    """Mean over the demonstration tokens of the H their ``w_SFT`` reads."""
    demo_sft: float
    """``L_SFT^demo``: the weighted NLL of the demonstrations."""
    demo_rl: float
    """``L_RL^demo``: the off-policy policy-gradient term of the demonstrations."""
    self_positive: float
    """The self-RL term of the positive tokens (weighted by ``w_RL``)."""
    self_negative: float
    """The self-RL term of the negative tokens."""


def _srft_entropy(entropy: torch.Tensor | float, logprobs: torch.Tensor) -> torch.Tensor:
    """The H of SRFT's weights per token, detached: `entropy` itself (one per token) or one number spread."""
    if isinstance(entropy, torch.Tensor):
        _check_flat(logprobs=logprobs, entropy=entropy)
        values = entropy.detach().to(logprobs.dtype)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("entropy must be finite at every token")
        return values
    if not math.isfinite(entropy) or entropy < 0:
        raise ValueError(f"entropy must be the policy's mean token entropy, a finite number >= 0; got {entropy}")
    return torch.full_like(logprobs.detach(), float(entropy))


def srft_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    kinds: torch.Tensor,
    *,
    entropy: torch.Tensor | float,
    counts: Mapping[int, int],
    total_tokens: int,
    sft_entropy_sign: int = 1,
    shaping_gamma: float | None = 0.1,
    self_rl: str = "advantage",
    clip_epsilon: float = 0.2,
) -> tuple[torch.Tensor, SrftLossStats]:
    """SRFT's ``L = L_SFT^demo + L_RL^demo + L_RL^self``, as a token mean (see the module docstring).

    The defaults are the authors' released code (fyqqyf/SRFT, known from third-party reviews that quote it; see
    ``docs/peers.md``); the keywords select the paper's form (arXiv 2506.19767) where the two differ:

    - ``L_SFT^demo = mean_demo(w_SFT * -log p)``, ``w_SFT = 0.5 * exp(sft_entropy_sign * H)``: ``+1`` the code's
      ``exp(+H)`` (``sft_loss_coef: -0.5`` on ``entropy.exp().detach() * -log p``), ``-1`` the paper's Eq. 8.
    - ``L_RL^demo``: ``-A * f(p)`` on the demonstration tokens (their advantages from the joint group, behaviour
      probability taken as 1, no clip), with LUFFY's shaping ``f(p) = p / (p + shaping_gamma)`` (the code's
      ``off_policy_reshape: p_div_p_0.1``) or, with ``shaping_gamma=None``, the plain ``f(p) = p`` (Eq. 9-10).
    - ``L_RL^self`` by `self_rl`. ``"advantage"`` (the code's ``compute_token_on_off_policy_loss``): the
      policy-gradient term ``-min(r * A, clip(r, 1 - eps, 1 + eps) * A)``, ``r = exp(logprobs - old_logprobs)``,
      on every own token, times ``w_RL = 0.1 * exp(H)`` where A > 0; this term and ``L_RL^demo`` are one token
      mean over all the tokens of the pass (LUFFY's ``masked_mean`` over the response). ``"sign"`` (Eq. 12):
      ``w_RL * mean_positive(-log p) + mean_negative(log p)``, each term, ``L_RL^demo`` included, the mean over
      its own tokens.

    NEUTRAL tokens (A = 0) get no term (in the ``"advantage"`` form they still count in the token mean).
    `entropy` is the H the weights read, detached: one number for the pass (``srft.entropy: rollouts``), or one
    per token (``srft.entropy: token``), each token's weight then reading the policy's entropy at that token: a
    demonstration token's ``w_SFT`` its own H, a positive token's ``w_RL`` its own.

    `kinds` holds each token's `SrftToken` (`srft_token_kinds`). `counts` maps each kind to its GLOBAL
    token count and `total_tokens` is the global token total (`srft_token_counts`, summed over processes
    and micro-batches): a term averaged over the tokens of kind k carries the coefficient
    ``total_tokens / counts[k]`` on them, so the global token mean of `GradientAccumulator` is the subset mean.
    A kind with count 0 (or absent from `counts`) contributes nothing to such a term.
    """
    _check_flat(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, kinds=kinds)
    if kinds.dtype.is_floating_point or kinds.dtype == torch.bool:
        raise ValueError(f"kinds must be an integer tensor of SrftToken values; got dtype {kinds.dtype}")
    if kinds.numel() and (int(kinds.min()) < 0 or int(kinds.max()) >= len(SrftToken)):
        choices = [int(kind) for kind in SrftToken]
        raise ValueError(f"kinds must hold SrftToken values {choices}; got values outside them")
    if self_rl not in SRFT_SELF_RL_FORMS:
        raise ValueError(f"self_rl must be one of {SRFT_SELF_RL_FORMS}; got {self_rl!r}")
    if sft_entropy_sign not in (1, -1):
        raise ValueError(f"sft_entropy_sign must be +1 (w_SFT = 0.5 exp(+H), the code) or -1 (exp(-H), the paper); got {sft_entropy_sign!r}")
    if shaping_gamma is not None and not shaping_gamma > 0:
        raise ValueError(f"shaping_gamma must be positive (f(p) = p / (p + gamma)) or None (f(p) = p); got {shaping_gamma}")
    token_entropy = _srft_entropy(entropy, logprobs)
    local = srft_token_counts(kinds)
    global_counts = {kind: int(counts.get(kind, 0)) for kind in SrftToken}
    if any(local[kind] > global_counts[kind] for kind in SrftToken) or total_tokens < kinds.numel():
        here = {kind.name: local[kind] for kind in SrftToken}
        everywhere = {kind.name: global_counts[kind] for kind in SrftToken}
        raise ValueError(
            "counts and total_tokens must be global (summed over every process and micro-batch of the pass); "
            f"this batch alone has {here} of {kinds.numel()} tokens but counts say {everywhere} of {total_tokens}"
        )
    w_sft = 0.5 * torch.exp(sft_entropy_sign * token_entropy)
    w_rl = 0.1 * torch.exp(token_entropy)
    subset_weights = [total_tokens / global_counts[kind] if global_counts[kind] else 0.0 for kind in SrftToken]
    subset_mean = torch.tensor(subset_weights, dtype=logprobs.dtype, device=logprobs.device)[kinds.long()]
    zeros = torch.zeros_like(logprobs)
    demo, positive, negative = kinds == SrftToken.DEMO, kinds == SrftToken.POSITIVE, kinds == SrftToken.NEGATIVE
    probabilities = torch.exp(logprobs)
    shaped = probabilities / (probabilities + shaping_gamma) if shaping_gamma is not None else probabilities
    demo_sft = token_mean(torch.where(demo, subset_mean * w_sft * -logprobs, zeros))
    if self_rl == "advantage":
        # Demonstrations have no sampling log-prob: their (unused) ratio stays 1 so it cannot overflow.
        ratio = torch.exp(torch.where(demo, zeros, logprobs - old_logprobs))
        clipped = torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
        own = -torch.minimum(ratio * advantages, clipped * advantages)
        demo_rl = token_mean(torch.where(demo, -advantages * shaped, zeros))
        self_positive = token_mean(torch.where(positive, w_rl * own, zeros))
        self_negative = token_mean(torch.where(negative, own, zeros))
    else:
        demo_rl = token_mean(torch.where(demo, subset_mean * -advantages * shaped, zeros))
        self_positive = token_mean(torch.where(positive, subset_mean * w_rl * -logprobs, zeros))
        self_negative = token_mean(torch.where(negative, subset_mean * logprobs, zeros))
    loss = demo_sft + demo_rl + self_positive + self_negative
    with torch.no_grad():
        stats = SrftLossStats(
            w_sft=float(token_mean(torch.where(demo, subset_mean * w_sft, zeros))),
            w_rl=float(token_mean(torch.where(positive, subset_mean * w_rl, zeros))),
            demo_entropy=float(token_mean(torch.where(demo, subset_mean * token_entropy, zeros))),
            demo_sft=float(demo_sft),
            demo_rl=float(demo_rl),
            self_positive=float(self_positive),
            self_negative=float(self_negative),
        )
    return loss, stats


@dataclass(frozen=True)
class ReliftLossStats:
    """Diagnostics of a ReLIFT RL step in its released form (all detached)."""

    mean_ratio: float
    """Mean ``exp(logprobs - old_logprobs)``."""
    entropy: float
    """Mean token entropy (the bonus's term before its coefficient)."""


def relift_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    *,
    scale: float,
    entropy_coef: float,
) -> tuple[torch.Tensor, ReliftLossStats]:
    """ReLIFT's RL loss as its authors' code computes it: ``scale * token_mean(-A * ratio) - coef * token_mean(H)``.

    No PPO clip on ``ratio = exp(logprobs - old_logprobs)`` (``loss_remove_clip``), and `scale` the released
    normalisation (`max_length_scale`, as LUFFY's code: ReLIFT's ``loss_remove_token_mean`` is the same line), so
    the first term is the token sum over the maximal answer length. The advantages are mean-centred only
    (``grpo_use_std: False``, computed by the caller). `entropy` is each token's entropy with its graph (the bonus
    pushes it up), a token mean with the authors' ``entropy_coeff`` (0.001).
    """
    _check_flat(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, entropy=entropy)
    ratio = torch.exp(logprobs - old_logprobs)
    loss = scale * token_mean(-advantages * ratio) - entropy_coef * token_mean(entropy)
    stats = ReliftLossStats(mean_ratio=float(token_mean(ratio.detach())), entropy=float(token_mean(entropy.detach())))
    return loss, stats


def relift_sft_loss(logprobs: torch.Tensor, entropy: torch.Tensor, *, entropy_coef: float) -> torch.Tensor:
    """ReLIFT's SFT update: ``token_mean(-log p) - coef * token_mean(H)`` over the buffered demonstrations' tokens.

    The authors' ``compute_sft_loss`` (a masked token mean of the NLL) minus their entropy bonus
    (``sft.entropy_coeff``, 0.001), scored at temperature 1; `entropy` carries its graph.
    """
    _check_flat(logprobs=logprobs, entropy=entropy)
    return sft_loss(logprobs) - entropy_coef * token_mean(entropy)
