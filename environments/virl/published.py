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

Language modality reads only ``route_infos.json``. The numbers are checked as they are read:
geocodes are finite degrees (lat -90..90, lng -180..180), headings and rotations finite degrees
from -360 to 360 (taken modulo 360), panorama ids plain file names, and a panorama may have at most
:data:`MAX_PANORAMA_PIXELS`. A panorama's files must lie inside the database directory once symlinks are
resolved (a database from elsewhere must not make the environment read other files; link the whole
directory instead of ``street_views/``). A missing file raises ``FileNotFoundError``; anything else wrong in
the data raises :class:`PublishedDataError` naming the file, the route (or panorama) and the field,
and what was expected there.
"""

from __future__ import annotations

import io
import json
import logging
import math
import numbers
import pickle
import re
import string
import unicodedata
import warnings
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
MAX_PANORAMA_SIZE = (16384, 8192)
"""Width and height of the largest Street View panorama (full resolution, zoom level 5)."""
MAX_PANORAMA_PIXELS = MAX_PANORAMA_SIZE[0] * MAX_PANORAMA_SIZE[1]
"""A panorama whose header claims more pixels than this is refused before it is decoded (a damaged
file or a decompression bomb); the published panoramas are far smaller."""
MAX_DEGREES = 360.0
"""Headings and rotations must lie in [-360, 360] degrees; anything beyond is not a heading."""

_REQUIRED_FIELDS = ("start_place.relocated_geocode", "route_results.geocode_list", "milestone_info")
_NO_LANDMARK_PHRASES = {"", "no landmark nearby", "no landmarks nearby"}
_BLOCK = re.compile(r"\{([^{}]*)\}")
_ENTRY = re.compile(r'"([^"\n]+)"\s*:\s*"([^"\n]*)"')
_HEADING = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*\(\s*([a-z]+)\s*\)\s*$")
_PRINTABLE = frozenset(string.printable)


class PublishedDataError(ValueError):
    """A file of a published V-IRL route database does not hold what the format describes.

    The message names the file, the route or panorama concerned, the field, what was found and
    what was expected. A missing file raises ``FileNotFoundError`` instead.
    """


def plain_text(text: str) -> str:
    """``text`` in printable ASCII: accents dropped ('Café' -> 'Cafe'), other characters become '?', whitespace runs one space."""
    decomposed = unicodedata.normalize("NFKD", text)
    ascii_text = "".join(ch if ch in _PRINTABLE else "?" for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(ascii_text.split())


def parse_milestone_info(text: str) -> list[dict[str, str]]:
    """The ``{ "key": "value", ... }`` blocks of a ``milestone_info`` string, as dicts, in order."""
    return [dict(_ENTRY.findall(block)) for block in _BLOCK.findall(text)]


def _json_type(value: object) -> str:
    """The JSON name of ``value``'s type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Number):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_finite_number(value: object) -> bool:
    """True for finite ints and floats, numpy's included, but not booleans or numeric strings."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value)  # a huge int would overflow isfinite


def _degrees(value: object, what: str, needed_by: str = "") -> float:
    """``value`` as degrees, if it is a finite number in [-360, 360]; ``what`` and ``needed_by`` go into the error."""
    if not _is_finite_number(value) or abs(value) > MAX_DEGREES:
        raise PublishedDataError(f"{what} must be a finite number of degrees from -360 to 360; got {value!r}{needed_by}")
    return float(value)


def _geocode(value: object, what: str) -> tuple[float, float]:
    """``value`` as a (lat, lng) pair of finite degrees; ``what`` names it in the error."""
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(_is_finite_number(v) for v in value)
        or not (-90.0 <= value[0] <= 90.0 and -180.0 <= value[1] <= 180.0)
    ):
        raise PublishedDataError(
            f"{what} must be a [lat, lng] pair of finite numbers in degrees (lat -90..90, lng -180..180); got {value!r}"
        )
    return float(value[0]), float(value[1])


def _field(record: dict, name: str, where: str) -> object:
    """The value at the dotted ``name`` (such as ``"start_place.relocated_geocode"``) of a route record."""
    value: object = record
    parts = name.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(value, dict):
            parent = ".".join(parts[:depth])
            raise PublishedDataError(f"{where}: {parent} must be a JSON object holding {part!r}; got {_json_type(value)}")
        if part not in value:
            raise PublishedDataError(f"{where} lacks {name}; each route needs {', '.join(_REQUIRED_FIELDS)}")
        value = value[part]
    return value


def _milestone_heading(block: dict[str, str], where: str) -> tuple[float, str]:
    """The degrees and compass name of a block's ``to_next_intersection_heading`` (such as ``"177 (south)"``)."""
    text = block.get("to_next_intersection_heading", "")
    match = _HEADING.match(text.lower())
    if match is None or match.group(2) not in COMPASS_NAMES or not abs(float(match.group(1))) <= MAX_DEGREES:
        raise PublishedDataError(
            f"{where} must be degrees from -360 to 360 and a compass name, like \"177 (south)\" "
            f"(one of {', '.join(COMPASS_NAMES)}); got {text!r}"
        )
    return float(match.group(1)), match.group(2)


