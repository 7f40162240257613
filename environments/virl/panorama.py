"""Perspective views cut from equirectangular street-view panoramas (a vectorised gnomonic projection).

Panorama convention (the published V-IRL data's): the image spans 360 degrees of heading from left
to right, growing clockwise, and 180 degrees of pitch from top (+90) to bottom (-90). A panorama's
``rotation`` (degrees, from its metadata) places north: the column at fraction ``u`` of the width
looks toward heading ``(360 * u - rotation) mod 360``, so heading ``h`` is at ``u = (h + rotation) / 360``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from environments.virl.view_grid import FIELD_OF_VIEW_DEG


def heading_to_column_fraction(heading: float, rotation: float) -> float:
    """Fraction of the panorama width (0 = left edge) at which compass ``heading`` appears."""
    return ((heading + rotation) / 360.0) % 1.0


@functools.lru_cache(maxsize=16)
def _sampling_map(panorama_height: int, panorama_width: int, resolution: int, fov_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Per view column its heading offset in panorama columns, and per view pixel its panorama row (pitch 0)."""
    focal = (resolution / 2) / math.tan(math.radians(fov_deg) / 2)
    centres = np.arange(resolution, dtype=np.float64) + 0.5 - resolution / 2
    x = centres / focal  # right of the optical axis, per unit of depth
    y = -centres / focal  # above it (rows grow downward)
    column_offset = np.degrees(np.arctan(x)) / 360.0 * panorama_width
    pitch = np.arctan2(y[:, None], np.sqrt(1.0 + x[None, :] ** 2))
    rows = np.floor((0.5 - pitch / math.pi) * panorama_height).astype(np.int64)
    np.clip(rows, 0, panorama_height - 1, out=rows)
    column_offset.setflags(write=False)
    rows.setflags(write=False)
    return column_offset, rows


def perspective_view(
    panorama: np.ndarray, heading: float, rotation: float, resolution: int, fov_deg: float = FIELD_OF_VIEW_DEG
) -> np.ndarray:
    """The ``resolution`` x ``resolution`` view at pitch 0 toward compass ``heading`` (nearest-pixel sampling).

    ``panorama`` is an equirectangular image, (H, W, 3) uint8 or (H, W) of packed pixels; the view
    has the same pixel type. ``rotation`` is the panorama's north offset in degrees (see module doc).
    """
    if not (math.isfinite(heading) and math.isfinite(rotation)):  # NaN would turn every column into one
        raise ValueError(f"heading and rotation must be finite degrees; got heading={heading!r}, rotation={rotation!r}")
    height, width = panorama.shape[:2]
    column_offset, rows = _sampling_map(height, width, int(resolution), float(fov_deg))
    centre = heading_to_column_fraction(heading, rotation) * width
    columns = np.floor(centre + column_offset).astype(np.int64) % width
    flat = panorama.reshape(height * width, *panorama.shape[2:])
    return np.take(flat, rows * width + columns[None, :], axis=0)
