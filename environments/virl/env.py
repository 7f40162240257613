"""The VIRL-v0 Gymnasium environment: V-IRL street navigation for language and vision models."""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from environments.arguments import check_choice, reset_options
from environments.splits import SPLITS, split_shares
from environments.virl.city import CITY_SETS, City, load_city_set
from environments.virl.geometry import COMPASS_NAMES, RELATIVE_TURNS
from environments.virl.published import PublishedRouteDatabase
from environments.virl.routes import (
    INTERSECTION_SENTENCE,
    Location,
    Rail,
    Route,
    build_rail,
    route_split,
)
from environments.virl.street_view import StreetViewRenderer
from environments.virl.verifier import REWARD_OUT_OF_ATTEMPTS, ParsedResponse, judge, parse_response
from environments.virl.view_grid import grid_size

MODALITIES = ("vision", "language")
ACTION_SPACES = ("absolute", "relative")
TEXT_CHARSET = string.printable
"""Characters an observation text is made of (and the nominal charset of the action space)."""
MAX_TEXT_LENGTH = 16_384
DEFAULT_RESOLUTION = 448
"""Side of each street view in pixels (the grid is 2 * 448 + 5 = 901 pixels square)."""

_TASK = (
    "[Task]\n"
    "You are walking through a city, following route instructions one decision at a time. {seeing}"
    "Below are the numbered instructions, the actions you may take, and the observations and actions of "
    "your walk so far. First work out which instruction you are carrying out now; then choose the next "
    "action from the action space, based on your latest observation."
)
_SEEING = {
    "language": "Your observations are given as text. ",
    "vision": "At every point you see the streets around you as an image of four views. ",
}
_VIEWS = (
    "[Street views]\n"
    "The image is a 2x2 grid of street views, each with a 90-degree field of view, laid out as\n"
    "[front, right\n"
    " back, left]\n"
    "where front is the way you are facing. Check whether a landmark named in the instructions is in view."
)
_ACTIONS = (
    "[Action space]\n"
    '"forward()": walk on to the next point along the street.\n'
    '"turn_direction(x)": turn to face direction x and walk on along that street; x is one of {directions}.\n'
    '"stop()": you have arrived at the destination.'
)
_ANSWER = (
    "[Answer format]\n"
    "Reply with one JSON object and nothing else:\n"
    "{\n"
    '  "current observation": "what you observe at this point",\n'
    '  "current instruction": "the instruction sentence you are carrying out now",\n'
    '  "action": "one action from the action space, such as forward()"\n'
    "}"
)
_VISION_OBSERVATION = "You observe 4 street views"


class _RouteSource(Protocol):
    """Where routes and their street views come from."""

    routes: Sequence[Route]

    def route_city(self, route_index: int) -> str: ...

    def has_view(self, location: Location) -> bool: ...

    def render_grid(self, route_index: int, location: Location, heading: float, resolution: int) -> np.ndarray: ...


class _BuiltinSource:
    """The routes of a built-in city set, seen through the project's street-view renderer."""

    def __init__(self, name: str) -> None:
        cities = load_city_set(name)
        self.routes: list[Route] = []
        self._city_of_route: list[int] = []
        for index, city in enumerate(cities):
            self.routes += city.routes
            self._city_of_route += [index] * len(city.routes)
        self._cities: tuple[City, ...] = cities
        self._renderers: dict[int, StreetViewRenderer] = {}

    def route_city(self, route_index: int) -> str:
        """The name of the city the route runs in (part of its split key)."""
        return self._cities[self._city_of_route[route_index]].layout.name

    def has_view(self, location: Location) -> bool:
        return True

    def render_grid(self, route_index: int, location: Location, heading: float, resolution: int) -> np.ndarray:
        city_index = self._city_of_route[route_index]
        renderer = self._renderers.get(city_index)
        if renderer is None:
            renderer = self._renderers[city_index] = StreetViewRenderer(self._cities[city_index])
        return renderer.render_grid(location.east, location.north, heading, resolution)


class _PublishedSource:
    """The routes of a published database directory, seen through crops of its panoramas."""

    def __init__(self, data_dir: str | Path, need_views: bool) -> None:
        self.database = PublishedRouteDatabase(data_dir, need_views=need_views)
        self.routes = self.database.routes

    def route_city(self, route_index: int) -> str:
        """Empty: a published route's geocodes already say where on Earth it runs."""
        return ""

    def has_view(self, location: Location) -> bool:
        return self.database.has_view(location)

    def render_grid(self, route_index: int, location: Location, heading: float, resolution: int) -> np.ndarray:
        return self.database.render_grid(location, heading, resolution, route_id=self.routes[route_index].route_id)


