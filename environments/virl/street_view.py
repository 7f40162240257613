"""Street views of the built-in cities: 90-degree perspective views rendered by ray casting.

A :class:`StreetViewRenderer` draws what a pedestrian camera (2.5 m high, pitch 0, 90-degree field
of view) sees from a point of a :class:`~environments.virl.city.City` toward a heading: sky, road
with lane markings and crosswalks, sidewalks, and the buildings' facades (windows, shop fronts),
with each landmark's name on a sign over its shop front on every wall that faces a street. Each
image column casts one ray against the walls near the camera; walls are textured from small
precomputed facade tiles, so a view costs a few numpy passes over its pixels. The result is a
pure function of (city, style, position, heading, resolution).

Two styles exist: ``"metro"`` (the training city: glass and concrete, blue sky, sans-serif signs)
and ``"oldtown"`` (the visual-OOD cities: stucco and shutters, evening sky, serif capitals).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from environments.virl.city import LANDMARK_CATEGORIES, ROAD_HALF_WIDTH_M, SETBACK_M, City
from environments.virl.view_grid import compose_grid, pack_rgb, unpack_rgb, view_headings

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]

CAMERA_HEIGHT_M = 2.5
VIEW_DISTANCE_M = 220.0
"""Walls farther than this are not drawn (the haze hides them)."""
TEXTURE_PX_PER_M = 8
TILE_WIDTH_M = 4.0
"""Facades repeat every this many metres along a wall."""
MAX_BUILDING_HEIGHT_M = 48.0
GROUND_FLOOR_M = 6.0
"""Height of the shop-front storey; upper floors start here."""
SIGN_HEIGHT_M = 2.2
SIGN_CENTRE_M = 4.75
"""Signs hang in the band between the shop window and the first floor, centred this high."""
SIGN_TEXTURE_HEIGHT_PX = 48
ROOF_EDGE_M = 0.45
"""The top of every wall is a darker parapet this high."""
GROUND_PX_PER_M = 2
CELL_M = 40.0
"""Side of the squares for which the nearby walls are listed once and reused."""
FOG_DISTANCES_M = (60.0, 110.0, 170.0)
FOG_STRENGTHS = (0.0, 0.2, 0.4, 0.6)
SHADES = (0.62, 0.75, 0.88, 1.0)
"""Brightness of a wall by how squarely it faces the sun (4 levels)."""

_GROUND_CLASSES = ("grass", "sidewalk", "sidewalk_alt", "asphalt", "marking", "crosswalk", "curb")
_GRASS, _SIDEWALK, _SIDEWALK_ALT, _ASPHALT, _MARKING, _CROSSWALK, _CURB = range(len(_GROUND_CLASSES))


@dataclass(frozen=True)
class StreetStyle:
    """The look of a city: colours, facade patterns, sign font and sky."""

    name: str
    sky_top: RGB
    sky_horizon: RGB
    haze: RGB
    grass: RGB
    sidewalk: RGB
    sidewalk_alt: RGB
    asphalt: RGB
    marking: RGB
    crosswalk: RGB
    curb: RGB
    wall_colors: tuple[RGB, ...]
    window_kinds: tuple[str, ...]
    """Upper-floor window patterns, from ``"grid"``, ``"ribbon"``, ``"arched"``, ``"balcony"``."""
    glass: RGB
    frame: RGB
    shutter: RGB
    plinth: RGB
    floor_height_m: float
    sign_font: str
    """A TrueType file name, looked up among matplotlib's bundled fonts and the system's."""
    sign_uppercase: bool
    sign_colors: tuple[tuple[RGB, RGB], ...]
    """(background, lettering) pairs; a landmark's category picks one."""
    sun_heading: float
    texture_seed: int

    @property
    def facade_count(self) -> int:
        """Number of facade variants: every wall colour with every window pattern."""
        return len(self.wall_colors) * len(self.window_kinds)


