"""Chat completions through the ``openai`` client: the retry policy, the circuit breaker and the response cache."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from amft_vlm.served.cache import Completion, ResponseCache
from amft_vlm.served.endpoint import LogRedactor, Sampling, ServedEndpoint, retry_after_seconds, url_secrets

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
"""Seconds the ``GET /models`` of `server_identity` may take (a server that does not answer it is still used)."""

LISTING_STAMP_SECONDS = 600.0
"""A listed model's ``created`` this close to now is the listing's own time stamp (vLLM, SGLang and llama.cpp
stamp every listing), not the model's: it is left out of the server's identity, or no rerun would ever hit the cache."""


class TransportFailure(Exception):
    """A turn got no completion within the retry policy; the episode is recorded as failed by transport."""


class EndpointRefused(ValueError):
    """The run stops: every request would fail alike (a refused key, an unknown model, a server that never answers)."""


class RunStopped(Exception):
    """The run was stopped (interrupted, or another episode stopped it) while this request waited."""


@dataclass(frozen=True)
class Fault:
    """A request that got no completion: its kind (``HTTP 429``, ``timeout``, ...), status, server message and asked wait."""

    kind: str
    status: int | None = None
    message: str = ""
    retry_after: float | None = None

    @property
    def retried(self) -> bool:
        """Whether another attempt may do better: every fault but a 4xx the server will never take."""
        return self.status is None or self.status >= 500 or self.status in RETRIED_STATUSES

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


def parse_completion(body: Any) -> Completion | None:
    """The completion in a response body; None when the body is not a completion at all (not an object, or an error).

    Whatever a completion lacks is read leniently, as the model's answer: no choice, a null message or
    null content give ``""``, content given as a list of parts gives their texts joined, missing or
    null token counts give 0. A refusal (``finish_reason`` ``content_filter``, or a ``refusal``
    message) is the model's answer too: its content (usually none, so ``""``) goes to the environment,
    which judges it like any other answer; it is only counted apart.
    """
    if not isinstance(body, dict) or ("error" in body and "choices" not in body):
        return None
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return Completion(
        text=_content_text(message.get("content")),
        prompt_tokens=_token_count(usage.get("prompt_tokens")),
        completion_tokens=_token_count(usage.get("completion_tokens")),
        refused=choice.get("finish_reason") == "content_filter" or bool(message.get("refusal")),
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


def _token_count(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def server_identity(listing: Any, model: str, *, now: float) -> dict[str, Any] | None:
    """What a ``GET /models`` body says of `model`, to tell its answers from another model's served alike.

    The listed model's ``id``, ``root`` (vLLM: the checkpoint path), ``parent``, ``owned_by`` and
    ``created`` (unless it is the listing's own time stamp, `LISTING_STAMP_SECONDS`); when the model
    is not listed, every listed id. None when the body lists no models.
    """
    entries = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        return None
    entries = [entry for entry in entries if isinstance(entry, dict)]
    listed = next((entry for entry in entries if entry.get("id") == model), None)
    if listed is None:
        return {"models": sorted(str(entry.get("id")) for entry in entries)}
    identity = {name: listed[name] for name in ("id", "root", "parent", "owned_by") if listed.get(name) is not None}
    created = listed.get("created")
    if isinstance(created, int | float) and abs(now - created) > LISTING_STAMP_SECONDS:
        identity["created"] = created
    return identity


def _server_message(error: Any) -> str:
    """The message an HTTP error's body gives (OpenAI's ``error.message``, vLLM's ``message``, FastAPI's ``detail``), on one short line."""
    body = error.body
    if isinstance(body, dict):
        body = body.get("message") or body.get("detail") or json.dumps(body)
    text = str(body) if body is not None else error.response.text
    return " ".join(text.split())[:200]


class ChatClient:
    """Chat completions through the ``openai`` client with the retry policy and the cache (shared by the threads).

    Args:
        endpoint: where and how to ask.
        sampling: the sampling settings of every request.
        jitter_seed: seeds the backoff jitter (it changes only the waits).

    The circuit breaker: a 401, 403 or 404, any other 4xx to an episode's first request before the
    server has answered once, or
    ``concurrency + 1`` episodes failed by transport before it has answered once, stop the run
    (`EndpointRefused`): every request would fail alike. Setting `stop` (the run's interrupt) makes
    every backoff wait and every next request raise at once.
    """

    def __init__(self, endpoint: ServedEndpoint, sampling: Sampling, *, jitter_seed: int | None = None) -> None:
        # Imported here: only a served evaluation needs the client.
        import openai

        self._openai = openai
        self.endpoint, self.sampling = endpoint, sampling
        api_key = os.environ.get(endpoint.api_key_env)
        if not api_key:
            logger.info("$%s is unset: sending a placeholder API key (enough for a local server)", endpoint.api_key_env)
        self.redactor = LogRedactor([*([api_key] if api_key else []), *url_secrets(endpoint.api_base)])
        for handler in logging.getLogger().handlers:
            handler.addFilter(self.redactor)
        # Query credentials (?key=...) go as the client's default query: the client appends paths to its base URL.
        parsed = urlsplit(endpoint.api_base)
        self._client = openai.OpenAI(
            base_url=urlunsplit(parsed._replace(query="")),
            default_query=dict(parse_qsl(parsed.query, keep_blank_values=True)) or None,
            api_key=api_key or NO_KEY_PLACEHOLDER,
            max_retries=0,
            timeout=endpoint.request_timeout,
        )
        self.cache = ResponseCache(endpoint.cache_dir) if endpoint.cache_dir is not None else None
        self.counters = TransportCounters()
        self.stop = threading.Event()
        self.failure: EndpointRefused | None = None
        """Why the run stopped, once it has: every later request raises it."""
        self.answered = False
        """Whether the server has answered a request with a completion yet."""
        self._failed_unanswered = 0
        self._lock = threading.Lock()
        self._rng = random.Random(jitter_seed)
        self.server = self._identify()
        """What the server says of the model (`server_identity`), part of every cache key; None if it does not say."""

    def close(self) -> None:
        """Close the HTTP connections and take the log filter off."""
        self._client.close()
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self.redactor)

    def complete(self, messages: list[dict[str, Any]], *, episode_seed: int, request_index: int) -> Completion:
        """The completion of `messages`: from the cache, or asked for with retries.

        Raises:
            TransportFailure: no completion within the retry policy, or a 4xx the server will never take.
            EndpointRefused: the circuit breaker stopped the run (see the class docstring).
            RunStopped: the run was stopped (`stop`) while this request waited.
        """
        self._check_running()
        arguments = self.sampling.request_arguments(episode_seed, request_index)
        key = None
        if self.cache is not None:
            sample = None if self.sampling.temperature is None else {
                "sampling_seed": self.sampling.sampling_seed or 0, "episode_seed": episode_seed, "request": request_index
            }
            key = ResponseCache.key(
                self.endpoint.display_url, self.endpoint.model, messages, arguments, sample, server=self.server, tag=self.endpoint.cache_tag
            )
            cached = self.cache.get(key)
            if cached is not None:
                self._count(cache_hits=1)
                return cached
        retry_policy = self.endpoint.retry
        fault: Fault | None = None
        for attempt in range(retry_policy.max_attempts):
            if fault is not None:  # a retry
                with self._lock:
                    wait_seconds = retry_policy.delay(attempt - 1, fault.retry_after, self._rng)
                self._count(retries=1)
                self.stop.wait(wait_seconds)
                self._check_running()
            self._count(requests=1)
            answer = self._request(messages, arguments)
            if isinstance(answer, Completion):
                with self._lock:
                    self.answered = True
                    self.counters.refusals += answer.refused
                if self.cache is not None:
                    self.cache.put(key, answer)
                return answer
            fault = answer
            self._count(fault=fault.kind)
            if not fault.retried:
                raise self._refused(fault, first_turn=request_index == 0)
            logger.debug("request for episode %d failed (%s), attempt %d", episode_seed, fault, attempt + 1)
        raise self._exhausted(fault)

    def _request(self, messages: list[dict[str, Any]], arguments: dict[str, Any]) -> Completion | Fault:
        """One request: the completion (`parse_completion`), or the fault."""
        openai = self._openai
        try:
            raw = self._client.chat.completions.with_raw_response.create(model=self.endpoint.model, messages=messages, **arguments)
            body = json.loads(raw.http_response.text)
        except openai.APIStatusError as error:
            return Fault(
                f"HTTP {error.status_code}",
                error.status_code,
                self.redactor.redact(_server_message(error)),
                retry_after_seconds(error.response.headers),
            )
        except openai.APITimeoutError:
            return Fault("timeout", message=f"no answer within {self.endpoint.request_timeout:g} s")
        except openai.APIConnectionError as error:
            return Fault("connection error", message=self.redactor.redact(str(error.__cause__ or error)))
        except ValueError:  # the body is not JSON (e.g. a proxy's HTML error page)
            return Fault("malformed response", message="the body is not JSON")
        completion = parse_completion(body)
        return completion if completion is not None else Fault("malformed response", message="the body is not a completion")

    def _refused(self, fault: Fault, *, first_turn: bool) -> Exception:
        """The error for a 4xx that is not retried: the run stops (see the class docstring), or only the episode fails."""
        hint = REFUSED_STATUSES.get(fault.status)
        with self._lock:
            answered = self.answered
        # An episode's first request is its shortest: refused before any answer, it is the request's form, not its length.
        if hint is None and (answered or not first_turn):
            return TransportFailure(f"{fault.kind} (not retried): {fault.message}")
        why = hint.format(api_base=self.endpoint.display_url) if hint else "before any request got a completion, so every request would likely fail alike"
        return self._stop_run(f"{self.endpoint.display_url} answered {fault.kind} for model {self.endpoint.model!r}: {fault.message} ({why})")

    def _exhausted(self, fault: Fault) -> Exception:
        """The error when a turn's retries run out: the episode fails, or the run stops if the server has never answered."""
        attempts = self.endpoint.retry.max_attempts
        with self._lock:
            self._failed_unanswered += not self.answered
            trip = not self.answered and self._failed_unanswered >= self.endpoint.concurrency + 1
        if trip:
            return self._stop_run(
                f"no request to {self.endpoint.display_url} has got a completion: {self._failed_unanswered} episodes failed by "
                f"transport, {attempts} attempts each, the last: {fault}; is the server up and --api-base right?"
            )
        return TransportFailure(f"no completion after {attempts} attempts; the last: {fault}")

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
        """`server_identity` from ``GET /models``; on a local server that does not answer it, a warning (see the message)."""
        openai = self._openai
        try:
            raw = self._client.with_options(timeout=min(self.endpoint.request_timeout, MODELS_TIMEOUT)).models.with_raw_response.list()
            identity, reason = server_identity(json.loads(raw.http_response.text), self.endpoint.model, now=time.time()), "it lists no models"
        except openai.APIStatusError as error:
            identity, reason = None, f"HTTP {error.status_code}"
        except (openai.APIError, ValueError) as error:
            identity, reason = None, self.redactor.redact(str(error.__cause__ or error))
        if identity is None and self.cache is not None and self.endpoint.cache_tag is None and self.endpoint.is_local:
            logger.warning(
                "GET %s/models failed (%s), so the response cache cannot tell the model served there now from another "
                "served at the same URL under the same name: a rerun against another checkpoint would replay this one's "
                "answers. Pass --cache-tag (e.g. the checkpoint's name) or --no-cache",
                self.endpoint.display_url, reason,
            )
        logger.debug("server identity of %s: %s", self.endpoint.model, identity)
        return identity

    def _count(self, *, requests: int = 0, retries: int = 0, cache_hits: int = 0, fault: str | None = None) -> None:
        with self._lock:
            self.counters.requests += requests
            self.counters.retries += retries
            self.counters.cache_hits += cache_hits
            if fault is not None:
                self.counters.faults[fault] = self.counters.faults.get(fault, 0) + 1
