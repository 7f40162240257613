"""A tiny V-IRL route database in the published on-disk format, written by the tests.

Three routes around a base geocode in Manhattan, with panoramas every few metres along them.
Every panorama is a 256 x 128 equirectangular image of grey with a red vertical band at compass
heading :data:`MARKER_HEADING` and a yellow line along the horizon, stored with its own
``rotation`` so that the band's column depends on it.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from environments.virl.geometry import EARTH_RADIUS_M

BASE_GEOCODE = (40.7500, -73.9900)
MARKER_HEADING = 120.0
PANORAMA_SIZE = (128, 256)  # height, width
MARKER_HALF_WIDTH_PX = 3
PANORAMA_SPACING_M = 8.0


def local_to_geocode(east: float, north: float) -> tuple[float, float]:
    """The geocode ``east``/``north`` metres from :data:`BASE_GEOCODE` (inverse of geometry.geocode_to_local)."""
    lat0, lng0 = BASE_GEOCODE
    lat = lat0 + math.degrees(north / EARTH_RADIUS_M)
    lng = lng0 + math.degrees(east / (EARTH_RADIUS_M * math.cos(math.radians(lat0))))
    return lat, lng


@dataclass(frozen=True)
class FixtureRoute:
    """One route of the fixture and what the loader must make of it."""

    start: tuple[float, float]
    """(east, north) metres from the base."""
    init_heading: float
    legs: tuple[tuple[tuple[float, float], str, str], ...]
    """Per milestone: the point its leg leads to, its ``to_next_intersection_heading`` and ``landmarks``."""
    destination_name: str
    instructions: tuple[str, ...]
    """The instruction sentences the loader must write (for the fixed initial heading)."""


ROUTES = (
    FixtureRoute(
        start=(0.0, 0.0),
        init_heading=90.0,
        legs=(
            ((0.0, 60.0), "0 (north)", "Hotel Alpha is on your right front"),
            ((80.0, 60.0), "90 (east)", ""),
            ((80.0, 10.0), "180 (south)", "Beta Bank is on your left"),
        ),
        destination_name="Beta Bank",
        instructions=(
            "First, turn left to face north.",
            "Move forward until you reach next intersection where Hotel Alpha is on your right front.",
            "Turn right to face east.",
            "Move forward until you reach next intersection.",
            "Turn right to face south.",
            "Move forward until you reach destination where Beta Bank is on your left.",
        ),
    ),
    FixtureRoute(
        start=(300.0, 0.0),
        init_heading=350.0,
        legs=(
            ((310.0, 57.0), "10 (north)", "Gamma Caf\u00e9 is on your left behind"),
            ((270.0, 97.0), "315 (northwest)", "Delta Books is on your right"),
        ),
        destination_name="Delta Books",
        instructions=(
            "First, turn slightly right to face north.",
            "Move forward until you reach next intersection where Gamma Cafe is on your left behind.",
            "Turn left to face northwest.",
            "Move forward until you reach destination where Delta Books is on your right.",
        ),
    ),
    FixtureRoute(
        start=(600.0, 0.0),
        init_heading=0.0,  # missing/zero: drawn at random at every reset
        legs=(
            ((600.0, -45.0), "180 (south)", "Epsilon Deli is on your right"),
        ),
        destination_name="Epsilon Deli",
        instructions=(),
    ),
)  # fmt: skip


def _milestone_info(route: FixtureRoute) -> str:
    blocks = []
    for index, (_, heading, landmark) in enumerate(route.legs):
        lines = [f'"intersection_idx": "{index}",']
        if landmark:
            lines.append(f'"landmarks": "{landmark}",')
        lines += ['"distance": "50 meters",', '"human_heading": "0",', f'"to_next_intersection_heading": "{heading}",']
        blocks.append("{\n" + "\n".join(lines) + "\n}")
    return "\n".join(blocks)


def route_record(route: FixtureRoute) -> dict:
    """The ``route_infos.json`` entry of a fixture route."""
    destination = local_to_geocode(*route.legs[-1][0])
    return {
        "start_place": {"name": "start", "relocated_geocode": list(local_to_geocode(*route.start))},
        "init_heading": route.init_heading,
        "route_results": {
            "geocode_list": [list(local_to_geocode(*point)) for point, _, _ in route.legs],
            "landmark_list": [],
        },
        "dest_place": {"name": route.destination_name, "geocode": list(destination)},
        "milestone_info": _milestone_info(route),
    }


def panorama_image(rotation: float) -> np.ndarray:
    """A fixture panorama: grey, a red band at :data:`MARKER_HEADING` and a yellow horizon line."""
    height, width = PANORAMA_SIZE
    image = np.full((height, width, 3), 110, dtype=np.uint8)
    centre = round(((MARKER_HEADING + rotation) / 360.0 % 1.0) * width - 0.5)  # the pixel whose centre is nearest
    columns = np.arange(centre - MARKER_HALF_WIDTH_PX, centre + MARKER_HALF_WIDTH_PX + 1) % width
    image[:, columns] = (230, 20, 20)
    image[height // 2 - 1 : height // 2 + 1, :] = (240, 220, 20)
    return image


def write_published_database(root: Path) -> Path:
    """Write the fixture database under ``root`` and return its directory."""
    root.mkdir(parents=True, exist_ok=True)
    records = [route_record(route) for route in ROUTES]
    (root / "route_infos.json").write_text(json.dumps([records, len(records)]))
    views = root / "street_views"
    views.mkdir(exist_ok=True)
    mapping: dict[tuple[float, float], str] = {}
    for route_number, route in enumerate(ROUTES):
        points = [route.start] + [point for point, _, _ in route.legs]
        for leg_number, (a, b) in enumerate(zip(points, points[1:], strict=False)):
            length = math.hypot(b[0] - a[0], b[1] - a[1])
            steps = max(1, math.ceil(length / PANORAMA_SPACING_M))
            for step in range(steps + 1):
                east = a[0] + (b[0] - a[0]) * step / steps
                north = a[1] + (b[1] - a[1]) * step / steps
                pano_id = f"pano_{route_number}_{leg_number}_{step}"
                rotation = (37.0 * len(mapping)) % 360.0
                Image.fromarray(panorama_image(rotation)).save(views / f"{pano_id}.jpg", quality=95)
                (views / f"{pano_id}.metadata.json").write_text(json.dumps({"rotation": rotation, "pano_id": pano_id}))
                mapping[local_to_geocode(east, north)] = pano_id
    with open(root / "gps_pano_mapping.pkl", "wb") as file:
        pickle.dump(mapping, file)
    return root


def jpeg_claiming_size(width: int, height: int) -> bytes:
    """A 16 x 8 JPEG whose frame header (SOF0) claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (90, 90, 90)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    position = 2  # past the start-of-image marker; walk the segments to the baseline frame header
    while data[position + 1] != 0xC0:
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    data[position + 5 : position + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _centre(strength: np.ndarray) -> float:
    """Centre (in pixel-centre coordinates, 0 = first pixel) of the part of a profile above half its peak."""
    strong = strength >= strength.max() / 2
    return float(np.average(np.arange(len(strength))[strong], weights=strength[strong]))


def marker_column(view: np.ndarray) -> float:
    """Column of a view at the centre of the red marker (over the middle rows)."""
    middle = view[view.shape[0] // 4 : 3 * view.shape[0] // 4].astype(np.int32)
    return _centre((middle[..., 0] - middle[..., 1]).mean(axis=0))


def horizon_row(view: np.ndarray) -> float:
    """Row of a view at the centre of the yellow horizon line."""
    pixels = view.astype(np.int32)
    return _centre((pixels[..., 1] - pixels[..., 2]).mean(axis=1))
