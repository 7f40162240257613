"""A signal that stops ``compare``, ``demo`` or ``eval`` stops everything they started, within seconds, and leaves
what they wrote resumable: the worker processes of `amft_vlm.run.jobs.JobPool` and its resource tracker, and the
request threads of a served evaluation. Every test runs the command (or a pool) in a real subprocess."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amft_vlm.compare import load_compare_config, run_compare
from amft_vlm.run.jobs import JobPool
from tests.amft_vlm.evaluation.test_served import (
    GP_LANGUAGE,
    _cached,
    _served_args,
    _wait_until,
    expert_server,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; workers die with their parent on Linux")

REPO = Path(__file__).resolve().parents[3]
STOPPED_WITHIN = 30.0
"""Seconds a stopped command and everything it started get to be gone: they take 1-3 s on an idle machine, and more
than 10 s happened on a 2-core one running four other test jobs; the tasks they must not wait for take 600 s."""


def parents() -> dict[int, int]:
    """Every live process's parent, from /proc (psutil is not a dependency)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found[int(stat.parent.name)] = int(fields[1])
    return found


def descendants(pid: int) -> set[int]:
    """The processes `pid` started, and theirs."""
    by_parent: dict[int, list[int]] = {}
    for child, parent in parents().items():
        by_parent.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def stop_and_check(process: subprocess.Popen, started: set[int], how: str) -> int:
    """Stop `process` the way `how` says; assert that it and every process in `started` are gone within
    `STOPPED_WITHIN` seconds; return its exit status."""
    sent = time.monotonic()
    if how == "SIGTERM":
        process.send_signal(signal.SIGTERM)
    elif how == "SIGINT":  # to the parent alone, as `kill -INT PID` does
        process.send_signal(signal.SIGINT)
    elif how == "Ctrl-C":  # to the whole foreground process group, as a terminal does
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.kill()
    try:
        status = process.wait(timeout=STOPPED_WITHIN)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"still running {STOPPED_WITHIN} s after {how}") from None
    while any(alive(pid) for pid in started) and time.monotonic() - sent < STOPPED_WITHIN:
        time.sleep(0.05)
    left = {pid: command_line(pid) for pid in started if alive(pid)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"left running {STOPPED_WITHIN} s after {how}: {left}"
    return status


EXIT_STATUS = {"SIGTERM": 143, "SIGINT": 130, "Ctrl-C": 130, "SIGKILL": -signal.SIGKILL}


@pytest.mark.parametrize("how", list(EXIT_STATUS))
def test_a_stopped_pool_leaves_no_process_behind(tmp_path, how):
    """Two workers busy in ten-minute tasks: SIGTERM, SIGINT to the parent alone, Ctrl-C to the whole group and SIGKILL
    of the parent each end the workers and the resource tracker within seconds (before: SIGTERM left all three running
    with parent 1, and SIGINT to the parent waited for the tasks to end)."""
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.amft_vlm.sleeping_jobs", str(tmp_path)], cwd=REPO, stderr=stderr, start_new_session=True
        )
    try:
        _wait_until(lambda: len(list(tmp_path.glob("worker-*"))) == 2 or process.poll() is not None, "both workers run a task", seconds=120)
        assert process.poll() is None, (tmp_path / "stderr").read_text()
        workers = {int(path.name.split("-")[1]) for path in tmp_path.glob("worker-*")}
        started = descendants(process.pid)
        assert workers < started  # and the resource tracker
        assert stop_and_check(process, started, how) == EXIT_STATUS[how], (tmp_path / "stderr").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    if how != "SIGKILL":
        assert "stopped 2 worker process(es)" in (tmp_path / "stderr").read_text()


COMPARE = [
    "--methods", "sft", "--seeds", "2", "steps=12", "save_every=2", "expert_episodes=12", "sft_batch_size=4", "num_envs=4",
    "max_new_tokens=16", "compare.eval_episodes=2", "compare.eval_envs=2",
]
"""Two SFT runs of 12 steps with a checkpoint every 2, and tiny evaluations."""


