"""VIRL-v0 rules without an environment: headings and turns, instructions and rail, the answer verifier."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from environments.virl.geometry import (
    compass_name,
    relative_turn,
    spatial_relation,
    wrap_degrees,
)
from environments.virl.routes import (
    FORWARD,
    INTERSECTION_SENTENCE,
    NO_LANDMARKS,
    STOP,
    Location,
    Milestone,
    Route,
    build_rail,
    route_instructions,
)
from environments.virl.verifier import (
    REWARD_CORRECT,
    REWARD_WRONG_ACTION,
    REWARD_WRONG_OBSERVATION,
    ParsedResponse,
    claims_intersection,
    judge,
    normalize_action,
    parse_response,
    quote_for_feedback,
)

# --- geometry -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("previous", "following", "expected"),
    [
        (0, 90, "right"),
        (0, -90, "left"),
        (90, 0, "left"),
        (0, 45, "slightly right"),
        (0, 46, "right"),
        (0, -45, "slightly left"),
        (0, -46, "left"),
        (0, 0, "slightly left"),
        (0, 0.5, "slightly right"),
        (0, 180, "right"),  # +180 lies in (-180, 180]
        (180, 0, "right"),
        # wrapping: the raw difference says the opposite or a sharp turn
        (350, 10, "slightly right"),  # raw -340 would be "left"
        (10, 350, "slightly left"),  # raw +340 would be "right"
        (300, 30, "right"),  # raw -270 would be "left"
        (30, 300, "left"),  # raw +270 would be "right"
        (359, 2, "slightly right"),
    ],
)
def test_relative_turn_wraps_the_heading_difference(previous: float, following: float, expected: str) -> None:
    assert relative_turn(previous, following) == expected


def test_wrap_degrees_range() -> None:
    for angle in np.linspace(-1000, 1000, 401):
        wrapped = wrap_degrees(float(angle))
        assert -180 < wrapped <= 180
        assert math.remainder(wrapped - angle, 360) == pytest.approx(0, abs=1e-9)
    assert wrap_degrees(-180) == 180


@pytest.mark.parametrize(("heading", "name"), [(0, "north"), (22, "north"), (23, "northeast"), (177, "south"), (315, "northwest"), (359, "north"), (-90, "west")])
def test_compass_name(heading: float, name: str) -> None:
    assert compass_name(heading) == name


def test_spatial_relation_goes_clockwise_from_the_front() -> None:
    relations = [spatial_relation(90, 90 + 45 * k) for k in range(8)]
    assert relations == ["front", "right front", "right", "right behind", "behind", "left behind", "left", "left front"]


# --- instructions and rail ------------------------------------------------------------------------


def _route() -> Route:
    milestones = (
        Milestone(Location(0, 0), 0.0, "Hotel Alpha is on your right front"),
        Milestone(Location(0, 60), 90.0, ""),
        Milestone(Location(80, 60), 180.0, "Beta Bank is on your left"),
    )
    return Route("r", milestones, Location(80, 10), "Beta Bank", init_heading=90.0)


def test_instructions_follow_the_benchmark_sentences() -> None:
    assert route_instructions(_route(), 90.0) == (
        "First, turn left to face north.",
        "Move forward until you reach next intersection where Hotel Alpha is on your right front.",
        "Turn right to face east.",
        "Move forward until you reach next intersection.",
        "Turn right to face south.",
        "Move forward until you reach destination where Beta Bank is on your left.",
    )


def test_rail_points_actions_and_instructions() -> None:
    rail = build_rail(_route(), 90.0, rng=None)
    kinds = [p.kind for p in rail.points]
    assert kinds == ["start"] + ["forward"] * 5 + ["intersection"] + ["forward"] * 5 + ["intersection"] + ["forward"] * 5 + ["destination"]
    start, first_intersection, second_intersection, destination = (rail.points[i] for i in (0, 6, 12, 18))
    assert (start.absolute_action, start.relative_action) == ("turn_direction(north)", "turn_direction(left)")
    assert start.observation == NO_LANDMARKS and start.instruction_index == 0 and start.heading == 90.0
    assert first_intersection.observation == f"Hotel Alpha is on your right front; {INTERSECTION_SENTENCE}"
    assert (first_intersection.absolute_action, first_intersection.relative_action) == ("turn_direction(east)", "turn_direction(right)")
    assert first_intersection.instruction_index == 2 and first_intersection.heading == 0.0
    assert second_intersection.observation == f"{NO_LANDMARKS}; {INTERSECTION_SENTENCE}"
    assert second_intersection.absolute_action == "turn_direction(south)"
    assert destination.absolute_action == destination.relative_action == STOP
    assert destination.observation == "Beta Bank is on your left" and not destination.at_intersection
    assert destination.instruction_index == 5  # the last 'move forward' sentence
    for point in rail.points:
        if point.kind == "forward":
            assert point.absolute_action == point.relative_action == FORWARD
            assert point.observation == NO_LANDMARKS
            assert point.instruction_index % 2 == 1
    assert [p.at_intersection for p in rail.points].count(True) == 2


def test_rail_drops_points_with_the_generator_and_keeps_them_away_from_the_ends() -> None:
    route = _route()
    ends = [m.location for m in route.milestones] + [route.destination]
    counts = set()
    for seed in range(30):
        rail = build_rail(route, 90.0, np.random.default_rng(seed))
        assert rail == build_rail(route, 90.0, np.random.default_rng(seed))
        forward = [p for p in rail.points if p.kind == "forward"]
        counts.add(len(forward))
        for point in forward:
            leg = point.instruction_index // 2
            assert ends[leg].distance_to(point.location) > 8 and ends[leg + 1].distance_to(point.location) > 8
    assert min(counts) < 10 < max(counts) <= 15


def test_short_legs_get_no_inbetween_points_and_keep_their_instruction() -> None:
    milestones = (Milestone(Location(0, 0), 0.0, "A is on your left"), Milestone(Location(0, 4), 90.0, "B is on your right"))
    rail = build_rail(Route("short", milestones, Location(12, 4)), 0.0)
    assert [p.kind for p in rail.points] == ["start", "intersection", "destination"]
    assert [p.instruction_index for p in rail.points] == [0, 2, 3]


# --- verifier -------------------------------------------------------------------------------------


def test_parse_strict_json_and_fallbacks() -> None:
    strict = parse_response(json.dumps({"current observation": "o", "current instruction": "i", "action": "forward()"}))
    assert strict == ParsedResponse("o", "i", "forward()")
    trailing = parse_response('```json\n{\n "current observation": "o",\n "current instruction": "i",\n "action": "stop()",\n}\n```')
    assert trailing == ParsedResponse("o", "i", "stop()")
    single = parse_response("{'current observation': 'x y', 'action': 'turn_direction(east)'}")
    assert single.action == "turn_direction(east)" and single.observation == "x y"
    bare = parse_response('"action": turn_direction(slightly left)\n')
    assert bare.action == "turn_direction(slightly left)"
    keys = parse_response('{"Current_Observation": "o", "ACTION": "forward()"}')
    assert keys == ParsedResponse("o", None, "forward()")
    assert parse_response("no json here") == ParsedResponse(None, None, None)
    assert parse_response('{"action": 3}').action is None
    assert parse_response(None) == ParsedResponse(None, None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("forward()", "forward()"),
        ("  forward ( )  ", "forward()"),
        ("turn_direction( 'slightly   left' )", "turn_direction(slightly left)"),
        ("\u201cturn_direction(east)\u201d", "turn_direction(east)"),
        ('turn_direction("north")', "turn_direction(north)"),
        ("Forward()", "Forward()"),
    ],
)
def test_normalize_action(raw: str, normal: str) -> None:
    assert normalize_action(raw) == normal


@pytest.mark.parametrize(
    ("text", "claim"),
    [
        ("No landmarks nearby; You observe an intersection", True),
        ("I am at an intersection.", True),
        ("Two intersections ahead", True),
        ("No landmarks nearby", False),
        ("There is no intersection here", False),
        ("I don't see an intersection", False),
        ("I do not think this is an intersection", True),  # "not" is 5 words before: outside the window
        ("not at an intersection", False),
        ("No landmarks nearby, but I observe an intersection", True),  # the negation is in another clause
        ("Without any intersection in sight", False),
        ("INTERSECTION", True),
        ("", False),
    ],
)
def test_claims_intersection(text: str, claim: bool) -> None:
    assert claims_intersection(text) is claim


@pytest.mark.parametrize("at_intersection", [True, False])
@pytest.mark.parametrize("claim", [True, False])
@pytest.mark.parametrize("action", ["forward()", "stop()", None])
def test_observation_penalty_fires_exactly_on_a_wrong_claim(at_intersection: bool, claim: bool, action: str | None) -> None:
    observation = "You observe an intersection" if claim else "No landmarks nearby"
    judgement = judge(ParsedResponse(observation, None, action), expected_action="forward()", at_intersection=at_intersection)
    if action == "forward()":
        assert (judgement.reward, judgement.verdict) == (REWARD_CORRECT, "correct")
    elif claim != at_intersection:
        assert (judgement.reward, judgement.verdict) == (REWARD_WRONG_OBSERVATION, "wrong_observation")
    else:
        assert judgement.reward == REWARD_WRONG_ACTION
        assert judgement.verdict == ("no_action" if action is None else "wrong_action")


def test_missing_observation_is_no_claim() -> None:
    judgement = judge(ParsedResponse(None, None, "stop()"), expected_action="forward()", at_intersection=True)
    assert (judgement.reward, judgement.verdict) == (REWARD_WRONG_ACTION, "wrong_action")


def test_feedback_quotes_are_safe() -> None:
    assert quote_for_feedback("turn_direction(\u00e9ast)\n") == "turn_direction(?ast)?"
    assert quote_for_feedback("x" * 500).endswith("...") and len(quote_for_feedback("x" * 500)) == 63
