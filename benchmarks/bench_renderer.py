"""Card-table renderer: milliseconds per GeneralPoints table image (GP-VL).

Times :func:`render_table` at the reference resolution (1200x1200, four cards) with its sprite and
cloth caches warm, against drawing the same table from scratch with PIL on every call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from benchmarks.common import Measurement, seconds_per_call
from environments.general_points.cards import Card
from environments.general_points.renderer import TABLE_GREEN, card_layout, draw_card, render_table

RESOLUTION = 1200
HAND = [Card.from_code(code) for code in ("HA", "S10", "CQ", "DK")]
TARGET_MS = 3.0


def render_table_uncached(cards: Sequence[Card], resolution: int = RESOLUTION) -> np.ndarray:
    """The same table as :func:`render_table`, drawn with PIL from scratch: no sprite or cloth cache."""
    table = Image.new("RGB", (resolution, resolution), TABLE_GREEN)
    for card, (left, top, width, height) in zip(cards, card_layout(len(cards), resolution), strict=True):
        table.paste(draw_card(card, width, height), (left, top))
    return np.array(table)


def run() -> list[Measurement]:
    """Milliseconds per 1200x1200 table with the sprite cache, against the uncached PIL drawing."""
    if not np.array_equal(render_table(HAND, RESOLUTION), render_table_uncached(HAND, RESOLUTION)):
        raise AssertionError("the cached and uncached renderers disagree; the comparison would be meaningless")
    cached_ms = 1e3 * seconds_per_call(lambda: render_table(HAND, RESOLUTION), 200)
    uncached_ms = 1e3 * seconds_per_call(lambda: render_table_uncached(HAND, RESOLUTION), 5)
    return [
        Measurement(
            name=f"render_table, {len(HAND)} cards at {RESOLUTION}x{RESOLUTION} (sprite cache warm)",
            value=cached_ms,
            unit="ms/call",
            baseline_name="drawn from scratch with PIL, no cache",
            baseline_value=uncached_ms,
            target=f"< {TARGET_MS:g} ms/call",
            met=cached_ms < TARGET_MS,
            lower_is_better=True,
        ),
    ]
