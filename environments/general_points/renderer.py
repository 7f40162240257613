"""The card table of the GeneralPoints vision modality (GP-VL): playing cards on a dark green cloth.

:func:`render_table` returns a square RGB image with the cards side by side, evenly spaced and
vertically centred. At the reference resolution of 1200 each card is 270x378 px (0.225 and 0.315 of
the side); more than four cards are shrunk so that they still fit with margins.

Every card is drawn by this module from geometric shapes and Pillow's bundled font, so the image is
the same on every machine and contains no randomness. Drawing is slow compared with the rest of an
episode, so each card sprite is drawn once per (card, size) and the cloth once per resolution; a
call then only copies the cloth and pastes the sprites with numpy slicing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

from environments.general_points.cards import Card

MIN_RESOLUTION = 64
"""Smallest accepted side of the table image, in pixels."""

MAX_RESOLUTION = 2048
"""Largest accepted side of the table image, in pixels."""

MAX_CARDS = 8
"""Most cards one table can show."""

CARD_WIDTH_FRACTION = 0.225
"""Card width as a fraction of the table side when the cards fit at full size (270 px at 1200)."""

CARD_ASPECT = 1.4
"""Card height / card width (378 / 270)."""

MIN_GAP_FRACTION = 0.02
"""Smallest gap between cards, and between a card and the table edge, as a fraction of the side."""

TABLE_GREEN = (18, 84, 46)
"""The colour of the cloth around the cards."""

CARD_WHITE = (252, 252, 248)
CARD_BORDER = (150, 150, 150)
RED_INK = (200, 24, 36)
BLACK_INK = (24, 24, 28)

_COURT_STYLES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    # rank name: (panel colour, pattern colour). No red in any of them, so black suits stay red-free.
    "J": ((214, 228, 248), (96, 136, 204)),
    "Q": ((236, 224, 246), (150, 104, 192)),
    "K": ((250, 238, 196), (212, 168, 52)),
}

_PIP_ROWS: dict[int, tuple[tuple[float, float], ...]] = {
    # rank: (column, row) per pip; column -1/0/1 is left/middle/right, row 0..1 runs top to bottom.
    2: ((0, 0), (0, 1)),
    3: ((0, 0), (0, 0.5), (0, 1)),
    4: ((-1, 0), (1, 0), (-1, 1), (1, 1)),
    5: ((-1, 0), (1, 0), (0, 0.5), (-1, 1), (1, 1)),
    6: ((-1, 0), (1, 0), (-1, 0.5), (1, 0.5), (-1, 1), (1, 1)),
    7: ((-1, 0), (1, 0), (0, 0.25), (-1, 0.5), (1, 0.5), (-1, 1), (1, 1)),
    8: ((-1, 0), (1, 0), (0, 0.25), (-1, 0.5), (1, 0.5), (0, 0.75), (-1, 1), (1, 1)),
    9: ((-1, 0), (1, 0), (-1, 1 / 3), (1, 1 / 3), (0, 0.5), (-1, 2 / 3), (1, 2 / 3), (-1, 1), (1, 1)),
    10: ((-1, 0), (1, 0), (0, 1 / 6), (-1, 1 / 3), (1, 1 / 3), (-1, 2 / 3), (1, 2 / 3), (0, 5 / 6), (-1, 1), (1, 1)),
}

_MIN_DRAWING_WIDTH = 400
"""Cards are drawn at an integer multiple of their size, at least this wide, then box-averaged down."""

_FONT_SIZE = 160
"""Size at which text is rasterised before being scaled to its box."""

Point = tuple[float, float]
Shape = tuple[list[tuple[Point, float]], list[list[Point]]]
"""A suit symbol as (circles as (centre, radius), polygons) in a unit box centred on (0, 0)."""


def card_layout(count: int, resolution: int = 1200) -> list[tuple[int, int, int, int]]:
    """Where :func:`render_table` puts ``count`` cards: one (left, top, width, height) box per card.

    Cards are 0.225 x 0.315 of the side when they fit; otherwise they shrink so that every gap
    (between cards and at both edges) is at least 0.02 of the side. Gaps are equal, so the cards are
    evenly spaced, and every card is vertically centred.
    """
    _check_table(count, resolution)
    min_gap = MIN_GAP_FRACTION * resolution
    width = min(round(CARD_WIDTH_FRACTION * resolution), math.floor((resolution - (count + 1) * min_gap) / count))
    height = round(width * CARD_ASPECT)
    gap = (resolution - count * width) / (count + 1)
    top = (resolution - height) // 2
    return [(round(gap + index * (width + gap)), top, width, height) for index in range(count)]


def render_table(cards: Sequence[Card], resolution: int = 1200) -> np.ndarray:
    """The table image showing ``cards`` left to right: a (resolution, resolution, 3) uint8 RGB array.

    Accepts 1 to 8 cards and resolutions from 64 to 2048. The array is new memory on every call, so
    callers may keep or modify it.
    """
    if isinstance(cards, (str, Card)):
        raise TypeError(f"cards must be a sequence of Card objects, e.g. [Card.from_code('HA')]; got {cards!r}")
    cards = list(cards)
    for card in cards:
        if not isinstance(card, Card):
            raise TypeError(f"cards must be Card objects (use Card.from_code('HA') for a code); got {card!r}")
    layout = card_layout(len(cards), resolution)
    table = _table_cloth(resolution).copy()
    for card, (left, top, width, height) in zip(cards, layout, strict=True):
        table[top : top + height, left : left + width] = card_sprite(card, width, height)
    return table


@functools.lru_cache(maxsize=256)
def card_sprite(card: Card, width: int, height: int) -> np.ndarray:
    """One card on the table cloth, as a read-only (height, width, 3) uint8 array (cached).

    The pixels outside the card's rounded corners are the cloth colour, so the sprite can be pasted as
    a full rectangle.
    """
    return _read_only(np.asarray(draw_card(card, width, height)))


def draw_card(card: Card, width: int, height: int) -> Image.Image:
    """Draw one card on the table cloth from scratch, as a ``width`` x ``height`` RGB image (not cached).

    The card is drawn at an integer multiple of its size and box-averaged down, which smooths every
    edge without any randomness.
    """
    if not isinstance(card, Card):
        raise TypeError(f"card must be a Card (use Card.from_code('HA') for a code); got {card!r}")
    if width < 1 or height < 1:
        raise ValueError(f"card width and height must be at least 1 pixel; got {width}x{height}")
    factor = max(3, math.ceil(_MIN_DRAWING_WIDTH / width))
    image = Image.new("RGB", (width * factor, height * factor), TABLE_GREEN)
    _draw_face(image, card)
    return image.reduce(factor)


def _check_table(count: int, resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise ValueError(f"resolution must be an integer number of pixels; got {resolution!r}")
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION} pixels; got {resolution}")
    if not 1 <= count <= MAX_CARDS:
        raise ValueError(f"a table shows 1 to {MAX_CARDS} cards; got {count}")


@functools.lru_cache(maxsize=8)
def _table_cloth(resolution: int) -> np.ndarray:
    return _read_only(np.full((resolution, resolution, 3), TABLE_GREEN, dtype=np.uint8))


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype=np.uint8)
    array.flags.writeable = False
    return array


def _draw_face(image: Image.Image, card: Card) -> None:
    """Draw the whole card (body, corner indices, pips or court panel) onto ``image``."""
    width, height = image.size
    ink = RED_INK if card.is_red else BLACK_INK
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle(
        (0, 0, width - 1, height - 1),
        radius=0.07 * width,
        fill=CARD_WHITE,
        outline=CARD_BORDER,
        width=max(1, round(0.008 * width)),
    )
    _draw_indices(image, card, ink)
    if card.rank == 1:
        _draw_suit(draw, card.suit, (width / 2, height / 2), 0.42 * width, ink)
    elif card.rank <= 10:
        _draw_pips(draw, image.size, card, ink)
    else:
        _draw_court(image, card, ink)


def _draw_indices(image: Image.Image, card: Card, ink: tuple[int, int, int]) -> None:
    """The rank and a small suit in the top-left corner, and the same turned 180 degrees bottom-right."""
    width, height = image.size
    mask = Image.new("L", image.size, 0)
    _draw_text(mask, card.rank_name, (0.105 * width, 0.05 * width), 0.125 * width, 0.16 * width, 255)
    _draw_suit(ImageDraw.Draw(mask), card.suit, (0.105 * width, 0.265 * width), 0.105 * width, 255)
    both_corners = ImageChops.lighter(mask, mask.rotate(180))
    image.paste(ink, (0, 0, width, height), both_corners)


def _draw_pips(draw: ImageDraw.ImageDraw, size: tuple[int, int], card: Card, ink: tuple[int, int, int]) -> None:
    """The pips of a number card in the usual arrangement; pips in the lower half stand upside down."""
    width, height = size
    top, bottom = 0.21 * height, 0.79 * height
    for column, row in _PIP_ROWS[card.rank]:
        centre = (width / 2 + column * 0.2 * width, top + row * (bottom - top))
        _draw_suit(draw, card.suit, centre, 0.17 * width, ink, upside_down=row > 0.5)


def _draw_court(image: Image.Image, card: Card, ink: tuple[int, int, int]) -> None:
    """A framed panel for J, Q and K: its own colours and pattern per rank, and a big letter."""
    width, height = image.size
    panel_colour, pattern_colour = _COURT_STYLES[card.rank_name]
    left, top, right, bottom = round(0.21 * width), round(0.1 * height), round(0.79 * width), round(0.9 * height)
    panel = Image.new("RGB", (right - left, bottom - top), panel_colour)
    _draw_court_pattern(panel, card.rank_name, pattern_colour, 0.07 * width)
    image.paste(panel, (left, top))

    draw = ImageDraw.Draw(image)
    draw.rectangle((left, top, right, bottom), outline=ink, width=max(1, round(0.018 * width)))
    inset = 0.03 * width
    draw.rectangle((left + inset, top + inset, right - inset, bottom - inset), outline=ink, width=max(1, round(0.006 * width)))

    centre_x, centre_y = width / 2, height / 2
    medallion = (centre_x - 0.23 * width, centre_y - 0.27 * width, centre_x + 0.23 * width, centre_y + 0.27 * width)
    draw.ellipse(medallion, fill=CARD_WHITE, outline=ink, width=max(1, round(0.012 * width)))
    letter_height = 0.27 * width
    _draw_text(image, card.rank_name, (centre_x, centre_y - letter_height / 2), letter_height, 0.3 * width, ink)
    _draw_suit(draw, card.suit, (centre_x, top + 0.13 * width), 0.12 * width, ink)
    _draw_suit(draw, card.suit, (centre_x, bottom - 0.13 * width), 0.12 * width, ink, upside_down=True)


def _draw_court_pattern(panel: Image.Image, rank_name: str, colour: tuple[int, int, int], step: float) -> None:
    """J: diagonal stripes. Q: a grid of dots. K: rows of crowns. Drawn over the whole panel."""
    width, height = panel.size
    draw = ImageDraw.Draw(panel)
    if rank_name == "J":
        offset = -height
        while offset < width:
            draw.line(((offset, 0), (offset + height, height)), fill=colour, width=max(1, round(0.3 * step)))
            offset += step
    elif rank_name == "Q":
        radius = 0.18 * step
        for row in range(math.ceil(height / step) + 1):
            shift = step / 2 if row % 2 else 0
            for column in range(math.ceil(width / step) + 1):
                x, y = column * step + shift, row * step
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    else:
        size = 1.3 * step
        for row in range(math.ceil(height / size) + 1):
            shift = size / 2 if row % 2 else 0
            for column in range(-1, math.ceil(width / size) + 1):
                _draw_crown(draw, (column * size + shift + size / 2, row * size + size / 2), 0.6 * size, colour)


def _draw_crown(draw: ImageDraw.ImageDraw, centre: Point, size: float, colour: tuple[int, int, int]) -> None:
    x, y = centre
    half = size / 2
    points = [
        (x - half, y + 0.35 * size),
        (x - half, y - 0.3 * size),
        (x - 0.25 * size, y),
        (x, y - 0.4 * size),
        (x + 0.25 * size, y),
        (x + half, y - 0.3 * size),
        (x + half, y + 0.35 * size),
    ]
    draw.polygon(points, fill=colour)


def _draw_text(
    image: Image.Image, text: str, top_centre: Point, height: float, max_width: float, fill: int | tuple[int, int, int]
) -> None:
    """Draw ``text`` in Pillow's bundled font with its ink ``height`` pixels tall, centred on ``top_centre``.

    Text wider than ``max_width`` (e.g. '10') is squeezed horizontally, as on printed cards.
    """
    glyphs = _text_mask(text)
    scale = height / glyphs.height
    size = (max(1, round(min(glyphs.width * scale, max_width))), max(1, round(height)))
    glyphs = glyphs.resize(size, Image.Resampling.LANCZOS)
    left, top = round(top_centre[0] - size[0] / 2), round(top_centre[1])
    image.paste(fill, (left, top, left + size[0], top + size[1]), glyphs)


@functools.lru_cache(maxsize=32)
def _text_mask(text: str) -> Image.Image:
    """The text in Pillow's bundled font (slightly emboldened), cropped to its ink, as an 'L' mask."""
    font = ImageFont.load_default(size=_FONT_SIZE)
    stroke = _FONT_SIZE // 28
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    return mask.crop(mask.getbbox())


