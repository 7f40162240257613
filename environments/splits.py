"""The fixed train / val / test split shared by both environments: a function of one canonical key.

Each environment writes a task's identity as a canonical text key (GeneralPoints: the hand's
sorted values, :func:`environments.general_points.solver.hand_split`; VIRL: the route's city and
points, :func:`environments.virl.routes.route_split`) and :func:`split_of_key` maps it to a side:

- ``"test"``, about :data:`TEST_SHARE_PERCENT` %: kept for reported held-out evaluation; never
  train or tune on it.
- ``"val"``, about :data:`VAL_SHARE_PERCENT` %: for tuning and controllers, such as AMFT's
  meta-gradient validation episodes, so that what steers training never sees the test tasks.
- ``"train"``, the rest.

The three are disjoint and together make up every task (``"all"``). The rule depends only on the
key: not on the order of tasks, on which other tasks exist, or on the machine.
"""

from __future__ import annotations

import hashlib

SPLITS = ("all", "train", "val", "test")
"""Splits an environment can draw from: every task, or one side of :func:`split_of_key`."""
TEST_SHARE_PERCENT = 20
"""About this share of the tasks belongs to the test split (buckets 0..19)."""
VAL_SHARE_PERCENT = 10
"""About this share of the tasks belongs to the val split (buckets 20..29)."""


def split_of_key(key: str) -> str:
    """``"test"``, ``"val"`` or ``"train"``: the fixed side of a task with canonical identity ``key``.

    The key (UTF-8) is hashed with SHA-256 and its bucket is the first 8 bytes as a big-endian
    integer modulo 100. Buckets below :data:`TEST_SHARE_PERCENT` are test (the rule of the original
    train/test split, so its test tasks are unchanged), the next :data:`VAL_SHARE_PERCENT` are val
    (taken from what used to be train), the rest train.
    """
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    if bucket < TEST_SHARE_PERCENT:
        return "test"
    if bucket < TEST_SHARE_PERCENT + VAL_SHARE_PERCENT:
        return "val"
    return "train"


def split_shares() -> str:
    """The shares in words, for error messages: ``"about 70% train, 10% val and 20% test"``."""
    train_share = 100 - TEST_SHARE_PERCENT - VAL_SHARE_PERCENT
    return f"about {train_share}% train, {VAL_SHARE_PERCENT}% val and {TEST_SHARE_PERCENT}% test"
