"""VIRL-v0 on the built-in cities: the Gymnasium contract, the expert, actions, penalties and fuzzed answers."""

from __future__ import annotations

import functools
import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import environments  # noqa: F401  (registers VIRL-v0)
from environments.virl.env import DEFAULT_RESOLUTION, VIRLEnv
from environments.virl.geometry import COMPASS_NAMES, RELATIVE_TURNS, compass_name, relative_turn
from environments.virl.settings import PAPER_SETTINGS
from environments.virl.verifier import MAX_RESPONSE_CHARS

RESOLUTION = 64


def _make(**kwargs) -> VIRLEnv:
    kwargs.setdefault("resolution", RESOLUTION)
    return gym.make("VIRL-v0", **kwargs).unwrapped


def _walk(env: VIRLEnv, route: int, seed: int = 0) -> list[tuple[dict, float, dict]]:
    env.reset(seed=seed, options={"route": route})
    steps = []
    while True:
        obs, reward, terminated, truncated, info = env.step(env.expert_response())
        steps.append((obs, reward, info))
        if terminated or truncated:
            assert terminated and not truncated
            return steps


@pytest.mark.parametrize("modality", ["language", "vision"])
@pytest.mark.parametrize("action_space", ["absolute", "relative"])
def test_check_env(modality: str, action_space: str) -> None:
    env = gym.make("VIRL-v0", modality=modality, action_space=action_space, resolution=RESOLUTION)
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


def test_default_make_works_and_uses_the_default_resolution() -> None:
    env = gym.make("VIRL-v0")
    obs, info = env.reset(seed=0)
    side = 2 * DEFAULT_RESOLUTION + 5
    assert obs["image"].shape == (side, side, 3) and obs["image"].dtype == np.uint8
    assert obs["image"] in env.observation_space["image"]
    assert info["new_dialogue"] and info["verdict"] == "" and info["attempts_left"] == 2
    assert len(env.unwrapped.routes) >= 1000
    env.close()


@pytest.mark.parametrize("modality", ["language", "vision"])
@pytest.mark.parametrize("vector_class", [gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv])
def test_vector_envs(vector_class: type, modality: str) -> None:
    def make():
        return gym.make("VIRL-v0", modality=modality, resolution=RESOLUTION)

    kwargs = {"shared_memory": False} if vector_class is gym.vector.AsyncVectorEnv else {}
    envs = vector_class([make, make], **kwargs)
    try:
        obs, infos = envs.reset(seed=[1, 2])
        if modality == "vision":
            assert obs["image"].shape == (2, 2 * RESOLUTION + 5, 2 * RESOLUTION + 5, 3)
        assert len(obs["text"]) == 2 and all(isinstance(text, str) for text in obs["text"])
        for _ in range(6):
            answers = envs.call("expert_response")
            assert all(isinstance(a, str) for a in answers)
            obs, rewards, terminated, truncated, infos = envs.step(answers)
            assert rewards.tolist() == [1.0, 1.0]
            assert infos["verdict"].tolist() == ["correct", "correct"]
    finally:
        envs.close()


def test_expert_solves_builtin_routes_in_language() -> None:
    env = _make(modality="language")
    for route in range(0, 1000, 10):
        steps = _walk(env, route, seed=route)
        obs, reward, info = steps[-1]
        assert info["success"] and info["step_accuracy"] == 1.0
        assert info["correct_steps"] == info["verified_steps"] == len(steps) == info["num_points"]
        assert all(r == 1.0 for _, r, _ in steps)


@pytest.mark.parametrize("city", ["builtin", "builtin-ood"])
def test_expert_solves_routes_in_vision(city: str) -> None:
    env = _make(modality="vision", city=city)
    for route in (0, 7):
        steps = _walk(env, route)
        assert steps[-1][2]["success"] and steps[-1][2]["step_accuracy"] == 1.0


def test_expert_answer_is_what_the_verifier_wants() -> None:
    """At every point the expert's answer is what the environment says it expects there (``info``), and it is judged correct."""
    env = _make(modality="language")
    _, info = env.reset(seed=3)
    terminated, verdicts = False, []
    while not terminated:
        answer = json.loads(env.expert_response())
        assert answer["action"] == info["expected_action"]
        assert answer["current instruction"] == info["current_instruction"]
        assert ("You observe an intersection" in answer["current observation"]) == info["at_intersection"]
        _, _, terminated, _, info = env.step(json.dumps(answer))
        verdicts.append(info["verdict"])
    assert info["success"] and len(verdicts) > 1 and set(verdicts) == {"correct"}


