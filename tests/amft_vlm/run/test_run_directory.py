"""One writer per output directory (`amft_vlm.run.run_directory`): a second ``train``, ``compare``, ``demo`` or
``collect`` into a directory another process writes is refused naming that process, a lock left by a dead process
never blocks, and a new run is not written over a finished one unless ``--resume`` or ``--overwrite`` says so."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

from agents.baselines import ExpertAgent
from amft_vlm.cli import main
from amft_vlm.compare import load_compare_config, run_compare
from amft_vlm.demo import load_demo_config, run_demo
from amft_vlm.learning.trainer import Trainer
from amft_vlm.rollout.expert_data import collect, read_manifest
from amft_vlm.run.config import load_config
from amft_vlm.run.run_directory import LOCK_FILE, DirectoryInUse, DirectoryLock, read_holder
from tests.amft_vlm.learning.test_distributed import free_port

REPO = Path(__file__).resolve().parents[3]
SFT = [
    "method=sft", "sft_batch_size=4", "expert_episodes=12", "max_new_tokens=16", "num_envs=4", "learning_rate=2e-3",
    "device=cpu",
]  # fmt: skip
HOLD = textwrap.dedent(
    """
    import sys
    from amft_vlm.run.run_directory import DirectoryLock
    lock = DirectoryLock(sys.argv[1], what="--out")
    print("held", flush=True)
    sys.stdin.read()
    """
)
"""A process that locks the directory argv[1] until its stdin closes."""


@contextmanager
def held_elsewhere(directory: Path):
    """`directory` locked by another process while the block runs; yields that process."""
    directory.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), "hold-marker"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").iterdir())


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_never_blocks(tmp_path):
    with held_elsewhere(tmp_path) as holder:
        with pytest.raises(DirectoryInUse) as refused:
            DirectoryLock(tmp_path, what="--out")
        message = str(refused.value)
        assert message.startswith(f"--out: {tmp_path} is being written by pid {holder.pid} on {socket.gethostname()} (`")
        assert "hold-marker" in message and "since 20" in message and "choose another --out" in message
        holder.send_signal(signal.SIGKILL)  # no chance to clean up: its record stays in the lock file
        holder.wait()
        assert read_holder(tmp_path).pid == holder.pid
        with DirectoryLock(tmp_path, what="--out"):
            assert read_holder(tmp_path).pid == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: nobody is named


def test_a_lock_file_left_by_a_dead_process_does_not_block(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "command": "amft-vlm train", "started": "then"}))
    with DirectoryLock(tmp_path, what="output_dir"):
        assert read_holder(tmp_path).pid == os.getpid()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_lock_file_that_is_a_link_or_a_fifo_is_refused_and_left_alone(tmp_path, kind):
    """The lock is opened without following links or blocking: a planted link or FIFO is refused, not written into."""
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    if kind == "symlink":
        (tmp_path / LOCK_FILE).symlink_to(target)
    else:
        os.mkfifo(tmp_path / LOCK_FILE)
    with pytest.raises(OSError), DirectoryLock(tmp_path, what="output_dir"):
        pass
    assert target.read_text() == "keep me"
    assert (tmp_path / LOCK_FILE).is_symlink() if kind == "symlink" else (tmp_path / LOCK_FILE).is_fifo()


def test_claims_in_one_process_share_the_lock_and_keep_others_out_until_the_last_is_released(tmp_path):
    first = DirectoryLock(tmp_path, what="output_dir")
    second = DirectoryLock(tmp_path, what="output_dir")  # e.g. a trainer built again in a notebook
    first.release()
    first.release()  # idempotent
    refused = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, input="", capture_output=True, text=True)
    assert refused.returncode != 0 and "is being written by pid" in refused.stderr
    second.release()
    assert subprocess.run([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, input="", capture_output=True, text=True).stdout == "held\n"


def _train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "amft_vlm.cli", "train", *SFT, "model=tiny:qwen2-vl", "save_every=4", f"output_dir={run_dir}", *overrides]


def test_two_trains_started_together_on_a_new_directory_leave_one_whole_run(tmp_path):
    """Before: one died with a SafetensorError (both built the tiny model in it), or both ran and interleaved their
    metrics.jsonl lines. Now one trains and the other is refused before it writes anything."""
    run_dir = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(_train_command(run_dir, "steps=8"), cwd=REPO, env=environment, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) for _ in range(2)]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    assert sorted(status for status, _ in results) == [0, 2], results
    refusal = next(stderr for status, stderr in results if status == 2).strip().splitlines()[-1]
    # Refused as a second writer, or, when the first had already finished, as a new run over a finished one.
    assert "is being written by pid" in refusal or "already holds a run" in refusal, refusal
    assert metric_steps(run_dir) == list(range(1, 9))
    assert checkpoints(run_dir) == ["latest", "step-000004", "step-000008"]


def test_a_second_train_into_a_run_in_progress_is_refused_naming_it(tmp_path):
    """Before: both exited 0 and metrics.jsonl came out interleaved (20 lines for 16 steps)."""
    run_dir = tmp_path / "run"
    trainer = Trainer(load_config(overrides=[*SFT, "steps=4", "save_every=2", f"output_dir={run_dir}"]), progress=False)
    second = subprocess.run(_train_command(run_dir, "steps=4"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert f"output_dir: {run_dir} is being written by pid {os.getpid()} on {socket.gethostname()}" in second.stderr
    trainer.train()
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    after = subprocess.run([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, input="", capture_output=True, text=True)
    assert after.stdout == "held\n"  # the finished trainer released it


def test_a_new_run_over_a_finished_one_is_refused_unless_resumed_or_overwritten(tmp_path, monkeypatch, capsys):
    """Before: train without --resume into a finished run cut its metrics.jsonl to the new run's lines and left the old
    checkpoints beside the new one."""
    run_dir = tmp_path / "run"
    Trainer(load_config(overrides=[*SFT, "steps=4", "save_every=2", f"output_dir={run_dir}"]), progress=False).train()
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "record.json").write_text("{}")
    (run_dir / "notes.txt").write_text("mine")
    before = (run_dir / "metrics.jsonl").read_text()

    monkeypatch.setattr("amft_vlm.learning.trainer.load_training_policy", lambda *args, **kwargs: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as refused:
        main(["train", *SFT, "steps=2", f"output_dir={run_dir}"])
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert f"output_dir: {run_dir} already holds a run (metrics.jsonl with 4 lines, 2 checkpoint(s), the newest step-000004)" in message
    assert "--resume" in message and "--overwrite" in message
    assert (run_dir / "metrics.jsonl").read_text() == before and checkpoints(run_dir) == ["latest", "step-000002", "step-000004"]
    with pytest.raises(SystemExit):
        main(["train", "--resume", "--overwrite", *SFT, f"output_dir={run_dir}"])
    assert "not allowed with" in capsys.readouterr().err
    monkeypatch.undo()

    assert main(["train", "--overwrite", *SFT, "steps=2", "save_every=1", f"output_dir={run_dir}"]) == 0
    assert metric_steps(run_dir) == [1, 2] and checkpoints(run_dir) == ["latest", "step-000001", "step-000002"]
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "eval" / "record.json").is_file()  # not the run's
    assert main(["train", "--resume", *SFT, "steps=2", f"output_dir={run_dir}"]) == 0  # a finished run resumes to nothing


def test_distributed_processes_stop_together_when_the_directory_is_locked(tmp_path):
    """Only the main process takes the lock; the others learn of the refusal from it instead of waiting at a collective."""
    run_dir = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    with held_elsewhere(run_dir) as holder:
        result = subprocess.run(
            [*launch, "-m", "tests.amft_vlm.train_until", *SFT, "steps=2", "distributed=ddp", f"output_dir={run_dir}"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if f"is being written by pid {holder.pid}" in line]
    assert len(refusals) >= 2, result.stderr[-3000:]  # each process raised it
    assert sorted(path.name for path in run_dir.iterdir()) == [LOCK_FILE]  # nothing written


def test_collect_compare_and_demo_refuse_a_directory_another_process_writes(tmp_path, tiny_checkpoints):
    """Before: two collects into one new directory shared its temporary directory and wrote a dataset whose manifest
    counted 300 dialogues over 271 lines."""
    dataset = tmp_path / "expert"
    with held_elsewhere(tmp_path / "expert.partial") as holder, pytest.raises(DirectoryInUse, match=f"expert.partial is being written by pid {holder.pid}"):
        collect("GeneralPoints-v0", {"modality": "language"}, ExpertAgent(), episodes=2, seed=0, out_dir=dataset, progress=False)
    assert not dataset.exists()
    (tmp_path / "expert.partial" / "images").mkdir()  # as a killed collection leaves it
    collect("GeneralPoints-v0", {"modality": "language"}, ExpertAgent(), episodes=2, seed=0, out_dir=dataset, progress=False)
    assert read_manifest(dataset)["dialogues"] == 2 and (dataset / LOCK_FILE).read_text() == ""
    assert not (tmp_path / "expert.partial").exists()

    out = tmp_path / "compare"
    config = load_compare_config(overrides=["steps=2", f"model={tiny_checkpoints['qwen2-vl']}"], methods=["sft"], seeds=1, jobs=1, threads=1)
    with held_elsewhere(out) as holder, pytest.raises(DirectoryInUse, match=f"--out: {out} is being written by pid {holder.pid}"):
        run_compare(config, out, progress=False)
    assert sorted(path.name for path in out.iterdir()) == [LOCK_FILE]

    demo = tmp_path / "demo"
    with held_elsewhere(demo) as holder, pytest.raises(DirectoryInUse, match=f"--out: {demo} is being written by pid {holder.pid}"):
        run_demo(demo, load_demo_config(quick=True), threads=1, progress=False)
    assert sorted(path.name for path in demo.iterdir()) == [LOCK_FILE]
