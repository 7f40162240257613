"""GeneralPoints-v0 rewards, case by case, as the benchmark spec states them (shared/spec/general-points.md).

Every case goes through the public interface (``gym.make`` / ``reset`` / ``step``) and checks the
exact reward, the verdict, the episode flags, ``attempts_left`` and ``success``, in both modalities
where the case applies. In vision the answers name the right cards so that they get past the -1.5
card check; in language modality the card check is skipped.
"""

from __future__ import annotations

import json
import re

import gymnasium as gym
import pytest

import environments  # noqa: F401  (registers GeneralPoints-v0)
from environments.general_points.verifier import LOWEST_REWARD, MAX_ANSWER_CHARS

MODALITIES = ("language", "vision")
HAND = ["HA", "S3", "CK", "D6"]
"""Values 1, 3, 10, 6 under the face-10 rule; 1, 3, 13, 6 under face-11-12-13."""
RANKS = ["A", "3", "K", "6"]
MAX_ATTEMPTS = 5


def make_env(modality: str, **kwargs) -> gym.Env:
    """A GeneralPoints-v0 environment with a small image, so that vision cases stay fast."""
    return gym.make("GeneralPoints-v0", modality=modality, resolution=64, **kwargs)


def answer(formula: str, cards: list | None = None, numbers: list | None = None) -> str:
    """A well-formed JSON answer (strict JSON) for the default hand unless told otherwise."""
    return json.dumps(
        {"cards": RANKS if cards is None else cards, "number": [1, 3, 10, 6] if numbers is None else numbers, "formula": formula}
    )


def assert_observation_ok(env: gym.Env, observation: dict) -> None:
    """The observation, and its text in particular, lies in the environment's observation space."""
    assert env.observation_space["text"].contains(observation["text"]), observation["text"][:200]
    assert env.observation_space.contains(observation)


def start(env: gym.Env, hand: list[str] | None = None) -> dict:
    """Reset to a fixed hand (A 3 K 6 by default) and check the starting info."""
    observation, info = env.reset(seed=0, options={"cards": HAND if hand is None else hand})
    assert_observation_ok(env, observation)
    assert info["attempts_left"] == MAX_ATTEMPTS and info["success"] is False
    return info


def step(env: gym.Env, text: str) -> tuple[float, bool, bool, dict]:
    """Step once and check what holds after every step; return (reward, terminated, truncated, info)."""
    observation, reward, terminated, truncated, info = env.step(text)
    assert_observation_ok(env, observation)
    assert isinstance(reward, float)
    assert set(info) == {"cards", "numbers", "target", "attempts_left", "verdict", "feedback", "success"}
    if info["verdict"] != "correct":
        assert info["feedback"] and info["feedback"] in observation["text"], "the next message must say why it failed"
    return reward, terminated, truncated, info


def first_step(modality: str, text: str, hand: list[str] | None = None, **kwargs) -> tuple[float, bool, bool, dict]:
    """The outcome of ``text`` as the first answer of a fresh episode."""
    env = make_env(modality, **kwargs)
    start(env, hand)
    return step(env, text)


def assert_failed_first_attempt(terminated: bool, truncated: bool, info: dict) -> None:
    """A failed first attempt leaves the episode running with one attempt spent."""
    assert (terminated, truncated) == (False, False)
    assert info["attempts_left"] == MAX_ATTEMPTS - 1
    assert info["success"] is False


def without(feedback: str, formula: str) -> str:
    """The feedback with the quoted formula removed, so a number found in it was named on purpose."""
    return feedback.replace(formula, "")


