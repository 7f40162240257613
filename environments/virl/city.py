"""The built-in offline cities of VIRL-v0: seeded street networks, buildings, named landmarks and routes.

A city is generated from a :class:`CityLayout` (all randomness from its seed), in a fraction of a
second, and cached per process. The street network is a grid with varied block lengths, jittered
intersections, some streets missing and a few diagonal avenues, so routes meet all 8 compass
headings and all 4 relative turn kinds. Buildings line both sides of every street; some are
landmarks with a name (a shop, hotel, bank, cafe...) at street corners or mid-block. Routes run
from the front of one building to a landmark, and become the same :class:`~environments.virl.routes.Route`
as the published data.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from environments.virl.geometry import bearing, spatial_relation, wrap_degrees
from environments.virl.routes import Location, Milestone, Route

ROAD_HALF_WIDTH_M = 7.0
"""Half the width of the carriageway (two lanes and parking)."""
SETBACK_M = 11.0
"""Distance from a street's centre line to the building fronts (road plus a 4 m sidewalk)."""
LANDMARK_RADIUS_M = 32.0
"""A landmark this close to an intersection (building centre) is that intersection's landmark."""
MERGE_MAX_TURN_DEG = 25.0
"""A route goes straight through an intersection (no milestone) when its heading changes less than this ..."""
MERGE_MAX_OFFSET_M = 5.0
"""... and the straight leg stays this close to the streets it replaces."""
MIN_LEG_M = 20.0
"""Shortest leg between two milestones (or the destination) of a generated route."""
PLACE_MARGIN_M = 25.0
"""Start and destination buildings are at least this far along their street from either end."""

LANDMARK_CATEGORIES = (
    "Hotel", "Cafe", "Bank", "Bakery", "Pharmacy", "Books", "Pizza", "Florist", "Diner", "Gym",
    "Market", "Dental", "Salon", "Hardware", "Noodle Bar", "Cinema", "Tailor", "Gallery", "Deli", "Toys",
)  # fmt: skip
"""Kinds of named places; the category is the last word(s) of the name ("Juniper Cafe")."""

LANDMARK_WORDS = (
    "Juniper", "Marlowe", "Copper", "Maple", "Harbor", "Sparrow", "Orchid", "Granite", "Willow", "Lantern",
    "Beacon", "Cedar", "Olive", "Saffron", "Atlas", "Meridian", "Pioneer", "Riverside", "Sunrise", "Silver",
    "Blue Fern", "Red Door", "Lucky Star", "Green Leaf", "Old Mill", "Northgate", "Eastwood", "Bluebird",
    "Kestrel", "Magnolia", "Hazel", "Amber", "Cobalt", "Ivory", "Jasper", "Linden", "Mosaic", "Nimbus",
    "Onyx", "Pebble", "Quill", "Rosewood", "Summit", "Tangerine", "Umber", "Velvet", "Walnut", "Zephyr",
    "Aurora", "Birch", "Clover", "Daisy", "Ember", "Falcon", "Garnet", "Heron", "Indigo", "Lotus",
    "Mariner", "Nova", "Oak Hill", "Park Lane", "Regent", "Sterling",
)  # fmt: skip
"""First parts of landmark names; every name in a city is unique."""


@dataclass(frozen=True)
class CityLayout:
    """Everything that shapes one generated city; the same layout always gives the same city."""

    name: str
    seed: int
    style: str = "metro"
    """Street-view style (see :data:`environments.virl.street_view.STYLES`)."""
    columns: int = 10
    rows: int = 10
    block_m: tuple[float, float] = (70.0, 150.0)
    """Range of the distance between neighbouring parallel streets."""
    jitter_m: float = 3.0
    """Intersections move up to this far off the grid, so street headings vary by a few degrees."""
    missing_street_fraction: float = 0.1
    diagonal_streets: int = 3
    diagonal_cells: tuple[int, int] = (3, 6)
    building_width_m: tuple[float, float] = (10.0, 24.0)
    building_depth_m: tuple[float, float] = (12.0, 24.0)
    building_height_m: tuple[float, float] = (9.0, 45.0)
    corner_landmark_probability: float = 0.85
    street_landmark_probability: float = 0.15
    routes: int = 1000
    intersections_per_route: tuple[int, int] = (1, 5)
    route_length_m: tuple[float, float] = (150.0, 1600.0)


