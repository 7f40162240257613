"""Served models: ``amft-vlm eval --api-base`` against a real OpenAI-compatible HTTP server (`tests.amft_vlm.chat_server`).

The server knows nothing of seeds: the expert server answers from what it was sent (the prompt text
and the decoded image) through a table of expert answers made by playing the environments, and the
garbage server always says the same thing. Their records must equal the model-free agents' records
for the same seeds, through faults, restarts (V-IRL) and a stopped run.
"""

import errno
import importlib.metadata
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from agents.base import Agent
from agents.baselines import ExpertAgent
from agents.vision_inputs import resize_image
from amft_vlm.cli import main
from amft_vlm.evaluation.evaluate import evaluate, load_record, paper_setting
from amft_vlm.evaluation.served import (
    ChatClient,
    LogRedactor,
    ResponseCache,
    RetryPolicy,
    Sampling,
    ServedEndpoint,
    ServedRun,
    parse_completion,
    play_served,
    retry_after_seconds,
    server_identity,
)
from amft_vlm.rollout.engine import RolloutEngine
from amft_vlm.rollout.episode_metrics import TRANSPORT_FAILURE, EpisodeOutcome, compute_metrics
from tests.amft_vlm.chat_server import (
    EMPTY_COMPLETIONS,
    ODD_COMPLETIONS,
    ChatServer,
    expert_answer,
    expert_table,
    first_user_key,
    last_user_text,
    observation_key,
    request_images,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[3]
MAX_PIXELS = 28 * 28 * 16
"""A small pixel budget: a 200 px table is sent downscaled to 112 x 112."""
GARBAGE = "I cannot see any cards."
SECRET = "sk-test-do-not-record-0123456789"
GP_LANGUAGE = ("GeneralPoints-v0", {"modality": "language"})


class ConstantAgent(Agent):
    """The agent path's twin of the garbage server: always the same answer."""

    name = "constant"

    def act(self, observation, env):
        return GARBAGE


def expert_server(env_id, env_kwargs, seeds, **kwargs):
    """A server answering with the expert's answer for the dialogue's first user turn (what it was sent)."""
    return ChatServer(expert_answer(expert_table(env_id, env_kwargs, seeds, max_pixels=MAX_PIXELS)), **kwargs)


def _served_args(server, tmp_path, *extra):
    return ["eval", "--api-base", server.url, "--model", "test-model", "--api-key-env", "SERVED_TEST_KEY",
            "--cache-dir", str(tmp_path / "cache"), "--max-pixels", str(MAX_PIXELS), *extra]


def _run_eval(args, out):
    assert main([*args, "--out", str(out)]) == 0
    return load_record(out)


def _endpoint(url, tmp_path, **settings):
    settings = {"cache_dir": str(tmp_path / "cache"), "max_pixels": MAX_PIXELS, "concurrency": 2, **settings}
    return ServedEndpoint(url, "test-model", **settings)


def _play(endpoint, seeds, env=GP_LANGUAGE, **kwargs):
    return play_served(endpoint, env[0], env[1], seeds, Sampling(None, 64), progress=False, **kwargs)


def _wait_until(condition, what, seconds=240):
    """Wait for `condition` (a subprocess that imports torch can take a minute to start on a loaded 2-core machine)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def _cached(tmp_path):
    return sorted((tmp_path / "cache").glob("*.json"))


def _header(request, name):
    """A request header the server received, whatever the case of its name."""
    return {key.lower(): value for key, value in request.headers.items()}.get(name.lower())


def _redactor_filters():
    """The `LogRedactor`s on the root logger's handlers (a finished or stopped run leaves none)."""
    return [item for handler in logging.getLogger().handlers for item in handler.filters if isinstance(item, LogRedactor)]


def _first_state(seed):
    """`first_user_key` of the GeneralPoints language episode reset with `seed`: what a server sees first of it."""
    env = gym.make(GP_LANGUAGE[0], **GP_LANGUAGE[1])
    key = observation_key(env.reset(seed=seed)[0], max_pixels=MAX_PIXELS)
    env.close()
    return key


FAST_RETRIES = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.01)


def _prompt_tokens(messages):
    """The test server's prompt usage: the characters of the user turns."""
    return sum(len(last_user_text([message])) for message in messages if message["role"] == "user")


CASES = [
    ("GeneralPoints-v0", "language", [], 6),
    ("GeneralPoints-v0", "vision", ["--env-arg", "resolution=200"], 4),
    ("VIRL-v0", "language", [], 2),
]


