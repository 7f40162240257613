"""Chat completions through the ``openai`` client: the retry policy, the circuit breaker and the response cache."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from amft_vlm.evaluation.served.cache import Completion, ResponseCache
from amft_vlm.evaluation.served.endpoint import (
    LogRedactor,
    Sampling,
    ServedEndpoint,
    credential_masks,
    retry_after_seconds,
)
from amft_vlm.evaluation.served.response import (
    ACCEPTED_ENCODINGS,
    DeadlinePassed,
    MalformedBody,
    UndecodableBody,
    answer_char_limit,
    answer_prefix,
    bound_response,
    parse_json,
    response_byte_limit,
)

logger = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({408, 409, 429})
"""HTTP statuses retried besides every 5xx; every other 4xx is the same however often it is asked."""

REFUSED_STATUSES = {
    401: "the API key was refused: put a valid key in the variable --api-key-env names",
    403: "the API key has no access to this model or endpoint",
    404: "no such model or endpoint: check --model against GET {api_base}/models and that --api-base ends in /v1",
}
"""HTTP statuses that stop the run whenever they come, with what to do about each."""

NO_KEY_PLACEHOLDER = "no-key"
"""Sent as the API key when the variable is unset (a local vLLM or SGLang server needs none)."""

MODELS_TIMEOUT = 10.0
"""Seconds one ``GET /models`` of `server_identity` may take (a server that does not answer it is still used)."""

CHECKPOINT_DEFAULT_ENGINES = frozenset({"vllm", "sglang"})
"""Servers, by the ``owned_by`` ``GET /models`` gives (any case), that fill a request's unset sampling fields from the
checkpoint's ``generation_config.json`` (vLLM with ``--generation-config auto``, its default; SGLang with
``--sampling-defaults model``, its default)."""

NEUTRAL_SAMPLING_FIELDS = {"top_k": -1, "repetition_penalty": 1.0, "min_p": 0.0}
"""Sent to those servers besides temperature and top_p: the local path's decoding (`agents.policy.VLMPolicy` drops the
checkpoint's defaults: no top-k, no repetition penalty, no min-p), which a Qwen2.5-VL checkpoint's ``top_k`` 1 and
``repetition_penalty`` 1.05 would otherwise replace (a ``--temperature 0.7`` run would decode greedily). Never sent
to other servers: hosted APIs refuse fields they do not know."""

SERVER_ERROR = "server_error"
"""The last verdict of an episode whose request the server failed alike on every attempt (`ServerError`): an unanswered
turn, unsolved, counted in every rate, unlike a `amft_vlm.rollout.episode_metrics.TRANSPORT_FAILURE`."""

DETERMINISTIC_STATUSES = frozenset({500})
"""Statuses that, repeated alike on every attempt of one request while the server answers others, are that request's
own (`ServerError`). 502, 503 and 504 say the server is unreachable or overloaded, whatever was asked."""

MAX_TOKEN_COUNT = 100_000_000
"""The largest token count taken as one (no context window comes near it); a larger one, or one that is not a whole
number from 0, is read as missing and flagged (`Completion.invalid_usage`)."""

MIN_PROBE_EPISODES = 2
"""`play_served` lets the first ``max(concurrency, MIN_PROBE_EPISODES)`` episodes decide whether the server can answer
at all (`ChatClient`): one episode the server refuses alone never stops a run of two or more."""

_Answer = TypeVar("_Answer")


class TransportFailure(Exception):
    """A turn got no completion within the retry policy; the episode is recorded as failed by transport."""


class ServerError(Exception):
    """The server failed one request alike on every attempt (the same HTTP 500 and message) while it answered others: the
    request's own failure, not the network's; the episode ends with the verdict `SERVER_ERROR`."""


class EndpointRefused(ValueError):
    """The run stops: every request would fail alike (a refused key, an unknown model, a server that never answers)."""


class RunStopped(Exception):
    """The run was stopped (interrupted, or another episode stopped it) while this request waited."""


@dataclass(frozen=True)
class Fault:
    """A request that got no completion: its kind (``HTTP 429``, ``timeout``, ...), status, server message and asked wait;
    `repeats`: how many attempts in a row, this one included, ended in this same fault (kind, status and message)."""

    kind: str
    status: int | None = None
    message: str = ""
    retry_after: float | None = None
    repeats: int = 1

    @property
    def retried(self) -> bool:
        """Whether another attempt may do better: every fault but a 4xx the server will never take."""
        return self.status is None or self.status >= 500 or self.status in RETRIED_STATUSES

    def same_as(self, other: Fault | None) -> bool:
        """Whether `other` is this fault again: the same kind, status and message (the asked wait aside)."""
        return other is not None and (self.kind, self.status, self.message) == (other.kind, other.status, other.message)

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}" if self.message else self.kind


@dataclass
class TransportCounters:
    """What the client did over a run (thread-safe through `ChatClient`'s lock)."""

    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    refusals: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    bytes_received: int = 0
    """Response body bytes read (decoded), abandoned attempts' included: at most the cap of each response."""


def parse_completion(body: Any, *, max_chars: int | None = None) -> Completion | None:
    """The completion in a response body; None when the body is not a completion at all (a transport fault, retried).

    Not a completion: a body that is not an object, has no ``choices`` key (``{}``, an error object), or says
    ``"object": "error"`` (vLLM answers some errors with status 200). Whatever a completion lacks besides is
    read leniently, as the model's answer: an empty or null ``choices``, a null message or null content
    give ``""``, content given as a list of parts gives their texts joined, missing or null token counts
    give 0. A refusal (``finish_reason`` ``content_filter``, or a ``refusal`` message) is the model's
    answer too: its content (usually none, so ``""``) goes to the environment, which judges it like any
    other answer; it is only counted apart. An answer over `max_chars` is cut to it (``truncated``); a token
    count that is not a whole number from 0 to `MAX_TOKEN_COUNT` (NaN, infinite, negative, 1e30) gives 0 and
    ``invalid_usage``.
    """
    if not isinstance(body, dict) or "choices" not in body or body.get("object") == "error":
        return None
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    text = _content_text(message.get("content"))
    prompt_tokens, completion_tokens = _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens"))
    truncated = max_chars is not None and len(text) > max_chars
    return Completion(
        text=text[:max_chars] if truncated else text,
        prompt_tokens=prompt_tokens or 0,
        completion_tokens=completion_tokens or 0,
        refused=choice.get("finish_reason") == "content_filter" or bool(message.get("refusal")),
        truncated=truncated,
        invalid_usage=None in (prompt_tokens, completion_tokens),
    )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part if isinstance(part, str) else str(part.get("text") or "")
            for part in content
            if isinstance(part, str) or (isinstance(part, dict) and part.get("type", "text") == "text")
        )
    return ""


