"""Jobs and threads: tasks run in this process (one job) or in a pool of spawned processes, the torch
thread budget they get, and how a signal stops them.

`JobPool` runs ``amft-vlm compare --jobs N`` and the demo's runs side by side: each worker process has
``threads`` torch threads and logs each task to a file of its run (as a task run in this process does, its
console showing warnings only). `choose_threads` picks the thread count
from the cores other processes leave free (measured from ``/proc/stat``): on a shared machine one busy
core makes two threads much slower than one.

Nothing a pool starts outlives the command that started it. Ctrl-C, or SIGTERM under `sigterm_as_interrupt`
(a `Terminated`, which is a ``KeyboardInterrupt``), unwinds the parent, and leaving the pool with it kills
the workers at once instead of waiting for their tasks; the workers ignore SIGINT themselves (Ctrl-C
reaches the whole process group; the parent decides). A parent killed outright (SIGKILL, SIGHUP, a crash)
takes its workers with it: on Linux each worker asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``). A killed worker leaves what the tasks write whole or absent (checkpoints,
records and datasets are written atomically), so the command can be run again to resume.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import multiprocessing
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from amft_vlm.run.safe_io import open_for_append, output_directory

log = logging.getLogger(__name__)


def busy_cores(window: float = 0.5) -> float:
    """How many cores other processes keep busy now: from ``/proc/stat`` over `window` seconds.

    The load average would do, but it lags by a minute: right after ``make demo``'s install step it
    still reads about 1 on an idle machine. Without ``/proc/stat`` it is the fallback (0 without either).
    """
    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = sample()
    if first is not None:
        time.sleep(window)
        second = sample()
        if second is not None and second[0] > first[0]:
            total, idle = second[0] - first[0], second[1] - first[1]
            return (os.cpu_count() or 1) * (total - idle) / total
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def choose_threads(requested: int | None = None) -> int:
    """Torch threads for the demo: `requested`, or the cores other processes leave free now (at least 1)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be at least 1; got {requested}")
        return requested
    cores = os.cpu_count() or 1
    return max(1, min(cores, round(cores - busy_cores())))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch threads, and give the previous count back after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine_description() -> str:
    """CPU model, core count and Python version of this machine, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


STOP_SECONDS = 5.0
"""How long stopped workers get to end after SIGTERM before they are killed."""
PR_SET_PDEATHSIG = 1
"""Linux's ``prctl`` option: the signal this process gets when the thread that started it ends."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread under `sigterm_as_interrupt`: the same clean stop as Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """In the block, SIGTERM raises `Terminated` in the main thread instead of ending the process at once, so what
    the command started is stopped as after Ctrl-C (call it from the main thread)."""

    def interrupt(number: int, frame: Any) -> None:
        raise Terminated(f"stopped by {signal.Signals(number).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's exit status for a command stopped by `interrupt`: 128 + the signal (143 SIGTERM, 130 SIGINT)."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


class JobPool:
    """Runs tasks in this process (one job: at once, on `submit`) or in a pool of spawned processes.

    Leaving the ``with`` block normally waits for every task; leaving it by an exception waits for the tasks
    already running and cancels the rest; by a ``KeyboardInterrupt`` (Ctrl-C, `Terminated`) or ``SystemExit``
    it kills the workers at once (see the module docstring). Submit from the thread that owns the pool (the
    main thread): on Linux a worker is killed when the thread that started it ends.
    """

    def __init__(self, jobs: int, threads: int) -> None:
        self.jobs, self.threads = jobs, threads
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.thread_budget = contextlib.ExitStack()

    def __enter__(self) -> JobPool:
        if self.jobs == 1:
            self.thread_budget.enter_context(torch_threads(self.threads))
        return self

    def submit(self, function: Callable, *args: Any, log_file: Path) -> concurrent.futures.Future:
        """Run ``function(*args)``: now in this process or in a worker; either way its logs go to `log_file` and only
        its warnings and errors to the console."""
        if self.jobs == 1:
            future: concurrent.futures.Future = concurrent.futures.Future()
            with log_to_file(log_file), quiet_console():  # as in a worker: INFO to the run's file, warnings to the console
                future.set_result(function(*args))  # an error propagates at once, before later tasks start
            return future
        if self.pool is None:  # spawned, not forked: a fork of a process with torch's thread pools running can hang
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(self.threads, os.getpid()),
            )
        return self.pool.submit(_in_worker, log_file, function, args)

    def __exit__(self, kind, error, traceback) -> None:
        if self.pool is not None:
            if error is None or isinstance(error, Exception):
                self.pool.shutdown(wait=True, cancel_futures=error is not None)
            else:
                self._stop_workers()
        self.thread_budget.close()

    def _stop_workers(self) -> None:
        """End every worker now: SIGTERM, SIGKILL for any still there after `STOP_SECONDS`; then the pool."""
        # ProcessPoolExecutor has no public handle on its workers before Python 3.14 (terminate_workers).
        workers = list((self.pool._processes or {}).values())
        for worker in workers:
            worker.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join()
        self.pool.shutdown(wait=True, cancel_futures=True)  # its manager thread sees the workers gone and ends
        log.warning("stopped %d worker process(es)", len(workers))


def _die_with_parent(parent: int) -> None:
    """On Linux: have the kernel send this process SIGKILL when its parent ends, and end now if it has already."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker would outlive a killed parent", ctypes.get_errno())
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _start_worker(threads: int, parent: int) -> None:
    """A worker process's set-up: it dies with `parent` and ignores Ctrl-C (the parent stops it); its thread budget;
    INFO logs go to its runs' files, warnings to stderr."""
    import torch

    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)


def _in_worker(log_file: Path, function: Callable, args: tuple) -> Any:
    """Call ``function(*args)`` in a worker, its logs appended to `log_file`."""
    with log_to_file(log_file):
        return function(*args)


LOG_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_to_file(log_file: Path, *, prefix: str = "") -> Iterator[logging.Handler]:
    """Append every log record that reaches the root logger to `log_file` while the block runs; yields the handler.

    The file is opened with `amft_vlm.run.safe_io.open_for_append` (a FIFO or device there is refused, where a
    ``logging.FileHandler`` would block on it or write into it); its directory is made if missing. `prefix` starts
    every line (e.g. ``"rank 1 "`` when several processes append to one file).
    """
    output_directory(log_file.parent)
    stream = open_for_append(log_file)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(prefix + LOG_FILE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()
        stream.close()


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal: a stream handler on stderr or stdout (tqdm's redirect included)."""
    consoles = {id(stream) for stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) if stream is not None}
    return isinstance(handler, logging.StreamHandler) and id(getattr(handler, "stream", None)) in consoles


@contextlib.contextmanager
def quiet_console(level: int = logging.WARNING) -> Iterator[None]:
    """While the block runs, the root logger's console handlers show only records of `level` and above.

    INFO lines printed between a progress bar's updates break it up; a run's INFO lines belong in its log file
    (`log_to_file`). Handlers that do not write to the terminal (files, pytest's capture) keep their level.
    """
    quieted = [(handler, handler.level) for handler in logging.getLogger().handlers if _is_console(handler) and handler.level < level]
    for handler, _ in quieted:
        handler.setLevel(level)
    try:
        yield
    finally:
        for handler, previous in quieted:
            handler.setLevel(previous)