CITY_SETS: dict[str, tuple[CityLayout, ...]] = {
    "builtin": (CityLayout("metro", seed=20250101),),
    "builtin-ood": tuple(
        CityLayout(
            f"oldtown-{index + 1}",
            seed=7100 + index,
            style="oldtown",
            columns=7,
            rows=6,
            block_m=(55.0, 120.0),
            jitter_m=4.0,
            missing_street_fraction=0.12,
            diagonal_streets=2,
            diagonal_cells=(2, 4),
            building_width_m=(8.0, 18.0),
            building_depth_m=(10.0, 18.0),
            building_height_m=(8.0, 20.0),
            routes=12,
            route_length_m=(150.0, 900.0),
        )
        for index in range(3)
    ),
}
"""The built-in route sets: ``"builtin"`` (one city, 1000 routes; training and in-distribution) and
``"builtin-ood"`` (three small cities in another visual style, 12 routes each; the visual-OOD test)."""


@dataclass(frozen=True)
class City:
    """A generated city: its streets, buildings, landmarks and routes (arrays are read-only)."""

    layout: CityLayout
    nodes: np.ndarray
    """(N, 2) intersection positions, metres (east, north)."""
    streets: np.ndarray
    """(E, 2) node indices of each straight street segment."""
    building_corners: np.ndarray
    """(B, 4, 2) footprint corners, counter-clockwise, so wall k runs from corner k to corner k + 1
    and, seen from outside, from left to right."""
    building_heights: np.ndarray
    building_facades: np.ndarray
    """(B,) a random number per building; the street-view style picks facade ``number % count``."""
    building_names: tuple[str, ...]
    """Landmark name of each building, "" for a plain one."""
    building_categories: tuple[str, ...]
    routes: tuple[Route, ...]

    @property
    def landmark_count(self) -> int:
        """Buildings with a name."""
        return sum(1 for name in self.building_names if name)


@functools.lru_cache(maxsize=8)
def generate_city(layout: CityLayout) -> City:
    """Generate (or fetch from the per-process cache) the city of ``layout``."""
    rng = np.random.default_rng(layout.seed)
    nodes, streets = _street_network(layout, rng)
    corners, heights, placements = _buildings(layout, nodes, streets, rng)
    names, categories = _landmarks(layout, nodes, corners, rng)
    facades = rng.integers(0, 1 << 16, size=len(corners))
    city = City(
        layout=layout,
        nodes=_read_only(nodes),
        streets=_read_only(streets),
        building_corners=_read_only(corners),
        building_heights=_read_only(heights),
        building_facades=_read_only(facades),
        building_names=tuple(names),
        building_categories=tuple(categories),
        routes=(),
    )
    routes = _routes(city, placements, rng)
    return dataclasses.replace(city, routes=tuple(routes))


def load_city_set(name: str) -> tuple[City, ...]:
    """The cities of a built-in route set (``"builtin"`` or ``"builtin-ood"``)."""
    if name not in CITY_SETS:
        raise ValueError(f"city must be one of {tuple(CITY_SETS)}; got {name!r}")
    return tuple(generate_city(layout) for layout in CITY_SETS[name])


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


# --- street network -------------------------------------------------------------------------------