def _token_count(value: Any) -> int | None:
    """A reported token count: 0 when missing (null), None when it is not a whole number from 0 to `MAX_TOKEN_COUNT`."""
    if value is None:
        return 0
    if isinstance(value, str) and value.strip().isdigit():  # some servers send numbers as text
        value = int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKEN_COUNT:
        return None
    return value


def server_identity(listing: Any, model: str) -> dict[str, Any] | None:
    """What a ``GET /models`` body says of `model`, to tell its answers from another model's served alike.

    The listed model's ``id``, ``root`` (vLLM: the checkpoint path), ``parent`` and ``owned_by`` (``vllm``,
    ``sglang``, ...); when the model is not listed, every listed id. None when the body lists no models. The
    listing's ``created`` is left out: vLLM, SGLang and llama.cpp stamp every listing with its own time, and a
    hosted API's may change with nothing else, so it would change the cache key by itself. Only texts are kept
    (a listing's fields are all texts; another value, say NaN, would make the record invalid JSON).
    """
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        return None
    entries = [entry for entry in entries if isinstance(entry, dict)]
    listed = next((entry for entry in entries if entry.get("id") == model), None)
    if listed is None:
        return {"models": sorted(entry["id"] for entry in entries if isinstance(entry.get("id"), str))}
    return {name: listed[name] for name in ("id", "root", "parent", "owned_by") if isinstance(listed.get(name), str)}


