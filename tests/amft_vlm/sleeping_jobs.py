"""``python -m tests.amft_vlm.sleeping_jobs DIR``: a `JobPool` of two workers, each in a task that sleeps for ten
minutes after writing its pid to ``DIR/worker-PID``; stopped as ``amft-vlm compare`` is (SIGTERM like Ctrl-C), it
exits with the command line's status. Run by the signal tests in test_jobs.py."""

import os
import sys
import time
from pathlib import Path

from amft_vlm.run.jobs import JobPool, interrupt_exit_status, sigterm_as_interrupt

SLEEP_SECONDS = 600.0


def sleep_in_worker(directory: Path) -> None:
    """A task: say which process runs it, then sleep."""
    (directory / f"worker-{os.getpid()}").touch()
    time.sleep(SLEEP_SECONDS)


def main(directory: Path) -> int:
    try:
        with sigterm_as_interrupt(), JobPool(2, 1) as pool:
            futures = [pool.submit(sleep_in_worker, directory, log_file=directory / f"task-{task}.log") for task in range(2)]
            for future in futures:
                future.result()
    except KeyboardInterrupt as interrupt:
        return interrupt_exit_status(interrupt)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