# (formula, reward, verdicts accepted): cases that apply to both modalities, for the hand A 3 K 6 (1, 3, 10, 6).
FORMULA_CASES = {
    "correct": ("10*3-6*1=24", 5.0, {"correct"}),
    "correct without =24": ("10*3-6*1", 5.0, {"correct"}),
    "correct with redundant parentheses": ("((10*3)-(6*1))=24", 5.0, {"correct"}),
    "spaces": ("10 * 3 - 6 * 1 = 24", -3.0, {"illegal_formula"}),
    "one space before =": ("10*3-6*1 =24", -3.0, {"illegal_formula"}),
    "x for times": ("10x3-6x1=24", -3.0, {"illegal_formula"}),
    "caret": ("10*3-6^1", -3.0, {"illegal_formula"}),
    "decimal point": ("10*3-6*1.0", -3.0, {"illegal_formula"}),
    "illegal characters and bad numbers: only -3": ("10*3 - 7", -3.0, {"illegal_formula"}),
    # The spec counts a missing formula as the -3 "illegal formula"; an empty one may be named either way.
    "empty formula": ("", -3.0, {"illegal_formula", "missing_formula"}),
    "only =24": ("=24", -3.0, {"illegal_formula", "missing_formula"}),
    "missing number (equals 24 anyway)": ("10*3-6", -2.0, {"wrong_numbers"}),
    "extra number not on the cards (equals 24 anyway)": ("10*3-6*1+0", -2.0, {"wrong_numbers"}),
    "repeated number (equals 24 anyway)": ("10*3-6*1*1", -2.0, {"wrong_numbers"}),
    "foreign number and an unused card": ("10*3-6+0", -4.0, {"wrong_numbers"}),
    "overused number and an unused card": ("10*3-6*6/6", -4.0, {"wrong_numbers"}),
    "foreign, or else overused: counted once": ("10*3-6*1*1+0", -2.0, {"wrong_numbers"}),
    "no numbers at all": ("()", -3.0 - 2.0, {"grammar_error"}),
    "operator after operator": ("10*3-6**1", -3.0, {"grammar_error"}),
    "leading operator": ("-1+10*3-6", -3.0, {"grammar_error"}),
    "number right after )": ("(10*3-6)1", -3.0, {"grammar_error"}),
    "( right after a number": ("3(10-6*1)", -3.0, {"grammar_error"}),
    ") right after an operator": ("(10*3-6*1+)", -3.0, {"grammar_error"}),
    "empty parentheses": ("10*3-6*1+()", -3.0, {"grammar_error"}),
    ") with no open (": ("10*3-6*1)", -3.0, {"grammar_error"}),
    "two violations of one rule": ("10*3--6**1", -6.0, {"grammar_error"}),
    "two violations of two rules": ("(10*3-)6*1", -6.0, {"grammar_error"}),
    # A leading ')' is not after a number and has no open '('; the 10 after it is a number after ')'.
    "three violations": (")10*3-6*1", -9.0, {"grammar_error"}),
    "grammar plus an unused card": ("10**3-6", -3.0 - 2.0, {"grammar_error"}),
    "grammar plus both number penalties": ("10**3-6+0", -3.0 - 2.0 - 2.0, {"grammar_error"}),
    "ten violations": ("+" * 10 + "10*3-6*1", -30.0, {"grammar_error"}),
    "eleven violations count as ten": ("+" * 11 + "10*3-6*1", -30.0, {"grammar_error"}),
    # 13 from the ')'s (the first breaks two rules), 1 for the number after ')', then 0 is foreign and every card unused.
    "the floor: ten violations and both number penalties": (")" * 12 + "0", -34.0, {"grammar_error"}),
    "unclosed ( that closing solves": ("(10*3-6*1", 1.0, {"partial"}),
    "two unclosed ( that closing solves": ("((10*3-6)*1", 1.0, {"partial"}),
    "unclosed ( that closing does not solve": ("(10*3-6+1", -1.0, {"no_solution"}),
    "trailing operator": ("10*3-6*1+", -1.0, {"no_solution"}),
    "valid formula with the wrong value": ("10*3-6-1", -1.0, {"no_solution"}),
}


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("case", FORMULA_CASES)
def test_formula_reward_table(modality, case):
    formula, expected_reward, verdicts = FORMULA_CASES[case]
    reward, terminated, truncated, info = first_step(modality, answer(formula))
    assert reward == expected_reward, (case, info["feedback"])
    assert info["verdict"] in verdicts
    if expected_reward == 5.0:
        assert (terminated, truncated, info["success"], info["attempts_left"]) == (True, False, True, MAX_ATTEMPTS - 1)
    else:
        assert_failed_first_attempt(terminated, truncated, info)


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("length", [MAX_ANSWER_CHARS + 1, 5_000_000])
def test_an_answer_over_the_length_cap_is_an_illegal_formula(modality, length):
    correct = answer("10*3-6*1=24")
    reward, terminated, truncated, info = first_step(modality, correct + " " * (length - len(correct)))
    assert (reward, info["verdict"]) == (-3.0, "illegal_formula")
    assert "not read" in info["feedback"]
    assert_failed_first_attempt(terminated, truncated, info)