def _draw_suit(
    draw: ImageDraw.ImageDraw,
    suit: str,
    centre: Point,
    size: float,
    fill: int | tuple[int, int, int],
    *,
    upside_down: bool = False,
) -> None:
    """Draw a suit symbol filling a ``size`` x ``size`` box around ``centre``, optionally turned 180 degrees."""
    circles, polygons = _SUIT_SHAPES[suit]
    sign = -size if upside_down else size
    cx, cy = centre

    def place(point: Point) -> Point:
        return cx + sign * point[0], cy + sign * point[1]

    for polygon in polygons:
        draw.polygon([place(point) for point in polygon], fill=fill)
    for point, radius in circles:
        x, y = place(point)
        r = radius * size
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _tangent_point(tip: Point, centre: Point, radius: float, outer_sign: float) -> Point:
    """The point where a line from ``tip`` touches the circle, on the side of x-sign ``outer_sign``."""
    dx, dy = centre[0] - tip[0], centre[1] - tip[1]
    distance = math.hypot(dx, dy)
    angle_to_centre = math.atan2(-dy, -dx)
    candidates = []
    for turn in (1, -1):
        angle = angle_to_centre + turn * math.acos(radius / distance)
        candidates.append((centre[0] + radius * math.cos(angle), centre[1] + radius * math.sin(angle)))
    return max(candidates, key=lambda point: outer_sign * point[0])


