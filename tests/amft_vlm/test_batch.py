"""From trajectories to flat token tensors and gradients: advantages reach the right tokens, micro-batches change nothing."""

import pytest
import torch
from accelerate import Accelerator

from agents.baselines import RandomTextAgent
from amft_vlm.advantages import grpo_turn_advantages
from amft_vlm.batch import RolloutBatch, accumulate_gradient, score_trajectories
from amft_vlm.distributed import Parallel
from amft_vlm.losses import sft_loss
from amft_vlm.rollout import RolloutEngine

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


def test_turn_credit_reaches_the_tokens_through_the_batch(tiny_policies):
    """GRPO turn credit on two hand-made groups, all the way to the per-token advantages."""
    policy = tiny_policies["qwen2-vl"]
    engine = RolloutEngine(policy, "GeneralPoints-v0", env_kwargs={"modality": "language"}, num_envs=2)
    trajectories, _ = engine.collect([3], group_size=2, responder=RandomTextAgent(seed=1), progress=False)
    # Both failed with equal returns: the group has no spread, so every token's advantage is exactly 0.
    rewards = [t.turn_rewards for t in trajectories]
    assert rewards[0] == rewards[1]
    batch = RolloutBatch(trajectories, grpo_turn_advantages(rewards, [t.group for t in trajectories]))
    with torch.no_grad():
        scores = score_trajectories(policy, batch.trajectories, temperature=1.0, turn_advantages=batch.turn_advantages)
    assert scores.advantages.abs().sum() == 0
    with pytest.raises(ValueError, match="turns but advantages of shape"):
        RolloutBatch(trajectories, [torch.zeros(1), torch.zeros(1)])


def test_a_batch_selects_rows_with_their_advantages(episodes):
    advantages = [torch.full((t.num_turns,), float(i)) for i, t in enumerate(episodes)]
    part = RolloutBatch(episodes, advantages).select([2, 0])
    assert part.trajectories == [episodes[2], episodes[0]]
    assert [float(a[0]) for a in part.turn_advantages] == [2.0, 0.0]


@pytest.mark.parametrize("parts", [2, 3])
def test_micro_batches_give_the_token_mean_gradient_of_one_pass(tiny_policies, episodes, parts):
    policy = tiny_policies["qwen2-vl"]
    parameters = [p for p in policy.model.parameters() if p.requires_grad]
    parallel = Parallel("none", Accelerator(cpu=True))

    def loss_of(indices):
        scores = score_trajectories(policy, [episodes[i] for i in indices], temperature=1.0)
        return sft_loss(scores.logprobs), scores, {}

    whole, totals = accumulate_gradient(parallel, parameters, episodes, loss_of, micro_batch_count=1)
    split, split_totals = accumulate_gradient(parallel, parameters, episodes, loss_of, micro_batch_count=parts)
    assert totals["tokens"] == split_totals["tokens"] == sum(t.num_response_tokens for t in episodes)
    assert split_totals["loss"] == pytest.approx(totals["loss"], rel=1e-5)
    reached = [(a, b) for a, b in zip(whole, split, strict=True) if a is not None]
    assert reached and all(p.grad is None for p in parameters)  # taken out of .grad
    for a, b in reached:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