def test_no_answer_scores_below_the_floor():
    assert LOWEST_REWARD == -34.0
    assert min(reward for _, reward, _ in FORMULA_CASES.values()) == LOWEST_REWARD


FRACTION_HAND = ["S3", "C3", "S8", "C8"]


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize(
    ("formula", "expected_reward", "verdict"),
    [
        ("8/(3-8/3)", 5.0, "correct"),  # needs exact fractions; the reference scored it as wrong
        ("8/(3-8/3)=24", 5.0, "correct"),
        ("8/(3-8/3", 1.0, "partial"),
        ("8/(3-3)*8", -1.0, "no_solution"),  # division by zero cannot be evaluated
        ("8*3", -2.0, "wrong_numbers"),  # one -2 however many cards are unused
    ],
)
def test_hand_that_needs_fractions(modality, formula, expected_reward, verdict):
    text = answer(formula, cards=["3", "3", "8", "8"], numbers=[3, 3, 8, 8])
    reward, terminated, _, info = first_step(modality, text, FRACTION_HAND)
    assert (reward, info["verdict"], terminated) == (expected_reward, verdict, expected_reward == 5.0)


@pytest.mark.parametrize(
    "cards",
    [
        [3, 3, 8, 8],  # bare integers: the reference rejected these
        ["3", "3", "8", "8"],
        [8, "3", 3, "8"],  # mixed and in another order: a multiset comparison
    ],
)
def test_vision_accepts_bare_and_quoted_rank_names(cards):
    reward, terminated, _, info = first_step("vision", answer("8/(3-8/3)", cards=cards), FRACTION_HAND)
    assert (reward, info["verdict"], terminated, info["success"]) == (5.0, "correct", True, True)


@pytest.mark.parametrize(
    ("hand", "cards", "formula"),
    [
        (HAND, ["6", "K", "3", "A"], "10*3-6*1"),
        (HAND, ["A", 3, "K", 6], "10*3-6*1"),
        (HAND, [1, 3, 13, 6], "10*3-6*1"),  # documented: 1 = A, 13 = K
        (HAND, ["Ace", "3", "King", "6"], "10*3-6*1"),  # documented full names
        (["S10", "C3", "HK", "DA"], ["T", "3", "K", "A"], "10+10+1+3"),
        (["S10", "C3", "HK", "DA"], ["10", "3", "K", "A"], "10+10+1+3"),
    ],
)
def test_vision_accepts_other_documented_spellings(hand, cards, formula):
    reward, _, _, info = first_step("vision", answer(formula, cards=cards), hand)
    assert (reward, info["verdict"]) == (5.0, "correct")


