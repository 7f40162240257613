"""The GeneralPoints-v0 Gymnasium environment."""

from __future__ import annotations

import itertools
import json
import math
import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from environments.arguments import check_choice, reset_options
from environments.general_points.cards import FACE_CARD_RULES, SUIT_SETS, Card, card_value
from environments.general_points.renderer import render_table
from environments.general_points.solver import (
    SEARCH_STEPS,
    find_solution,
    first_solution,
    hand_split,
    is_solvable,
    solvable_hands,
)
from environments.general_points.verifier import (
    MAX_ANSWER_CHARS,
    REWARD_OUT_OF_ATTEMPTS,
    judge,
    parse_response,
)
from environments.splits import SPLITS, split_shares

MODALITIES = ("vision", "language")
TEXT_CHARSET = string.printable
"""Characters an observation text is made of (and the nominal charset of the action space)."""
MAX_TEXT_LENGTH = 16_384
MAX_CARDS = 8
"""Most cards per hand."""
LISTED_MAX_CARDS = 4
"""Hands of up to this many cards are dealt from a list of every solvable value multiset, made at construction.

Larger hands are searched for at reset (the list would take minutes and gigabytes to make).
"""
PROBE_HANDS = 40
"""Hands of 5+ cards that construction draws (with its own generator, seed :data:`PROBE_SEED`) to check the setting."""
PROBE_SEED = 0
"""Seed of the probe's own generator, so whether a setting is accepted is the same on every machine."""
MIN_PLAYABLE_SHARE = 0.5
"""With 5+ cards, at least this share of the probe's hands must be playable, or construction raises
ValueError: reset redraws until it finds a playable hand, so a rarely playable setting would be slow."""
DIRECT_DRAW_BELOW = 0.001
"""With up to 4 cards, when a draw is dealable with less than this chance, reset draws directly from the
dealable hands (same distribution) instead of redrawing thousands of times."""

_FACE_RULE_SENTENCES = {
    "10": "J, Q and K each count as 10; an ace (A) counts as 1; every other card counts as its number.",
    "11-12-13": "J counts as 11, Q as 12 and K as 13; an ace (A) counts as 1; every other card counts as its number.",
}


