"""Writes that must not destroy what is at their path (issue 22): every output of the project replaces only a
regular file or creates a new one, writes through a symbolic link, and refuses a directory, FIFO, socket or
device node with an error (exit code 2 from the command line), without ever blocking on a FIFO.

The device cases use a private copy of ``/dev/null`` or ``/dev/full`` made with ``mknod`` (root only): a test
that failed must not turn the machine's own ``/dev/null`` into a file. The real ``/dev/null`` and ``/dev/full``
are only checked, never written.
"""

import json
import logging
import os
import socket
import stat
from pathlib import Path

import pytest

from agents.tiny import build_tiny_model
from amft_vlm.cli import main
from amft_vlm.evaluation.evaluate import load_record
from amft_vlm.evaluation.served import ResponseCache
from amft_vlm.evaluation.served.cache import Completion
from amft_vlm.learning import checkpoint as checkpoint_module
from amft_vlm.learning.checkpoint import MetricsLog
from amft_vlm.rollout.expert_data import read_manifest
from amft_vlm.run import jobs
from amft_vlm.run.preflight import check_output_file, writable_directory
from amft_vlm.run.safe_io import (
    OutputPathError,
    atomic_output,
    open_for_append,
    output_directory,
    output_file_target,
    write_bytes_atomic,
    write_text_atomic,
)
from tests.amft_vlm.run.blocking import never_blocks

FIFO_SECONDS = 60.0
"""How long a FIFO may hold up the code under test before it fails (`never_blocks`)."""

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
DEVICES = {"null-device": (1, 3), "full-device": (1, 7)}
"""Character devices by test name: (major, minor) of Linux's /dev/null and /dev/full."""

REFUSED = ["fifo", "socket", "directory", "null-device", "full-device"]
KIND_WORDS = {
    "fifo": "FIFO", "socket": "socket", "directory": "directory", "null-device": "character device",
    "full-device": "character device",
}  # fmt: skip
"""A word the refusal of each kind must contain."""


def make_node(kind: str, path: Path) -> Path:
    """Put a `kind` at `path` (the parent exists): fifo, socket, directory, null-device, full-device or file."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cwd = os.getcwd()
        os.chdir(path.parent)  # a relative name: a socket's address is at most 107 bytes, tmp_path may be longer
        try:
            server.bind(path.name)
        finally:
            os.chdir(cwd)
            server.close()  # the socket file stays
    elif kind == "directory":
        path.mkdir()
    elif kind in DEVICES:
        if not IS_ROOT:
            pytest.skip("making a device node needs root")
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(*DEVICES[kind]))
    elif kind == "file":
        path.write_text("mine\n")
    else:
        raise ValueError(kind)
    return path


def kind_of(path: Path) -> str:
    """What is at `path`, not following a link: fifo, socket, directory, character-device, symlink, file or missing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    for test, name in (
        (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character-device"),
        (stat.S_ISLNK, "symlink"), (stat.S_ISREG, "file"),
    ):  # fmt: skip
        if test(mode):
            return name
    return "other"


def assert_untouched(path: Path, kind: str) -> None:
    expected = {"null-device": "character-device", "full-device": "character-device"}.get(kind, kind)
    assert kind_of(path) == expected, f"{path} is now a {kind_of(path)}, was a {expected}"
    if kind == "directory":
        assert list(path.iterdir()) == []
    assert not [entry.name for entry in path.parent.iterdir() if entry.name.endswith(".tmp")]


def exits_2(argv, capsys) -> str:
    """Run ``amft-vlm ARGV``, which must exit 2 (an error message, no traceback); returns what it wrote to stderr."""
    with never_blocks(FIFO_SECONDS), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return error


# ------------------------------------------------------------------------------------------------
# The helpers.


@pytest.mark.parametrize("kind", REFUSED)
def test_every_write_refuses_what_is_not_a_regular_file_and_leaves_it(tmp_path, kind):
    path = make_node(kind, tmp_path / "out.json")
    writes = {
        "text": lambda: write_text_atomic(path, "{}\n"),
        "bytes": lambda: write_bytes_atomic(path, b"{}\n"),
        "append": lambda: open_for_append(path).close(),
        "staged": lambda: atomic_output(path).__enter__(),
        "check": lambda: output_file_target(path),
    }
    for name, write in writes.items():
        with never_blocks(10), pytest.raises(OutputPathError, match=KIND_WORDS[kind]) as refusal:
            write()
        assert str(path) in str(refusal.value), name
        assert_untouched(path, kind)


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "null-device"])
def test_a_link_to_what_is_not_a_regular_file_is_refused(tmp_path, kind):
    target = make_node(kind, tmp_path / "target")
    link = tmp_path / "out.json"
    link.symlink_to(target)
    for write in (lambda: write_text_atomic(link, "{}\n"), lambda: open_for_append(link).close()):
        with never_blocks(10), pytest.raises(OutputPathError, match=f"symlink to {target}, which is .*{KIND_WORDS[kind]}"):
            write()
    assert kind_of(link) == "symlink" and os.readlink(link) == str(target)
    assert_untouched(target, kind)


