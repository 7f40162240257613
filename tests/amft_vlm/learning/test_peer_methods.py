"""The peers' methods (CHORD-phi, DFT, LUFFY, SRFT) end to end on the tiny model: each runs, and each does
what sets it apart (its losses are checked against hand-computed values in test_peer_losses.py; ReLIFT's
choices, end to end and by hand, in test_relift.py)."""

import dataclasses
import json
import math
import statistics

import pytest
import torch

from amft_vlm.learning.batch import RolloutBatch, score_trajectories
from amft_vlm.learning.methods import get_method
from amft_vlm.learning.objectives import OBJECTIVES
from amft_vlm.learning.resolve import resolve_method
from amft_vlm.learning.trainer import Trainer
from amft_vlm.rollout.engine import RolloutEngine
from amft_vlm.run.config import load_config
from tests.amft_vlm.learning.test_trainer import FAST


def run(tmp_path, name, *overrides, resume=False):
    config = load_config(overrides=[*FAST, f"output_dir={tmp_path / name}", *overrides])
    return Trainer(config, resume=resume, progress=False)


def recorded_passes(monkeypatch, objective):
    """Every pass of `objective` (a name in the public objectives table), recorded where the pass starts: its batch
    (trajectories with their advantages) and the batch scored without gradient at the parameters the pass runs at,
    so a test can recompute the pass's loss by hand from what the pass was given (its trajectories and their
    rewards), not from what the trainer computed."""
    passes = []
    entry = OBJECTIVES[objective]

    def prepare(context, batch):
        temperature = context.temperature if entry.on_rollouts else 1.0
        with torch.no_grad():
            passes.append((batch, score_trajectories(context.policy, batch.trajectories, temperature=temperature)))
        return entry.prepare(context, batch)

    monkeypatch.setitem(OBJECTIVES, objective, dataclasses.replace(entry, prepare=prepare))
    return passes


def step_batches(passes, per_step):
    """The batch of each step from its `per_step` passes (its mini-batches), in the passes' order."""
    steps = [passes[i : i + per_step] for i in range(0, len(passes), per_step)]
    return [RolloutBatch([t for b, _ in step for t in b.trajectories], [a for b, _ in step for a in b.turn_advantages]) for step in steps]


def per_token(values, scores):
    """One value per trajectory, repeated over each of its tokens (`scores`' order)."""
    return torch.cat([torch.full((n,), float(v), dtype=scores.logprobs.dtype) for v, n in zip(values, scores.episode_lengths, strict=True)])


def group_advantages_by_hand(trajectories, *, scale_by_std):
    """Each trajectory's return minus its (joint) group's mean return, divided by the group's std with `scale_by_std`."""
    returns = {}
    for t in trajectories:
        returns.setdefault(t.group, []).append(sum(t.turn_rewards))
    advantages = []
    for t in trajectories:
        mean, std = statistics.fmean(returns[t.group]), statistics.pstdev(returns[t.group])
        centred = sum(t.turn_rewards) - mean
        advantages.append(centred if not scale_by_std else centred / (std + 1e-6) if std > 1e-6 else 0.0)
    return advantages


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


