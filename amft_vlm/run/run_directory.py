"""One writer per output directory, and no new run silently written over an old one.

Every command that writes a directory of results (``train``'s run, ``compare``'s and ``demo``'s output,
``collect``'s dataset) first takes its `DirectoryLock`: an exclusive ``flock`` on the file `LOCK_FILE`
inside it, which records who holds it (pid, host, command, start time). A second process that wants to
write the directory is refused at once with a message naming the holder. The kernel drops the lock when
the holder's file is closed, so it is released on any exit, a crash or SIGKILL included: a lock file left
by a process that is gone never blocks. Within one process a directory may be claimed again (the claims
share the lock): the lock keeps other processes out, and a process knows what it runs.

A new training run (``train`` without ``--resume``) is refused over an existing one (`existing_run`:
``metrics.jsonl`` or checkpoints) unless told to replace it, and then `remove_run` deletes that run's
own files only (`RUN_ENTRIES` and the checkpoints), never anything else in the directory.

``flock`` works on local file systems and on NFS (Linux emulates it with NFS's byte-range locks); a file
system without locks raises the OSError that says so.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import socket
import stat
import sys
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from amft_vlm.run.safe_io import OutputPathError, load_json_text, read_regular_text

log = logging.getLogger(__name__)

LOCK_FILE = ".amft-vlm.lock"
"""The lock file inside a locked directory (kept after the lock is released; empty when nobody holds it)."""
COMMAND_CHARACTERS = 400
"""Most characters of the holder's command line kept in the lock file."""
TRACKER_PROJECT = "amft-vlm"
"""accelerate's tracker project of a run (``init_trackers``); TensorBoard logs go to ``RUN/amft-vlm/``."""
TRAIN_LOG = "train.log"
"""The log of ``amft-vlm train`` in its run directory (the console shows the progress bar and warnings)."""
METRICS = "metrics.jsonl"
"""One JSON line per training step, under the run directory."""
LATEST = "latest"
"""The pointer file naming the newest checkpoint, under ``RUN/checkpoints``."""
STEP_DIRECTORY = re.compile(r"step-(\d{6,})")
"""A checkpoint's directory name under ``RUN/checkpoints``: ``step-`` and the step, zero-padded to 6 digits."""

RUN_ENTRIES = (METRICS, "config.yaml", TRAIN_LOG, "initial-model", ".initial-model.tmp", TRACKER_PROJECT)
"""What a training run writes in its directory besides ``checkpoints/`` (`remove_run` deletes these)."""


class DirectoryInUse(OSError):
    """Another process holds the directory's lock; the message names it (pid, host, command, since when)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a directory's lock, as its lock file records it."""

    pid: int
    host: str
    command: str
    started: str

    @classmethod
    def of_this_process(cls) -> LockHolder:
        """This process: its pid, host name, command line (on one line, cut to `COMMAND_CHARACTERS`) and the time now."""
        command = " ".join(shlex.join(getattr(sys, "orig_argv", sys.argv)).split())
        if len(command) > COMMAND_CHARACTERS:
            command = command[: COMMAND_CHARACTERS - 3] + "..."
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), command, started)

    def describe(self) -> str:
        """``pid 123 on host-a (`python -m amft_vlm.cli train ...`, since 2026-01-01T10:00:00+00:00)``."""
        return f"pid {self.pid} on {self.host} (`{self.command}`, since {self.started})"