@pytest.mark.parametrize(("env_id", "modality", "env_args", "episodes"), CASES)
def test_expert_and_garbage_servers_give_the_agents_records(env_id, modality, env_args, episodes, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SERVED_TEST_KEY", SECRET)
    _, kwargs = paper_setting(env_id, "id", modality)
    extra = {"resolution": 200} if env_args else {}
    seeds = range(3, 3 + episodes)
    common = ["--env", env_id, "--modality", modality, "--episodes", str(episodes), "--seed", "3", "--concurrency", "3", *env_args]
    with expert_server(env_id, {**kwargs, **extra}, seeds) as server:
        served = _run_eval(_served_args(server, tmp_path, *common), tmp_path / "expert.json")
    agent = evaluate(env_id=env_id, modality=modality, episodes=episodes, seed=3, agent=ExpertAgent(), env_kwargs=extra, progress=False)
    assert served.metrics["success_rate"].value == 1.0
    assert (served.metrics, served.verdict_shares, served.seeds, served.env_kwargs) == (
        agent.metrics, agent.verdict_shares, agent.seeds, agent.env_kwargs
    )
    assert (served.model, served.model_kind, served.served.api_base) == ("test-model", "served", server.url)
    assert served.versions["openai"] == importlib.metadata.version("openai")
    assert served.served.server_identity == {"id": "test-model", "root": "checkpoints/test-model", "owned_by": "chat-server"}
    # The key reaches the server (and nothing of it the record); a server that is not vLLM or SGLang gets no extra field.
    assert all(_header(request, "Authorization") == f"Bearer {SECRET}" for request in server.requests)
    assert served.decoding["extra_body"] == {} and not any("top_k" in request.body for request in server.requests)
    if env_id == "VIRL-v0":  # every correct V-IRL answer restarts the dialogue: one user turn per request
        assert all(len(request.messages) == 1 for request in server.requests)
        assert len(server.requests) == agent.metrics["mean_turns"].value * episodes > episodes
    if modality == "vision":  # the image arrives as a PNG equal to the observation at the chosen size
        env = gym.make(env_id, **kwargs, **extra)
        expected = {}
        for seed in seeds:
            observation, _ = env.reset(seed=seed)
            expected[seed] = np.asarray(resize_image(observation["image"], min_pixels=56 * 56, max_pixels=MAX_PIXELS))
        env.close()
        received = [request_images(request.messages)[0] for request in server.requests]
        assert all(image.shape == (112, 112, 3) for image in received)
        assert all(any(np.array_equal(image, want) for image in received) for want in expected.values())
        assert len({request.body["messages"][0]["content"][0]["image_url"]["url"] for request in server.requests}) == episodes

    with ChatServer(lambda messages: GARBAGE) as server:
        garbage = _run_eval(_served_args(server, tmp_path, *common), tmp_path / "garbage.json")
    constant = evaluate(env_id=env_id, modality=modality, episodes=episodes, seed=3, agent=ConstantAgent(), env_kwargs=extra, progress=False)
    assert garbage.metrics["success_rate"].value == 0.0
    assert (garbage.metrics, garbage.verdict_shares) == (constant.metrics, constant.verdict_shares)
    assert garbage.served.requests_sent == len(server.requests) == constant.metrics["mean_turns"].value * episodes

    written = [path.read_text() for path in _cached(tmp_path)]
    written += [(tmp_path / name).read_text() for name in ("expert.json", "garbage.json")]
    printed = capsys.readouterr()
    assert written and not any(SECRET in text for text in [*written, printed.out, printed.err])


def test_the_dialogue_sent_is_the_engines(tmp_path):
    """Turn k of a dialogue is sent as the rollout engine's `Dialogue.to_messages()` of that episode cut after turn k:
    2k-1 messages, user and assistant alternating, the image with the first; a V-IRL restart starts over."""

    class ScriptedAgent(Agent):
        name = "scripted"

        def __init__(self, answers):
            self.answers = iter(answers)

        def act(self, observation, env):
            return next(self.answers)

    def placeholders(messages):  # the engine's image placeholder where the request has the image
        return [
            {**message, "content": [{"type": "image"} if part["type"] == "image_url" else part for part in message["content"]]}
            if isinstance(message["content"], list) else message
            for message in messages
        ]

    for env_id, kwargs, seeds in (("GeneralPoints-v0", {"modality": "vision", "resolution": 200}, range(2)), ("VIRL-v0", {"modality": "language"}, range(1))):
        table = expert_table(env_id, kwargs, seeds, max_pixels=MAX_PIXELS)

        def answer(messages, table=table):  # a wrong answer first, the expert's on the retry
            return GARBAGE if len(messages) == 1 else table.get(first_user_key(messages), "no idea")

        with ChatServer(answer) as server:
            run = _play(_endpoint(server.url, tmp_path, concurrency=1, cache_dir=None), seeds, env=(env_id, kwargs))
        assert all(outcome.success for outcome in run.outcomes)
        sent = [request.messages for request in server.requests]
        episodes = []
        with RolloutEngine(None, env_id, env_kwargs=kwargs, num_envs=1) as engine:
            engine.play(seeds, responder=ScriptedAgent([answer(messages) for messages in sent]), progress=False, on_episode=episodes.append)
        expected = [
            recorded.dialogue.to_messages()[: 2 * turn + 1]
            for episode in episodes
            for recorded in episode.dialogues
            for turn in range(len(recorded.rewards))
        ]
        assert [placeholders(messages) for messages in sent] == expected
        assert {len(messages) for messages in sent} == {1, 3}
        assert all([message["role"] for message in messages] == ["user", "assistant", "user"][: len(messages)] for messages in sent)


def test_transport_faults_are_retried(tmp_path, capsys, monkeypatch):
    """Rate limits with Retry-After, a 500, a hanging request, a dropped connection and a body that is not JSON are
    retried; retries that run out fail only that episode, counted apart."""
    decided = []  # (the wait the server asked for, the wait the client chose) of every retry
    delay = RetryPolicy.delay

    def recorded_delay(policy, retry, retry_after, rng):
        seconds = delay(policy, retry, retry_after, rng)
        decided.append((retry_after, seconds))
        return seconds

    monkeypatch.setattr(RetryPolicy, "delay", recorded_delay)
    env_id, episodes = "GeneralPoints-v0", 8
    # The hung request is held until the server closes, far past the 2 s timeout; the other answers take milliseconds.
    args = ["--episodes", str(episodes), "--concurrency", "4", "--request-timeout", "2", "--retry-base-delay", "0.01",
            "--retry-max-delay", "0.05", "--no-cache"]
    with expert_server(env_id, {"modality": "language"}, range(episodes)) as server:
        server.inject("429", "429", "429", "500", "hang", "drop", "not-json")
        record = _run_eval(_served_args(server, tmp_path, *args, "--max-attempts", "11"), tmp_path / "faults.json")
    assert record.metrics["success_rate"].value == record.metrics["first_attempt_success"].value == 1.0
    assert record.metrics["success_rate"].count == episodes and "transport_failures" not in record.metrics
    faults = dict(record.served.faults)
    assert faults.pop("timeout") >= 1  # the hung request (on a machine slow enough, an ordinary one too)
    assert faults == {"HTTP 429": 3, "HTTP 500": 1, "connection error": 1, "malformed response": 1}
    assert record.served.retries >= 7 and record.served.requests_sent == episodes + record.served.retries
    # Retry-After: 1 is honoured: after each 429 the client chose to wait at least a second (the backoff bound is 0.05 s).
    after_rate_limits = [seconds for asked, seconds in decided if asked is not None]
    assert len(after_rate_limits) == 3 and all(seconds >= 1.0 for seconds in after_rate_limits)

    # Retries that run out: one episode fails by transport, counted apart and left out of the rates.
    with expert_server(env_id, {"modality": "language"}, range(episodes)) as server:
        server.inject("500", "500", "500")
        record = _run_eval(_served_args(server, tmp_path, *args, "--max-attempts", "3", "--concurrency", "1"), tmp_path / "fail.json")
    assert record.metrics["transport_failures"].value == 1 / episodes
    assert record.metrics["success_rate"].value == 1.0 and record.metrics["success_rate"].count == episodes - 1
    assert record.served.transport_failures == 1 and "HTTP 500" in record.served.episode_usage[0].transport_failure
    printed = capsys.readouterr().out
    assert "| transport failures | tokens spent (prompt + completion) |" in printed
    assert f"| 1/{episodes} |" in printed


def test_malformed_completions_are_the_models_answers(tmp_path):
    """No choice, a null choice list, message or content, an empty content and a refusal are the model's answer "" (each one
    more wrong turn); null usage counts 0 tokens; content in text parts is joined. Every episode is accounted for."""
    script = [handling for fault in EMPTY_COMPLETIONS for handling in (fault, "ok")] + list(ODD_COMPLETIONS)
    episodes = len(EMPTY_COMPLETIONS) + len(ODD_COMPLETIONS)
    with expert_server(*GP_LANGUAGE, range(episodes)) as server:
        server.inject(*script)
        run = _play(_endpoint(server.url, tmp_path, concurrency=1, cache_dir=None), range(episodes))
    assert [request.handling for request in server.requests] == script
    assert all(outcome.success for outcome in run.outcomes)
    assert [outcome.verdicts for outcome in run.outcomes] == [("missing_formula", "correct")] * 6 + [("correct",)] * 3
    assert (run.counters.refusals, run.counters.faults, run.counters.requests) == (1, {}, len(script))
    null_usage = [usage.prompt_tokens + usage.completion_tokens for usage in run.usage[6:8]]
    assert null_usage == [0, 0] and run.usage[8].completion_tokens > 0


@pytest.mark.parametrize(
    ("body", "text", "tokens", "refused"),
    [
        ({"choices": [{"message": None}]}, "", (0, 0), False),
        ({"choices": []}, "", (0, 0), False),
        ({"choices": None, "usage": None}, "", (0, 0), False),
        ({"choices": [{"message": {"content": "a"}}], "usage": {"prompt_tokens": None, "completion_tokens": "3"}}, "a", (0, 3), False),
        ({"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"type": "image_url"}, "b"]}}]}, "ab", (0, 0), False),
        ({"choices": [{"message": {"content": None, "refusal": "no"}, "finish_reason": "content_filter"}]}, "", (0, 0), True),
    ],
)
def test_a_completion_of_any_shape_is_an_answer(body, text, tokens, refused):
    completion = parse_completion(body)
    assert (completion.text, (completion.prompt_tokens, completion.completion_tokens), completion.refused) == (text, tokens, refused)


@pytest.mark.parametrize(
    "body",
    [
        "not a completion",
        ["choices"],
        {},
        {"error": {"message": "overloaded"}},
        {"object": "error", "message": "the engine is restarting", "code": 500},
        {"object": "error", "message": "overloaded", "choices": []},
    ],
)
def test_a_body_that_is_not_a_completion_is_a_fault(body):
    assert parse_completion(body) is None


def test_a_body_without_choices_is_retried_and_never_cached(tmp_path):
    """A 200 whose body is vLLM's error object or {} is not the model's answer: retried, counted as a malformed response and
    not cached, so the rerun replays the real answers only."""
    with expert_server(*GP_LANGUAGE, range(2)) as server:
        server.inject("error-200", "empty-body")
        endpoint = _endpoint(server.url, tmp_path, concurrency=1, retry=FAST_RETRIES)
        run, again = _play(endpoint, range(2)), _play(endpoint, range(2))
    assert [request.handling for request in server.requests] == ["error-200", "empty-body", "ok", "ok"]
    assert (run.counters.faults, run.counters.retries) == ({"malformed response": 2}, 2)
    assert all(outcome.success for outcome in run.outcomes) and again.outcomes == run.outcomes
    assert (again.counters.requests, again.counters.cache_hits) == (0, 2)


def test_refusals_are_replayed_from_the_cache(tmp_path):
    with expert_server(*GP_LANGUAGE, range(1)) as server:
        server.inject("refusal")
        endpoint = _endpoint(server.url, tmp_path, concurrency=1)
        first, again = _play(endpoint, range(1)), _play(endpoint, range(1))
    assert (first.counters.refusals, first.counters.requests) == (1, 2)  # "" (missing_formula), then the expert's answer
    assert (again.counters.refusals, again.counters.requests, again.counters.cache_hits) == (1, 0, 2)


def test_an_interrupt_stops_the_run_at_once(tmp_path):
    """KeyboardInterrupt (here from the per-episode callback) while both threads wait on a hung request: the run ends
    without waiting for them; each finished episode was reported as it ended; its turns are in the cache."""
    episodes, answered, reported, errors = 8, 3, [], []
    with expert_server(*GP_LANGUAGE, range(episodes), hang_after=answered) as server:

        def interrupt_after_the_answers(index, outcome, usage):
            reported.append(index)
            if len(reported) == answered:
                _wait_until(lambda: server.hanging() == 2, "both threads wait on a hung request")
                raise KeyboardInterrupt

        def run():
            try:
                _play(_endpoint(server.url, tmp_path, request_timeout=120), range(episodes), on_episode=interrupt_after_the_answers)
            except BaseException as error:
                errors.append(error)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        runner.join(timeout=60)  # waiting for the hung requests would take their 120 s timeout
        assert not runner.is_alive(), "the interrupted run waited for the requests in flight"
        assert [type(error) for error in errors] == [KeyboardInterrupt]
        assert server.hanging() == 2 and len(reported) == answered
        assert len(_cached(tmp_path)) == answered
        assert not _redactor_filters()  # the stopped run closed its client


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_a_stopped_run_resumes_from_the_cache(stop_signal, tmp_path):
    """Stop the evaluation (Ctrl-C, or kill it) after 5 answers, with requests hanging; Ctrl-C ends it at once. The rerun
    sends no request for a turn already answered, and counts the replayed answers' tokens apart from those it spends."""
    episodes, answered = 8, 5
    with expert_server(*GP_LANGUAGE, range(episodes), hang_after=answered) as server:
        command = [sys.executable, "-m", "amft_vlm.cli", *_served_args(server, tmp_path, "--episodes", str(episodes), "--concurrency", "2")]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_until(lambda: len(_cached(tmp_path)) >= answered or process.poll() is not None, "the evaluation got its answers")
            _wait_until(lambda: server.hanging() == 2, "both threads wait on a hung request")
            process.send_signal(stop_signal)
            _, stderr = process.communicate(timeout=100)  # the hung requests would hold it for 120 s (--request-timeout)
        finally:
            process.kill()
        if stop_signal == signal.SIGINT:
            assert process.returncode == 130 and "rerun the same command to resume" in stderr
        first_run = [request.messages for request in server.requests if request.handling == "ok"]
        assert len(first_run) == answered
        server.resume()
        before = len(server.requests)
        record = _run_eval(_served_args(server, tmp_path, "--episodes", str(episodes)), tmp_path / "resumed.json")
        rerun = [request.messages for request in server.requests[before:]]
    assert not [messages for messages in rerun if messages in first_run]
    assert len(rerun) == episodes - answered
    assert (record.served.answers_from_cache, record.served.requests_sent) == (answered, episodes - answered)
    assert record.metrics["success_rate"].value == 1.0
    # Tokens spent count only the requests sent; the replayed answers' tokens (spent by the first run) are counted apart.
    assert record.served.prompt_tokens == sum(_prompt_tokens(messages) for messages in rerun)
    assert record.served.replayed_prompt_tokens == sum(_prompt_tokens(messages) for messages in first_run)
    assert sum(usage.prompt_tokens for usage in record.served.episode_usage) == record.served.prompt_tokens


def test_a_changed_server_identity_is_not_replayed(tmp_path, caplog):
    """Another checkpoint served at the same URL under the same name (another root in GET /models) is asked again, as is a
    run with another --cache-tag; a server that lists no models on localhost gets a warning."""
    with ChatServer(lambda messages: GARBAGE) as server:
        endpoint = _endpoint(server.url, tmp_path)
        sent = [_play(endpoint, range(1)).counters.requests, _play(endpoint, range(1)).counters.requests]
        server.root = "checkpoints/step-500"
        sent.append(_play(endpoint, range(1)).counters.requests)
        sent.append(_play(_endpoint(server.url, tmp_path, cache_tag="step-500"), range(1)).counters.requests)
        server.list_models = False
        sent.append(_play(endpoint, range(1)).counters.requests)
    assert sent == [6, 0, 6, 6, 6]  # a garbage hand is 6 answers
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "GET " + server.url + "/models failed (HTTP 404)" in warnings[0] and "--cache-tag" in warnings[0]


def test_a_failing_model_listing_does_not_change_the_cache_key(tmp_path, caplog):
    """GET /models is retried like a chat request: one that fails once keys the run as before (all replayed); one that keeps
    failing warns and keys it as a server without GET /models does, never a third way."""
    with ChatServer(lambda messages: GARBAGE) as server:
        endpoint = _endpoint(server.url, tmp_path, retry=FAST_RETRIES)
        sent = [_play(endpoint, range(1)).counters.requests]
        server.inject_listing("500")
        sent.append(_play(endpoint, range(1)).counters.requests)
        server.list_models = False
        sent.append(_play(endpoint, range(1)).counters.requests)
        server.list_models = True
        server.inject_listing("500", "500", "500")
        sent.append(_play(endpoint, range(1)).counters.requests)
    assert sent == [6, 0, 6, 0]  # a garbage hand is 6 answers
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2 and "GET " + server.url + "/models failed (HTTP 404)" in warnings[0]
    assert warnings[1].startswith(f"GET {server.url}/models failed 3 times (the last: HTTP 500: internal error)")


def test_the_server_identity_leaves_out_created():
    listing = {"data": [{"id": "m", "created": 1_800_000_000, "owned_by": "vllm", "root": "/ckpt/a", "parent": None}, {"id": "n"}]}
    assert server_identity(listing, "m") == {"id": "m", "owned_by": "vllm", "root": "/ckpt/a"}  # vLLM stamps every listing
    hosted = {"data": [{"id": "m", "created": 1_700_000_000, "owned_by": "system"}]}
    assert server_identity(hosted, "m") == {"id": "m", "owned_by": "system"}
    assert server_identity(listing, "x") == {"models": ["m", "n"]}
    assert server_identity({"object": "error"}, "m") is None


@pytest.mark.parametrize(("owned_by", "neutral"), [("vllm", True), ("SGLang", True), ("chat-server", False)])
def test_vllm_and_sglang_are_asked_for_the_local_decoding(owned_by, neutral, tmp_path):
    """A server whose GET /models says vLLM or SGLang gets top_k -1, repetition_penalty 1 and min_p 0 with every request (its
    checkpoint's generation_config.json would fill them otherwise); another server never does; --extra-body goes on top of
    either. The fields sent are recorded, and a part of the cache key."""
    args = ["--episodes", "1", "--temperature", "0.7"]
    extra_body = {"top_k": 20, "chat_template_kwargs": {"enable_thinking": False}}
    with ChatServer(lambda messages: GARBAGE, owned_by=owned_by) as server:
        plain = _run_eval(_served_args(server, tmp_path, *args), tmp_path / "plain.json")
        before = len(server.requests)
        extra = _run_eval(_served_args(server, tmp_path, *args, "--extra-body", json.dumps(extra_body)), tmp_path / "extra.json")
        bodies = [request.body for request in server.requests]
    neutral_fields = {"top_k": -1, "repetition_penalty": 1.0, "min_p": 0.0} if neutral else {}

    def extra_fields(body):
        return {name: value for name, value in body.items() if name not in ("model", "messages", "temperature", "top_p", "max_tokens", "seed")}

    assert all(body["temperature"] == 0.7 and body["top_p"] == 1.0 for body in bodies)
    assert all(extra_fields(body) == neutral_fields for body in bodies[:before]) and plain.decoding["extra_body"] == neutral_fields
    assert all(extra_fields(body) == {**neutral_fields, **extra_body} for body in bodies[before:])
    assert extra.decoding["extra_body"] == {**neutral_fields, **extra_body}
    assert (extra.served.answers_from_cache, extra.served.requests_sent) == (0, len(bodies) - before) == (0, 6)


@pytest.mark.parametrize(("faults", "message"), [
    (["401"], "invalid api key (the API key was refused"),
    (["404"], "does not exist (no such model or endpoint"),
    (["400", "400"], "maximum context length is 32768 tokens; the messages have 40000 tokens (to the first request of each of "
     "the first 2 episodes, none of which got a completion"),
])
def test_a_refused_first_request_stops_the_run(faults, message, tmp_path, capsys):
    """A 401, 403 or 404 is the same for every request: the run stops at once with one error line naming the status and the
    server's message. Another 4xx stops it when the first requests of the first max(concurrency, 2) episodes all got one."""
    with ChatServer(lambda messages: GARBAGE) as server:
        server.inject(*faults)
        with pytest.raises(SystemExit) as exit_info:
            main(_served_args(server, tmp_path, "--episodes", "3", "--concurrency", "1"))
    assert exit_info.value.code == 2
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert error_lines[-1].startswith(f"amft-vlm eval: error: {server.url} answered HTTP {faults[0]} for model 'test-model': ")
    assert message in error_lines[-1]
    assert len(server.requests) == len(faults)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_one_refused_episode_stops_neither_the_run_nor_its_rerun(concurrency, tmp_path):
    """A 400 to the first request of the first episode, before anything was answered, fails that episode alone whatever the
    concurrency (the other probes are answered); the rerun sends that request only (the replayed answers count as answers),
    and exits 0 with the same record."""
    episodes, poisoned = 5, _first_state(0)
    fault_for = lambda messages: "400" if first_user_key(messages) == poisoned else None  # noqa: E731
    with expert_server(*GP_LANGUAGE, range(episodes), fault_for=fault_for) as server:
        args = _served_args(server, tmp_path, "--episodes", str(episodes), "--concurrency", str(concurrency))
        first = _run_eval(args, tmp_path / "first.json")
        before = len(server.requests)
        again = _run_eval(args, tmp_path / "again.json")
        rerun = server.requests[before:]
    assert first.served.transport_failures == again.served.transport_failures == 1
    assert first.served.episode_usage[0].transport_failure.startswith("HTTP 400 (not retried)")
    assert [request.handling for request in rerun] == ["400"]
    assert (again.served.requests_sent, again.served.answers_from_cache) == (1, episodes - 1)
    assert (again.metrics, again.verdict_shares) == (first.metrics, first.verdict_shares)


@pytest.mark.parametrize(("episodes", "concurrency", "probes"), [(8, 2, "each of the first 2 episodes"), (2, 8, "each of the first 2 episodes"),
                                                                 (1, 4, "the only episode")])
def test_a_dead_server_stops_the_run(episodes, concurrency, probes, tmp_path, capsys):
    """No server at the URL: once the first requests of the first max(concurrency, 2) episodes have failed by transport, the
    run stops with one line, and no record is written, however few the episodes."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}/v1"
    out = tmp_path / "record.json"
    args = ["eval", "--api-base", url, "--model", "test-model", "--no-cache", "--episodes", str(episodes), "--concurrency",
            str(concurrency), "--max-attempts", "2", "--retry-base-delay", "0.01", "--retry-max-delay", "0.01", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert error_line.startswith(
        f"amft-vlm eval: error: no request to {url} has got a completion: the first request of {probes} failed by transport (2 attempts each)"
    )
    assert "connection error" in error_line
    assert not out.exists() and not _redactor_filters()


def test_a_request_the_server_refuses_fails_only_its_episode(tmp_path, capsys):
    """A 400 after other requests succeeded (e.g. one dialogue over the context length) fails that episode alone, unretried,
    with the server's message; the table counts it."""
    episodes = 4
    too_long = _first_state(2)
    with expert_server(*GP_LANGUAGE, range(episodes), fault_for=lambda messages: "400" if first_user_key(messages) == too_long else None) as server:
        record = _run_eval(_served_args(server, tmp_path, "--episodes", str(episodes), "--concurrency", "1"), tmp_path / "400.json")
    assert [request.handling for request in server.requests] == ["ok", "ok", "400", "ok"]
    assert record.served.faults == {"HTTP 400": 1} and record.served.transport_failures == 1
    assert record.served.episode_usage[2].transport_failure.startswith("HTTP 400 (not retried): This model's maximum context length")
    printed = capsys.readouterr().out
    assert f"| 1/{episodes} |" in printed and "faults: HTTP 400 x1" in printed and "1 x HTTP 400 (not retried)" in printed


def test_a_cache_that_cannot_be_written_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("amft_vlm.evaluation.served.cache.write_text_atomic", full_disk)
    with ChatServer(lambda messages: GARBAGE) as server:
        run = _play(_endpoint(server.url, tmp_path), range(3))
    assert len(run.outcomes) == 3 and run.counters.requests == 18 and not _cached(tmp_path)
    warnings = [record.getMessage() for record in caplog.records if "cannot write the response cache" in record.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]


def test_secrets_stay_out_of_records_logs_and_the_cache(tmp_path, monkeypatch, capsys, caplog):
    """The API key and the credentials of the URL (user:password@, ?key=) reach the server but no record, cache file,
    output or log line, even with -v; base64 images are cut out of log lines."""
    password, query_key = "url-password-123456", "url-query-key-654321"
    monkeypatch.setenv("SERVED_TEST_KEY", SECRET)
    for name in ("httpx", "httpx2", "openai"):  # the HTTP layer logs each request's URL
        caplog.set_level(logging.DEBUG, logger=name)
    with ChatServer(lambda messages: GARBAGE) as server:
        url = server.url.replace("http://", f"http://user:{password}@") + f"?key={query_key}"
        args = ["-v", *_served_args(server, tmp_path, "--episodes", "1", "--modality", "vision", "--env-arg", "resolution=200")]
        args[args.index(server.url)] = url
        record = _run_eval(args, tmp_path / "record.json")
    assert all(f"key={query_key}" in request.path for request in server.requests)
    assert record.served.api_base == server.url.replace("http://", "http://***@") + "?key=***"
    printed = capsys.readouterr()
    written = [path.read_text() for path in [*_cached(tmp_path), tmp_path / "record.json"]]
    for text in [*written, printed.out, printed.err, caplog.text]:
        assert SECRET not in text and password not in text and query_key not in text
    assert "key=***" in caplog.text  # the request URLs were logged, redacted

    redactor = LogRedactor([SECRET])
    line = redactor.redact("Request options: {'url': 'data:image/png;base64," + "iVBORw0KGgo" * 1000 + f"'}}, key {SECRET}")
    assert line == "Request options: {'url': 'data:image/png;base64,iVBORw0KGgoiVBOR...(11000 chars)'}, key ***"


def test_a_malformed_log_call_is_not_the_redactors_error(capsys):
    """A library's log call whose arguments do not fit its format is logging's to report, not an exception in the caller."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(LogRedactor([SECRET]))
    library = logging.getLogger("tests.served.library")
    library.addHandler(handler)
    library.propagate = False
    try:
        library.warning("%d requests", "many")
        library.warning("key %s", SECRET)
    finally:
        library.removeHandler(handler)
    printed = capsys.readouterr().err
    assert "--- Logging error ---" in printed and "key ***" in printed and SECRET not in printed


def test_retry_policy_and_retry_after():
    policy = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=4.0)
    rng = random.Random(0)
    for retry in range(6):
        delays = [policy.delay(retry, None, rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= min(4.0, 0.5 * 2**retry)
    # Retry-After is honoured beyond the backoff bound, up to max_retry_after (120 s by default).
    assert policy.delay(0, 3.0, rng) >= 3.0 and policy.delay(0, 100.0, rng) == 100.0 and policy.delay(0, 500.0, rng) == 120.0
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert 55 < retry_after_seconds({"retry-after": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))}) <= 60
    assert retry_after_seconds({}) is None and retry_after_seconds({"retry-after": "soon"}) is None


def test_cache_keys_tell_samples_and_servers_apart():
    messages = [{"role": "user", "content": "q"}]
    greedy = Sampling(None, 64).request_arguments(0, 0)
    assert greedy == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64}
    key = ResponseCache.key("http://h/v1", "m", messages, greedy, None, server={"root": "/ckpt/a"})
    assert key == ResponseCache.key("http://h/v1", "m", messages, greedy, None, server={"root": "/ckpt/a"})
    assert key != ResponseCache.key("http://other/v1", "m", messages, greedy, None, server={"root": "/ckpt/a"})
    assert key != ResponseCache.key("http://h/v1", "m2", messages, greedy, None, server={"root": "/ckpt/a"})
    assert key != ResponseCache.key("http://h/v1", "m", messages, greedy, None, server={"root": "/ckpt/b"})
    assert key != ResponseCache.key("http://h/v1", "m", messages, greedy, None, server={"root": "/ckpt/a"}, tag="step-500")
    sampled = Sampling(0.7, 64, sampling_seed=1)
    assert sampled.request_arguments(5, 0)["seed"] != sampled.request_arguments(5, 1)["seed"] != sampled.request_arguments(6, 1)["seed"]
    keys = {
        ResponseCache.key("http://h/v1", "m", messages, sampled.request_arguments(seed, turn), {"sampling_seed": 1, "episode_seed": seed, "request": turn})
        for seed in (5, 6) for turn in (0, 1)
    }
    assert len(keys) == 4


def test_transport_failures_are_left_out_of_the_metrics():
    solved = EpisodeOutcome(0, ("correct",), (5.0,), True)
    failed = EpisodeOutcome(1, ("wrong_numbers", TRANSPORT_FAILURE), (-1.0, 0.0), False)
    metrics, shares = compute_metrics([solved, failed], "GeneralPoints-v0", "language")
    alone, alone_shares = compute_metrics([solved], "GeneralPoints-v0", "language")
    assert metrics == {**alone, "transport_failures": metrics["transport_failures"]} and shares == alone_shares
    assert math.isclose(metrics["transport_failures"].value, 0.5)
    assert compute_metrics([failed], "GeneralPoints-v0")[1] == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-base", "localhost:8000", "--model", "m"], "http(s) URL"),
        (["--api-base", "http://127.0.0.1:abc/v1", "--model", "m"], "--api-base has no valid port"),
        (["--api-base", "http://127.0.0.1:99999/v1", "--model", "m"], "--api-base has no valid port"),
        (["--api-base", "http://localhost:8000/v1", "--model", "m", "--extra-body", "[1]"], "--extra-body: expected a JSON object"),
        (["--api-base", "http://localhost:8000/v1", "--model", "m", "--extra-body", "{top_k: 1}"], "--extra-body: expected a JSON object"),
        (["--api-base", "http://localhost:8000/v1", "--model", "m", "--extra-body", '{"seed": 1}'], "--extra-body may not set seed"),
        (["--model", "m", "--extra-body", '{"top_k": 1}'], "--extra-body applies to a served model"),
        (["--api-base", "http://localhost:8000/v1"], "one of the arguments --model --agent is required"),
        (["--api-base", "http://localhost:8000/v1", "--agent", "expert"], "--agent"),
        (["--api-base", "http://localhost:8000/v1", "--model", "m", "--device", "cpu"], "--device applies to a local model"),
        (["--api-base", "http://localhost:8000/v1", "--model", "m", "--max-new-tokens", "0"], "expected a positive integer"),
        (["--model", "tiny:qwen2-vl", "--concurrency", "4"], "--concurrency applies to a served model"),
        (["--model", "gpt-4o", "--api-key-env", "MY_KEY"], "--api-key-env applies to a served model; add --api-base URL"),
        (["--model", "m", "--cache-tag", "a", "--no-cache"], "--cache-tag, --no-cache apply to a served model"),
    ],
)
def test_served_options_are_checked_first(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args, "--episodes", "1"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_key_variable_is_read(monkeypatch):
    monkeypatch.setenv("SERVED_TEST_KEY", SECRET)
    endpoint = ServedEndpoint(
        "http://127.0.0.1:9/v1", "m", api_key_env="SERVED_TEST_KEY", cache_dir=None, request_timeout=1, retry=RetryPolicy(max_attempts=1)
    )
    client = ChatClient(endpoint, Sampling(None, 8))
    assert client._client.api_key == SECRET
    assert SECRET not in json.dumps(ServedRun(outcomes=[], usage=[], counters=client.counters).info(endpoint).to_dict())
    client.close()
    assert os.environ["SERVED_TEST_KEY"] == SECRET
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        Sampling(None, 0)


def test_sampled_answers_are_cached_per_episode_and_turn(tmp_path):
    """A sampled run seeds each request apart and caches it apart; its rerun sends nothing, a greedy run shares none of it."""
    args = ["--episodes", "3", "--temperature", "0.7", "--concurrency", "2"]
    with ChatServer(lambda messages: GARBAGE) as server:
        first = _run_eval(_served_args(server, tmp_path, *args), tmp_path / "sampled.json")
        seeds = [request.body["seed"] for request in server.requests]
        again = _run_eval(_served_args(server, tmp_path, *args), tmp_path / "again.json")
        greedy = _run_eval(_served_args(server, tmp_path, *args[:2], *args[4:]), tmp_path / "greedy.json")
    assert first.decoding_label == "T=0.7" and greedy.decoding_label == "greedy"
    assert len(seeds) == len(set(seeds)) == first.served.requests_sent == 18  # 3 hands x 6 answers, identical texts
    assert (again.served.requests_sent, again.served.answers_from_cache) == (0, 18)
    assert (again.metrics, again.verdict_shares) == (first.metrics, first.verdict_shares)
    assert greedy.served.answers_from_cache == 0
