"""ReLIFT as its authors' code runs it (TheRoadQaQ/ReLIFT@eb95454): which start states are buffered, in what
order and how many per SFT update, the SFT update's own AdamW, loss and clip after the RL update, and the RL
steps' form (mean-centred advantages, no clip, Dr.GRPO sum, entropy bonus); each pinned by values, on hand-made
tensors and end to end on the tiny model (whose untrained rollouts all fail unless a test says otherwise)."""

import dataclasses
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from amft_vlm.learning.checkpoint import RELIFT_OPTIMIZER, CheckpointError, check_checkpoint
from amft_vlm.learning.losses import relift_policy_loss, relift_sft_loss
from amft_vlm.learning.objectives import OBJECTIVES
from amft_vlm.learning.peers import ReliftBuffer, all_failed_groups, expert_start_states
from amft_vlm.learning.resolve import resolve_method
from amft_vlm.learning.trainer import Trainer
from amft_vlm.rollout.engine import RolloutEngine
from amft_vlm.run.config import load_config
from tests.amft_vlm.learning.test_peer_methods import recorded_passes
from tests.amft_vlm.learning.test_trainer import FAST
from tests.amft_vlm.samples import assert_same_samples


def run(tmp_path, name, *overrides, resume=False):
    config = load_config(overrides=[*FAST, f"output_dir={tmp_path / name}", "method=relift", "temperature=2.0", *overrides])
    return Trainer(config, resume=resume, progress=False)


class OneProcess:
    def sums(self, values):
        return [float(v) for v in values]


class TwoProcesses:
    """One of two processes: `sums` adds what the other process contributes."""

    def __init__(self, other):
        self.other = other

    def sums(self, values):
        return [float(a) + float(b) for a, b in zip(values, self.other, strict=True)]


def rollout(group, success):
    return SimpleNamespace(group=group, success=success)


# ---- What is buffered, in what order, how many at a time.


def test_only_start_states_whose_rollouts_all_failed_are_buffered():
    rollouts = [
        rollout(0, False), rollout(0, False), rollout(0, False),  # every rollout failed: buffered
        rollout(1, False), rollout(1, True), rollout(1, False),  # one success among failures: not buffered
        rollout(2, True), rollout(2, True), rollout(2, True),  # solved
    ]  # fmt: skip
    assert all_failed_groups(rollouts, 3) == [True, False, False]
    assert all_failed_groups(rollouts[3:6], 2) == [False, False]  # a group without rollouts is not buffered either


def test_each_steps_failures_go_in_front_and_an_update_takes_the_newest():
    buffer = ReliftBuffer(capacity=3)
    # Step 1 on two processes: process 0 plays 11 and 13 (11 failed), process 1 reports that 14 failed.
    assert buffer.add_failed(TwoProcesses([0.0, 0.0, 0.0, 1.0]), [11, 12, 13, 14], [True, False], process=0, processes=2) == 2
    assert buffer.items == [11, 14] and not buffer.full
    buffer.add_failed(OneProcess(), [20, 21], [True, True], process=0, processes=1)  # step 2
    assert buffer.items == [20, 21, 11, 14] and buffer.full
    assert buffer.drain() == [20, 21, 11] and buffer.items == [14]  # the oldest waits for the next update
    buffer.add_failed(OneProcess(), [30], [True], process=0, processes=1)
    assert buffer.items == [30, 14] and not buffer.full


