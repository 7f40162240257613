"""The mu controller: the meta estimate and its pooling, the entropy and meta terms, guards (the look-ahead: test_optimiser.py)."""

import json
import math

import pytest
import torch

from amft_vlm.learning.advantages import leave_one_out_advantages
from amft_vlm.learning.controller import MetaEstimate, MetaPool, MuController
from amft_vlm.learning.methods import ControllerUse
from amft_vlm.run.config import ControllerConfig


def test_leave_one_out_advantages_by_hand():
    returns = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 7.0])
    advantages = leave_one_out_advantages(returns, [0, 0, 0, 1, 1, 2])
    torch.testing.assert_close(advantages, torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 0.0, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="one group id per return"):
        leave_one_out_advantages(returns, [0, 1])


def test_meta_estimate_mean_standard_error_and_signals():
    estimate = MetaEstimate.from_per_state([1.0, 2.0, 3.0, 6.0])
    assert estimate.value == pytest.approx(3.0)
    assert estimate.stderr == pytest.approx(math.sqrt(14 / 3 / 4))
    assert estimate.signal("raw", 3.0) == pytest.approx(3.0)
    assert estimate.signal("standardized", 10.0) == pytest.approx(3.0 / math.sqrt(14 / 12))
    assert estimate.signal("standardized", 1.5) == 1.5  # clipped
    assert MetaEstimate.from_per_state([-1e-9, -2e-9]).signal("standardized", 3.0) == pytest.approx(-3.0)  # scale-free
    assert MetaEstimate.from_per_state([0.0, 0.0, 0.0]) is None  # no signal: every state tied
    assert MetaEstimate.from_per_state([]) is None
    assert math.isnan(MetaEstimate.from_per_state([0.5]).signal("standardized", 3.0))


def controller_after_warmup(**settings):
    controller = MuController(ControllerConfig(mu_init=0.5, warmup_steps=0, **settings))
    controller.set_target_entropy(1.0)
    return controller


@pytest.mark.parametrize(("sign", "entropy", "direction"), [(1, 0.5, 1), (1, 1.5, -1), (-1, 0.5, -1), (-1, 1.5, 1)])
def test_entropy_term_direction_follows_the_sign_setting(sign, entropy, direction):
    controller = controller_after_warmup(entropy_sign=sign, eta_h=0.1)
    mu = controller.update(entropy=entropy)
    assert (mu - 0.5) * direction > 0
    assert controller.state.last_entropy_term == pytest.approx(0.1 * sign * (1.0 - entropy))
    assert controller.state.last_meta_term == 0.0


def test_meta_term_moves_mu_by_eta_times_the_signal():
    controller = controller_after_warmup(eta_mu=0.01, eta_h=0.0)
    assert controller.update(entropy=1.0, meta_signal=2.0) == pytest.approx(0.52)
    assert controller.update(entropy=1.0, meta_signal=-3.0) == pytest.approx(0.49)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_signals_are_skipped_never_applied(bad):
    controller = controller_after_warmup(eta_h=0.1, eta_mu=0.1)
    assert controller.update(entropy=bad, meta_signal=bad) == 0.5
    assert controller.state.last_entropy_term is None and controller.state.last_meta_term is None
    assert controller.state.skipped_signals == 2
    controller.set_target_entropy(bad)
    assert controller.state.target_entropy == 1.0 and controller.state.skipped_signals == 3
    assert controller.update(entropy=0.0, meta_signal=1.0) == pytest.approx(0.5 + 0.1 + 0.1)


def test_switched_off_terms_are_exactly_zero():
    no_entropy = MuController(ControllerConfig(mu_init=0.5, warmup_steps=0, eta_h=1.0), ControllerUse(entropy=False))
    no_entropy.set_target_entropy(5.0)
    no_entropy.update(entropy=0.0, meta_signal=1.0)
    assert no_entropy.state.last_entropy_term == 0.0 and no_entropy.state.last_meta_term != 0.0
    no_meta = MuController(ControllerConfig(mu_init=0.5, warmup_steps=0, eta_h=1.0), ControllerUse(meta=False))
    assert not any(no_meta.wants_meta_gradient(step) for step in range(50))
    no_meta.set_target_entropy(1.0)
    no_meta.update(entropy=0.0, meta_signal=1.0)
    assert no_meta.state.last_meta_term == 0.0 and no_meta.state.last_entropy_term != 0.0


