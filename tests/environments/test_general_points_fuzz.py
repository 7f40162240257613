"""GeneralPoints-v0 under any answer text: property tests and pathological inputs.

Whatever the model writes, ``env.step`` must not raise, must return one of the rewards the
benchmark's table can produce (shared/spec/general-points.md), never below the documented floor
(``LOWEST_REWARD``, -34), and must keep its observation inside ``observation_space``. An answer
longer than ``MAX_ANSWER_CHARS`` is not read: -3, ``illegal_formula``. Correct answers built independently of the verifier (the solver's formulas,
random expression trees evaluated here with exact fractions) must score as the spec says.
Timing appears only as a generous sanity bound on pathological inputs: it catches a quadratic or
exponential blow-up, it makes no performance claim.
"""

from __future__ import annotations

import json
import multiprocessing
from fractions import Fraction
from functools import cache

import gymnasium as gym
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import environments  # noqa: F401  (registers GeneralPoints-v0)
from environments.general_points.cards import RANK_NAMES
from environments.general_points.solver import solvable_hands, solve
from environments.general_points.verifier import LOWEST_REWARD, MAX_ANSWER_CHARS

MODALITIES = ("language", "vision")
HAND = ["HA", "S3", "CK", "D6"]  # values 1, 3, 10, 6 under face-10
RANKS = ["A", "3", "K", "6"]
TARGET = 24
HANG_GUARD_S = 60.0
"""A step not returned by then is taken as hung (a guard against a suite that never ends, not a timing check:
steps take milliseconds, measured in the benchmarks)."""

FUZZ_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HAND_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIXED_REWARDS = {"correct": 5.0, "partial": 1.0, "no_solution": -1.0, "wrong_cards": -1.5, "out_of_attempts": -1.0}


@cache
def make_env(modality: str, face_cards: str = "10") -> gym.Env:
    """One shared environment per setting (made once: hypothesis steps it thousands of times)."""
    return gym.make("GeneralPoints-v0", modality=modality, face_cards=face_cards, resolution=64)


def is_table_reward(reward: float) -> bool:
    """+5, +1, -1, -1.5, or a sum of -3 per illegal formula / grammar violation and -2 per number penalty
    (<= -2), never below the floor."""
    return reward in (5.0, 1.0, -1.0, -1.5) or (LOWEST_REWARD <= reward <= -2.0 and reward == int(reward))


def is_penalty_sum(reward: float, grammar_violations_at_least: int) -> bool:
    """True if reward == -3 * k - 2 * m with k >= grammar_violations_at_least and m in 0..2."""
    return any(
        (-reward - 2 * m) % 3 == 0 and (-reward - 2 * m) // 3 >= grammar_violations_at_least for m in range(3)
    )


def check_step(modality: str, text: str, hand: list[str] = HAND, face_cards: str = "10") -> tuple[float, dict]:
    """Reset to ``hand``, step once with ``text``, and check everything that holds for any text."""
    env = make_env(modality, face_cards)
    observation, _ = env.reset(seed=0, options={"cards": hand})
    assert env.observation_space.contains(observation)
    observation, reward, terminated, truncated, info = env.step(text)
    assert isinstance(reward, float)
    assert is_table_reward(reward), reward
    assert env.observation_space["text"].contains(observation["text"]), observation["text"][:300]
    assert env.observation_space.contains(observation)
    assert truncated is False
    assert terminated is (info["verdict"] == "correct") is info["success"]
    verdict = info["verdict"]
    if verdict in FIXED_REWARDS:
        assert reward == FIXED_REWARDS[verdict], (verdict, reward)
    elif verdict in ("illegal_formula", "missing_formula"):
        assert reward == -3.0
    elif verdict == "wrong_numbers":
        assert reward in (-2.0, -4.0)
    else:
        assert verdict == "grammar_error", verdict
        assert is_penalty_sum(reward, grammar_violations_at_least=1), reward
    if modality == "language":
        assert verdict != "wrong_cards"
    return reward, info


def answer(formula: str, cards: list | None = None) -> str:
    """A strict-JSON answer naming the cards A 3 K 6 unless told otherwise."""
    return json.dumps({"cards": RANKS if cards is None else cards, "number": [1, 3, 10, 6], "formula": formula})


