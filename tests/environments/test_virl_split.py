"""VIRL-v0's train/val/test split of routes: a fixed function of each route, on the built-in cities and published data."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import environments  # noqa: F401  (registers VIRL-v0)
from environments.splits import TEST_SHARE_PERCENT, VAL_SHARE_PERCENT
from environments.virl.env import VIRLEnv
from environments.virl.published import load_routes
from environments.virl.routes import Location, Milestone, Route, route_key, route_split
from tests.environments.virl_fixtures import ROUTES, FixtureRoute, route_record, write_published_database

RESOLUTION = 64
SPLITS = ("train", "val", "test")
BUILTIN_SPLIT_SIZES = {"builtin": {"train": 706, "val": 107, "test": 187}, "builtin-ood": {"train": 27, "val": 0, "test": 9}}
"""Routes per split; the 187 and 9 test routes are those of the train/test rule before val existed."""
ALL_SPLIT_ROUTE_FOR_SEED = {0: "metro/0850", 1: "metro/0473", 2: "metro/0837", 3: "metro/0811", 4: "metro/0726"}
"""The routes ``split="all"`` drew for these seeds before splits existed; they must never change."""


@functools.cache
def _env(city: str = "builtin", split: str = "all") -> VIRLEnv:
    return VIRLEnv(modality="language", city=city, split=split)


def _builtin_split(route: Route) -> str:
    """The split of a built-in route, whose id is "{city name}/{number}"."""
    return route_split(route, route.route_id.split("/")[0])


def _walk_with_the_expert(env: gym.Env, route: int, seed: int = 0) -> dict:
    env.reset(seed=seed, options={"route": route})
    while True:
        _, reward, terminated, truncated, info = env.step(env.unwrapped.expert_response())
        assert reward == 1.0
        if terminated or truncated:
            assert terminated and not truncated
            return info


def _shifted(route: FixtureRoute, east: float) -> FixtureRoute:
    """The fixture route moved ``east`` metres east (a different route with the same shape)."""
    legs = tuple(((point[0] + east, point[1]), heading, landmark) for point, heading, landmark in route.legs)
    return dataclasses.replace(route, start=(route.start[0] + east, route.start[1]), legs=legs)


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_published_database(tmp_path_factory.mktemp("virl") / "db")


@pytest.fixture(scope="module")
def routes_only_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A language-only database (just ``route_infos.json``) of 60 routes: the fixture's, moved east 1 km at a time."""
    root = tmp_path_factory.mktemp("virl") / "routes_only"
    root.mkdir()
    records = [route_record(_shifted(route, 1000.0 * copy)) for copy in range(20) for route in ROUTES]
    (root / "route_infos.json").write_text(json.dumps([records, len(records)]))
    return root


@pytest.mark.parametrize("city", ["builtin", "builtin-ood"])
def test_splits_are_disjoint_cover_all_routes_and_are_pinned(city: str) -> None:
    every = [route.route_id for route in _env(city).routes]
    by_split = {split: [route.route_id for route in _env(city).routes if _builtin_split(route) == split] for split in SPLITS}
    assert not set(by_split["train"]) & set(by_split["val"]) and not set(by_split["train"]) & set(by_split["test"])
    assert not set(by_split["val"]) & set(by_split["test"])
    assert sorted(by_split["train"] + by_split["val"] + by_split["test"]) == sorted(every)
    assert {split: len(route_ids) for split, route_ids in by_split.items()} == BUILTIN_SPLIT_SIZES[city]
    for split, route_ids in by_split.items():
        if route_ids:  # the environment sees exactly the split's routes, in the source's order
            assert [route.route_id for route in _env(city, split).routes] == route_ids


@pytest.mark.parametrize("city", ["builtin", "builtin-ood"])
def test_test_routes_are_those_of_the_old_train_test_rule(city: str) -> None:
    def old_bucket(route: Route) -> int:
        key = route_key(route, route.route_id.split("/")[0])
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100

    test = [route.route_id for route in _env(city, "test").routes]
    assert test == [route.route_id for route in _env(city).routes if old_bucket(route) < 20]


def test_builtin_ood_has_no_val_route() -> None:
    with pytest.raises(ValueError, match=r"no route of city 'builtin-ood' belongs to split 'val' \(routes are split about 70% train, 10% val"):
        VIRLEnv(modality="language", city="builtin-ood", split="val")


def test_shares_are_near_70_10_20() -> None:
    every = len(_env("builtin").routes)
    assert 0.15 <= len(_env("builtin", "test").routes) / every <= 0.25
    assert 0.07 <= len(_env("builtin", "val").routes) / every <= 0.13
    synthetic = [
        Route(str(i), (Milestone(Location(float(i), 2.0 * i), 90.0),), Location(float(i) + 100.0, 2.0 * i)) for i in range(5000)
    ]
    splits = [route_split(route) for route in synthetic]
    assert abs(splits.count("test") / len(splits) - TEST_SHARE_PERCENT / 100) < 0.02
    assert abs(splits.count("val") / len(splits) - VAL_SHARE_PERCENT / 100) < 0.02


def test_split_depends_on_the_route_not_its_id_heading_or_city_list() -> None:
    route = Route("a", (Milestone(Location(0.0, 0.0), 0.0, "Hotel Alpha is on your left"),), Location(0.0, 60.0), "Hotel Alpha", 90.0)
    assert route_key(route, "metro") == "metro|0.0,0.0;0.0,60.0"
    renamed = dataclasses.replace(route, route_id="b", init_heading=None, destination_name="Other")
    assert route_key(renamed, "metro") == route_key(route, "metro")
    published = dataclasses.replace(route, destination=Location(0.0, 60.0, (40.7505396, -73.99)))
    assert route_key(published).endswith(";40.750540,-73.990000")
    assert [route_split(route, city) for city in ("metro", "oldtown-1", "")] == ["train", "test", "train"]  # pinned: SHA-256 is fixed