def test_luffy_groups_hold_one_demonstration_from_the_same_start_state(tmp_path, collected_seeds, monkeypatch):
    # Two mini-batches per step (LUFFY's script: 2 unclipped optimiser steps per batch); float64 for exact recomputation.
    trainer = run(tmp_path, "luffy", "method=luffy", "group_size=3", "mini_batch_size=3", "dtype=float64")
    passes = recorded_passes(monkeypatch, "luffy")
    history = trainer.train()
    batches = step_batches(passes, 2)
    for seeds_and_size, batch in zip(collected_seeds, batches, strict=True):
        rollouts = [t for t in batch.trajectories if t.sampling_temperature is not None]
        demos = sorted((t for t in batch.trajectories if t.sampling_temperature is None), key=lambda t: t.group)
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
    assert last["budget_updates"] == 4 * 2 and len(passes) == 8
    # Each pass's loss recomputed from its trajectories: advantages = the joint group's returns minus their mean
    # (no std: the untrained policy fails, the demonstration succeeds, so every group's std is far from 1),
    # -A * ratio on the rollouts' tokens and -A * p / (p + 0.1) on the expert's, summed and divided by
    # max_new_tokens (not also by the answers), minus 0.001 x the mean entropy of all the tokens.
    expected = []
    for step, batch in enumerate(batches):
        advantages = dict(zip(map(id, batch.trajectories), group_advantages_by_hand(batch.trajectories, scale_by_std=False), strict=True))
        assert all(abs(statistics.pstdev([sum(t.turn_rewards) for t in batch.trajectories if t.group == g]) - 1) > 0.5 for g in (0, 1))
        for part, scores in passes[2 * step : 2 * step + 2]:
            trajectories = part.trajectories
            a = per_token([advantages[id(t)] for t in trajectories], scores)
            expert = per_token([t.sampling_temperature is None for t in trajectories], scores).bool()
            p, ratio = scores.logprobs.exp(), (scores.logprobs - scores.old_logprobs).exp()
            policy_gradient = torch.where(expert, -a * p / (p + 0.1), -a * ratio).sum() / 16
            bonus = -0.001 * scores.entropy.mean()
            assert sum(len(t.turn_rewards) for t in trajectories) > 1  # so per-answer division would differ
            expected.append((float(policy_gradient), float(bonus), float(ratio[~expert].max())))
    for step, m in enumerate(history):
        first, second = expected[2 * step], expected[2 * step + 1]
        assert m["mu"] == 0 and "loss_sft" not in m
        assert m["luffy_policy_gradient"] == pytest.approx((first[0] + second[0]) / 2, rel=1e-6)
        assert m["luffy_entropy_bonus"] == pytest.approx((first[1] + second[1]) / 2, rel=1e-6)
        assert m["loss_rl"] == pytest.approx((first[0] + first[1] + second[0] + second[1]) / 2, rel=1e-6)
        assert abs(second[2] - 1) > 1e-6  # the second update's ratio moved off 1, unclipped


@pytest.mark.parametrize(
    "form",
    [
        [],  # the authors' released code
        ["srft.sft_entropy_sign=-1", "srft.entropy=rollouts", "srft.shaping_gamma=null", "srft.self_rl=sign", "srft.entropy_coef=0"],
    ],
    ids=["released", "paper"],
)
def test_srft_loss_parts_match_a_recomputation_by_hand(tmp_path, form, monkeypatch):
    paper = bool(form)
    trainer = run(tmp_path, "srft", "method=srft", "group_size=3", "gradient_accumulation_steps=2", "dtype=float64", *form)
    collect = trainer.engine.collect

    def one_rollout_per_group_succeeds(seeds, **kwargs):
        # The untrained policy fails everywhere: lift each group's first rollout's return above its group's mean, so
        # the step has positive own tokens (w_RL's) as well as negative ones.
        rollouts, stats = collect(seeds, **kwargs)
        firsts = {}
        for index, t in enumerate(rollouts):
            firsts.setdefault(t.group, index)
        lifted = [dataclasses.replace(t, turn_rewards=(*t.turn_rewards[:-1], t.turn_rewards[-1] + 30.0)) if i in firsts.values() else t for i, t in enumerate(rollouts)]
        return lifted, stats

    trainer.engine.collect = one_rollout_per_group_succeeds
    passes = recorded_passes(monkeypatch, "srft")
    history = trainer.train()
    assert len(passes) == len(history) == 4
    for (batch, scores), m in zip(passes, history, strict=True):
        trajectories = batch.trajectories
        # GRPO's advantages over the joint group (with its std), from the rewards.
        a = per_token(group_advantages_by_hand(trajectories, scale_by_std=True), scores)
        demo = per_token([t.sampling_temperature is None for t in trajectories], scores).bool()
        positive, negative = ~demo & (a > 0), ~demo & (a < 0)
        assert demo.any() and positive.any() and negative.any()
        logp, entropy, total = scores.logprobs, scores.entropy, scores.num_tokens
        p = logp.exp()
        if paper:
            # One H, the policy's mean entropy on its own rollouts (not the demonstrations'): 0.5 exp(-H), 0.1 exp(H);
            # each term the mean over its own tokens; the plain ratio p on the demonstrations; no entropy bonus.
            h = entropy[~demo].mean()
            assert abs(float(h - entropy.mean())) > 1e-3  # the demonstrations' tokens would move it
            weights_entropy = torch.full_like(entropy, float(h))
            w_sft, w_rl = 0.5 * torch.exp(-weights_entropy), 0.1 * torch.exp(weights_entropy)
            parts = {
                "srft_demo_sft": (w_sft * -logp)[demo].mean(), "srft_demo_rl": (-a * p)[demo].mean(),
                "srft_self_positive": (w_rl * -logp)[positive].mean(), "srft_self_negative": logp[negative].mean(),
                "srft_entropy_bonus": torch.tensor(0.0),
            }  # fmt: skip
        else:
            # Each token's own H: 0.5 exp(+H_t) on the demonstration's tokens, 0.1 exp(H_t) on the positive ones; the
            # policy-gradient terms one mean over all tokens (shaped demonstrations, PPO-clipped own tokens); the bonus.
            weights_entropy = entropy
            w_sft, w_rl = 0.5 * torch.exp(entropy), 0.1 * torch.exp(entropy)
            ratio = (logp - scores.old_logprobs).exp()
            own = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
            parts = {
                "srft_demo_sft": (w_sft * -logp)[demo].mean(), "srft_demo_rl": (-a * p / (p + 0.1))[demo].sum() / total,
                "srft_self_positive": (w_rl * own)[positive].sum() / total, "srft_self_negative": own[negative].sum() / total,
                "srft_entropy_bonus": -0.001 * entropy.mean(),
            }  # fmt: skip
        for key, value in parts.items():
            assert m[key] == pytest.approx(float(value), rel=1e-6, abs=1e-12), key
        assert m["loss_rl"] == pytest.approx(float(sum(parts.values())), rel=1e-6)
        assert m["srft_w_sft"] == pytest.approx(float(w_sft[demo].mean()), rel=1e-6)
        assert m["srft_w_rl"] == pytest.approx(float(w_rl[positive].mean()), rel=1e-6)
        assert m["srft_entropy"] == pytest.approx(float(weights_entropy[demo].mean()), rel=1e-6)


