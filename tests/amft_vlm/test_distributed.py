"""Two CPU processes train exactly like one process with the same global batch."""

import glob
import json
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from amft_vlm.cli import main

ARGS = ["method=sft", "steps=3", "sft_batch_size=6", "expert_episodes=12", "learning_rate=5e-3", "save_every=3", "device=cpu"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def final_weights(run_dir):
    (path,) = glob.glob(str(run_dir / "checkpoints" / "step-000003" / "policy" / "*.safetensors"))
    return load_file(path)


def test_two_processes_match_one_process(tmp_path):
    assert main(["train", *ARGS, f"output_dir={tmp_path / 'one'}"]) == 0
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = subprocess.run([*launch, "-m", "amft_vlm.cli", "train", *ARGS, f"output_dir={tmp_path / 'two'}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    initial = load_file(glob.glob(str(tmp_path / "one" / "initial-model" / "*.safetensors"))[0])
    assert max((one[k] - initial[k]).abs().max().item() for k in one) > 1e-3  # training moved the weights
    # Each process shares its own rows' prompt prefix, so gradients are summed in another order. The key
    # biases' true gradient is 0 (softmax ignores a shift common to all keys) and AdamW turns that
    # rounding noise into lr-sized steps, so the tolerance is 5e-4: still 20x below the 1e-2 the weights
    # moved, which a missing gradient average or a wrong shard of the batch would show.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=5e-4, msg=name)


def test_amft_runs_on_two_processes_with_uneven_and_empty_shards_and_one_mu(tmp_path):
    """Process 1 gets no rollouts at all (one start state), mini-batches and the expert batch split
    unevenly (some empty) and so do the validation states: every collective still pairs up, and the
    trainer checks at every controller step that both processes hold the same mu."""
    args = [
        "method=amft", "steps=4", "sft_batch_size=5", "expert_episodes=12", "episodes_per_step=1", "group_size=2",
        "num_envs=4", "max_new_tokens=12", "ppo_epochs=2", "mini_batch_size=1", "learning_rate=5e-3", "save_every=4",
        "device=cpu", "controller.warmup_steps=1", "controller.meta_interval=1", "controller.validation_states=3",
        "controller.validation_samples=2", "controller.target_entropy_steps=1", f"output_dir={tmp_path / 'two'}",
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = subprocess.run([*launch, "-m", "amft_vlm.cli", "train", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("meta_signal" in r and r["tokens_rl"] > 0 for r in records[1:])
    assert records[-1]["budget_rollout_episodes"] == 3 * 2 and records[-1]["budget_validation_episodes"] == 3 * 6
    assert records[-1]["budget_updates"] == 4 * 2 * 2
    assert records[-1]["budget_expert_examples"] == 4 * 2 * 5