@pytest.mark.parametrize(
    ("cards", "formula"),
    [
        (["A", "3", "Q", "6"], "10*3-6*1"),  # Q has K's value under face-10 but is another card
        (["A", "3", "K"], "10*3-6*1"),
        (["A", "3", "K", "6", "2"], "10*3-6*1"),
        (["A", "3", "K", "K"], "10*3-6*1"),
        ([1, 3, 10, 6], "10*3-6*1"),  # the values, not the ranks: 10 is not K
        (["A", "3", "Ace", "6"], "10*3-6*1"),
        ([], "10*3-6*1"),
        (["A", "3", "Q", "6"], "10 x 3 - 6 x 1 = 99"),  # nothing else is checked
        (["A", "3", "Q", "6"], ")(**"),
        (["A", "3", "Q", "6"], "10*3-6"),
    ],
)
def test_vision_wrong_cards_cost_one_and_a_half_and_nothing_else(cards, formula):
    reward, terminated, truncated, info = first_step("vision", answer(formula, cards=cards))
    assert (reward, info["verdict"]) == (-1.5, "wrong_cards")
    assert info["feedback"]
    assert_failed_first_attempt(terminated, truncated, info)


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"number": [1, 3, 10, 6], "formula": "10*3-6*1"}),
        json.dumps({"cards": "A 3 K 6", "formula": "10*3-6*1"}),
        json.dumps({"cards": None, "formula": "10*3-6*1"}),
    ],
)
def test_vision_missing_or_malformed_cards_are_wrong_cards(text):
    reward, _, _, info = first_step("vision", text)
    assert (reward, info["verdict"]) == (-1.5, "wrong_cards")


@pytest.mark.parametrize(
    "text",
    [
        answer("10*3-6*1", cards=["Q", "Q", "Q", "Q"]),
        answer("10*3-6*1", cards=[]),
        json.dumps({"formula": "10*3-6*1=24"}),
    ],
)
def test_language_skips_the_card_check(text):
    reward, terminated, _, info = first_step("language", text)
    assert (reward, info["verdict"], terminated) == (5.0, "correct", True)


@pytest.mark.parametrize("modality", MODALITIES)
def test_number_field_is_not_scored(modality):
    reward, _, _, info = first_step(modality, answer("10*3-6*1", numbers=[9, 9, 9, 9]))
    assert (reward, info["verdict"]) == (5.0, "correct")


NO_FORMULA_TEXTS = {
    "no JSON at all": "The answer is 10*3-6*1=24.",
    "empty string": "",
    "whitespace": " \n\t ",
    "JSON without formula": json.dumps({"cards": RANKS, "number": [1, 3, 10, 6]}),
    "formula not a string": json.dumps({"cards": RANKS, "formula": 24}),
    "JSON list": json.dumps([RANKS, "10*3-6*1"]),
}


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("case", NO_FORMULA_TEXTS)
def test_no_readable_formula(modality, case):
    text = NO_FORMULA_TEXTS[case]
    reward, terminated, truncated, info = first_step(modality, text)
    has_cards = '"cards": ["A", "3", "K", "6"]' in text
    if modality == "vision" and not has_cards:
        assert (reward, info["verdict"]) == (-1.5, "wrong_cards")
    else:
        assert (reward, info["verdict"]) == (-3.0, "missing_formula")
    assert_failed_first_attempt(terminated, truncated, info)


REGEX_FALLBACK_TEXTS = {
    "trailing comma": '{"cards": ["A", "3", "K", "6"], "number": [1, 3, 10, 6], "formula": "10*3-6*1=24",}',
    "single-quoted card names": "{\"cards\": ['A', '3', 'K', '6'], \"number\": [1, 3, 10, 6], \"formula\": \"10*3-6*1=24\"}",
    "single quotes everywhere but the formula": "{'cards': ['A', '3', 'K', '6'], 'number': [1, 3, 10, 6], 'formula': \"10*3-6*1\"}",
    "unclosed object": '{"cards": ["A", "3", "K", "6"], "number": [1, 3, 10, 6], "formula": "10*3-6*1=24"',
    "prose around the object": 'Sure! {"cards": ["A", "3", "K", "6"], "number": [1, 3, 10, 6], "formula": "10*3-6*1"} Done.',
    "markdown fence": '```json\n{"cards": ["A", "3", "K", "6"],\n "number": [1, 3, 10, 6],\n "formula": "10*3-6*1=24"}\n```',
}


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("case", REGEX_FALLBACK_TEXTS)
def test_regex_fallback_still_reads_the_answer(modality, case):
    reward, terminated, _, info = first_step(modality, REGEX_FALLBACK_TEXTS[case])
    assert (reward, info["verdict"], terminated, info["success"]) == (5.0, "correct", True, True)