class VIRLEnv(gym.Env):
    """V-IRL street navigation from "SFT Memorizes, RL Generalizes" (Chu et al., 2025), for language and vision models.

    ## Description
    The agent follows numbered route instructions ("First, turn left to face east. Move forward
    until you reach next intersection where Juniper Cafe is on your right front. ...") through a
    city, one decision point at a time. At each point it answers with one JSON object giving its
    current observation, the instruction it is carrying out, and one action. A correct action moves
    it to the next point of the route's ground-truth path (the "rail"); a wrong one earns feedback
    and a retry in the same dialogue, up to ``max_attempts`` times per point. ``stop()`` at the
    destination finishes the route.

    Routes come from a built-in, procedurally generated city (the default; no download) or from a
    directory of the published V-IRL route data (``data_dir``). The rail has the start (turn to the
    first heading), up to 5 in-between points per leg (``forward()``; each dropped with probability
    0.5 and kept only if more than 8 m from both ends of the leg), each intersection (the
    milestone's turn) and the destination (``stop()``).

    ## Route sources
    - Built-in cities (``city=...``, no download): generated from seeded code in well under a
      second and cached per process. ``"builtin"`` is a 10 x 10 street grid with block lengths of
      70-150 m, jittered intersections, about a tenth of the streets missing and three diagonal
      avenues, so routes meet all 8 compass headings and all 4 relative turn kinds. About 1,200
      buildings line the streets; some 200 are landmarks with unique names ("Juniper Cafe",
      "Hotel Marlowe", "Cobalt Bank", ...), at street corners and mid-block. Its 1,000 routes run
      from the front of a building to a landmark across 1 to 5 turning intersections; a milestone's
      landmark phrase names the landmark nearest the intersection and where it lies for the walker
      arriving there. Street views are rendered by ray casting: a camera 2.5 m above the street
      sees the road (lane markings, crosswalks), sidewalks, facades with windows and shop fronts,
      and every landmark's name on a sign over its shop front on each wall that faces a street.
      ``"builtin-ood"`` is three smaller old-town cities in another style (stucco and shutters,
      evening sky, serif capitals on the signs), 12 routes each.
    - Published data (``data_dir=...``): a directory in the V-IRL release's format:
      ``route_infos.json`` (a JSON array ``[route_list, route_count]``; per route
      ``start_place.relocated_geocode``, optional ``init_heading``, ``route_results.geocode_list``
      (intersections then destination), ``dest_place.name`` and ``milestone_info``, a string of
      ``{ "key": "value", ... }`` blocks, one per leg, with ``landmarks`` and
      ``to_next_intersection_heading`` such as ``"177 (south)"``), ``gps_pano_mapping.pkl`` (a
      pickled dict of (lat, lng) -> panorama id; read as plain data only) and
      ``street_views/{id}.jpg`` equirectangular panoramas with ``{id}.metadata.json`` holding their
      ``rotation`` (the column at fraction u of the width looks toward (360 u - rotation) mod 360).
      A point is seen through the nearest panorama within 20 m, cropped to 90-degree views by a
      vectorised gnomonic projection; the last 8 decoded panoramas are kept. Language modality reads
      only ``route_infos.json``. A panorama file that resolves outside the directory (a symlink out of
      it) is refused: link the whole directory, not ``street_views/``.

    ## Action Space
    The model's raw response text; any ``str`` is accepted and judged (non-ASCII, empty, megabytes
    long or deeply nested text earns a penalty, never an exception). ``action_space`` is a nominal
    ``Text(max_length=16384, charset=string.printable)`` so that ``action_space.sample()`` works.
    Expected format: ``{"current observation": "...", "current instruction": "...", "action": "forward()"}``
    where the action is ``forward()``, ``turn_direction(x)`` or ``stop()``; x is a compass direction
    (north, northeast, ..., northwest) with ``action_space="absolute"`` and one of left, right,
    slightly left, slightly right with ``action_space="relative"``.

    ## Observation Space
    ``Dict({"text": Text(...)})`` in language modality, plus ``"image": Box(0, 255, (2r + 5, 2r + 5, 3),
    uint8)`` in vision modality (r = ``resolution``): a 2x2 grid of 90-degree street views at pitch 0,
    laid out as the prompt states, [front, right / back, left], with 5 px black lines between them.
    ``"text"`` is the user message of this turn. At reset and after every correct action it is a
    fresh prompt (``info["new_dialogue"]`` is True): task, instructions, (vision) the grid layout,
    action space, and the observation/action history ``O_1: ... A_1: ... O_k: ... A_k:`` ending with
    the current observation and an empty ``A_k:``; past actions are the correct ones. In language
    modality an observation is the landmark phrase ("Juniper Cafe is on your right front", or "No
    landmarks nearby") plus "; You observe an intersection" at an intersection; in vision modality
    the current observation reads "You observe 4 street views" (plus the intersection sentence) and
    the image shows it, while past observations stay in text. After a wrong answer the text is the
    feedback (``info["new_dialogue"]`` is False): the model answers again in the same dialogue.

    ## Starting State
    ``reset(options={"route": i})`` walks ``env.unwrapped.routes[i]``, the ``i``-th route of the chosen
    ``split``; otherwise a route of the split is drawn uniformly with ``self.np_random``.
    The in-between points are dropped with ``self.np_random``, and a route without an initial
    heading (published data with 0 or none) gets one drawn uniformly from 0..359.

    ## Rewards
    | answer | reward | verdict |
    |---|---|---|
    | the expected action (exact match after normalising spaces and quotes) | +1, move on (or finish at the destination) | ``correct`` |
    | wrong or missing action, and the "current observation" claims an intersection where there is none or denies one where there is one | -1.5 | ``wrong_observation`` |
    | a wrong action | -1 | ``wrong_action`` |
    | no action could be read (not JSON and no ``"action": ...`` found), or the answer is longer than 16,384 characters (not read) | -1 | ``no_action`` |
    | an answer after ``max_attempts`` failed attempts at one point (not read) | -1, the route fails | ``out_of_attempts`` |

    The intersection claim is read from the "current observation" text: it claims an intersection
    when it mentions "intersection" without one of "no", "not", "without", "never", "none", "nor",
    "neither", "nothing", "cannot" or a word ending in "n't" among the 4 words before it, in the same
    clause (:func:`environments.virl.verifier.claims_intersection`). An answer without a readable
    "current observation" makes no claim and gets -1 at most.

    ## Episode End
    Terminated with success by a correct ``stop()`` at the destination. Truncated, failed, by an
    answer after ``max_attempts`` failed attempts at one point (so the third answer by default).
    Calling ``step`` after the end raises ``RuntimeError``.

    ## Information
    ``info`` after reset and after every step holds plain Python values:
    ``route_index`` (the index in ``env.unwrapped.routes``, the chosen split's routes) and ``route_id``
    (which route), ``point_index`` and ``num_points`` (where on the
    rail the agent now is), ``expected_action`` (the correct action at the current point),
    ``at_intersection`` (whether the current point is one of the route's intersections),
    ``current_instruction`` (the sentence that applies there) and ``instruction_index`` (its
    1-based number), ``attempts_left`` (verified attempts left at this point), ``verdict`` (one of
    :data:`environments.virl.verifier.VERDICTS`, ``""`` after reset) and ``feedback`` (its reason,
    ``""`` after reset) for the answer just judged, ``new_dialogue``, ``success`` (the route was
    finished), ``correct_steps`` and ``verified_steps`` (answers judged so far, retries included)
    and ``step_accuracy`` (their ratio, the papers' per-step accuracy; 0.0 before any answer).

    The oracle expert: ``env.unwrapped.expert_response()`` returns the correct JSON answer at the
    current point (``envs.call("expert_response")`` in a vector env).

    ## Arguments
    ```python
    gym.make("VIRL-v0", modality="vision", action_space="absolute", city="builtin", data_dir=None,
             max_attempts=2, split="all", resolution=448, render_mode=None)
    ```
    - ``modality``: ``"vision"`` (the current observation is the image of four views) or ``"language"``.
    - ``action_space``: ``"absolute"`` (compass turns; training and in distribution) or ``"relative"``
      (left/right turns; the rule-OOD test). The instructions are the same in both.
    - ``city``: ``"builtin"`` (one generated city, 1000 routes; training and in distribution) or
      ``"builtin-ood"`` (three smaller cities in another visual style, 36 routes; the visual-OOD test).
    - ``data_dir``: a directory in the published V-IRL format (see ``docs/virl.md``); replaces
      ``city``. Language modality needs only its ``route_infos.json``.
    - ``max_attempts``: verified attempts per rail point (at least 1; the benchmark's is 2).
    - ``split``: ``"all"`` (every route; the papers' protocol), ``"train"``, ``"val"`` or ``"test"``: a
      fixed partition of the routes, about 70/10/20 (:func:`environments.virl.routes.route_split`,
      :mod:`environments.splits`). ``"test"`` is for reported held-out evaluation; ``"val"`` is for
      tuning and controllers (such as AMFT's meta-gradient validation episodes), so nothing that steers
      training sees a test route. A route's side is decided by the SHA-256 of its city's name and its
      points (start, intersections, destination; geocodes for published data), never by its position
      or id, so it holds for any subset of a route database. The built-in ``"builtin"`` city has 706
      train, 107 val and 187 test routes; ``"builtin-ood"`` has 27 train and 9 test routes and no val
      route. ``routes`` and ``options={"route": i}`` see only the split's routes, in their source's
      order, so a seed picks a route of the split; with ``"all"`` they see every route. A split with no
      route (``"val"`` of ``"builtin-ood"``, a tiny database) raises ``ValueError``.
    - ``resolution``: side of each view in pixels, an even number from 64 to 2048.
    - ``render_mode``: ``None`` or ``"rgb_array"`` (``render()`` returns the current view grid, in either modality).

    Invalid values raise ``ValueError`` naming the argument and the allowed values; a missing or
    malformed data file raises an error naming the file and what was expected there.

    ## Differences from the published benchmark
    - The relative turn wraps the heading difference to (-180, 180] (350 -> 10 degrees is "slightly
      right"); the reference did not wrap.
    - The -1.5 observation penalty compares the answer's intersection claim with whether the agent
      truly is at an intersection; the reference compared it with a text that never mentions
      intersections, so it fired on correct claims.
    - The views are laid out as the prompt states, [front, right / back, left]; the reference's were not.
    - Views are 448 px by default (grid 901 px) instead of 1200 px (grid 2405 px), to fit VLM token
      budgets; ``resolution`` sets it.
    - The default routes come from generated cities rendered by this project (1000 routes in one
      city; the visual-OOD set is 36 routes in 3 cities of another style), not Google Street View of
      New York (1000 routes) and the "VLN mini" cities (18 routes in 9 cities). Built-in routes have
      a fixed initial heading, so a route's instructions never change.
    - In-between points sit at 1/6 .. 5/6 of each leg, so up to 5 survive the 8 m rule (the
      reference's last point fell on the leg's end and was always discarded).
    - Each point's instruction follows from its place on the route; the reference's counter slipped
      by one after a leg of 5 m or less.
    - A point's observation is "landmark; You observe an intersection" at intersections and just the
      landmark elsewhere; a last leg without a landmark reads "Move forward until you reach
      destination." (the reference wrote "... where No landmark nearby.").
    - Answers are parsed leniently (trailing commas, single quotes, text around the JSON); an
      unreadable answer is a wrong action (-1). Published landmark names are turned into plain ASCII.
    - Prompts and feedback are written for this project. Randomness comes from ``self.np_random``.
    - ``split`` adds validation and held-out sets of routes that the papers do not have; ``split="all"`` is
      their protocol.
    - A published route point without a panorama within 20 m is skipped if it is an in-between
      point and an error otherwise (the reference re-located points through its map service).

    ## Version History
    - v0: initial release. ``split="val"`` was added later without a version bump: ``"all"`` and the
      ``"test"`` routes are unchanged, and ``"train"`` gave up the routes that are now ``"val"``
      (``"builtin"`` went from 813 to 706 train routes).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}

    def __init__(
        self,
        modality: str = "vision",
        action_space: str = "absolute",
        city: str = "builtin",
        data_dir: str | Path | None = None,
        max_attempts: int = 2,
        split: str = "all",
        resolution: int = DEFAULT_RESOLUTION,
        render_mode: str | None = None,
    ) -> None:
        check_choice("modality", modality, MODALITIES)
        check_choice("action_space", action_space, ACTION_SPACES)
        check_choice("city", city, tuple(CITY_SETS))
        check_choice("split", split, SPLITS)
        check_choice("render_mode", render_mode, (None, *self.metadata["render_modes"]))
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int | np.integer) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer of at least 1; got {max_attempts!r}")
        if isinstance(resolution, bool) or not isinstance(resolution, int | np.integer) or not 64 <= resolution <= 2048 or resolution % 2:
            raise ValueError(f"resolution must be an even integer from 64 to 2048; got {resolution!r}")
        if data_dir is not None and city != "builtin":
            raise ValueError(f"give either city ({city!r}) or data_dir ({str(data_dir)!r}), not both")
        self.modality, self.action_kind, self.max_attempts, self.split = modality, action_space, int(max_attempts), split
        self.resolution, self.render_mode = int(resolution), render_mode
        self.city = None if data_dir is not None else city
        self.data_dir = None if data_dir is None else Path(data_dir)
        need_views = modality == "vision" or render_mode == "rgb_array"
        self._source: _RouteSource = _BuiltinSource(city) if data_dir is None else _PublishedSource(data_dir, need_views)
        self._need_views = need_views
        source_routes = self._source.routes
        self._source_indices = tuple(
            index
            for index, route in enumerate(source_routes)
            if split == "all" or route_split(route, self._source.route_city(index)) == split
        )
        if not self._source_indices:
            where = f"city {city!r}" if data_dir is None else f"the {len(source_routes)} route(s) in {str(data_dir)!r}"
            raise ValueError(
                f"no route of {where} belongs to split {split!r} (routes are split {split_shares()} by "
                "environments.virl.routes.route_split); use split='all', another split or a route set with more routes"
            )
        self._routes = tuple(source_routes[index] for index in self._source_indices)

        directions = COMPASS_NAMES if action_space == "absolute" else RELATIVE_TURNS
        sections = [_TASK.format(seeing=_SEEING[modality]), "[Instructions]\n{instructions}"]
        if modality == "vision":
            sections.append(_VIEWS)
        sections += [_ACTIONS.format(directions=", ".join(directions)), "[Observations and actions so far]\n{history}", _ANSWER]
        self._prompt_template = "\n\n".join(section.replace("{", "{{").replace("}", "}}") for section in sections)
        self._prompt_template = self._prompt_template.replace("{{instructions}}", "{instructions}").replace("{{history}}", "{history}")

        text_space = spaces.Text(min_length=1, max_length=MAX_TEXT_LENGTH, charset=TEXT_CHARSET)
        observation = {"text": text_space}
        if modality == "vision":
            side = grid_size(self.resolution)
            observation["image"] = spaces.Box(0, 255, (side, side, 3), np.uint8)
        self.observation_space = spaces.Dict(observation)
        self.action_space = spaces.Text(max_length=MAX_TEXT_LENGTH, charset=TEXT_CHARSET)

        self._rail: Rail | None = None
        self._route_index = 0
        self._point_index = 0
        self._history: list[tuple[str, str]] = []
        self._attempts_left = 0
        self._done = True
        self._success = False
        self._correct_steps = 0
        self._verified_steps = 0
        self._image: np.ndarray | None = None

    # -- public API --
    @property
    def routes(self) -> Sequence[Route]:
        """The routes of the chosen split, in their source's order (``options={"route": i}`` picks ``routes[i]``)."""
        return self._routes

    @property
    def rail(self) -> Rail:
        """The current episode's rail (its instructions and decision points)."""
        if self._rail is None:
            raise RuntimeError("no route yet; call reset() first")
        return self._rail

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Start walking a route: ``options["route"]`` or one drawn with ``self.np_random``."""
        options = reset_options(options, {"route": "a route index into env.unwrapped.routes"})
        super().reset(seed=seed)
        routes = self._routes
        if "route" in options:
            index = options["route"]
            if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < len(routes):
                raise ValueError(
                    f"options['route'] must be a route index from 0 to {len(routes) - 1} (split {self.split!r}); got {index!r}"
                )
            self._route_index = int(index)
        else:
            self._route_index = int(self.np_random.integers(len(routes)))
        route = routes[self._route_index]
        init_heading = route.init_heading if route.init_heading is not None else float(self.np_random.integers(0, 360))
        keep = self._source.has_view if self._need_views else None
        self._rail = build_rail(route, init_heading, self.np_random, keep=keep)
        self._point_index = 0
        self._history = []
        self._attempts_left = self.max_attempts
        self._done = False
        self._success = False
        self._correct_steps = 0
        self._verified_steps = 0
        self._image = None
        return self._observation(self._prompt()), self._info("", "", new_dialogue=True)

    def step(self, action: str) -> tuple[dict, float, bool, bool, dict]:
        """Judge one answer; see the class docstring for rewards and episode end."""
        if self._done or self._rail is None:
            raise RuntimeError("the episode is over; call reset() before step()")
        point = self._rail.points[self._point_index]
        if self._attempts_left == 0:
            self._done = True
            feedback = "No attempts were left at this point, so this answer was not checked. The route is failed."
            return self._observation(feedback), REWARD_OUT_OF_ATTEMPTS, False, True, self._info("out_of_attempts", feedback)
        response = parse_response(action) if isinstance(action, str) else ParsedResponse(None, None, None)
        judgement = judge(response, expected_action=point.expected_action(self.action_kind), at_intersection=point.at_intersection)
        self._verified_steps += 1
        self._attempts_left -= 1
        if judgement.correct:
            self._correct_steps += 1
            if point.kind == "destination":
                self._done = self._success = True
                text = "Correct: you have reached the destination."
                return self._observation(text), judgement.reward, True, False, self._info(judgement.verdict, judgement.feedback)
            self._history.append((point.observation, point.expected_action(self.action_kind)))
            self._point_index += 1
            self._attempts_left = self.max_attempts
            self._image = None
            info = self._info(judgement.verdict, judgement.feedback, new_dialogue=True)
            return self._observation(self._prompt()), judgement.reward, False, False, info
        if self._attempts_left:
            text = f"{judgement.feedback} You have {self._attempts_left} more attempt(s) at this point."
        else:
            text = f"{judgement.feedback} That was your last attempt at this point."
        return self._observation(text), judgement.reward, False, False, self._info(judgement.verdict, judgement.feedback)

    def render(self) -> np.ndarray | None:
        """The current 2x2 view grid (``render_mode="rgb_array"``), in either modality; None otherwise."""
        if self.render_mode != "rgb_array" or self._rail is None:
            return None
        return self._current_image().copy()

    def expert_response(self) -> str:
        """The oracle's answer at the current point: the true observation, the current instruction and the correct action."""
        if self._rail is None:
            raise RuntimeError("no route yet; call reset() first")
        point = self._rail.points[self._point_index]
        return json.dumps(
            {
                "current observation": point.observation,
                "current instruction": self._rail.instructions[point.instruction_index],
                "action": point.expected_action(self.action_kind),
            }
        )

    # -- internals --
    def _current_image(self) -> np.ndarray:
        if self._image is None:
            rail = self.rail
            point = rail.points[self._point_index]
            source_index = self._source_indices[self._route_index]
            self._image = self._source.render_grid(source_index, point.location, point.heading, self.resolution)
        return self._image

    def _prompt(self) -> str:
        rail = self.rail
        point = rail.points[self._point_index]
        if self.modality == "vision":
            current = f"{_VISION_OBSERVATION}; {INTERSECTION_SENTENCE}" if point.at_intersection else _VISION_OBSERVATION
        else:
            current = point.observation
        steps = [f"O_{i}: {observation}\nA_{i}: {action}" for i, (observation, action) in enumerate(self._history, start=1)]
        current_step = f"O_{len(steps) + 1}: {current}\nA_{len(steps) + 1}:"
        text = self._prompt_template.format(instructions=rail.instruction_text, history="\n".join([*steps, current_step]))
        dropped = 0
        while len(text) > MAX_TEXT_LENGTH and dropped < len(steps):  # a very long published route: leave out the oldest steps
            dropped += 1
            history = "\n".join([f"(the first {dropped} steps are left out)", *steps[dropped:], current_step])
            text = self._prompt_template.format(instructions=rail.instruction_text, history=history)
        return text[:MAX_TEXT_LENGTH]

    def _observation(self, text: str) -> dict:
        observation: dict[str, Any] = {"text": text}
        if self.modality == "vision":
            observation["image"] = self._current_image().copy()  # callers keep observations; never hand out shared memory
        return observation

    def _info(self, verdict: str, feedback: str, *, new_dialogue: bool = False) -> dict:
        rail = self.rail
        point = rail.points[self._point_index]
        return {
            "route_index": self._route_index,
            "route_id": rail.route.route_id,
            "point_index": self._point_index,
            "num_points": len(rail.points),
            "expected_action": point.expected_action(self.action_kind),
            "at_intersection": point.at_intersection,
            "current_instruction": rail.instructions[point.instruction_index],
            "instruction_index": point.instruction_index + 1,
            "attempts_left": self._attempts_left,
            "verdict": verdict,
            "feedback": feedback,
            "new_dialogue": new_dialogue,
            "success": self._success,
            "correct_steps": self._correct_steps,
            "verified_steps": self._verified_steps,
            "step_accuracy": self._correct_steps / self._verified_steps if self._verified_steps else 0.0,
        }