def _route_from_record(record: object, index: int, path: Path) -> Route:
    where = f"{path}: route {index}"
    if not isinstance(record, dict):
        raise PublishedDataError(f"{where} must be a JSON object; got {_json_type(record)}")
    start = _geocode(_field(record, "start_place.relocated_geocode", where), f"{where}: start_place.relocated_geocode")
    geocode_list = _field(record, "route_results.geocode_list", where)
    milestone_text = _field(record, "milestone_info", where)
    if not isinstance(geocode_list, list) or not geocode_list:
        raise PublishedDataError(
            f"{where}: route_results.geocode_list must be a non-empty array of [lat, lng] (intersections, then the "
            f"destination); got {geocode_list!r}"
        )
    if not isinstance(milestone_text, str):
        raise PublishedDataError(f"{where}: milestone_info must be a string of {{ ... }} blocks; got {_json_type(milestone_text)}")
    points = [_geocode(g, f"{where}: route_results.geocode_list[{i}]") for i, g in enumerate(geocode_list)]
    blocks = parse_milestone_info(milestone_text)
    if len(blocks) != len(points):
        raise PublishedDataError(
            f"{where}: milestone_info has {len(blocks)} blocks but route_results.geocode_list has {len(points)} "
            "points; there must be one block per point (the start's and each intersection's leg)"
        )

    def location(geocode: tuple[float, float]) -> Location:
        east, north = geocode_to_local(geocode[0], geocode[1], start[0], start[1])
        return Location(east, north, geocode)

    milestones = []
    for j, block in enumerate(blocks):
        heading, heading_name = _milestone_heading(block, f"{where}: milestone_info block {j}: to_next_intersection_heading")
        landmark = plain_text(block.get("landmarks", ""))
        if landmark.lower() in _NO_LANDMARK_PHRASES:
            landmark = ""
        milestones.append(
            Milestone(
                location=location(start if j == 0 else points[j - 1]),
                heading=heading % 360.0,
                landmark=landmark,
                heading_name=heading_name,
            )
        )
    init_heading = record.get("init_heading")
    if init_heading is not None:
        init_heading = _degrees(init_heading, f"{where}: init_heading (0, null or missing means random)")
    route_id = record.get("route_id")
    if route_id is None:
        route_id = index
    if not isinstance(route_id, str | int) or isinstance(route_id, bool) or route_id == "":
        raise PublishedDataError(f"{where}: route_id must be a non-empty string or an integer; got {route_id!r}")
    destination = record.get("dest_place")
    if destination is not None and not isinstance(destination, dict):
        raise PublishedDataError(f"{where}: dest_place must be a JSON object with a 'name'; got {_json_type(destination)}")
    destination_name = (destination or {}).get("name")
    if destination_name is not None and not isinstance(destination_name, str):
        raise PublishedDataError(f"{where}: dest_place.name must be a string; got {_json_type(destination_name)}")
    return Route(
        route_id=str(route_id),
        milestones=tuple(milestones),
        destination=location(points[-1]),
        destination_name=plain_text(destination_name or ""),
        init_heading=init_heading % 360.0 if init_heading else None,
    )