def test_the_machines_null_and_full_devices_are_refused_without_writing():
    for device in ("/dev/null", "/dev/full"):
        if not Path(device).exists():
            continue
        with pytest.raises(OutputPathError, match=f"{device} is a character device"):
            output_file_target(device)
        with pytest.raises(ValueError, match=f"--out: .*{device} is a character device"):
            check_output_file(device, what="--out")


def test_a_regular_file_is_replaced_whole_and_keeps_its_mode(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old\n")
    path.chmod(0o640)
    write_text_atomic(path, "new — ±\n")
    assert path.read_text(encoding="utf-8") == "new — ±\n" and stat.S_IMODE(path.stat().st_mode) == 0o640
    write_bytes_atomic(tmp_path / "new.bin", b"\x00\x01")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    with atomic_output(tmp_path / "staged.png") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".staged.png.") and staging.name.endswith(".tmp")
        staging.write_bytes(b"png")
    assert (tmp_path / "staged.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.bin", "out.json", "staged.png"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"), atomic_output(path) as staging:
        staging.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_link_to_a_file_is_written_through_and_stays_a_link(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "record.json"
    target.write_text("old\n")
    link = tmp_path / "out.json"
    link.symlink_to(target)
    write_text_atomic(link, "new\n")
    assert kind_of(link) == "symlink" and os.readlink(link) == str(target) and target.read_text() == "new\n"
    with open_for_append(link) as handle:
        handle.write("more\n")
    assert kind_of(link) == "symlink" and target.read_text() == "new\nmore\n"
    chained = tmp_path / "chained.json"
    chained.symlink_to(link)  # a chain of links is followed to its end
    write_text_atomic(chained, "chained\n")
    assert kind_of(chained) == kind_of(link) == "symlink" and target.read_text() == "chained\n"
    assert output_file_target(link) == target.resolve()
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["record.json"]


def test_a_dangling_link_creates_its_target(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "record.json"
    link = tmp_path / "out.json"
    link.symlink_to(target)
    write_text_atomic(link, "new\n")
    assert kind_of(link) == "symlink" and target.read_text() == "new\n"
    appended = tmp_path / "metrics.jsonl"
    appended.symlink_to(tmp_path / "elsewhere" / "metrics.jsonl")
    with open_for_append(appended) as handle:
        handle.write("{}\n")
    assert kind_of(appended) == "symlink" and (tmp_path / "elsewhere" / "metrics.jsonl").read_text() == "{}\n"
    nowhere = tmp_path / "nowhere.json"
    nowhere.symlink_to(tmp_path / "missing" / "record.json")
    with pytest.raises(OutputPathError, match="missing does not exist"):
        write_text_atomic(nowhere, "new\n")
    assert kind_of(nowhere) == "symlink"


def test_a_symlink_loop_is_refused(tmp_path):
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    with pytest.raises(OutputPathError, match="symlink loop"):
        write_text_atomic(loop, "x")
    assert kind_of(loop) == "symlink"


@pytest.mark.parametrize("kind", ["fifo", "socket", "file", "null-device"])
def test_an_output_directory_must_be_a_directory(tmp_path, kind):
    path = make_node(kind, tmp_path / "out")
    with pytest.raises(OutputPathError, match=r"out is a .*; give a directory"):
        output_directory(path)
    with pytest.raises(ValueError, match=r"--out: .*out is a .*; give a directory"):
        writable_directory(path, what="--out")
    expected = {"null-device": "character-device"}.get(kind, kind)
    assert kind_of(path) == expected


def test_an_output_directory_through_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "real")
    assert output_directory(link) == (tmp_path / "real").resolve() and kind_of(link) == "symlink"
    dangling = tmp_path / "later"
    dangling.symlink_to(tmp_path / "made" / "here")
    assert output_directory(dangling) == (tmp_path / "made" / "here").resolve()
    assert (tmp_path / "made" / "here").is_dir() and kind_of(dangling) == "symlink"
    assert output_directory(tmp_path / "new" / "sub", create=False) == tmp_path / "new" / "sub"
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------
# amft-vlm eval --out


EVAL = ["eval", "--agent", "expert", "--episodes", "1"]


@pytest.mark.parametrize("kind", REFUSED)
def test_eval_out_refuses_what_is_not_a_regular_file(tmp_path, kind, capsys):
    path = make_node(kind, tmp_path / "record.json")
    error = exits_2([*EVAL, "--out", str(path)], capsys)
    assert f"amft-vlm eval: error: --out: {path}" in error and KIND_WORDS[kind] in error
    assert_untouched(path, kind)


def test_eval_out_through_a_link_writes_the_target(tmp_path, capsys):
    target = tmp_path / "records" / "record.json"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "record.json"
    link.symlink_to(target)
    dangling = tmp_path / "new.json"
    dangling.symlink_to(tmp_path / "records" / "new.json")
    for out in (link, dangling):
        with never_blocks(FIFO_SECONDS):
            assert main([*EVAL, "--out", str(out)]) == 0
        assert kind_of(out) == "symlink"
    assert load_record(target).episodes == 1 and load_record(tmp_path / "records" / "new.json").episodes == 1


# ------------------------------------------------------------------------------------------------
# amft-vlm report


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: sft\nsteps: 3\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "mu": 1.0, "loss": 1.0 / s, "loss_sft": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    return run


@pytest.mark.parametrize("name", ["report.md", "mu.png", "reward_success.png"])
@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "null-device"])
def test_report_refuses_an_output_file_that_is_not_a_regular_file(tmp_path, kind, name, capsys):
    """mu.png is drawn, reward_success.png (no reward in an SFT run) is a stale plot the report removes."""
    out = tmp_path / "report"
    out.mkdir()
    path = make_node(kind, out / name)
    error = exits_2(["report", str(_run(tmp_path)), "--out", str(out)], capsys)
    assert str(path) in error and KIND_WORDS[kind] in error
    assert_untouched(path, kind)
    assert not (out / "report.md").is_file()  # refused before anything is written


