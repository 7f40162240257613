"""The 2x2 grid of street views that the vision modality shows, [front, right / back, left], and image packing helpers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VIEW_NAMES = ("front", "right", "back", "left")
"""The four views in grid order: top-left, top-right, bottom-left, bottom-right."""
VIEW_OFFSETS_DEG = (0.0, 90.0, 180.0, 270.0)
"""Heading of each view relative to the way the walker faces, in :data:`VIEW_NAMES` order."""
FIELD_OF_VIEW_DEG = 90.0
SEPARATOR_PX = 5
"""Width of the black lines between the views (the reference's)."""


def view_headings(heading: float) -> tuple[float, float, float, float]:
    """Compass headings of the front, right, back and left views for a walker facing ``heading``."""
    return tuple((heading + offset) % 360.0 for offset in VIEW_OFFSETS_DEG)  # type: ignore[return-value]


def grid_size(resolution: int) -> int:
    """Side in pixels of the grid of four ``resolution`` x ``resolution`` views."""
    return 2 * resolution + SEPARATOR_PX


def compose_grid(views: Sequence[np.ndarray]) -> np.ndarray:
    """Lay four equal square views (front, right, back, left) out as [front, right / back, left] on black.

    Views are (resolution, resolution, 3) uint8 images, or any equal square arrays (the result has
    their dtype and trailing shape, zero between them).
    """
    if len(views) != 4:
        raise ValueError(f"a view grid needs 4 views (front, right, back, left); got {len(views)}")
    first = views[0]
    resolution = first.shape[0]
    size = grid_size(resolution)
    grid = np.zeros((size, size, *first.shape[2:]), dtype=first.dtype)
    offset = resolution + SEPARATOR_PX
    for index, view in enumerate(views):
        if view.shape != first.shape or view.shape[:2] != (resolution, resolution):
            raise ValueError(f"views must be square and all the same shape; got {[v.shape for v in views]}")
        row, col = divmod(index, 2)
        grid[row * offset : row * offset + resolution, col * offset : col * offset + resolution] = view
    return grid


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 colours (..., 3) as one uint32 each (R | G << 8 | B << 16 | opaque alpha), for fast gathers."""
    rgba = np.empty(rgb.shape[:-1] + (4,), dtype=np.uint8)
    rgba[..., :3] = rgb
    rgba[..., 3] = 255
    return rgba.view(np.uint32)[..., 0]


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """The (..., 3) uint8 image of a :func:`pack_rgb` array."""
    channels = packed.view(np.uint8).reshape(*packed.shape, 4)
    rgb = np.empty((*packed.shape, 3), dtype=np.uint8)
    for channel in range(3):  # one strided copy per channel beats one copy of a strided view
        rgb[..., channel] = channels[..., channel]
    return rgb
