"""Reading a model's V-IRL answer and scoring it as the benchmark does.

:func:`parse_response` reads the three fields of the answer from any text; :func:`judge` compares
the action with the expected one and the intersection claim with the truth. Neither raises on any
input: a 1 MB string or 10,000 nested braces cost a bounded, linear scan and end in a penalty.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from environments.answers import Judgement, json_object

REWARD_CORRECT = 1.0
REWARD_WRONG_ACTION = -1.0
REWARD_WRONG_OBSERVATION = -1.5
REWARD_OUT_OF_ATTEMPTS = -1.0

VERDICTS = ("correct", "wrong_action", "no_action", "wrong_observation", "out_of_attempts")
"""Every verdict name an answer can get, best first.

- ``correct`` (+1): the action equals the expected one (after normalising spaces and quotes).
- ``wrong_action`` (-1): a readable action that is not the expected one.
- ``no_action`` (-1): no action could be read from the answer (not JSON, no ``"action"`` key, ...).
- ``wrong_observation`` (-1.5): the action is wrong or missing and the answer's ``"current observation"``
  claims an intersection where there is none, or denies one where there is one.
- ``out_of_attempts`` (-1): an answer after the attempts at this point are spent; it is not read.
"""

RESPONSE_KEYS = ("current observation", "current instruction", "action")
"""The JSON keys the model is asked for."""

MAX_RESPONSE_CHARS = 16_384
"""Longest answer that is read (the action space's ``max_length``); a longer one is not parsed at all and
scores as ``no_action`` (-1), so any input costs a bounded amount of work."""
MAX_FIELD_CHARS = 2000
"""Longest field value the fallback reader takes; longer values are cut there."""
_MAX_ACTION_CHARS = 200  # an action is a few dozen characters; anything longer is wrong anyway
_MAX_CLAIM_CHARS = 4000  # the intersection claim is read from this much of the observation
_NEGATION_WINDOW = 4  # words before "intersection" that may negate it
_NEGATIONS = frozenset({"no", "not", "without", "never", "none", "nor", "neither", "nothing", "cannot", "isnt", "arent"})
_QUOTE_CHARS = "\"'`\u2018\u2019\u201c\u201d\u00ab\u00bb"
_STRIP_QUOTES = str.maketrans("", "", _QUOTE_CHARS)
_SAFE_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation + " ")


@dataclass(frozen=True)
class ParsedResponse:
    """What could be read from an answer: each field is None when it was absent or unreadable."""

    observation: str | None
    instruction: str | None
    action: str | None
    too_long: bool = False
    """The answer had more than `MAX_RESPONSE_CHARS` characters and was not read."""


def _field_pattern(key: str) -> re.Pattern[str]:
    # Quoted key, then a double-quoted, single-quoted or bare value; every repetition is bounded so
    # no input can make the search backtrack more than a constant per position.
    name = r"[ _]".join(key.split())
    limit = MAX_FIELD_CHARS
    return re.compile(
        rf"""["']{name}["']\s{{0,20}}:\s{{0,20}}(?:"([^"\n]{{0,{limit}}})"|'([^'\n]{{0,{limit}}})'|([^,\n{{}}"'\s][^,\n{{}}"']{{0,{limit}}}))""",
        re.IGNORECASE,
    )


_FIELD_PATTERNS = {key: _field_pattern(key) for key in RESPONSE_KEYS}
_CLAUSE_SPLIT = re.compile(r"[.;:!?,\n()\[\]]")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _normalized_key(key: object) -> str:
    return " ".join(str(key).replace("_", " ").lower().split())


def parse_response(text: object) -> ParsedResponse:
    """Read the current observation, current instruction and action from a model's answer (never raises).

    Strict JSON first (the whole text, or the outermost ``{...}`` in it, trailing commas tolerated;
    keys matched case-insensitively, ``_`` for space allowed); otherwise one bounded regular
    expression per quoted key, accepting a double-quoted, single-quoted or bare value.
    Non-string values count as unreadable.
    """
    if not isinstance(text, str):
        return ParsedResponse(None, None, None)
    if len(text) > MAX_RESPONSE_CHARS:
        return ParsedResponse(None, None, None, too_long=True)
    obj = json_object(text)
    if obj is not None:
        fields = {_normalized_key(key): value for key, value in obj.items()}
        values = [fields.get(key) for key in RESPONSE_KEYS]
        return ParsedResponse(*(value if isinstance(value, str) else None for value in values))
    found: list[str | None] = []
    for key in RESPONSE_KEYS:
        match = _FIELD_PATTERNS[key].search(text)
        found.append(None if match is None else next(group for group in match.groups() if group is not None))
    return ParsedResponse(*found)


def normalize_action(action: str) -> str:
    """An action with quotes removed, whitespace runs collapsed to one space, and no space around parentheses.

    ``' turn_direction( "slightly  left" ) '`` -> ``'turn_direction(slightly left)'``. Case is kept:
    the comparison is otherwise exact, as in the benchmark.
    """
    text = " ".join(action[:_MAX_ACTION_CHARS].translate(_STRIP_QUOTES).split())
    return re.sub(r" ?([()]) ?", r"\1", text)


def claims_intersection(observation: str) -> bool:
    """Whether an observation text claims that the walker is at an intersection.

    The rule: the text claims an intersection when some mention of the word "intersection" (any
    case, plural too) is not negated, where a mention is negated if one of the 4 words before it
    in the same clause is a negation ("no", "not", "without", "never", "none", "nor", "neither",
    "nothing", "cannot" or any word ending in "n't"). Clauses end at ``. ; : ! ? ,``, brackets and
    line breaks. So "No landmarks nearby; You observe an intersection" claims one, "there is no
    intersection here" and "I don't see an intersection" do not, and a text that never mentions
    an intersection denies one.
    """
    lowered = observation[:_MAX_CLAIM_CHARS].lower().replace("\u2019", "'")
    for clause in _CLAUSE_SPLIT.split(lowered):
        if "intersection" not in clause:
            continue
        words = _WORD.findall(clause)
        for index, word in enumerate(words):
            if not word.startswith("intersection"):
                continue
            before = words[max(0, index - _NEGATION_WINDOW) : index]
            if not any(w in _NEGATIONS or w.endswith("n't") for w in before):
                return True
    return False


def quote_for_feedback(text: str, limit: int = 60) -> str:
    """``text`` made safe to echo back: printable ASCII only (others become '?'), at most ``limit`` characters."""
    cut = text[: limit + 1]
    safe = "".join(ch if ch in _SAFE_CHARS else "?" for ch in cut[:limit])
    return safe + ("..." if len(cut) > limit else "")


_ANSWER_AGAIN = 'Answer again with one JSON object with the keys "current observation", "current instruction" and "action".'


def judge(response: ParsedResponse, *, expected_action: str, at_intersection: bool) -> Judgement:
    """Score one parsed answer against the expected action and the true intersection flag.

    1. The action equals ``expected_action`` after :func:`normalize_action`: +1 (``correct``).
    2. Otherwise, if a "current observation" was read and its intersection claim
       (:func:`claims_intersection`) contradicts ``at_intersection``: -1.5 (``wrong_observation``).
    3. Otherwise -1: ``no_action`` when no action could be read, else ``wrong_action``.
    """
    action = response.action
    if action is not None and normalize_action(action) == expected_action:
        return Judgement(REWARD_CORRECT, "correct", "Correct.")
    if response.observation is not None and claims_intersection(response.observation) != at_intersection:
        if at_intersection:
            reason = "You are at an intersection, but your current observation does not say so."
        else:
            reason = "You are not at an intersection, but your current observation says you are."
        return Judgement(REWARD_WRONG_OBSERVATION, "wrong_observation", f"{reason} The action was also not right. {_ANSWER_AGAIN}")
    if response.too_long:
        reason = f"Your answer is longer than {MAX_RESPONSE_CHARS:,} characters, so it was not read."
        return Judgement(REWARD_WRONG_ACTION, "no_action", f"{reason} {_ANSWER_AGAIN}")
    if action is None:
        return Judgement(REWARD_WRONG_ACTION, "no_action", f"No action could be read from your answer. {_ANSWER_AGAIN}")
    return Judgement(
        REWARD_WRONG_ACTION,
        "wrong_action",
        f"The action {quote_for_feedback(normalize_action(action))} is not the right one here. "
        f"Check which instruction you are carrying out and what you observe. {_ANSWER_AGAIN}",
    )
