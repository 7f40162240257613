"""The AMFT controller of mu, the weight of imitation in ``L_total = (1 - mu) * L_RL + mu * L_SFT``.

After ``warmup_steps`` of pure SFT, every step adds two terms to mu and clips it to [mu_min, mu_max]::

    mu <- clip(mu + eta_H * sign * (H* - H) + eta_mu * s, mu_min, mu_max)

**Entropy term.** H and the target H* are measured on the same kind of tokens at the same temperature
(the sampling temperature), or their difference would compare two distributions of text rather than
the policy with its past self (`ControllerConfig.entropy_source`):

- ``rollouts`` (default): H is the mean token entropy of the step's own rollouts. This is the
  exploration entropy the paper's H(pi_theta) stands for; it is noisy from step to step.
- ``expert``: H is the mean token entropy on a fixed probe of expert dialogues, scored without
  gradient every step: no sampling noise, at the cost of one forward pass per step.

H* is the mean H of the first ``target_entropy_steps`` controller steps (the end of warm-up; the term
is 0 until then), so with a frozen policy the term averages to ~0 (exactly 0 with the probe).

**Meta term.** Every ``meta_interval`` steps, the meta-gradient of the utility U (expected reward on a
fixed set of validation start states from the ``val`` split) through the policy update::

    dU/dmu = < grad U(theta'), d theta'/d mu >

The look-ahead theta' is the real update: the trainer takes its clipped AdamW step(s) and evaluates
grad U at the parameters it lands on, so no parameters are saved, moved and restored.
``d theta'/d mu`` is the derivative of that step with respect to mu, carried forward by the optimiser
module (`amft_vlm.learning.optimiser.MuTangent`, `amft_vlm.learning.optimiser.adamw_tangent`); this module only decides mu.
The mix ``g(mu) = mu g_SFT + (1 - mu) g_RL`` goes through the gradient-norm clip and the Adam moment updates, so a change of mu moves theta along the *preconditioned* difference of the two
gradients, not along ``g_SFT - g_RL``. With one update per iteration (the default) it is exact; with
several, the moments' derivatives are carried from update to update and only the Hessian term (how an
earlier update's change of theta moves a later gradient) is left out. ``lookahead: sgd`` keeps Eq. 6's
direction ``-lr (g_SFT - g_RL)``.

grad U is estimated by REINFORCE on ``validation_samples`` episodes from each of ``validation_states``
start states, with a leave-one-out baseline (each episode's return minus the mean of the others from the
same start state: unbiased, unlike a batch mean that includes the episode itself). Each start state
gives one value ``s_i = < grad U_i, d theta'/d mu >`` (`MetaEstimate`), so dU/dmu comes with a standard
error over start states.

**Deviation from the paper, and why** (``meta_signal: standardized``, the default): the raw dU/dmu
scales with the learning rate and the gradients' size (~1e-10 at LLM learning rates), so no
fixed eta_mu suits it, and the cosine form used before (`cos(grad U, -(g_SFT - g_RL))` over millions of
noisy dimensions) was ~0.01-0.08 and moved mu by 0.004 in a run. The default signal is dU/dmu divided
by its standard error over start states, a t-statistic clipped to +-``meta_clip``: scale-free, ~+-1
when the sign is not resolved and larger when it is, so eta_mu ~ 0.01 moves mu by 0.1-0.5 over a run
only when the validation episodes consistently favour one side. ``meta_signal: raw`` uses dU/dmu itself.
U is the reward of the policy at its sampling temperature (validation episodes are sampled, as
REINFORCE needs), not of greedy decoding.

**Guards.** A non-finite entropy or meta signal is skipped (counted in ``skipped_signals``) and never
reaches mu; a meta step whose validation returns all tie has no signal (None, logged as null).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from amft_vlm.run.config import ControllerConfig, ControllerUse

EVERY_PART = ControllerUse()
"""The whole controller, as AMFT runs it (`MuController`'s default)."""


@dataclass(frozen=True)
class MetaEstimate:
    """dU/dmu from per-start-state values ``s_i`` (of one meta step, or pooled over several): mean and standard error."""

    value: float
    """dU/dmu: the (weighted) mean of the per-state values."""
    stderr: float
    """Standard error of `value`; NaN with one state."""
    states: float
    """Validation start states (rounds) it averages; with pooling, their effective number (Kish's)."""

    @classmethod
    def from_per_state(cls, values: Sequence[float]) -> MetaEstimate | None:
        """The estimate of one meta step (sample std / sqrt(states)), or None when there is no signal (no
        states, or every value exactly 0)."""
        pool = MetaPool()
        pool.add(values, decay=0.0)
        return pool.estimate()

    @property
    def t_statistic(self) -> float:
        """value / stderr (NaN when the standard error is 0 or unknown)."""
        return self.value / self.stderr if self.stderr > 0 else float("nan")

    def signal(self, form: str, clip: float) -> float:
        """The meta signal of `form`: ``raw`` (dU/dmu) or ``standardized`` (the t-statistic clipped to +-clip)."""
        if form == "raw":
            return self.value
        if form == "standardized":
            t = self.t_statistic
            return max(-clip, min(clip, t)) if math.isfinite(t) else t  # NaN stays NaN: the controller skips it
        raise ValueError(f"meta signal form must be 'standardized' or 'raw'; got {form!r}")


@dataclass
class MetaPool:
    """Per-state values of dU/dmu pooled over meta steps by an exponential moving average of their mean and
    second moment: the values of a meta step k meta steps back weigh ``decay**k``.

    Four running sums (of the weights w, of w**2, of w s and of w s**2, each state counting once) give the
    weighted mean, the weighted variance (unbiased for reliability weights) and Kish's effective number of
    states ``(sum w)**2 / sum w**2``, so the standard error is ``sqrt(variance / effective states)``. With
    ``decay = 0`` only the latest meta step counts and this is `MetaEstimate.from_per_state` (the sample
    standard error); with ``decay -> 1`` every step so far counts equally.
    """

    weight: float = 0.0
    weight_sq: float = 0.0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, values: Sequence[float], *, decay: float) -> None:
        """Age the evidence so far by `decay` and add one meta step's per-state `values`."""
        self.weight = decay * self.weight + len(values)
        self.weight_sq = decay * decay * self.weight_sq + len(values)
        self.total = decay * self.total + sum(values)
        self.total_sq = decay * self.total_sq + sum(v * v for v in values)

    def estimate(self) -> MetaEstimate | None:
        """The pooled estimate; None when there is no signal yet (no states, or every value exactly 0)."""
        if self.weight <= 0 or (self.total == 0.0 and self.total_sq == 0.0):
            return None
        mean = self.total / self.weight
        effective = self.weight**2 / self.weight_sq
        if effective <= 1.0 + 1e-12:
            return MetaEstimate(mean, float("nan"), effective)
        spread = max(self.total_sq / self.weight - mean * mean, 0.0)
        variance = spread * self.weight**2 / (self.weight**2 - self.weight_sq)
        return MetaEstimate(mean, math.sqrt(variance / effective), effective)