STYLES: dict[str, StreetStyle] = {
    "metro": StreetStyle(
        name="metro",
        sky_top=(78, 132, 200),
        sky_horizon=(196, 220, 238),
        haze=(200, 214, 226),
        grass=(98, 128, 78),
        sidewalk=(178, 176, 170),
        sidewalk_alt=(166, 164, 158),
        asphalt=(72, 74, 78),
        marking=(236, 214, 90),
        crosswalk=(232, 232, 228),
        curb=(150, 150, 146),
        wall_colors=((188, 186, 180), (150, 160, 172), (206, 196, 176), (120, 124, 132), (176, 132, 108), (226, 224, 218)),
        window_kinds=("grid", "ribbon"),
        glass=(62, 92, 120),
        frame=(52, 56, 62),
        shutter=(52, 56, 62),
        plinth=(64, 66, 70),
        floor_height_m=3.4,
        sign_font="DejaVuSans-Bold.ttf",
        sign_uppercase=False,
        sign_colors=(
            ((150, 22, 40), (255, 255, 255)),
            ((92, 58, 36), (250, 236, 200)),
            ((18, 42, 104), (246, 210, 90)),
            ((246, 226, 186), (96, 48, 20)),
            ((0, 124, 72), (255, 255, 255)),
            ((34, 34, 34), (250, 220, 60)),
            ((206, 40, 36), (255, 255, 255)),
            ((250, 250, 250), (20, 90, 50)),
            ((240, 180, 40), (30, 30, 30)),
            ((60, 20, 90), (255, 255, 255)),
        ),
        sun_heading=210.0,
        texture_seed=11,
    ),
    "oldtown": StreetStyle(
        name="oldtown",
        sky_top=(86, 92, 150),
        sky_horizon=(246, 180, 132),
        haze=(222, 178, 150),
        grass=(112, 116, 70),
        sidewalk=(150, 128, 108),
        sidewalk_alt=(128, 108, 92),
        asphalt=(104, 96, 90),
        marking=(238, 238, 230),
        crosswalk=(228, 222, 208),
        curb=(120, 110, 100),
        wall_colors=((214, 168, 96), (196, 112, 76), (232, 214, 176), (226, 150, 130), (164, 176, 130), (200, 186, 150)),
        window_kinds=("arched", "balcony"),
        glass=(40, 44, 54),
        frame=(236, 228, 212),
        shutter=(44, 96, 70),
        plinth=(110, 92, 76),
        floor_height_m=3.2,
        sign_font="DejaVuSerif-Bold.ttf",
        sign_uppercase=True,
        sign_colors=(
            ((24, 60, 44), (232, 196, 104)),
            ((92, 24, 28), (240, 226, 190)),
            ((232, 222, 196), (70, 40, 24)),
            ((20, 30, 60), (220, 220, 230)),
            ((120, 70, 30), (250, 240, 210)),
        ),
        sun_heading=250.0,
        texture_seed=23,
    ),
}
"""The street-view styles by name."""


