"""A hostile or broken server (`tests.amft_vlm.chat_server` ``HOSTILE``) must not exhaust the client, leak the key or crash the run.

One test per class of harm: an answer far over ``max_tokens`` and a compression bomb (memory), a server that
drips its answer (time), bodies nested too deep and token counts that are not counts (crashes), a server that
echoes the credentials (secrets), and the model's own special tokens, which make a real server fail when they
come back in the dialogue (a server error that repeats on the same request).
"""

import json
import logging
import time

import gymnasium as gym
import pytest

from amft_vlm.evaluation.evaluate import load_record
from amft_vlm.evaluation.served import (
    SERVER_ERROR,
    RetryPolicy,
    Sampling,
    ServedEndpoint,
    parse_completion,
    play_served,
)
from amft_vlm.evaluation.served.response import answer_prefix
from amft_vlm.rollout.episode_metrics import TRANSPORT_FAILURE, compute_metrics
from tests.amft_vlm.chat_server import SPECIAL_TOKENS, ChatServer, first_user_key, observation_key
from tests.amft_vlm.evaluation.test_served import (
    GARBAGE,
    GP_LANGUAGE,
    MAX_PIXELS,
    SECRET,
    _cached,
    _header,
    _run_eval,
    _served_args,
    expert_server,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 16
ANSWER_CHARS = 32 * MAX_TOKENS
"""What ``--max-new-tokens 16`` lets an answer be: 32 characters a token."""

FAST_RETRIES = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.01)


def _endpoint(url, tmp_path, **settings):
    settings = {"cache_dir": str(tmp_path / "cache"), "max_pixels": MAX_PIXELS, "concurrency": 1, "retry": FAST_RETRIES, **settings}
    return ServedEndpoint(url, "test-model", **settings)


def _play(endpoint, seeds, **kwargs):
    return play_served(endpoint, *GP_LANGUAGE, seeds, Sampling(None, MAX_TOKENS), progress=False, **kwargs)


def _assistant_turns(server):
    return [message["content"] for request in server.requests for message in request.messages if message["role"] == "assistant"]


def test_an_answer_over_max_tokens_is_cut_while_it_is_read(tmp_path):
    """A server that ignores max_tokens: a 4 MB answer (over the response cap: the client stops reading there) and
    answers of 4,600 characters (under it) are the model's answers cut to 32 characters a token, flagged; no more than
    that is cached or sent back in the dialogue, and no more than the cap of any response is read. A compression bomb
    (30 kB of gzip inflating to 32 MB) is cut as it inflates."""
    long_garbage = GARBAGE * 200
    with ChatServer(lambda messages: long_garbage, huge_bytes=4_000_000, bomb_bytes=32_000_000) as server:
        server.inject("huge-answer")
        endpoint = _endpoint(server.url, tmp_path)
        run = _play(endpoint, range(1))
        again = _play(endpoint, range(1))
        server.inject("gzip-bomb")
        bombed = _play(_endpoint(server.url, tmp_path, cache_dir=None), range(1))
    sent_back = _assistant_turns(server)
    assert sent_back and max(len(text) for text in sent_back) == ANSWER_CHARS
    assert sent_back[0] == "x" * ANSWER_CHARS  # the 4 MB answer's first characters, as the model's answer
    assert all(path.stat().st_size < 2 * ANSWER_CHARS for path in _cached(tmp_path))
    cap = run.info(endpoint).max_response_bytes
    assert cap < 2_000_000 and run.info(endpoint).max_answer_chars == ANSWER_CHARS
    # Each response is read up to the cap at most: 6 answers and a listing, not 4 MB (or 32 MB inflated).
    assert run.counters.bytes_received <= 7 * cap and bombed.counters.bytes_received <= 7 * cap
    usage = run.usage[0]
    assert (usage.answers, usage.truncated_answers, run.info(endpoint).truncated_answers) == (6, 6, 6)
    assert (again.counters.requests, again.usage[0].truncated_answers) == (0, 6)  # replayed, cut as before
    assert bombed.usage[0].truncated_answers == 6 and bombed.counters.faults == {}