def test_report_out_that_is_not_a_directory(tmp_path, capsys):
    out = make_node("fifo", tmp_path / "report")
    error = exits_2(["report", str(_run(tmp_path)), "--out", str(out)], capsys)
    assert f"--out: {out} is a FIFO (named pipe); give a directory" in error
    assert_untouched(out, "fifo")


def test_report_writes_through_links(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (tmp_path / "kept").mkdir()
    for name in ("report.md", "mu.png"):
        (out / name).symlink_to(tmp_path / "kept" / name)
    with never_blocks(FIFO_SECONDS):
        assert main(["report", str(_run(tmp_path)), "--out", str(out)]) == 0
    assert kind_of(out / "report.md") == kind_of(out / "mu.png") == "symlink"
    assert (tmp_path / "kept" / "report.md").read_text().startswith("# Training report")
    assert (tmp_path / "kept" / "mu.png").read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------------
# amft-vlm collect


COLLECT = ["collect", "--env-arg", "modality=language", "--episodes", "1"]


@pytest.mark.parametrize("kind", ["fifo", "socket", "file", "null-device"])
def test_collect_out_that_is_not_a_directory(tmp_path, kind, capsys):
    out = make_node(kind, tmp_path / "experts")
    error = exits_2([*COLLECT, "--out", str(out)], capsys)
    assert f"{out} is a" in error and "give a directory" in error and (kind == "file" or KIND_WORDS[kind] in error)
    assert kind_of(out) == {"null-device": "character-device"}.get(kind, kind)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experts"]


def test_collect_out_through_a_link(tmp_path):
    empty = tmp_path / "datasets" / "empty"
    empty.mkdir(parents=True)
    link, dangling = tmp_path / "experts", tmp_path / "more-experts"
    link.symlink_to(empty)
    dangling.symlink_to(tmp_path / "datasets" / "new")
    for out in (link, dangling):
        with never_blocks(FIFO_SECONDS):
            assert main([*COLLECT, "--out", str(out)]) == 0
        assert kind_of(out) == "symlink" and read_manifest(out)["episodes"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datasets", "experts", "more-experts"]
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["empty", "new"]


# ------------------------------------------------------------------------------------------------
# amft-vlm demo


class DemoStopped(Exception):
    """Stands for the rest of the demo once its output directory is prepared."""


@pytest.fixture
def demo_stops_after_preparing(monkeypatch):
    def stop(*args, **kwargs):
        raise DemoStopped

    monkeypatch.setattr("amft_vlm.demo.prepare_inputs", stop)


@pytest.mark.parametrize("name", ["demo.md", "summary.json", "expert"])
@pytest.mark.parametrize("kind", ["fifo", "socket", "null-device"])
def test_demo_force_refuses_entries_that_are_not_its_files(tmp_path, kind, name, capsys, demo_stops_after_preparing):
    path = make_node(kind, tmp_path / name)
    error = exits_2(["demo", "--quick", "--force", "--threads", "1", "--out", str(tmp_path)], capsys)
    assert str(path) in error and KIND_WORDS[kind] in error
    assert_untouched(path, kind)


def test_demo_force_keeps_links_to_its_files(tmp_path, demo_stops_after_preparing):
    out = tmp_path / "demo"
    out.mkdir()
    (tmp_path / "kept").mkdir()
    for name in ("demo.md", "summary.json"):
        (tmp_path / "kept" / name).write_text("old\n")
        (out / name).symlink_to(tmp_path / "kept" / name)
    (out / "sft").mkdir()
    with never_blocks(FIFO_SECONDS), pytest.raises(DemoStopped):
        main(["demo", "--quick", "--force", "--threads", "1", "--out", str(out)])
    assert kind_of(out / "demo.md") == kind_of(out / "summary.json") == "symlink"  # written through at the end
    assert not (out / "sft").exists()  # the demo's own directory is replaced


def test_demo_out_that_is_not_a_directory(tmp_path, capsys, demo_stops_after_preparing):
    out = make_node("fifo", tmp_path / "demo")
    error = exits_2(["demo", "--quick", "--out", str(out)], capsys)
    assert f"{out} is a FIFO (named pipe); give a directory" in error
    assert_untouched(out, "fifo")


# ------------------------------------------------------------------------------------------------
# metrics.jsonl, checkpoints, the response cache, log files, the tiny model


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "null-device"])
def test_metrics_are_not_appended_to_what_is_not_a_regular_file(tmp_path, kind):
    path = make_node(kind, tmp_path / "metrics.jsonl")
    metrics = MetricsLog(tmp_path, is_main=True)
    with never_blocks(10), pytest.raises(OutputPathError, match=KIND_WORDS[kind]):
        metrics.append({"step": 1, "loss": 1.0})
    with never_blocks(10), pytest.raises(OutputPathError, match=KIND_WORDS[kind]):
        metrics.keep_until(0, source=tmp_path)
    assert_untouched(path, kind)


