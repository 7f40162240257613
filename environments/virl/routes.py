"""Routes, their instructions and the ground-truth path ("rail") an agent walks, shared by every route source.

A :class:`Route` is what the published data and the built-in city both provide: a start, one
:class:`Milestone` per turn (the first at the start, the others at intersections) and a destination.
:func:`route_instructions` writes the numbered instructions of the benchmark and :func:`build_rail`
lays out the decision points with their expected actions, observations and current instruction.
:func:`route_split` assigns every route to the fixed ``"train"``, ``"val"`` or ``"test"`` split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from environments.splits import split_of_key
from environments.virl.geometry import compass_name, relative_turn

FORWARD = "forward()"
STOP = "stop()"
NO_LANDMARKS = "No landmarks nearby"
"""Observation at a point with no landmark to report (start and in-between points)."""
INTERSECTION_SENTENCE = "You observe an intersection"
"""Appended to the observation at a route's intersections."""

POINT_KINDS = ("start", "forward", "intersection", "destination")

INTERPOLATED_POINTS = 5
"""Up to this many points are interpolated on each leg (the benchmark's number)."""
DROP_PROBABILITY = 0.5
"""Each interpolated point is dropped with this probability when the rail is laid out."""
MIN_LEG_FOR_INTERPOLATION_M = 5.0
"""Legs this short or shorter get no interpolated points."""
MIN_END_DISTANCE_M = 8.0
"""An interpolated point is kept only if farther than this from both ends of its leg."""



def turn_action(direction: str) -> str:
    """The action string that turns to ``direction`` (a compass name or a relative turn)."""
    return f"turn_direction({direction})"


@dataclass(frozen=True)
class Location:
    """A point of a route: metres east and north of the route's frame origin, and its geocode if known."""

    east: float
    north: float
    geocode: tuple[float, float] | None = None

    def distance_to(self, other: Location) -> float:
        """Straight-line distance in metres."""
        return math.hypot(other.east - self.east, other.north - self.north)

    def toward(self, other: Location, fraction: float) -> Location:
        """The point ``fraction`` of the way from here to ``other`` (geocodes interpolated linearly too)."""
        geocode = None
        if self.geocode is not None and other.geocode is not None:
            geocode = (
                self.geocode[0] + (other.geocode[0] - self.geocode[0]) * fraction,
                self.geocode[1] + (other.geocode[1] - self.geocode[1]) * fraction,
            )
        return Location(
            self.east + (other.east - self.east) * fraction,
            self.north + (other.north - self.north) * fraction,
            geocode,
        )


@dataclass(frozen=True)
class Milestone:
    """One turn of a route: at ``location`` face ``heading``, then walk to the next milestone (or the destination).

    ``landmark`` is the phrase describing the landmark at the point this leg leads to, as the
    walker arrives there (e.g. ``"Hotel Marlowe is on your right front"``), or ``""`` if none.
    """

    location: Location
    heading: float
    landmark: str = ""
    heading_name: str = ""

    def __post_init__(self) -> None:
        if not self.heading_name:
            object.__setattr__(self, "heading_name", compass_name(self.heading))


@dataclass(frozen=True)
class Route:
    """A navigation task: the milestones (the first at the start) and the destination.

    ``init_heading`` is the way the walker faces at the start, in degrees; None means it is drawn
    at random at every reset (the published data's convention for a missing or zero heading).
    """

    route_id: str
    milestones: tuple[Milestone, ...]
    destination: Location
    destination_name: str = ""
    init_heading: float | None = None

    def __post_init__(self) -> None:
        if not self.milestones:
            raise ValueError(f"route {self.route_id!r} has no milestones; a route needs at least the turn at its start")

    @property
    def start(self) -> Location:
        """Where the walk begins."""
        return self.milestones[0].location

    @property
    def num_intersections(self) -> int:
        """Intersections where the walker turns (milestones after the start)."""
        return len(self.milestones) - 1

    @property
    def length_m(self) -> float:
        """Length of the walk in metres along the straight legs."""
        points = [m.location for m in self.milestones] + [self.destination]
        return sum(a.distance_to(b) for a, b in zip(points, points[1:], strict=False))


@dataclass(frozen=True)
class RailPoint:
    """One decision point on the rail, with everything the verifier and the expert need there."""

    location: Location
    heading: float
    """The way the walker faces here (the street views' front)."""
    kind: str
    """One of :data:`POINT_KINDS`."""
    landmark: str
    """The landmark observation, :data:`NO_LANDMARKS` if there is none."""
    absolute_action: str
    relative_action: str
    instruction_index: int
    """0-based index of the instruction sentence being carried out here."""

    @property
    def at_intersection(self) -> bool:
        """True at the route's intersections (not at the start or the destination)."""
        return self.kind == "intersection"

    @property
    def observation(self) -> str:
        """The text observation of this point: the landmark, plus the intersection sentence at one."""
        return f"{self.landmark}; {INTERSECTION_SENTENCE}" if self.at_intersection else self.landmark

    def expected_action(self, action_space: str) -> str:
        """The correct action here in the ``"absolute"`` or ``"relative"`` action space."""
        return self.absolute_action if action_space == "absolute" else self.relative_action