def test_chord_and_dft_sft_losses_match_a_recomputation_by_hand(tmp_path, monkeypatch):
    # Each method's L_SFT recomputed from its expert batch: the NLL weighted by w(p) = p (DFT), p (1 - p) (CHORD-phi),
    # 1 (CHORD-mu, whose mu follows CHORD's 200-step schedule, not one over the run's 4 steps).
    weights = {"dft": lambda p: p, "chord-phi": lambda p: p * (1 - p), "scheduled-mix": lambda p: torch.ones_like(p)}
    mus = {"dft": [1.0] * 4, "chord-phi": [0.1] * 4, "scheduled-mix": [0.05 + 0.85 * 0.5 * (1 + math.cos(math.pi * s / 200)) for s in range(4)]}
    for method, weight in weights.items():
        trainer = run(tmp_path, method, f"method={method}", "fixed_mu=0.1", "dtype=float64")
        passes = recorded_passes(monkeypatch, get_method(method).sft_objective)
        history = trainer.train()
        assert [m["mu"] for m in history] == pytest.approx(mus[method]), method
        for (_, scores), m in zip(passes, history, strict=True):
            p = scores.logprobs.exp()
            assert m["loss_sft"] == pytest.approx(float((weight(p) * -scores.logprobs).mean()), rel=1e-6), method
        if method == "dft":
            assert all("loss_rl" not in m for m in history) and history[-1]["budget_rollout_episodes"] == 0
            lines = (tmp_path / "dft" / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=luffy", "group_size=1"], "group_size must be >= 2 for luffy"),
        (["method=luffy", "credit=turn"], "set credit: episode"),
        (["method=srft", "advantage=ppo"], "srft computes group advantages"),
        (["method=relift", "relift.buffer_ratio=0"], "relift.buffer_ratio"),
        (["method=luffy", "luffy.shaping_gamma=0"], "luffy.shaping_gamma"),
        (["method=chord-phi", "chord_phi.mu=linear"], "chord_phi.mu"),
        (["method=luffy", "luffy.normaliser=answers"], "luffy.normaliser"),
        (["method=luffy", "luffy.entropy_coef=-0.001"], "luffy.entropy_coef"),
        (["method=srft", "srft.sft_entropy_sign=0"], "srft.sft_entropy_sign"),
        (["method=srft", "srft.entropy=mean"], "srft.entropy"),
        (["method=srft", "srft.self_rl=reinforce"], "srft.self_rl"),
        (["method=srft", "srft.shaping_gamma=0"], "srft.shaping_gamma"),
        (["method=srft", "srft.entropy_coef=-1"], "srft.entropy_coef"),
        (["method=scheduled-mix", "schedule_warmup_steps=-1"], "schedule_warmup_steps"),
    ],
)
def test_peer_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_method(load_config(overrides=overrides))