@dataclass
class ControllerState:
    """Everything the controller needs to resume exactly."""

    mu: float
    target_entropy: float | None = None
    target_entropy_sum: float = 0.0
    """Sum of the H values seen while H* is being measured."""
    target_entropy_count: int = 0
    """How many H values that sum holds (H* is set once it reaches ``target_entropy_steps``)."""
    last_entropy_term: float | None = 0.0
    """The entropy term added at the last update (None: no signal yet, or a skipped non-finite one)."""
    last_meta_term: float | None = 0.0
    """The meta term added at the last update (0 when none was applied; None: a skipped non-finite one)."""
    skipped_signals: int = 0
    """Non-finite signals skipped so far."""
    meta_pool: MetaPool = field(default_factory=MetaPool)
    """The meta evidence pooled so far (`ControllerConfig.meta_pool_decay`; only the last step's without pooling)."""


@dataclass(frozen=True)
class MetaEvidence:
    """What one meta step's validation values say: on their own, pooled with the earlier ones, and the signal."""

    step: MetaEstimate | None
    """This meta step's own dU/dmu and standard error (None: every state tied, no signal)."""
    pooled: MetaEstimate | None
    """The pooled estimate, per unit learning rate (`MetaPool`); this step's own, rescaled, without pooling."""
    signal: float | None
    """The signal the meta term applies (`ControllerConfig.meta_signal` of the pooled estimate); None: none."""