def _street_network(layout: CityLayout, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cols, rows = layout.columns, layout.rows
    xs = np.concatenate([[0.0], np.cumsum(rng.uniform(*layout.block_m, size=cols - 1))])
    ys = np.concatenate([[0.0], np.cumsum(rng.uniform(*layout.block_m, size=rows - 1))])
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    nodes = grid + rng.uniform(-layout.jitter_m, layout.jitter_m, size=grid.shape)

    def node(i: int, j: int) -> int:
        return j * cols + i

    orthogonal = [(node(i, j), node(i + 1, j)) for j in range(rows) for i in range(cols - 1)]
    orthogonal += [(node(i, j), node(i, j + 1)) for j in range(rows - 1) for i in range(cols)]
    diagonal: list[tuple[int, int]] = []
    used_cells: set[tuple[int, int]] = set()
    for _ in range(layout.diagonal_streets):
        for _attempt in range(20):
            length = int(rng.integers(layout.diagonal_cells[0], layout.diagonal_cells[1] + 1))
            step = 1 if rng.random() < 0.5 else -1
            i = int(rng.integers(0, cols - length)) if step == 1 else int(rng.integers(length, cols))
            j = int(rng.integers(0, rows - length))
            cells = [(min(i + k * step, i + (k + 1) * step), j + k) for k in range(length)]
            if any(cell in used_cells for cell in cells):
                continue
            used_cells.update(cells)
            diagonal += [(node(i + k * step, j + k), node(i + (k + 1) * step, j + k + 1)) for k in range(length)]
            break

    degree = np.zeros(len(nodes), dtype=int)
    for a, b in orthogonal + diagonal:
        degree[a] += 1
        degree[b] += 1
    kept = list(orthogonal)
    for index in rng.permutation(len(orthogonal))[: int(layout.missing_street_fraction * len(orthogonal))]:
        a, b = orthogonal[index]
        if degree[a] <= 3 or degree[b] <= 3:
            continue
        candidate = [edge for edge in kept if edge != (a, b)]
        if _connected(len(nodes), candidate + diagonal):
            kept = candidate
            degree[a] -= 1
            degree[b] -= 1
    return nodes, np.array(kept + diagonal, dtype=np.int64)


def _connected(count: int, edges: list[tuple[int, int]]) -> bool:
    neighbours: list[list[int]] = [[] for _ in range(count)]
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    seen, frontier = {0}, [0]
    while frontier:
        current = frontier.pop()
        for other in neighbours[current]:
            if other not in seen:
                seen.add(other)
                frontier.append(other)
    return len(seen) == count


# --- buildings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """Where a building stands: its street, and how far along it the middle of its front is."""

    street: int
    along_m: float
    """Distance of the front's centre from the street's first node."""


class _Occupancy:
    """A 1 m raster of the ground that streets and buildings have taken."""

    def __init__(self, nodes: np.ndarray, streets: np.ndarray, margin: float = 40.0) -> None:
        self.origin = nodes.min(axis=0) - margin
        size = np.ceil(nodes.max(axis=0) + margin - self.origin).astype(int)
        image = Image.new("L", (int(size[0]), int(size[1])), 0)
        draw = ImageDraw.Draw(image)
        corridor = SETBACK_M - 0.5
        for a, b in streets:
            draw.line([self._pixel(nodes[a]), self._pixel(nodes[b])], fill=1, width=int(2 * corridor))
        for point in nodes:
            x, y = self._pixel(point)
            draw.ellipse([x - corridor, y - corridor, x + corridor, y + corridor], fill=1)
        self.taken = np.array(image, dtype=bool)

    def _pixel(self, point: np.ndarray) -> tuple[float, float]:
        return float(point[0] - self.origin[0]), float(point[1] - self.origin[1])

    def _window(self, centre: np.ndarray, axis_u: np.ndarray, half_u: float, half_v: float, margin: float):
        """The raster window around a rectangle and the mask of its cells inside it (None off the raster)."""
        reach = np.array(
            [abs(axis_u[0]) * half_u + abs(axis_u[1]) * half_v, abs(axis_u[1]) * half_u + abs(axis_u[0]) * half_v]
        ) + (margin + 1)
        low = np.floor(centre - self.origin - reach).astype(int)
        high = np.ceil(centre - self.origin + reach).astype(int)
        if (low < 0).any() or high[0] >= self.taken.shape[1] or high[1] >= self.taken.shape[0]:
            return None
        dx = np.arange(low[0], high[0]) + 0.5 + self.origin[0] - centre[0]
        dy = (np.arange(low[1], high[1]) + 0.5 + self.origin[1] - centre[1])[:, None]
        along = np.abs(dx * axis_u[0] + dy * axis_u[1])
        across = np.abs(dy * axis_u[0] - dx * axis_u[1])
        inside = (along <= half_u + margin) & (across <= half_v + margin)
        return self.taken[low[1] : high[1], low[0] : high[0]], inside

    def try_take(self, centre: np.ndarray, axis_u: np.ndarray, half_u: float, half_v: float) -> bool:
        """Take the rectangle if it (with a 0.6 m margin) touches nothing taken; report success."""
        window = self._window(centre, axis_u, half_u, half_v, margin=0.6)
        if window is None or window[0][window[1]].any():
            return False
        cells, inside = self._window(centre, axis_u, half_u, half_v, margin=0.0)
        cells[inside] = True
        return True


def _buildings(
    layout: CityLayout, nodes: np.ndarray, streets: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[_Placement]]:
    occupancy = _Occupancy(nodes, streets)
    corners: list[np.ndarray] = []
    heights: list[float] = []
    placements: list[_Placement] = []
    min_width = layout.building_width_m[0]
    for street in rng.permutation(len(streets)):
        a, b = nodes[streets[street, 0]], nodes[streets[street, 1]]
        length = float(np.hypot(*(b - a)))
        axis_u = (b - a) / length
        left = np.array([-axis_u[1], axis_u[0]])
        for side in (1.0, -1.0):
            along = SETBACK_M + 1.0
            while along + min_width <= length - SETBACK_M - 1.0:
                width = min(float(rng.uniform(*layout.building_width_m)), length - SETBACK_M - 1.0 - along)
                depth = float(rng.uniform(*layout.building_depth_m))
                placed = False
                for trial_depth in (depth, depth * 0.6):
                    centre = a + axis_u * (along + width / 2) + left * side * (SETBACK_M + trial_depth / 2)
                    if occupancy.try_take(centre, axis_u, width / 2, trial_depth / 2):
                        front = a + axis_u * along + left * side * SETBACK_M
                        back = front + left * side * trial_depth
                        quad = np.array([front, front + axis_u * width, back + axis_u * width, back])
                        if _signed_area(quad) < 0:
                            quad = quad[::-1]
                        corners.append(quad)
                        heights.append(float(rng.uniform(*layout.building_height_m)))
                        placements.append(_Placement(int(street), along + width / 2))
                        placed = True
                        break
                along += width + float(rng.uniform(0.8, 3.0)) if placed else 3.0
    return np.array(corners), np.array(heights), placements


def _signed_area(quad: np.ndarray) -> float:
    x, y = quad[:, 0], quad[:, 1]
    return 0.5 * float(x @ y[[1, 2, 3, 0]] - x[[1, 2, 3, 0]] @ y)


# --- landmarks ------------------------------------------------------------------------------------


def _landmarks(
    layout: CityLayout, nodes: np.ndarray, corners: np.ndarray, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    centres = corners.mean(axis=1)
    distance = np.hypot(*(centres[None, :, :] - nodes[:, None, :]).transpose(2, 0, 1))  # (N, B)
    is_landmark = np.zeros(len(corners), dtype=bool)
    for node in rng.permutation(len(nodes)):
        near = np.flatnonzero(distance[node] <= LANDMARK_RADIUS_M)
        if len(near) and not is_landmark[near].any() and rng.random() < layout.corner_landmark_probability:
            is_landmark[rng.choice(near)] = True
    mid_block = distance.min(axis=0) > LANDMARK_RADIUS_M + 5
    is_landmark |= mid_block & (rng.random(len(corners)) < layout.street_landmark_probability)

    combinations = [(word, category) for word in LANDMARK_WORDS for category in LANDMARK_CATEGORIES]
    landmark_indices = np.flatnonzero(is_landmark)
    if len(landmark_indices) > len(combinations):
        raise ValueError(f"city {layout.name!r} needs {len(landmark_indices)} landmark names but only {len(combinations)} exist")
    chosen = rng.choice(len(combinations), size=len(landmark_indices), replace=False)
    names = [""] * len(corners)
    categories = [""] * len(corners)
    for building, combination in zip(landmark_indices, chosen, strict=True):
        word, category = combinations[combination]
        names[building] = f"Hotel {word}" if category == "Hotel" and rng.random() < 0.5 else f"{word} {category}"
        categories[building] = category
    return names, categories


# --- routes ---------------------------------------------------------------------------------------


def _shortest_paths(nodes: np.ndarray, streets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs street distances and next hops (Floyd-Warshall)."""
    count = len(nodes)
    dist = np.full((count, count), np.inf)
    np.fill_diagonal(dist, 0.0)
    hop = np.tile(np.arange(count), (count, 1))
    lengths = np.hypot(*(nodes[streets[:, 1]] - nodes[streets[:, 0]]).T)
    dist[streets[:, 0], streets[:, 1]] = lengths
    dist[streets[:, 1], streets[:, 0]] = lengths
    for k in range(count):
        through = dist[:, k : k + 1] + dist[k : k + 1, :]
        better = through < dist - 1e-9
        dist = np.where(better, through, dist)
        hop = np.where(better, hop[:, k : k + 1], hop)
    return dist, hop


def _node_path(hop: np.ndarray, start: int, end: int) -> list[int]:
    path = [start]
    while path[-1] != end:
        path.append(int(hop[path[-1], end]))
    return path


def _landmark_phrase(city: City, building: int, facing: float, east: float, north: float) -> str:
    centre = city.building_corners[building].mean(axis=0)
    relation = spatial_relation(facing, bearing(east, north, float(centre[0]), float(centre[1])))
    return f"{city.building_names[building]} is on your {relation}"


def _milestone_indices(points: list[np.ndarray]) -> list[int]:
    """Indices of the polyline points where the walk turns (the first point always)."""
    indices, leg_start = [0], 0
    for i in range(1, len(points) - 1):
        heading_in = bearing(*points[i - 1], *points[i])
        heading_out = bearing(*points[i], *points[i + 1])
        if abs(wrap_degrees(heading_out - heading_in)) < MERGE_MAX_TURN_DEG:
            a, b = points[leg_start], points[i + 1]
            chord = (b - a) / max(float(np.hypot(*(b - a))), 1e-9)
            offsets = [abs(float(chord[0] * (p[1] - a[1]) - chord[1] * (p[0] - a[0]))) for p in points[leg_start + 1 : i + 1]]
            if max(offsets) <= MERGE_MAX_OFFSET_M:
                continue
        indices.append(i)
        leg_start = i
    return indices


def _routes(city: City, placements: list[_Placement], rng: np.random.Generator) -> list[Route]:
    layout = city.layout
    nodes, streets = city.nodes, city.streets
    dist, hop = _shortest_paths(nodes, streets)
    centres = city.building_corners.mean(axis=1)
    node_landmark = np.full(len(nodes), -1)
    landmarks = np.array([i for i, name in enumerate(city.building_names) if name], dtype=np.int64)
    if len(landmarks):
        near = np.hypot(*(centres[landmarks][None, :, :] - nodes[:, None, :]).transpose(2, 0, 1))
        nearest = near.argmin(axis=1)
        node_landmark = np.where(near.min(axis=1) <= LANDMARK_RADIUS_M, landmarks[nearest], -1)

    street_lengths = np.hypot(*(nodes[streets[:, 1]] - nodes[streets[:, 0]]).T)

    def mid_block(building: int) -> bool:
        placement = placements[building]
        return PLACE_MARGIN_M <= placement.along_m <= street_lengths[placement.street] - PLACE_MARGIN_M

    starts = [b for b in range(len(placements)) if not city.building_names[b] and mid_block(b)]
    destinations = [b for b in landmarks.tolist() if mid_block(b)]
    if not starts or not destinations:
        raise ValueError(f"city {layout.name!r} has no room for routes; enlarge its blocks")

    routes: list[Route] = []
    seen: set[tuple[int, int]] = set()
    attempts = 0
    while len(routes) < layout.routes:
        attempts += 1
        if attempts > 200 * layout.routes:
            raise ValueError(f"city {layout.name!r} yields only {len(routes)} of {layout.routes} routes; relax its route limits")
        start_building = starts[int(rng.integers(len(starts)))]
        destination_building = destinations[int(rng.integers(len(destinations)))]
        if (start_building, destination_building) in seen:
            continue
        seen.add((start_building, destination_building))
        route = _route_between(city, placements, dist, hop, node_landmark, start_building, destination_building, rng)
        if route is not None:
            routes.append(dataclasses.replace(route, route_id=f"{layout.name}/{len(routes):04d}"))
    return routes


def _point_on_street(nodes: np.ndarray, streets: np.ndarray, placement: _Placement) -> tuple[np.ndarray, int, int, float, float]:
    a, b = streets[placement.street]
    vector = nodes[b] - nodes[a]
    length = float(np.hypot(*vector))
    point = nodes[a] + vector * (placement.along_m / length)
    return point, int(a), int(b), placement.along_m, length - placement.along_m


def _route_between(
    city: City,
    placements: list[_Placement],
    dist: np.ndarray,
    hop: np.ndarray,
    node_landmark: np.ndarray,
    start_building: int,
    destination_building: int,
    rng: np.random.Generator,
) -> Route | None:
    layout = city.layout
    if placements[start_building].street == placements[destination_building].street:
        return None
    start, sa, sb, to_sa, to_sb = _point_on_street(city.nodes, city.streets, placements[start_building])
    end, da, db, from_da, from_db = _point_on_street(city.nodes, city.streets, placements[destination_building])
    options = [(s_cost + dist[s, d] + d_cost, s, d) for s, s_cost in ((sa, to_sa), (sb, to_sb)) for d, d_cost in ((da, from_da), (db, from_db))]
    total, first, last = min(options)
    if not np.isfinite(total) or not layout.route_length_m[0] <= total <= layout.route_length_m[1]:
        return None
    path = _node_path(hop, first, last)
    points = [start] + [city.nodes[n] for n in path] + [end]
    indices = _milestone_indices(points)
    if not layout.intersections_per_route[0] <= len(indices) - 1 <= layout.intersections_per_route[1]:
        return None
    ends = indices + [len(points) - 1]
    if min(float(np.hypot(*(points[j] - points[i]))) for i, j in zip(ends, ends[1:], strict=False)) < MIN_LEG_M:
        return None

    milestones: list[Milestone] = []
    for k, index in enumerate(indices):
        here, there = points[index], points[ends[k + 1]]
        heading = float(round(bearing(*here, *there)) % 360)
        if ends[k + 1] == len(points) - 1:
            landmark = _landmark_phrase(city, destination_building, heading, *there)
        else:
            building = int(node_landmark[path[ends[k + 1] - 1]])
            landmark = _landmark_phrase(city, building, heading, *there) if building >= 0 else ""
        milestones.append(Milestone(Location(float(here[0]), float(here[1])), heading, landmark))
    return Route(
        route_id="",
        milestones=tuple(milestones),
        destination=Location(float(end[0]), float(end[1])),
        destination_name=city.building_names[destination_building],
        init_heading=float(rng.integers(1, 360)),
    )
