"""Expert datasets: what `collect` writes is what `load_dialogues` reads back."""

import hashlib
import json

import numpy as np
import pytest

from agents.baselines import ExpertAgent, RandomTextAgent
from amft_vlm.cli import main, parse_env_args
from amft_vlm.rollout.expert_data import collect, load_dialogues, read_manifest
from tests.amft_vlm.model_free import AGENTS, ORACLE, text_digest

GP_VISION = {"modality": "vision", "resolution": 64}


def test_collect_then_load_round_trips_dialogues_and_images(tmp_path):
    out = tmp_path / "experts"
    stats = collect("GeneralPoints-v0", GP_VISION, ExpertAgent(), episodes=6, seed=3, out_dir=out, progress=False)
    assert (stats.episodes, stats.successes, stats.mean_turns, stats.mean_return) == (6, 6, 1.0, 5.0)
    manifest = read_manifest(out)
    assert manifest["env_kwargs"] == GP_VISION and manifest["seed"] == 3 and manifest["success_rate"] == 1.0
    assert manifest["dialogues"] == 6
    dialogues = load_dialogues(out)
    assert [d.seed for d in dialogues] == [3, 4, 5, 6, 7, 8]
    first = dialogues[0]
    assert [turn.role for turn in first.dialogue.turns] == ["user", "assistant"]
    assert first.rewards == (5.0,) and first.success
    import gymnasium as gym

    env = gym.make("GeneralPoints-v0", **GP_VISION)
    observation, _ = env.reset(seed=3)
    assert first.dialogue.turns[0].text == observation["text"]
    assert np.array_equal(first.dialogue.image, observation["image"])  # PNG is lossless
    assert first.dialogue.turns[1].text == env.unwrapped.expert_response()


@pytest.mark.parametrize("case", ORACLE["collect"], ids=lambda case: case["args"][0])
def test_collect_writes_the_dataset_the_replaced_loop_wrote(tmp_path, case):
    """Records, images and manifest equal those of the per-episode loop (VIRL: several dialogues per episode)."""
    env_id, env_kwargs, agent, seed, episodes = case["args"]
    out = tmp_path / "data"
    stats = collect(env_id, env_kwargs, AGENTS[agent](), episodes=episodes, seed=seed, out_dir=out, progress=False)
    records = [json.loads(line) for line in (out / "dialogues.jsonl").read_text().splitlines()]
    for record in records:
        record["turns"] = [{"role": turn["role"], "text": text_digest(turn["text"])} for turn in record["turns"]]
    assert records == case["records"]
    images = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in sorted((out / "images").iterdir())}
    assert images == case["image_files"]
    assert read_manifest(out) == case["manifest"]
    expected = case["stats"]
    assert (stats.episodes, stats.successes, stats.mean_turns * stats.episodes) == (expected["episodes"], expected["successes"], expected["answers"])
    assert stats.mean_return * stats.episodes == pytest.approx(expected["total_return"])


def test_multi_turn_failures_are_recorded_and_filtered(tmp_path):
    out = tmp_path / "random"
    collect("GeneralPoints-v0", {"modality": "language"}, RandomTextAgent(seed=0), episodes=2, seed=0, out_dir=out, progress=False)
    assert load_dialogues(out) == []
    dialogues = load_dialogues(out, successful_only=False)
    assert len(dialogues) == 2 and len(dialogues[0].rewards) == 6
    roles = [turn.role for turn in dialogues[0].dialogue.turns]
    assert roles == ["user", "assistant"] * 6
    assert dialogues[0].rewards[-1] == -1.0


def test_refuses_to_overwrite_and_reports_bad_files(tmp_path):
    out = tmp_path / "experts"
    collect("GeneralPoints-v0", {"modality": "language"}, ExpertAgent(), episodes=1, seed=0, out_dir=out, progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        collect("GeneralPoints-v0", {"modality": "language"}, ExpertAgent(), episodes=1, seed=0, out_dir=out, progress=False)
    with (out / "dialogues.jsonl").open("a") as records:
        records.write(json.dumps({"episode": 1}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        load_dialogues(out)
    with pytest.raises(FileNotFoundError, match="not an expert dataset"):
        load_dialogues(tmp_path)


def test_collect_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["collect", "--env-arg", "modality=language", "--env-arg", "split=train", "--episodes", "3", "--out", str(out)]) == 0
    assert read_manifest(out)["env_kwargs"] == {"modality": "language", "split": "train"}
    assert parse_env_args(["num_cards=4", "render_mode=None"]) == {"num_cards": 4, "render_mode": None}
    with pytest.raises(SystemExit):
        main(["collect", "--env-arg", "oops", "--out", str(tmp_path / "x")])
    assert "key=value" in capsys.readouterr().err.lower()