@pytest.mark.parametrize("modality", MODALITIES)
def test_formula_must_be_in_double_quotes(modality):
    text = "{\"cards\": [\"A\", \"3\", \"K\", \"6\"], \"number\": [1, 3, 10, 6], \"formula\": '10*3-6*1=24'}"
    reward, terminated, truncated, info = first_step(modality, text)
    assert (reward, info["verdict"]) == (-3.0, "missing_formula")  # the cards were read: no -1.5 in vision
    assert_failed_first_attempt(terminated, truncated, info)


@pytest.mark.parametrize("modality", MODALITIES)
def test_sixth_answer_is_not_verified_and_truncates(modality):
    env = make_env(modality)
    start(env)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        reward, terminated, truncated, info = step(env, answer("10*3-6-1"))
        assert (reward, info["verdict"], terminated, truncated, info["success"]) == (-1.0, "no_solution", False, False, False)
        assert info["attempts_left"] == MAX_ATTEMPTS - attempt
    reward, terminated, truncated, info = step(env, answer("10*3-6*1=24"))  # correct, but too late
    assert (reward, info["verdict"], terminated, truncated) == (-1.0, "out_of_attempts", False, True)
    assert (info["attempts_left"], info["success"]) == (0, False)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(answer("10*3-6*1=24"))


@pytest.mark.parametrize("modality", MODALITIES)
def test_success_on_the_fifth_attempt_terminates(modality):
    env = make_env(modality)
    start(env)
    rewards = [step(env, answer(formula))[0] for formula in ["10*3-6", "10 * 3", "", "(10*3-6+1"]]
    assert rewards == [-2.0, -3.0, -3.0, -1.0]
    reward, terminated, truncated, info = step(env, answer("10*3-6*1"))
    assert (reward, info["verdict"], terminated, truncated, info["success"], info["attempts_left"]) == (
        5.0,
        "correct",
        True,
        False,
        True,
        0,
    )
    with pytest.raises(RuntimeError, match="reset"):
        env.step(answer("10*3-6*1"))


@pytest.mark.parametrize("modality", MODALITIES)
def test_success_on_the_first_attempt_ends_the_episode_and_reset_starts_another(modality):
    env = make_env(modality)
    start(env)
    reward, terminated, _, info = step(env, answer("10*3-6*1"))
    assert (reward, terminated, info["attempts_left"]) == (5.0, True, MAX_ATTEMPTS - 1)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(answer("10*3-6*1"))
    start(env)
    assert step(env, answer("10*3-6*1"))[0] == 5.0


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_failure_kind_uses_one_attempt(modality):
    env = make_env(modality)
    start(env)
    texts = ["", "{", answer("1 0"), answer("10**3"), answer("(10*3-6+1")]
    for attempts_left, text in zip(range(MAX_ATTEMPTS - 1, -1, -1), texts, strict=True):
        _, terminated, truncated, info = step(env, text)
        assert (terminated, truncated, info["attempts_left"]) == (False, False, attempts_left)
    assert step(env, "")[2] is True


def test_step_before_reset_raises_a_clear_error():
    env = make_env("language")
    with pytest.raises((RuntimeError, gym.error.Error), match="reset"):
        env.step(answer("10*3-6*1"))