def test_the_buffer_is_sized_in_start_states_per_step():
    def capacity(*overrides):
        config = load_config(overrides=["method=relift", *overrides])
        return config.relift.buffer_capacity(config.episodes_per_step)

    assert capacity("episodes_per_step=8") == 8  # the authors' ratio: one step's start states (128 of 128)
    assert capacity("episodes_per_step=128") == 128
    assert capacity("episodes_per_step=8", "relift.buffer_ratio=2") == 16
    assert capacity("episodes_per_step=8", "relift.buffer_ratio=0.25") == 2
    for ratio in ("0.3", "0", "0.1", "-1"):  # 2.4, 0 and 0.8 start states, and a negative size
        with pytest.raises(ValueError, match=r"relift.buffer_ratio x episodes_per_step must be a whole number of start states, at least 1"):
            load_config(overrides=["method=relift", "episodes_per_step=8", f"relift.buffer_ratio={ratio}"])
    with pytest.raises(ValueError, match="relift_buffer_size' was replaced: .*relift.buffer_ratio"):
        load_config(overrides=["method=relift", "relift_buffer_size=128"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["relift.rl_loss=mixed"], "relift.rl_loss must be one of released, paper"),
        (["credit=turn"], "relift's released form mean-centres"),
        (["relift.sft_lr_ratio=0"], "relift.sft_lr_ratio must be > 0"),
        (["relift.sft_max_grad_norm=-1"], "relift.sft_max_grad_norm must be >= 0"),
        (["relift.entropy_coef=-0.001"], "relift.entropy_coef must be >= 0"),
    ],
)
def test_relift_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_method(load_config(overrides=["method=relift", *overrides]))
    assert load_config(overrides=["method=relift", "credit=turn", "relift.rl_loss=paper"]).credit == "turn"


# ---- The losses, by hand.


def test_rl_loss_is_the_unclipped_ratio_summed_over_max_length_with_the_entropy_bonus():
    logprobs = torch.log(torch.tensor([0.6, 0.2, 0.5])).requires_grad_()
    old = torch.log(torch.tensor([0.4, 0.4, 0.5]))  # ratios 1.5 (outside the 0.2 clip band), 0.5 (outside), 1
    advantages = torch.tensor([1.0, -0.5, 0.25])
    entropy = torch.tensor([0.2, 0.4, 0.6], requires_grad=True)
    scale = 3 / 8  # 3 tokens, answers of at most 8 tokens: the token sum / 8 (max_length_scale)
    loss, stats = relift_policy_loss(logprobs, old, advantages, entropy, scale=scale, entropy_coef=0.001)
    # -A * ratio per token: -1.5, 0.25, -0.25; summed -1.5, over 8: -0.1875; bonus 0.001 x 0.4.
    assert loss.item() == pytest.approx(-1.5 / 8 - 0.001 * 0.4, abs=1e-7)
    assert stats.mean_ratio == pytest.approx(1.0) and stats.entropy == pytest.approx(0.4)
    loss.backward()
    # d/dlogp of -A * ratio / 8 is -A * ratio / 8: no token's gradient is clipped away.
    assert logprobs.grad.tolist() == pytest.approx([-1.5 / 8, 0.25 / 8, -0.25 / 8], abs=1e-7)
    assert entropy.grad.tolist() == pytest.approx([-0.001 / 3] * 3)  # the bonus raises every token's entropy


def test_sft_loss_is_the_token_mean_nll_minus_the_entropy_bonus():
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.125, 1.0])).requires_grad_()
    entropy = torch.tensor([1.0, 2.0, 0.5, 0.5], requires_grad=True)
    loss = relift_sft_loss(logprobs, entropy, entropy_coef=0.001)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4) + math.log(8)) / 4 - 0.001 * 1.0, abs=1e-7)
    loss.backward()
    assert logprobs.grad.tolist() == pytest.approx([-0.25] * 4) and entropy.grad.tolist() == pytest.approx([-0.00025] * 4)
    assert float(relift_sft_loss(logprobs, entropy, entropy_coef=0.0)) == pytest.approx((math.log(2) + math.log(4) + math.log(8)) / 4)


# ---- End to end on the tiny model.


@pytest.fixture
def group_zero_partly_succeeds(monkeypatch):
    """Every policy collection rewritten so that in group 0 the first rollout succeeds (reward 1 on its last turn) and
    the others fail, and every other group fails (rewards 0): a partial success next to all-failed groups."""
    collect = RolloutEngine.collect

    def rewritten(self, seeds, *, group_size=1, responder=None, **kwargs):
        trajectories, stats = collect(self, seeds, group_size=group_size, responder=responder, **kwargs)
        if responder is not None:
            return trajectories, stats
        first = {}
        changed = []
        for t in trajectories:
            wins = t.group == 0 and first.setdefault(t.group, id(t)) == id(t)
            rewards = tuple(0.0 for _ in t.turn_rewards[:-1]) + (1.0 if wins else 0.0,)
            changed.append(dataclasses.replace(t, success=wins, turn_rewards=rewards))
        return changed, stats

    monkeypatch.setattr(RolloutEngine, "collect", rewritten)