def test_mu_is_clipped():
    controller = controller_after_warmup(eta_h=10.0)
    assert controller.update(entropy=-100.0) == 0.95
    assert controller.update(entropy=100.0) == 0.05


def test_warmup_schedule_meta_interval_and_target_entropy():
    controller = MuController(ControllerConfig(mu_init=0.8, warmup_steps=3, meta_interval=4, target_entropy_steps=3))
    assert [controller.mu_for_step(s) for s in range(5)] == [1.0, 1.0, 1.0, 0.8, 0.8]
    assert [s for s in range(15) if controller.wants_meta_gradient(s)] == [3, 7, 11]
    assert [s for s in range(5) if controller.needs_target_entropy(s)] == [3, 4]
    for entropy in (2.0, float("nan"), 3.0):
        controller.observe_target_entropy(entropy)
        assert controller.update(entropy=entropy) == 0.8 and controller.state.last_entropy_term is None  # no H* yet
    controller.observe_target_entropy(7.0)
    assert controller.state.target_entropy == pytest.approx(4.0)  # the mean of the 3 finite values
    assert not controller.needs_target_entropy(6)
    no_warmup = MuController(ControllerConfig(warmup_steps=50), ControllerUse(warmup=False))
    assert no_warmup.warmup_steps == 0 and no_warmup.mu_for_step(0) == 0.5  # the controller from step 0
    assert no_warmup.wants_meta_gradient(0) and no_warmup.needs_target_entropy(0)


def test_state_round_trip():
    controller = controller_after_warmup(eta_h=0.1)
    controller.update(entropy=0.2, meta_signal=0.3)
    restored = MuController(ControllerConfig(mu_init=0.5, warmup_steps=0))
    restored.load_state_dict(controller.state_dict())
    assert restored.state == controller.state


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mu_min": 0.6, "mu_max": 0.4}, "mu_min"),
        ({"mu_init": 0.99}, "mu_init"),
        ({"entropy_sign": 0}, "entropy_sign"),
        ({"meta_interval": 0}, "meta_interval"),
        ({"eta_h": float("nan")}, "eta_h"),
        ({"eta_mu": -0.1}, "eta_mu"),
        ({"validation_samples": 1}, "leave-one-out|the others"),
        ({"validation_states": 1}, "validation_states"),
        ({"lookahead": "newton"}, "lookahead"),
        ({"meta_signal": "cosine"}, "meta_signal"),
        ({"entropy_source": "sft"}, "entropy_source"),
        ({"meta_credit": "step"}, "meta_credit"),
        ({"meta_pool_decay": 1.0}, "meta_pool_decay"),
        ({"meta_pool_decay": -0.1}, "meta_pool_decay"),
    ],
)
def test_invalid_settings_are_explained(settings, message):
    with pytest.raises(ValueError, match=message):
        MuController(ControllerConfig(**settings))


def weighted_by_hand(steps, decay):
    """Mean, standard error and effective count of per-state values, step k back weighing decay**k (no running sums)."""
    weights = [decay ** (len(steps) - 1 - k) for k in range(len(steps)) for _ in steps[k]]
    values = [v for step in steps for v in step]
    total = sum(weights)
    mean = sum(w * v for w, v in zip(weights, values, strict=True)) / total
    squares = sum(w * w for w in weights)
    variance = sum(w * (v - mean) ** 2 for w, v in zip(weights, values, strict=True)) / (total - squares / total)
    effective = total**2 / squares
    return mean, math.sqrt(variance / effective), effective


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_meta_pool_is_the_weighted_estimate_by_hand(decay):
    steps = [[1.0, 2.0], [3.0, 5.0, 7.0], [-1.0, 0.0, 4.0, 2.0]]
    pool = MetaPool()
    for values in steps:
        pool.add(values, decay=decay)
    estimate = pool.estimate()
    mean, stderr, effective = weighted_by_hand(steps, decay)
    assert (estimate.value, estimate.stderr, estimate.states) == pytest.approx((mean, stderr, effective), rel=1e-12)
    if decay == 0.0:  # only the last step counts: the single-step estimate
        assert estimate == MetaEstimate.from_per_state(steps[-1])


