"""Loader of the published V-IRL route database (the V-IRL / "SFT Memorizes, RL Generalizes" release).

A database directory holds:

- ``route_infos.json``: a JSON array ``[route_list, route_count]``; each route has
  ``start_place.relocated_geocode`` ([lat, lng]), an optional ``init_heading`` (degrees; 0 or
  missing means random), ``route_results.geocode_list`` (the intersections, then the
  destination), ``dest_place`` (``name``) and ``milestone_info``: a string of ``{ ... }`` blocks, one
  per milestone, with lines ``"key": "value",`` (``landmarks``, ``to_next_intersection_heading``
  such as ``"177 (south)"``, ...). Block ``j`` describes the leg leaving the start (``j = 0``) or
  intersection ``j``; its ``landmarks`` is the landmark where that leg ends.
- ``gps_pano_mapping.pkl``: a pickled dict from (lat, lng) tuples to panorama ids.
- ``street_views/{pano_id}.jpg``: equirectangular panoramas, with ``{pano_id}.metadata.json``
  holding the panorama's ``rotation`` in degrees (see :mod:`environments.virl.panorama`).

Language modality reads only ``route_infos.json``. Every problem is reported with the file and
what was expected there.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import re
import string
import unicodedata
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from environments.virl.geometry import COMPASS_NAMES, EARTH_RADIUS_M, geocode_to_local
from environments.virl.panorama import perspective_view
from environments.virl.routes import Location, Milestone, Route
from environments.virl.view_grid import compose_grid, pack_rgb, unpack_rgb, view_headings

log = logging.getLogger(__name__)

ROUTE_FILE = "route_infos.json"
MAPPING_FILE = "gps_pano_mapping.pkl"
STREET_VIEW_DIR = "street_views"
PANORAMA_RADIUS_M = 20.0
"""A point is seen through the nearest panorama within this distance."""
PANORAMA_CACHE_SIZE = 8
"""Decoded panoramas kept in memory (a rail point's four views share one)."""

_NO_LANDMARK_PHRASES = {"", "no landmark nearby", "no landmarks nearby"}
_BLOCK = re.compile(r"\{([^{}]*)\}")
_ENTRY = re.compile(r'"([^"\n]+)"\s*:\s*"([^"\n]*)"')
_HEADING = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*\(\s*([a-z]+)\s*\)\s*$")
_PRINTABLE = frozenset(string.printable)


def plain_text(text: str) -> str:
    """``text`` in printable ASCII: accents dropped ('Café' -> 'Cafe'), other characters become '?', whitespace runs one space."""
    decomposed = unicodedata.normalize("NFKD", text)
    ascii_text = "".join(ch if ch in _PRINTABLE else "?" for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(ascii_text.split())


def parse_milestone_info(text: str) -> list[dict[str, str]]:
    """The ``{ "key": "value", ... }`` blocks of a ``milestone_info`` string, as dicts, in order."""
    return [dict(_ENTRY.findall(block)) for block in _BLOCK.findall(text)]


def _geocode(value: object, where: str) -> tuple[float, float]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise ValueError(f"{where} must be a [lat, lng] pair of numbers; got {value!r}")
    lat, lng = float(value[0]), float(value[1])
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lng <= 180.0):
        raise ValueError(f"{where} must be a [lat, lng] pair in degrees; got {value!r}")
    return lat, lng


def _route_from_record(record: object, index: int, path: Path) -> Route:
    where = f"{path}: route {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object; got {type(record).__name__}")
    try:
        start = _geocode(record["start_place"]["relocated_geocode"], f"{where}: start_place.relocated_geocode")
        geocode_list = record["route_results"]["geocode_list"]
        milestone_text = record["milestone_info"]
    except (KeyError, TypeError) as error:
        raise ValueError(
            f"{where} lacks {error}; each route needs start_place.relocated_geocode, "
            "route_results.geocode_list and milestone_info"
        ) from None
    if not isinstance(geocode_list, list) or not geocode_list:
        raise ValueError(f"{where}: route_results.geocode_list must be a non-empty list of [lat, lng]; got {geocode_list!r}")
    if not isinstance(milestone_text, str):
        raise ValueError(f"{where}: milestone_info must be a string of {{ ... }} blocks; got {type(milestone_text).__name__}")
    points = [_geocode(g, f"{where}: route_results.geocode_list[{i}]") for i, g in enumerate(geocode_list)]
    blocks = parse_milestone_info(milestone_text)
    if len(blocks) != len(points):
        raise ValueError(
            f"{where}: milestone_info has {len(blocks)} blocks but route_results.geocode_list has {len(points)} "
            "points; there must be one block per point (the start's and each intersection's leg)"
        )

    def location(geocode: tuple[float, float]) -> Location:
        east, north = geocode_to_local(geocode[0], geocode[1], start[0], start[1])
        return Location(east, north, geocode)

    milestones = []
    for j, block in enumerate(blocks):
        heading_text = block.get("to_next_intersection_heading", "")
        match = _HEADING.match(heading_text.lower())
        if match is None or match.group(2) not in COMPASS_NAMES:
            raise ValueError(
                f"{where}: milestone {j} needs to_next_intersection_heading like \"177 (south)\" "
                f"(degrees and one of {COMPASS_NAMES}); got {heading_text!r}"
            )
        landmark = plain_text(block.get("landmarks", ""))
        if landmark.lower() in _NO_LANDMARK_PHRASES:
            landmark = ""
        milestones.append(
            Milestone(
                location=location(start if j == 0 else points[j - 1]),
                heading=float(match.group(1)) % 360.0,
                landmark=landmark,
                heading_name=match.group(2),
            )
        )
    init_heading = record.get("init_heading")
    if init_heading is not None and (isinstance(init_heading, bool) or not isinstance(init_heading, int | float)):
        raise ValueError(f"{where}: init_heading must be a number of degrees (0 or missing: random); got {init_heading!r}")
    destination = record.get("dest_place") or {}
    return Route(
        route_id=str(record.get("route_id", index)),
        milestones=tuple(milestones),
        destination=location(points[-1]),
        destination_name=plain_text(str(destination.get("name", ""))) if isinstance(destination, dict) else "",
        init_heading=float(init_heading) % 360.0 if init_heading else None,
    )