def engine_extra_body(server: dict[str, Any] | None) -> dict[str, Any]:
    """`NEUTRAL_SAMPLING_FIELDS` for a server whose identity says vLLM or SGLang (`CHECKPOINT_DEFAULT_ENGINES`), else nothing."""
    owner = server.get("owned_by") if isinstance(server, dict) else None
    return dict(NEUTRAL_SAMPLING_FIELDS) if isinstance(owner, str) and owner.lower() in CHECKPOINT_DEFAULT_ENGINES else {}


def _not_a_completion(body: Any) -> str:
    """Why `body` is not a completion, with the message of an error object (vLLM answers some errors with status 200)."""
    if isinstance(body, dict) and (body.get("object") == "error" or "error" in body):
        error = body.get("error") if isinstance(body.get("error"), dict) else body
        message = error.get("message") or body.get("message") or ""
        return "the body is an error object" + (f": {' '.join(str(message).split())[:200]}" if message else "")
    return "the body is not a completion (no choices)"


def _server_message(error: Any) -> str:
    """The message an HTTP error's body gives (OpenAI's ``error.message``, vLLM's ``message``, FastAPI's ``detail``), on
    one short line; else the start of the body as it came (whatever the body holds: it may be nested too deep to print)."""
    body = error.body
    fields = [body.get("message"), body.get("detail")] if isinstance(body, dict) else [body]
    text = next((field for field in fields if isinstance(field, str) and field), None)
    if text is None:
        text = error.response.text
    return " ".join(text[:1000].split())[:200]


