"""The meta-gradient's measurement on fixed episodes and a fixed direction: by hand, and on one and two processes.

Nothing is sampled (model-free answers, a direction from a seed) and everything is float64 (batch layouts
agree to ~1e-9 there), so the
comparisons are tight: a wrong baseline, a missing 1/K, a sum of the processes' states instead of their
mean or a wrong shard changes the value by far more than rounding does.
"""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from agents.policy import VLMPolicy
from amft_vlm.learning.batch import score_trajectories, take_gradients
from amft_vlm.learning.distributed import flat_dot
from amft_vlm.learning.meta import META_CREDITS, meta_gradient
from tests.amft_vlm import meta_fixed
from tests.amft_vlm.learning.test_distributed import free_port

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def float64_policy(tiny_checkpoints):
    return VLMPolicy.from_pretrained(tiny_checkpoints["qwen2-vl"], dtype="float64")


def by_hand(policy, episodes, direction, temperature=1.0):
    """Per start state: (1/K) sum_j (R_j - mean of the others' R) <grad log p(tau_j), direction>, one episode at a time."""
    parameters = [p for p in policy.model.parameters() if p.requires_grad]
    values = []
    for group in sorted({t.group for t in episodes}):
        members = [t for t in episodes if t.group == group]
        returns = [t.episode_return for t in members]
        total = 0.0
        for j, trajectory in enumerate(members):
            others = [r for k, r in enumerate(returns) if k != j]
            policy.model.zero_grad(set_to_none=True)
            score_trajectories(policy, [trajectory], temperature=temperature).logprobs.sum().backward()
            total += (returns[j] - sum(others) / len(others)) * flat_dot(take_gradients(parameters), direction)
        values.append(total / len(members))
    return values


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_meta_gradient_is_the_leave_one_out_reinforce_estimate_by_hand(float64_policy, temperature):
    """By hand, at the sampling temperature given (the log-probs of episodes sampled at T are those at T)."""
    policy = float64_policy
    episodes = meta_fixed.fixed_episodes(policy)
    returns = [[t.episode_return for t in episodes if t.group == g] for g in range(len(meta_fixed.ANSWERS))]
    assert len(set(returns[1])) == 1 and all(len(set(r)) > 1 for i, r in enumerate(returns) if i != 1)
    parameters = [p for p in policy.model.parameters() if p.requires_grad]
    direction = meta_fixed.fixed_direction(parameters)
    expected = by_hand(policy, episodes, direction, temperature)
    measured = meta_gradient(policy, parameters, _one_process(), episodes, direction, temperature=temperature, micro_batch_count=2)
    assert measured.values[1] == 0.0 and expected[1] == pytest.approx(0.0, abs=1e-12)  # the tied state
    assert min(abs(v) for i, v in enumerate(expected) if i != 1) > 1e-3  # the others carry signal
    assert measured.values == pytest.approx(expected, rel=1e-7, abs=1e-12)
    assert (measured.states, measured.tied_states) == (4, 1)
    # Raw returns as weights (no baseline) give another value: the test can tell.
    assert sum(expected) != pytest.approx(_raw_return_value(policy, episodes, direction), rel=1e-3)


def test_turn_credit_weighs_each_answer_by_its_reward_to_go_against_the_others_at_that_turn():
    """`meta_credit: turn`, as the meta-gradient uses it: reward to go minus the mean of the other episodes' at the same
    turn (0 after an episode's end); one episode alone in its group gets 0. Episode credit differs on these episodes."""
    episodes = [
        SimpleNamespace(turn_rewards=rewards, group=group, num_turns=len(rewards), episode_return=sum(rewards))
        for rewards, group in (([-3.0, -1.0], 0), ([-2.0], 0), ([1.0, 5.0], 0), ([2.0], 1))
    ]
    turn = [weights.tolist() for weights in META_CREDITS["turn"](episodes)]
    assert turn == [pytest.approx(w) for w in ([-6.0, -3.5], [-3.0], [9.0, 5.5], [0.0])]
    episode = [weights.tolist() for weights in META_CREDITS["episode"](episodes)]
    assert episode == [pytest.approx(w) for w in ([-6.0, -6.0], [-3.0, ], [9.0, 9.0], [0.0])]


def _raw_return_value(policy, episodes, direction):
    parameters = [p for p in policy.model.parameters() if p.requires_grad]
    total = 0.0
    for trajectory in episodes:
        policy.model.zero_grad(set_to_none=True)
        score_trajectories(policy, [trajectory], temperature=1.0).logprobs.sum().backward()
        total += trajectory.episode_return * flat_dot(take_gradients(parameters), direction) / meta_fixed.SAMPLES
    return total


def _one_process():
    from types import SimpleNamespace

    from amft_vlm.learning.distributed import Parallel

    return Parallel("none", SimpleNamespace(num_processes=1, process_index=0, distributed_type="NO"))


@pytest.fixture(scope="module")
def measured_on(tiny_checkpoints, tmp_path_factory):
    """The measurement of `meta_fixed` on one process and on two (ddp, fsdp2)."""
    root = tmp_path_factory.mktemp("meta-fixed")
    model = str(tiny_checkpoints["qwen2-vl"])
    results = {}
    for name, strategy, processes in (("one", "none", 1), ("ddp", "ddp", 2), ("fsdp2", "fsdp2", 2)):
        out = root / f"{name}.json"
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        result = subprocess.run([*launch, "-m", "tests.amft_vlm.meta_fixed", model, strategy, str(out)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = json.loads(out.read_text())
    return results


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_meta_gradient_of_fixed_episodes_is_the_same_on_two_processes(measured_on, float64_policy, strategy):
    one, two = measured_on["one"], measured_on[strategy]
    assert abs(one["value"]) > 1e-3
    assert two["value"] == pytest.approx(one["value"], rel=1e-7)
    # Two processes pair the states in rounds (0 with 1, 2 with 3): each round's value is the mean of its two.
    assert two["values"] == pytest.approx([(one["values"][0] + one["values"][1]) / 2, (one["values"][2] + one["values"][3]) / 2], rel=1e-7)
    assert (two["states"], two["tied_states"]) == (one["states"], one["tied_states"]) == (4, 1)
    # And the one-process value is the hand-computed estimate (in this process, same weights and episodes).
    policy = float64_policy
    parameters = [p for p in policy.model.parameters() if p.requires_grad]
    expected = by_hand(policy, meta_fixed.fixed_episodes(policy), meta_fixed.fixed_direction(parameters))
    assert one["values"] == pytest.approx(expected, rel=1e-7, abs=1e-12)


def test_a_float32_and_a_float64_measurement_agree_to_float32_rounding(tiny_policies, float64_policy):
    """The float64 path is the float32 one computed more exactly, not another computation."""
    values = {}
    for name, policy in (("float32", tiny_policies["qwen2-vl"]), ("float64", float64_policy)):
        parameters = [p for p in policy.model.parameters() if p.requires_grad]
        direction = [d.to(p.dtype) for d, p in zip(meta_fixed.fixed_direction(parameters), parameters, strict=True)]
        episodes = meta_fixed.fixed_episodes(policy)
        values[name] = meta_gradient(policy, parameters, _one_process(), episodes, direction, temperature=1.0, micro_batch_count=1).values
    assert values["float32"] == pytest.approx(values["float64"], rel=1e-3, abs=1e-6)
    torch.testing.assert_close(torch.tensor(values["float32"]), torch.tensor(values["float64"]), rtol=1e-3, atol=1e-6)
