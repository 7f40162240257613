"""Reading a model's GeneralPoints answer and scoring it exactly as the benchmark does.

:func:`parse_response` turns any text into a :class:`ParsedAnswer`; :func:`judge` applies the
benchmark's checks in order and returns a :class:`Judgement` (reward, verdict, feedback). Neither
raises on any input, and the work is bounded: an answer longer than :data:`MAX_ANSWER_CHARS` is not
read at all (a megabyte of text would cost seconds), and at most :data:`MAX_COUNTED_GRAMMAR_VIOLATIONS`
grammar violations are penalised, so no answer scores below :data:`LOWEST_REWARD`. Everything else
is a linear scan of at most that many characters. The evaluator is iterative and exact (fractions).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from environments.answers import Judgement, json_object
from environments.general_points.cards import rank_from_name
from environments.general_points.solver import solve

REWARD_CORRECT = 5.0
REWARD_PARTIAL = 1.0
REWARD_NO_SOLUTION = -1.0
REWARD_WRONG_CARDS = -1.5
REWARD_ILLEGAL_FORMULA = -3.0
REWARD_GRAMMAR_VIOLATION = -3.0
REWARD_WRONG_NUMBERS = -2.0
REWARD_OUT_OF_ATTEMPTS = -1.0

MAX_ANSWER_CHARS = 16_384
"""Longest answer that is read. A correct answer takes about 100 characters; a longer one is not
parsed and scores :data:`REWARD_ILLEGAL_FORMULA` (verdict ``illegal_formula``), whatever it holds.
Equal to the ``max_length`` of GeneralPoints-v0's action space."""
MAX_COUNTED_GRAMMAR_VIOLATIONS = 10
"""Grammar violations beyond this many cost nothing more: the reference's -3 each had no floor
(a 20 MB run of ``+`` scored about -60 million)."""
LOWEST_REWARD = REWARD_GRAMMAR_VIOLATION * MAX_COUNTED_GRAMMAR_VIOLATIONS + 2 * REWARD_WRONG_NUMBERS
"""No answer scores below this (-34): the most grammar violations that count, plus both number penalties."""

VERDICTS = (
    "correct",
    "partial",
    "no_solution",
    "wrong_numbers",
    "grammar_error",
    "illegal_formula",
    "missing_formula",
    "wrong_cards",
    "out_of_attempts",
)
"""Every verdict name an answer can get, best first.

- ``correct`` (+5): the formula equals the target.
- ``partial`` (+1): it cannot be evaluated yet (open parentheses) but closing them solves the hand.
- ``no_solution`` (-1): a valid formula over the right numbers that misses the target.
- ``wrong_numbers`` (-2 or -4): numbers not on the cards, overused, or cards left unused.
- ``grammar_error`` (-3 per violation, at most 10 counted, plus any number penalty): misplaced
  operators or parentheses.
- ``illegal_formula`` (-3): characters other than digits, ``+ - * / ( )`` before the ``=``, or an
  answer longer than :data:`MAX_ANSWER_CHARS` (not read).
- ``missing_formula`` (-3): no ``"formula"`` string could be read from the answer.
- ``wrong_cards`` (-1.5, vision only): the reported cards are not the cards in the image.
- ``out_of_attempts`` (-1): an answer after the attempt budget is spent; it is not read.
"""

_MAX_NUMBER_DIGITS = 6  # longer digit runs are certainly not card values; never int() them
_LEGAL_CHARS = frozenset("0123456789+-*/()")
_OPERATORS = frozenset("+-*/")
_MAX_QUOTED_FORMULA = 300  # longest stretch of a formula quoted back in feedback
_PREFIX_HINT_MAX_CARDS = 4  # larger hands have too many solutions to list for the "its start ..." hint


@dataclass(frozen=True)
class ParsedAnswer:
    """What could be read from a response: each field is None when it was absent or unreadable.

    ``too_long`` is True when the response had more than :data:`MAX_ANSWER_CHARS` characters and
    was therefore not read (every field None).
    """

    cards: tuple[object, ...] | None
    numbers: tuple[object, ...] | None
    formula: str | None
    too_long: bool = False


_KEY = r"""["']{key}["']\s*:\s*"""
_FORMULA_PATTERN = re.compile(_KEY.format(key="formula") + r'"([^"]*)"')
_CARDS_KEY = re.compile(_KEY.format(key="cards") + r"\[")
_NUMBERS_KEY = re.compile(_KEY.format(key="number") + r"\[")


def _list_items(body: str) -> tuple[str, ...]:
    """Items of a bracketed list body read loosely: comma-separated, quotes stripped."""
    return tuple(item.strip().strip("'\"").strip() for item in body.split(",") if item.strip())