def codes_for(values: tuple[int, ...], face_cards: str, draw_rank, draw_suit) -> list[str]:
    """Card codes for a value multiset: under face-10 a 10 may be any of 10, J, Q, K."""
    codes = []
    for value in values:
        rank = draw_rank(value) if face_cards == "10" and value == 10 else value
        codes.append(draw_suit() + RANK_NAMES[rank - 1])
    return codes


# ---------------------------------------------------------------- strategies

formula_pieces = st.sampled_from(
    ["1", "3", "6", "10", "13", "0", "24", "8", "(", ")", "+", "-", "*", "/", "=", "=24", " ", "x", ".", "^", "00"]
)
formulas = st.one_of(
    st.lists(formula_pieces, max_size=25).map("".join),
    st.text(alphabet="0123456789+-*/()=", max_size=40),
    st.text(max_size=20),
)
card_names = st.one_of(
    st.sampled_from(["A", "3", "K", "6", "10", "T", "J", "Q", "King", "ace", "1", "13", "²", "٣", "３", ""]),
    st.integers(min_value=-3, max_value=20),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=8,
)


@st.composite
def jsonish_answers(draw) -> str:
    """A JSON answer with random cards, numbers and formula, possibly mangled the ways models mangle JSON."""
    cards = draw(st.one_of(st.just(RANKS), st.permutations(RANKS), st.lists(card_names, max_size=6), json_values))
    obj = {"cards": cards, "number": draw(st.one_of(st.just([1, 3, 10, 6]), json_values)), "formula": draw(formulas)}
    for key in draw(st.sets(st.sampled_from(["cards", "number", "formula"]), max_size=2)):
        del obj[key]
    if draw(st.booleans()):
        obj[draw(st.text(max_size=5))] = draw(json_values)
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    mangle = draw(st.sampled_from(["none", "trailing comma", "single quotes", "truncate", "prose", "fence", "doubled"]))
    if mangle == "trailing comma":
        text = text[:-1] + ",}"
    elif mangle == "single quotes":
        text = text.replace('"', "'")
    elif mangle == "truncate":
        text = text[: draw(st.integers(min_value=0, max_value=len(text)))]
    elif mangle == "prose":
        text = draw(st.text(max_size=20)) + text + draw(st.text(max_size=20))
    elif mangle == "fence":
        text = f"```json\n{text}\n```"
    elif mangle == "doubled":
        text = text + "\n" + text
    return text


@st.composite
def expression_trees(draw, values: tuple[int, ...]) -> tuple[str, Fraction | None]:
    """A formula using each value exactly once, every operation parenthesised, and its exact value (None: undefined)."""
    items: list[tuple[str, Fraction | None]] = [(str(v), Fraction(v)) for v in draw(st.permutations(values))]
    while len(items) > 1:
        i = draw(st.integers(min_value=0, max_value=len(items) - 2))
        operator = draw(st.sampled_from("+-*/"))
        (left_text, left), (right_text, right) = items[i], items[i + 1]
        if left is None or right is None or (operator == "/" and right == 0):
            value = None
        else:
            value = {"+": left + right, "-": left - right, "*": left * right, "/": left / right if right else None}[operator]
        items[i : i + 2] = [(f"({left_text}{operator}{right_text})", value)]
    return items[0]


hand_choices = st.one_of(
    st.tuples(st.just("10"), st.sampled_from(solvable_hands(TARGET, 4, 10))),
    st.tuples(st.just("11-12-13"), st.sampled_from([h for h in solvable_hands(TARGET, 4, 13) if max(h) > 10])),
)


@st.composite
def solvable_deals(draw) -> tuple[str, tuple[int, ...], list[str]]:
    """(face-card rule, values, card codes) of a random solvable hand."""
    face_cards, values = draw(hand_choices)
    codes = codes_for(
        values,
        face_cards,
        draw_rank=lambda _: draw(st.sampled_from([10, 11, 12, 13])),
        draw_suit=lambda: draw(st.sampled_from("SCHD")),
    )
    return face_cards, values, draw(st.permutations(codes))


def rank_names(codes: list[str]) -> list[str]:
    """The rank names an answer reports for card codes ('S10' -> '10')."""
    return [code[1:] for code in codes]


# ---------------------------------------------------------------- properties over any text


@pytest.mark.parametrize("modality", MODALITIES)
@FUZZ_SETTINGS
@given(text=st.text())
def test_any_text_gets_a_table_reward(modality, text):
    check_step(modality, text)


