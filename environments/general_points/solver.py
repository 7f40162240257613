"""Exact solver for GeneralPoints: which hands can make the target, and every formula that does.

All arithmetic is on :class:`fractions.Fraction`, so hands that need fractions (3, 3, 8, 8 ->
``8/(3-8/3)``) are found. Results are memoised per multiset of values: after the first call for a
hand, asking again costs a dictionary look-up.

Hands of up to 4 cards are small enough to list every solvable multiset (:func:`solvable_hands`) and
every formula (:func:`solve`). Larger hands are not: the number of formulas grows so fast that
listing them takes seconds at 5 cards and hours at 8. For those, :func:`find_solution` searches for
one formula, goal first, and stops after a fixed number of steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache, lru_cache
from itertools import combinations, combinations_with_replacement

from environments.splits import split_of_key

_ADD, _MUL, _ATOM = 1, 2, 3  # operator precedence of an expression's top level

SEARCH_STEPS = 20_000
"""Steps :func:`find_solution` may take on one hand by default: at most about 50 ms of Python on one core.

With target 24 the search finds a formula for every solvable hand of 5 values in 1..13, and for all
but one of 24,000 random hands of 5 to 8 cards (it usually needs fewer than 500 steps).
"""
_LOOKUP_SIZE = 3  # parts of up to this many values are answered from their cached sets of values


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
    if len(values) > 4:
        return _search(values, target, _SearchState(steps_left=None)) is not None
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
    """True if some formula with + - * / and parentheses, each number used once, equals target.

    Exact for any hand, but proving a hand of 6 or more numbers unsolvable can take seconds to
    minutes; :func:`find_solution` with a step limit is the bounded alternative.
    """
    values, goal = _validate(numbers, target)
    return _is_solvable(values, goal)


@cache
def solvable_hands(target: int = 24, num_cards: int = 4, max_value: int = 13) -> tuple[tuple[int, ...], ...]:
    """Every solvable multiset of ``num_cards`` values in 1..max_value, as sorted tuples, in order.

    Meant for hands of up to 4 cards (under a second); it checks every multiset, which takes minutes
    from 5 cards on.
    """
    return tuple(
        hand
        for hand in combinations_with_replacement(range(1, max_value + 1), num_cards)
        if _is_solvable(hand, Fraction(target))
    )


def _wrap(text: str, precedence: int, needed: int) -> str:
    return f"({text})" if precedence < needed else text


def _compose(operator: str, x: tuple[str, int], y: tuple[str, int]) -> tuple[str, int]:
    """The formula ``x <operator> y`` (each a (text, top-level precedence)), with minimal parentheses."""
    (xs, xp), (ys, yp) = x, y
    if operator == "+":
        return f"{xs}+{ys}", _ADD
    if operator == "-":
        return f"{xs}-{_wrap(ys, yp, _MUL)}", _ADD
    if operator == "*":
        return f"{_wrap(xs, xp, _MUL)}*{_wrap(ys, yp, _MUL)}", _MUL
    return f"{_wrap(xs, xp, _MUL)}/{_wrap(ys, yp, _ATOM)}", _MUL


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
                    for x_formula in x_texts:
                        for y_formula in y_texts:
                            table.setdefault(x + y, set()).add(_compose("+", x_formula, y_formula))
                            table.setdefault(x - y, set()).add(_compose("-", x_formula, y_formula))
                            table.setdefault(x * y, set()).add(_compose("*", x_formula, y_formula))
                            if y:
                                table.setdefault(x / y, set()).add(_compose("/", x_formula, y_formula))
    return {value: frozenset(texts) for value, texts in table.items()}


def _right_operands(x: Fraction, goal: Fraction, y_table: dict[Fraction, object]) -> Iterator[tuple[str, Fraction]]:
    """Every (operator, y) with y a key of y_table and ``x <operator> y == goal`` (y never 0 after ``/``)."""
    for operator, y in (("+", goal - x), ("-", x - goal)):
        if y in y_table:
            yield operator, y
    if x:
        if goal / x in y_table:
            yield "*", goal / x
        if goal and x / goal in y_table:
            yield "/", x / goal
    elif goal == 0:  # 0 * y and 0 / y are 0 for every y
        yield from (("*", y) for y in y_table)
        yield from (("/", y) for y in y_table if y)


@lru_cache(maxsize=4096)
def _solutions(values: tuple[int, ...], target: Fraction) -> tuple[str, ...]:
    # Only the target's formulas are built: the parts' tables are shared by every hand, the whole
    # hand's table (every value it can make, with every formula) would be built once per hand.
    if len(values) == 1:
        texts = {str(values[0])} if values[0] == target else set()
    else:
        texts = set()
        for left, right in _splits(values):
            left_table, right_table = _formulas(left), _formulas(right)
            for x_table, y_table in ((left_table, right_table), (right_table, left_table)):
                for x, x_texts in x_table.items():
                    for operator, y in _right_operands(x, target, y_table):
                        for x_formula in x_texts:
                            for y_formula in y_table[y]:
                                texts.add(_compose(operator, x_formula, y_formula)[0])
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
                    return _compose(operator, _witness(x_part, x), _witness(y_part, y))
    return None


def first_solution(numbers: Iterable[int], target: int = 24) -> str | None:
    """One formula that uses each number once and equals target, or None; much faster than :func:`solve`.

    Found by a guided search over reachable values (no enumeration of all formulas), and the same
    formula for the same multiset every time. Hands of more than 4 numbers go to :func:`find_solution`
    without a step limit.
    """
    values, goal = _validate(numbers, target)
    if len(values) > 4:
        return find_solution(values, target, max_steps=None)
    found = _witness(values, goal)
    return found[0] if found else None


class _OutOfSteps(Exception):
    """The bounded search used up its steps."""


@dataclass
class _SearchState:
    """Steps left to one search (None: no limit) and the (values, goal) it has shown impossible."""

    steps_left: int | None
    failed: set[tuple[tuple[int, ...], Fraction]] = field(default_factory=set)

    def take_step(self) -> None:
        if self.steps_left is not None:
            if self.steps_left == 0:
                raise _OutOfSteps
            self.steps_left -= 1


@lru_cache(maxsize=4096)
def _search_splits(values: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """The (smaller part, rest) cuts of the sorted values, cheapest first.

    Cuts whose rest is small enough to look up come first (then the search below them is one set
    look-up per candidate), the others by the size of the smaller part.
    """
    cuts = [(left, right) if len(left) <= len(right) else (right, left) for left, right in _splits(values)]
    return tuple(sorted(cuts, key=lambda cut: (len(cut[1]) > _LOOKUP_SIZE, len(cut[0]))))


@cache
def _sorted_reachable(values: tuple[int, ...]) -> tuple[Fraction, ...]:
    return tuple(sorted(_reachable(values)))


def _ordered_values(values: tuple[int, ...]) -> tuple[Fraction, ...]:
    """Every value the sorted values can make, in increasing order (a fixed order makes the search repeatable)."""
    if len(values) <= _LOOKUP_SIZE:
        return _sorted_reachable(values)
    return tuple(sorted(_reachable.__wrapped__(values)))  # parts of 4+ values are many and large: not kept


def _partner_goals(a: Fraction, goal: Fraction) -> Iterator[tuple[str, bool, Fraction]]:
    """(operator, a comes first, b) for every b such that ``a <operator> b`` or ``b <operator> a`` is goal."""
    yield "+", True, goal - a
    yield "-", True, a - goal
    yield "-", False, a + goal
    if a:
        yield "*", True, goal / a
        yield "/", False, a * goal
        if goal:
            yield "/", True, a / goal


def _search(values: tuple[int, ...], goal: Fraction, state: _SearchState) -> tuple[str, int] | None:
    """One (formula, top-level precedence) over the sorted values that equals goal, or None.

    Goal first: the last operator joins a smaller part (at most half the values) and the rest; for each value
    ``a`` the part can make and each operator, the rest must make the one partner that gives the
    goal, which is searched for the same way until the rest is small enough to look up. Each call is
    one step; :class:`_OutOfSteps` ends the search when ``state`` has none left.
    """
    state.take_step()
    if len(values) <= _LOOKUP_SIZE:
        return _witness(values, goal) if goal in _reachable(values) else None
    if (values, goal) in state.failed:
        return None
    for part, rest in _search_splits(values):
        for a in _ordered_values(part):
            if a == 0 and goal == 0:  # 0 * (anything the rest makes)
                return _compose("*", _witness(part, a), ("+".join(map(str, rest)), _ADD))
            for operator, part_first, b in _partner_goals(a, goal):
                found = _search(rest, b, state)
                if found is not None:
                    part_formula = _witness(part, a)
                    if part_first:
                        return _compose(operator, part_formula, found)
                    return _compose(operator, found, part_formula)
    state.failed.add((values, goal))
    return None


@lru_cache(maxsize=65536)
def _bounded_solution(values: tuple[int, ...], goal: Fraction, max_steps: int | None) -> str | None:
    try:
        found = _search(values, goal, _SearchState(steps_left=max_steps))
    except _OutOfSteps:
        return None
    return found[0] if found else None


def find_solution(numbers: Iterable[int], target: int = 24, max_steps: int | None = SEARCH_STEPS) -> str | None:
    """One formula that uses each number once and equals target, found within ``max_steps`` steps, or None.

    A depth-first search from the goal (see :data:`SEARCH_STEPS`); ``max_steps=None`` searches until
    it finds a formula or has shown there is none, which is exact but can take minutes for an
    unsolvable hand of 7 or 8 numbers. With a limit, None means the hand cannot make target *or* the
    search stopped first. Steps are counted, not timed, so the answer is the same on every machine.

    >>> find_solution([1, 2, 3, 4, 5, 6, 7, 8])
    '1+2+(8-6)*7-(5-3*4)'
    """
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None; got {max_steps!r}")
    values, goal = _validate(numbers, target)
    return _bounded_solution(values, goal, max_steps)


def hand_split(numbers: Iterable[int]) -> str:
    """'train', 'val' or 'test': the fixed split of a hand's value multiset, identical on every machine.

    The key is the multiset's sorted values written as text (``'1,3,6,10'``), and
    :func:`environments.splits.split_of_key` decides its side (about 70/10/20). The rule does not
    depend on the target or on which hands exist.
    """
    return split_of_key(",".join(str(int(n)) for n in sorted(numbers)))