def _read_json(path: Path, expected: str, needed_by: str = "") -> object:
    """The JSON content of ``path``; ``expected`` and ``needed_by`` (which route reads it) go into the error."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise PublishedDataError(f"{path} is not UTF-8 text ({error}); expected {expected}{needed_by}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: nesting too deep for the parser
        raise PublishedDataError(f"{path} is not valid JSON ({error}); expected {expected}{needed_by}") from None


def load_routes(data_dir: str | Path) -> tuple[Route, ...]:
    """The routes of a published database's ``route_infos.json``."""
    path = Path(data_dir) / ROUTE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; data_dir must be a V-IRL route database directory containing {ROUTE_FILE}")
    content = _read_json(path, "a JSON array [route_list, route_count]")
    if not isinstance(content, list) or len(content) != 2 or not isinstance(content[0], list):
        raise PublishedDataError(f"{path} must hold a JSON array [route_list, route_count]; got {_json_type(content)} of another shape")
    records, count = content
    if not records:
        raise PublishedDataError(f"{path} holds no routes; expected a non-empty route_list")
    if count != len(records):
        log.warning("%s says it holds %s routes but lists %d; using the list", path, count, len(records))
    routes = tuple(_route_from_record(record, index, path) for index, record in enumerate(records))
    first_with_id: dict[str, int] = {}
    for index, route in enumerate(routes):
        first = first_with_id.setdefault(route.route_id, index)
        if first != index:
            raise PublishedDataError(
                f"{path}: routes {first} and {index} both have route_id {route.route_id!r}; route ids must be unique "
                "(a route without one is known by its position in route_list)"
            )
    return routes


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


def _is_file_name(pano_id: object) -> bool:
    """True for a string that names a file inside ``street_views/`` (no folders, no '..')."""
    return (
        isinstance(pano_id, str)
        and pano_id.strip() != ""
        and pano_id not in (".", "..")
        and not any(separator in pano_id for separator in ("/", "\\", "\0"))
    )


