"""Two CPU processes train exactly like one process with the same global batch."""

import glob
import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from amft_vlm.cli import main
from tests.amft_vlm.samples import assert_same_samples

ARGS = ["method=sft", "steps=3", "sft_batch_size=6", "expert_episodes=12", "learning_rate=5e-3", "save_every=3", "device=cpu"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def final_weights(run_dir, step=3):
    (path,) = glob.glob(str(run_dir / "checkpoints" / f"step-{step:06d}" / "policy" / "*.safetensors"))
    return load_file(path)


def test_two_processes_match_one_process(tmp_path):
    assert main(["train", *ARGS, f"output_dir={tmp_path / 'one'}"]) == 0
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = subprocess.run([*launch, "-m", "amft_vlm.cli", "train", *ARGS, f"output_dir={tmp_path / 'two'}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    initial = load_file(glob.glob(str(tmp_path / "one" / "initial-model" / "*.safetensors"))[0])
    assert max((one[k] - initial[k]).abs().max().item() for k in one) > 1e-3  # training moved the weights
    # Two processes run without the shared-prefix shortcut and sum their gradients, so sums run in another
    # order. The key biases' true gradient is 0 (softmax ignores a shift common to all keys) and AdamW turns
    # that rounding noise into lr-sized steps, so the tolerance is 5e-4: still 20x below the 1e-2 the weights
    # moved, which a wrong shard of the batch would show. (A sum against an average is caught by the AMFT
    # tests below: AdamW and clipping make SFT alone insensitive to the gradient's scale.)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=5e-4, msg=name)


AMFT = [
    "method=amft", "env_id=tests.amft_vlm.bandit:VowelBandit-v0", "env_kwargs={}", "validation_env_kwargs={}", "steps=4",
    "sft_batch_size=4", "episodes_per_step=2", "group_size=2", "num_envs=4", "max_new_tokens=8", "ppo_epochs=2",
    "mini_batch_size=2", "learning_rate=5e-3", "save_every=2", "device=cpu", "controller.warmup_steps=1",
    "controller.meta_interval=1", "controller.validation_states=4", "controller.validation_samples=2",
    "controller.target_entropy_steps=1", "controller.meta_signal=raw", "controller.eta_mu=10.0", "dtype=float64",
]
"""AMFT on the vowel bandit (continuous rewards, so advantages and the meta-gradient are not zero): warm-up,
controller steps with meta-gradients, 2 epochs x 2 mini-batches per step. The raw meta signal is used because
the standardized one takes its standard error over rounds of one start state per process (see
`amft_vlm.learning.meta.meta_gradient`), which differs with the process count by design; dU/dmu itself does not.

In float64: one process and two then differ by ~1e-9 (the order of sums), far too little to move a sampled
token. In float32 they differ by ~1e-6, and a validation token whose uniform draw falls that close to a
boundary between two tokens flips; with few validation states that one episode can turn the meta signal's
sign (seen on an AMD EPYC with MKL: dU/dmu -0.008 on one process, +0.070 on two). Each comparison below first
checks that the runs sampled the same tokens (`rollout_digest`, `validation_digest`), so a divergence is
reported as what it is."""


def torchrun(*args, processes=2):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = subprocess.run([*launch, "-m", "tests.amft_vlm.train_until", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def amft_runs(tmp_path_factory):
    """The same AMFT run on one process, on two with fsdp2 and with ddp, and a two-process fsdp2 run stopped
    after step 2 and resumed (on two processes, and on one)."""
    from amft_vlm.rollout.expert_data import collect
    from tests.amft_vlm import bandit

    root = tmp_path_factory.mktemp("amft-runs")
    collect(bandit.ENV_ID, {"target": "vowels"}, bandit.ConstantAgent("aeiou eioua"), episodes=8, seed=0, out_dir=root / "expert", progress=False)
    args = [*AMFT, f"expert_data={root / 'expert'}"]
    torchrun(*args, f"output_dir={root / 'one'}", processes=1)
    torchrun(*args, "distributed=fsdp2", f"output_dir={root / 'fsdp2'}")
    torchrun(*args, "distributed=ddp", f"output_dir={root / 'ddp'}")
    torchrun(*args, "distributed=fsdp2", f"output_dir={root / 'resumed'}", "--stop-after=2")
    for name in ("resumed-on-one", "resumed"):  # the step-2 checkpoint, then a resume on 1 or 2 processes
        if name != "resumed":
            shutil.copytree(root / "resumed", root / name)
        torchrun(*args, "distributed=fsdp2" if name == "resumed" else "distributed=none", f"output_dir={root / name}", "--resume", processes=2 if name == "resumed" else 1)
    return root


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_processes_train_amft_like_one_process(amft_runs, strategy):
    """Rollouts match (each episode samples from its own generator), so every metric and parameter matches up
    to the order of sums, ~1e-9 in float64 (float32 would need 5e-4 on the weights: AdamW turns rounding in
    near-zero gradients into lr-sized steps), against 4e-2 moved."""
    one, two = metrics(amft_runs / "one"), metrics(amft_runs / strategy)
    assert_same_samples(two, one)
    assert any(r.get("validation_digest") for r in two) and any(r.get("rollout_digest") for r in two)
    for key in ("mu", "next_mu", "reward", "loss_sft", "loss_rl", "entropy", "meta_signal", "meta_dU_dmu", "budget_updates", "budget_env_episodes"):
        values, expected = [r.get(key) for r in two], [r.get(key) for r in one]
        assert [v is None for v in values] == [e is None for e in expected], key
        assert [v for v in values if v is not None] == pytest.approx([e for e in expected if e is not None], rel=1e-6, abs=1e-9), key
    assert two[1]["meta_signal"] is not None and two[1]["meta_signal"] != 0.0
    assert len({round(r["next_mu"], 6) for r in one}) > 2  # mu moved, so a wrong signal would show
    reference, sharded = final_weights(amft_runs / "one", 4), final_weights(amft_runs / strategy, 4)
    initial = load_file(glob.glob(str(amft_runs / "one" / "initial-model" / "*.safetensors"))[0])
    assert max((reference[k] - initial[k]).abs().max().item() for k in reference) > 1e-2
    for name in reference:
        torch.testing.assert_close(sharded[name], reference[name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("resumed", ["resumed", "resumed-on-one"])
def test_a_sharded_run_resumes_like_a_straight_run_on_any_process_count(amft_runs, resumed):
    assert (amft_runs / resumed / "checkpoints" / "step-000002" / "optimizer").is_dir()
    assert_same_samples(metrics(amft_runs / resumed), metrics(amft_runs / "fsdp2"))
    straight, after = final_weights(amft_runs / "fsdp2", 4), final_weights(amft_runs / resumed, 4)
    for name in straight:
        torch.testing.assert_close(after[name], straight[name], rtol=0, atol=1e-7, msg=name)
    assert [r["step"] for r in metrics(amft_runs / resumed)] == [1, 2, 3, 4]
    assert [r["mu"] for r in metrics(amft_runs / resumed)] == pytest.approx([r["mu"] for r in metrics(amft_runs / "fsdp2")], rel=1e-6)


def test_batches_that_do_not_split_evenly_over_the_processes_are_refused():
    from types import SimpleNamespace

    from amft_vlm.learning.distributed import Parallel

    accelerator = SimpleNamespace(num_processes=2, process_index=0, distributed_type="MULTI_CPU")
    parallel = Parallel("auto", accelerator)
    assert parallel.strategy == "ddp"
    with pytest.raises(ValueError, match=r"episodes_per_step \(3\) must be a multiple of the process count \(2\)"):
        parallel.check_even(sft_batch_size=4, episodes_per_step=3)
    with pytest.raises(ValueError, match="distributed: none runs one process"):
        Parallel("none", accelerator)
    assert Parallel("auto", SimpleNamespace(num_processes=2, process_index=0, distributed_type="FSDP")).strategy == "fsdp2"


def test_too_few_validation_rounds_for_the_standardized_meta_signal_are_refused():
    from types import SimpleNamespace

    from amft_vlm.learning.distributed import Parallel, check_training_layout
    from amft_vlm.learning.resolve import resolve_method
    from amft_vlm.run.config import load_config

    parallel = Parallel("auto", SimpleNamespace(num_processes=8, process_index=0, distributed_type="MULTI_GPU"))

    def layout(overrides):
        config = load_config(overrides=overrides)
        check_training_layout(config, resolve_method(config).controller, parallel)

    with pytest.raises(ValueError, match="gives 1 round.*set validation_states to 24"):
        layout(["sft_batch_size=8", "controller.validation_states=8"])
    layout(["sft_batch_size=8", "controller.validation_states=24"])
    raw = load_config(overrides=["sft_batch_size=8", "controller.validation_states=8", "controller.meta_signal=raw"])
    check_training_layout(raw, resolve_method(raw).controller, parallel)
    # Without the meta-gradient there are no rounds to count; the batches must still split evenly.
    layout(["sft_batch_size=8", "controller.validation_states=8", "method=no-meta-gradient"])
    with pytest.raises(ValueError, match="sft_batch_size"):
        layout(["sft_batch_size=12", "controller.validation_states=24"])