def _font_file(name: str) -> Path | None:
    """Where a TrueType font lives: matplotlib's bundled fonts (a dependency), then common system folders."""
    folders = []
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        folders.append(Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf")
    folders += [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/TTF"), Path("/Library/Fonts")]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    return None


@functools.lru_cache(maxsize=16)
def sign_font(name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The sign font ``name`` at ``size`` pixels, or Pillow's built-in font if the file is nowhere."""
    path = _font_file(name)
    if path is None:
        log.warning("font %s not found; signs use Pillow's default font", name)
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size)


# --- textures -------------------------------------------------------------------------------------


def _tones(base: np.ndarray, haze: RGB) -> np.ndarray:
    """``base`` (..., 3) under every shade and fog level: shape (shades * fogs, ..., 3), uint8."""
    haze_colour = np.array(haze, dtype=np.float32)
    tones = []
    for shade in SHADES:
        for fog in FOG_STRENGTHS:
            tones.append(base.astype(np.float32) * shade * (1 - fog) + haze_colour * fog)
    return np.clip(np.stack(tones), 0, 255).astype(np.uint8)


def _fog_level(distance: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.array(FOG_DISTANCES_M, dtype=np.float32), distance).astype(np.int32)


@functools.lru_cache(maxsize=4)
def facade_textures(style: StreetStyle) -> np.ndarray:
    """Facade tiles of ``style``: (variants, tones, height px, tile width px, 3) uint8, row 0 at the ground.

    The last row is the parapet colour, which the renderer uses for the top of every wall.
    """
    rng = np.random.default_rng(style.texture_seed)
    height_px = int(MAX_BUILDING_HEIGHT_M * TEXTURE_PX_PER_M)
    width_px = int(TILE_WIDTH_M * TEXTURE_PX_PER_M)
    z = ((np.arange(height_px) + 0.5) / TEXTURE_PX_PER_M)[:, None]
    u = ((np.arange(width_px) + 0.5) / TEXTURE_PX_PER_M)[None, :]
    floor_z = np.mod(z - GROUND_FLOOR_M, style.floor_height_m)
    upper = z >= GROUND_FLOOR_M
    variants = []
    for kind in style.window_kinds:
        for wall in style.wall_colors:
            grain = rng.normal(0.0, 5.0, size=(height_px, width_px, 1))
            image = np.array(wall, dtype=np.float32) + grain
            glass = np.array(style.glass, dtype=np.float32) * (0.85 + 0.3 * (floor_z / style.floor_height_m))[..., None]
            window, frame, shutter = _window_masks(kind, u, floor_z)
            image = np.where((upper & frame)[..., None], np.array(style.frame, dtype=np.float32), image)
            image = np.where((upper & shutter)[..., None], np.array(style.shutter, dtype=np.float32), image)
            image = np.where((upper & window)[..., None], glass, image)
            image = _shop_front(image, style, z, u)
            image[-1] = style.plinth  # the parapet, drawn along the top of every wall
            variants.append(image)
    return _tones(np.stack(variants), style.haze).transpose(1, 0, 2, 3, 4).copy()


def _window_masks(kind: str, u: np.ndarray, floor_z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Glass, frame and shutter masks of one upper-floor tile pattern."""
    if kind == "grid":
        window = (np.abs(u - 2.0) < 1.25) & (floor_z > 0.75) & (floor_z < 2.6)
        frame = (np.abs(u - 2.0) < 1.4) & (floor_z > 0.6) & (floor_z < 2.75)
        mullion = (np.abs(u - 2.0) < 0.06) & window
        return window & ~mullion, frame, np.zeros_like(frame)
    if kind == "ribbon":
        window = (floor_z > 0.95) & (floor_z < 2.45) & (np.mod(u, 1.0) > 0.08)
        frame = (floor_z > 0.85) & (floor_z < 2.55)
        return window, frame, np.zeros_like(frame)
    if kind == "arched":
        rect = (np.abs(u - 2.0) < 0.65) & (floor_z > 0.55) & (floor_z < 2.05)
        arch = ((u - 2.0) ** 2 + (floor_z - 2.05) ** 2 < 0.65**2) & (floor_z >= 2.05)
        frame = ((np.abs(u - 2.0) < 0.8) & (floor_z > 0.45) & (floor_z < 2.05)) | (
            ((u - 2.0) ** 2 + (floor_z - 2.05) ** 2 < 0.8**2) & (floor_z >= 2.05)
        )
        shutter = (np.abs(np.abs(u - 2.0) - 1.15) < 0.33) & (floor_z > 0.55) & (floor_z < 2.35)
        return rect | arch, frame, shutter
    if kind == "balcony":
        window = (np.abs(u - 2.0) < 0.75) & (floor_z > 0.15) & (floor_z < 2.5)
        frame = (np.abs(u - 2.0) < 0.9) & (floor_z > 0.05) & (floor_z < 2.62)
        rail = (floor_z > 0.1) & (floor_z < 1.1) & (np.abs(u - 2.0) < 1.3) & ((np.mod(u, 0.25) < 0.06) | (floor_z > 1.0))
        return window & ~rail, frame, rail
    raise ValueError(f"window kind must be grid, ribbon, arched or balcony; got {kind!r}")


def _shop_front(image: np.ndarray, style: StreetStyle, z: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Paint the ground storey: plinth, shop window with a door frame, and a darker fascia band."""
    shape = np.broadcast_shapes(z.shape, u.shape)
    plinth = np.broadcast_to(z < 0.4, shape)
    window = (z >= 0.4) & (z < 3.4) & (np.abs(u - 2.0) < 1.75)
    frame = (z >= 0.3) & (z < 3.55) & (np.abs(u - 2.0) < 1.9)
    mullion = window & ((np.abs(u - 2.0) < 0.05) | (np.abs(z - 2.6) < 0.04))
    fascia = (z >= 3.55) & (z < GROUND_FLOOR_M - 0.1)
    shop_glass = np.array(style.glass, dtype=np.float32) * 1.2 * (0.8 + 0.08 * z)[..., None]
    image = np.where(plinth[..., None], np.array(style.plinth, dtype=np.float32), image)
    image = np.where((frame & ~window)[..., None], np.array(style.frame, dtype=np.float32), image)
    image = np.where((window & ~mullion)[..., None], shop_glass, image)
    image = np.where(mullion[..., None], np.array(style.frame, dtype=np.float32), image)
    return np.where(np.broadcast_to(fascia, shape)[..., None], image * 0.8, image)


def _sign_image(text: str, background: RGB, lettering: RGB, font_name: str) -> np.ndarray:
    """A shop sign with ``text``, SIGN_TEXTURE_HEIGHT_PX high and as wide as the text needs."""
    height = SIGN_TEXTURE_HEIGHT_PX
    font = sign_font(font_name, int(height * 0.62))
    left, top, right, bottom = font.getbbox(text)
    width = int(right - left) + height
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    draw.rectangle([2, 2, width - 3, height - 3], outline=lettering, width=2)
    draw.text(((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top), text, font=font, fill=lettering)
    return np.asarray(image)


# --- the renderer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """Per-resolution constants: column ray slopes, row height slopes, sky and ground rows."""

    column_x: np.ndarray
    row_slope: np.ndarray
    sky: np.ndarray
    ground_depth: np.ndarray
    ground_palette_row: np.ndarray
    """Per ground row, the offset of its fog level's colours in the flat ground palette."""


class StreetViewRenderer:
    """Renders perspective street views of one built-in city in one style.

    Heavy assets (wall list, facade tiles, sign atlas, ground map) are built on the first render,
    so cities that are only used in language modality cost nothing here.
    """

    def __init__(self, city: City, style: StreetStyle | str | None = None) -> None:
        self.city = city
        if isinstance(style, StreetStyle):
            self.style = style
        elif (style or city.layout.style) in STYLES:
            self.style = STYLES[style or city.layout.style]
        else:
            raise ValueError(f"style must be one of {tuple(STYLES)} or a StreetStyle; got {style or city.layout.style!r}")
        self._ready = False
        self._cells: dict[tuple[int, int], np.ndarray] = {}
        self._frames: dict[int, _Frame] = {}

    # -- assets --
    def _prepare(self) -> None:
        if self._ready:
            return
        city, style = self.city, self.style
        corners = city.building_corners
        start = corners.reshape(-1, 2)
        end = np.roll(corners, -1, axis=1).reshape(-1, 2)
        edge = end - start
        length = np.hypot(edge[:, 0], edge[:, 1])
        self._wall_start, self._wall_edge, self._wall_length = start, edge, length
        self._wall_normal = np.stack([edge[:, 1], -edge[:, 0]], axis=1) / length[:, None]
        self._wall_mid = start + edge / 2
        building = np.repeat(np.arange(len(corners)), 4)
        self._wall_height = city.building_heights[building].astype(np.float32)
        self._wall_facade = (city.building_facades[building] % style.facade_count).astype(np.int64)
        sun = np.array([math.sin(math.radians(style.sun_heading)), math.cos(math.radians(style.sun_heading))])
        lambert = self._wall_normal @ sun
        self._wall_shade = np.clip(((lambert + 1) / 2 * len(SHADES)).astype(np.int64), 0, len(SHADES) - 1)
        self._textures = facade_textures(style)
        self._texture_flat = pack_rgb(self._textures).reshape(-1)
        self._build_signs(building)
        self._build_ground()
        self._ready = True

    def _build_signs(self, building: np.ndarray) -> None:
        city, style = self.city, self.style
        images, offsets, widths = [], {}, {}
        position = 0
        for index, name in enumerate(city.building_names):
            if not name:
                continue
            category = LANDMARK_CATEGORIES.index(city.building_categories[index])
            background, lettering = style.sign_colors[category % len(style.sign_colors)]
            image = _sign_image(name.upper() if style.sign_uppercase else name, background, lettering, style.sign_font)
            images.append(image)
            offsets[index], widths[index] = position, image.shape[1]
            position += image.shape[1]
        self._sign_atlas = np.concatenate(images, axis=1) if images else np.zeros((SIGN_TEXTURE_HEIGHT_PX, 1, 3), np.uint8)
        self._sign_flat = pack_rgb(self._sign_atlas).reshape(-1)

        count = len(building)
        self._sign_offset = np.full(count, -1, dtype=np.int64)
        self._sign_width_px = np.ones(count, dtype=np.int64)
        self._sign_u = np.zeros((count, 2), dtype=np.float32)
        self._sign_z = np.zeros((count, 2), dtype=np.float32)
        facing_street = _distance_to_streets(self._wall_mid, city) <= SETBACK_M + 3.0
        for wall in np.flatnonzero(facing_street):
            owner = int(building[wall])
            if owner not in offsets:
                continue
            natural = widths[owner] * SIGN_HEIGHT_M / SIGN_TEXTURE_HEIGHT_PX
            width = min(natural, float(self._wall_length[wall]) - 1.0)
            if width < 2.0:
                continue
            height = SIGN_HEIGHT_M * width / natural
            u0 = (float(self._wall_length[wall]) - width) / 2
            self._sign_offset[wall], self._sign_width_px[wall] = offsets[owner], widths[owner]
            self._sign_u[wall] = (u0, u0 + width)
            self._sign_z[wall] = (SIGN_CENTRE_M - height / 2, SIGN_CENTRE_M + height / 2)

    def _build_ground(self) -> None:
        city, style = self.city, self.style
        margin = VIEW_DISTANCE_M
        self._ground_origin = city.nodes.min(axis=0) - margin
        size = np.ceil((city.nodes.max(axis=0) + margin - self._ground_origin) * GROUND_PX_PER_M).astype(int)
        image = Image.new("L", (int(size[0]), int(size[1])), _GRASS)
        draw = ImageDraw.Draw(image)

        def px(point: np.ndarray) -> tuple[float, float]:
            return tuple(((point - self._ground_origin) * GROUND_PX_PER_M).tolist())  # type: ignore[return-value]

        def disc(point: np.ndarray, radius: float, fill: int) -> None:
            x, y = px(point)
            r = radius * GROUND_PX_PER_M
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

        nodes, streets = city.nodes, city.streets
        for half_width, fill in ((SETBACK_M, _SIDEWALK), (ROAD_HALF_WIDTH_M + 0.35, _CURB), (ROAD_HALF_WIDTH_M, _ASPHALT)):
            for a, b in streets:
                draw.line([px(nodes[a]), px(nodes[b])], fill=fill, width=int(2 * half_width * GROUND_PX_PER_M))
            for point in nodes:
                disc(point, half_width, fill)
        clearance = _junction_clearance(city)
        for street, (a, b) in enumerate(streets):
            vector = nodes[b] - nodes[a]
            length = float(np.hypot(*vector))
            along, across = vector / length, np.array([-vector[1], vector[0]]) / length
            first, last = clearance[street, 0] + 3.0, length - clearance[street, 1] - 3.0
            for start in np.arange(first, last, 9.0):
                draw.line([px(nodes[a] + along * start), px(nodes[a] + along * min(start + 3.0, last))], fill=_MARKING, width=1)
            for end_point, direction, clear in ((nodes[a], along, clearance[street, 0]), (nodes[b], -along, clearance[street, 1])):
                if clear > SETBACK_M:  # a sharp junction: a crosswalk would run into the other street
                    continue
                for offset in np.arange(-ROAD_HALF_WIDTH_M + 0.8, ROAD_HALF_WIDTH_M - 0.5, 1.4):
                    p0 = end_point + direction * (SETBACK_M - 3.5) + across * offset
                    draw.line([px(p0), px(p0 + direction * 3.0)], fill=_CROSSWALK, width=max(1, int(0.7 * GROUND_PX_PER_M)))
        ground = np.array(image, dtype=np.uint8)
        # paving slabs: alternate the sidewalk colour on a 1 m checkerboard
        slab_x = (np.arange(ground.shape[1]) // GROUND_PX_PER_M) % 2
        slab_y = (np.arange(ground.shape[0]) // GROUND_PX_PER_M) % 2
        odd = (slab_x[None, :] ^ slab_y[:, None]).astype(bool)
        ground[odd & (ground == _SIDEWALK)] = _SIDEWALK_ALT
        self._ground = ground
        colours = np.array([getattr(style, name) for name in _GROUND_CLASSES], dtype=np.float32)
        haze = np.array(style.haze, dtype=np.float32)
        palette = np.stack([colours * (1 - fog) + haze * fog for fog in (*FOG_STRENGTHS, 0.8)])
        self._ground_palette_flat = pack_rgb(palette.astype(np.uint8)).reshape(-1)
        self._ground_flat = self._ground.reshape(-1)

    def _frame(self, resolution: int) -> _Frame:
        frame = self._frames.get(resolution)
        if frame is None:
            focal = resolution / 2
            centres = np.arange(resolution, dtype=np.float32) + 0.5
            column_x = (centres - resolution / 2) / focal
            row_slope = (resolution / 2 - centres) / focal  # height gain per metre of depth, per row
            top = np.array(self.style.sky_top, dtype=np.float32)
            bottom = np.array(self.style.sky_horizon, dtype=np.float32)
            mix = (np.linspace(0.0, 1.0, resolution // 2, dtype=np.float32) ** 1.6)[:, None]
            sky_rows = (top * (1 - mix) + bottom * mix).astype(np.uint8)
            sky = np.repeat(pack_rgb(sky_rows)[:, None], resolution, axis=1)
            ground_rows = -row_slope[resolution // 2 :]
            depth = (CAMERA_HEIGHT_M / ground_rows).astype(np.float32)
            fog = _fog_level(depth)
            fog[depth > 400.0] = len(FOG_STRENGTHS)
            frame = _Frame(column_x, row_slope, sky, depth, (fog * len(_GROUND_CLASSES)).astype(np.int32))
            self._frames[resolution] = frame
        return frame

    def _nearby_walls(self, east: float, north: float) -> np.ndarray:
        key = (int(math.floor(east / CELL_M)), int(math.floor(north / CELL_M)))
        walls = self._cells.get(key)
        if walls is None:
            centre = (np.array(key, dtype=np.float64) + 0.5) * CELL_M
            reach = VIEW_DISTANCE_M + CELL_M * 0.75
            distance = _point_segment_distance(centre, self._wall_start, self._wall_edge)
            walls = np.flatnonzero(distance <= reach)
            self._cells[key] = walls
        return walls

    # -- rendering --
    def render_view(self, east: float, north: float, heading: float, resolution: int) -> np.ndarray:
        """The (resolution, resolution, 3) uint8 view from (east, north) toward compass ``heading``."""
        return unpack_rgb(self._render_packed(east, north, heading, resolution))

    def render_grid(self, east: float, north: float, heading: float, resolution: int) -> np.ndarray:
        """The 2x2 grid [front, right / back, left] of views for a walker at (east, north) facing ``heading``."""
        views = [self._render_packed(east, north, h, resolution) for h in view_headings(heading)]
        return unpack_rgb(compose_grid(views))

    def _render_packed(self, east: float, north: float, heading: float, resolution: int) -> np.ndarray:
        if not isinstance(resolution, int | np.integer) or resolution < 16 or resolution % 2:
            raise ValueError(f"resolution must be an even number of pixels, at least 16; got {resolution!r}")
        self._prepare()
        frame = self._frame(resolution)
        half = resolution // 2
        radians = math.radians(heading)
        forward = np.array([math.sin(radians), math.cos(radians)])
        right = np.array([math.cos(radians), -math.sin(radians)])
        rays = forward[None, :] + frame.column_x[:, None].astype(np.float64) * right[None, :]  # (W, 2)

        canvas = np.empty((resolution, resolution), dtype=np.uint32)  # packed RGBA, see pack_rgb
        canvas[:half] = frame.sky
        self._draw_ground(canvas[half:], frame, east, north, rays)
        depth, wall, along = self._cast(np.array([east, north]), forward, right, rays)
        if wall is not None:
            self._draw_walls(canvas, frame, depth, wall, along)
        return canvas

    def _draw_ground(self, rows: np.ndarray, frame: _Frame, east: float, north: float, rays: np.ndarray) -> None:
        """Floor-cast the lower half: each pixel's ground point looked up in the ground map."""
        map_height, map_width = self._ground.shape
        scaled = (rays * GROUND_PX_PER_M).astype(np.float32)
        x = np.multiply.outer(frame.ground_depth, scaled[:, 0])
        x += np.float32((east - self._ground_origin[0]) * GROUND_PX_PER_M)
        y = np.multiply.outer(frame.ground_depth, scaled[:, 1])
        y += np.float32((north - self._ground_origin[1]) * GROUND_PX_PER_M)
        np.clip(x, 0, map_width - 1, out=x)
        np.clip(y, 0, map_height - 1, out=y)
        cell = y.astype(np.int32)
        cell *= map_width
        cell += x.astype(np.int32)
        colour = self._ground_flat[cell].astype(np.int32)
        colour += frame.ground_palette_row[:, None]
        np.take(self._ground_palette_flat, colour, out=rows)

    def _cast(self, camera: np.ndarray, forward: np.ndarray, right: np.ndarray, rays: np.ndarray):
        """Per column: depth of the nearest wall (inf if none), that wall, and the hit's distance along it."""
        walls = self._nearby_walls(float(camera[0]), float(camera[1]))
        start = self._wall_start[walls] - camera
        edge = self._wall_edge[walls]
        end = start + edge
        depth0, depth1 = start @ forward, end @ forward
        side0, side1 = start @ right, end @ right
        facing = np.einsum("ij,ij->i", self._wall_mid[walls] - camera, self._wall_normal[walls]) < 0
        in_front = (depth0 > 0.05) | (depth1 > 0.05)
        in_view = ~((side0 > depth0) & (side1 > depth1)) & ~((side0 < -depth0) & (side1 < -depth1))
        visible = facing & in_front & in_view
        if not visible.any():
            return None, None, None
        walls, start, edge = walls[visible], start[visible], edge[visible]
        denominator = np.multiply.outer(rays[:, 0], edge[:, 1]) - np.multiply.outer(rays[:, 1], edge[:, 0])  # (W, S)
        with np.errstate(divide="ignore", invalid="ignore"):
            inverse = 1.0 / denominator
            depth = (start[:, 0] * edge[:, 1] - start[:, 1] * edge[:, 0])[None, :] * inverse
            along = (np.multiply.outer(rays[:, 1], start[:, 0]) - np.multiply.outer(rays[:, 0], start[:, 1])) * inverse
        valid = (along >= 0.0) & (along <= 1.0) & (depth > 0.05)
        depth[~valid] = np.inf
        nearest = depth.argmin(axis=1)
        columns = np.arange(len(nearest))
        wall = walls[nearest]
        return (
            depth[columns, nearest].astype(np.float32),
            wall,
            (along[columns, nearest] * self._wall_length[wall]).astype(np.float32),
        )

    def _draw_walls(self, image: np.ndarray, frame: _Frame, depth: np.ndarray, wall: np.ndarray, along: np.ndarray) -> None:
        """Texture every column's wall between its foot and its top; signs go over the shop fronts."""
        hit = np.isfinite(depth)
        if not hit.any():
            return
        resolution = image.shape[0]
        focal = resolution / 2
        height = np.where(hit, self._wall_height[wall], np.float32(-1.0))
        depth = np.where(hit, depth, np.float32(1.0))
        top = np.floor(resolution / 2 - focal * (height - CAMERA_HEIGHT_M) / depth)
        bottom = np.ceil(resolution / 2 + focal * CAMERA_HEIGHT_M / depth)
        first = int(np.clip(top[hit].min(), 0, resolution))
        last = int(np.clip(bottom[hit].max(), 0, resolution))
        if last <= first:
            return
        _, tones, height_px, width_px, _ = self._textures.shape
        z = np.multiply.outer(frame.row_slope[first:last], depth)
        z += np.float32(CAMERA_HEIGHT_M)
        inside = z >= 0.0
        inside &= z < height[None, :]
        tone = self._wall_shade[wall] * len(FOG_STRENGTHS) + _fog_level(depth)
        column_base = ((self._wall_facade[wall] * tones + tone) * height_px) * width_px + (
            (along * TEXTURE_PX_PER_M).astype(np.int64) % width_px
        )
        texel = (z * np.float32(TEXTURE_PX_PER_M)).astype(np.int32)
        np.clip(texel, 0, height_px - 2, out=texel)
        texel[z > (height - ROOF_EDGE_M)[None, :]] = height_px - 1  # the parapet row of the tiles
        texel *= width_px
        texel += column_base.astype(np.int32)[None, :]
        band = image[first:last]
        np.copyto(band, np.take(self._texture_flat, texel), where=inside)
        self._draw_signs(band, z, inside, wall, along, hit)

    def _draw_signs(self, band: np.ndarray, z: np.ndarray, inside: np.ndarray, wall: np.ndarray, along: np.ndarray, hit: np.ndarray) -> None:
        u0, u1 = self._sign_u[wall, 0], self._sign_u[wall, 1]
        on_sign = hit & (self._sign_offset[wall] >= 0) & (along >= u0) & (along < u1)
        if not on_sign.any():
            return
        columns = np.flatnonzero(on_sign)
        walls = wall[columns]
        z0, z1 = self._sign_z[walls, 0], self._sign_z[walls, 1]
        sign_z = z[:, columns]
        texel_y = ((z1 - sign_z) / (z1 - z0) * SIGN_TEXTURE_HEIGHT_PX).astype(np.int32)
        fraction = (along[columns] - u0[columns]) / (u1[columns] - u0[columns])
        width = self._sign_width_px[walls]
        texel_x = self._sign_offset[walls] + np.minimum((fraction * width).astype(np.int64), width - 1)
        on = (texel_y >= 0) & (texel_y < SIGN_TEXTURE_HEIGHT_PX) & inside[:, columns]
        np.clip(texel_y, 0, SIGN_TEXTURE_HEIGHT_PX - 1, out=texel_y)
        colours = self._sign_flat[texel_y * self._sign_atlas.shape[1] + texel_x.astype(np.int32)[None, :]]
        region = band[:, columns]
        np.copyto(region, colours, where=on)
        band[:, columns] = region


def _point_segment_distance(point: np.ndarray, start: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """Distance from one point to each segment ``start + s * edge``, s in [0, 1]."""
    offset = point[None, :] - start
    s = np.clip(np.einsum("ij,ij->i", offset, edge) / np.maximum(np.einsum("ij,ij->i", edge, edge), 1e-12), 0.0, 1.0)
    closest = start + edge * s[:, None]
    return np.hypot(*(point[None, :] - closest).T)


def _junction_clearance(city: City) -> np.ndarray:
    """(E, 2): how far from each end of each street its carriageway stays clear of the other streets there.

    Two carriageways of half width w leaving a junction at an acute angle t overlap up to
    w (1 + cos t) / sin t from it (w at right or obtuse angles); road markings start beyond that.
    """
    clearance = np.full((len(city.streets), 2), ROAD_HALF_WIDTH_M)
    directions: dict[int, list[tuple[int, int, np.ndarray]]] = {}
    for street, (a, b) in enumerate(city.streets):
        vector = city.nodes[b] - city.nodes[a]
        unit = vector / np.hypot(*vector)
        directions.setdefault(int(a), []).append((street, 0, unit))
        directions.setdefault(int(b), []).append((street, 1, -unit))
    for ends in directions.values():
        for street, end, unit in ends:
            for other, _, other_unit in ends:
                if other == street:
                    continue
                cosine = float(np.clip(unit @ other_unit, -1.0, 1.0))
                if cosine > 0.0:  # an acute junction; at right or obtuse ones the overlap ends at w
                    reach = ROAD_HALF_WIDTH_M * (1.0 + cosine) / max(math.sqrt(1.0 - cosine**2), 1e-6)
                    clearance[street, end] = max(clearance[street, end], reach)
    return clearance


def _distance_to_streets(points: np.ndarray, city: City) -> np.ndarray:
    """Distance from each point to the nearest street centre line."""
    best = np.full(len(points), np.inf)
    for a, b in city.streets:
        start, edge = city.nodes[a], city.nodes[b] - city.nodes[a]
        offset = points - start
        s = np.clip(offset @ edge / float(edge @ edge), 0.0, 1.0)
        best = np.minimum(best, np.hypot(*(offset - s[:, None] * edge[None, :]).T))
    return best