def test_actions_at_every_turn_kind() -> None:
    absolute, relative = _make(modality="language"), _make(modality="language", action_space="relative")
    seen_relative: set[str] = set()
    seen_absolute: set[str] = set()
    for route in range(0, 1000, 7):
        absolute.reset(seed=route, options={"route": route})
        relative.reset(seed=route, options={"route": route})
        assert absolute.rail == relative.rail
        rail = absolute.rail
        previous = rail.init_heading
        turns = [p for p in rail.points if p.kind in ("start", "intersection")]
        for point, milestone in zip(turns, rail.route.milestones, strict=True):
            assert point.heading == previous
            assert point.absolute_action == f"turn_direction({compass_name(milestone.heading)})"
            assert point.relative_action == f"turn_direction({relative_turn(previous, milestone.heading)})"
            if point.kind == "intersection":
                seen_relative.add(point.relative_action)
                seen_absolute.add(point.absolute_action)
            previous = milestone.heading
    assert seen_relative == {f"turn_direction({turn})" for turn in RELATIVE_TURNS}
    assert seen_absolute == {f"turn_direction({name})" for name in COMPASS_NAMES}


def test_relative_space_accepts_only_relative_turns() -> None:
    env = _make(modality="language", action_space="relative")
    obs, info = env.reset(seed=0, options={"route": 5})
    assert info["expected_action"] in {f"turn_direction({turn})" for turn in RELATIVE_TURNS}
    absolute = env.rail.points[0].absolute_action
    obs, reward, *_ , info = env.step(json.dumps({"current observation": "No landmarks nearby", "action": absolute}))
    assert reward == -1.0 and info["verdict"] == "wrong_action"
    assert f"The action {absolute} is not the right one here" in obs["text"]
    obs, reward, *_ , info = env.step(env.expert_response())
    assert reward == 1.0 and info["new_dialogue"]


def _unwrapped_turn(previous: float, following: float) -> str:
    """The reference's rule, which did not wrap the difference."""
    difference = following - previous
    if difference < -45:
        return "left"
    if difference > 45:
        return "right"
    return "slightly left" if difference <= 0 else "slightly right"


def test_builtin_routes_need_the_wrapped_turn_rule() -> None:
    env = _make(modality="language")
    differing = 0
    for route in env.routes:
        headings = [route.init_heading] + [milestone.heading for milestone in route.milestones]
        for previous, following in zip(headings, headings[1:], strict=False):
            differing += relative_turn(previous, following) != _unwrapped_turn(previous, following)
    assert differing >= 50  # turns across north, where the unwrapped difference names the wrong turn


@pytest.mark.parametrize("claim", [True, False])
def test_observation_penalty_in_the_environment(claim: bool) -> None:
    env = _make(modality="language")
    checked = {True: 0, False: 0}
    for route in range(20):
        env.reset(seed=route, options={"route": route})
        while True:
            point = env.rail.points[env._point_index]
            observation = "I observe an intersection" if claim else "No landmarks nearby"
            wrong = "stop()" if point.kind != "destination" else "forward()"
            _, reward, terminated, truncated, info = env.step(json.dumps({"current observation": observation, "action": wrong}))
            expected = -1.5 if claim != point.at_intersection else -1.0
            assert reward == expected and info["verdict"] == ("wrong_observation" if expected == -1.5 else "wrong_action")
            checked[point.at_intersection] += 1
            _, reward, terminated, truncated, info = env.step(env.expert_response())
            assert reward == 1.0
            if terminated:
                break
    assert checked[True] > 10 and checked[False] > 50


def test_attempts_dialogue_and_truncation() -> None:
    env = _make(modality="vision", max_attempts=2)
    obs, info = env.reset(seed=4)
    image = obs["image"]
    first_prompt = obs["text"]
    assert "O_1:" in first_prompt and first_prompt.rstrip().endswith("}") and "A_1:" in first_prompt
    obs, reward, terminated, truncated, info = env.step("I am lost")
    assert (reward, terminated, truncated, info["new_dialogue"], info["attempts_left"]) == (-1.0, False, False, False, 1)
    assert (obs["image"] == image).all() and "1 more attempt" in obs["text"]
    obs, reward, terminated, truncated, info = env.step("still lost")
    assert "last attempt" in obs["text"] and info["attempts_left"] == 0
    obs, reward, terminated, truncated, info = env.step(env.expert_response())  # too late: not read
    assert (reward, terminated, truncated, info["verdict"], info["success"]) == (-1.0, False, True, "out_of_attempts", False)
    assert info["verified_steps"] == 2 and info["step_accuracy"] == 0.0
    with pytest.raises(RuntimeError):
        env.step(env.expert_response())