def read_holder(directory: str | os.PathLike) -> LockHolder | None:
    """The holder recorded in `directory`'s lock file (None: no file, empty, or unreadable). A record says who
    took the lock last; whether it still holds it only the lock itself tells (`DirectoryLock`)."""
    try:
        record = load_json_text(read_regular_text(Path(directory) / LOCK_FILE, 64 * 1024, what="the lock file"))
        return LockHolder(int(record["pid"]), str(record["host"]), str(record["command"]), str(record["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _Held:
    """This process's hold on one lock file: its open descriptor and how many `DirectoryLock` share it."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor, self.claims = descriptor, 0


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


class DirectoryLock:
    """The exclusive right of this process to write `directory` (see the module docstring); taken on construction.

    Release it with `release` or by leaving a ``with`` block; it is also released when the object is garbage
    collected and when the process ends, however it ends.

    Args:
        directory: the directory to lock; it must exist.
        what: the setting that named it (``output_dir``, ``--out``), for the message.

    Raises:
        DirectoryInUse: another process holds it.
    """

    def __init__(self, directory: str | os.PathLike, *, what: str) -> None:
        self.directory = Path(directory)
        self._key = os.path.join(os.path.realpath(self.directory), LOCK_FILE)  # the directory resolved, never the file
        with _held_guard:
            held = _held.get(self._key)
            if held is None:
                held = _Held(self._take(what))
                _held[self._key] = held
            held.claims += 1
        self._release = weakref.finalize(self, _let_go, self._key)

    def _take(self, what: str) -> int:
        """Open the lock file, lock it without waiting, and write this process's record in it; its descriptor."""
        while True:
            # Not truncated (a holder's record stays readable); never through a link, never into a FIFO or device.
            descriptor = os.open(self._key, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                os.close(descriptor)
                raise OutputPathError(f"{self._key} is not a regular file; remove it (it is {LOCK_FILE}, the run's lock)")
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                holder = read_holder(self.directory)
                who = holder.describe() if holder is not None else f"a process that has not written {LOCK_FILE} yet"
                raise DirectoryInUse(
                    f"{what}: {self.directory} is being written by {who}; wait for it to finish or stop it, or choose another {what}"
                ) from None
            except BaseException:
                os.close(descriptor)
                raise
            if _same_file(descriptor, self._key):
                break
            os.close(descriptor)  # the file was moved or deleted between the open and the lock: lock the one there now
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(LockHolder.of_this_process().__dict__) + "\n").encode(), 0)
        return descriptor

    def release(self) -> None:
        """Give the claim up (idempotent); the lock is released with this process's last claim on the directory."""
        self._release()

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.release()


def _same_file(descriptor: int, path: str) -> bool:
    """Whether `path` is still the file open as `descriptor`."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (opened.st_dev, opened.st_ino) == (now.st_dev, now.st_ino)


def _let_go(key: str) -> None:
    """Drop one claim on the lock file `key`; with the last, empty the record and close the file (the kernel unlocks it)."""
    with _held_guard:
        held = _held[key]
        held.claims -= 1
        if held.claims:
            return
        del _held[key]
    with contextlib.suppress(OSError):  # the record is only informative; the close is what releases
        os.ftruncate(held.descriptor, 0)
    os.close(held.descriptor)


def is_empty(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds nothing but its lock file (an absent directory is empty)."""
    path = Path(directory)
    return not path.is_dir() or all(entry.name == LOCK_FILE for entry in path.iterdir())


def _checkpoint_entries(run_dir: Path) -> list[Path]:
    """What the trainer writes under ``RUN/checkpoints``: ``step-N`` directories, the ``latest`` pointer, and the
    hidden temporaries of a save that was stopped part-way."""

    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(entry for entry in root.iterdir() if STEP_DIRECTORY.fullmatch(entry.name) or entry.name == LATEST or entry.name.startswith("."))


def existing_run(run_dir: str | os.PathLike) -> str | None:
    """What of a training run `run_dir` already holds (``metrics.jsonl with 30 lines, 8 checkpoints``), or None."""
    path = Path(run_dir)
    parts = []
    metrics = path / METRICS
    if metrics.is_file() and metrics.stat().st_size:
        lines = metrics.read_bytes().count(b"\n")
        parts.append(f"{METRICS} with {lines} lines")
    steps = [entry.name for entry in _checkpoint_entries(path) if STEP_DIRECTORY.fullmatch(entry.name)]
    if steps:
        parts.append(f"{len(steps)} checkpoint(s), the newest {steps[-1]}")
    return ", ".join(parts) or None


def remove_run(run_dir: str | os.PathLike) -> list[str]:
    """Delete the training run in `run_dir`: its `RUN_ENTRIES` and its checkpoints (``checkpoints/`` itself when nothing
    else is in it). Anything else is kept; returns the names kept (besides the lock file)."""
    path = Path(run_dir)
    for entry in [*(path / name for name in RUN_ENTRIES), *_checkpoint_entries(path)]:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
    with contextlib.suppress(OSError):  # not there, or it holds something else
        (path / "checkpoints").rmdir()
    return sorted(entry.name for entry in path.iterdir() if entry.name != LOCK_FILE)


def start_new_run(run_dir: str | os.PathLike, *, overwrite: bool, what: str = "output_dir") -> None:
    """Make way for a new training run in `run_dir` (locked by the caller): refuse when a run is there already, or
    with `overwrite` delete that run (`remove_run`).

    Raises:
        FileExistsError: a run is there and `overwrite` is false; the message says what to pass.
    """
    found = existing_run(run_dir)
    if found is None:
        return
    if not overwrite:
        raise FileExistsError(
            f"{what}: {run_dir} already holds a run ({found}); pass --resume (resume=True) to continue it, --overwrite "
            f"(overwrite=True) to delete it and start again, or choose another {what}"
        )
    kept = remove_run(run_dir)
    log.warning("overwrite: deleted the run in %s (%s)%s", run_dir, found, f"; kept what it did not write: {', '.join(kept)}" if kept else "")