class GeneralPointsEnv(gym.Env):
    """The 24-points card game of "SFT Memorizes, RL Generalizes" (Chu et al., 2025), for language and vision models.

    ## Description
    The agent sees ``num_cards`` playing cards, as text (language modality) or only in an image of
    a card table (vision modality), and must answer with one JSON object holding the cards it sees,
    the value of each card, and one arithmetic formula that uses every card's value exactly once,
    with ``+ - * /`` and parentheses, and equals ``target`` (24). A wrong answer earns feedback
    saying why, and the agent revises its answer in the same dialogue, up to ``max_attempts`` times.

    ## Action Space
    The model's raw response text: any ``str`` is accepted and judged (non-ASCII or empty text earns
    a penalty, never an exception). An answer longer than 16,384 characters
    (:data:`environments.general_points.verifier.MAX_ANSWER_CHARS`) is not read and scores -3 as an
    illegal formula. ``action_space`` is a nominal ``Text(max_length=16384, charset=string.printable)``
    so that ``action_space.sample()`` works.
    Expected format: ``{"cards": ["A", "3", "K", "6"], "number": [1, 3, 10, 6], "formula": "10*3-6*1=24"}``.

    ## Observation Space
    ``Dict({"text": Text(...)})`` in language modality, plus ``"image": Box(0, 255, (resolution,
    resolution, 3), uint8)`` in vision modality. ``"text"`` is the user message of this turn: at
    reset the whole task prompt (rules, the face-card rule, the answer format, then the cards in
    language modality; the hand comes last, so all prompts of a setting share everything before it);
    after a failed attempt the feedback on it. The dialogue is the alternation of
    observation texts and the model's answers. The image (vision modality) is the same all episode.

    Vector environments: ``gym.make_vec(..., vectorization_mode="sync")`` and
    ``AsyncVectorEnv(..., shared_memory=False)`` work. Do not use an async vector env with shared
    memory: Gymnasium 1.x stores ``Text`` observations in shared memory as fixed-size character
    codes and returns them corrupted.

    ## Starting State
    Each card's rank is drawn uniformly from A..K with replacement and its suit uniformly from the
    suit set; the hand is redrawn until it can make the target (and, with ``split``, until its value
    multiset belongs to that split). With ``face_cards="11-12-13"`` one card, at a random position,
    is forced to be a J, Q or K. ``reset(options={"cards": ["HA", "S3", "CK", "D6"]})`` fixes the
    hand instead (codes: suit S/C/H/D then rank A, 2..10 or T, J, Q, K); an unsolvable or malformed
    hand raises ``ValueError``.

    With up to 4 cards every solvable value multiset of the setting is listed at construction, so
    reset never searches. If a draw is dealable with a chance below 1 in 1,000 (a target that very few
    hands make, such as 6561 = 9*9*9*9), reset draws directly from the dealable hands with the same
    probabilities instead of redrawing (same distribution, another random stream). If the chance is 0
    (with ``face_cards="11-12-13"``, a target that only hands without J, Q or K make) construction
    raises ``ValueError``. With 5 to 8 cards there are far too many formulas to list, so "can make the
    target" means "playable": a search from the target
    (:func:`environments.general_points.solver.find_solution`) finds a formula within 20,000 steps
    (about 50 ms; steps are counted, not timed, so a seed deals the same hand on every machine). For
    target 24 that is every solvable hand of 5 cards, and all but one of 24,000 random hands of 5 to 8
    cards under both face-card rules; the rare solvable hands that need a longer search are never
    dealt, and refused as fixed hands.
    Construction checks that at least half of 40 hands drawn by a fixed generator are playable and
    raises ``ValueError`` otherwise (a target few hands can make, such as 1000 with 5 cards, would make
    every reset slow).

    ## Rewards
    Checked in this order; penalties within one answer add up.

    | check | reward | verdict |
    |---|---|---|
    | the answer is longer than 16,384 characters (not read; either modality) | -3, nothing else checked | ``illegal_formula`` |
    | vision only: reported ranks differ from the hand (as a multiset) | -1.5, nothing else checked | ``wrong_cards`` |
    | no double-quoted ``"formula"`` could be read | -3 | ``missing_formula`` |
    | formula (before ``=``) has a character other than digits, ``+-*/()`` (spaces too) | -3, nothing else checked | ``illegal_formula`` |
    | each grammar violation (number after number or ``)``; operator not after a number or ``)``; ``(`` not at the start or after an operator or ``(``; ``)`` not after a number or ``)``; ``)`` with no open ``(``) | -3 each, at most 10 counted (-30) | ``grammar_error`` |
    | a number not on the cards, or else a number used too often | -2 | ``wrong_numbers`` |
    | a card's number left unused (independently of the above) | -2 | ``wrong_numbers`` |
    | no penalty and the formula equals the target exactly | +5, episode solved | ``correct`` |
    | no penalty, cannot be evaluated, and closing its open parentheses solves the hand | +1 | ``partial`` |
    | otherwise | -1 | ``no_solution`` |
    | an answer after ``max_attempts`` verified attempts (not read) | -1 | ``out_of_attempts`` |

    So no answer scores below -34 (:data:`environments.general_points.verifier.LOWEST_REWARD`: ten
    grammar violations and both number penalties). The length check comes first, in both modalities:
    reading a longer text would cost time in proportion to its length. The ``no_solution`` feedback names
    the longest start of the formula that some solution shares, for hands of up to 4 cards (larger
    hands have too many solutions to list).

    ## Episode End
    Terminated on the first correct answer. Truncated at the answer after ``max_attempts``
    verified attempts (the 6th answer by default), which earns -1.

    ## Information
    ``info`` after reset and after every step: ``cards`` (card codes, e.g. ``["HA", "S3", "CK", "D6"]``),
    ``numbers`` (their values under the face-card rule), ``target``, ``attempts_left`` (verified
    attempts still available), ``verdict`` (one of :data:`environments.general_points.verifier.VERDICTS`,
    ``""`` after reset), ``feedback`` (the human-readable reason, ``""`` after reset) and ``success``
    (True once solved).

    ## Arguments
    ```python
    gym.make("GeneralPoints-v0", modality="vision", face_cards="10", suits="black", target=24,
             num_cards=4, max_attempts=5, split="all", resolution=1200, render_mode=None)
    ```
    - ``modality``: ``"vision"`` (cards only in the image; answers must name the cards) or ``"language"``.
    - ``face_cards``: ``"10"`` (J, Q, K = 10; in distribution) or ``"11-12-13"`` (rule OOD; one face card forced).
    - ``suits``: ``"black"`` (spades and clubs; vision training), ``"red"`` (hearts and diamonds; visual OOD) or ``"mixed"``.
    - ``target``: the number the formula must make. ``num_cards``: cards per hand (1 to 8; the papers use 4;
      from 5 on, hands are searched for at reset, see Starting State).
    - ``max_attempts``: verified attempts per episode (at least 1).
    - ``split``: ``"all"`` (the papers' protocol), ``"train"``, ``"val"`` or ``"test"``: a fixed partition of
      the solvable value multisets, about 70/10/20 (:func:`environments.general_points.solver.hand_split`,
      :mod:`environments.splits`). ``"test"`` is for reported held-out evaluation; ``"val"`` is for tuning
      and controllers (such as AMFT's meta-gradient validation episodes), so nothing that steers training
      sees a test hand. A multiset's side depends only on its sorted values, never on the target. With
      ``face_cards="10"`` the 566 solvable multisets are 376 train, 57 val and 133 test; with
      ``"11-12-13"`` the 1362 are 943, 129 and 290. The same rule splits hands of any size: with 5 or
      more cards, reset redraws until the hand is playable and of the split.
    - ``resolution``: side of the square card-table image in pixels (64 to 2048).
    - ``render_mode``: ``None`` or ``"rgb_array"`` (``render()`` returns the card-table image, in either modality).

    Invalid values raise ``ValueError`` naming the argument and the allowed values.

    ## Differences from the published benchmark
    - Formulas are evaluated with exact fractions: ``8/(3-8/3)`` solves 3, 3, 8, 8 (the reference used
      floating point and scored such answers as wrong).
    - Reported cards may be quoted or bare rank names and integers (``"A"``, ``"10"``, ``3``, ``13`` for K,
      ``"T"``, ``"King"``); the reference rejected bare integers.
    - The partial-solution rule is exact: an answer earns +1 when it uses the right numbers and closing its
      open parentheses makes the target (the only completion possible once every card is used).
    - The ``"number"`` field is read but not scored, as in the reference.
    - Prompts and feedback are written for this project; the card images come from this project's renderer
      (no photographs of cards), at a configurable resolution.
    - ``split`` adds validation and held-out sets of hands that the papers do not have; ``split="all"`` is
      their protocol.
    - Penalties are bounded: at most 10 grammar violations count (the reference counted every one, so a
      long malformed formula could score millions below zero), and an answer longer than 16,384
      characters is not read and scores -3, as an illegal formula.
    - Hands of 5 to 8 cards (the papers use 4) are dealt only when a bounded search finds a formula
      (see Starting State), and their ``no_solution`` feedback names no solution's start.

    ## Version History
    - v0: initial release. ``split="val"`` was added later without a version bump: ``"all"`` and the
      ``"test"`` hands are unchanged, and ``"train"`` gave up the hands that are now ``"val"``
      (with ``face_cards="10"`` it went from 433 to 376 value multisets). Later, without a version bump
      either, and with the same hands for up to 4 cards: hands of 5 to 8 cards are searched for at reset
      (constructing such an environment used to take minutes), answers over 16,384 characters are not
      read, and at most 10 grammar violations count.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}

    def __init__(
        self,
        modality: str = "vision",
        face_cards: str = "10",
        suits: str = "black",
        target: int = 24,
        num_cards: int = 4,
        max_attempts: int = 5,
        split: str = "all",
        resolution: int = 1200,
        render_mode: str | None = None,
    ) -> None:
        check_choice("modality", modality, MODALITIES)
        check_choice("face_cards", face_cards, FACE_CARD_RULES)
        check_choice("suits", suits, tuple(SUIT_SETS))
        check_choice("split", split, SPLITS)
        check_choice("render_mode", render_mode, (None, *self.metadata["render_modes"]))
        if isinstance(target, bool) or not isinstance(target, int | np.integer):
            raise ValueError(f"target must be an integer; got {target!r}")
        if isinstance(num_cards, bool) or not isinstance(num_cards, int | np.integer) or not 1 <= num_cards <= MAX_CARDS:
            raise ValueError(f"num_cards must be an integer from 1 to {MAX_CARDS}; got {num_cards!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int | np.integer) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer of at least 1; got {max_attempts!r}")
        if isinstance(resolution, bool) or not isinstance(resolution, int | np.integer) or not 64 <= resolution <= 2048:
            raise ValueError(f"resolution must be an integer from 64 to 2048; got {resolution!r}")
        self.modality, self.face_cards, self.suits, self.split = modality, face_cards, suits, split
        self.target, self.num_cards, self.max_attempts = int(target), int(num_cards), int(max_attempts)
        self.resolution, self.render_mode = int(resolution), render_mode

        self._suit_letters = SUIT_SETS[suits]
        self._allowed_hands: frozenset[tuple[int, ...]] | None = None
        self._direct_draw: tuple[np.ndarray, np.ndarray] | None = None
        if self.num_cards <= LISTED_MAX_CARDS:
            max_value = 10 if face_cards == "10" else 13
            hands = solvable_hands(self.target, self.num_cards, max_value)
            self._allowed_hands = frozenset(h for h in hands if split == "all" or hand_split(h) == split)
            if not self._allowed_hands:
                raise ValueError(
                    f"no solvable hand of {num_cards} cards makes {target} in split {split!r} (solvable value multisets "
                    f"are split {split_shares()} by environments.general_points.solver.hand_split); choose another "
                    "target or num_cards, or split='all'"
                )
            self._plan_listed_draw()
        else:
            self._check_enough_playable_hands()
        self._prompt_template = self._build_prompt_template()

        text_space = spaces.Text(min_length=1, max_length=MAX_TEXT_LENGTH, charset=TEXT_CHARSET)
        observation = {"text": text_space}
        if modality == "vision":
            observation["image"] = spaces.Box(0, 255, (self.resolution, self.resolution, 3), np.uint8)
        self.observation_space = spaces.Dict(observation)
        self.action_space = spaces.Text(max_length=MAX_ANSWER_CHARS, charset=TEXT_CHARSET)

        self._cards: list[Card] = []
        self._numbers: list[int] = []
        self._image: np.ndarray | None = None
        self._attempts_left = 0
        self._done = True
        self._success = False

    def _build_prompt_template(self) -> str:
        # The hand comes last, so every prompt of a setting shares everything before it: a trainer or a
        # server can compute that prefix once for a whole batch (`agents.policy.scoring` does).
        if self.modality == "language":
            where = "The cards in your hand are: {cards}."
            cards_field = "the cards you were given, by rank"
        else:
            where = "The image shows the cards in your hand."
            cards_field = "the rank of every card in the image, left to right"
        return (
            "You are playing a card game. "
            f"Write one arithmetic formula that uses the value of each card exactly once and equals {self.target}. "
            "You may use +, -, *, / and parentheses, and nothing else.\n"
            f"{_FACE_RULE_SENTENCES[self.face_cards]}\n"
            "Reply with a single JSON object with three keys: "
            f'"cards" ({cards_field}), "number" (the value of each of those cards) and '
            f'"formula" (your formula as a string, without spaces, optionally ending in ={self.target}).\n'
            'Answer format: {"cards": [rank, ...], "number": [value, ...], "formula": "formula"}\n'
            f"{where}"
        ).replace("{", "{{").replace("}", "}}").replace("{{cards}}", "{cards}")

    def _draw_ranks(self, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
        """One draw of the hand's ranks by the benchmark's law, and its sorted values."""
        ranks = rng.integers(1, 14, size=self.num_cards)
        if self.face_cards == "11-12-13":
            ranks[rng.integers(self.num_cards)] = rng.integers(11, 14)
        return ranks, tuple(sorted(card_value(int(rank), self.face_cards) for rank in ranks))

    def _in_split(self, values: tuple[int, ...]) -> bool:
        return self.split == "all" or hand_split(values) == self.split

    def _solution(self, values: list[int] | tuple[int, ...]) -> str | None:
        """A formula for the hand, or None when the hand is not playable (see Starting State)."""
        if self.num_cards <= LISTED_MAX_CARDS:
            return first_solution(values, self.target)
        return find_solution(values, self.target, max_steps=SEARCH_STEPS)

    def _can_deal(self, values: tuple[int, ...]) -> bool:
        if self._allowed_hands is not None:
            return values in self._allowed_hands
        return self._in_split(values) and self._solution(values) is not None  # the split's hash first: it is cheap

    def _plan_listed_draw(self) -> None:
        """Up to 4 cards: the exact chance that a draw is dealable decides how reset draws (see Starting State)."""
        ranks = np.array(list(itertools.product(range(1, 14), repeat=self.num_cards)))
        values = np.sort(np.minimum(ranks, 10) if self.face_cards == "10" else ranks, axis=1)
        place = 14 ** np.arange(self.num_cards)
        dealable = np.isin(values @ place, [np.array(hand) @ place for hand in self._allowed_hands])
        # Under "11-12-13" one random card is replaced by a J, Q or K: P(ranks) is proportional to their number.
        weights = np.ones(len(ranks)) if self.face_cards == "10" else (ranks >= 11).sum(axis=1).astype(float)
        chance = weights[dealable].sum() / weights.sum()
        if chance == 0:
            raise ValueError(
                f"every hand of {self.num_cards} cards that makes {self.target} in split {self.split!r} is free of "
                "J, Q and K, but with face_cards='11-12-13' every hand holds one; choose another target or "
                "face_cards='10'"
            )
        if chance < DIRECT_DRAW_BELOW:
            self._direct_draw = (ranks[dealable], weights[dealable] / weights[dealable].sum())

    def _check_enough_playable_hands(self) -> None:
        """Raise ValueError unless at least :data:`MIN_PLAYABLE_SHARE` of a fixed sample of hands is playable."""
        rng = np.random.default_rng(PROBE_SEED)
        needed = math.ceil(MIN_PLAYABLE_SHARE * PROBE_HANDS)
        checked = playable = 0
        for _ in range(100 * PROBE_HANDS):  # a draw outside the split is cheap; the cap only guards the loop
            values = self._draw_ranks(rng)[1]
            if not self._in_split(values):
                continue
            checked += 1
            playable += self._solution(values) is not None
            if playable >= needed:
                return
            if checked - playable > PROBE_HANDS - needed:
                break
        raise ValueError(
            f"too few hands can make {self.target}: of {checked} hands of {self.num_cards} cards drawn for split "
            f"{self.split!r}, only {playable} have a formula that the search finds within {SEARCH_STEPS:,} steps, "
            f"and at least {needed} of {PROBE_HANDS} are needed; hands of 5 or more cards are searched for at "
            "reset, so choose a target most hands can make (such as 24), or at most "
            f"{LISTED_MAX_CARDS} cards, whose solvable hands are listed in advance"
        )

    def _draw_hand(self) -> list[Card]:
        rng = self.np_random
        if self._direct_draw is not None:
            rank_rows, probabilities = self._direct_draw
            ranks = rank_rows[rng.choice(len(rank_rows), p=probabilities)]
        else:
            ranks, values = self._draw_ranks(rng)
            while not self._can_deal(values):
                ranks, values = self._draw_ranks(rng)
        suits = rng.integers(len(self._suit_letters), size=self.num_cards)
        return [Card(self._suit_letters[s], int(r)) for s, r in zip(suits, ranks, strict=False)]

    def _hand_from_codes(self, codes: object) -> list[Card]:
        if not isinstance(codes, list | tuple) or len(codes) != self.num_cards:
            raise ValueError(f"options['cards'] must be a list of {self.num_cards} card codes like 'S10'; got {codes!r}")
        cards = [Card.from_code(code) for code in codes]
        numbers = [card_value(card.rank, self.face_cards) for card in cards]
        if self.num_cards <= LISTED_MAX_CARDS:
            if not is_solvable(numbers, self.target):
                raise ValueError(f"the hand {list(codes)} (values {numbers}) cannot make {self.target}; choose a solvable hand")
        elif self._solution(numbers) is None:
            raise ValueError(
                f"the hand {list(codes)} (values {numbers}) is not playable: no formula making {self.target} was found "
                f"within {SEARCH_STEPS:,} search steps (it cannot make {self.target}, or only a longer search finds "
                "how); choose another hand"
            )
        return cards

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Start an episode with a new hand (or the hand in ``options["cards"]``)."""
        options = reset_options(options, {"cards": 'a list of card codes like ["HA", "S3", "CK", "D6"]'})
        super().reset(seed=seed)
        self._cards = self._hand_from_codes(options["cards"]) if "cards" in options else self._draw_hand()
        self._numbers = [card_value(card.rank, self.face_cards) for card in self._cards]
        self._image = render_table(self._cards, self.resolution) if self.modality == "vision" else None
        self._attempts_left = self.max_attempts
        self._done = False
        self._success = False
        cards = "[" + ", ".join(f"'{card.rank_name}'" for card in self._cards) + "]"
        return self._observation(self._prompt_template.format(cards=cards)), self._info("", "")

    def step(self, action: str) -> tuple[dict, float, bool, bool, dict]:
        """Judge one answer; see the class docstring for rewards and episode end."""
        if self._done:
            raise RuntimeError("the episode is over; call reset() before step()")
        if self._attempts_left == 0:
            self._done = True
            feedback = "No attempts were left, so this answer was not checked. The episode is over."
            return self._observation(feedback), REWARD_OUT_OF_ATTEMPTS, False, True, self._info("out_of_attempts", feedback)
        judgement = judge(
            parse_response(action),
            card_values=self._numbers,
            card_ranks=[card.rank for card in self._cards],
            target=self.target,
            check_cards=self.modality == "vision",
        )
        self._attempts_left -= 1
        if judgement.correct:
            self._done = self._success = True
            text = judgement.feedback + " The hand is solved."
        elif self._attempts_left:
            text = f"{judgement.feedback} You have {self._attempts_left} attempt(s) left; reply with a corrected JSON answer."
        else:
            text = f"{judgement.feedback} That was your last attempt."
        return self._observation(text), judgement.reward, judgement.correct, False, self._info(judgement.verdict, judgement.feedback)

    def render(self) -> np.ndarray | None:
        """The card-table image (``render_mode="rgb_array"``), in either modality; None otherwise."""
        if self.render_mode != "rgb_array" or not self._cards:
            return None
        if self._image is None:
            self._image = render_table(self._cards, self.resolution)
        return self._image.copy()

    def expert_response(self) -> str:
        """A correct answer for the current hand, as the oracle expert gives it."""
        if not self._cards:
            raise RuntimeError("no hand yet; call reset() first")
        return json.dumps(
            {
                "cards": [card.rank_name for card in self._cards],
                "number": list(self._numbers),
                "formula": f"{self._solution(self._numbers)}={self.target}",
            }
        )

    def _observation(self, text: str) -> dict:
        observation = {"text": text}
        if self._image is not None and self.modality == "vision":
            observation["image"] = self._image.copy()  # callers keep observations; never hand out shared memory
        return observation

    def _info(self, verdict: str, feedback: str) -> dict:
        return {
            "cards": [card.code for card in self._cards],
            "numbers": list(self._numbers),
            "target": self.target,
            "attempts_left": self._attempts_left,
            "verdict": verdict,
            "feedback": feedback,
            "success": self._success,
        }