def test_history_and_fresh_prompts() -> None:
    env = _make(modality="language")
    env.reset(seed=0, options={"route": 1})
    env.step("wrong")
    obs, reward, _, _, info = env.step(env.expert_response())
    assert info["new_dialogue"] and info["step_accuracy"] == 0.5
    first = env.rail.points[0]
    assert f"O_1: {first.observation}\nA_1: {first.absolute_action}\nO_2: " in obs["text"]
    assert obs["text"].count("A_2:") == 1


def test_vision_prompt_states_the_grid_and_the_intersection() -> None:
    env = _make(modality="vision")
    env.reset(seed=0, options={"route": 3})
    while not env.rail.points[env._point_index].at_intersection:
        obs, *_ = env.step(env.expert_response())
    assert "[front, right\n back, left]" in obs["text"]
    assert obs["text"].split("[Observations and actions so far]")[1].count("You observe 4 street views; You observe an intersection") == 1


def test_reset_is_reproducible_and_validates_options() -> None:
    env = _make(modality="language")
    first = env.reset(seed=11)
    second = env.reset(seed=11)
    assert first == second
    with pytest.raises(ValueError, match="options\\['route'\\]"):
        env.reset(options={"route": 5000})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modality": "audio"}, "modality"),
        ({"action_space": "diagonal"}, "action_space"),
        ({"city": "paris"}, "city"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"resolution": 63}, "resolution"),
        ({"resolution": 4096}, "resolution"),
        ({"render_mode": "human"}, "render_mode"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VIRLEnv(**kwargs)


def test_render_returns_the_grid_in_language_modality_too() -> None:
    env = gym.make("VIRL-v0", modality="language", render_mode="rgb_array", resolution=RESOLUTION)
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (2 * RESOLUTION + 5, 2 * RESOLUTION + 5, 3)
    plain = gym.make("VIRL-v0", modality="language")
    plain.reset(seed=0)
    assert plain.render() is None


def test_paper_settings_make() -> None:
    for name, kwargs in PAPER_SETTINGS.items():
        env = gym.make("VIRL-v0", resolution=RESOLUTION, **kwargs)
        env.reset(seed=0)
        assert env.unwrapped.city == kwargs["city"], name


# --- fuzzing --------------------------------------------------------------------------------------

@functools.cache
def _fuzz_env() -> VIRLEnv:
    return _make(modality="language")


def _judge_quickly(text: str) -> tuple[float, dict]:
    env = _fuzz_env()
    env.reset(seed=0, options={"route": 0})
    obs, reward, terminated, truncated, info = env.step(text)
    assert obs["text"] in env.observation_space["text"]
    return reward, info


def test_an_answer_over_the_length_cap_is_not_read():
    """The work per step is bounded: past MAX_RESPONSE_CHARS nothing is parsed, and it scores as no action."""
    env = _fuzz_env()
    env.reset(seed=0, options={"route": 0})
    correct = env.unwrapped.expert_response()
    at_cap = correct + " " * (MAX_RESPONSE_CHARS - len(correct))
    assert env.step(at_cap)[1] == 1.0
    for text in (at_cap + " ", "+" * 20_000_000, correct * 10_000):
        env.reset(seed=0, options={"route": 0})
        _, reward, _, _, info = env.step(text)
        assert (reward, info["verdict"]) == (-1.0, "no_action")
        assert f"longer than {MAX_RESPONSE_CHARS:,} characters" in info["feedback"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_fuzzed_answers_never_raise(text: str) -> None:
    reward, info = _judge_quickly(text)
    assert reward in (1.0, -1.0, -1.5)


@settings(max_examples=60, deadline=None)
@given(
    observation=st.text(max_size=60),
    action=st.text(max_size=60),
    junk=st.text(max_size=40),
)
def test_fuzzed_json_answers(observation: str, action: str, junk: str) -> None:
    text = junk + json.dumps({"current observation": observation, "current instruction": junk, "action": action})
    reward, info = _judge_quickly(text)
    assert reward in (1.0, -1.0, -1.5)
    assert all(ch.isascii() and ch.isprintable() for ch in info["feedback"])


@pytest.mark.parametrize(
    "text",
    [
        "x" * 1_000_000,
        "(" * 10_000 + ")" * 10_000,
        "{" * 10_000 + "}" * 10_000,
        '{"action": ' + "[" * 10_000 + "]" * 10_000 + "}",
        '{"action": "' + "(" * 10_000,
        ('"action": "' + "a" * 3000 + "\n") * 300,
        "\u00e9\u4e2d\U0001f600" * 50_000,
        '{"current observation": "' + "intersection " * 50_000 + '", "action": "\u00fcber()"}',
        "\x00\x01\x02" * 1000,
        "",
    ],
)
def test_pathological_answers(text: str) -> None:
    reward, info = _judge_quickly(text)
    assert reward in (-1.0, -1.5)