class MuController:
    """Adapts mu from the entropy signal every step and the meta-gradient every ``meta_interval`` steps.

    Args:
        config: the controller's settings, checked by `ControllerConfig.validate`.
        use: the parts that run (`amft_vlm.learning.methods.ControllerUse`; all for AMFT, the ablations switch one
            off): without the warm-up the controller runs from step 0; a switched-off term is exactly 0.
    """

    def __init__(self, config: ControllerConfig, use: ControllerUse = EVERY_PART) -> None:
        self.config = config.validate()
        self.warmup_steps = config.warmup_steps if use.warmup else 0
        """Pure-SFT steps before the controller starts."""
        self.use_meta, self.use_entropy = use.meta, use.entropy
        self.state = ControllerState(mu=config.mu_init)

    def in_warmup(self, step: int) -> bool:
        """True while ``step`` (0-based) is a pure-SFT warm-up step."""
        return step < self.warmup_steps

    def mu_for_step(self, step: int) -> float:
        """The mu to train with at ``step``: 1 during warm-up, else the controller's mu."""
        return 1.0 if self.in_warmup(step) else self.state.mu

    def wants_meta_gradient(self, step: int) -> bool:
        """True when ``step`` should compute the meta-gradient (every ``meta_interval`` steps after warm-up)."""
        return self.use_meta and not self.in_warmup(step) and (step - self.warmup_steps) % self.config.meta_interval == 0

    def needs_target_entropy(self, step: int) -> bool:
        """True at controller steps while H* is still being measured (`observe_target_entropy`)."""
        return not self.in_warmup(step) and self.state.target_entropy is None

    def observe_target_entropy(self, entropy: float) -> None:
        """Add one H to the measurement of ``H*``: the mean of the first ``target_entropy_steps`` values.

        Averaging keeps one batch's sampling noise from becoming a constant offset of the entropy term
        for the rest of the run. A non-finite value is skipped (and counted).
        """
        state = self.state
        if not math.isfinite(entropy):
            state.skipped_signals += 1
            return
        state.target_entropy_sum += float(entropy)
        state.target_entropy_count += 1
        if state.target_entropy_count >= self.config.target_entropy_steps:
            state.target_entropy = state.target_entropy_sum / state.target_entropy_count

    def set_target_entropy(self, entropy: float) -> None:
        """Fix ``H*`` directly (a non-finite value is skipped)."""
        if math.isfinite(entropy):
            self.state.target_entropy = float(entropy)
        else:
            self.state.skipped_signals += 1

    def weigh_meta_evidence(self, values: Sequence[float], *, learning_rate: float) -> MetaEvidence:
        """Pool one meta step's per-state values of dU/dmu (`amft_vlm.learning.meta.MetaMeasurement.values`) with the
        evidence so far and return the signal to pass to `update`.

        The pool holds values per unit learning rate: the look-ahead's step, and so dU/dmu, is proportional
        to the learning rate, which a schedule changes between meta steps. The raw signal is the pooled
        value at this step's learning rate; the standardized one its t-statistic, clipped.
        """
        config = self.config
        step = MetaEstimate.from_per_state(values)
        if not values or not learning_rate > 0:  # nothing measured, or a step that did not move theta
            return MetaEvidence(step, self.state.meta_pool.estimate(), None)
        self.state.meta_pool.add([value / learning_rate for value in values], decay=config.meta_pool_decay)
        pooled = self.state.meta_pool.estimate()
        if pooled is None:
            return MetaEvidence(step, None, None)
        signal = pooled.signal(config.meta_signal, config.meta_clip)
        return MetaEvidence(step, pooled, signal * learning_rate if config.meta_signal == "raw" else signal)

    def update(self, *, entropy: float | None, meta_signal: float | None = None) -> float:
        """Apply one step's terms and return the new mu.

        ``entropy`` is H on this step (None if not measured); ``meta_signal`` the meta signal on steps that
        computed one (`MetaEstimate.signal`), else None. Non-finite values are skipped, never applied.
        """
        config, state = self.config, self.state
        entropy_term: float | None = 0.0
        if self.use_entropy:
            entropy_term = None
            if entropy is not None and state.target_entropy is not None:
                if math.isfinite(entropy):
                    entropy_term = config.eta_h * config.entropy_sign * (state.target_entropy - entropy)
                else:
                    state.skipped_signals += 1
        meta_term: float | None = 0.0
        if self.use_meta and meta_signal is not None:
            meta_term = None
            if math.isfinite(meta_signal):
                meta_term = config.eta_mu * meta_signal
            else:
                state.skipped_signals += 1
        state.last_entropy_term, state.last_meta_term = entropy_term, meta_term
        state.mu = min(config.mu_max, max(config.mu_min, state.mu + (entropy_term or 0.0) + (meta_term or 0.0)))
        return state.mu

    def step_metrics(self, *, controlled: bool) -> dict:
        """The controller's part of a step's metrics after `update` (the terms are 0 on a step it did not control:
        a warm-up step)."""
        state = self.state
        return {
            "target_entropy": state.target_entropy,
            "entropy_term": state.last_entropy_term if controlled else 0.0,
            "meta_term": state.last_meta_term if controlled else 0.0,
            "skipped_signals": state.skipped_signals,
            "next_mu": state.mu,
        }

    def state_dict(self) -> dict:
        """The controller's state, for checkpoints."""
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by :meth:`state_dict` (one saved before pooling existed starts an empty pool)."""
        values = dict(state)
        values["meta_pool"] = MetaPool(**values.get("meta_pool", {}))
        self.state = ControllerState(**values)
