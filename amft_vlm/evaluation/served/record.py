"""What a served evaluation records: each episode's usage, and the ``served`` entry of the evaluation record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from amft_vlm.evaluation.served.endpoint import RetryPolicy


@dataclass
class EpisodeUsage:
    """What one episode cost: answers, how many replayed from the cache, and tokens; and what was odd about its answers.

    ``prompt_tokens`` and ``completion_tokens`` are those the API reported for the requests sent (spent
    in this run); ``replayed_*`` those of the answers replayed from the cache (spent in an earlier run).
    ``truncated_answers``: answers cut to the character limit ``max_tokens`` allows (the server did not stop
    there); ``invalid_usage``: answers whose token counts were not counts (read as 0); ``neutralised_answers``:
    answers special tokens were taken out of. ``transport_failure`` says why the episode failed by transport,
    ``server_error`` which server error ended it (the same on every attempt); None if none did.
    """

    seed: int
    answers: int = 0
    from_cache: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replayed_prompt_tokens: int = 0
    replayed_completion_tokens: int = 0
    truncated_answers: int = 0
    invalid_usage: int = 0
    neutralised_answers: int = 0
    transport_failure: str | None = None
    server_error: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> EpisodeUsage:
        """The usage from `dataclasses.asdict`'s layout; a missing count is 0; raises ``ValueError`` naming a malformed field."""
        if not isinstance(data, dict):
            raise ValueError(f"served.episode_usage entries must be objects; got {data!r:.80}")
        counts = {
            name: _checked(data, name, _integer, 0, "a whole number", where="served.episode_usage[].")
            for name in (
                "answers", "from_cache", "prompt_tokens", "completion_tokens", "replayed_prompt_tokens", "replayed_completion_tokens",
                "truncated_answers", "invalid_usage", "neutralised_answers",
            )
        }
        if data.get("seed") is None:
            raise ValueError(f"served.episode_usage entries need their episode's seed; got {data!r:.80}")
        return cls(
            seed=_checked(data, "seed", _integer, None, "a whole number", where="served.episode_usage[]."),
            transport_failure=_checked(data, "transport_failure", _text, None, "a text or null", where="served.episode_usage[]."),
            server_error=_checked(data, "server_error", _text, None, "a text or null", where="served.episode_usage[]."),
            **counts,
        )


_RETRY_FIELDS = frozenset(item.name for item in fields(RetryPolicy))


