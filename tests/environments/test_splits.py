"""The shared train/val/test rule: its shares, its fixed values, and that its test side is the old rule's."""

import hashlib
from collections import Counter

import pytest

from environments.splits import SPLITS, TEST_SHARE_PERCENT, VAL_SHARE_PERCENT, split_of_key, split_shares

KEYS = [f"key-{index}" for index in range(20_000)]


def old_test_rule(key: str) -> bool:
    """The train/test rule before val existed, written out independently: bucket < 20 is test."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100 < 20


def test_splits_and_shares() -> None:
    assert SPLITS == ("all", "train", "val", "test")
    assert (TEST_SHARE_PERCENT, VAL_SHARE_PERCENT) == (20, 10)
    assert split_shares() == "about 70% train, 10% val and 20% test"


def test_shares_are_near_70_10_20() -> None:
    counts = Counter(split_of_key(key) for key in KEYS)
    assert set(counts) == {"train", "val", "test"}
    shares = {split: count / len(KEYS) for split, count in counts.items()}
    assert shares["train"] == pytest.approx(0.70, abs=0.015)
    assert shares["val"] == pytest.approx(VAL_SHARE_PERCENT / 100, abs=0.01)
    assert shares["test"] == pytest.approx(TEST_SHARE_PERCENT / 100, abs=0.01)


def test_test_side_is_exactly_the_old_rule() -> None:
    # Held-out numbers stay comparable: val is carved out of the old train side only.
    assert all((split_of_key(key) == "test") == old_test_rule(key) for key in KEYS)


def test_split_is_pinned() -> None:
    # SHA-256 is fixed, so these hold on every machine and must never change.
    assert [split_of_key(key) for key in ("1,3,6,10", "3,3,8,8", "4,4,10,10", "metro|0.0,0.0;0.0,60.0")] == [
        "val",
        "train",
        "test",
        "train",
    ]