@dataclass(frozen=True)
class Rail:
    """A route laid out for one episode: its instructions and decision points."""

    route: Route
    init_heading: float
    instructions: tuple[str, ...]
    points: tuple[RailPoint, ...]

    @property
    def instruction_text(self) -> str:
        """The instructions numbered one per line: ``1. First, turn ...``."""
        return "\n".join(f"{number}. {sentence}" for number, sentence in enumerate(self.instructions, start=1))


def route_instructions(route: Route, init_heading: float) -> tuple[str, ...]:
    """The route's instruction sentences: a turn and a 'move forward' sentence per milestone."""
    sentences: list[str] = []
    previous_heading = init_heading
    last = len(route.milestones) - 1
    for index, milestone in enumerate(route.milestones):
        turn = relative_turn(previous_heading, milestone.heading)
        opening = "First, turn" if index == 0 else "Turn"
        sentences.append(f"{opening} {turn} to face {milestone.heading_name}.")
        goal = "destination" if index == last else "next intersection"
        where = f" where {milestone.landmark}" if milestone.landmark else ""
        sentences.append(f"Move forward until you reach {goal}{where}.")
        previous_heading = milestone.heading
    return tuple(sentences)


def build_rail(
    route: Route,
    init_heading: float,
    rng: np.random.Generator | None = None,
    *,
    interpolated_points: int = INTERPOLATED_POINTS,
    drop_probability: float = DROP_PROBABILITY,
    keep: Callable[[Location], bool] | None = None,
) -> Rail:
    """Lay out the rail of ``route``: start, in-between points, intersections and destination.

    - start: the first turn is expected; the observation is :data:`NO_LANDMARKS`.
    - on each leg longer than 5 m: up to ``interpolated_points`` evenly spaced points, each dropped
      with ``drop_probability`` (drawn from ``rng``; None keeps them all) and kept only if farther
      than 8 m from both ends of the leg, and if ``keep`` (when given) accepts it; ``forward()`` is
      expected and the leg's 'move forward' sentence applies.
    - each intersection: the milestone's turn is expected; the observation is the landmark phrase
      of the leg that led there and the intersection sentence.
    - destination: ``stop()`` is expected; the last 'move forward' sentence applies.
    """
    instructions = route_instructions(route, init_heading)
    milestones = route.milestones
    ends = [m.location for m in milestones] + [route.destination]
    points: list[RailPoint] = []

    def turn_point(index: int, location: Location, arrival_heading: float, kind: str, landmark: str) -> RailPoint:
        milestone = milestones[index]
        return RailPoint(
            location=location,
            heading=arrival_heading,
            kind=kind,
            landmark=landmark or NO_LANDMARKS,
            absolute_action=turn_action(milestone.heading_name),
            relative_action=turn_action(relative_turn(arrival_heading, milestone.heading)),
            instruction_index=2 * index,
        )

    points.append(turn_point(0, ends[0], init_heading, "start", NO_LANDMARKS))
    for leg, milestone in enumerate(milestones):
        begin, end = ends[leg], ends[leg + 1]
        move_sentence = 2 * leg + 1
        length = begin.distance_to(end)
        if length > MIN_LEG_FOR_INTERPOLATION_M:
            for step in range(1, interpolated_points + 1):
                dropped = rng is not None and rng.random() < drop_probability
                candidate = begin.toward(end, step / (interpolated_points + 1))
                if dropped or min(begin.distance_to(candidate), end.distance_to(candidate)) <= MIN_END_DISTANCE_M:
                    continue
                if keep is not None and not keep(candidate):
                    continue
                points.append(
                    RailPoint(candidate, milestone.heading, "forward", NO_LANDMARKS, FORWARD, FORWARD, move_sentence)
                )
        if leg + 1 < len(milestones):
            points.append(turn_point(leg + 1, end, milestone.heading, "intersection", milestone.landmark))
        else:
            points.append(
                RailPoint(end, milestone.heading, "destination", milestone.landmark or NO_LANDMARKS, STOP, STOP, move_sentence)
            )
    return Rail(route=route, init_heading=float(init_heading), instructions=instructions, points=tuple(points))


def _point_key(location: Location) -> str:
    if location.geocode is not None:
        return f"{location.geocode[0]:.6f},{location.geocode[1]:.6f}"
    return f"{location.east:.1f},{location.north:.1f}"


def route_key(route: Route, city: str = "") -> str:
    """The canonical identity of ``route`` that :func:`route_split` hashes.

    ``city`` and the route's points, start and intersections (its milestones) then destination, as
    ``"city|p0;p1;...;destination"``. A point is its geocode ``"lat,lng"`` with 6 decimals when it
    has one (published data: ``start_place.relocated_geocode`` then ``route_results.geocode_list``)
    and ``"east,north"`` in metres with 1 decimal otherwise (built-in cities). The route id, the
    route's position in its list, its initial heading and its texts play no part.
    """
    points = [milestone.location for milestone in route.milestones] + [route.destination]
    return f"{city}|" + ";".join(_point_key(point) for point in points)


def route_split(route: Route, city: str = "") -> str:
    """'train', 'val' or 'test': the fixed split of ``route``, identical on every machine.

    The key is :func:`route_key` (``city`` is the built-in city's name, such as ``"metro"``, and
    ``""`` for published data, whose geocodes already place the route), and
    :func:`environments.splits.split_of_key` decides its side (about 70/10/20). The rule does not
    depend on which other routes exist.
    """
    return split_of_key(route_key(route, city))
