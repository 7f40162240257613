"""The AMFT controller of mu, the weight of imitation in ``L_total = (1 - mu) * L_RL + mu * L_SFT``.

After ``warmup_steps`` of pure SFT the target entropy ``H*`` is set to the policy's mean token
entropy on expert data. Then every step adds the entropy term ``eta_H * sign * (H* - H)``
(``sign = +1``: entropy below target -> more SFT, the direction of the paper's equation), and
every ``meta_interval`` steps the meta-gradient term ``eta_mu * dU/dmu``, where U is the expected
reward on held-out validation episodes and, through a one-step look-ahead
``theta' = theta - alpha * grad L_total``::

    dU/dmu ~= -alpha * < grad U(theta'), g_SFT - g_RL >

so mu rises when the SFT descent direction improves validation reward more than the RL one.
mu is clipped to ``[mu_min, mu_max]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch


def flat_dot(a: Iterable[torch.Tensor | None], b: Iterable[torch.Tensor | None]) -> float:
    """Sum of elementwise products over matching parameter gradients (None counts as zeros)."""
    total = 0.0
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None:
            total += float((x.double() * y.double()).sum())
    return total


def meta_gradient(
    grad_u: list[torch.Tensor | None],
    g_sft: list[torch.Tensor | None],
    g_rl: list[torch.Tensor | None],
    *,
    alpha: float,
    normalize: bool,
) -> float:
    """``dU/dmu`` through the look-ahead, or its normalised form.

    Raw: ``-alpha * <grad U(theta'), g_SFT - g_RL>``. Normalised: the cosine between ``grad U`` and
    ``-(g_SFT - g_RL)``, which has the same sign but is scale-free (the raw product is ~1e-10 at LLM
    learning rates, too small to steer mu with any sensible ``eta_mu``).
    """
    difference = [None if s is None or r is None else s - r for s, r in zip(g_sft, g_rl, strict=True)]
    dot = flat_dot(grad_u, difference)
    if not normalize:
        return -alpha * dot
    norm = (flat_dot(grad_u, grad_u) * flat_dot(difference, difference)) ** 0.5
    return -dot / norm if norm > 0 else 0.0


@dataclass
class ControllerState:
    """Everything the controller needs to resume exactly."""

    mu: float
    target_entropy: float | None = None
    last_entropy_term: float = 0.0
    last_meta_term: float = 0.0


class MuController:
    """Adapts mu every step from the entropy signal and, every ``meta_interval`` steps, the meta-gradient.

    Args:
        mu_init: mu after warm-up. mu_min, mu_max: the clip range.
        eta_mu: step size of the meta-gradient term. eta_h: step size of the entropy term.
        warmup_steps: steps of pure SFT (mu = 1) before the controller starts.
        meta_interval: the meta-gradient is applied every this many steps after warm-up.
        entropy_sign: +1 raises mu when entropy is below target (the paper's equation), -1 the reverse.
        use_meta, use_entropy: switch either term off (the ablations).
    """

    def __init__(
        self,
        *,
        mu_init: float = 0.5,
        mu_min: float = 0.05,
        mu_max: float = 0.95,
        eta_mu: float = 0.05,
        eta_h: float = 5e-4,
        warmup_steps: int = 50,
        meta_interval: int = 20,
        entropy_sign: int = 1,
        use_meta: bool = True,
        use_entropy: bool = True,
    ) -> None:
        if not 0.0 <= mu_min <= mu_max <= 1.0:
            raise ValueError(f"need 0 <= mu_min <= mu_max <= 1; got mu_min={mu_min}, mu_max={mu_max}")
        if not mu_min <= mu_init <= mu_max:
            raise ValueError(f"mu_init must lie in [mu_min, mu_max] = [{mu_min}, {mu_max}]; got {mu_init}")
        if entropy_sign not in (1, -1):
            raise ValueError(f"entropy_sign must be 1 or -1; got {entropy_sign}")
        if meta_interval < 1 or warmup_steps < 0:
            raise ValueError(f"need meta_interval >= 1 and warmup_steps >= 0; got {meta_interval}, {warmup_steps}")
        self.mu_min, self.mu_max = mu_min, mu_max
        self.eta_mu, self.eta_h = eta_mu, eta_h
        self.warmup_steps, self.meta_interval = warmup_steps, meta_interval
        self.entropy_sign = entropy_sign
        self.use_meta, self.use_entropy = use_meta, use_entropy
        self.state = ControllerState(mu=mu_init)

    def in_warmup(self, step: int) -> bool:
        """True while ``step`` (0-based) is a pure-SFT warm-up step."""
        return step < self.warmup_steps

    def mu_for_step(self, step: int) -> float:
        """The mu to train with at ``step``: 1 during warm-up, else the controller's mu."""
        return 1.0 if self.in_warmup(step) else self.state.mu

    def wants_meta_gradient(self, step: int) -> bool:
        """True when ``step`` should compute the meta-gradient (every ``meta_interval`` steps after warm-up)."""
        return self.use_meta and not self.in_warmup(step) and (step - self.warmup_steps) % self.meta_interval == 0

    def set_target_entropy(self, entropy: float) -> None:
        """Fix ``H*``, the policy's mean token entropy on expert data at the end of warm-up."""
        self.state.target_entropy = float(entropy)

    def update(self, *, entropy: float, meta_signal: float | None = None) -> float:
        """Apply one step's terms and return the new mu.

        ``entropy`` is H(pi_theta) measured on this step's tokens; ``meta_signal`` is dU/dmu (from
        :func:`meta_gradient`) on steps that computed it, else None.
        """
        if self.state.target_entropy is None:
            raise RuntimeError("set_target_entropy() must be called (at the end of warm-up) before update()")
        entropy_term = self.eta_h * self.entropy_sign * (self.state.target_entropy - entropy) if self.use_entropy else 0.0
        meta_term = self.eta_mu * meta_signal if (self.use_meta and meta_signal is not None) else 0.0
        self.state.last_entropy_term, self.state.last_meta_term = entropy_term, meta_term
        self.state.mu = min(self.mu_max, max(self.mu_min, self.state.mu + entropy_term + meta_term))
        return self.state.mu

    def state_dict(self) -> dict:
        """The controller's state, for checkpoints."""
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        self.state = ControllerState(**state)