@pytest.mark.parametrize("split", SPLITS)
def test_seeded_reset_is_deterministic_within_the_split(split: str) -> None:
    first, second = VIRLEnv(modality="language", split=split), VIRLEnv(modality="language", split=split)
    for seed in range(20):
        obs, info = first.reset(seed=seed)
        assert (obs, info) == second.reset(seed=seed)
        route = first.routes[info["route_index"]]
        assert route.route_id == info["route_id"] and _builtin_split(route) == split


def test_options_route_indexes_the_split() -> None:
    env = VIRLEnv(modality="language", split="test")
    _, info = env.reset(seed=0, options={"route": 3})
    assert info["route_id"] == env.routes[3].route_id and info["route_index"] == 3
    with pytest.raises(ValueError, match="options\\['route'\\].* 0 to 186 \\(split 'test'\\)"):
        env.reset(options={"route": 187})


@pytest.mark.parametrize("split", SPLITS)
def test_check_env_on_splits(split: str) -> None:
    check_env(VIRLEnv(modality="language", split=split), skip_render_check=True)


def test_check_env_on_the_test_split_in_vision() -> None:
    check_env(VIRLEnv(modality="vision", split="test", resolution=RESOLUTION), skip_render_check=True)


@pytest.mark.parametrize("action_space", ["absolute", "relative"])
def test_expert_solves_test_split_routes(action_space: str) -> None:
    env = gym.make("VIRL-v0", modality="language", action_space=action_space, split="test")
    for route in range(0, len(env.unwrapped.routes), 20):
        info = _walk_with_the_expert(env, route, seed=route)
        assert info["success"] and info["step_accuracy"] == 1.0


@pytest.mark.parametrize("city", ["builtin", "builtin-ood"])
def test_expert_solves_test_split_routes_in_vision(city: str) -> None:
    env = gym.make("VIRL-v0", modality="vision", city=city, split="test", resolution=RESOLUTION)
    info = _walk_with_the_expert(env, route=1)
    assert info["success"] and info["step_accuracy"] == 1.0


def test_all_split_is_unchanged() -> None:
    env = VIRLEnv(modality="language")
    assert env.split == "all"
    assert [route.route_id for route in env.routes] == [f"metro/{index:04d}" for index in range(1000)]
    assert {seed: env.reset(seed=seed)[1]["route_id"] for seed in ALL_SPLIT_ROUTE_FOR_SEED} == ALL_SPLIT_ROUTE_FOR_SEED
    explicit = VIRLEnv(modality="language", split="all")
    assert [explicit.reset(seed=seed)[1]["route_id"] for seed in range(20)] == [env.reset(seed=seed)[1]["route_id"] for seed in range(20)]


@pytest.mark.parametrize("split", ["validation", "TEST", None])
def test_bad_split_names_the_choices(split: object) -> None:
    with pytest.raises(ValueError, match=r"split must be one of \('all', 'train', 'val', 'test'\); got"):
        VIRLEnv(modality="language", split=split)


def test_published_fixture_with_a_split(database: Path) -> None:
    assert [route_split(route) for route in load_routes(database)] == ["train", "train", "train"]  # pinned
    env = gym.make("VIRL-v0", data_dir=database, modality="vision", split="train", resolution=RESOLUTION)
    assert len(env.unwrapped.routes) == len(ROUTES)
    for index in range(len(ROUTES)):
        info = _walk_with_the_expert(env, index, seed=index)
        assert info["success"]
    with pytest.raises(ValueError, match=r"no route of the 3 route\(s\) in .* belongs to split 'test'.*split='all'"):
        gym.make("VIRL-v0", data_dir=database, modality="vision", split="test", resolution=RESOLUTION)


def test_published_split_is_a_function_of_each_route(routes_only_database: Path, tmp_path: Path) -> None:
    every = load_routes(routes_only_database)
    train = VIRLEnv(data_dir=routes_only_database, modality="language", split="train").routes
    val = VIRLEnv(data_dir=routes_only_database, modality="language", split="val").routes
    test = VIRLEnv(data_dir=routes_only_database, modality="language", split="test").routes
    assert (len(train), len(val), len(test)) == (39, 5, 16)  # pinned
    assert list(train) == [route for route in every if route_split(route) == "train"]
    assert list(val) == [route for route in every if route_split(route) == "val"]
    assert list(test) == [route for route in every if route_split(route) == "test"]
    test_keys = {route_key(route) for route in test}

    # reversed and cut to half, the database still puts each remaining route on the same side
    records, _ = json.loads((routes_only_database / "route_infos.json").read_text())
    half = records[::-1][: len(records) // 2]
    (tmp_path / "route_infos.json").write_text(json.dumps([half, len(half)]))
    reordered = VIRLEnv(data_dir=tmp_path, modality="language", split="test").routes
    assert {route_key(route) for route in reordered} == test_keys & {route_key(route) for route in load_routes(tmp_path)}

    env = gym.make("VIRL-v0", data_dir=routes_only_database, modality="language", split="test")
    rng = np.random.default_rng(0)
    for route in rng.choice(len(test), size=3, replace=False).tolist():
        assert _walk_with_the_expert(env, route, seed=route)["success"]
