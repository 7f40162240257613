"""Jobs and threads: tasks run in this process (one job) or in a pool of spawned processes, and the torch
thread budget they get.

`JobPool` runs ``amft-vlm compare --jobs N`` and the demo's runs side by side: each worker process has
``threads`` torch threads and logs each task to a file of its run. `choose_threads` picks the thread count
from the cores other processes leave free (measured from ``/proc/stat``): on a shared machine one busy
core makes two threads much slower than one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


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


class JobPool:
    """Runs tasks in this process (one job: at once, on `submit`) or in a pool of spawned processes."""

    def __init__(self, jobs: int, threads: int) -> None:
        self.jobs, self.threads = jobs, threads
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.thread_budget = contextlib.ExitStack()

    def __enter__(self) -> JobPool:
        if self.jobs == 1:
            self.thread_budget.enter_context(torch_threads(self.threads))
        return self

    def submit(self, function: Callable, *args: Any, log_file: Path) -> concurrent.futures.Future:
        """Run ``function(*args)``: now in this process, or in a worker that logs to `log_file`."""
        if self.jobs == 1:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(function(*args))  # an error propagates at once, before later tasks start
            return future
        if self.pool is None:  # spawned, not forked: a fork of a process with torch's thread pools running can hang
            self.pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(self.threads,)
            )
        return self.pool.submit(_in_worker, log_file, function, args)

    def __exit__(self, kind, error, traceback) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=error is not None)
        self.thread_budget.close()


def _start_worker(threads: int) -> None:
    """A worker process's set-up: its thread budget; INFO logs go to its runs' files, warnings to stderr."""
    import torch

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
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        return function(*args)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()