def test_metrics_are_appended_through_a_link(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "kept" / "metrics.jsonl")
    metrics = MetricsLog(tmp_path, is_main=True)
    metrics.append({"step": 1, "loss": 1.0})
    metrics.append({"step": 2, "loss": 0.5})
    metrics.keep_until(1, source=tmp_path)
    assert kind_of(tmp_path / "metrics.jsonl") == "symlink"
    assert (tmp_path / "kept" / "metrics.jsonl").read_text() == json.dumps({"step": 1, "loss": 1.0}) + "\n"


def test_train_refuses_a_fifo_for_metrics_before_the_model_loads(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    fifo = make_node("fifo", run / "metrics.jsonl")
    error = exits_2(["train", f"output_dir={run}", "model=tiny:qwen2-vl", "method=sft", "device=cpu"], capsys)
    assert f"output_dir: {fifo} is a FIFO" in error
    assert_untouched(fifo, "fifo")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_the_latest_pointer_and_the_checkpoint_directory(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (tmp_path / "kept").mkdir()
    (root / "latest").symlink_to(tmp_path / "kept" / "latest")
    staging = root / ".tmp-step-000002"
    staging.mkdir()
    checkpoint_module._publish(staging, root / "step-000002")
    assert kind_of(root / "latest") == "symlink" and (tmp_path / "kept" / "latest").read_text() == "step-000002\n"
    (root / "latest").unlink()
    fifo = make_node("fifo", root / "latest")
    staging.mkdir()
    with never_blocks(10), pytest.raises(OutputPathError, match="FIFO"):
        checkpoint_module._publish(staging, root / "step-000004")
    assert_untouched(fifo, "fifo")
    assert staging.is_dir() and not (root / "step-000004").exists()  # unpublished, as for any failed pointer
    fifo.unlink()
    linked = root / "step-000006"
    linked.symlink_to(tmp_path / "kept")
    with pytest.raises(OutputPathError, match="is a symbolic link, not a checkpoint directory"):
        checkpoint_module._publish(staging, linked)
    assert kind_of(linked) == "symlink" and staging.is_dir()


def test_the_response_cache_leaves_a_fifo_alone(tmp_path, caplog):
    cache = ResponseCache(tmp_path)
    key = "a" * 64
    fifo = make_node("fifo", tmp_path / f"{key}.json")
    with never_blocks(10):
        assert cache.get(key) is None
        cache.put(key, Completion("answer", 3, 1))
    assert_untouched(fifo, "fifo")
    assert any("cannot write the response cache" in record.getMessage() for record in caplog.records)


def test_a_worker_log_file_that_is_a_fifo_is_refused(tmp_path):
    fifo = make_node("fifo", tmp_path / "compare.log")
    handlers = list(logging.getLogger().handlers)
    with never_blocks(10), pytest.raises(OutputPathError, match="FIFO"):
        jobs._in_worker(fifo, lambda: None, ())
    assert_untouched(fifo, "fifo")
    assert logging.getLogger().handlers == handlers
    log_file = tmp_path / "run" / "demo.log"
    jobs._in_worker(log_file, lambda: logging.getLogger("amft_vlm.test").warning("into the log"), ())
    assert "into the log" in log_file.read_text() and logging.getLogger().handlers == handlers


def test_a_tiny_model_is_not_saved_over_a_fifo(tmp_path):
    fifo = make_node("fifo", tmp_path / "config.json")
    with never_blocks(FIFO_SECONDS), pytest.raises(OutputPathError, match="FIFO"):
        build_tiny_model("qwen2-vl", tmp_path, seed=0)
    assert_untouched(fifo, "fifo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