def _list_after(key: re.Pattern, text: str) -> tuple[str, ...] | None:
    """The items of the first ``key [ ... ]`` list in text, or None.

    A pattern like ``\\[([^\\]]*)\\]`` would rescan to the end of the text at every unclosed key
    (quadratic on a megabyte of them); the first key is enough, since if its list never closes no
    later one does either.
    """
    match = key.search(text)
    if match is None:
        return None
    end = text.find("]", match.end())
    return _list_items(text[match.end() : end]) if end >= 0 else None


def parse_response(text: str) -> ParsedAnswer:
    """Read cards, numbers and formula from a model's answer (never raises).

    Strict JSON first (the whole text, or the outermost ``{...}`` inside it); otherwise one regular
    expression per key, so a trailing comma or single-quoted card names still parse. The formula
    must be a double-quoted string in both cases. A text longer than :data:`MAX_ANSWER_CHARS` is not
    read: the result has ``too_long=True``.
    """
    if not isinstance(text, str):
        return ParsedAnswer(None, None, None)
    if len(text) > MAX_ANSWER_CHARS:
        return ParsedAnswer(None, None, None, too_long=True)
    obj = json_object(text)
    if obj is not None:
        formula = obj.get("formula")
        cards, numbers = obj.get("cards"), obj.get("number")
        return ParsedAnswer(
            cards=tuple(cards) if isinstance(cards, list) else None,
            numbers=tuple(numbers) if isinstance(numbers, list) else None,
            formula=formula if isinstance(formula, str) else None,
        )
    formula_match = _FORMULA_PATTERN.search(text)
    return ParsedAnswer(
        cards=_list_after(_CARDS_KEY, text),
        numbers=_list_after(_NUMBERS_KEY, text),
        formula=formula_match.group(1) if formula_match else None,
    )


def _tokens(expression: str) -> list[str]:
    """Split a legal expression (digits and ``+-*/()`` only) into numbers, operators and parentheses."""
    return re.findall(r"\d+|[-+*/()]", expression)


def _grammar_violations(tokens: list[str]) -> int:
    """How many of the benchmark's grammar rules the token sequence breaks (an unclosed '(' is allowed)."""
    violations, depth, previous = 0, 0, None
    for token in tokens:
        after_value = previous is not None and (previous[0].isdigit() or previous == ")")
        if token[0].isdigit():
            violations += after_value
        elif token in _OPERATORS:
            violations += not after_value
        elif token == "(":
            violations += not (previous is None or previous in _OPERATORS or previous == "(")
            depth += 1
        else:  # ")"
            violations += not after_value
            if depth == 0:
                violations += 1
            else:
                depth -= 1
        previous = token
    return violations


def _evaluate(tokens: list[str]) -> Fraction | None:
    """Exact value of a token sequence, or None if it is not a complete, defined expression.

    Shunting-yard with explicit stacks, so nesting depth costs memory, not recursion.
    """
    precedence = {"+": 1, "-": 1, "*": 2, "/": 2}
    values: list[Fraction] = []
    operators: list[str] = []

    def apply() -> bool:
        if len(values) < 2:
            return False
        right, left = values.pop(), values.pop()
        operator = operators.pop()
        if operator == "/" and right == 0:
            return False
        values.append({"+": left + right, "-": left - right, "*": left * right}[operator] if operator != "/" else left / right)
        return True

    expect_value = True
    for token in tokens:
        if token[0].isdigit():
            if not expect_value:
                return None
            values.append(Fraction(int(token)))
            expect_value = False
        elif token == "(":
            if not expect_value:
                return None
            operators.append(token)
        elif token == ")":
            if expect_value:
                return None
            while operators and operators[-1] != "(":
                if not apply():
                    return None
            if not operators:
                return None
            operators.pop()
        else:
            if expect_value:
                return None
            while operators and operators[-1] != "(" and precedence[operators[-1]] >= precedence[token]:
                if not apply():
                    return None
            operators.append(token)
            expect_value = True
    if expect_value:
        return None
    while operators:
        if operators[-1] == "(" or not apply():
            return None
    return values[0] if len(values) == 1 else None


def _card_ranks_match(reported: tuple[object, ...] | None, true_ranks: list[int]) -> bool:
    if reported is None:
        return False
    ranks = [rank_from_name(name) for name in reported]
    return None not in ranks and Counter(ranks) == Counter(true_ranks)


def _number_penalty(tokens: list[str], card_values: list[int]) -> tuple[float, list[str]]:
    """The -2 penalties for numbers not on the cards / overused, and for unused cards, with reasons."""
    available = Counter(card_values)
    used: Counter[int] = Counter()
    foreign: list[str] = []
    for token in tokens:
        if not token[0].isdigit():
            continue
        if len(token) > _MAX_NUMBER_DIGITS or int(token) not in available:
            foreign.append(token[:_MAX_NUMBER_DIGITS] + ("..." if len(token) > _MAX_NUMBER_DIGITS else ""))
        else:
            used[int(token)] += 1
    overused = sorted(value for value, count in used.items() if count > available[value])
    unused = sorted(value for value, count in available.items() if used[value] < count)
    penalty, reasons = 0.0, []
    if foreign:
        penalty += REWARD_WRONG_NUMBERS
        reasons.append(f"it uses numbers that are not on the cards: {', '.join(dict.fromkeys(foreign[:10]))}")
    elif overused:
        penalty += REWARD_WRONG_NUMBERS
        reasons.append(f"it uses {', '.join(map(str, overused))} more often than the cards allow")
    if unused:
        penalty += REWARD_WRONG_NUMBERS
        reasons.append(f"it leaves out {', '.join(map(str, unused))}, and every card must be used once")
    return penalty, reasons