def test_pooled_evidence_accumulates_where_a_single_step_does_not():
    """Weak but consistent evidence (t ~ 1 per meta step) becomes strong when pooled; evidence that flips sign does not."""
    consistent = [[0.4 + offset for offset in (-1.0, 0.0, 1.0, 2.0, -2.0, 0.6)] for _ in range(8)]
    single = [MetaEstimate.from_per_state(values).t_statistic for values in consistent]
    pool = MetaPool()
    pooled = []
    for values in consistent:
        pool.add(values, decay=0.9)
        pooled.append(pool.estimate().t_statistic)
    assert max(single) < 1.0 < pooled[-1] / 2  # each step alone: t < 1; pooled over 8: t > 2
    assert pooled == sorted(pooled)  # the evidence grows step by step
    flipping = MetaPool()
    for k in range(8):
        flipping.add([(-1) ** k * v for v in consistent[0]], decay=0.9)
    assert abs(flipping.estimate().t_statistic) < 0.5


def test_the_controller_pools_per_unit_learning_rate_and_moves_mu_on_the_pooled_signal():
    controller = controller_after_warmup(eta_mu=0.01, eta_h=0.0, meta_pool_decay=0.8)
    first = controller.weigh_meta_evidence([1e-3, 5e-3, -1e-3], learning_rate=1e-3)
    second = controller.weigh_meta_evidence([2e-4, -1e-4, 4e-4], learning_rate=1e-4)  # per unit lr: 2, -1, 4
    expected = weighted_by_hand([[1.0, 5.0, -1.0], [2.0, -1.0, 4.0]], 0.8)
    assert (second.pooled.value, second.pooled.stderr) == pytest.approx(expected[:2], rel=1e-12)
    assert second.step.value == pytest.approx(5e-4 / 3)  # the step's own dU/dmu, in its units
    assert second.signal == pytest.approx(min(3.0, expected[0] / expected[1]))
    assert second.signal > first.signal  # more evidence for the same mean
    assert controller.update(entropy=1.0, meta_signal=second.signal) == pytest.approx(0.5 + 0.01 * second.signal)
    raw = controller_after_warmup(meta_signal="raw", meta_pool_decay=0.0)
    assert raw.weigh_meta_evidence([2e-4, 4e-4], learning_rate=1e-4).signal == pytest.approx(3e-4)  # dU/dmu at this lr


def test_meta_evidence_without_signal_is_skipped():
    controller = controller_after_warmup(meta_pool_decay=0.5)
    tied = controller.weigh_meta_evidence([0.0, 0.0], learning_rate=1e-3)
    assert tied.step is None and tied.pooled is None and tied.signal is None
    assert controller.weigh_meta_evidence([], learning_rate=1e-3).signal is None
    assert controller.weigh_meta_evidence([1.0, 2.0], learning_rate=0.0).signal is None  # lr 0: theta did not move
    assert controller.state.meta_pool.weight == pytest.approx(2.0)  # only the tied step entered the pool


def test_state_round_trip_keeps_the_pool_and_reads_states_saved_before_it():
    controller = controller_after_warmup(meta_pool_decay=0.7)
    controller.weigh_meta_evidence([1.0, 2.0, 4.0], learning_rate=1.0)
    restored = MuController(ControllerConfig(mu_init=0.5, warmup_steps=0, meta_pool_decay=0.7))
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.state == controller.state
    old = {key: value for key, value in controller.state_dict().items() if key != "meta_pool"}
    restored.load_state_dict(old)
    assert restored.state.meta_pool == MetaPool()
