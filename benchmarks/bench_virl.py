"""VIRL-v0 throughput (oracle expert steps) and street-view rendering

Steps are measured through ``gym.make`` (with Gymnasium's checker and order wrappers, as users run
it) on the built-in city, the expert answering every point correctly, resets included; every
vision step renders a new 2x2 view grid. Baselines timed in the same run: vision at the reference's
1200 px views, the grid render at 1200 px, and the published-data crop with the panorama decoded
from JPEG every time instead of kept in the small cache.
"""

from __future__ import annotations

import json
import pickle
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from PIL import Image

import environments  # noqa: F401
from benchmarks.common import Measurement, rate, seconds_per_call
from environments.virl.city import CITY_SETS, generate_city
from environments.virl.env import DEFAULT_RESOLUTION
from environments.virl.published import PublishedRouteDatabase
from environments.virl.routes import Location, build_rail
from environments.virl.street_view import StreetViewRenderer

REFERENCE_RESOLUTION = 1200


def _expert_stepper(modality: str, resolution: int = DEFAULT_RESOLUTION):
    env = gym.make("VIRL-v0", modality=modality, resolution=resolution)
    env.reset(seed=0)

    def step() -> None:
        _, reward, terminated, truncated, _ = env.step(env.unwrapped.expert_response())
        assert reward == 1.0
        if terminated or truncated:
            env.reset()

    return step


def _grid_renderer(resolution: int):
    city = generate_city(CITY_SETS["builtin"][0])
    renderer = StreetViewRenderer(city)
    points = [p for route in city.routes[:50] for p in build_rail(route, route.init_heading).points]
    position = iter(range(10**9))

    def render() -> None:
        point = points[next(position) % len(points)]
        renderer.render_grid(point.location.east, point.location.north, point.heading, resolution)

    render()
    return render


def _published_grid(folder: Path, cached: bool):
    """Grids cut from one 4096 x 2048 panorama of a one-route database written to ``folder``."""
    route = {
        "start_place": {"relocated_geocode": [40.75, -73.99]},
        "route_results": {"geocode_list": [[40.7505, -73.99]]},
        "dest_place": {"name": "x"},
        "milestone_info": '{"to_next_intersection_heading": "0 (north)"}',
    }
    (folder / "route_infos.json").write_text(json.dumps([[route], 1]))
    (folder / "street_views").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    panorama = rng.integers(0, 255, size=(256, 512, 3), dtype=np.uint8).repeat(8, axis=0).repeat(8, axis=1)
    Image.fromarray(panorama).save(folder / "street_views" / "p.jpg", quality=90)
    (folder / "street_views" / "p.metadata.json").write_text(json.dumps({"rotation": 12.5}))
    (folder / "gps_pano_mapping.pkl").write_bytes(pickle.dumps({(40.75, -73.99): "p"}))
    database = PublishedRouteDatabase(folder, need_views=True)
    location = Location(0.0, 0.0, (40.75, -73.99))
    heading = iter(range(10**9))

    def render() -> None:
        if not cached:
            database._panoramas.clear()
        database.render_grid(location, float(next(heading) % 360), DEFAULT_RESOLUTION)

    render()
    return render


def _city_generation_seconds() -> float:
    generate_city.cache_clear()
    start = time.perf_counter()
    generate_city(CITY_SETS["builtin"][0])
    return time.perf_counter() - start


def run() -> list[Measurement]:
    """Expert steps per second in language and vision modality, grid render times, city generation time."""
    language = rate(_expert_stepper("language"), 500, min_seconds=3.0)
    vision_reference = rate(_expert_stepper("vision", REFERENCE_RESOLUTION), 5, min_seconds=3.0)
    vision = rate(_expert_stepper("vision"), 20, min_seconds=3.0)
    grid = seconds_per_call(_grid_renderer(DEFAULT_RESOLUTION), 20, min_seconds=2.0)
    grid_reference = seconds_per_call(_grid_renderer(REFERENCE_RESOLUTION), 5, min_seconds=2.0)
    with tempfile.TemporaryDirectory() as folder:
        crop_cached = seconds_per_call(_published_grid(Path(folder), cached=True), 20, min_seconds=1.5)
        crop_uncached = seconds_per_call(_published_grid(Path(folder), cached=False), 5, min_seconds=1.5)
    generation = min(_city_generation_seconds() for _ in range(3))
    px = f"{DEFAULT_RESOLUTION} px views"
    return [
        Measurement("VIRL-v0 language, expert steps", language, "steps/s", target=">= 2000 steps/s", met=language >= 2000),
        Measurement(
            f"VIRL-v0 vision, expert steps, {px}",
            vision,
            "steps/s",
            baseline_name=f"{REFERENCE_RESOLUTION} px views (reference size)",
            baseline_value=vision_reference,
            target=">= 50 steps/s",
            met=vision >= 50,
        ),
        Measurement(
            f"render one 2x2 view grid, built-in city, {px}",
            grid * 1000,
            "ms",
            baseline_name=f"{REFERENCE_RESOLUTION} px views",
            baseline_value=grid_reference * 1000,
            target="<= 20 ms (room for 50 steps/s)",
            met=grid * 1000 <= 20,
            lower_is_better=True,
        ),
        Measurement(
            f"published data: 2x2 grid cut from a cached 4096x2048 panorama, {px}",
            crop_cached * 1000,
            "ms",
            baseline_name="panorama decoded from JPEG every time",
            baseline_value=crop_uncached * 1000,
            lower_is_better=True,
        ),
        Measurement(
            "built-in city generation (1000 routes), cold", generation, "s", target="<= 2 s", met=generation <= 2.0, lower_is_better=True
        ),
    ]