@pytest.fixture
def updates(monkeypatch):
    """Every optimiser update of a run: (which optimiser, the gradient-norm clip before it), in order, as torch sees
    them (its clip and AdamW's step)."""
    seen, clips = [], []
    clip, step = torch.nn.utils.clip_grad_norm_, torch.optim.AdamW.step

    def clipping(parameters, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    def stepping(optimizer, *args, **kwargs):
        seen.append((optimizer, clips.pop() if clips else None))
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clipping)
    monkeypatch.setattr(torch.optim.AdamW, "step", stepping)
    return seen


def test_partial_success_is_not_buffered_and_the_sft_update_follows_the_rl_update(tmp_path, group_zero_partly_succeeds, updates, monkeypatch):
    trainer = run(tmp_path, "relift", "max_grad_norm=0.7", "relift.sft_lr_ratio=0.5")
    passes, drained = recorded_passes(monkeypatch, "relift"), []
    drain = trainer.relift.drain
    trainer.relift.drain = lambda: drained.append(drain()) or drained[-1]
    history = trainer.train()

    states = [expert_start_states(len(trainer.expert), step, 2, seed=0) for step in range(4)]
    assert [m["relift_added"] for m in history] == [1, 1, 1, 1]  # group 1 only: group 0 had a success
    # A buffer of 1 x episodes_per_step = 2: full at steps 2 and 4, each time the newest (this step's) first.
    assert [m["step"] for m in history if "relift_sft_loss" in m] == [2, 4]
    assert drained == [[states[1][1], states[0][1]], [states[3][1], states[2][1]]]
    # RL update, then (when full) the SFT update: its own optimiser and clip (1.0; the RL steps' is 0.7 here).
    kinds = [("sft" if optimizer is trainer.relift_optimizer else "rl", clip) for optimizer, clip in updates]
    rl, sft = ("rl", 0.7), ("sft", 1.0)
    assert kinds == [rl, rl, sft, rl, rl, sft] and trainer.relift_optimizer is not trainer.optimizer
    for m in history[1::2]:
        assert m["relift_sft_lr"] == pytest.approx(0.5 * m["lr"]) and m["relift_sft_examples"] == 2
    assert history[-1]["budget_updates"] == 4 + 2 and history[-1]["budget_expert_examples"] == 4

    max_new_tokens = trainer.config.max_new_tokens
    for (batch, _), m in zip(passes, history, strict=True):  # one pass per step
        # Mean-centred returns, no std: group 0's [1, 0] -> [0.5, -0.5] on every turn (with std it would be [1, -1]).
        for t, advantages in zip(batch.trajectories, batch.turn_advantages, strict=True):
            expected = (0.5 if t.success else -0.5) if t.group == 0 else 0.0
            assert advantages.tolist() == pytest.approx([expected] * t.num_turns)
        # The step's one pass has ratio 1: L_RL = sum over tokens of -A / max_new_tokens - 0.001 H.
        token_sum = sum(-float(a[i]) * length for t, a in zip(batch.trajectories, batch.turn_advantages, strict=True) for i, length in enumerate(t.turn_lengths))
        assert m["loss_rl"] == pytest.approx(token_sum / max_new_tokens - 0.001 * m["entropy_rl"], rel=1e-4, abs=1e-7)
        assert m["clip_fraction"] == 0.0


def test_the_sft_optimiser_keeps_moments_of_its_own(tmp_path):
    trainer = run(tmp_path, "relift")  # every start state fails: 2 buffered per step, an SFT update every step
    history = trainer.train()
    assert [m["relift_sft_examples"] for m in history] == [2, 2, 2, 2]
    rl_state, sft_state = trainer.optimizer.state, trainer.relift_optimizer.state
    stepped = [p for p in trainer.parameters if p in sft_state]
    assert stepped and all(p in rl_state for p in stepped)
    for p in stepped:  # 4 RL updates and 4 SFT updates, each optimiser counting its own
        assert float(rl_state[p]["step"]) == 4 and float(sft_state[p]["step"]) == 4
    different = [not torch.equal(rl_state[p]["exp_avg"], sft_state[p]["exp_avg"]) for p in stepped]
    assert sum(different) > len(stepped) // 2  # the SFT gradients' moments, not the RL gradients'


