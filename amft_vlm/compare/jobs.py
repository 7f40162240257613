"""The comparison's jobs: tasks run in this process (one job) or in a pool of spawned processes (``--jobs N``).

Each worker process has ``threads`` torch threads and logs each task to its run's ``RUN/compare.log``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from amft_vlm.demo import torch_threads


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

