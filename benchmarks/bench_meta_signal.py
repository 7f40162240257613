"""Meta-gradient signal: dU/dmu redrawn at the demo's warm-up checkpoint, its noise, and what reduces it

AMFT's controller moves mu on dU/dmu, the derivative of the validation reward U through the policy
update. How much one estimate says is measured here at a fixed point: the demo's SFT run at the end of
AMFT's warm-up (``configs/demo.yaml``: the tiny Qwen2-VL at the end of the SFT warm-up, step 276, GeneralPoints language; built
once into ``runs/bench/meta-signal``), the first controller step's update (mu 0.8, 2x4 rollouts, 48 expert
dialogues), once with the clean expert and once with the demo's corrupted one (half of its dialogues'
answers replaced by random text, `amft_vlm.rollout.expert_data.corrupt_dataset`). For each, the validation
episodes are drawn `DRAWS` times (`STATES` start states of the ``val`` split x `SAMPLES` episodes, new
sampling seeds each time, the same seeds for both experts: common random numbers) by the updated
policy, as the trainer draws them.

Every variant of the estimator is computed from the same draws. Per episode and answer, the derivative of
the answer's log-prob along d theta'/d mu is taken by central differences in float64 (the update's
weights copied into a float64 model; a step of 2e-6 of the direction's largest entry), so any subset of
states and samples and any credit can be scored without another backward pass; on the first draw it is
checked against the trainer's own `amft_vlm.learning.meta.meta_gradient` (float32 autograd). Reported per variant:
the mean, standard deviation and signal-to-noise ratio (|mean| / sd) of dU/dmu over the estimates, the
mean and spread of its t-statistic, the share of start states whose episodes tie (no information), the
episodes per estimate and the seconds one estimate costs the trainer (sampling plus its backward passes,
timed on the first draw). Variants: states x samples; ``episode`` credit (each answer weighted by the
episode's return, leave-one-out baseline: Eq. 6 as written) or ``turn`` (by the reward to go from that
answer, leave-one-out per turn); tied states kept (their value is 0) or skipped; pooled over 8 meta steps
(decay 0.8, `amft_vlm.learning.controller.MetaPool`). The paired rows give corrupted minus clean on the same seeds.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agents.policy import VLMPolicy
from amft_vlm.demo import load_demo_config, prepare_inputs
from amft_vlm.learning.batch import score_trajectories
from amft_vlm.learning.controller import MetaPool
from amft_vlm.learning.meta import meta_gradient

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent / "runs" / "bench" / "meta-signal"
DRAWS = 10
STATES = 24
SAMPLES = 4
SHAPES = ((6, 2), (24, 2), (6, 4), (24, 4))
"""States x samples per estimate (subsets of each draw: a draw gives (STATES // s) x (SAMPLES // k) estimates)."""
POOL_STEPS, POOL_DECAY = 8, 0.8
FD_STEP = 2e-6
"""Central-difference step, as a share of the direction's largest entry (float64; checked against autograd)."""
SAMPLING_SEED_BASE = 20_000
THREADS = 2


@dataclass
class Draw:
    """One draw's episodes: per start state, per sample, the answers' rewards and log-prob derivatives."""

    rewards: list[list[list[float]]]
    derivatives: list[list[list[float]]]


def _turn_credit(rewards: Sequence[Sequence[float]]) -> np.ndarray:
    """Leave-one-out reward-to-go per turn (episodes x turns; 0 to go after an episode's end)."""
    turns = max(len(r) for r in rewards)
    to_go = np.zeros((len(rewards), turns))
    for row, episode in enumerate(rewards):
        to_go[row, : len(episode)] = np.cumsum(np.asarray(episode, float)[::-1])[::-1]
    return to_go - (to_go.sum(0, keepdims=True) - to_go) / (len(rewards) - 1)


def state_value(rewards: Sequence[Sequence[float]], derivatives: Sequence[Sequence[float]], credit: str) -> tuple[float, bool]:
    """One start state's <grad U_i, d theta'/d mu> from its episodes, and whether they tie (value 0)."""
    count = len(rewards)
    if credit == "episode":
        returns = np.array([sum(r) for r in rewards])
        weights = returns - (returns.sum() - returns) / (count - 1)
        value = sum(w * sum(d) for w, d in zip(weights, derivatives, strict=True)) / count
        return float(value), bool(np.all(weights == 0))
    weights = _turn_credit(rewards)
    value = sum(float(np.dot(weights[row, : len(d)], d)) for row, d in enumerate(derivatives)) / count
    return value, bool(np.all(weights == 0))


def estimates(draws: Sequence[Draw], states: int, samples: int, credit: str) -> list[tuple[list[float], int]]:
    """Every disjoint (states x samples) block of every draw: its per-state values and its count of tied states."""
    blocks = []
    for draw in draws:
        for first_state in range(0, STATES - states + 1, states):
            for first_sample in range(0, SAMPLES - samples + 1, samples):
                values, tied = [], 0
                for state in range(first_state, first_state + states):
                    chosen = slice(first_sample, first_sample + samples)
                    value, is_tied = state_value(draw.rewards[state][chosen], draw.derivatives[state][chosen], credit)
                    values.append(value)
                    tied += is_tied
                blocks.append((values, tied))
    return blocks


def _t(values: Sequence[float]) -> float:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values) / (spread / math.sqrt(len(values))) if spread > 0 else float("nan")


def summarise(blocks: Sequence[tuple[list[float], int]], *, skip_tied: bool = False, pooled: bool = False) -> dict:
    """Mean, sd and SNR of dU/dmu over the estimates, their t-statistics, and the tied share."""
    means, ts = [], []
    if pooled:  # consecutive estimates as successive meta steps of one run, pooled like the controller does
        for start in range(0, len(blocks) - POOL_STEPS + 1, POOL_STEPS):
            pool = MetaPool()
            for values, _ in blocks[start : start + POOL_STEPS]:
                pool.add(values, decay=POOL_DECAY)
            estimate = pool.estimate()
            means.append(estimate.value)
            ts.append(estimate.t_statistic)
    else:
        for values, _ in blocks:
            kept = [v for v in values if v != 0.0] if skip_tied else values
            if len(kept) < 2:
                continue
            means.append(statistics.fmean(kept))
            ts.append(_t(kept))
    finite = [t for t in ts if math.isfinite(t)]
    spread = statistics.stdev(means) if len(means) > 1 else float("nan")
    return {
        "mean": statistics.fmean(means),
        "sd": spread,
        "snr": abs(statistics.fmean(means)) / spread if spread > 0 else float("nan"),
        "t_mean": statistics.fmean(finite) if finite else float("nan"),
        "t_sd": statistics.stdev(finite) if len(finite) > 1 else float("nan"),
        "tied": statistics.fmean(tied / len(values) for values, tied in blocks),
        "estimates": len(means),
    }


def _turn_derivatives(policy64: VLMPolicy, direction: list[torch.Tensor | None], episodes, temperature: float) -> list[list[float]]:
    """Per episode, per answer: d/d epsilon of the answer's log-prob at theta' + epsilon d theta'/d mu (float64 central differences)."""
    parameters = [p for p in policy64.model.parameters() if p.requires_grad]
    largest = max(float(d.abs().max()) for d in direction if d is not None)
    step = FD_STEP / largest

    def shifted(scale: float) -> torch.Tensor:
        with torch.no_grad():
            for parameter, change in zip(parameters, direction, strict=True):
                if change is not None:
                    parameter.add_(change.to(parameter.dtype), alpha=scale)
        parts = [score_trajectories(policy64, episodes[i : i + 16], temperature=temperature).logprobs for i in range(0, len(episodes), 16)]
        return torch.cat(parts).detach()

    with torch.no_grad():
        plus = shifted(step)
        minus = shifted(-2 * step)
        shifted(step)  # back to theta'
    per_token = ((plus - minus) / (2 * step)).tolist()
    derivatives, position = [], 0
    for episode in episodes:
        turns = []
        for length in episode.turn_lengths:
            turns.append(sum(per_token[position : position + length]))
            position += length
        derivatives.append(turns)
    return derivatives


def measure(expert: str, name: str, inputs: dict) -> tuple[list[Draw], dict]:
    """The clean or corrupted update at the warm-up checkpoint, then `DRAWS` draws of validation episodes."""
    from amft_vlm.learning.trainer import Trainer

    config = inputs["config"].train_config(
        "amft", model=inputs["model"], expert_data=inputs["expert"], output_dir=str(ROOT / f"update-{name}"), warm_start=inputs["checkpoint"]
    )
    config.expert_data_after_warmup = expert if expert != inputs["expert"] else None
    config.num_envs = 96  # validation episodes of a draw in one wave; the sampling law does not depend on it
    trainer = Trainer(config.validate(), progress=False)
    step = config.controller.warmup_steps
    sft = trainer.collector.sft_batch(step)
    rollouts, _ = trainer.collector.rollouts(step)
    update, direction = trainer._update(step, trainer.controller.mu_for_step(step), sft, rollouts, lookahead=True)
    policy64 = VLMPolicy.from_pretrained(inputs["model"], dtype="float64")
    policy64.model.load_state_dict(trainer.policy.model.state_dict())
    seeds = [(1 << 30) + i for i in range(STATES)]
    draws, timing = [], {}
    for index in range(DRAWS):
        started = time.perf_counter()
        episodes, _ = trainer.validation_engine.collect(seeds, group_size=SAMPLES, sampling_seed=SAMPLING_SEED_BASE + index, progress=False)
        sampled = time.perf_counter()
        derivatives = _turn_derivatives(policy64, direction, episodes, trainer.validation_engine.sampling_temperature)
        rewards = [[list(t.turn_rewards) for t in episodes if t.group == g] for g in range(STATES)]
        per_state = [[d for d, t in zip(derivatives, episodes, strict=True) if t.group == g] for g in range(STATES)]
        draws.append(Draw(rewards, per_state))
        if index == 0:  # the trainer's own estimate on the same episodes, timed and compared
            backward_started = time.perf_counter()
            own = meta_gradient(trainer.policy, trainer.parameters, trainer.parallel, episodes, direction, temperature=1.0, micro_batch_count=1).values
            timing = {
                "sample_per_episode": (sampled - started) / len(episodes),
                "backward_per_episode": (time.perf_counter() - backward_started) / len(episodes),
            }
            ours = [state_value(r, d, "episode")[0] for r, d in zip(rewards, per_state, strict=True)]
            scale = max(abs(v) for v in own) or 1.0
            timing["check"] = max(abs(a - b) for a, b in zip(own, ours, strict=True)) / scale
        log.info("%s draw %d/%d: %.1f s", name, index + 1, DRAWS, time.perf_counter() - started)
    timing["update"] = {key: update.get(key) for key in ("loss_sft", "grad_norm", "cos_sft_rl")}
    return draws, timing


def prepare() -> dict:
    """The demo's inputs and its SFT run up to the warm-up checkpoint (built once), and the corrupted expert."""
    from amft_vlm.learning.trainer import Trainer

    config = load_demo_config()
    warmup = config.train.controller.warmup_steps
    ROOT.mkdir(parents=True, exist_ok=True)
    model, expert, corrupted = prepare_inputs(ROOT, config, progress=False)
    checkpoint = ROOT / "sft" / "checkpoints" / f"step-{warmup:06d}"
    if not (checkpoint / "trainer_state.json").is_file():
        sft = config.train_config("sft", model=str(model), expert_data=str(expert), output_dir=str(ROOT / "sft"))
        Trainer(sft, progress=True).train(stop_after=warmup)
    return {"config": config, "model": str(model), "expert": str(expert), "corrupted": str(corrupted), "checkpoint": str(checkpoint)}


def _row(label: str, shape: str, credit: str, tied: str, stats: dict, episodes: int, seconds: float | None) -> str:
    cost = f"{seconds:.1f}" if seconds is not None else ""
    return (
        f"| {label} | {shape} | {credit} | {tied} | {stats['mean']:+.3f} | {stats['sd']:.3f} | {stats['snr']:.2f} | "
        f"{stats['t_mean']:+.2f} ± {stats['t_sd']:.2f} | {100 * stats['tied']:.0f}% | {episodes} | {cost} | {stats['estimates']} |"
    )


def run() -> str:
    """Measure, and return the markdown section for BENCHMARKS.md (also printed)."""
    torch.set_num_threads(THREADS)
    inputs = prepare()
    measured = {name: measure(expert, name, inputs) for name, expert in (("clean", inputs["expert"]), ("corrupted", inputs["corrupted"]))}
    header = [
        "| expert | states x samples | credit | tied states | mean dU/dmu | sd | SNR | t (mean ± sd) | tied | episodes | s per estimate | estimates |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    rows = []
    for name, (draws, timing) in measured.items():
        per_episode = timing["sample_per_episode"] + timing["backward_per_episode"]
        for credit in ("episode", "turn"):
            for states, samples in SHAPES:
                blocks = estimates(draws, states, samples, credit)
                episodes = states * samples
                rows.append(_row(name, f"{states}x{samples}", credit, "kept", summarise(blocks), episodes, episodes * per_episode))
        blocks = estimates(draws, 6, 2, "turn")
        rows.append(_row(name, "6x2", "turn", "skipped", summarise(blocks, skip_tied=True), 12, 12 * per_episode))
        rows.append(_row(name, f"6x2, pooled over {POOL_STEPS} (decay {POOL_DECAY})", "turn", "kept", summarise(blocks, pooled=True), 12 * POOL_STEPS, 12 * per_episode))
    paired = []
    for credit in ("episode", "turn"):
        for states, samples in SHAPES:
            clean = estimates(measured["clean"][0], states, samples, credit)
            corrupted = estimates(measured["corrupted"][0], states, samples, credit)
            differences = [([b - a for a, b in zip(x, y, strict=True)], 0) for (x, _), (y, _) in zip(clean, corrupted, strict=True)]
            stats = summarise(differences)
            unpaired = math.hypot(summarise(clean)["sd"], summarise(corrupted)["sd"])
            paired.append(
                f"| {states}x{samples} | {credit} | {stats['mean']:+.3f} | {stats['sd']:.3f} | {unpaired:.3f} | {stats['snr']:.2f} | {stats['t_mean']:+.2f} ± {stats['t_sd']:.2f} |"
            )
    notes = []
    for name, (_, timing) in measured.items():
        update = timing["update"]
        notes.append(
            f"- {name} expert: update with SFT loss {update['loss_sft']:.3f}, gradient norm {update['grad_norm']:.2f}, "
            f"cos(g_SFT, g_RL) {update['cos_sft_rl']:+.3f}; per episode {timing['sample_per_episode']:.2f} s sampling + "
            f"{timing['backward_per_episode']:.2f} s backward; central differences vs the trainer's autograd estimate on the "
            f"first draw: largest difference {100 * timing['check']:.2f}% of the largest state value."
        )
    text = "\n".join(
        [
            f"{DRAWS} draws of {STATES} x {SAMPLES} validation episodes per expert; each estimate is a disjoint block of a draw.",
            "",
            *header,
            *rows,
            "",
            "Corrupted minus clean on the same sampling seeds (common random numbers); 'unpaired sd' is what independent draws would give.",
            "",
            "| states x samples | credit | mean difference | sd | unpaired sd | SNR | t (mean ± sd) |",
            "|---|---|---:|---:|---:|---:|---|",
            *paired,
            "",
            *notes,
        ]
    )
    print(text)
    return text
