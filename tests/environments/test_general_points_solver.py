"""The exact solver: the spec's solvability counts, formula correctness, the train/val/test split."""

import hashlib
from fractions import Fraction

import pytest

from environments.general_points.solver import (
    SEARCH_STEPS,
    _formulas,
    find_solution,
    first_solution,
    hand_split,
    is_solvable,
    solvable_hands,
    solve,
)
from environments.general_points.verifier import _evaluate, _tokens


def exact_value(formula: str) -> Fraction | None:
    return _evaluate(_tokens(formula))


def numbers_used(formula: str) -> list[int]:
    return sorted(int(token) for token in _tokens(formula) if token.isdigit())


def test_solvable_counts_match_the_spec():
    assert len(solvable_hands(24, 4, 10)) == 566
    assert len(list(solvable_hands(24, 4, 13))) == 1362
    assert sum(1 for hand in solvable_hands(24, 4, 13) if max(hand) > 10) == 796


def test_fraction_hands_are_solvable():
    assert is_solvable([3, 3, 8, 8])
    assert solve([3, 3, 8, 8]) == ["8/(3-8/3)"]
    assert is_solvable([1, 5, 5, 5])  # 5*(5-1/5)
    assert not is_solvable([1, 1, 1, 1])


def test_is_solvable_ignores_order_and_handles_other_targets():
    assert is_solvable([8, 3, 8, 3]) == is_solvable([3, 3, 8, 8])
    assert is_solvable([1, 2], target=3)
    assert not is_solvable([1, 1], target=3)
    assert is_solvable([0, 5], target=0)


@pytest.mark.parametrize("hand", [(1, 3, 6, 10), (3, 3, 8, 8), (2, 11, 12, 13), (1, 1, 4, 6), (4, 4, 10, 10)])
def test_every_formula_is_exact_uses_each_number_once_and_is_distinct(hand):
    formulas = solve(hand)
    assert formulas, hand
    assert len(formulas) == len(set(formulas))
    for formula in formulas:
        assert exact_value(formula) == 24, formula
        assert numbers_used(formula) == sorted(hand), formula
        assert " " not in formula


def test_every_solvable_hand_has_a_verified_first_solution():
    for hand in solvable_hands(24, 4, 13):
        formula = first_solution(hand)
        assert exact_value(formula) == 24 and numbers_used(formula) == list(hand), (hand, formula)
    assert first_solution([1, 1, 1, 1]) is None


def test_solve_matches_solvability_on_all_face_ten_hands():
    for hand in solvable_hands(24, 4, 10):
        assert solve(hand), hand
    assert solve([1, 1, 1, 1]) == []


HAND_SPLIT_SIZES = {10: {"train": 376, "val": 57, "test": 133}, 13: {"train": 943, "val": 129, "test": 290}}
"""Solvable multisets per split for face_cards="10" (values up to 10) and "11-12-13" (up to 13)."""


@pytest.mark.parametrize("max_value", [10, 13])
def test_split_is_disjoint_covers_all_and_is_about_70_10_20(max_value):
    hands = solvable_hands(24, 4, max_value)
    by_split = {split: {hand for hand in hands if hand_split(hand) == split} for split in ("train", "val", "test")}
    assert not by_split["train"] & by_split["val"] and not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    assert by_split["train"] | by_split["val"] | by_split["test"] == set(hands)
    assert {split: len(split_hands) for split, split_hands in by_split.items()} == HAND_SPLIT_SIZES[max_value]
    assert 0.15 < len(by_split["test"]) / len(hands) < 0.25 and 0.06 < len(by_split["val"]) / len(hands) < 0.14


@pytest.mark.parametrize("max_value", [10, 13])
def test_test_hands_are_those_of_the_old_train_test_rule(max_value):
    def old_bucket(hand):
        return int.from_bytes(hashlib.sha256(",".join(map(str, hand)).encode()).digest()[:8], "big") % 100

    hands = solvable_hands(24, 4, max_value)
    assert {hand for hand in hands if hand_split(hand) == "test"} == {hand for hand in hands if old_bucket(hand) < 20}
    assert {hand for hand in hands if hand_split(hand) == "val"} == {hand for hand in hands if 20 <= old_bucket(hand) < 30}


