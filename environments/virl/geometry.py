"""Headings, compass names, turns and spatial relations of V-IRL navigation.

Headings are degrees clockwise from north (0 = north, 90 = east), as on a compass and in the
published route data. Positions are metres in a local plane: ``east`` grows to the east and
``north`` to the north.
"""

from __future__ import annotations

import math

COMPASS_NAMES = ("north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest")
"""The 8 absolute directions of the absolute action space, clockwise from north, 45 degrees apart."""

RELATIVE_TURNS = ("left", "right", "slightly left", "slightly right")
"""The 4 directions of the relative action space (rule OOD)."""

SPATIAL_RELATIONS = ("front", "right front", "right", "right behind", "behind", "left behind", "left", "left front")
"""Where a landmark lies relative to the way one faces, clockwise from straight ahead, 45 degrees apart."""

EARTH_RADIUS_M = 6_371_000.0


def wrap_degrees(angle: float) -> float:
    """``angle`` wrapped to the half-open interval (-180, 180]."""
    wrapped = math.fmod(angle, 360.0)
    if wrapped <= -180.0:
        wrapped += 360.0
    elif wrapped > 180.0:
        wrapped -= 360.0
    return wrapped


def normalize_heading(heading: float) -> float:
    """``heading`` brought into [0, 360)."""
    value = math.fmod(heading, 360.0)
    return value + 360.0 if value < 0 else value


def compass_name(heading: float) -> str:
    """The nearest of the 8 compass directions to ``heading`` (e.g. 177 -> 'south', 22 -> 'north')."""
    return COMPASS_NAMES[int(math.floor(normalize_heading(heading) / 45.0 + 0.5)) % 8]


def compass_heading(name: str) -> float:
    """The heading in degrees of a compass direction name ('northeast' -> 45)."""
    try:
        return 45.0 * COMPASS_NAMES.index(name)
    except ValueError:
        raise ValueError(f"compass direction must be one of {COMPASS_NAMES}; got {name!r}") from None


def relative_turn(previous_heading: float, next_heading: float) -> str:
    """The relative turn from ``previous_heading`` to ``next_heading`` (the benchmark's rule, wrapped).

    The difference ``next - previous`` is wrapped to (-180, 180] first, so 350 -> 10 is a slight
    right turn, not a 340-degree left one (the reference code did not wrap). Then: below -45 is
    'left', above 45 is 'right', [-45, 0] is 'slightly left' and (0, 45] is 'slightly right'.
    """
    difference = wrap_degrees(next_heading - previous_heading)
    if difference < -45.0:
        return "left"
    if difference > 45.0:
        return "right"
    if difference <= 0.0:
        return "slightly left"
    return "slightly right"


def spatial_relation(facing: float, bearing: float) -> str:
    """Where something at compass ``bearing`` lies for someone facing ``facing`` (one of :data:`SPATIAL_RELATIONS`)."""
    offset = normalize_heading(bearing - facing)
    return SPATIAL_RELATIONS[int(math.floor(offset / 45.0 + 0.5)) % 8]


def bearing(from_east: float, from_north: float, to_east: float, to_north: float) -> float:
    """Compass heading in [0, 360) of the straight line from one local position to another."""
    return normalize_heading(math.degrees(math.atan2(to_east - from_east, to_north - from_north)))


def heading_vector(heading: float) -> tuple[float, float]:
    """Unit (east, north) vector pointing along ``heading``."""
    radians = math.radians(heading)
    return math.sin(radians), math.cos(radians)


def geocode_to_local(lat: float, lng: float, origin_lat: float, origin_lng: float) -> tuple[float, float]:
    """(east, north) metres of a geocode relative to an origin geocode (equirectangular, fine within a city)."""
    north = math.radians(lat - origin_lat) * EARTH_RADIUS_M
    east = math.radians(wrap_degrees(lng - origin_lng)) * EARTH_RADIUS_M * math.cos(math.radians(origin_lat))
    return east, north


def geocode_distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance in metres between two (lat, lng) geocodes (haversine)."""
    lat1, lng1, lat2, lng2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lng2 - lng1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))
