"""The methods table: every row validates, each schedule gives the mu written out by hand, and each row's
data needs (expert trajectories, rollouts) agree with the mu it can take."""

import dataclasses
import itertools
import math

import pytest
import torch

from amft_vlm.learning.advantages import ADVANTAGE_ESTIMATORS, AdvantageEstimator, TurnAdvantages
from amft_vlm.learning.methods import METHODS, ControllerUse, Method, build_controller, get_method, method_mu
from amft_vlm.learning.objectives import OBJECTIVES, Objective
from amft_vlm.learning.resolve import resolve_method
from amft_vlm.learning.trainer import Trainer
from amft_vlm.run.config import (
    ChordPhiSettings,
    ControllerConfig,
    SftThenRlSettings,
    TrainConfig,
    load_config,
)
from tests.amft_vlm.learning.test_trainer import FAST

STEPS = 8


def mus(method, **settings):
    config = TrainConfig(method=method, steps=STEPS, **settings).validate()
    row = resolve_method(config)
    controller = build_controller(row, config)
    return [method_mu(row, config, step, controller) for step in range(STEPS)]


@pytest.mark.parametrize("name", METHODS)
def test_every_method_validates_and_names_its_row(name):
    assert load_config(overrides=[f"method={name}"]).method == name
    method = get_method(name)
    assert method.name == name and method.description
    assert (method.schedule is None) != (method.controller is None)  # a schedule or the controller, never both


def test_an_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match="method must be one of sft, rl, sft-then-rl, .*no-entropy, chord-phi, dft, luffy, srft, relift; got 'ppo2'"):
        get_method("ppo2")


def test_schedules_by_hand():
    assert mus("sft") == [1.0] * 8
    assert mus("rl") == [0.0] * 8
    assert mus("sft-then-rl", sft_then_rl=SftThenRlSettings(switch=0.5)) == [1.0] * 4 + [0.0] * 4
    assert mus("sft-then-rl", sft_then_rl=SftThenRlSettings(switch=0.3)) == [1.0] * 2 + [0.0] * 6  # round(0.3 x 8) = 2
    assert mus("fixed-mix", fixed_mu=0.3) == [0.3] * 8
    # 0.1 + 0.8 x (1 + cos(pi step / 4)) / 2 over schedule_steps = 4, then flat at the end value.
    quarter = 0.1 + 0.4 * (1 + math.sqrt(0.5))
    expected = [0.9, quarter, 0.5, 1.0 - quarter, 0.1, 0.1, 0.1, 0.1]
    assert mus("scheduled-mix", schedule_mu_start=0.9, schedule_mu_end=0.1, schedule_steps=4) == pytest.approx(expected)
    whole = mus("scheduled-mix", schedule_mu_start=0.9, schedule_mu_end=0.1, schedule_steps=None)  # all steps
    assert whole[0] == 0.9 and whole[4] == pytest.approx(0.5) and all(a > b for a, b in itertools.pairwise(whole))


def test_chord_mu_is_the_authors_schedule_by_default():
    # CHORD-mu (Trinity-RFT's mix_chord example): no warm-up, 0.9 down to 0.05 on a cosine over 200 steps, then flat.
    config = TrainConfig(method="scheduled-mix").validate()
    assert [method_mu(get_method(config.method), config, step, None) for step in (0, 100, 200, 300)] == pytest.approx([0.9, 0.475, 0.05, 0.05])
    phi = TrainConfig(method="chord-phi", chord_phi=ChordPhiSettings(mu="scheduled")).validate()  # chord-phi's scheduled mu is the same
    assert [method_mu(get_method(phi.method), phi, step, None) for step in (0, 100, 200, 300)] == pytest.approx([0.9, 0.475, 0.05, 0.05])


def test_chord_mu_warm_up_rises_linearly_from_0_then_decays():
    config = TrainConfig(method="scheduled-mix", schedule_warmup_steps=10, schedule_steps=20).validate()
    values = [method_mu(get_method(config.method), config, step, None) for step in (0, 5, 10, 20, 30, 40)]
    assert values == pytest.approx([0.0, 0.45, 0.9, 0.475, 0.05, 0.05])
    whole = TrainConfig(method="scheduled-mix", steps=30, schedule_warmup_steps=10, schedule_steps=None).validate()
    assert method_mu(get_method(whole.method), whole, 20, None) == pytest.approx(0.475)  # the decay takes the 20 steps left after the warm-up


def test_controller_methods_take_mu_from_the_controller_with_their_parts():
    controller = ControllerConfig(warmup_steps=3, mu_init=0.7)
    for name in ("amft", "no-meta-gradient", "no-entropy"):
        assert mus(name, controller=controller) == [1.0] * 3 + [0.7] * 5, name
    assert mus("no-warmup", controller=controller) == [0.7] * 8
    parts = {name: build_controller(get_method(name), TrainConfig(method=name)) for name in ("amft", "no-warmup", "no-meta-gradient", "no-entropy")}
    assert [(c.warmup_steps, c.use_meta, c.use_entropy) for c in parts.values()] == [(50, True, True), (0, True, True), (50, False, True), (50, True, False)]
    assert get_method("amft").controller == ControllerUse()
    with pytest.raises(ValueError, match="build_controller"):
        method_mu(get_method("amft"), TrainConfig(method="amft"), 0, None)


