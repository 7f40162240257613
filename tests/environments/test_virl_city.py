"""The built-in VIRL cities: generation, routes and the street-view renderer."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest

from environments.virl.city import (
    CITY_SETS,
    LANDMARK_CATEGORIES,
    LANDMARK_RADIUS_M,
    generate_city,
    load_city_set,
)
from environments.virl.geometry import COMPASS_NAMES, RELATIVE_TURNS, compass_name, relative_turn
from environments.virl.routes import build_rail
from environments.virl.street_view import STYLES, StreetViewRenderer
from environments.virl.view_grid import SEPARATOR_PX, compose_grid, view_headings

RESOLUTION = 96


@functools.cache
def _renderer(name: str = "builtin", index: int = 0) -> StreetViewRenderer:
    return StreetViewRenderer(load_city_set(name)[index])


def test_builtin_city_has_a_thousand_distinct_routes_with_every_heading_and_turn() -> None:
    (city,) = load_city_set("builtin")
    assert len(city.routes) >= 1000
    assert len({route.route_id for route in city.routes}) == len(city.routes)
    signatures = {(route.start, route.destination) for route in city.routes}
    assert len(signatures) == len(city.routes)
    headings, turns = set(), set()
    for route in city.routes:
        previous = route.init_heading
        assert previous is not None and 1 <= route.num_intersections <= 5
        for index, milestone in enumerate(route.milestones):
            assert milestone.heading_name == compass_name(milestone.heading)
            headings.add(milestone.heading_name)
            if index:
                turns.add(relative_turn(previous, milestone.heading))
            previous = milestone.heading
        assert route.milestones[-1].landmark.startswith(route.destination_name + " is on your ")
    assert headings == set(COMPASS_NAMES)
    assert turns == set(RELATIVE_TURNS)


def test_city_generation_is_deterministic_and_quick() -> None:
    layout = CITY_SETS["builtin-ood"][0]
    generate_city.cache_clear()
    start = time.perf_counter()
    first = generate_city(layout)
    elapsed = time.perf_counter() - start
    generate_city.cache_clear()
    second = generate_city(layout)
    assert first.routes == second.routes
    assert np.array_equal(first.building_corners, second.building_corners)
    assert elapsed < 3.0


def test_street_network_is_not_a_perfect_grid() -> None:
    (city,) = load_city_set("builtin")
    vectors = city.nodes[city.streets[:, 1]] - city.nodes[city.streets[:, 0]]
    lengths = np.hypot(vectors[:, 0], vectors[:, 1])
    angles = np.degrees(np.arctan2(vectors[:, 0], vectors[:, 1])) % 90
    assert lengths.max() > 1.6 * lengths.min()  # varied blocks
    assert ((angles > 15) & (angles < 75)).sum() >= 5  # diagonal avenues
    layout = city.layout
    full_grid = layout.columns * (layout.rows - 1) + layout.rows * (layout.columns - 1)
    orthogonal = ((angles < 15) | (angles > 75)).sum()
    assert orthogonal < full_grid  # some streets are missing


def test_landmarks_are_named_uniquely_and_sit_at_intersections_and_mid_block() -> None:
    (city,) = load_city_set("builtin")
    names = [name for name in city.building_names if name]
    assert len(names) == len(set(names)) >= 100
    centres = city.building_corners.mean(axis=1)
    landmark = np.array([bool(name) for name in city.building_names])
    distance = np.hypot(*(centres[:, None, :] - city.nodes[None, :, :]).transpose(2, 0, 1)).min(axis=1)
    assert (landmark & (distance <= LANDMARK_RADIUS_M)).sum() >= 50
    assert (landmark & (distance > LANDMARK_RADIUS_M + 5)).sum() >= 30


def test_ood_set_is_smaller_and_styled_differently() -> None:
    cities = load_city_set("builtin-ood")
    assert len(cities) == 3
    assert 24 <= sum(len(city.routes) for city in cities) <= 60
    assert {city.layout.style for city in cities} == {"oldtown"}
    assert load_city_set("builtin")[0].layout.style == "metro"
    metro, oldtown = STYLES["metro"], STYLES["oldtown"]
    assert metro.sign_font != oldtown.sign_font and set(metro.wall_colors).isdisjoint(oldtown.wall_colors)
    with pytest.raises(ValueError, match="city must be one of"):
        load_city_set("atlantis")


def test_views_are_deterministic_and_change_with_heading_and_position() -> None:
    renderer = _renderer()
    route = renderer.city.routes[0]
    rail = build_rail(route, route.init_heading)
    point = rail.points[3]
    east, north = point.location.east, point.location.north
    view = renderer.render_view(east, north, point.heading, RESOLUTION)
    assert view.shape == (RESOLUTION, RESOLUTION, 3) and view.dtype == np.uint8
    assert np.array_equal(view, StreetViewRenderer(renderer.city).render_view(east, north, point.heading, RESOLUTION))
    turned = renderer.render_view(east, north, point.heading + 30, RESOLUTION)
    moved = renderer.render_view(east + 8 * np.sin(np.radians(point.heading)), north + 8 * np.cos(np.radians(point.heading)), point.heading, RESOLUTION)
    assert np.abs(view.astype(int) - turned).mean() > 5
    assert np.abs(view.astype(int) - moved).mean() > 2


def test_views_show_sky_road_and_facades() -> None:
    renderer = _renderer()
    route = renderer.city.routes[1]
    point = build_rail(route, route.init_heading).points[-1]  # at the destination: a landmark on the side
    view = renderer.render_view(point.location.east, point.location.north, point.heading, RESOLUTION)
    style = renderer.style
    top_centre = view[1, RESOLUTION // 2].astype(int)
    assert np.abs(top_centre - np.array(style.sky_top)).sum() < 60  # sky above the street ahead
    bottom_row = view[-1].astype(int)
    on_asphalt = np.abs(bottom_row - np.array(style.asphalt)).sum(axis=1) < 30
    assert on_asphalt.mean() > 0.5  # road under the camera
    distinct = len(np.unique(view.reshape(-1, 3), axis=0))
    assert distinct > 100  # facades, windows, signs: far from a flat picture


def test_grid_is_front_right_back_left() -> None:
    renderer = _renderer()
    route = renderer.city.routes[2]
    point = build_rail(route, route.init_heading).points[0]
    east, north, heading = point.location.east, point.location.north, point.heading
    grid = renderer.render_grid(east, north, heading, RESOLUTION)
    offset = RESOLUTION + SEPARATOR_PX
    expected = [renderer.render_view(east, north, h, RESOLUTION) for h in view_headings(heading)]
    assert np.array_equal(grid[:RESOLUTION, :RESOLUTION], expected[0])  # front
    assert np.array_equal(grid[:RESOLUTION, offset:], expected[1])  # right
    assert np.array_equal(grid[offset:, :RESOLUTION], expected[2])  # back
    assert np.array_equal(grid[offset:, offset:], expected[3])  # left
    assert np.array_equal(grid, compose_grid(expected))
    assert view_headings(350.0) == (350.0, 80.0, 170.0, 260.0)


def _sign_pixels(view: np.ndarray, background: tuple[int, int, int]) -> int:
    return int((np.abs(view.astype(int) - np.array(background)).sum(axis=2) < 12).sum())


def test_destination_sign_faces_the_side_the_phrase_names() -> None:
    renderer = _renderer()
    checked = 0
    for route in renderer.city.routes[:40]:
        point = build_rail(route, route.init_heading).points[-1]
        relation = point.landmark.rsplit(" is on your ", 1)[1]
        if relation not in ("left", "right"):
            continue
        building = renderer.city.building_names.index(route.destination_name)
        category = renderer.city.building_categories[building]
        background = renderer.style.sign_colors[LANDMARK_CATEGORIES.index(category) % len(renderer.style.sign_colors)][0]
        if max(background) - min(background) < 80:
            continue  # greys and creams also occur on facades; only count vivid sign colours
        east, north = point.location.east, point.location.north
        side = renderer.render_view(east, north, point.heading + (90 if relation == "right" else 270), 128)
        other = renderer.render_view(east, north, point.heading + (270 if relation == "right" else 90), 128)
        assert _sign_pixels(side, background) > 150, route.route_id
        assert _sign_pixels(side, background) > 3 * _sign_pixels(other, background), route.route_id
        checked += 1
    assert checked >= 8


def test_render_speed_sanity() -> None:
    renderer = _renderer()
    route = renderer.city.routes[3]
    point = build_rail(route, route.init_heading).points[1]
    renderer.render_grid(point.location.east, point.location.north, point.heading, 448)
    start = time.perf_counter()
    for heading in range(0, 360, 45):
        renderer.render_grid(point.location.east, point.location.north, heading, 448)
    assert (time.perf_counter() - start) / 8 < 0.25  # a generous bound; the benchmark measures the real figure