@pytest.mark.parametrize("modality", MODALITIES)
def test_feedback_names_unused_foreign_and_overused_numbers(modality):
    _, _, _, info = first_step(modality, answer("10*3-1"))
    assert re.search(r"\b6\b", without(info["feedback"], "10*3-1")), info["feedback"]
    _, _, _, info = first_step(modality, answer("10*3-6*1+7"))
    assert re.search(r"\b7\b", without(info["feedback"], "10*3-6*1+7")), info["feedback"]
    _, _, _, info = first_step(modality, answer("10*3-6*6/6"))
    remainder = without(info["feedback"], "10*3-6*6/6")
    assert re.search(r"\b6\b", remainder) and re.search(r"\b1\b", remainder), info["feedback"]


@pytest.mark.parametrize("modality", MODALITIES)
def test_feedback_names_the_longest_prefix_of_a_solution(modality):
    _, _, _, info = first_step(modality, answer("10*3-6-1"))
    assert info["verdict"] == "no_solution"
    assert "10*3-6" in without(info["feedback"], "10*3-6-1"), info["feedback"]


@pytest.mark.parametrize("modality", MODALITIES)
def test_larger_hands_use_the_same_table_and_name_no_solution_start(modality):
    hand, cards, numbers = ["HA", "S2", "C3", "D4", "H5", "S6"], ["A", "2", "3", "4", "5", "6"], [1, 2, 3, 4, 5, 6]
    env = make_env(modality, num_cards=6)
    env.reset(seed=0, options={"cards": hand})
    reward, _, _, info = step(env, answer("1+2+3+4+5+6", cards=cards, numbers=numbers))
    assert (reward, info["verdict"]) == (-1.0, "no_solution")
    assert "start" not in info["feedback"], info["feedback"]
    assert step(env, answer("1+2+3+4", cards=cards, numbers=numbers))[0] == -2.0
    reward, terminated, _, info = step(env, answer("1*2*3*4*(6-5)", cards=cards, numbers=numbers))
    assert (reward, terminated, info["verdict"]) == (5.0, True, "correct")


@pytest.mark.parametrize("modality", MODALITIES)
def test_rule_ood_counts_j_q_k_as_11_12_13(modality):
    reward, _, _, info = first_step(modality, answer("(1+13-6)*3"), face_cards="11-12-13")
    assert info["numbers"] == [1, 3, 13, 6]
    assert (reward, info["verdict"]) == (5.0, "correct")
    reward, _, _, info = first_step(modality, answer("10*3-6*1"), face_cards="11-12-13")
    assert (reward, info["verdict"]) == (-4.0, "wrong_numbers")  # 10 is not on the cards, 13 unused
    cards = ["J", "Q", "2", "A"]
    reward, _, _, info = first_step(modality, answer("11+12+2-1", cards=cards), ["SJ", "CQ", "H2", "DA"], face_cards="11-12-13")
    assert info["numbers"] == [11, 12, 2, 1]
    assert (reward, info["verdict"]) == (5.0, "correct")


@pytest.mark.parametrize("modality", MODALITIES)
def test_face_ten_counts_j_q_k_as_10(modality):
    reward, _, _, info = first_step(modality, answer("(1+13-6)*3"))
    assert info["numbers"] == [1, 3, 10, 6]
    assert (reward, info["verdict"]) == (-4.0, "wrong_numbers")
    cards = ["J", "Q", "K", "6"]
    reward, _, _, info = first_step(modality, answer("10+10+10-6", cards=cards), ["SJ", "CQ", "HK", "D6"])
    assert info["numbers"] == [10, 10, 10, 6]
    assert (reward, info["verdict"]) == (5.0, "correct")


def test_rule_ood_hands_always_hold_a_face_card_and_face_ten_hands_stay_within_ten():
    ood, in_distribution = make_env("language", face_cards="11-12-13"), make_env("language")
    for seed in range(30):
        _, info = ood.reset(seed=seed)
        assert any(value > 10 for value in info["numbers"]) and max(info["numbers"]) <= 13, info
        _, info = in_distribution.reset(seed=seed)
        assert max(info["numbers"]) <= 10 and min(info["numbers"]) >= 1, info