def test_split_is_fixed_across_machines_and_orderings():
    # Pinned values: the split is a function of the sorted values' text, identical everywhere.
    assert hand_split([1, 3, 6, 10]) == hand_split([10, 6, 3, 1])
    pinned = {hand: hand_split(hand) for hand in [(1, 3, 6, 10), (3, 3, 8, 8), (4, 4, 10, 10), (1, 2, 3, 4)]}
    assert pinned == {(1, 3, 6, 10): "val", (3, 3, 8, 8): "train", (4, 4, 10, 10): "test", (1, 2, 3, 4): "test"}


@pytest.mark.parametrize("hand", [(1, 3, 6, 10), (3, 3, 8, 8), (2, 11, 12, 13), (1, 1, 4, 6), (4, 4, 10, 10), (1, 2, 3, 4)])
@pytest.mark.parametrize("target", [24, 0, 10])
def test_solve_builds_exactly_the_target_formulas_of_the_full_table(hand, target):
    # solve() builds only the target's formulas; the full table of every value must agree with it.
    full_table = {text for text, _ in _formulas(hand).get(Fraction(target), ())}
    assert set(solve(hand, target)) == full_table


def test_five_card_solvable_count_is_pinned():
    # Checked against the exhaustive search over reachable values that preceded the goal-first search.
    assert len(solvable_hands(24, 5, 10)) == 1961


HARD_HANDS = [
    ((1, 8, 9, 9, 10), 24, False),  # needs the whole search to show it unsolvable
    ((9, 9, 9, 10, 10, 10), 24, False),
    ((1, 1, 1, 1, 1, 1, 1, 1), 24, False),  # at most (1+1+1)*(1+1+1)*(1+1) = 18
    ((1, 2, 3, 4, 5), 1000, False),
    ((1, 9, 9, 10, 10, 10), 24, True),
    ((1, 2, 3, 4, 5, 6, 7, 8), 24, True),
    ((13, 13, 13, 13, 13, 13, 13, 13), 0, True),
    ((2, 3, 4, 5, 6, 7, 8, 9), -24, True),
]


@pytest.mark.parametrize(("hand", "target", "solvable"), HARD_HANDS)
def test_find_solution_is_exact_without_a_limit(hand, target, solvable):
    assert is_solvable(hand, target) == solvable
    formula = find_solution(hand, target, max_steps=None)
    assert (formula is not None) == solvable
    if formula is not None:
        assert exact_value(formula) == target and numbers_used(formula) == sorted(hand), formula


def test_find_solution_formulas_are_exact_for_hands_of_five_to_eight():
    hands = [tuple(sorted((seed * 7 + i * 5) % 13 + 1 for i in range(size))) for size in (5, 6, 7, 8) for seed in range(12)]
    for hand in hands:
        formula = find_solution(hand)
        if formula is None:
            assert len(hand) == 5 and not is_solvable(hand), hand
        else:
            assert exact_value(formula) == 24 and numbers_used(formula) == list(hand), (hand, formula)


def test_find_solution_counts_steps_not_time():
    hand = (1, 1, 1, 1, 1, 1, 1, 1)
    assert find_solution(hand, max_steps=SEARCH_STEPS) is None
    assert find_solution((1, 2, 3, 4, 5, 6, 7, 8), max_steps=1) is None  # stopped before any formula
    assert find_solution((1, 2, 3, 4, 5, 6, 7, 8)) == find_solution((8, 7, 6, 5, 4, 3, 2, 1)) == "1+2+(8-6)*7-(5-3*4)"
    assert first_solution([1, 2, 3, 4, 5, 6, 7, 8]) == "1+2+(8-6)*7-(5-3*4)"


@pytest.mark.parametrize("max_steps", [0, -1, True, 1.5, "100"])
def test_find_solution_rejects_a_bad_step_limit(max_steps):
    with pytest.raises(ValueError, match="max_steps must be a positive integer or None"):
        find_solution([1, 2, 3, 4, 5], max_steps=max_steps)
