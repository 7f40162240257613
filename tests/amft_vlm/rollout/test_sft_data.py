"""Expert datasets as SFT trajectories: ``amft-vlm collect`` -> load equals expert rollouts."""

import dataclasses

import pytest
import torch

from agents.baselines import ExpertAgent, RandomTextAgent
from amft_vlm.cli import main
from amft_vlm.rollout.engine import RolloutEngine
from amft_vlm.rollout.expert_data import collect, load_dialogues
from amft_vlm.rollout.sft_data import load_sft_trajectories, sft_trajectories

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RESOLUTION = 64


@pytest.mark.parametrize(
    ("env_id", "env_kwargs"),
    [
        ("GeneralPoints-v0", {"modality": "vision", "resolution": RESOLUTION}),
        ("VIRL-v0", {"modality": "vision", "resolution": RESOLUTION}),
    ],
)
def test_collected_dataset_loads_as_the_expert_rollouts_of_the_same_seeds(
    tiny_policies, tmp_path, env_id, env_kwargs
):
    policy = tiny_policies["qwen2-vl"]
    first_seed, episodes = 20, 3
    env_args = [argument for key, value in env_kwargs.items() for argument in ("--env-arg", f"{key}={value}")]
    exit_code = main(
        [
            "collect",
            "--env",
            env_id,
            *env_args,
            "--agent",
            "expert",
            "--episodes",
            str(episodes),
            "--seed",
            str(first_seed),
            "--out",
            str(tmp_path / "data"),
        ]
    )
    assert exit_code == 0
    loaded = load_sft_trajectories(tmp_path / "data", policy)

    engine = RolloutEngine(policy, env_id, env_kwargs=env_kwargs, num_envs=2)
    rolled_out, _ = engine.collect(
        range(first_seed, first_seed + episodes), responder=ExpertAgent(), progress=False
    )

    assert len(loaded) == episodes
    assert loaded == rolled_out
    for trajectory in loaded:
        assert trajectory.env_id == env_id and trajectory.source == "expert" and trajectory.success
        assert not trajectory.has_sampling_logprobs
        assert len(trajectory.images) == len(trajectory.segments)  # one image per dialogue, stored once


def one_virl_expert_episode(out_dir):
    """An expert dataset of one V-IRL route in language, played by the oracle expert, under `out_dir`."""
    collect("VIRL-v0", {"modality": "language"}, ExpertAgent(), episodes=1, seed=0, out_dir=out_dir, progress=False)


def test_sft_examples_are_scored_by_teacher_forcing(tiny_policies, tmp_path):
    policy = tiny_policies["qwen2.5-vl"]
    one_virl_expert_episode(tmp_path / "data")
    (trajectory,) = load_sft_trajectories(tmp_path / "data", policy)
    sequences = trajectory.token_sequences(policy)
    targets = [segment.trainable_positions for segment in trajectory.segments]
    with torch.no_grad():
        logprobs = policy.token_logprobs(sequences, targets)
    assert sum(len(scores) for scores in logprobs) == trajectory.num_response_tokens
    assert all(torch.isfinite(scores).all() for scores in logprobs)


def test_failed_episodes_are_skipped_unless_asked_for(tiny_policies, tmp_path):
    policy = tiny_policies["qwen2-vl"]
    collect(
        "GeneralPoints-v0",
        {"modality": "language"},
        RandomTextAgent(seed=0),
        episodes=2,
        seed=0,
        out_dir=tmp_path / "data",
        progress=False,
    )
    assert load_sft_trajectories(tmp_path / "data", policy) == []
    trajectories = load_sft_trajectories(tmp_path / "data", policy, successful_only=False)
    assert [t.success for t in trajectories] == [False, False]
    assert [t.num_turns for t in trajectories] == [6, 6]
    assert [t.source for t in trajectories] == ["random"] * 2


def test_an_episode_with_a_missing_dialogue_is_rejected(tiny_policies, tmp_path):
    policy = tiny_policies["qwen2-vl"]
    one_virl_expert_episode(tmp_path / "data")
    dialogues = load_dialogues(tmp_path / "data")
    assert len(dialogues) > 2
    with pytest.raises(ValueError, match="episode 0 has dialogues"):
        sft_trajectories(dialogues[:1] + dialogues[2:], policy)
    shuffled = sft_trajectories(dialogues[::-1], policy)
    assert shuffled == sft_trajectories(dialogues, policy)
    broken = dataclasses.replace(dialogues[0], rewards=(*dialogues[0].rewards, 1.0))
    with pytest.raises(ValueError, match="one reward per answer"):
        sft_trajectories([broken, *dialogues[1:]], policy)
