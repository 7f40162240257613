"""The ``amft-vlm train`` command: ``--resume`` without ``--config`` continues from the run's own config.yaml; the
run's log goes to its ``train.log``, the console keeps the progress bar and warnings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amft_vlm.cli import main, train_config_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]

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


def _train(run, *options, model):
    """``amft-vlm train`` of two tiny RL steps (rollouts every step) in a subprocess, as a user runs it."""
    command = [
        sys.executable, "-m", "amft_vlm.cli", "train", "--config", "configs/tiny-gp-l.yaml", *options, f"model={model}", "method=rl",
        "steps=2", "episodes_per_step=2", "group_size=2", "max_new_tokens=8", "num_envs=4", "save_every=2", f"output_dir={run}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_training_logs_go_to_the_run_log_and_the_console_keeps_the_progress_bar(tmp_path, tiny_checkpoints):
    run = tmp_path / "run"
    result = _train(run, model=tiny_checkpoints["qwen2-vl"])
    console = result.stderr.replace("\r", "\n").splitlines()
    assert [line for line in console if line.startswith("INFO ")] == []
    assert "reward=" in result.stderr and "mu=" in result.stderr and "loss=" in result.stderr  # the bar's postfix
    log = (run / "train.log").read_text()
    assert log.count("INFO amft_vlm.rollout.engine: rollout GeneralPoints-v0 (policy)") == 2  # one line per step
    assert "INFO agents.policy.policy: loaded" in log  # set-up lines, logged before the directory was claimed
    assert f"log in {run / 'train.log'}" in result.stdout

    again = _train(run, "--overwrite", model=tiny_checkpoints["qwen2-vl"])
    assert "WARNING amft_vlm.run.run_directory: overwrite: deleted the run" in again.stderr  # warnings stay on the console
    log = (run / "train.log").read_text()
    assert log.count("INFO amft_vlm.rollout.engine: rollout") == 2  # the old run's log went with it
    assert "WARNING amft_vlm.run.run_directory: overwrite: deleted the run" in log


def test_train_help_lists_every_setting_and_every_method(capsys):
    from amft_vlm.learning.methods import METHODS
    from tests.amft_vlm.test_settings_docs import config_keys

    with pytest.raises(SystemExit) as stopped:
        main(["train", "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    lines = [line.strip() for line in text.splitlines()]
    for key in config_keys():
        assert any(line.startswith(f"{key} (") for line in lines), f"train --help does not list {key}"
    for name, method in METHODS.items():
        assert any(line.split()[:1] == [name] and method.description.split()[0] in line for line in lines), f"train --help does not list {name}"
    assert "luffy.shaping_gamma (float, 0.1): gamma of the policy shaping" in text