@dataclass(frozen=True)
class ServedInfo:
    """A served model's entry in an `amft_vlm.evaluation.evaluate.EvalRecord` (``served``): the endpoint as recorded and what the run did.

    The endpoint settings (`amft_vlm.evaluation.served.ServedEndpoint`) are recorded without secrets: the URL with its
    credentials hidden and the name of the key's variable, never the key. A record written before a field
    existed reads it as unknown (None) or 0.

    Attributes:
        api_base: the API's URL, credentials hidden (``***@host``, ``?key=***``).
        api_key_env: the environment variable the key was read from.
        concurrency: episodes in flight at once.
        request_timeout: seconds one request could take.
        retry: the retry policy.
        cache_dir: the response cache directory; None with ``--no-cache``.
        cache_tag: the ``--cache-tag``.
        min_pixels: the images' smallest area after smart resize.
        max_pixels: the images' largest area after smart resize.
        server_identity: what ``GET /models`` said of the model (`amft_vlm.evaluation.served.server_identity`); None if nothing.
        max_answer_chars: the most characters an answer was kept to (32 a token of ``--max-new-tokens``).
        max_response_bytes: the most bytes of a response body read (decoded).
        requests_sent: chat requests sent, retries included (answers replayed from the cache are not requests).
        retries: requests that repeated a failed one.
        answers_from_cache: answers replayed from the cache.
        refusals: answers that were refusals (judged as answers; replayed ones included).
        faults: requests that got no completion, by kind (``HTTP 429``, ``timeout``, ``malformed response``, ...).
        transport_failures: episodes failed by transport (left out of the rates).
        server_errors: episodes ended by a server error repeated on every attempt of one request (verdict
            ``server_error``: unsolved, in the rates).
        truncated_answers: answers cut to `max_answer_chars` (replayed ones included).
        invalid_usage: answers whose token counts were not counts (NaN, infinite, negative, absurd): read as 0.
        neutralised_answers: answers special tokens (``<|image_pad|>``, ...) were taken out of.
        bytes_received: response body bytes read in all (decoded).
        prompt_tokens: prompt tokens the API reported for the requests sent in this run.
        completion_tokens: completion tokens the API reported for the requests sent in this run.
        replayed_prompt_tokens: prompt tokens of the answers replayed from the cache (spent by an earlier run).
        replayed_completion_tokens: completion tokens of the answers replayed from the cache.
        episode_usage: each episode's usage, in seed order.
    """

    api_base: str
    api_key_env: str | None = None
    concurrency: int | None = None
    request_timeout: float | None = None
    retry: RetryPolicy | None = None
    cache_dir: str | None = None
    cache_tag: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    server_identity: dict[str, Any] | None = None
    max_answer_chars: int | None = None
    max_response_bytes: int | None = None
    requests_sent: int = 0
    retries: int = 0
    answers_from_cache: int = 0
    refusals: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    transport_failures: int = 0
    server_errors: int = 0
    truncated_answers: int = 0
    invalid_usage: int = 0
    neutralised_answers: int = 0
    bytes_received: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replayed_prompt_tokens: int = 0
    replayed_completion_tokens: int = 0
    episode_usage: tuple[EpisodeUsage, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON values (the retry policy and each episode's usage as objects)."""
        data = {item.name: getattr(self, item.name) for item in fields(self)}
        data["retry"] = None if self.retry is None else asdict(self.retry)
        data["faults"] = dict(sorted(self.faults.items()))
        data["episode_usage"] = [asdict(usage) for usage in self.episode_usage]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ServedInfo:
        """The entry from `to_dict`'s layout; a missing field takes its default; raises ``ValueError`` naming what is malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"'served' must be an object (the endpoint and what the run did), or absent; got {data!r:.80}")
        if not isinstance(data.get("api_base"), str):
            raise ValueError(f"served.api_base must be the endpoint's URL; got {data.get('api_base')!r:.80}")
        counts = {
            name: _checked(data, name, _integer, 0, "a whole number")
            for name in (
                "requests_sent", "retries", "answers_from_cache", "refusals", "transport_failures", "server_errors",
                "truncated_answers", "invalid_usage", "neutralised_answers", "bytes_received", "prompt_tokens",
                "completion_tokens", "replayed_prompt_tokens", "replayed_completion_tokens",
            )
        }
        return cls(
            api_base=data["api_base"],
            api_key_env=_checked(data, "api_key_env", _text, None, "a variable name or null"),
            concurrency=_checked(data, "concurrency", _integer, None, "a whole number or null"),
            request_timeout=_checked(data, "request_timeout", _number, None, "a number or null"),
            retry=_checked(data, "retry", _retry_policy, None, "a retry policy object or null"),
            cache_dir=_checked(data, "cache_dir", _text, None, "a directory or null"),
            cache_tag=_checked(data, "cache_tag", _text, None, "a text or null"),
            min_pixels=_checked(data, "min_pixels", _integer, None, "a whole number or null"),
            max_pixels=_checked(data, "max_pixels", _integer, None, "a whole number or null"),
            max_answer_chars=_checked(data, "max_answer_chars", _integer, None, "a whole number or null"),
            max_response_bytes=_checked(data, "max_response_bytes", _integer, None, "a whole number or null"),
            server_identity=_checked(data, "server_identity", _object, None, "an object or null"),
            faults=_checked(data, "faults", _fault_counts, {}, "an object of fault kind -> count"),
            episode_usage=_checked(data, "episode_usage", _usages, (), "a list of episode usages"),
            **counts,
        )


def _checked(data: dict[str, Any], name: str, convert: Callable[[Any], Any], default: Any, expected: str, *, where: str = "served.") -> Any:
    """``convert(data[name])``; `default` when it is missing (or null, where the default is null)."""
    if name not in data or (data[name] is None and default is None):
        return default
    try:
        return convert(data[name])
    except ValueError as error:
        if str(error).startswith("served."):  # a nested entry's own message
            raise
        raise ValueError(f"{where}{name} must be {expected}; got {data[name]!r:.80}") from error
    except (TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"{where}{name} must be {expected}; got {data[name]!r:.80}") from error


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"not a whole number: {value!r}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"not a text: {value!r}")
    return value


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"not an object: {value!r}")
    return value


def _fault_counts(value: Any) -> dict[str, int]:
    return {str(kind): _integer(count) for kind, count in _object(value).items()}


def _retry_policy(value: Any) -> RetryPolicy:
    return RetryPolicy(**{name: setting for name, setting in _object(value).items() if name in _RETRY_FIELDS})


def _usages(value: Any) -> tuple[EpisodeUsage, ...]:
    if not isinstance(value, list):
        raise TypeError(f"not a list: {value!r}")
    return tuple(EpisodeUsage.from_dict(usage) for usage in value)
