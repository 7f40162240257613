"""Exact solver for GeneralPoints: which hands can make the target, and every formula that does.

All arithmetic is on :class:`fractions.Fraction`, so hands that need fractions (3, 3, 8, 8 ->
``8/(3-8/3)``) are found. Results are memoised per multiset of values: after the first call for a
hand, asking again costs a dictionary look-up, so environments never search during ``reset``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction
from functools import cache, lru_cache
from itertools import combinations, combinations_with_replacement

from environments.splits import split_of_key

_ADD, _MUL, _ATOM = 1, 2, 3  # operator precedence of an expression's top level


def _splits(values: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every way to cut a sorted multiset into two non-empty parts, each unordered pair once."""
    n = len(values)
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for size in range(1, n // 2 + 1):
        for picked in combinations(range(n), size):
            left = tuple(values[i] for i in picked)
            right = tuple(values[i] for i in range(n) if i not in picked)
            key = (left, right) if left <= right else (right, left)
            if key not in seen:
                seen.add(key)
                yield key


def _combine(a: Fraction, b: Fraction) -> Iterator[Fraction]:
    """Every value one operator makes from a and b, in either order."""
    yield a + b
    yield a - b
    yield b - a
    yield a * b
    if b:
        yield a / b
    if a:
        yield b / a


@cache
def _reachable(values: tuple[int, ...]) -> frozenset[Fraction]:
    """All values a formula using each of the (sorted) values exactly once can take."""
    if len(values) == 1:
        return frozenset((Fraction(values[0]),))
    found: set[Fraction] = set()
    for left, right in _splits(values):
        right_values = _reachable(right)
        for a in _reachable(left):
            for b in right_values:
                found.update(_combine(a, b))
    return frozenset(found)


def _partners(a: Fraction, target: Fraction) -> Iterator[Fraction]:
    """Every b such that some operator applied to a and b (either order) gives target."""
    yield target - a  # a + b
    yield a - target  # a - b
    yield a + target  # b - a
    if a:  # a = 0 would need b = 0 in both divisions: 0/0 is no number
        yield target / a  # a * b
        if target:
            yield a / target  # a / b
        yield a * target  # b / a


def _validate(numbers: Iterable[int], target: int) -> tuple[tuple[int, ...], Fraction]:
    values = tuple(sorted(int(n) for n in numbers))
    if not values:
        raise ValueError("numbers must hold at least one card value; got an empty hand")
    return values, Fraction(target)


@cache
def _is_solvable(values: tuple[int, ...], target: Fraction) -> bool:
    if len(values) == 1:
        return values[0] == target
    # The last operator joins two parts; look up the partner each value of the smaller part needs
    # instead of building every value of the whole hand.
    for left, right in _splits(values):
        right_values = _reachable(right)
        for a in _reachable(left):
            if a == 0 and target == 0:
                return True  # 0 * anything
            if any(b in right_values for b in _partners(a, target)):
                return True
    return False


def is_solvable(numbers: Iterable[int], target: int = 24) -> bool:
    """True if some formula with + - * / and parentheses, each number used once, equals target."""
    values, goal = _validate(numbers, target)
    return _is_solvable(values, goal)


@cache
def solvable_hands(target: int = 24, num_cards: int = 4, max_value: int = 13) -> tuple[tuple[int, ...], ...]:
    """Every solvable multiset of ``num_cards`` values in 1..max_value, as sorted tuples, in order."""
    return tuple(
        hand
        for hand in combinations_with_replacement(range(1, max_value + 1), num_cards)
        if _is_solvable(hand, Fraction(target))
    )


def _wrap(text: str, precedence: int, needed: int) -> str:
    return f"({text})" if precedence < needed else text


@cache
def _formulas(values: tuple[int, ...]) -> dict[Fraction, frozenset[tuple[str, int]]]:
    """Value -> every (formula text, top-level precedence) over the sorted values, minimal parentheses."""
    if len(values) == 1:
        return {Fraction(values[0]): frozenset({(str(values[0]), _ATOM)})}
    table: dict[Fraction, set[tuple[str, int]]] = {}
    for left, right in _splits(values):
        left_table, right_table = _formulas(left), _formulas(right)
        for x_table, y_table in ((left_table, right_table), (right_table, left_table)):
            for x, x_texts in x_table.items():
                for y, y_texts in y_table.items():
                    for xs, xp in x_texts:
                        for ys, yp in y_texts:
                            table.setdefault(x + y, set()).add((f"{xs}+{ys}", _ADD))
                            table.setdefault(x - y, set()).add((f"{xs}-{_wrap(ys, yp, _MUL)}", _ADD))
                            table.setdefault(x * y, set()).add((f"{_wrap(xs, xp, _MUL)}*{_wrap(ys, yp, _MUL)}", _MUL))
                            if y:
                                table.setdefault(x / y, set()).add((f"{_wrap(xs, xp, _MUL)}/{_wrap(ys, yp, _ATOM)}", _MUL))
    return {value: frozenset(texts) for value, texts in table.items()}


@lru_cache(maxsize=4096)
def _solutions(values: tuple[int, ...], target: Fraction) -> tuple[str, ...]:
    texts = {text for text, _ in _formulas(values).get(target, ())}
    return tuple(sorted(texts, key=lambda text: (len(text), text)))


def solve(numbers: Iterable[int], target: int = 24) -> list[str]:
    """Every distinct formula (minimal parentheses, no spaces) that uses each number once and equals target.

    Formulas that differ only by operand order (``3*8`` and ``8*3``) are distinct; redundant
    parentheses are never written. Shortest first, then alphabetical. Empty if the hand is unsolvable.

    >>> solve([3, 3, 8, 8])
    ['8/(3-8/3)']
    """
    values, goal = _validate(numbers, target)
    return list(_solutions(values, goal))


def _apply(operator: str, a: Fraction, b: Fraction) -> Fraction | None:
    if operator == "/":
        return a / b if b else None
    return {"+": a + b, "-": a - b, "*": a * b}[operator]


@lru_cache(maxsize=65536)
def _witness(values: tuple[int, ...], goal: Fraction) -> tuple[str, int] | None:
    """One (formula, top-level precedence) over the sorted values that equals goal, or None."""
    if len(values) == 1:
        return (str(values[0]), _ATOM) if values[0] == goal else None
    for left, right in _splits(values):
        left_values, right_values = _reachable(left), _reachable(right)
        for x_part, x_values, y_part, y_values in ((left, left_values, right, right_values), (right, right_values, left, left_values)):
            for x in sorted(x_values):
                for operator in "+-*/":
                    # Solve x <operator> y = goal for y, then check that y is reachable.
                    if operator == "+":
                        y = goal - x
                    elif operator == "-":
                        y = x - goal
                    elif operator == "*":
                        y = goal / x if x else None
                    else:
                        y = x / goal if goal and x else None
                    if y is None or y not in y_values or _apply(operator, x, y) != goal:
                        continue
                    xs, xp = _witness(x_part, x)
                    ys, yp = _witness(y_part, y)
                    if operator == "+":
                        return f"{xs}+{ys}", _ADD
                    if operator == "-":
                        return f"{xs}-{_wrap(ys, yp, _MUL)}", _ADD
                    if operator == "*":
                        return f"{_wrap(xs, xp, _MUL)}*{_wrap(ys, yp, _MUL)}", _MUL
                    return f"{_wrap(xs, xp, _MUL)}/{_wrap(ys, yp, _ATOM)}", _MUL
    return None


def first_solution(numbers: Iterable[int], target: int = 24) -> str | None:
    """One formula that uses each number once and equals target, or None; much faster than :func:`solve`.

    Found by a guided search over reachable values (no enumeration of all formulas), and the same
    formula for the same multiset every time.
    """
    values, goal = _validate(numbers, target)
    found = _witness(values, goal)
    return found[0] if found else None


def hand_split(numbers: Iterable[int]) -> str:
    """'train', 'val' or 'test': the fixed split of a hand's value multiset, identical on every machine.

    The key is the multiset's sorted values written as text (``'1,3,6,10'``), and
    :func:`environments.splits.split_of_key` decides its side (about 70/10/20). The rule does not
    depend on the target or on which hands exist.
    """
    return split_of_key(",".join(str(int(n)) for n in sorted(numbers)))