def _longest_solution_prefix(expression: str, solutions: list[str]) -> str:
    best = 0
    for solution in solutions:
        common = 0
        for a, b in zip(expression, solution, strict=False):
            if a != b:
                break
            common += 1
        best = max(best, common)
    return expression[:best]


def _quote(expression: str) -> str:
    if len(expression) <= _MAX_QUOTED_FORMULA:
        return expression
    return expression[:_MAX_QUOTED_FORMULA] + "..."


def judge(
    answer: ParsedAnswer,
    *,
    card_values: list[int],
    card_ranks: list[int],
    target: int,
    check_cards: bool,
) -> Judgement:
    """Score one parsed answer with the benchmark's checks, in the benchmark's order.

    0. An answer too long to read (``answer.too_long``): -3 as an illegal formula, in either modality.
    1. ``check_cards`` (vision): the reported ranks must be the hand's ranks as a multiset, else -1.5.
    2. The formula before ``=`` may hold only digits and ``+ - * / ( )``, else -3 (no formula: -3).
    3. Each grammar violation: -3, at most :data:`MAX_COUNTED_GRAMMAR_VIOLATIONS` of them.
    4. Numbers: -2 for foreign/overused, -2 for unused.
    5. With no penalty: +5 if it equals the target exactly; +1 if only closing its open parentheses
       would make it a solution. 6. Otherwise -1, naming the longest start that leads to a solution
       (hands of up to 4 cards; larger hands have too many solutions to list).
    """
    if answer.too_long:
        return Judgement(
            REWARD_ILLEGAL_FORMULA,
            "illegal_formula",
            f"The answer is longer than {MAX_ANSWER_CHARS:,} characters, so it was not read. "
            "Reply with the JSON object alone.",
        )
    if check_cards and not _card_ranks_match(answer.cards, card_ranks):
        return Judgement(REWARD_WRONG_CARDS, "wrong_cards", "The cards you reported are not the cards in the image. Look again and read each card's rank.")
    if answer.formula is None:
        return Judgement(
            REWARD_ILLEGAL_FORMULA,
            "missing_formula",
            'No formula could be read. Answer with a JSON object whose "formula" is a double-quoted string.',
        )
    expression = answer.formula.split("=", 1)[0]
    if not expression or not _LEGAL_CHARS.issuperset(expression):
        return Judgement(
            REWARD_ILLEGAL_FORMULA,
            "illegal_formula",
            "The formula may contain only digits, + - * / and parentheses, with no spaces or other symbols.",
        )
    tokens = _tokens(expression)
    grammar_violations = _grammar_violations(tokens)
    number_penalty, number_reasons = _number_penalty(tokens, card_values)
    penalty = REWARD_GRAMMAR_VIOLATION * min(grammar_violations, MAX_COUNTED_GRAMMAR_VIOLATIONS) + number_penalty
    if penalty:
        reasons = list(number_reasons)
        if grammar_violations:
            reasons.insert(0, f"it is not a well-formed expression ({grammar_violations} misplaced operator, number or parenthesis)")
        verdict = "grammar_error" if grammar_violations else "wrong_numbers"
        return Judgement(penalty, verdict, f"The formula {_quote(expression)} is wrong: " + "; ".join(reasons) + ".")
    value = _evaluate(tokens)
    if value == target:
        return Judgement(REWARD_CORRECT, "correct", f"Correct: {_quote(expression)} = {target}.")
    if value is None:
        open_parentheses = expression.count("(") - expression.count(")")
        if open_parentheses > 0 and _evaluate(tokens + [")"] * open_parentheses) == target:
            return Judgement(
                REWARD_PARTIAL,
                "partial",
                f"The formula {_quote(expression)} is unfinished, but it is the start of a solution. Finish it.",
            )
    result = f"it equals {_format_fraction(value)}" if value is not None else "it cannot be evaluated"
    if len(card_values) > _PREFIX_HINT_MAX_CARDS:
        hint = ""
    else:
        prefix = _longest_solution_prefix(expression, solve(card_values, target))
        hint = f" Its start {prefix} can still lead to a solution." if prefix else " No solution starts like it."
    return Judgement(REWARD_NO_SOLUTION, "no_solution", f"The formula {_quote(expression)} does not make {target}: {result}.{hint}")


def _format_fraction(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