def test_schedules_have_no_controller():
    for name, method in METHODS.items():
        if method.schedule is not None:
            assert build_controller(get_method(name), TrainConfig(method=name)) is None, name


def test_data_needs_are_right():
    needs = {name: (method.uses_expert_data, method.collects_rollouts) for name, method in METHODS.items()}
    assert needs["sft"] == (True, False)
    assert needs["rl"] == (False, True)
    assert needs["dft"] == (True, False)
    assert all(need == (True, True) for name, need in needs.items() if name not in ("sft", "rl", "dft"))
    # The peers that train on the expert inside L_RL (mu = 0) or in ReLIFT's extra updates still need it.
    assert all(METHODS[name].uses_expert_data and METHODS[name].schedule is not None for name in ("luffy", "srft", "relift"))


def test_data_needs_agree_with_the_mu_a_schedule_can_take():
    """uses_expert_data: mu > 0 at some step for some valid config; collects_rollouts: mu < 1 likewise."""
    ends = (0.0, 0.5, 1.0)
    grid = [
        {"fixed_mu": fixed, "sft_then_rl": SftThenRlSettings(switch=switch), "schedule_mu_start": start, "schedule_mu_end": end}
        for fixed, switch, start, end in itertools.product(ends, ends, ends, ends)
    ]
    for name, method in METHODS.items():
        if method.schedule is None:
            continue
        # A section is only set for the method that reads it (another method refuses it).
        own = [{key: value for key, value in settings.items() if key != "sft_then_rl" or method.settings == "sft_then_rl"} for settings in grid]
        seen = [mu for settings in own for mu in mus(name, **settings)]
        in_rl = method.expert_in_group or method.sft_buffer  # expert tokens in L_RL, or ReLIFT's SFT updates
        assert method.uses_expert_data == (in_rl or any(mu > 0 for mu in seen)), name
        assert method.collects_rollouts == any(mu < 1 for mu in seen), name


def test_config_checks_follow_the_table():
    # mu_max = 1 would stop the controller's rollouts: refused for controller methods only.
    assert load_config(overrides=["method=fixed-mix", "controller.mu_max=1.0"]).controller.mu_max == 1.0
    with pytest.raises(ValueError, match="controller.mu_max must be < 1 for no-warmup"):
        resolve_method(load_config(overrides=["method=no-warmup", "controller.mu_max=1.0"]))
    # A warm-up as long as the run is refused only where the method warms up.
    assert load_config(overrides=["method=no-warmup", "steps=10", "controller.warmup_steps=10"]).steps == 10
    with pytest.raises(ValueError, match="controller.warmup_steps"):
        resolve_method(load_config(overrides=["method=no-entropy", "steps=10", "controller.warmup_steps=10"]))


@dataclasses.dataclass(frozen=True)
class ToyStats:
    """The toy objective's one statistic."""

    toy_mean_advantage: float


def test_a_new_method_is_a_row_and_a_function(tmp_path, monkeypatch):
    """A toy method added through the public tables only (a row, a new estimator, a new objective) trains on the tiny
    model: nothing in the trainer or the config's checks names it. The tables are restored after the test."""

    def return_minus_half(episodes):  # the toy estimator: every turn gets its episode's return minus 0.5
        return TurnAdvantages([torch.full((len(r),), float(sum(r)) - 0.5) for r in episodes.turn_rewards])

    seen = []

    def reinforce(part, scores, prepared, config):  # the toy objective: REINFORCE on the token mean
        seen.append((part.trajectories, scores.logprobs.detach().clone()))
        return -(scores.advantages * scores.logprobs).mean(), ToyStats(float(scores.advantages.mean()))

    monkeypatch.setitem(ADVANTAGE_ESTIMATORS, "return_minus_half", AdvantageEstimator(return_minus_half))
    monkeypatch.setitem(OBJECTIVES, "reinforce", Objective(reinforce, stats=ToyStats))
    toy = Method(
        "toy", "REINFORCE with a fixed baseline", schedule=lambda config, step: 0.0, controller=None, uses_expert_data=False,
        collects_rollouts=True, advantage=lambda config: "return_minus_half", rl_objective="reinforce",
    )  # fmt: skip
    monkeypatch.setitem(METHODS, "toy", toy)
    config = load_config(overrides=[*FAST, "method=toy", "steps=2", f"output_dir={tmp_path / 'toy'}"])
    trainer = Trainer(config, progress=False)
    before = [p.detach().clone() for p in trainer.parameters]
    history = trainer.train()

    assert len(seen) == len(history) == 2  # one micro-batch per step
    for (trajectories, logprobs), m in zip(seen, history, strict=True):
        # The advantages the objective was given are the toy estimator's, from the rollouts' rewards.
        advantages = torch.cat([torch.full((n,), sum(t.turn_rewards) - 0.5) for t in trajectories for n in t.turn_lengths])
        assert m["toy_mean_advantage"] == pytest.approx(float(advantages.mean()), rel=1e-5)
        assert m["loss_rl"] == pytest.approx(float(-(advantages * logprobs.to(advantages.dtype)).mean()), rel=1e-5)
        assert m["mu"] == 0.0 and "loss_sft" not in m
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.parameters, strict=True))