@pytest.mark.parametrize("modality", MODALITIES)
@FUZZ_SETTINGS
@given(text=st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "So", "Nd", "No", "Lo", "P"])))
def test_control_symbol_and_unicode_digit_text_gets_a_table_reward(modality, text):
    check_step(modality, text)


@pytest.mark.parametrize("modality", MODALITIES)
@FUZZ_SETTINGS
@given(text=jsonish_answers())
def test_jsonish_answers_get_a_table_reward(modality, text):
    check_step(modality, text)


@pytest.mark.parametrize("modality", MODALITIES)
@FUZZ_SETTINGS
@given(formula=formulas)
def test_any_formula_with_the_right_cards_gets_a_table_reward(modality, formula):
    reward, info = check_step(modality, answer(formula))
    assert info["verdict"] != "wrong_cards"
    assert info["verdict"] != "missing_formula"


@pytest.mark.parametrize("modality", MODALITIES)
@FUZZ_SETTINGS
@given(cards=st.lists(card_names, max_size=6))
def test_any_reported_cards_get_a_table_reward(modality, cards):
    check_step(modality, answer("10*3-6*1", cards=cards))


# ---------------------------------------------------------------- properties over correct and near-correct answers


@FUZZ_SETTINGS
@given(data=st.data(), deal=solvable_deals())
def test_expression_over_exactly_the_cards_scores_by_its_exact_value(data, deal):
    face_cards, values, codes = deal
    formula, value = data.draw(expression_trees(values))
    reward, info = check_step("language", answer(formula), codes, face_cards)
    assert reward == (5.0 if value == TARGET else -1.0), (formula, value, info["feedback"])


@FUZZ_SETTINGS
@given(data=st.data(), deal=solvable_deals())
def test_dropping_closing_parentheses_is_partial_exactly_when_the_whole_is_a_solution(data, deal):
    face_cards, values, codes = deal
    formula, value = data.draw(expression_trees(values))
    trailing = len(formula) - len(formula.rstrip(")"))
    dropped = data.draw(st.integers(min_value=1, max_value=trailing))
    reward, info = check_step("language", answer(formula[:-dropped]), codes, face_cards)
    assert reward == (1.0 if value == TARGET else -1.0), (formula[:-dropped], value, info["feedback"])


@pytest.mark.parametrize("modality", MODALITIES)
@HAND_SETTINGS
@given(deal=solvable_deals())
def test_expert_response_always_scores_five(modality, deal):
    face_cards, _, codes = deal
    env = make_env(modality, face_cards)
    env.reset(seed=0, options={"cards": codes})
    _, reward, terminated, _, info = env.step(env.unwrapped.expert_response())
    assert (reward, terminated, info["success"]) == (5.0, True, True), (codes, info["feedback"])


@HAND_SETTINGS
@given(deal=solvable_deals(), suffix=st.sampled_from(["", "=24"]))
def test_every_solver_formula_scores_five(deal, suffix):
    face_cards, values, codes = deal
    for modality in MODALITIES:
        for formula in solve(values, TARGET):
            reward, info = check_step(modality, answer(formula + suffix, cards=rank_names(codes)), codes, face_cards)
            assert reward == 5.0, (codes, formula, info["feedback"])


@HAND_SETTINGS
@given(deal=solvable_deals(), data=st.data())
def test_every_solver_formula_with_its_trailing_parentheses_dropped_is_partial(deal, data):
    face_cards, values, codes = deal
    for formula in solve(values, TARGET):
        trailing = len(formula) - len(formula.rstrip(")"))
        if trailing:
            dropped = data.draw(st.integers(min_value=1, max_value=trailing))
            reward, info = check_step("language", answer(formula[:-dropped]), codes, face_cards)
            assert reward == 1.0, (codes, formula[:-dropped], info["feedback"])


# ---------------------------------------------------------------- long answers: the length cap and the floor


