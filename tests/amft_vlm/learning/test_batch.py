"""From trajectories to flat token tensors and gradients: advantages reach the right tokens, micro-batches change nothing."""

import dataclasses

import pytest
import torch
from accelerate import Accelerator

from agents.baselines import ExpertAgent, RandomTextAgent
from amft_vlm.learning.advantages import grpo_turn_advantages
from amft_vlm.learning.batch import GradientAccumulator, RolloutBatch, micro_batches, score_trajectories
from amft_vlm.learning.distributed import Parallel
from amft_vlm.learning.losses import sft_loss
from amft_vlm.rollout.engine import RolloutEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def episodes(tiny_policies):
    """Four multi-turn GeneralPoints episodes of a random agent, two start states of two each."""
    engine = RolloutEngine(tiny_policies["qwen2-vl"], "GeneralPoints-v0", env_kwargs={"modality": "language"}, num_envs=2)
    trajectories, _ = engine.collect([0, 1], group_size=2, responder=RandomTextAgent(seed=0), progress=False)
    return trajectories


def test_each_turn_advantage_covers_exactly_that_turns_tokens(tiny_policies, episodes):
    policy = tiny_policies["qwen2-vl"]
    advantages = [torch.arange(t.num_turns, dtype=torch.float32) + 10 * i for i, t in enumerate(episodes)]
    with torch.no_grad():
        scores = score_trajectories(policy, episodes, temperature=1.0, turn_advantages=advantages)
    expected = []
    for index, trajectory in enumerate(episodes):
        assert trajectory.num_turns > 1
        for turn, length in enumerate(trajectory.turn_lengths):
            expected += [10.0 * index + turn] * length
    assert scores.advantages.tolist() == expected
    assert scores.num_tokens == sum(t.num_response_tokens for t in episodes) == len(expected)
    assert scores.episode_lengths == [t.num_response_tokens for t in episodes]
    # The model-free agent's tokens were not sampled: their recorded log-probs are 0.
    assert scores.old_logprobs.abs().sum() == 0


def test_turn_credit_reaches_the_tokens_through_the_batch(tiny_policies, episodes):
    """GRPO turn credit on hand-made rewards, all the way to the per-token advantages."""
    policy = tiny_policies["qwen2-vl"]
    pair = episodes[:2]  # one start state, two 6-turn failures of the random agent
    assert [t.num_turns for t in pair] == [6, 6]
    # Rewards-to-go: -6..-1 for the first, 0..5 for the second; each turn's mean is 3 below / above them,
    # so the centred values are -3 and +3 at every turn, their std 3: advantages -1 and +1 throughout.
    rewards = [[-1.0] * 6, [-1.0] * 5 + [5.0]]
    batch = RolloutBatch(pair, grpo_turn_advantages(rewards, [0, 0]))
    with torch.no_grad():
        scores = score_trajectories(policy, batch.trajectories, temperature=1.0, turn_advantages=batch.turn_advantages)
    first, second = pair[0].num_response_tokens, pair[1].num_response_tokens
    assert scores.advantages.tolist() == pytest.approx([-1.0] * first + [1.0] * second, abs=1e-5)
    with pytest.raises(ValueError, match="turns but advantages of shape"):
        RolloutBatch(pair, [torch.zeros(1), torch.zeros(1)])


def test_turn_advantages_follow_the_turns_across_dialogues(tiny_policies):
    """V-IRL restarts the dialogue at every decision point: turn order runs across segments."""
    policy = tiny_policies["qwen2-vl"]
    engine = RolloutEngine(policy, "VIRL-v0", env_kwargs={"modality": "language"}, num_envs=1)
    (trajectory,), _ = engine.collect([0], responder=ExpertAgent(), progress=False)
    assert len(trajectory.segments) > 1
    advantages = torch.arange(trajectory.num_turns, dtype=torch.float32)
    with torch.no_grad():
        scores = score_trajectories(policy, [trajectory], temperature=1.0, turn_advantages=[advantages])
    expected, turn = [], 0
    for segment in trajectory.segments:
        for start, end in segment.turn_spans:
            expected += [float(turn)] * (end - start)
            turn += 1
    assert scores.advantages.tolist() == expected


def test_scoring_a_trajectory_without_its_prepared_images_is_an_error(tiny_policies, monkeypatch):
    policy = tiny_policies["qwen2-vl"]
    engine = RolloutEngine(policy, "GeneralPoints-v0", env_kwargs={"modality": "vision"}, num_envs=1)
    (trajectory,), _ = engine.collect([0], responder=ExpertAgent(), progress=False)
    assert trajectory.image_inputs and trajectory.image_input_bytes > 0
    # Scoring reuses the inputs prepared when the dialogue started: no image is processed again.
    monkeypatch.setattr(type(policy.encoder), "prepare_images", lambda *args, **kwargs: pytest.fail("an image was re-prepared"))
    with torch.no_grad():
        score_trajectories(policy, [trajectory], temperature=1.0)
    with pytest.raises(ValueError, match="no prepared images"):
        score_trajectories(policy, [trajectory.without_image_inputs()], temperature=1.0)
    monkeypatch.undo()
    restored = trajectory.without_image_inputs().with_image_inputs(policy.encoder)
    assert torch.equal(restored.image_inputs[0].pixel_values, trajectory.image_inputs[0].pixel_values)


def test_a_batch_selects_rows_with_their_advantages(episodes):
    advantages = [torch.full((t.num_turns,), float(i)) for i, t in enumerate(episodes)]
    part = RolloutBatch(episodes, advantages).select([2, 0])
    assert part.trajectories == [episodes[2], episodes[0]]
    assert [float(a[0]) for a in part.turn_advantages] == [2.0, 0.0]


@dataclasses.dataclass(frozen=True)
class Counted:
    """A stats type for the test: one float field."""

    tokens: float


@pytest.mark.parametrize("parts", [2, 3])
def test_micro_batches_give_the_token_mean_gradient_of_one_pass(tiny_policies, episodes, parts):
    policy = tiny_policies["qwen2-vl"]
    parameters = [p for p in policy.model.parameters() if p.requires_grad]
    parallel = Parallel("none", Accelerator(cpu=True))

    def one_pass(count):
        accumulator = GradientAccumulator(parallel, episodes, Counted)
        for indices in micro_batches(len(episodes), count):
            scores = score_trajectories(policy, [episodes[i] for i in indices], temperature=1.0)
            accumulator.add(sft_loss(scores.logprobs), scores, Counted(tokens=float(scores.num_tokens)))
        return accumulator.finish(parameters)

    whole, split = one_pass(1), one_pass(parts)
    assert whole.tokens == split.tokens == sum(t.num_response_tokens for t in episodes)
    assert whole.examples == split.examples == len(episodes)
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)
    # A statistic is weighted by its micro-batch's token share: a micro-batch's token count so weighted sums to the
    # sum of squares of the shares times the total, the whole batch's count when it is one micro-batch.
    assert whole.stats == Counted(tokens=pytest.approx(whole.tokens))
    assert split.stats.tokens < whole.tokens
    reached = [(a, b) for a, b in zip(whole.gradient, split.gradient, strict=True) if a is not None]
    assert reached and all(p.grad is None for p in parameters)  # taken out of .grad
    for a, b in reached:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
