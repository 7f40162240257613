"""VIRL-v0 on the published V-IRL on-disk format, with a tiny database written by the test."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import environments  # noqa: F401  (registers VIRL-v0)
from environments.virl.panorama import perspective_view
from environments.virl.published import PublishedRouteDatabase, load_routes, parse_milestone_info
from environments.virl.routes import build_rail
from tests.environments.virl_fixtures import (
    MARKER_HEADING,
    ROUTES,
    horizon_row,
    local_to_geocode,
    marker_column,
    panorama_image,
    write_published_database,
)

RESOLUTION = 64


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_published_database(tmp_path_factory.mktemp("virl") / "db")


@pytest.fixture
def database_copy(database: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(database, tmp_path / "db"))


def test_loader_builds_the_routes_and_instructions(database: Path) -> None:
    routes = load_routes(database)
    assert len(routes) == len(ROUTES)
    for route, spec in zip(routes, ROUTES, strict=True):
        assert len(route.milestones) == len(spec.legs)
        assert route.destination_name == spec.destination_name
        assert route.start.geocode == pytest.approx(local_to_geocode(*spec.start))
        assert (route.start.east, route.start.north) == pytest.approx((0.0, 0.0))
        destination = spec.legs[-1][0]
        assert route.destination.east == pytest.approx(destination[0] - spec.start[0], abs=1e-3)
        assert route.destination.north == pytest.approx(destination[1] - spec.start[1], abs=1e-3)
        if spec.instructions:
            assert route.init_heading == spec.init_heading
            assert build_rail(route, route.init_heading).instructions == spec.instructions
        else:
            assert route.init_heading is None  # 0 in the file: random at reset


def test_rail_of_the_first_route(database: Path) -> None:
    route = load_routes(database)[0]
    rail = build_rail(route, route.init_heading)
    kinds = [p.kind for p in rail.points]
    assert kinds == ["start"] + ["forward"] * 5 + ["intersection"] + ["forward"] * 5 + ["intersection"] + ["forward"] * 5 + ["destination"]
    intersection = rail.points[6]
    assert intersection.observation == "Hotel Alpha is on your right front; You observe an intersection"
    assert intersection.absolute_action == "turn_direction(east)" and intersection.relative_action == "turn_direction(right)"
    assert rail.points[12].observation == "No landmarks nearby; You observe an intersection"
    assert rail.points[-1].observation == "Beta Bank is on your left" and rail.points[-1].absolute_action == "stop()"
    # in-between points keep their geocodes, interpolated between the leg's ends
    second = rail.points[2]
    start, first_intersection = route.milestones[0].location.geocode, route.milestones[1].location.geocode
    assert second.location.geocode == pytest.approx(tuple(a + (b - a) * 2 / 6 for a, b in zip(start, first_intersection, strict=True)))


def test_milestone_info_parser() -> None:
    text = '{\n"intersection_idx": "0",\n"landmarks": "A is on your left",\n"to_next_intersection_heading": "177 (south)",\n}\n{\n"to_next_intersection_heading": "3 (north)",\n}'
    assert parse_milestone_info(text) == [
        {"intersection_idx": "0", "landmarks": "A is on your left", "to_next_intersection_heading": "177 (south)"},
        {"to_next_intersection_heading": "3 (north)"},
    ]


@pytest.mark.parametrize("rotation", [0.0, 37.0, 200.0, 333.0])
def test_perspective_crop_puts_the_marker_where_geometry_says(rotation: float) -> None:
    panorama = panorama_image(rotation)
    half = RESOLUTION / 2
    for offset in (0.0, 30.0, -30.0, 40.0):
        view = perspective_view(panorama, MARKER_HEADING - offset, rotation, RESOLUTION)
        assert view.shape == (RESOLUTION, RESOLUTION, 3)
        expected = half + math.tan(math.radians(offset)) * half - 0.5  # 90-degree field of view: focal = half
        assert abs(marker_column(view) - expected) <= 1.5, (rotation, offset)
        assert abs(horizon_row(view) - (half - 0.5)) <= 1.5
    away = perspective_view(panorama, MARKER_HEADING + 180.0, rotation, RESOLUTION)
    assert (away[..., 0].astype(int) - away[..., 1]).max() < 60  # the marker is behind this view


def test_vision_grid_shows_the_views_at_the_stated_headings(database: Path) -> None:
    env = gym.make("VIRL-v0", data_dir=database, modality="vision", resolution=RESOLUTION)
    obs, info = env.reset(seed=0, options={"route": 0})
    grid = obs["image"]
    assert grid.shape == (2 * RESOLUTION + 5, 2 * RESOLUTION + 5, 3)
    facing = env.unwrapped.rail.points[0].heading  # 90: front east, right south, back west, left north
    offset = RESOLUTION + 5
    quadrants = {
        "front": grid[:RESOLUTION, :RESOLUTION],
        "right": grid[:RESOLUTION, offset:],
        "back": grid[offset:, :RESOLUTION],
        "left": grid[offset:, offset:],
    }
    assert (grid[RESOLUTION:offset] == 0).all() and (grid[:, RESOLUTION:offset] == 0).all()
    view_heading = {"front": facing, "right": facing + 90, "back": facing + 180, "left": facing + 270}
    for name, view in quadrants.items():
        relative = (MARKER_HEADING - view_heading[name] + 180) % 360 - 180
        if abs(relative) < 40:
            expected = RESOLUTION / 2 + math.tan(math.radians(relative)) * RESOLUTION / 2 - 0.5
            assert abs(marker_column(view) - expected) <= 1.5, name
        else:
            assert (view[..., 0].astype(int) - view[..., 1]).max() < 60, name
    env.close()


@pytest.mark.parametrize("modality", ["language", "vision"])
@pytest.mark.parametrize("action_space", ["absolute", "relative"])
def test_expert_finishes_every_route(database: Path, modality: str, action_space: str) -> None:
    env = gym.make("VIRL-v0", data_dir=database, modality=modality, action_space=action_space, resolution=RESOLUTION)
    for index in range(len(ROUTES)):
        obs, info = env.reset(seed=index, options={"route": index})
        rewards = []
        while True:
            obs, reward, terminated, truncated, info = env.step(env.unwrapped.expert_response())
            rewards.append(reward)
            assert obs["text"] in env.observation_space["text"]
            if terminated or truncated:
                break
        assert terminated and not truncated and info["success"]
        assert info["step_accuracy"] == 1.0 and set(rewards) == {1.0}
        assert len(rewards) == info["num_points"]
    env.close()


def test_language_needs_only_the_route_file(database: Path, tmp_path: Path) -> None:
    only_routes = tmp_path / "routes_only"
    only_routes.mkdir()
    shutil.copy(database / "route_infos.json", only_routes)
    env = gym.make("VIRL-v0", data_dir=only_routes, modality="language")
    env.reset(seed=0)
    with pytest.raises(FileNotFoundError, match="gps_pano_mapping.pkl"):
        gym.make("VIRL-v0", data_dir=only_routes, modality="vision")


def test_random_initial_heading_for_zero(database: Path) -> None:
    env = gym.make("VIRL-v0", data_dir=database, modality="language")
    headings = {env.unwrapped.rail.init_heading for _ in range(8) if env.reset(options={"route": 2})}
    assert len(headings) > 1
    env.reset(seed=5, options={"route": 2})
    first = env.unwrapped.rail
    env.reset(seed=5, options={"route": 2})
    assert env.unwrapped.rail == first


def test_missing_route_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="route_infos.json"):
        gym.make("VIRL-v0", data_dir=tmp_path, modality="language")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        gym.make("VIRL-v0", data_dir=tmp_path / "nowhere", modality="language")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"routes": []}', r"\[route_list, route_count\]"),
        ("[[], 0]", "no routes"),
        ('[[{"start_place": {}}], 1]', "start_place.relocated_geocode"),
        ('[[{"start_place": {"relocated_geocode": [1, 2]}, "route_results": {"geocode_list": [[1, 2]]}, "milestone_info": ""}], 1]', "1 points"),
        (
            '[[{"start_place": {"relocated_geocode": [1, 2]}, "route_results": {"geocode_list": [[1, 2]]}, '
            '"milestone_info": "{\\"to_next_intersection_heading\\": \\"south\\"}"}], 1]',
            "to_next_intersection_heading",
        ),
        ('[[{"start_place": {"relocated_geocode": [1]}, "route_results": {"geocode_list": [[1, 2]]}, "milestone_info": ""}], 1]', r"\[lat, lng\]"),
    ],
)
def test_malformed_route_file(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "route_infos.json").write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_routes(tmp_path)
    assert "route_infos.json" in str(error.value)


def test_malformed_mapping(database_copy: Path) -> None:
    (database_copy / "gps_pano_mapping.pkl").write_bytes(pickle.dumps(["not", "a", "dict"]))
    with pytest.raises(ValueError, match="gps_pano_mapping.pkl"):
        PublishedRouteDatabase(database_copy, need_views=True)
    (database_copy / "gps_pano_mapping.pkl").write_bytes(pickle.dumps({(1.0, 2.0): np.float64}))  # a class: not plain data
    with pytest.raises(ValueError, match="gps_pano_mapping.pkl"):
        PublishedRouteDatabase(database_copy, need_views=True)


def test_missing_panorama_files(database_copy: Path) -> None:
    env = gym.make("VIRL-v0", data_dir=database_copy, modality="vision", resolution=RESOLUTION)
    for path in (database_copy / "street_views").glob("pano_0_0_0.*"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"pano_0_0_0\.jpg"):
        env.reset(seed=0, options={"route": 0})
    (database_copy / "street_views" / "pano_0_0_0.jpg").write_bytes(b"not a jpeg")
    (database_copy / "street_views" / "pano_0_0_0.metadata.json").write_text(json.dumps({"heading": 3}))
    with pytest.raises(ValueError, match=r"pano_0_0_0\.metadata\.json.*rotation"):
        env.reset(seed=0, options={"route": 0})
    (database_copy / "street_views" / "pano_0_0_0.metadata.json").write_text(json.dumps({"rotation": 3}))
    with pytest.raises(ValueError, match=r"pano_0_0_0\.jpg could not be decoded"):
        env.reset(seed=0, options={"route": 0})
    shutil.rmtree(database_copy / "street_views")
    with pytest.raises(FileNotFoundError, match="street_views"):
        gym.make("VIRL-v0", data_dir=database_copy, modality="vision")


def _drop_panoramas(database: Path, names: set[str]) -> None:
    mapping = pickle.loads((database / "gps_pano_mapping.pkl").read_bytes())
    kept = {key: value for key, value in mapping.items() if value not in names}
    (database / "gps_pano_mapping.pkl").write_bytes(pickle.dumps(kept))


def test_inbetween_points_without_a_panorama_are_skipped(database_copy: Path) -> None:
    # route 0's first leg runs 60 m north with panoramas every 7.5 m; without those at 15..45 m the
    # in-between point at 30 m has none within 20 m, while those at 10, 20, 40 and 50 m still do
    _drop_panoramas(database_copy, {f"pano_0_0_{step}" for step in range(2, 7)})
    distances = {}
    for modality in ("language", "vision"):
        env = gym.make("VIRL-v0", data_dir=database_copy, modality=modality, resolution=RESOLUTION)
        distances[modality] = set()
        for seed in range(12):
            env.reset(seed=seed, options={"route": 0})
            points = env.unwrapped.rail.points
            distances[modality] |= {round(p.location.north) for p in points if p.kind == "forward" and p.instruction_index == 1}
    assert distances["language"] == {10, 20, 30, 40, 50}
    assert distances["vision"] == {10, 20, 40, 50}


def test_start_without_a_panorama_is_an_error(database_copy: Path) -> None:
    _drop_panoramas(database_copy, {"pano_0_0_0", "pano_0_0_1", "pano_0_0_2"})
    env = gym.make("VIRL-v0", data_dir=database_copy, modality="vision", resolution=RESOLUTION)
    with pytest.raises(ValueError, match="no panorama within 20 m"):
        env.reset(seed=0, options={"route": 0})
    env.reset(seed=0, options={"route": 1})  # other routes are unaffected


def test_city_and_data_dir_together_is_an_error(database: Path) -> None:
    with pytest.raises(ValueError, match="either city"):
        gym.make("VIRL-v0", data_dir=database, city="builtin-ood")