@pytest.mark.parametrize("modality", MODALITIES)
@HAND_SETTINGS
@given(unit=st.lists(formula_pieces, min_size=1, max_size=6).map("".join), length=st.integers(0, 2 * MAX_ANSWER_CHARS))
def test_long_repeated_formulas_score_above_the_floor_or_as_too_long(modality, unit, length):
    text = answer((unit * (length // len(unit) + 1))[:length])
    reward, info = check_step(modality, text)
    if len(text) > MAX_ANSWER_CHARS:
        assert (reward, info["verdict"]) == (-3.0, "illegal_formula")
    assert reward >= LOWEST_REWARD == FLOOR


@pytest.mark.parametrize("modality", MODALITIES)
def test_an_answer_at_the_cap_is_read_and_one_character_more_is_not(modality):
    correct = answer(CORRECT)
    at_cap = correct + " " * (MAX_ANSWER_CHARS - len(correct))  # trailing whitespace keeps it strict JSON
    assert check_step(modality, at_cap)[0] == 5.0
    reward, info = check_step(modality, at_cap + " ")
    assert (reward, info["verdict"]) == (-3.0, "illegal_formula")
    assert f"{MAX_ANSWER_CHARS:,} characters" in info["feedback"]


# ---------------------------------------------------------------- pathological inputs, one by one


def _step_in_child(modality: str, text: str, connection) -> None:
    """Run in the forked child: one step, its outcome sent back through ``connection``."""
    env = make_env(modality)
    env.reset(seed=0, options={"cards": HAND})
    try:
        observation, reward, *_, info = env.step(text)
        in_space = env.observation_space.contains(observation)
        connection.send(("ok", reward, info["verdict"], in_space))
    except Exception as error:  # reported to the parent, which fails the test with it
        connection.send(("raised", repr(error)))


def bounded_step(modality: str, text: str) -> tuple[float, str]:
    """One step in a forked child, so that a runaway input fails the test instead of hanging the suite."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_step_in_child, args=(modality, text, sender))
    child.start()
    sender.close()
    try:
        if not receiver.poll(HANG_GUARD_S):
            pytest.fail(f"step did not return within {HANG_GUARD_S:.0f} s on a {len(text):,}-character input {text[:40]!r}...")
        try:
            result = receiver.recv()
        except EOFError:
            pytest.fail(f"the process died during step on {text[:60]!r}... (exit code {child.exitcode})")
    finally:
        if child.is_alive():
            child.kill()
        child.join()
    assert result[0] == "ok", f"step raised {result[1]} on {text[:60]!r}..."
    _, reward, verdict, in_space = result
    assert in_space
    assert is_table_reward(reward), reward
    return reward, verdict


MEGABYTE = 1_000_000
CORRECT = "10*3-6*1"
ANSWER_OVERHEAD = len(answer(""))
"""Characters of an answer besides its formula: a formula of MAX_ANSWER_CHARS - ANSWER_OVERHEAD characters fills the cap."""
FILL = MAX_ANSWER_CHARS - ANSWER_OVERHEAD
TOO_LONG = (-3.0, -3.0)
"""Rewards of an answer over the length cap in language and vision: not read, an illegal formula."""
FLOOR = -3.0 * 10 - 2.0 - 2.0

# name -> (text, reward in language, reward in vision)
PATHOLOGICAL = {
    "1 MB of letters": ("a" * MEGABYTE, *TOO_LONG),
    "1 MB of braces": ("{" * MEGABYTE, *TOO_LONG),
    "1 MB of repeated formula keys": ('"formula": "' * (MEGABYTE // 12), *TOO_LONG),
    "correct answer after 1 MB of prose": ("x" * MEGABYTE + answer(CORRECT), *TOO_LONG),
    "20 MB formula of +": (answer("+" * (20 * MEGABYTE)), *TOO_LONG),
    "1 MB formula of digits": (answer("9" * MEGABYTE), *TOO_LONG),
    "1 MB of non-ASCII": ("«ÿ€中文ДЖ\u200b\u202e\ufeff" * (MEGABYTE // 10), *TOO_LONG),
    "100,000 nested parentheses around a solution": (answer("(" * 100_000 + CORRECT + ")" * 100_000), *TOO_LONG),
    "100,000-digit number": (answer("9" * 100_000), *TOO_LONG),
    "letters up to the cap": ("a" * MAX_ANSWER_CHARS, -3.0, -1.5),
    "braces up to the cap": ("{" * MAX_ANSWER_CHARS, -3.0, -1.5),
    "open brackets up to the cap": ("[" * MAX_ANSWER_CHARS, -3.0, -1.5),
    "repeated formula keys up to the cap": ('"formula": "' * (MAX_ANSWER_CHARS // 12), -3.0, -1.5),
    "repeated unclosed cards keys up to the cap": ('"cards": [' * (MAX_ANSWER_CHARS // 10), -3.0, -1.5),
    "correct answer after prose up to the cap": ("x" * (FILL - len(CORRECT)) + answer(CORRECT), 5.0, 5.0),
    # Grammar violations count at most 10 times: -30, plus -2 for the unused cards.
    "formula of + up to the cap": (answer("+" * FILL), FLOOR + 2.0, FLOOR + 2.0),
    "formula of )( up to the cap": (answer(")(" * (FILL // 2)), FLOOR + 2.0, FLOOR + 2.0),
    "formula of *- up to the cap": (answer("*-" * (FILL // 2)), FLOOR + 2.0, FLOOR + 2.0),
    "formula of 1+1+... up to the cap": (answer("1+" * (FILL // 2)), -4.0, -4.0),
    "formula of digits up to the cap": (answer("1" * FILL), -4.0, -4.0),
    "formula of illegal characters up to the cap": (answer("x" * FILL), -3.0, -3.0),
    "formula of open parentheses up to the cap": (answer("(" * FILL), -2.0, -2.0),
    "nested parentheses around a solution up to the cap": (
        answer("(" * ((FILL - len(CORRECT)) // 2) + CORRECT + ")" * ((FILL - len(CORRECT)) // 2)),
        5.0,
        5.0,
    ),
    "unclosed ( before a solution up to the cap": (answer("(" * (FILL - len(CORRECT)) + CORRECT), 1.0, 1.0),
    "10,000 unclosed ( alone": (answer("(" * 10_000), -2.0, -2.0),
    # The first ')' breaks two rules (not after a number; nothing open), each later one the second rule;
    # only 10 count.
    "10,000 unmatched )": (answer(")" * 10_000), FLOOR + 2.0, FLOOR + 2.0),
    "the floor: 10,000 unmatched ) and a foreign number": (answer(")" * 10_000 + "0"), FLOOR, FLOOR),
    "exponent attack 9**9**9": (answer("9**9**9"), -3.0 * 2 - 2.0 - 2.0, -3.0 * 2 - 2.0 - 2.0),
    "division by zero of the cards": (answer("10/(6-6)*3*1"), -2.0, -2.0),
    "deeply nested cards list": (
        '{"cards": ' + "[" * 8_000 + "]" * 8_000 + f', "formula": "{CORRECT}"}}',
        5.0,
        -1.5,
    ),
    "deeply nested objects": ('{"a": ' * 2_000 + "1" + "}" * 2_000, -3.0, -1.5),
    "5,000-digit number in the formula": (answer("9" * 5_000), -4.0, -4.0),
    "5,000-digit number added to a solution": (answer(CORRECT + "+" + "0" * 5_000), -2.0, -2.0),
    "5,000-digit integer in the cards": ('{"cards": [' + "7" * 5_000 + f'], "formula": "{CORRECT}"}}', 5.0, -1.5),
    "NUL bytes alone": ("\x00" * 1_000, -3.0, -1.5),
    "NUL byte in the formula": (answer(CORRECT + "\x00"), -3.0, -3.0),
    "NUL byte in a card name": (answer(CORRECT, cards=["A\x00", "3", "K", "6"]), 5.0, -1.5),
    "emoji alone": ("\U0001f0cf\U0001f600" * 1_000, -3.0, -1.5),
    "emoji in the formula": (answer(CORRECT + "\U0001f600"), -3.0, -3.0),
    "playing-card emoji as cards": (answer(CORRECT, cards=["\U0001f0a1", "\U0001f0b3", "\U0001f0de", "\U0001f0c6"]), 5.0, -1.5),
    "full-width digits in the formula": (answer("\uff11\uff10*3-6*1"), -3.0, -3.0),
    "Arabic-Indic digits in the formula": (answer("\u0661\u0660*3-6*1"), -3.0, -3.0),
    "superscript digit as a card": (answer(CORRECT, cards=["A", "\u00b2", "K", "6"]), 5.0, -1.5),
    "lone surrogate escapes": ('{"cards": ["\\ud800"], "formula": "\\udfff"}', -3.0, -1.5),
    "non-ASCII everywhere": ("«ÿ€中文ДЖ\u200b\u202e\ufeff" * 1_000, -3.0, -1.5),
}


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("case", PATHOLOGICAL)
def test_pathological_input(modality, case):
    text, language_reward, vision_reward = PATHOLOGICAL[case]
    reward, verdict = bounded_step(modality, text)
    assert reward == (language_reward if modality == "language" else vision_reward), (case, verdict)
