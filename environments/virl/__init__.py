"""V-IRL street navigation as a Gymnasium environment (VIRL-v0), with built-in offline cities and the published route data."""

from environments.virl.city import CITY_SETS, City, CityLayout, generate_city, load_city_set
from environments.virl.geometry import (
    COMPASS_NAMES,
    RELATIVE_TURNS,
    SPATIAL_RELATIONS,
    compass_name,
    relative_turn,
)
from environments.virl.published import PublishedDataError, PublishedRouteDatabase, load_routes
from environments.virl.routes import (
    Location,
    Milestone,
    Rail,
    RailPoint,
    Route,
    build_rail,
    route_instructions,
    route_key,
    route_split,
)
from environments.virl.verifier import VERDICTS, claims_intersection, judge, parse_response

__all__ = [
    "CITY_SETS",
    "COMPASS_NAMES",
    "RELATIVE_TURNS",
    "SPATIAL_RELATIONS",
    "VERDICTS",
    "City",
    "CityLayout",
    "Location",
    "Milestone",
    "PublishedDataError",
    "PublishedRouteDatabase",
    "Rail",
    "RailPoint",
    "Route",
    "build_rail",
    "claims_intersection",
    "compass_name",
    "generate_city",
    "judge",
    "load_city_set",
    "load_routes",
    "parse_response",
    "relative_turn",
    "route_instructions",
    "route_key",
    "route_split",
]
