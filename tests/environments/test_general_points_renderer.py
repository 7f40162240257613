"""Tests of the GeneralPoints card-table renderer (the GP-VL image)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from environments.general_points.cards import SUITS, Card
from environments.general_points.renderer import (
    MAX_CARDS,
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    TABLE_GREEN,
    card_layout,
    card_sprite,
    render_table,
)

ALL_CARDS = [Card(suit, rank) for suit in SUITS for rank in range(1, 14)]
REFERENCE_HAND = [Card.from_code(code) for code in ("HA", "S10", "CQ", "DK")]


def cards(*codes: str) -> list[Card]:
    return [Card.from_code(code) for code in codes]


def clearly_red(image: np.ndarray) -> np.ndarray:
    """Which pixels are clearly red: a strong red channel with weak green and blue."""
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    return (red > 150) & (green < 90) & (blue < 90)


def red_columns(image: np.ndarray) -> np.ndarray:
    """Indices of the image columns that hold at least one clearly red pixel."""
    return np.flatnonzero(clearly_red(image).any(axis=0))


def mean_abs_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(np.int16) - second.astype(np.int16)).mean())


@pytest.mark.parametrize(
    ("resolution", "count"), [(64, 1), (64, 8), (97, 5), (300, 4), (1200, 4), (1200, 8), (2048, 2)]
)
def test_table_is_a_square_uint8_rgb_image(resolution: int, count: int) -> None:
    table = render_table(ALL_CARDS[:count], resolution)
    assert table.shape == (resolution, resolution, 3)
    assert table.dtype == np.uint8


def test_reference_cards_are_270_by_378_and_vertically_centred() -> None:
    layout = card_layout(4, 1200)
    assert [(width, height) for _, _, width, height in layout] == [(270, 378)] * 4
    assert {top for _, top, _, _ in layout} == {(1200 - 378) // 2}


@given(resolution=st.integers(MIN_RESOLUTION, MAX_RESOLUTION), count=st.integers(1, MAX_CARDS))
def test_layout_fits_evenly_spaced_with_margins(resolution: int, count: int) -> None:
    layout = card_layout(count, resolution)
    assert len(layout) == count
    assert len({(width, height) for _, _, width, height in layout}) == 1
    width, height = layout[0][2], layout[0][3]
    assert 1 <= width <= round(0.225 * resolution)
    assert height == round(1.4 * width)
    lefts = [left for left, _, _, _ in layout]
    gaps = [lefts[0]] + [b - a - width for a, b in itertools.pairwise(lefts)] + [resolution - lefts[-1] - width]
    assert min(gaps) >= 1
    assert max(gaps) - min(gaps) <= 1
    top = layout[0][1]
    assert top >= 0 and top + height <= resolution
    assert abs(top - (resolution - top - height)) <= 1


def test_same_input_gives_identical_independent_arrays() -> None:
    first = render_table(REFERENCE_HAND)
    second = render_table(REFERENCE_HAND)
    np.testing.assert_array_equal(first, second)
    assert first.flags.writeable
    assert not np.shares_memory(first, second)
    first[:] = 0
    np.testing.assert_array_equal(render_table(REFERENCE_HAND), second)


def test_background_is_dark_green_and_card_centres_are_white() -> None:
    hand = cards("S2", "H4", "C6", "D2")
    table = render_table(hand)
    layout = card_layout(len(hand), 1200)
    between_first_two = layout[0][0] + layout[0][2] + 5
    for cloth in (table[0, 0], table[0, -1], table[-1, 0], table[-1, -1], table[600, between_first_two]):
        assert tuple(cloth) == TABLE_GREEN
    red, green, blue = TABLE_GREEN
    assert green > red + 40 and green > blue + 20 and green < 140
    for left, top, width, height in layout:
        centre = table[top + height // 2, left + width // 2]
        assert centre.min() >= 235, f"card centre at x={left + width // 2} is {centre}, not white"


def test_every_card_has_its_own_image() -> None:
    sprites = {card_sprite(card, 60, 84).tobytes() for card in ALL_CARDS}
    assert len(sprites) == len(ALL_CARDS)


@pytest.mark.parametrize("suit", SUITS)
def test_court_cards_differ_from_each_other_and_from_ten(suit: str) -> None:
    faces = {name: card_sprite(Card(suit, rank), 270, 378) for name, rank in (("10", 10), ("J", 11), ("Q", 12), ("K", 13))}
    for (first_name, first), (second_name, second) in itertools.combinations(faces.items(), 2):
        difference = mean_abs_difference(first, second)
        assert difference > 10, f"{suit}{first_name} and {suit}{second_name} look alike (mean difference {difference:.1f})"


@pytest.mark.parametrize("card", ALL_CARDS, ids=lambda card: card.code)
def test_red_suits_have_red_ink_and_black_suits_none(card: Card) -> None:
    reds = int(clearly_red(card_sprite(card, 270, 378)).sum())
    if card.is_red:
        assert reds > 500
    else:
        assert reds == 0


def test_cards_appear_left_to_right_in_input_order() -> None:
    hand = cards("HA", "S2", "DK", "C9", "H5")
    table = render_table(hand, 640)
    for card, (left, top, width, height) in zip(hand, card_layout(len(hand), 640), strict=True):
        np.testing.assert_array_equal(table[top : top + height, left : left + width], card_sprite(card, width, height))
    first, second = card_layout(2, 640)
    red_first = red_columns(render_table(cards("HA", "S2"), 640))
    assert red_first.min() >= first[0] and red_first.max() < first[0] + first[2]
    red_second = red_columns(render_table(cards("S2", "HA"), 640))
    assert red_second.min() >= second[0] and red_second.max() < second[0] + second[2]


def test_sprites_are_cached_read_only_and_framed_by_the_cloth() -> None:
    sprite = card_sprite(Card("S", 1), 120, 168)
    assert sprite is card_sprite(Card("S", 1), 120, 168)
    assert sprite.shape == (168, 120, 3) and sprite.dtype == np.uint8
    assert not sprite.flags.writeable
    with pytest.raises(ValueError):
        sprite[0, 0] = 0
    for corner in (sprite[0, 0], sprite[0, -1], sprite[-1, 0], sprite[-1, -1]):
        assert tuple(corner) == TABLE_GREEN


@pytest.mark.parametrize(
    ("hand", "resolution", "message"),
    [
        ([], 1200, "1 to 8 cards"),
        (ALL_CARDS[:9], 1200, "1 to 8 cards"),
        (REFERENCE_HAND, 63, "between 64 and 2048"),
        (REFERENCE_HAND, 2049, "between 64 and 2048"),
        (REFERENCE_HAND, 1200.0, "integer"),
        (REFERENCE_HAND, True, "integer"),
    ],
)
def test_invalid_tables_raise_value_error(hand: list[Card], resolution: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_table(hand, resolution)  # type: ignore[arg-type]


@pytest.mark.parametrize("hand", [["HA", "S10"], "HA", Card("H", 1)])
def test_non_card_input_raises_type_error(hand: object) -> None:
    with pytest.raises(TypeError, match="Card"):
        render_table(hand)  # type: ignore[arg-type]


def test_invalid_sprite_size_raises_value_error() -> None:
    with pytest.raises(ValueError, match="at least 1 pixel"):
        card_sprite(Card("S", 1), 0, 10)
