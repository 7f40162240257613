"""Faults never cost more than one checkpoint: a kill while the tiny model is built, a damaged checkpoint,
settings a resumed run may not change, a full disk while checkpointing; on one process and on two."""

import errno
import filecmp
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

import amft_vlm.learning.checkpoint as checkpoint_module
from agents.tiny import resolve_model_spec, tiny_model_problem
from amft_vlm.learning.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    check_checkpoint,
    latest_checkpoint_name,
)
from amft_vlm.learning.resume import ResumeSettingsError, check_resume_settings
from amft_vlm.learning.trainer import Trainer
from amft_vlm.run.config import config_to_dict, load_config
from tests.amft_vlm.learning.test_distributed import free_port

SFT = [
    "method=sft", "steps=4", "sft_batch_size=4", "expert_episodes=12", "max_new_tokens=16", "num_envs=4",
    "learning_rate=2e-3", "save_every=2", "device=cpu",
]  # fmt: skip


def trainer(output_dir, *overrides, resume=False):
    return Trainer(load_config(overrides=[*SFT, f"output_dir={output_dir}", *overrides]), resume=resume, progress=False)


def weights(run_dir, step=4):
    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "policy" / "model.safetensors")


def metric_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cut_short(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step SFT run with checkpoints after steps 2 and 4; tests change copies of it only."""
    path = tmp_path_factory.mktemp("finished") / "run"
    trainer(path).train()
    return path


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


# ------------------------------------------------------------------------------------------------
# 1. A kill while the tiny model is built.


def _empty_config(path: Path, tiny: Path) -> None:
    path.mkdir()
    (path / "config.json").touch()


def _weights_cut_short(path: Path, tiny: Path) -> None:
    shutil.copytree(tiny, path)
    cut_short(path / "model.safetensors")


def _config_only(path: Path, tiny: Path) -> None:
    path.mkdir()
    shutil.copy(tiny / "config.json", path)


def _leftover_build(path: Path, tiny: Path) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.mkdir()
    (staging / "config.json").touch()


@pytest.mark.parametrize(
    ("partial", "warning"),
    [
        (_empty_config, "config.json is empty"),
        (_weights_cut_short, "model.safetensors is damaged"),
        (_config_only, "generation_config.json is missing"),
        (_leftover_build, None),
    ],
    ids=["empty config.json", "weights cut short", "killed after config.json", "leftover build directory"],
)
def test_a_tiny_model_build_stopped_part_way_is_built_again(tmp_path, tiny_checkpoints, caplog, partial, warning):
    path, tiny = tmp_path / "initial-model", tiny_checkpoints["qwen2-vl"]
    partial(path, tiny)
    caplog.set_level(logging.INFO, logger="agents.tiny")
    assert resolve_model_spec("tiny:qwen2-vl", path, seed=0) == str(path)
    assert tiny_model_problem(path) is None
    assert filecmp.cmp(path / "model.safetensors", tiny / "model.safetensors", shallow=False)  # seed 0, as built whole
    assert sorted(item.name for item in tmp_path.iterdir()) == ["initial-model"]  # no temporary directory left
    if warning is not None:
        assert any(warning in record.getMessage() and record.levelno == logging.WARNING for record in caplog.records)


def test_a_complete_tiny_model_is_kept_and_a_directory_with_other_files_is_left_alone(tmp_path, tiny_checkpoints):
    path = shutil.copytree(tiny_checkpoints["qwen2-vl"], tmp_path / "initial-model")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    resolve_model_spec("tiny:qwen2-vl", path, seed=0)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    (path / "config.json").write_text("")
    (path / "notes").mkdir()
    with pytest.raises(ValueError, match=r"incomplete model \(config.json is empty\) and also holds notes"):
        resolve_model_spec("tiny:qwen2-vl", path, seed=0)
    assert (path / "notes").is_dir()


def test_training_goes_on_after_a_kill_left_an_empty_initial_model_config(tmp_path):
    (tmp_path / "run" / "initial-model").mkdir(parents=True)
    (tmp_path / "run" / "initial-model" / "config.json").touch()
    history = trainer(tmp_path / "run", "steps=1").train()
    assert [m["step"] for m in history] == [1]


# ------------------------------------------------------------------------------------------------
# 2. A damaged latest checkpoint.


def _set_step(step):
    def damage(file: Path) -> None:
        state = json.loads(file.read_text())
        file.write_text(json.dumps(state | {"step": step}))

    return damage


DAMAGES = {
    "optimizer shard cut short": ("optimizer/__0_0.distcp", cut_short, "is cut short ("),
    "optimizer metadata cut short": ("optimizer/.metadata", cut_short, "is cut short or damaged"),
    "rng.json cut short": ("rng.json", cut_short, "is not valid JSON"),
    "weights cut short": ("policy/model.safetensors", cut_short, "is cut short or damaged"),
    "garbage config.json": ("policy/config.json", lambda file: file.write_text("{garbage"), "is not valid JSON"),
    "empty trainer_state.json": ("trainer_state.json", lambda file: file.write_text(""), "is empty"),
    "negative step": ("trainer_state.json", _set_step(-5), "step must be a non-negative integer; got -5"),
    "step beyond the run": ("trainer_state.json", _set_step(999), "says step 999, but its directory is step-000004"),
    "scheduler.pt missing": ("scheduler.pt", Path.unlink, "is missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_with_a_warning(finished_run, run_copy, caplog, kind):
    name, damage, why = DAMAGES[kind]
    damaged = run_copy / "checkpoints" / "step-000004" / name
    damage(damaged)
    caplog.set_level(logging.WARNING, logger="amft_vlm.learning.checkpoint")
    resumed = trainer(run_copy, resume=True)
    assert resumed.start_step == 2
    (warning, *_) = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert str(damaged) in warning and why in warning, warning
    resumed.train()
    assert metric_steps(run_copy) == [1, 2, 3, 4]
    check_checkpoint(run_copy / "checkpoints" / "step-000004")  # written again, whole
    expected, after = weights(finished_run), weights(run_copy)
    for key in expected:  # resuming from step 2 is the straight run
        torch.testing.assert_close(after[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_a_damaged_lora_checkpoint_falls_back_too(tmp_path):
    run = tmp_path / "lora"
    trainer(run, "lora_rank=4").train()
    cut_short(run / "checkpoints" / "step-000004" / "optimizer.pt")
    assert trainer(run, "lora_rank=4", resume=True).start_step == 2
    cut_short(run / "checkpoints" / "step-000002" / "lora" / "adapter.safetensors")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*optimizer.pt is cut short.*adapter.safetensors is cut short"):
        trainer(run, "lora_rank=4", resume=True)


def test_with_no_usable_checkpoint_the_run_stops_naming_each_damaged_file(run_copy):
    cut_short(run_copy / "checkpoints" / "step-000004" / "rng.json")
    (run_copy / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError) as raised:
        trainer(run_copy, resume=True)
    message = str(raised.value)
    assert message.startswith(f"no usable checkpoint under {run_copy / 'checkpoints'}")
    assert "step-000004/rng.json is not valid JSON" in message and "step-000002/trainer_state.json is not valid JSON" in message
    assert "\n" not in message


def test_an_unreadable_pointer_falls_back_to_the_newest_usable_directory(run_copy, caplog):
    (run_copy / "checkpoints" / "latest").write_text("step-00")
    caplog.set_level(logging.WARNING, logger="amft_vlm.learning.checkpoint")
    assert trainer(run_copy, resume=True).start_step == 4
    assert any("does not name a checkpoint" in record.getMessage() for record in caplog.records)


def test_a_checkpoint_newer_than_the_pointer_is_not_taken(run_copy):
    (run_copy / "checkpoints" / "latest").write_text("step-000002\n")  # step 4 renamed into place, the pointer not yet moved
    assert trainer(run_copy, resume=True).start_step == 2


def test_a_damaged_warm_start_checkpoint_is_named(run_copy, tmp_path):
    step = run_copy / "checkpoints" / "step-000002"
    cut_short(step / "policy" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"warm_start: .*step-000002/policy/model.safetensors is cut short"):
        trainer(tmp_path / "warm", "method=amft", "controller.warmup_steps=2", f"warm_start={step}")


# ------------------------------------------------------------------------------------------------
# 3. Settings a resumed run may change, and those it may not.


def _saved_steps(run_dir):
    return yaml.safe_load((run_dir / "config.yaml").read_text())["steps"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["steps=2"], r"steps=2 is below the 4 iterations this run has done; resume with steps >= 4"),
        (["learning_rate=0.5"], r"--resume cannot change .*\(learning_rate: 0.002 -> 0.5; the run's settings are in "),
        (
            ["seed=3", "sft_batch_size=2", "controller.eta_mu=0.5"],
            r"sft_batch_size: 4 -> 2, controller.eta_mu: 0.01 -> 0.5, seed: 0 -> 3; ",
        ),
        (["steps=6"], r"steps 4 -> 6 would change the learning rate of iteration 2 \(0.8536 -> 0.933 x learning_rate; lr_schedule: cosine"),
    ],
    ids=["fewer steps", "learning rate", "several", "cosine extended"],
)
def test_a_resume_that_would_change_what_was_trained_is_refused_before_the_model_loads(run_copy, monkeypatch, overrides, message):
    monkeypatch.setattr("amft_vlm.learning.trainer.load_training_policy", lambda *args, **kwargs: pytest.fail("the model loaded"))
    with pytest.raises(ResumeSettingsError, match=message):
        trainer(run_copy, *overrides, resume=True)
    assert _saved_steps(run_copy) == 4 and "learning_rate: 0.002" in (run_copy / "config.yaml").read_text()


def test_settings_a_resume_may_change_are_applied(run_copy):
    resumed = trainer(run_copy, "save_every=1", "num_envs=2", resume=True)
    assert resumed.start_step == 4 and resumed.train() == []
    saved = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert (saved["save_every"], saved["num_envs"], saved["output_dir"]) == (1, 2, str(run_copy))


def test_more_steps_extend_a_constant_schedule_run_like_a_straight_run(tmp_path):
    straight = tmp_path / "straight"
    trainer(straight, "lr_schedule=constant").train()
    trainer(tmp_path / "extended", "lr_schedule=constant", "steps=2").train()
    extended = trainer(tmp_path / "extended", "lr_schedule=constant", resume=True)
    assert extended.start_step == 2
    assert [m["step"] for m in extended.train()] == [3, 4]
    assert _saved_steps(tmp_path / "extended") == 4 and metric_steps(tmp_path / "extended") == [1, 2, 3, 4]
    expected, after = weights(straight), weights(tmp_path / "extended")
    for key in expected:
        torch.testing.assert_close(after[key], expected[key], rtol=0, atol=1e-6, msg=key)


def _saved_run(tmp_path, *overrides):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(load_config(overrides=list(overrides))), sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("settings", "done", "refused"),
    [
        (["method=scheduled-mix", "lr_schedule=constant", "schedule_steps=null"], 2, r"would change mu of iteration 2 \(0.7755 -> 0.8431; scheduled-mix's"),
        (["method=scheduled-mix", "lr_schedule=constant"], 2, None),  # CHORD-mu's 200-step decay does not depend on steps
        (["method=scheduled-mix", "lr_schedule=constant", "schedule_steps=4"], 2, None),
        (["method=sft-then-rl", "lr_schedule=constant"], 2, None),  # still in the SFT half of both lengths
        (["method=sft-then-rl", "lr_schedule=constant"], 3, r"would change mu of iteration 3 \(0 -> 1;"),
        (["method=sft", "lr_warmup_steps=3"], 3, None),  # cosine, still in its warm-up (its end is 1 for any length)
        (["method=sft", "lr_warmup_steps=3"], 4, r"would change the learning rate of iteration 5 \(0 -> 0.75 x"),
        (["method=amft", "lr_schedule=constant", "controller.warmup_steps=2"], 3, None),
    ],
)
def test_more_steps_are_refused_only_when_the_iterations_done_would_have_run_otherwise(tmp_path, settings, done, refused):
    saved = _saved_run(tmp_path, *settings, "steps=4")
    extended = load_config(overrides=[*settings, "steps=6"])
    if refused is None:
        check_resume_settings(extended, saved, done)
    else:
        with pytest.raises(ResumeSettingsError, match=refused):
            check_resume_settings(extended, saved, done)


def test_an_unreadable_run_config_skips_the_comparison_with_a_warning(tmp_path, caplog):
    saved = tmp_path / "config.yaml"
    saved.write_text("")  # an older version's write, cut short
    caplog.set_level(logging.WARNING, logger="amft_vlm.learning.checkpoint")
    check_resume_settings(load_config(overrides=["learning_rate=0.5"]), saved, 2)
    assert any("are not compared" in record.getMessage() for record in caplog.records)
    with pytest.raises(ResumeSettingsError, match="steps=1 is below"):
        check_resume_settings(load_config(overrides=["method=sft", "steps=1"]), saved, 2)


# ------------------------------------------------------------------------------------------------
# 4. A full disk while checkpointing.


@pytest.mark.parametrize(
    ("target", "error", "reason"),
    [
        ("save_policy", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "the disk is full"),
        ("torch.save", OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
        ("torch.save", OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is exceeded"),
        ("torch.save", PermissionError(errno.EACCES, "Permission denied"), "PermissionError: [Errno 13] Permission denied"),
    ],
    ids=["safetensors", "torch.save", "quota", "permission"],
)
def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one_and_says_why(tmp_path, monkeypatch, target, error, reason):
    run = tmp_path / "run"
    if target == "torch.save":
        monkeypatch.setattr(checkpoint_module, "torch", _TorchSaveFailing(error))
    else:
        _fail_at_step_4(monkeypatch, target, error)
    training = trainer(run)
    with pytest.raises(CheckpointWriteError) as raised:
        training.train()
    message = str(raised.value)
    assert message.startswith(f"could not write checkpoint step-000004 under {run / 'checkpoints'}: {reason}"), message
    assert "the previous checkpoint, step-000002, is intact" in message and "\n" not in message
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["latest", "step-000002"]
    assert latest_checkpoint_name(run / "checkpoints") == "step-000002"
    check_checkpoint(run / "checkpoints" / "step-000002")
    monkeypatch.undo()
    resumed = trainer(run, resume=True)
    assert resumed.start_step == 2 and [m["step"] for m in resumed.train()] == [3, 4]


def _fail_at_step_4(monkeypatch, target, error):
    """Make `target` (a function of amft_vlm.learning.checkpoint) raise `error` while step 4 is written."""
    original = getattr(checkpoint_module, target)

    def failing(*args, **kwargs):
        if any(".tmp-step-000004" in str(arg) for arg in [*args, *kwargs.values()]):
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, target, failing)


class _TorchSaveFailing:
    """`torch` as amft_vlm.learning.checkpoint sees it, with a save that raises `error` (the module object is shared, so
    only checkpoint.py's name is replaced)."""

    def __init__(self, error):
        self._error = error

    def __getattr__(self, name):
        return getattr(torch, name)

    def save(self, state, path, *args, **kwargs):
        if ".tmp-step-000004" in str(path):
            raise self._error
        return torch.save(state, path, *args, **kwargs)


def test_a_failure_that_reports_no_errno_on_a_full_disk_is_named_from_the_space_left(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint_module, "torch", _TorchSaveFailing(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")))
    monkeypatch.setattr(checkpoint_module, "_free_bytes", lambda where: 12_000)
    training = trainer(run)
    with pytest.raises(CheckpointWriteError, match=r"the disk is full, 0.0 MiB free \(RuntimeError: \[enforce fail"):
        training.train()


def test_a_pointer_that_cannot_be_moved_leaves_the_previous_checkpoint_named(tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = checkpoint_module.write_text_atomic

    def failing(path, text):
        if text.startswith("step-000004"):  # the temporary file is written, then the disk fills before the rename
            with mock.patch.object(checkpoint_module.os, "replace", side_effect=OSError(errno.ENOSPC, "No space left on device")):
                return original(path, text)
        return original(path, text)

    monkeypatch.setattr(checkpoint_module, "write_text_atomic", failing)
    with pytest.raises(CheckpointWriteError, match="the disk is full"):
        trainer(run).train()
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["latest", "step-000002"]
    assert latest_checkpoint_name(run / "checkpoints") == "step-000002"


# ------------------------------------------------------------------------------------------------
# Two processes: the main process decides which checkpoint every process loads; a write that fails on
# one process fails on all, with the same message and nothing left behind.

FSDP = ["method=sft", "steps=4", "sft_batch_size=4", "expert_episodes=12", "learning_rate=5e-3", "save_every=2", "device=cpu", "distributed=fsdp2"]

FAILING_SHARD_WRITE = textwrap.dedent(
    """
    import errno, sys
    import torch.distributed as dist
    import torch.distributed.checkpoint.filesystem as filesystem
    from amft_vlm.learning.checkpoint import CheckpointWriteError
    from tests.amft_vlm.train_until import main

    original = filesystem._write_item

    def failing(*args, **kwargs):  # rank 1's optimiser shard of step 4 meets a full disk
        if dist.get_rank() == 1 and any(".tmp-step-000004" in str(getattr(arg, "name", "")) for arg in args):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    filesystem._write_item = failing
    try:
        main(sys.argv[1:])
    except CheckpointWriteError as error:
        print(f"rank {dist.get_rank()} stopped: {error}", flush=True)
        sys.exit(3)
    """
)


def torchrun(*args, cwd):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    environment = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([*launch, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=environment)


def test_two_processes_resume_from_the_same_checkpoint_and_fail_a_write_together(tmp_path):
    repo = Path(__file__).resolve().parents[3]
    straight = tmp_path / "straight"
    result = torchrun("-m", "tests.amft_vlm.train_until", *FSDP, f"output_dir={straight}", cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]

    damaged = shutil.copytree(straight, tmp_path / "damaged")
    cut_short(damaged / "checkpoints" / "step-000004" / "optimizer" / "__1_0.distcp")  # rank 1's shard
    result = torchrun("-m", "tests.amft_vlm.train_until", *FSDP, f"output_dir={damaged}", "--resume", cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "cannot be used" in line]
    assert len(warnings) == 1 and "__1_0.distcp is cut short" in warnings[0], warnings  # decided once, by the main process
    assert metric_steps(damaged) == [1, 2, 3, 4]
    expected, after = weights(straight), weights(damaged)
    for key in expected:
        torch.testing.assert_close(after[key], expected[key], rtol=0, atol=5e-4, msg=key)

    script = tmp_path / "failing_shard_write.py"
    script.write_text(FAILING_SHARD_WRITE)
    full = tmp_path / "full"
    result = torchrun(str(script), *FSDP, f"output_dir={full}", cwd=repo)
    stopped = sorted(line for line in result.stdout.splitlines() if " stopped: could not write checkpoint step-000004" in line)
    assert len(stopped) == 2, result.stdout[-3000:] + result.stderr[-3000:]  # both processes, the same message
    assert stopped[0].startswith("rank 0") and stopped[1].startswith("rank 1") and stopped[0][6:] == stopped[1][6:]
    assert "the disk is full" in stopped[0] and "step-000002, is intact" in stopped[0]
    assert sorted(path.name for path in (full / "checkpoints").iterdir()) == ["latest", "step-000002"]