def load_panorama_mapping(data_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """The panorama positions ((K, 2) lat, lng) and ids of a database's ``gps_pano_mapping.pkl``."""
    path = Path(data_dir) / MAPPING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; vision modality needs {MAPPING_FILE} (a pickled dict of (lat, lng) -> panorama id)")
    try:
        mapping = _MappingUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as error:  # a damaged pickle can raise almost anything
        raise PublishedDataError(f"{path} could not be read as a pickle ({error}); expected a dict of (lat, lng) -> panorama id") from None
    if not isinstance(mapping, dict) or not mapping:
        raise PublishedDataError(f"{path} must hold a non-empty dict of (lat, lng) -> panorama id; got {type(mapping).__name__}")
    positions, ids = [], []
    for key, pano_id in mapping.items():
        if not _is_file_name(pano_id):
            raise PublishedDataError(
                f"{path}: the panorama id of key {key!r} must be a string naming a file in {STREET_VIEW_DIR}/ "
                f"(not empty, no '/', '\\' or '..'); got {pano_id!r}"
            )
        positions.append(_geocode(key, f"{path}: the key of panorama {pano_id!r}"))
        ids.append(pano_id)
    return np.array(positions, dtype=np.float64), ids


def _too_large(image_path: Path, pixels: str, needed_by: str) -> PublishedDataError:
    return PublishedDataError(
        f"{image_path}: its header claims {pixels} pixels; a panorama has at most {MAX_PANORAMA_SIZE[0]} x "
        f"{MAX_PANORAMA_SIZE[1]} = {MAX_PANORAMA_PIXELS:,}, so the file is damaged or not a panorama{needed_by}"
    )


def _undecodable(image_path: Path, error: Exception, needed_by: str) -> PublishedDataError:
    return PublishedDataError(f"{image_path} could not be decoded as an image ({error}); expected an equirectangular JPEG{needed_by}")


def _open_panorama(image_path: Path, min_width: int, needed_by: str) -> np.ndarray:
    """The RGB pixels of a panorama JPEG, refused before decoding if it claims more than :data:`MAX_PANORAMA_PIXELS`."""
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 million pixels; MAX_PANORAMA_PIXELS is the limit that applies here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(image_path)
    except Image.DecompressionBombError:  # PIL refuses more than twice its MAX_IMAGE_PIXELS
        raise _too_large(image_path, f"more than {2 * Image.MAX_IMAGE_PIXELS:,}", needed_by) from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on damaged files
        raise _undecodable(image_path, error, needed_by) from None
    with image:
        width, height = image.size
        if width * height > MAX_PANORAMA_PIXELS:
            raise _too_large(image_path, f"{width} x {height} = {width * height:,}", needed_by)
        try:
            if min_width:
                image.draft("RGB", (min_width, min_width // 2))
            return np.asarray(image.convert("RGB"))
        except Exception as error:  # as above: a damaged file can make the decoder raise almost anything
            raise _undecodable(image_path, error, needed_by) from None


class PublishedRouteDatabase:
    """A published V-IRL route database: its routes and, when views are needed, its panoramas.

    ``need_views=False`` (language modality) reads only ``route_infos.json``. Panorama files are read
    when a view first needs them; ``route_id`` (when given) names the route in their errors.
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

    def panorama(self, pano_id: str, min_width: int = 0, route_id: str | None = None) -> tuple[np.ndarray, float]:
        """The decoded panorama (packed pixels, see :func:`~environments.virl.view_grid.pack_rgb`) and its rotation.

        A JPEG wider than needed is decoded at 1/2, 1/4 or 1/8 scale, keeping at least ``min_width``
        pixels (0: full size); the last few panoramas stay decoded in memory.
        """
        key = (pano_id, min_width)
        cached = self._panoramas.get(key)
        if cached is not None:
            self._panoramas.move_to_end(key)
            return cached
        needed_by = "" if route_id is None else f" (needed by route {route_id})"
        folder = self.data_dir / STREET_VIEW_DIR
        image_path, metadata_path = folder / f"{pano_id}.jpg", folder / f"{pano_id}.metadata.json"
        if not image_path.is_file():
            raise FileNotFoundError(
                f"{image_path} not found; every panorama id in {MAPPING_FILE} needs {STREET_VIEW_DIR}/<id>.jpg{needed_by}"
            )
        if not metadata_path.is_file():
            raise FileNotFoundError(
                f"{metadata_path} not found; every panorama needs <id>.metadata.json with a 'rotation' in degrees{needed_by}"
            )
        for path in (image_path, metadata_path):
            self._require_inside(path, needed_by)
        expected = "a JSON object with a numeric 'rotation' (degrees)"
        metadata = _read_json(metadata_path, expected, needed_by)
        if not isinstance(metadata, dict) or "rotation" not in metadata:
            found = "an object without 'rotation'" if isinstance(metadata, dict) else _json_type(metadata)
            raise PublishedDataError(f"{metadata_path} must be {expected}; got {found}{needed_by}")
        rotation = _degrees(metadata["rotation"], f"{metadata_path}: rotation", needed_by)
        entry = (pack_rgb(_open_panorama(image_path, min_width, needed_by)), rotation)
        self._panoramas[key] = entry
        if len(self._panoramas) > PANORAMA_CACHE_SIZE:
            self._panoramas.popitem(last=False)
        return entry

    def _require_inside(self, path: Path, needed_by: str) -> None:
        """Raise PublishedDataError unless `path` lies inside the database directory once symlinks are resolved."""
        target = path.resolve()
        if not target.is_relative_to(self.data_dir.resolve()):
            raise PublishedDataError(
                f"{path} leads outside the database directory {self.data_dir} (to {target}); a database's files must lie "
                f"inside it (to keep panoramas elsewhere, link the whole database directory, not {STREET_VIEW_DIR}/ or a file){needed_by}"
            )

    def render_view(self, location: Location, heading: float, resolution: int, route_id: str | None = None) -> np.ndarray:
        """The 90-degree view toward ``heading`` from the panorama nearest ``location``."""
        pano_id = self._require_panorama(location, route_id)
        packed, rotation = self.panorama(pano_id, _needed_width(resolution), route_id)
        return unpack_rgb(perspective_view(packed, heading, rotation, resolution))

    def render_grid(self, location: Location, heading: float, resolution: int, route_id: str | None = None) -> np.ndarray:
        """The 2x2 grid [front, right / back, left] of views at ``location`` for a walker facing ``heading``."""
        pano_id = self._require_panorama(location, route_id)
        packed, rotation = self.panorama(pano_id, _needed_width(resolution), route_id)
        views = [perspective_view(packed, h, rotation, resolution) for h in view_headings(heading)]
        return unpack_rgb(compose_grid(views))

    def _require_panorama(self, location: Location, route_id: str | None) -> str:
        pano_id = self.panorama_near(location)
        if pano_id is None:
            point = "" if route_id is None else f", a point of route {route_id}"
            raise PublishedDataError(
                f"{self.data_dir / MAPPING_FILE}: no panorama within {PANORAMA_RADIUS_M:g} m of {location.geocode}{point}; "
                "every start, intersection and destination of a route needs one"
            )
        return pano_id
