"""The ``amft-vlm train`` command: ``--resume`` without ``--config`` continues from the run's own config.yaml."""

import json

import pytest
import yaml

from amft_vlm.cli import main, train_config_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SFT = {
    "method": "sft", "sft_batch_size": 4, "expert_episodes": 12, "max_new_tokens": 16, "num_envs": 4,
    "learning_rate": 2e-3, "save_every": 2, "device": "cpu",
}  # fmt: skip
"""A config file far from the defaults (method, batch, learning rate...): resuming on the defaults would be refused."""


def test_resume_without_config_starts_from_the_runs_config_yaml(tmp_path, tiny_checkpoints):
    config_file = tmp_path / "sft.yaml"
    config_file.write_text(yaml.safe_dump({**SFT, "model": str(tiny_checkpoints["qwen2-vl"])}))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config_file), f"output_dir={run}", "steps=2"]) == 0
    assert main(["train", "--resume", f"output_dir={run}", "steps=2"]) == 0  # nothing left to do
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "sft"


def test_the_train_config_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert train_config_file("mine.yaml", [f"output_dir={run}"], resume=True) == "mine.yaml"
    assert train_config_file(None, [f"output_dir={run}"], resume=True) is None  # no config.yaml: the defaults
    (run / "config.yaml").write_text("method: sft\n")
    assert train_config_file(None, [f"output_dir={run}"], resume=True) == run / "config.yaml"
    assert train_config_file(None, [f"output_dir={run}"], resume=False) is None