def test_request_timeout_is_a_deadline_for_the_whole_request(tmp_path):
    """A server that drips its answer a byte every 0.25 s (the body, or the headers) never trips a per-read timeout;
    --request-timeout 1 ends each such attempt after a second, and the retry gets the answer."""
    with expert_server(*GP_LANGUAGE, range(1), drip_interval=0.25) as server:
        server.inject("drip", "drip-headers")
        started = time.monotonic()
        run = _play(_endpoint(server.url, tmp_path, request_timeout=1.0, cache_dir=None), range(1))
        elapsed = time.monotonic() - started
    assert elapsed < 5.0
    assert run.counters.faults == {"timeout": 2} and run.outcomes[0].success
    assert [request.handling for request in server.requests] == ["drip", "drip-headers", "ok"]


def test_malformed_bodies_and_usage_never_crash_the_run(tmp_path, caplog):
    """A chat body or GET /models nested 100,000 deep is a malformed response (retried; a listing that stays so is no
    listing), not a RecursionError; token counts that are NaN, infinite, 1e30 or negative are recorded as missing (0)
    and flagged, and the record stays valid JSON."""
    with expert_server(*GP_LANGUAGE, range(3)) as server:
        server.inject_listing("deep-json", "deep-json", "deep-json")
        server.inject("deep-json", "ok", "nan-usage", "absurd-usage")
        endpoint = _endpoint(server.url, tmp_path)
        run = _play(endpoint, range(3))
    assert all(outcome.success for outcome in run.outcomes)
    assert run.counters.faults == {"malformed response": 1} and run.server_identity is None
    assert [usage.invalid_usage for usage in run.usage] == [0, 1, 1]
    assert [usage.prompt_tokens + usage.completion_tokens for usage in run.usage[1:]] == [0, 0] and run.usage[0].prompt_tokens > 0
    record = run.info(endpoint).to_dict()
    assert record["invalid_usage"] == 2
    json.dumps(record, allow_nan=False)
    assert any("/models failed 3 times (the last: malformed response: the body is nested deeper" in entry.getMessage() for entry in caplog.records)


