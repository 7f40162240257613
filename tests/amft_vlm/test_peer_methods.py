"""The peers' methods (CHORD-phi, DFT, LUFFY, SRFT, ReLIFT) end to end on the tiny model: each runs, and
each does what sets it apart (its losses are checked against hand-computed values in test_peer_losses.py)."""

import json
import math

import pytest
import torch

from amft_vlm.config import load_config
from amft_vlm.rollout import RolloutEngine
from amft_vlm.trainer import Trainer
from tests.amft_vlm.samples import assert_same_samples
from tests.amft_vlm.test_trainer import FAST


def run(tmp_path, name, *overrides, resume=False):
    config = load_config(overrides=[*FAST, f"output_dir={tmp_path / name}", *overrides])
    return Trainer(config, resume=resume, progress=False)


@pytest.fixture
def collected_seeds(monkeypatch):
    """The seeds and group sizes of every policy rollout collection (model-free expert collections excluded)."""
    calls = []
    collect = RolloutEngine.collect

    def recording(self, seeds, *, group_size=1, responder=None, **kwargs):
        if responder is None:
            calls.append((list(seeds), group_size))
        return collect(self, seeds, group_size=group_size, responder=responder, **kwargs)

    monkeypatch.setattr(RolloutEngine, "collect", recording)
    return calls


def test_luffy_groups_hold_one_demonstration_from_the_same_start_state(tmp_path, collected_seeds):
    trainer = run(tmp_path, "luffy", "method=luffy", "group_size=3")
    batches = []
    collect_rollouts = trainer._collect_rollouts
    trainer._collect_rollouts = lambda step: batches.append(collect_rollouts(step)) or batches[-1]
    history = trainer.train()
    for seeds_and_size, (batch, _) in zip(collected_seeds, batches, strict=True):
        rollouts = [t for t in batch.trajectories if t.sampling_temperature is not None]
        demos = [t for t in batch.trajectories if t.sampling_temperature is None]
        assert [d.seed for d in demos] == seeds_and_size[0]  # demonstration g starts where group g's rollouts do
        for group, demo in enumerate(demos):
            members = [t for t in rollouts if t.group == group]
            assert demo.group == group and {t.seed for t in members} == {demo.seed}
            advantage = batch.turn_advantages[batch.trajectories.index(demo)]
            if not any(t.success for t in members):  # the demonstration carries the signal when its group fails
                assert float(advantage[0]) > 0
    expert_seeds = {t.seed for t in trainer.expert}
    assert len(collected_seeds) == 4
    for seeds, group_size in collected_seeds:
        assert group_size == 2 and len(seeds) == 2  # G - 1 rollouts per start state; the expert is the G-th
        assert set(seeds) <= expert_seeds  # start states drawn from the expert set
    last = history[-1]
    assert last["budget_rollout_episodes"] == 4 * 2 * 2 and last["budget_expert_examples"] == 4 * 2
    for m in history:
        assert m["mu"] == 0 and "loss_sft" not in m
        assert 0 < m["expert_token_share"] < 1 and 0 < m["shaped_probability"] < 1 / (1 + 0.1)
        assert math.isfinite(m["loss_rl"])


def test_srft_weights_are_its_entropy_weights(tmp_path):
    # Two micro-batches per pass: H is still one number for the pass (the policy's own answers), so are the weights.
    history = run(tmp_path, "srft", "method=srft", "group_size=3", "temperature=2.0", "gradient_accumulation_steps=2").train()
    for m in history:
        entropy = m["srft_entropy"]
        assert m["srft_w_sft"] == pytest.approx(0.5 * math.exp(-entropy), rel=1e-5)
        assert m["srft_w_rl"] == pytest.approx(0.1 * math.exp(entropy), rel=1e-5)
        assert 0 < m["srft_w_sft"] < 0.5 and m["srft_w_rl"] > 0.1
        parts = ("srft_demo_sft", "srft_demo_rl", "srft_self_positive", "srft_self_negative")
        assert sum(m[key] for key in parts) == pytest.approx(m["loss_rl"], abs=1e-5)
        assert m["srft_demo_sft"] > 0  # the demonstration's NLL is always there


def test_relift_buffers_failed_start_states_and_makes_an_sft_update_when_full(tmp_path):
    # The untrained tiny model solves nothing: every start state's rollouts fail and its demonstration is buffered.
    history = run(tmp_path, "relift", "method=relift", "relift_buffer_size=4", "temperature=2.0").train()
    added = [m["relift_added"] for m in history]
    assert added == [2, 2, 2, 2]
    sft_steps = [m["step"] for m in history if "relift_sft_loss" in m]
    assert sft_steps == [2, 4] and all(history[s - 1]["relift_sft_examples"] == 4 for s in sft_steps)
    assert [m["relift_buffer"] for m in history] == [2, 4, 2, 4]  # logged before the update empties it
    assert history[-1]["budget_updates"] == 4 + 2 and history[-1]["budget_expert_examples"] == 8
    assert all(m["mu"] == 0 for m in history)


def test_relift_resumes_with_its_buffer(tmp_path):
    settings = ["method=relift", "relift_buffer_size=5", "temperature=2.0"]
    straight = run(tmp_path, "straight", *settings)
    straight_history = straight.train()
    interrupted = run(tmp_path, "resumed", *settings)
    interrupted.train(stop_after=2)  # a kill after the step-2 checkpoint, 4 demonstrations buffered for step 3's update
    assert len(interrupted.relift.items) == 4
    resumed = run(tmp_path, "resumed", *settings, resume=True)
    assert resumed.relift.items == interrupted.relift.items
    assert_same_samples(resumed.train(), straight_history)
    for a, b in zip(straight.policy.model.parameters(), resumed.policy.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_chord_phi_and_dft_weight_the_expert_tokens(tmp_path):
    chord = run(tmp_path, "chord", "method=chord-phi", "fixed_mu=0.1").train()
    assert [m["mu"] for m in chord] == pytest.approx([0.1] * 4)
    scheduled = run(tmp_path, "chord-s", "method=chord-phi", "chord_mu=scheduled").train()
    assert scheduled[0]["mu"] == pytest.approx(0.9) and scheduled[-1]["mu"] < scheduled[0]["mu"]
    dft = run(tmp_path, "dft", "method=dft").train()
    sft = run(tmp_path, "sft", "method=sft").train()
    assert all("loss_rl" not in m for m in dft) and dft[-1]["budget_rollout_episodes"] == 0
    # The same first batch: DFT's loss is the NLL weighted by p < 1, so smaller than SFT's.
    assert 0 < dft[0]["loss_sft"] < sft[0]["loss_sft"]
    assert 0 < chord[0]["loss_sft"] < sft[0]["loss_sft"]
    lines = (tmp_path / "dft" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=luffy", "group_size=1"], "group_size must be >= 2 for luffy"),
        (["method=luffy", "credit=turn"], "set credit: episode"),
        (["method=srft", "advantage=ppo"], "srft computes group advantages"),
        (["method=relift", "relift_buffer_size=0"], "relift_buffer_size"),
        (["method=luffy", "luffy_shaping_gamma=0"], "luffy_shaping_gamma"),
        (["method=chord-phi", "chord_mu=linear"], "chord_mu"),
    ],
)
def test_peer_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)