def _heart(lobe_x: float, lobe_y: float, radius: float, tip_y: float) -> Shape:
    """Two round lobes at (+-lobe_x, lobe_y) joined by a triangle down (or up) to a tip at (0, tip_y)."""
    tip = (0.0, tip_y)
    lobes = [((-lobe_x, lobe_y), radius), ((lobe_x, lobe_y), radius)]
    body = [
        _tangent_point(tip, (-lobe_x, lobe_y), radius, -1.0),
        (-lobe_x, lobe_y),
        (lobe_x, lobe_y),
        _tangent_point(tip, (lobe_x, lobe_y), radius, 1.0),
        tip,
    ]
    return lobes, [body]


def _stem(top_y: float) -> list[Point]:
    return [(-0.04, top_y), (0.04, top_y), (0.07, 0.36), (0.2, 0.5), (-0.2, 0.5), (-0.07, 0.36)]


def _suit_shapes() -> dict[str, Shape]:
    heart_lobes, heart_body = _heart(0.235, -0.2, 0.265, 0.48)
    spade_lobes, spade_body = _heart(0.225, 0.07, 0.245, -0.5)
    club_lobes = [((0.0, -0.27), 0.215), ((-0.255, 0.07), 0.215), ((0.255, 0.07), 0.215), ((0.0, -0.02), 0.14)]
    return {
        "H": (heart_lobes, heart_body),
        "D": ([], [[(0.0, -0.5), (0.38, 0.0), (0.0, 0.5), (-0.38, 0.0)]]),
        "S": (spade_lobes, [*spade_body, _stem(0.1)]),
        "C": (club_lobes, [_stem(0.0)]),
    }


_SUIT_SHAPES = _suit_shapes()