def test_credentials_a_server_echoes_never_reach_disk(tmp_path, monkeypatch, capsys, caplog):
    """A server that echoes the request's headers (the Bearer key, the URL's user:password as Basic auth, the ?key=) in its
    answers and in GET /models' root: the key and the credentials are masked in every string it returns before the
    string is cached, recorded, logged or printed."""
    password, query_key = "url-password-123456", "url-query-key-654321"
    monkeypatch.setenv("SERVED_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG, logger="amft_vlm")
    echoed = set()
    with ChatServer(lambda messages: GARBAGE) as server:
        plain = server.url
        for name, url in (("key", plain), ("url", plain.replace("http://", f"http://user:{password}@") + f"?key={query_key}")):
            server.inject("echo-headers", "echo-headers")
            server.inject_listing("echo-headers")
            args = ["-v", *_served_args(server, tmp_path, "--episodes", "1", "--max-new-tokens", "64")]
            args[args.index(plain)] = url
            _run_eval(args, tmp_path / f"{name}.json")
            assert "***" in load_record(tmp_path / f"{name}.json").served.server_identity["root"]
        echoed = {_header(request, "Authorization").partition(" ")[2] for request in server.requests}
    assert SECRET in echoed and len(echoed) == 2  # the key, then Basic user:password (the URL's credentials win)
    printed = capsys.readouterr()
    written = [path.read_text() for path in [*_cached(tmp_path), tmp_path / "key.json", tmp_path / "url.json"]]
    assert any("Bearer ***" in text for text in written)  # the echoed answer was cached, the key masked
    for text in [*written, printed.out, printed.err, caplog.text]:
        assert not [secret for secret in [*echoed, password, query_key] if secret in text]


def test_special_tokens_are_kept_out_of_the_dialogue_sent_back(tmp_path):
    """An answer with Qwen's <|vision_start|><|image_pad|><|vision_end|> (a tiny model served by transformers serve) is
    judged without them and sent back without them (the server fails every request whose text has an image placeholder
    and no image, as transformers serve does); the answers they were taken from are counted."""
    with ChatServer(
        lambda messages: GARBAGE,
        fault_for=lambda messages: "500-image-pad" if any("<|image_pad|>" in str(message["content"]) for message in messages) else None,
    ) as server:
        server.inject("special-tokens")
        run = _play(_endpoint(server.url, tmp_path, cache_dir=None), range(1))
    assert [request.handling for request in server.requests][:2] == ["special-tokens", "ok"]
    assert run.counters.faults == {} and not run.outcomes[0].transport_failed
    assert _assistant_turns(server)[0] == GARBAGE and SPECIAL_TOKENS not in json.dumps([r.body for r in server.requests])
    assert run.usage[0].neutralised_answers == 1


def test_a_server_error_that_repeats_on_one_request_is_its_own_outcome(tmp_path):
    """A request the server fails with the same HTTP 500 on every attempt, while it answers others, is no network fault:
    the episode ends with the verdict server_error, unsolved and in every denominator, counted apart in the record."""
    env = gym.make(GP_LANGUAGE[0], **GP_LANGUAGE[1])
    poisoned = observation_key(env.reset(seed=1)[0], max_pixels=MAX_PIXELS)
    env.close()
    with expert_server(*GP_LANGUAGE, range(3), fault_for=lambda messages: "500" if first_user_key(messages) == poisoned else None) as server:
        endpoint = _endpoint(server.url, tmp_path, cache_dir=None)
        run = _play(endpoint, range(3))
    failed = run.outcomes[1]
    assert failed.verdicts == (SERVER_ERROR,) and not failed.success and not failed.transport_failed
    assert run.usage[1].server_error == "HTTP 500: internal error (the same on all 3 attempts)"
    metrics, shares = compute_metrics(run.outcomes, GP_LANGUAGE[0])
    assert metrics["success_rate"].count == 3 and metrics["success_rate"].value == pytest.approx(2 / 3)
    assert "transport_failures" not in metrics and shares[SERVER_ERROR].value > 0
    info = run.info(endpoint)
    assert (info.server_errors, info.transport_failures) == (1, 0)
    assert TRANSPORT_FAILURE not in {verdict for outcome in run.outcomes for verdict in outcome.verdicts}


@pytest.mark.parametrize(
    ("usage", "tokens", "invalid"),
    [
        ({"prompt_tokens": float("nan"), "completion_tokens": 3}, (0, 3), True),
        ({"prompt_tokens": float("inf")}, (0, 0), True),
        ({"prompt_tokens": 1e30, "completion_tokens": 2}, (0, 2), True),
        ({"prompt_tokens": 7, "completion_tokens": -5}, (7, 0), True),
        ({"prompt_tokens": True}, (0, 0), True),
        ({"prompt_tokens": "12", "completion_tokens": 3.0}, (12, 3), False),
        ({"prompt_tokens": None}, (0, 0), False),
    ],
)
def test_token_counts_are_whole_numbers_in_range(usage, tokens, invalid):
    completion = parse_completion({"choices": [{"message": {"content": "a"}}], "usage": usage})
    assert ((completion.prompt_tokens, completion.completion_tokens), completion.invalid_usage) == (tokens, invalid)


def test_an_answer_cut_at_the_cap_is_read_as_far_as_it_goes():
    """Wherever the cut falls, an escape it splits included, the answer read is the start of the answer sent."""
    content = 'say "\u00e9\\" ' * 50
    body = json.dumps({"id": "x", "choices": [{"message": {"role": "assistant", "content": content}}], "usage": {}})
    start = body.index('"content"')
    for cut in range(start, start + 120):
        read = answer_prefix(body[:cut])
        assert read is None if cut < start + len('"content": "') else content.startswith(read[0]) and not read[1]
    assert answer_prefix(body) == (content, True)
