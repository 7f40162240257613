"""Vision-modality loss passes with and without repeated image preparation (tiny Qwen2-VL on CPU)

A trajectory keeps each image's vision-tower inputs from when its dialogue started
(`Trajectory.image_inputs`), so scoring it (every SFT draw, every RL update, the critic) never
processes an image again. Before that change every scoring prepared each image anew from its uint8
array: resize, rescale, normalise and cut into patches. This benchmark times the loss passes of one
training step both ways in the same run:

- **SFT pass**: 8 oracle-expert episodes (`ExpertAgent`), teacher-forced at T=1, ``L_SFT`` and its
  backward pass;
- **RL pass**: 8 rollouts of the tiny policy (2 start states x 4, up to 16 new tokens per answer),
  scored at the sampling temperature with their GRPO advantages, the clipped ``L_RL`` and its backward.

on GeneralPoints-v0 (vision, the 1200 px card table, one image per episode) and VIRL-v0 (vision, the
built-in city, 901 px street-view grids, one image per decision point; 4 expert episodes, about 48
images, in its SFT pass). "Images re-prepared" runs the
same trajectories with their prepared inputs dropped, each image prepared from its uint8 array when the
pass scores the batch, exactly as the code did before. Images
get at most 256 tokens (`MAX_PIXELS`); the time to prepare one image is logged too. What is saved is
host (CPU) time per scoring, the same on a GPU machine, where the passes themselves are much faster.
Each figure is the median of 5 timed passes after one untimed one; torch runs on one thread.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time

import torch

from agents.baselines import ExpertAgent
from agents.policy import VLMPolicy
from agents.tiny import build_tiny_model
from amft_vlm.learning.advantages import grpo_episode_advantages
from amft_vlm.learning.batch import score_trajectories
from amft_vlm.learning.losses import clipped_policy_loss, sft_loss
from amft_vlm.rollout.engine import RolloutEngine
from benchmarks.common import Measurement

log = logging.getLogger(__name__)

ENVIRONMENTS = {
    "GeneralPoints-v0": ({"modality": "vision", "split": "train"}, 8),
    "VIRL-v0": ({"modality": "vision", "split": "train"}, 4),
}
"""Environment -> (keyword arguments, expert episodes in the SFT pass); a V-IRL expert episode has ~12 images."""
MAX_PIXELS = 28 * 28 * 256
"""At most 256 image tokens per image (the GeneralPoints table is resized from 1200 to 420 px, a V-IRL grid
from 901 to 448): a budget these tasks are commonly trained at, small enough for the tiny model on CPU."""
REPEATS = 5


def _median_seconds(work, repeats: int = REPEATS) -> float:
    work()  # untimed: first calls allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sft_pass(policy: VLMPolicy, trajectories) -> None:
    scores = score_trajectories(policy, trajectories, temperature=1.0)
    sft_loss(scores.logprobs).backward()
    policy.model.zero_grad(set_to_none=True)


def _rl_pass(policy: VLMPolicy, trajectories, advantages) -> None:
    scores = score_trajectories(policy, trajectories, temperature=1.0, turn_advantages=advantages)
    loss, _ = clipped_policy_loss(scores.logprobs, scores.old_logprobs, scores.advantages)
    loss.backward()
    policy.model.zero_grad(set_to_none=True)


def _prepared_at_scoring(encoder, pass_):
    """The pass as it ran before: every image prepared from its uint8 array when the batch is scored."""

    def run(batch):
        pass_([trajectory.with_image_inputs(encoder) for trajectory in batch])

    return run


def run() -> list[Measurement]:
    """Seconds per SFT and RL loss pass with images prepared once vs at every scoring, per environment."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    measurements = []
    try:
        with tempfile.TemporaryDirectory() as directory:
            policy = VLMPolicy.from_pretrained(build_tiny_model("qwen2-vl", directory, seed=0), max_pixels=MAX_PIXELS)
            for env_id, (env_kwargs, expert_episodes) in ENVIRONMENTS.items():
                engine = RolloutEngine(policy, env_id, env_kwargs=env_kwargs, num_envs=8, max_new_tokens=16)
                expert, _ = engine.collect(range(expert_episodes), responder=ExpertAgent(), progress=False)
                rollouts, _ = engine.collect(range(2), group_size=4, sampling_seed=0, progress=False)
                engine.close()
                advantages = grpo_episode_advantages([t.turn_rewards for t in rollouts], [t.group for t in rollouts])
                images = [image for t in expert for image in t.images]
                per_image = _median_seconds(lambda images=images: policy.encoder.prepare_images(images)) / len(images)
                log.info("%s: preparing one image takes %.1f ms", env_id, 1000 * per_image)
                passes = {
                    "SFT": (lambda batch: _sft_pass(policy, batch), expert),
                    "RL": (lambda batch, advantages=advantages: _rl_pass(policy, batch, advantages), rollouts),
                }
                for kind, (work, batch) in passes.items():
                    cached = _median_seconds(lambda work=work, batch=batch: work(batch))
                    bare = [trajectory.without_image_inputs() for trajectory in batch]
                    before = _prepared_at_scoring(policy.encoder, work)
                    repeated = _median_seconds(lambda before=before, bare=bare: before(bare))
                    count = sum(len(t.images) for t in batch)
                    log.info("%s %s pass: %.3f s (images prepared once) vs %.3f s (re-prepared)", env_id, kind, cached, repeated)
                    measurements.append(
                        Measurement(
                            name=f"{env_id} vision, {kind} pass over {len(batch)} episodes ({count} images)",
                            value=cached,
                            unit="s/pass",
                            baseline_name="images re-prepared at every scoring (before)",
                            baseline_value=repeated,
                            lower_is_better=True,
                        )
                    )
    finally:
        torch.set_num_threads(threads)
    return measurements
