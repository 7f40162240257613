"""What a served evaluation talks to and how: the endpoint and its credentials (kept out of records and logs), the retry policy, the sampling."""

from __future__ import annotations

import base64
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import numpy as np

QWEN_MIN_PIXELS = 56 * 56
"""Smallest image area of Qwen2-VL / Qwen2.5-VL's image processor (its default, which local evaluation uses)."""

QWEN_MAX_PIXELS = 28 * 28 * 16384
"""Largest image area of Qwen2-VL / Qwen2.5-VL's image processor (its default, which local evaluation uses)."""

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
"""The environment variable the API key is read from unless ``--api-key-env`` names another."""

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})
"""Hosts of a server on this machine: the one URL serves whatever checkpoint was started last."""

_DATA_URL = re.compile(r"(data:[\w/.+-]+;base64,)([A-Za-z0-9+/]{16})[A-Za-z0-9+/=]+")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/amft-vlm/served`` (``~/.cache/amft-vlm/served`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "amft-vlm" / "served"


@dataclass(frozen=True)
class RetryPolicy:
    """How transport faults are retried: exponential backoff with full jitter, ``Retry-After`` honoured.

    Attributes:
        max_attempts: requests in all for one turn (the first included) before the episode fails by transport.
        base_delay: the first retry waits up to this many seconds; each further retry doubles the bound.
        max_delay: the backoff bound never exceeds this.
        max_retry_after: a server's ``Retry-After`` is honoured up to this many seconds (a rate-limited
            hosted API may ask for more than `max_delay`; a longer ask is taken as this).
    """

    max_attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1; got {self.max_attempts}")
        if not 0 <= self.base_delay <= self.max_delay:
            raise ValueError(f"retry delays need 0 <= base_delay <= max_delay; got {self.base_delay} and {self.max_delay}")
        if self.max_retry_after < 0:
            raise ValueError(f"max_retry_after must be at least 0 seconds; got {self.max_retry_after}")

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (0 for the first): full jitter, at least `retry_after` (capped)."""
        backoff = rng.uniform(0.0, min(self.max_delay, self.base_delay * 2**retry))
        return backoff if retry_after is None else max(backoff, min(retry_after, self.max_retry_after))


def retry_after_seconds(headers: Any) -> float | None:
    """The wait a response asks for: ``retry-after-ms``, or ``Retry-After`` in seconds or as an HTTP date; None if neither."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def check_api_base(api_base: str) -> str:
    """`api_base` without a trailing slash; raises ``ValueError`` unless it is an http(s) URL with a host and a valid port."""
    parsed = urlsplit(api_base)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(
            f"--api-base must be an http(s) URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1; got {redact_url(api_base)!r}"
        )
    try:
        port = parsed.port  # raises for a port that is not a number or is over 65535
    except ValueError:
        port = -1
    if port is not None and not 0 < port <= 65535:
        raise ValueError(
            f"--api-base has no valid port (a number from 1 to 65535, e.g. http://localhost:8000/v1); got {redact_url(api_base)!r}"
        )
    return urlunsplit(parsed._replace(path=parsed.path.rstrip("/")))


def redact_url(url: str) -> str:
    """`url` with its credentials hidden: the user and password (``***@host``) and every query value (``?key=***``)."""
    parsed = urlsplit(url)
    netloc = parsed.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = urlencode([(name, "***") for name, _ in parse_qsl(parsed.query, keep_blank_values=True)], safe="*")
    return urlunsplit(parsed._replace(netloc=netloc, query=query))


MIN_SCRUBBED_CHARS = 8
"""A credential shorter than this is not masked in what the server returns, nor a password or query value this short
on its own in log lines: it could not be told from ordinary text (an answer, a log line), and a secret that short,
such as vLLM's customary key ``EMPTY``, guards nothing. Log lines mask the key and ``user:pass@`` / ``name=value``
whatever their length."""


def credential_masks(api_key: str | None, api_base: str) -> dict[str, str]:
    """Every form in which the credentials may show up, each with what it is shown as instead.

    The API key (``***``); of `api_base`: its ``user:pass@`` (``***@``), the password alone, as written and
    percent-decoded, and the ``Basic`` authorization the HTTP client makes of them (``***``); each ``name=value``
    of its query (``name=***``), as written and encoded, and the value alone (``***``). A server that echoes the
    request (its headers, its URL) sends them back in one of these forms. A password or value alone is left out
    when it is shorter than `MIN_SCRUBBED_CHARS`.
    """
    masks = {api_key: "***"} if api_key else {}
    parsed = urlsplit(api_base)
    alone: list[str] = []
    if "@" in parsed.netloc:
        masks[parsed.netloc.rpartition("@")[0] + "@"] = "***@"
        user, password = unquote(parsed.username or ""), unquote(parsed.password or "")
        masks[base64.b64encode(f"{user}:{password}".encode()).decode("ascii")] = "***"
        alone += [parsed.password or "", password]
    for name, value in parse_qsl(parsed.query, keep_blank_values=True):
        if value:
            for pair in (urlencode([(name, value)]), f"{name}={value}"):
                masks[pair] = f"{name}=***"
            alone.append(value)
    masks.update(dict.fromkeys((secret for secret in alone if len(secret) >= MIN_SCRUBBED_CHARS), "***"))
    return masks


class LogRedactor(logging.Filter):
    """Hides credentials in log records and in what a server returns, and cuts base64 data URLs short in log records.

    Args:
        secrets: the strings to hide, each shown as ``***``, or a mapping of each to what it is shown as
            (`credential_masks`: the API key, the URL's ``user:pass@`` and query values, in every form they take).

    `ChatClient` puts it on the root logger's handlers, where the records of the ``openai`` client and
    its HTTP layer end up (with ``-v``: the request URL, and for some ``openai`` versions the request
    body with its images), and scrubs every string of every response with it (`scrub`) before anything
    is stored, logged or printed.
    """

    def __init__(self, secrets: Iterable[str] | Mapping[str, str]) -> None:
        super().__init__()
        masks = dict(secrets) if isinstance(secrets, Mapping) else dict.fromkeys(secrets, "***")
        # Longest first: a secret that contains another (user:pass@ and pass) is masked whole.
        self._replacements = sorted(((secret, mask) for secret, mask in masks.items() if secret), key=lambda item: -len(item[0]))
        self._scrubbed = [(secret, mask) for secret, mask in self._replacements if len(secret) >= MIN_SCRUBBED_CHARS]

    @property
    def longest_scrubbed(self) -> int:
        """The length of the longest credential `scrub` masks (0 when there is none)."""
        return len(self._scrubbed[0][0]) if self._scrubbed else 0

    def scrub(self, text: str) -> str:
        """`text` (a string a server returned) with every credential of at least `MIN_SCRUBBED_CHARS` characters masked."""
        for secret, masked in self._scrubbed:
            if secret in text:
                text = text.replace(secret, masked)
        return text

    def redact(self, text: str) -> str:
        """`text` with every secret masked and every data URL cut to its first characters and its length."""
        for secret, masked in self._replacements:
            text = text.replace(secret, masked)
        return _DATA_URL.sub(lambda match: f"{match[1]}{match[2]}...({len(match[0]) - len(match[1])} chars)", text)

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message if it shows a secret or a data URL; never drops a record."""
        try:
            message = record.getMessage()
        except Exception:  # a library's malformed log call (arguments that do not fit its format): logging reports it, not us
            return True
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


@dataclass(frozen=True)
class ServedEndpoint:
    """Where the model is served and how to talk to it.

    Attributes:
        api_base: the API's base URL, e.g. ``http://localhost:8000/v1`` (vLLM) or ``https://api.openai.com/v1``;
            credentials in it (``user:pass@host``, ``?key=...``) are used but never recorded or logged.
        model: the model name the API serves, e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``.
        api_key_env: the environment variable holding the API key (unset: a placeholder is sent).
        concurrency: episodes in flight at once, each with an environment of its own in memory (V-IRL vision: about
            50 MB each; GeneralPoints vision: about 20 MB).
        request_timeout: seconds one request may take in all (connecting, sending, reading the whole response): a
            deadline, not a limit per read, so a server that drips its answer is abandoned (and retried) on time.
        retry: the retry policy for transport faults.
        cache_dir: the response cache directory; None turns the cache off.
        cache_tag: a label added to every cache key, to keep apart runs the server cannot tell apart
            (e.g. two checkpoints served one after the other under one name and URL).
        min_pixels: smallest image area after smart resize (default Qwen2.5-VL's, as a local model).
        max_pixels: largest image area after smart resize (default Qwen2.5-VL's; a checkpoint trained
            with other ``min_pixels`` / ``max_pixels`` is matched by passing the same values).
    """

    api_base: str
    model: str
    api_key_env: str = DEFAULT_API_KEY_ENV
    concurrency: int = 8
    request_timeout: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cache_dir: str | None = field(default_factory=lambda: str(default_cache_dir()))
    cache_tag: str | None = None
    min_pixels: int = QWEN_MIN_PIXELS
    max_pixels: int = QWEN_MAX_PIXELS

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_base", check_api_base(self.api_base))
        if not self.model:
            raise ValueError("a served model needs its name (--model), as the API lists it")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1; got {self.concurrency}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be positive (seconds); got {self.request_timeout}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"pixel bounds need 0 < min_pixels <= max_pixels; got {self.min_pixels} and {self.max_pixels}")

    @property
    def display_url(self) -> str:
        """`api_base` as it may be shown and recorded: credentials hidden (`redact_url`)."""
        return redact_url(self.api_base)

    @property
    def is_local(self) -> bool:
        """Whether the server runs on this machine (its host is localhost or a loopback address)."""
        host = urlsplit(self.api_base).hostname or ""
        return host in LOCAL_HOSTS or host.startswith("127.")


RESERVED_BODY_FIELDS = {
    "model": "--model",
    "messages": "the environment's dialogue",
    "stream": "the client (it reads whole responses)",
    "n": "the client (one answer per request)",
    "temperature": "--temperature",
    "max_tokens": "--max-new-tokens",
    "seed": "--seed (a sampled request's seed is derived from it)",
}
"""Request fields ``--extra-body`` may not set, and what sets each instead."""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings sent with every request.

    Attributes:
        temperature: None for greedy decoding (sent as temperature 0).
        max_tokens: the most tokens per answer (at least 1).
        sampling_seed: the run's sampling seed (sampled runs only).
        extra_body: more fields for every request's JSON body (``--extra-body``), e.g. ``{"top_k": -1}`` for a
            server whose decoding defaults differ from the local path's; sent as given, on top of the fields the
            client adds for vLLM and SGLang (`amft_vlm.evaluation.served.client.engine_extra_body`).
    """

    temperature: float | None
    max_tokens: int
    sampling_seed: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 for a served model; got {self.max_tokens}")
        if not isinstance(self.extra_body, dict):
            raise ValueError(f"--extra-body must be a JSON object, e.g. '{{\"top_k\": -1}}'; got {self.extra_body!r}")
        reserved = sorted(set(self.extra_body) & set(RESERVED_BODY_FIELDS))
        if reserved:
            raise ValueError(
                f"--extra-body may not set {', '.join(reserved)}: "
                + "; ".join(f"{name} is set by {RESERVED_BODY_FIELDS[name]}" for name in reserved)
            )

    def request_arguments(self, episode_seed: int, request_index: int) -> dict[str, Any]:
        """The request's sampling keywords; a sampled request gets a seed of its own (episode, place in it)."""
        if self.temperature is None:
            return {"temperature": 0.0, "top_p": 1.0, "max_tokens": self.max_tokens}
        seed = int(np.random.SeedSequence([self.sampling_seed or 0, episode_seed, request_index]).generate_state(1)[0] >> 1)
        return {"temperature": self.temperature, "top_p": 1.0, "max_tokens": self.max_tokens, "seed": seed}
