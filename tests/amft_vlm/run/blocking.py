"""`never_blocks`: fail a test at once when the code under it waits on a FIFO instead of refusing it."""

from __future__ import annotations

import contextlib
import signal


class Blocked(Exception):
    """Raised by `never_blocks` when its time runs out (not an OSError or ValueError: no reader or command may catch it)."""


@contextlib.contextmanager
def never_blocks(seconds: float):
    """Fail with `Blocked` instead of waiting when the code inside blocks longer than `seconds` (a FIFO's open or read)."""

    def expire(signum, frame):
        raise Blocked(f"still waiting after {seconds} s: something opened or read a FIFO")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