def load_routes(data_dir: str | Path) -> tuple[Route, ...]:
    """The routes of a published database's ``route_infos.json``."""
    path = Path(data_dir) / ROUTE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; data_dir must be a V-IRL route database directory containing {ROUTE_FILE}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected a JSON array [route_list, route_count]") from None
    if not isinstance(content, list) or len(content) != 2 or not isinstance(content[0], list):
        raise ValueError(f"{path} must hold a JSON array [route_list, route_count]; got {type(content).__name__} of another shape")
    records, count = content
    if not records:
        raise ValueError(f"{path} holds no routes; expected a non-empty route_list")
    if count != len(records):
        log.warning("%s says it holds %s routes but lists %d; using the list", path, count, len(records))
    return tuple(_route_from_record(record, index, path) for index, record in enumerate(records))


def _needed_width(resolution: int) -> int:
    """Panorama width whose pixels are as fine as a 90-degree view's centre pixels (2 pi focal lengths)."""
    return math.ceil(math.pi * resolution)


class _MappingUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dicts, tuples, numbers, strings, numpy scalars): a data file runs no code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle's hook
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def load_panorama_mapping(data_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """The panorama positions ((K, 2) lat, lng) and ids of a database's ``gps_pano_mapping.pkl``."""
    path = Path(data_dir) / MAPPING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; vision modality needs {MAPPING_FILE} (a pickled dict of (lat, lng) -> panorama id)")
    try:
        mapping = _MappingUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as error:  # a damaged pickle can raise almost anything
        raise ValueError(f"{path} could not be read as a pickle ({error}); expected a dict of (lat, lng) -> panorama id") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{path} must hold a non-empty dict of (lat, lng) -> panorama id; got {type(mapping).__name__}")
    positions, ids = [], []
    for key, pano_id in mapping.items():
        if not isinstance(key, tuple | list) or len(key) != 2 or not isinstance(pano_id, str):
            raise ValueError(f"{path} must map (lat, lng) tuples to panorama id strings; found {key!r} -> {pano_id!r}")
        positions.append((float(key[0]), float(key[1])))
        ids.append(pano_id)
    return np.array(positions, dtype=np.float64), ids


class PublishedRouteDatabase:
    """A published V-IRL route database: its routes and, when views are needed, its panoramas.

    ``need_views=False`` (language modality) reads only ``route_infos.json``.
    """

    def __init__(self, data_dir: str | Path, *, need_views: bool) -> None:
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"{self.data_dir} is not a directory; data_dir must be a V-IRL route database directory")
        self.routes = load_routes(self.data_dir)
        self._positions: np.ndarray | None = None
        self._pano_ids: list[str] = []
        self._panoramas: OrderedDict[tuple[str, int], tuple[np.ndarray, float]] = OrderedDict()
        if need_views:
            self._positions, self._pano_ids = load_panorama_mapping(self.data_dir)
            if not (self.data_dir / STREET_VIEW_DIR).is_dir():
                raise FileNotFoundError(f"{self.data_dir / STREET_VIEW_DIR} not found; vision modality needs the panorama folder {STREET_VIEW_DIR}/")

    def panorama_near(self, location: Location) -> str | None:
        """Id of the nearest panorama within 20 m of ``location`` (which needs a geocode), or None."""
        if self._positions is None:
            raise RuntimeError("this database was opened without views (need_views=False)")
        if location.geocode is None:
            return None
        lat, lng = location.geocode
        north = np.radians(self._positions[:, 0] - lat) * EARTH_RADIUS_M
        east = np.radians(self._positions[:, 1] - lng) * EARTH_RADIUS_M * math.cos(math.radians(lat))
        distance = np.hypot(east, north)
        nearest = int(distance.argmin())
        return self._pano_ids[nearest] if distance[nearest] <= PANORAMA_RADIUS_M else None

    def has_view(self, location: Location) -> bool:
        """True when a panorama lies within 20 m of ``location``."""
        return self.panorama_near(location) is not None

    def panorama(self, pano_id: str, min_width: int = 0) -> tuple[np.ndarray, float]:
        """The decoded panorama (packed pixels, see :func:`~environments.virl.view_grid.pack_rgb`) and its rotation.

        A JPEG wider than needed is decoded at 1/2, 1/4 or 1/8 scale, keeping at least ``min_width``
        pixels (0: full size); the last few panoramas stay decoded in memory.
        """
        key = (pano_id, min_width)
        cached = self._panoramas.get(key)
        if cached is not None:
            self._panoramas.move_to_end(key)
            return cached
        folder = self.data_dir / STREET_VIEW_DIR
        image_path, metadata_path = folder / f"{pano_id}.jpg", folder / f"{pano_id}.metadata.json"
        if not image_path.is_file():
            raise FileNotFoundError(f"{image_path} not found; every panorama id in {MAPPING_FILE} needs {STREET_VIEW_DIR}/<id>.jpg")
        if not metadata_path.is_file():
            raise FileNotFoundError(f"{metadata_path} not found; every panorama needs <id>.metadata.json with a 'rotation' in degrees")
        try:
            metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
            rotation = float(metadata["rotation"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ValueError(f"{metadata_path} must be a JSON object with a numeric 'rotation' (degrees)") from None
        try:
            with Image.open(image_path) as image:
                if min_width:
                    image.draft("RGB", (min_width, min_width // 2))
                pixels = np.asarray(image.convert("RGB"))
        except OSError as error:
            raise ValueError(f"{image_path} could not be decoded as an image ({error}); expected an equirectangular JPEG") from None
        entry = (pack_rgb(pixels), rotation)
        self._panoramas[key] = entry
        if len(self._panoramas) > PANORAMA_CACHE_SIZE:
            self._panoramas.popitem(last=False)
        return entry

    def render_view(self, location: Location, heading: float, resolution: int) -> np.ndarray:
        """The 90-degree view toward ``heading`` from the panorama nearest ``location``."""
        packed, rotation = self.panorama(self._require_panorama(location), _needed_width(resolution))
        return unpack_rgb(perspective_view(packed, heading, rotation, resolution))

    def render_grid(self, location: Location, heading: float, resolution: int) -> np.ndarray:
        """The 2x2 grid [front, right / back, left] of views at ``location`` for a walker facing ``heading``."""
        packed, rotation = self.panorama(self._require_panorama(location), _needed_width(resolution))
        views = [perspective_view(packed, h, rotation, resolution) for h in view_headings(heading)]
        return unpack_rgb(compose_grid(views))

    def _require_panorama(self, location: Location) -> str:
        pano_id = self.panorama_near(location)
        if pano_id is None:
            raise ValueError(
                f"no panorama within {PANORAMA_RADIUS_M:g} m of {location.geocode} in {self.data_dir / MAPPING_FILE}; "
                "every start, intersection and destination of a route needs one"
            )
        return pano_id