def test_the_sft_update_scores_its_entropy_with_a_graph(tmp_path, monkeypatch):
    seen = []
    entry = OBJECTIVES["relift_sft"]

    def recording(part, scores, prepared, config):
        seen.append((scores.entropy.requires_grad, config.relift.entropy_coef))
        return entry.loss(part, scores, prepared, config)

    monkeypatch.setitem(OBJECTIVES, "relift_sft", dataclasses.replace(entry, loss=recording))
    run(tmp_path, "relift", "steps=1").train()
    assert seen == [(True, 0.001)]


def test_the_paper_form_is_grpo_with_std_and_the_clip(tmp_path, group_zero_partly_succeeds, monkeypatch):
    trainer = run(tmp_path, "paper", "relift.rl_loss=paper", "steps=1")
    passes = recorded_passes(monkeypatch, "relift")
    (m,) = trainer.train()
    ((batch, _),) = passes
    for t, advantages in zip(batch.trajectories, batch.turn_advantages, strict=True):
        expected = (1.0 if t.success else -1.0) if t.group == 0 else 0.0  # (r - mean) / std over [1, 0]
        assert advantages.tolist() == pytest.approx([expected] * t.num_turns, abs=1e-3)
    # Ratio 1 on the one pass: PPO-clip is the token mean of -A.
    tokens = sum(t.num_response_tokens for t in batch.trajectories)
    token_sum = sum(-float(a[i]) * length for t, a in zip(batch.trajectories, batch.turn_advantages, strict=True) for i, length in enumerate(t.turn_lengths))
    assert m["loss_rl"] == pytest.approx(token_sum / tokens, rel=1e-4, abs=1e-7)


def test_resume_restores_the_buffer_and_the_sft_optimiser_exactly(tmp_path):
    # A buffer of 3 (1.5 x 2 start states): step 2 holds 4, updates on 3 and keeps 1 for step 3.
    settings = ["relift.buffer_ratio=1.5"]
    straight = run(tmp_path, "straight", *settings)
    straight_history = straight.train()
    interrupted = run(tmp_path, "resumed", *settings)
    interrupted.train(stop_after=2)  # a kill after the step-2 checkpoint
    assert len(interrupted.relift.items) == 1 and interrupted.relift_sft_updates == 1
    resumed = run(tmp_path, "resumed", *settings, resume=True)
    assert resumed.relift.items == interrupted.relift.items and resumed.relift_sft_updates == 1
    before, after = interrupted.relift_optimizer.state_dict(), resumed.relift_optimizer.state_dict()
    assert before["state"] and before["state"].keys() <= after["state"].keys()
    for key, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][key][name])), (key, name)
    for key in after["state"].keys() - before["state"].keys():  # never reached by a gradient (the vision tower): zeros
        assert not after["state"][key]["exp_avg"].any() and not after["state"][key]["exp_avg_sq"].any()
    history = resumed.train()
    assert_same_samples(history, straight_history)
    assert [m.get("relift_sft_examples") for m in straight_history] == [None, 3, 3, None]
    for a, b in zip(straight.policy.model.parameters(), resumed.policy.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for p, q in zip(straight.parameters, resumed.parameters, strict=True):
        if p in straight.relift_optimizer.state:
            torch.testing.assert_close(straight.relift_optimizer.state[p]["exp_avg_sq"], resumed.relift_optimizer.state[q]["exp_avg_sq"], rtol=0, atol=1e-9)
    # A checkpoint whose SFT optimiser state is gone is damaged, not a fresh optimiser.
    last = tmp_path / "straight" / "checkpoints" / "step-000004"
    shutil.rmtree(last / RELIFT_OPTIMIZER)
    with pytest.raises(CheckpointError, match="relift_optimizer is missing .*made 2 ReLIFT SFT updates"):
        check_checkpoint(last)
