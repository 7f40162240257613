"""Bad published V-IRL data gets a clear answer: a PublishedDataError naming the file, the route and the field.

Every number is checked as it is read (NaN, +inf, -inf, strings where numbers belong, values out of
range), and so are the shapes around it (objects, arrays, ids) and the panorama images (damaged
files, headers claiming more pixels than any panorama has).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

import environments  # noqa: F401  (registers VIRL-v0)
from environments.virl import PublishedDataError
from environments.virl.panorama import perspective_view
from environments.virl.published import MAX_PANORAMA_SIZE, PublishedRouteDatabase, load_routes
from tests.environments.virl_fixtures import (
    ROUTES,
    jpeg_claiming_size,
    route_record,
    write_published_database,
)

RESOLUTION = 64
NON_FINITE = [math.nan, math.inf, -math.inf]
NON_NUMBERS = ["90", None, True, [1.0]]


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_published_database(tmp_path_factory.mktemp("virl") / "db")


@pytest.fixture
def database_copy(database: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(database, tmp_path / "db"))


def _write_routes(folder: Path, change: Callable[[list[dict]], None]) -> Path:
    """A route_infos.json of the fixture routes after ``change`` edits the records (written as-is: NaN stays NaN)."""
    records = [route_record(route) for route in ROUTES]
    change(records)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "route_infos.json").write_text(json.dumps([records, len(records)]))
    return folder


def _route_error(tmp_path: Path, change: Callable[[list[dict]], None]) -> str:
    with pytest.raises(PublishedDataError) as error:
        load_routes(_write_routes(tmp_path, change))
    message = str(error.value)
    assert "route_infos.json" in message
    return message


# -- route_infos.json: numbers --

NUMERIC_ROUTE_FIELDS = {
    "init_heading": lambda record, value: record.__setitem__("init_heading", value),
    "start_place.relocated_geocode": lambda record, value: record["start_place"]["relocated_geocode"].__setitem__(0, value),
    "route_results.geocode_list[1]": lambda record, value: record["route_results"]["geocode_list"][1].__setitem__(1, value),
}


@pytest.mark.parametrize("field", sorted(NUMERIC_ROUTE_FIELDS))
@pytest.mark.parametrize("value", NON_FINITE + NON_NUMBERS[:1] + NON_NUMBERS[2:], ids=repr)
def test_route_numbers_must_be_finite_numbers(tmp_path: Path, field: str, value: object) -> None:
    message = _route_error(tmp_path, lambda records: NUMERIC_ROUTE_FIELDS[field](records[1], value))
    assert f"route 1: {field}" in message and repr(value) in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("init_heading", 361.0), ("init_heading", -1e300), ("start_place.relocated_geocode", 90.5), ("route_results.geocode_list[1]", 180.01)],
)
def test_route_numbers_must_be_in_range(tmp_path: Path, field: str, value: float) -> None:
    message = _route_error(tmp_path, lambda records: NUMERIC_ROUTE_FIELDS[field](records[1], value))
    assert f"route 1: {field}" in message and ("-360 to 360" in message or "lat -90..90, lng -180..180" in message)


def test_huge_integer_geocode_is_an_error_not_an_overflow(tmp_path: Path) -> None:
    message = _route_error(tmp_path, lambda records: NUMERIC_ROUTE_FIELDS["start_place.relocated_geocode"](records[0], 10**400))
    assert "route 0: start_place.relocated_geocode" in message


@pytest.mark.parametrize("heading", ["nan (north)", "inf (north)", "1e400 (north)", "400 (north)", "-361 (north)", "177", "177 (southish)"])
def test_milestone_headings_must_be_degrees_and_a_compass_name(tmp_path: Path, heading: str) -> None:
    def change(records: list[dict]) -> None:
        records[0]["milestone_info"] = records[0]["milestone_info"].replace('"90 (east)"', json.dumps(heading))

    message = _route_error(tmp_path, change)
    assert "route 0: milestone_info block 1: to_next_intersection_heading" in message and repr(heading) in message


def test_headings_in_range_are_taken_modulo_360(tmp_path: Path) -> None:
    def change(records: list[dict]) -> None:
        records[0]["init_heading"] = -90
        records[0]["milestone_info"] = records[0]["milestone_info"].replace('"90 (east)"', '"-270 (east)"')

    route = load_routes(_write_routes(tmp_path, change))[0]
    assert route.init_heading == 270.0 and route.milestones[1].heading == 90.0


# -- route_infos.json: shapes, ids and text --


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r[0].__setitem__("start_place", [40.75, -73.99]), "route 0: start_place must be a JSON object holding 'relocated_geocode'; got an array"),
        (lambda r: r[0].__setitem__("route_results", "none"), "route 0: route_results must be a JSON object holding 'geocode_list'; got a string"),
        (lambda r: r[0].pop("milestone_info"), "route 0 lacks milestone_info"),
        (lambda r: r[0]["route_results"].__setitem__("geocode_list", []), "route 0: route_results.geocode_list must be a non-empty array"),
        (lambda r: r[0]["route_results"].__setitem__("geocode_list", {"0": [40.75, -73.99]}), "route 0: route_results.geocode_list must be a non-empty array"),
        (lambda r: r[0].__setitem__("milestone_info", [{"to_next_intersection_heading": "0 (north)"}]), "route 0: milestone_info must be a string"),
        (lambda r: r[2].__setitem__("milestone_info", ""), "route 2: milestone_info has 0 blocks"),
        (lambda r: r[1].__setitem__("dest_place", ["Delta Books"]), "route 1: dest_place must be a JSON object"),
        (lambda r: r[1]["dest_place"].__setitem__("name", 7), "route 1: dest_place.name must be a string; got a number"),
        (lambda r: r.__setitem__(1, "route"), "route 1 must be a JSON object; got a string"),
        (lambda r: r[1].__setitem__("route_id", ["x"]), "route 1: route_id must be a non-empty string or an integer"),
        (lambda r: r[1].__setitem__("route_id", ""), "route 1: route_id must be a non-empty string or an integer"),
        (lambda r: [record.__setitem__("route_id", "same") for record in r[1:]], "routes 1 and 2 both have route_id 'same'"),
        (lambda r: r[2].__setitem__("route_id", 0), "routes 0 and 2 both have route_id '0'"),  # route 0 is known by its position
    ],
)
def test_malformed_routes_name_the_route_and_the_field(tmp_path: Path, change: Callable, expected: str) -> None:
    assert expected in _route_error(tmp_path, change)


def test_null_optional_fields_mean_missing(tmp_path: Path) -> None:
    def change(records: list[dict]) -> None:
        records[0]["init_heading"] = None
        records[0]["dest_place"]["name"] = None
        records[1]["route_id"] = None

    routes = load_routes(_write_routes(tmp_path, change))
    assert routes[0].init_heading is None and routes[0].destination_name == "" and routes[1].route_id == "1"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'[[{"milestone_info": "caf\xe9"}], 1]', "is not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),
    ],
    ids=["latin-1", "deeply-nested"],
)
def test_unreadable_route_file(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "route_infos.json").write_bytes(content)
    with pytest.raises(PublishedDataError, match=expected) as error:
        load_routes(tmp_path)
    assert "route_infos.json" in str(error.value)


def test_the_environment_raises_the_data_error(tmp_path: Path) -> None:
    folder = _write_routes(tmp_path, lambda records: records[0].__setitem__("init_heading", math.nan))
    with pytest.raises(PublishedDataError, match=r"route_infos\.json: route 0: init_heading .* got nan"):
        gym.make("VIRL-v0", data_dir=folder, modality="language")


# -- gps_pano_mapping.pkl --


def _rewrite_mapping(database: Path, change: Callable[[dict], dict]) -> None:
    path = database / "gps_pano_mapping.pkl"
    path.write_bytes(pickle.dumps(change(pickle.loads(path.read_bytes()))))


def _with_first_key(mapping: dict, key: object) -> dict:
    (_, pano_id), *rest = mapping.items()
    return {key: pano_id, **dict(rest)}


@pytest.mark.parametrize("coordinate", [0, 1], ids=["lat", "lng"])
@pytest.mark.parametrize("value", NON_FINITE + ["40.75", "abc", None, 200.0], ids=repr)
def test_mapping_keys_must_be_finite_coordinates(database_copy: Path, coordinate: int, value: object) -> None:
    key = [40.75, -73.99]
    key[coordinate] = value
    _rewrite_mapping(database_copy, lambda mapping: _with_first_key(mapping, tuple(key)))
    with pytest.raises(PublishedDataError) as error:
        PublishedRouteDatabase(database_copy, need_views=True)
    message = str(error.value)
    assert "gps_pano_mapping.pkl: the key of panorama 'pano_0_0_0' must be a [lat, lng] pair of finite numbers" in message
    assert repr(value) in message


@pytest.mark.parametrize("key", [(40.75,), (40.75, -73.99, 0.0), "40.75,-73.99"], ids=repr)
def test_mapping_keys_must_be_pairs(database_copy: Path, key: object) -> None:
    _rewrite_mapping(database_copy, lambda mapping: _with_first_key(mapping, key))
    with pytest.raises(PublishedDataError, match=r"gps_pano_mapping\.pkl: the key of panorama 'pano_0_0_0'"):
        PublishedRouteDatabase(database_copy, need_views=True)


@pytest.mark.parametrize("pano_id", ["", "..", "../route_infos", "a/b", "a\\b", 7, None], ids=repr)
def test_panorama_ids_must_be_file_names(database_copy: Path, pano_id: object) -> None:
    _rewrite_mapping(database_copy, lambda mapping: {**mapping, (40.76, -73.99): pano_id})
    with pytest.raises(PublishedDataError, match=r"gps_pano_mapping\.pkl: the panorama id of key \(40\.76, -73\.99\)"):
        PublishedRouteDatabase(database_copy, need_views=True)


def test_numpy_coordinates_are_numbers(database_copy: Path) -> None:
    _rewrite_mapping(database_copy, lambda mapping: {(np.float64(lat), np.float64(lng)): v for (lat, lng), v in mapping.items()})
    env = gym.make("VIRL-v0", data_dir=database_copy, modality="vision", resolution=RESOLUTION)
    env.reset(seed=0, options={"route": 0})


# -- street_views/<id>.metadata.json --


def _reset_error(database: Path) -> str:
    env = gym.make("VIRL-v0", data_dir=database, modality="vision", resolution=RESOLUTION)
    with pytest.raises(PublishedDataError) as error:
        env.reset(seed=0, options={"route": 0})
    message = str(error.value)
    assert message.endswith("(needed by route 0)"), message
    return message


@pytest.mark.parametrize("rotation", NON_FINITE + NON_NUMBERS + [1e300, 361.0], ids=repr)
def test_rotation_must_be_finite_degrees(database_copy: Path, rotation: object) -> None:
    (database_copy / "street_views" / "pano_0_0_0.metadata.json").write_text(json.dumps({"rotation": rotation}))
    message = _reset_error(database_copy)
    assert f"pano_0_0_0.metadata.json: rotation must be a finite number of degrees from -360 to 360; got {rotation!r}" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"[12.0]", "must be a JSON object with a numeric 'rotation' (degrees); got an array"),
        (b'{"heading": 12.0}', "got an object without 'rotation'"),
        (b'{"rotation": 12.0', "is not valid JSON"),
        (b'{"rotation": 12.0, "pano_id": "caf\xe9"}', "is not UTF-8 text"),
    ],
    ids=["array", "no-rotation", "cut-short", "latin-1"],
)
def test_malformed_panorama_metadata(database_copy: Path, content: bytes, expected: str) -> None:
    (database_copy / "street_views" / "pano_0_0_0.metadata.json").write_bytes(content)
    message = _reset_error(database_copy)
    assert "pano_0_0_0.metadata.json" in message and expected in message


# -- street_views/<id>.jpg --


def _cut_in_half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_cut_in_half, "could not be decoded as an image (image file is truncated"),
        (lambda path: b"", "could not be decoded as an image"),
        (lambda path: b"\xff\xd8\xff" + bytes(range(256)) * 4, "could not be decoded as an image"),
        (lambda path: jpeg_claiming_size(40_000, 20_000), "its header claims more than"),
        (lambda path: jpeg_claiming_size(MAX_PANORAMA_SIZE[0], MAX_PANORAMA_SIZE[1] + 1), "its header claims 16384 x 8193 = 134,234,112 pixels"),
    ],
    ids=["truncated", "empty", "garbage", "bomb-40000x20000", "just-over-the-limit"],
)
def test_damaged_or_oversized_panorama(database_copy: Path, content: Callable[[Path], bytes], expected: str) -> None:
    image_path = database_copy / "street_views" / "pano_0_0_0.jpg"
    image_path.write_bytes(content(image_path))
    message = _reset_error(database_copy)
    assert f"{image_path}" in message and expected in message
    if "claims" in message:
        assert "a panorama has at most 16384 x 8192 = 134,217,728, so the file is damaged or not a panorama" in message


def test_a_full_size_panorama_is_accepted_without_a_warning(database_copy: Path) -> None:
    image_path = database_copy / "street_views" / "pano_0_0_0.jpg"
    image_path.write_bytes(jpeg_claiming_size(*MAX_PANORAMA_SIZE))  # Street View's largest size: above PIL's warning threshold
    database = PublishedRouteDatabase(database_copy, need_views=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        packed, _ = database.panorama("pano_0_0_0", min_width=400)
    assert packed.shape == (MAX_PANORAMA_SIZE[1] // 8, MAX_PANORAMA_SIZE[0] // 8)  # decoded at 1/8 scale


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
def test_perspective_view_refuses_non_finite_angles(value: float) -> None:
    panorama = np.zeros((8, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="heading and rotation must be finite degrees"):
        perspective_view(panorama, value, 0.0, 16)
    with pytest.raises(ValueError, match="heading and rotation must be finite degrees"):
        perspective_view(panorama, 0.0, value, 16)


# -- files outside the database --


@pytest.mark.parametrize("name", ["pano_0_0_0.jpg", "pano_0_0_0.metadata.json", ""], ids=["image", "metadata", "street_views"])
def test_a_panorama_file_linked_from_outside_the_database_is_refused(database_copy: Path, tmp_path: Path, name: str) -> None:
    inside = database_copy / "street_views" / name
    outside = tmp_path / "outside" / (name or "street_views")
    outside.parent.mkdir()
    shutil.move(inside, outside)
    inside.symlink_to(outside)
    message = _reset_error(database_copy)
    assert f"leads outside the database directory {database_copy}" in message and "pano_0_0_0" in message


def test_a_database_reached_through_a_symlink_is_read(database: Path, tmp_path: Path) -> None:
    link = tmp_path / "linked"
    link.symlink_to(database, target_is_directory=True)
    env = gym.make("VIRL-v0", data_dir=link, modality="vision", resolution=RESOLUTION)
    env.reset(seed=0, options={"route": 0})