class ChatClient:
    """Chat completions through the ``openai`` client with the retry policy and the cache (shared by the threads).

    Args:
        endpoint: where and how to ask.
        sampling: the sampling settings of every request.
        probe_seeds: the seeds of the episodes whose first requests decide whether the server can answer at all
            (`play_served` passes the first ``max(concurrency, MIN_PROBE_EPISODES)`` of the run, in seed order).
        jitter_seed: seeds the backoff jitter (it changes only the waits).

    On construction the client asks ``GET /models`` what the server serves (`server`; retried like a chat
    request) and, when that says vLLM or SGLang, sends `NEUTRAL_SAMPLING_FIELDS` with every request so
    that the server decodes as the local path does whatever its flags; `Sampling.extra_body` goes on top.
    Every field sent besides the sampling keywords is in `extra_body`, in the record and in the cache key.

    Every response is untrusted input (`amft_vlm.evaluation.served.response`): its body is read up to `max_response_bytes`
    (decoded; the rest is never read), each attempt ends at its deadline (``request_timeout`` after it began, the
    whole request included), a body that is not JSON or is nested too deep is a malformed response, and every
    string in it is scrubbed of the credentials (`LogRedactor.scrub`) before anything stores, logs or prints it.
    An answer is kept to `max_answer_chars` (`Completion.truncated`), also one cut at the response cap.

    The circuit breaker stops the run (`EndpointRefused`) when every request would fail alike:

    - a 401, 403 or 404, whenever it comes (a wrong key, no access, a wrong model name or URL);
    - when the first request of every probe episode got no completion: each was refused with another 4xx
      (not retried) or ran out of attempts (a dead server, a wrong port, a request form the server never
      takes). Only those requests decide, not which of the requests in flight comes back first, so the
      decision is the same whatever the thread timing; an answer replayed from the cache counts as a
      completion got, so a rerun decides as its first run did. One episode refused alone never stops a
      run of two or more, and a run never ends without a completion at all (its first episodes are
      probes). A request failed with the same HTTP 500 on every attempt, once the server has answered a
      request, fails its episode with `ServerError` (the request's own failure); every other failure fails
      its episode only (`TransportFailure`).

    Setting `stop` (the run's interrupt) makes every backoff wait and every next request raise at once.
    """

    def __init__(
        self, endpoint: ServedEndpoint, sampling: Sampling, *, probe_seeds: Sequence[int] = (), jitter_seed: int | None = None
    ) -> None:
        # Imported here: only a served evaluation needs the client.
        import openai

        self._openai = openai
        self.endpoint, self.sampling = endpoint, sampling
        self.max_answer_chars = answer_char_limit(sampling.max_tokens)
        """The most characters an answer is kept to (`amft_vlm.evaluation.served.response.ANSWER_CHARS_PER_TOKEN` a token)."""
        self.max_response_bytes = response_byte_limit(sampling.max_tokens)
        """The most bytes of a response body read (decoded)."""
        api_key = os.environ.get(endpoint.api_key_env)
        if not api_key:
            logger.info("$%s is unset: sending a placeholder API key (enough for a local server)", endpoint.api_key_env)
        self.redactor = LogRedactor(credential_masks(api_key, endpoint.api_base))
        self._filtered_handlers = list(logging.getLogger().handlers)
        for handler in self._filtered_handlers:
            handler.addFilter(self.redactor)
        self.cache = ResponseCache(endpoint.cache_dir) if endpoint.cache_dir is not None else None
        self.counters = TransportCounters()
        self.stop = threading.Event()
        self.failure: EndpointRefused | None = None
        """Why the run stopped, once it has: every later request raises it."""
        self._probes: dict[int, bool | None] = dict.fromkeys(int(seed) for seed in probe_seeds)
        """Probe episode's seed -> whether its first request got a completion (None while it is pending)."""
        self._answered_any = False
        """Whether any request of the run got a completion (replayed ones included): the server answers requests."""
        self._lock = threading.Lock()
        self._rng = random.Random(jitter_seed)
        self._attempt = threading.local()
        """The deadline and seconds of the attempt this thread runs (each runs in a thread of its own, `_within_deadline`)."""
        self._client: Any = None
        try:
            # Query credentials (?key=...) go as the client's default query: the client appends paths to its base URL.
            parsed = urlsplit(endpoint.api_base)
            self._client = openai.OpenAI(
                base_url=urlunsplit(parsed._replace(query="")),
                default_query=dict(parse_qsl(parsed.query, keep_blank_values=True)) or None,
                default_headers={"Accept-Encoding": ACCEPTED_ENCODINGS},
                api_key=api_key or NO_KEY_PLACEHOLDER,
                max_retries=0,
                timeout=endpoint.request_timeout,
                http_client=openai.DefaultHttpxClient(timeout=endpoint.request_timeout, event_hooks={"response": [self._bound_response]}),
            )
            self.server = self._identify()
            """What the server says of the model (`server_identity`), part of every cache key; None if it does not say."""
        except BaseException:
            self.close()
            raise
        self.extra_body = {**engine_extra_body(self.server), **sampling.extra_body}
        """The fields sent in every request's body besides the sampling keywords (`NEUTRAL_SAMPLING_FIELDS`, ``--extra-body``)."""

    def close(self) -> None:
        """Close the HTTP connections and take the log filter off (idempotent)."""
        if self._client is not None:
            self._client.close()
        for handler in self._filtered_handlers:
            handler.removeFilter(self.redactor)
        self._filtered_handlers = []

    def complete(self, messages: list[dict[str, Any]], *, episode_seed: int, request_index: int) -> Completion:
        """The completion of `messages`: from the cache, or asked for with retries.

        Raises:
            TransportFailure: no completion within the retry policy, or a 4xx the server will never take.
            ServerError: the server failed this request alike on every attempt while it answers others.
            EndpointRefused: the circuit breaker stopped the run (see the class docstring).
            RunStopped: the run was stopped (`stop`) while this request waited.
        """
        self._check_running()
        first = request_index == 0
        arguments = self.sampling.request_arguments(episode_seed, request_index)
        key = None
        if self.cache is not None:
            sample = None if self.sampling.temperature is None else {
                "sampling_seed": self.sampling.sampling_seed or 0, "episode_seed": episode_seed, "request": request_index
            }
            key = ResponseCache.key(
                self.endpoint.display_url, self.endpoint.model, messages, {**arguments, **self.extra_body}, sample,
                server=self.server, tag=self.endpoint.cache_tag,
            )
            cached = self.cache.get(key, max_bytes=self.max_response_bytes)
            if cached is not None:
                cached = self._kept(cached)
                self._answered(cached, episode_seed, first=first)
                return cached
        answer = self._with_retries(
            lambda: self._request(messages, arguments), counted=True, what=f"a request of episode {episode_seed}",
            seconds=self.endpoint.request_timeout,
        )
        if isinstance(answer, Fault):
            raise self._failed(answer, episode_seed, first=first)
        self._answered(answer, episode_seed, first=first)
        if self.cache is not None:
            self.cache.put(key, answer)
        return answer

    def _kept(self, completion: Completion) -> Completion:
        """A replayed answer as this run keeps answers: credentials masked, cut to `max_answer_chars` (an entry written
        before either was done may hold more)."""
        text = self.redactor.scrub(completion.text)
        if len(text) > self.max_answer_chars:
            return dataclasses.replace(completion, text=text[: self.max_answer_chars], truncated=True)
        return completion if text == completion.text else dataclasses.replace(completion, text=text)

    def _with_retries(self, send: Callable[[], _Answer | Fault], *, counted: bool, what: str, seconds: float) -> _Answer | Fault:
        """`send` until it gives an answer, a fault not worth retrying, or ``max_attempts`` faults (then the last fault,
        with how many attempts in a row ended in it).

        Each attempt has `seconds` in all (`_within_deadline`); waits between attempts as the retry policy says;
        `counted` adds the attempts to `counters`.
        """
        retry_policy = self.endpoint.retry
        fault: Fault | None = None
        for attempt in range(retry_policy.max_attempts):
            if fault is not None:  # a retry
                with self._lock:
                    wait_seconds = retry_policy.delay(attempt - 1, fault.retry_after, self._rng)
                self._count(retries=int(counted))
                self.stop.wait(wait_seconds)
                self._check_running()
            self._count(requests=int(counted))
            answer = self._within_deadline(send, seconds)
            if not isinstance(answer, Fault):
                return answer
            fault = dataclasses.replace(answer, repeats=fault.repeats + 1) if answer.same_as(fault) else answer
            if counted:
                self._count(fault=fault.kind)
            if not fault.retried:
                break
            logger.debug("%s failed (%s), attempt %d of %d", what, fault, attempt + 1, retry_policy.max_attempts)
        return fault

    def _within_deadline(self, send: Callable[[], _Answer | Fault], seconds: float) -> _Answer | Fault:
        """`send` run in a thread of its own, given up after `seconds` (a ``timeout`` fault) whatever it is doing.

        The HTTP client's timeouts bound each read, not the request: a server that sends a byte a second would hold
        a request as long as it liked. The thread given up on is left to end by itself: the body it reads stops at
        its next chunk (`BoundedBody` knows the deadline), a read that gets nothing at the client's own timeout.
        """
        deadline = time.monotonic() + seconds
        outcome: list[Any] = []
        done = threading.Event()

        def attempt() -> None:
            self._attempt.deadline, self._attempt.seconds = deadline, seconds
            try:
                outcome.append(send())
            except BaseException as error:  # handed to the waiting thread
                outcome.append(error)
            finally:
                done.set()

        threading.Thread(target=attempt, name=f"{threading.current_thread().name}-request", daemon=True).start()
        if not done.wait(seconds):
            return self._timeout(seconds)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _bound_response(self, response: Any) -> None:
        """The HTTP client's response hook: the body is read within the cap and the attempt's deadline (`bound_response`)."""
        bound_response(
            response, limit=self.max_response_bytes, deadline=getattr(self._attempt, "deadline", None),
            on_read=lambda count: self._count(bytes_received=count),
        )

    def _timeout(self, seconds: float) -> Fault:
        return Fault("timeout", message=f"no complete answer within {seconds:g} s")

    def _call(self, send: Callable[[], Any]) -> tuple[str, bool] | Fault:
        """The body of the response to `send` (one request through the openai client, raw) and whether it was cut at the
        cap, or the `Fault`."""
        openai = self._openai
        try:
            response = send().http_response
            return response.text, bool(getattr(response.stream, "truncated", False))
        except openai.APIStatusError as error:
            return Fault(
                f"HTTP {error.status_code}",
                error.status_code,
                self.redactor.redact(_server_message(error)),
                retry_after_seconds(error.response.headers),
            )
        except (openai.APITimeoutError, DeadlinePassed):
            return self._timeout(self._attempt.seconds)
        except openai.APIConnectionError as error:
            return Fault("connection error", message=self.redactor.redact(str(error.__cause__ or error)))
        except UndecodableBody as error:
            return Fault("malformed response", message=str(error))

    def _parsed(self, text: str) -> Any:
        """`text` as JSON, scrubbed (`parse_json`), or the malformed-response `Fault`."""
        try:
            return parse_json(text, self.redactor.scrub)
        except MalformedBody as error:
            return Fault("malformed response", message=str(error))

    def _request(self, messages: list[dict[str, Any]], arguments: dict[str, Any]) -> Completion | Fault:
        """One chat request: the completion (`parse_completion`), or the fault.

        A body cut at the cap holds an answer over it (a server that did not stop at ``max_tokens``): the answer as far
        as it was read (`answer_prefix`), cut to `max_answer_chars`, is the model's; without one, it is a fault.
        """
        read = self._call(
            lambda: self._client.chat.completions.with_raw_response.create(
                model=self.endpoint.model, messages=messages, **arguments, extra_body=self.extra_body or None
            )
        )
        if isinstance(read, Fault):
            return read
        text, cut = read
        if cut:
            return self._cut_answer(text)
        body = self._parsed(text)
        if isinstance(body, Fault):
            return body
        completion = parse_completion(body, max_chars=self.max_answer_chars)
        return completion if completion is not None else Fault("malformed response", message=self.redactor.redact(_not_a_completion(body)))

    def _cut_answer(self, text: str) -> Completion | Fault:
        """The answer in a body cut at the cap, kept to `max_answer_chars`; a ``response too large`` fault if it has none.

        The answer's end is where reading stopped: a credential cut there is cut from the answer too.
        """
        found = answer_prefix(text)
        if found is None:
            return Fault("response too large", message=f"over {self.max_response_bytes:,} bytes, with no answer in them")
        answer, whole = found
        answer = self.redactor.scrub(answer)
        cut_secret = 0 if whole else max(self.redactor.longest_scrubbed - 1, 0)
        answer = answer[: len(answer) - cut_secret]
        return Completion(text=answer[: self.max_answer_chars], prompt_tokens=0, completion_tokens=0, truncated=True)

    def _answered(self, completion: Completion, episode_seed: int, *, first: bool) -> None:
        """Count a completion (a replayed one too); the first of a probe episode means the server can answer."""
        with self._lock:
            self._answered_any = True
            self.counters.refusals += completion.refused
            self.counters.cache_hits += completion.from_cache
            if first and episode_seed in self._probes:
                self._probes[episode_seed] = True

    def _failed(self, fault: Fault, episode_seed: int, *, first: bool) -> Exception:
        """The error for a turn that got no completion: the run stops (see the class docstring), or only the episode fails."""
        url, model, attempts = self.endpoint.display_url, self.endpoint.model, self.endpoint.retry.max_attempts
        hint = REFUSED_STATUSES.get(fault.status)
        if hint is not None:
            return self._stop_run(f"{url} answered {fault.kind} for model {model!r}: {fault.message} ({hint.format(api_base=url)})")
        with self._lock:
            if first and episode_seed in self._probes and self._probes[episode_seed] is None:
                self._probes[episode_seed] = False
                trip = all(answered is False for answered in self._probes.values())
            else:
                trip = False
            answered_any = self._answered_any
        probes = "the only episode" if len(self._probes) == 1 else f"each of the first {len(self._probes)} episodes"
        if trip and fault.retried:
            return self._stop_run(
                f"no request to {url} has got a completion: the first request of {probes} failed by transport ({attempts} "
                f"attempts each), the last: {fault}; is the server up and --api-base right?"
            )
        if trip:
            return self._stop_run(
                f"{url} answered {fault.kind} for model {model!r}: {fault.message} (to the first request of {probes}, "
                "none of which got a completion: every request would likely fail alike)"
            )
        if fault.status in DETERMINISTIC_STATUSES and attempts > 1 and fault.repeats == attempts and answered_any:
            return ServerError(f"{fault} (the same on all {attempts} attempts)")
        if fault.retried:
            return TransportFailure(f"no completion after {attempts} attempts; the last: {fault}")
        return TransportFailure(f"{fault.kind} (not retried): {fault.message}")

    def _stop_run(self, message: str) -> EndpointRefused:
        with self._lock:
            if self.failure is None:
                self.failure = EndpointRefused(message)
        self.stop.set()
        return EndpointRefused(str(self.failure))

    def _check_running(self) -> None:
        if self.stop.is_set():
            raise EndpointRefused(str(self.failure)) if self.failure is not None else RunStopped()

    def _identify(self) -> dict[str, Any] | None:
        """`server_identity` from ``GET /models``, retried like a chat request; None when it says nothing (see the warnings).

        A listing that fails however often it is asked (a transient fault outlasting the retries) gives None,
        the identity of a server without ``GET /models``: the cache key never takes a third value, and the
        warning says that answers cached by runs that read the listing are not replayed by this one.
        """
        seconds = min(self.endpoint.request_timeout, MODELS_TIMEOUT)
        models = self._client.with_options(timeout=seconds).models

        def list_models() -> Any:
            read = self._call(models.with_raw_response.list)
            if isinstance(read, Fault):
                return read
            text, cut = read
            if cut:
                return Fault("response too large", message=f"over {self.max_response_bytes:,} bytes")
            return self._parsed(text)

        listing = self._with_retries(list_models, counted=False, what="GET /models", seconds=seconds)
        identity = None if isinstance(listing, Fault) else server_identity(listing, self.endpoint.model)
        if identity is None and self.cache is not None:
            if isinstance(listing, Fault) and listing.retried:
                logger.warning(
                    "GET %s/models failed %d times (the last: %s): the response cache keys this run as for a server that "
                    "does not say which model it serves, so answers cached by runs that could read it are not replayed "
                    "(rerun when the server answers it to replay them), and a checkpoint served at the same URL under the "
                    "same name later could replay this run's answers unless --cache-tag tells them apart",
                    self.endpoint.display_url, self.endpoint.retry.max_attempts, listing,
                )
            elif self.endpoint.cache_tag is None and self.endpoint.is_local:
                reason = listing.kind if isinstance(listing, Fault) else "it lists no models"
                logger.warning(
                    "GET %s/models failed (%s), so the response cache cannot tell the model served there now from another "
                    "served at the same URL under the same name: a rerun against another checkpoint would replay this one's "
                    "answers. Pass --cache-tag (e.g. the checkpoint's name) or --no-cache",
                    self.endpoint.display_url, reason,
                )
        logger.debug("server identity of %s: %s", self.endpoint.model, identity)
        return identity

    def _count(self, *, requests: int = 0, retries: int = 0, fault: str | None = None, bytes_received: int = 0) -> None:
        with self._lock:
            self.counters.requests += requests
            self.counters.retries += retries
            self.counters.bytes_received += bytes_received
            if fault is not None:
                self.counters.faults[fault] = self.counters.faults.get(fault, 0) + 1
