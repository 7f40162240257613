"""Playing cards for GeneralPoints: codes, ranks, suits and their values under each rule."""

from __future__ import annotations

from dataclasses import dataclass

SUITS = ("S", "C", "H", "D")
"""Suit letters: spades, clubs, hearts, diamonds."""

SUIT_SETS: dict[str, tuple[str, ...]] = {
    "black": ("S", "C"),
    "red": ("H", "D"),
    "mixed": SUITS,
}
"""The suit sets of the benchmark: black trains the visual task, red is its visual OOD test."""

RANK_NAMES = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
"""Rank names indexed by rank - 1 (rank 1 is the ace, 13 the king)."""

FACE_CARD_RULES = ("10", "11-12-13")
"""How J, Q, K count: all as 10 (in distribution) or as 11, 12, 13 (the rule-OOD setting)."""

_RANK_BY_NAME = {name: rank for rank, name in enumerate(RANK_NAMES, start=1)}
_RANK_BY_NAME["T"] = 10


@dataclass(frozen=True, order=True)
class Card:
    """One playing card: a suit letter (S, C, H, D) and a rank from 1 (ace) to 13 (king)."""

    suit: str
    rank: int

    def __post_init__(self) -> None:
        if self.suit not in SUITS:
            raise ValueError(f"card suit must be one of {SUITS}; got {self.suit!r}")
        if not 1 <= self.rank <= 13:
            raise ValueError(f"card rank must be in 1..13; got {self.rank!r}")

    @property
    def rank_name(self) -> str:
        """The rank as printed on the card: 'A', '2'..'10', 'J', 'Q' or 'K'."""
        return RANK_NAMES[self.rank - 1]

    @property
    def code(self) -> str:
        """The card code, suit letter then rank name, e.g. 'HA', 'S10', 'CK'."""
        return self.suit + self.rank_name

    @property
    def is_red(self) -> bool:
        """True for hearts and diamonds."""
        return self.suit in ("H", "D")

    @classmethod
    def from_code(cls, code: str) -> Card:
        """Parse a card code such as 'HA', 'S10', 'ST' or 'dk' (case-insensitive)."""
        if not isinstance(code, str) or len(code) < 2:
            raise ValueError(f"a card code is a suit letter (S, C, H, D) and a rank (A, 2..10, J, Q, K), like 'S10'; got {code!r}")
        suit, rank_name = code[0].upper(), code[1:].upper()
        if suit not in SUITS or rank_name not in _RANK_BY_NAME:
            raise ValueError(f"a card code is a suit letter (S, C, H, D) and a rank (A, 2..10, J, Q, K), like 'S10'; got {code!r}")
        return cls(suit, _RANK_BY_NAME[rank_name])


def card_value(rank: int, face_cards: str) -> int:
    """The number a card of this rank stands for under the face-card rule ('10' or '11-12-13')."""
    if face_cards == "10":
        return min(rank, 10)
    if face_cards == "11-12-13":
        return rank
    raise ValueError(f"face_cards must be one of {FACE_CARD_RULES}; got {face_cards!r}")


def rank_from_name(name: object) -> int | None:
    """The rank a model meant by a card name, or None if it is not one.

    Accepts rank names ('A', '10', 'K'), 'T' for ten, full names ('Ace', 'king'), and bare
    integers 1..13 (1 = ace, 11/12/13 = J/Q/K), quoted or not.
    """
    if isinstance(name, bool):
        return None
    if isinstance(name, int):
        return name if 1 <= name <= 13 else None
    if isinstance(name, float) and name.is_integer():
        return rank_from_name(int(name))
    if not isinstance(name, str):
        return None
    text = name.strip().upper()
    if text in _RANK_BY_NAME:
        return _RANK_BY_NAME[text]
    if text in _FULL_NAMES:
        return _FULL_NAMES[text]
    if text.isascii() and text.isdigit() and len(text) <= 2:  # not '²': str.isdigit accepts it, int() does not
        value = int(text)
        return value if 1 <= value <= 13 else None
    return None


_FULL_NAMES = {"ACE": 1, "JACK": 11, "QUEEN": 12, "KING": 13, "TEN": 10}