def test_compare_stopped_by_sigterm_leaves_nothing_running_and_resumes_where_it_stopped(tmp_path, tiny_checkpoints, monkeypatch):
    out = tmp_path / "compare"
    model = f"model={tiny_checkpoints['qwen2-vl']}"
    command = [sys.executable, "-m", "amft_vlm.cli", "compare", "--jobs", "2", "--threads", "2", "--out", str(out), *COMPARE, model]
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stderr=stderr, stdout=subprocess.DEVNULL, start_new_session=True)
    runs = [out / "runs" / "sft" / f"seed-{seed}" for seed in (0, 1)]
    try:
        _wait_until(
            lambda: any((run / "checkpoints" / "latest").is_file() for run in runs) or process.poll() is not None,
            "a run wrote a checkpoint", seconds=240,
        )  # fmt: skip
        assert process.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        started = descendants(process.pid)
        assert len(started) >= 3  # two workers and the resource tracker
        assert stop_and_check(process, started, "SIGTERM") == 143
    finally:
        if process.poll() is None:
            process.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert "amft-vlm compare: stopped (SIGTERM)" in stderr and "rerun the same command to resume" in stderr
    at_stop = {run: _checkpoint_step(run) for run in runs}
    assert any(0 < step < 12 for step in at_stop.values()), at_stop  # stopped part-way, with something to resume from

    from amft_vlm.learning import trainer

    resumed_at = {}

    class Recording(trainer.Trainer):
        def __init__(self, train_config, **kwargs):
            super().__init__(train_config, **kwargs)
            resumed_at[Path(train_config.output_dir)] = self.start_step

    monkeypatch.setattr(trainer, "Trainer", Recording)
    config = load_compare_config(overrides=[*COMPARE[4:], model], methods=["sft"], seeds=2, jobs=1, threads=1)
    result = run_compare(config, out, progress=False)
    assert resumed_at == {run: step for run, step in at_stop.items() if step < 12}
    assert sorted(result.trained) == sorted(f"sft/{run.name}" for run, step in at_stop.items() if step < 12)
    for run in runs:
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 13))
    assert "| sft |" in result.table


def _checkpoint_step(run: Path) -> int:
    """The step of `run`'s newest checkpoint (0 without one)."""
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("-")[1]) if latest.is_file() else 0


def test_a_served_evaluation_stopped_by_sigterm_ends_at_once_and_resumes_from_the_cache(tmp_path):
    """SIGTERM while both request threads wait on a hung request: the evaluation ends at once (the requests would hold
    it for --request-timeout, 120 s) with status 143 and says how to resume; a rerun asks only for the rest."""
    episodes, answered = 6, 3
    with expert_server(*GP_LANGUAGE, range(episodes), hang_after=answered) as server:
        command = [sys.executable, "-m", "amft_vlm.cli", *_served_args(server, tmp_path, "--episodes", str(episodes), "--concurrency", "2")]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_until(lambda: len(_cached(tmp_path)) >= answered or process.poll() is not None, "the evaluation got its answers")
            _wait_until(lambda: server.hanging() == 2, "both threads wait on a hung request")
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=STOPPED_WITHIN)
            assert time.monotonic() - sent < STOPPED_WITHIN
        finally:
            process.kill()
        assert process.returncode == 143 and "rerun the same command to resume" in stderr and "stopped (SIGTERM)" in stderr
        server.resume()
        before = len(server.requests)
        out = tmp_path / "record.json"
        assert subprocess.run([*command, "--out", str(out)], cwd=REPO, capture_output=True, timeout=120).returncode == 0
        assert len(server.requests) - before == episodes - answered


def _log_both(name: str) -> str:
    logging.getLogger("amft_vlm.task").info("info from %s", name)
    logging.getLogger("amft_vlm.task").warning("warning from %s", name)
    return name


def test_a_task_in_this_process_logs_to_its_file_and_warns_on_the_console(tmp_path, capsys):
    """One job runs its tasks here; like a worker's, a task's INFO lines go to its log file, not between progress bars."""
    console = logging.StreamHandler(sys.stderr)  # the console handler logging.basicConfig would add
    root = logging.getLogger()
    root.addHandler(console)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with JobPool(1, 1) as pool:
            assert pool.submit(_log_both, "one", log_file=tmp_path / "run" / "task.log").result() == "one"
        logging.getLogger("amft_vlm.task").info("after the task")
    finally:
        root.removeHandler(console)
        root.setLevel(level)
    printed = capsys.readouterr().err
    assert "warning from one" in printed and "info from one" not in printed
    assert "after the task" in printed  # the console is as loud as before once the task is done
    logged = (tmp_path / "run" / "task.log").read_text()
    assert "INFO amft_vlm.task: info from one" in logged and "WARNING amft_vlm.task: warning from one" in logged
    assert "after the task" not in logged
