"""The ppo critic: value head, credited rewards, GAE over turns, decision states of multi-turn episodes."""

import pytest
import torch

from agents.baselines import RandomTextAgent
from amft_vlm.learning.advantages import gae_turn_advantages
from amft_vlm.learning.critic import ValueHead, credited_rewards, decision_states
from amft_vlm.rollout.engine import RolloutEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_value_head_starts_at_zero():
    head = ValueHead(8)
    assert torch.equal(head(torch.randn(3, 5, 8)), torch.zeros(3, 5))


def test_gae_with_lambda_one_and_zero_values_is_the_reward_to_go():
    rewards = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.5])]
    values = [torch.zeros(3), torch.zeros(1)]
    advantages, targets = gae_turn_advantages(rewards, values, gamma=1.0, lam=1.0, normalize=False)
    torch.testing.assert_close(advantages[0], torch.tensor([2.0, 1.0, 2.0]))
    torch.testing.assert_close(targets[1], torch.tensor([0.5]))


def test_gae_one_step_is_the_td_error_and_normalisation_pools_the_batch():
    rewards = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])]
    values = [torch.tensor([0.5, 2.0]), torch.tensor([1.0, 1.0])]
    raw, targets = gae_turn_advantages(rewards, values, gamma=0.9, lam=0.0, normalize=False)
    # lambda 0: A_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the last turn.
    torch.testing.assert_close(raw[0], torch.tensor([1.0 + 0.9 * 2.0 - 0.5, 0.0 - 2.0]))
    torch.testing.assert_close(targets[0], raw[0] + values[0])
    normalised, _ = gae_turn_advantages(rewards, values, gamma=0.9, lam=0.0)
    pooled = torch.cat(normalised)
    assert abs(pooled.mean()) < 1e-6 and abs(pooled.std(unbiased=False) - 1) < 1e-5
    same, _ = gae_turn_advantages([torch.ones(2)], [torch.zeros(2)], gamma=1.0, lam=0.0)
    torch.testing.assert_close(same[0], torch.ones(2))  # all equal: left unnormalised


def test_decision_states_read_the_token_before_each_response(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    engine = RolloutEngine(policy, "GeneralPoints-v0", env_kwargs={"modality": "language"}, num_envs=2)
    trajectories, _ = engine.collect([0, 1], responder=RandomTextAgent(seed=0), progress=False)
    states = decision_states(policy, trajectories)
    hidden_size = policy.model.config.get_text_config().hidden_size
    for trajectory, episode_states in zip(trajectories, states, strict=True):
        assert trajectory.num_turns > 1
        assert episode_states.shape == (trajectory.num_turns, hidden_size)
        (segment,) = trajectory.segments
        (sequence,) = trajectory.token_sequences(policy)
        positions = [start - 1 for start, _ in segment.turn_spans]
        # The decision point is the newline closing the assistant header.
        assert {policy.decode([sequence.token_ids[p]]) for p in positions} == {"\n"}
        (expected,) = policy.hidden_states([sequence], [positions])
        torch.testing.assert_close(episode_states, expected)
    # Different dialogues so far give different states.
    assert not torch.allclose(states[0][0], states[0][1])


def test_credit_places_the_return_at_the_end_or_per_turn(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    engine = RolloutEngine(policy, "GeneralPoints-v0", env_kwargs={"modality": "language"})
    (trajectory,), _ = engine.collect([3], responder=RandomTextAgent(seed=1), progress=False)
    per_turn = credited_rewards(trajectory, "turn")
    at_end = credited_rewards(trajectory, "episode")
    assert per_turn.tolist() == list(trajectory.turn_rewards)
    assert at_end[:-1].abs().sum() == 0 and at_end[-1] == pytest.approx(trajectory.episode_return)
    with pytest.raises(ValueError, match="credit"):
        credited_rewards(trajectory, "token")
