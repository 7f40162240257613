"""Evaluation of a model served behind an OpenAI-compatible chat-completions API (vLLM, SGLang, hosted APIs).

Each episode is the dialogue the environment gives a local model (`amft_vlm.rollout.engine.RolloutEngine`
plays it; a `ServedResponder` answers the dialogue the engine's recorder keeps, like any responder): the
first user turn carries the observation image as a ``data:image/png;base64,`` URL, smart-resized to
the pixel budget a local Qwen-VL model uses (`agents.vision_inputs.resize_image`, ``[min_pixels,
max_pixels]``, Qwen2.5-VL's defaults unless given: pass a trained checkpoint's own values to match
it), feedback turns are text, and a V-IRL restart (``info["new_dialogue"]``) starts a new
conversation. Requests go through the official ``openai`` client, with its own retries off
(``max_retries=0``) so the policy here is the only one.

Layout: `endpoint` (the settings: `ServedEndpoint`, `RetryPolicy`, `Sampling`; `LogRedactor`), `cache`
(`ResponseCache`), `client` (`ChatClient`: requests, retries, the circuit breaker), `response` (a
response as untrusted input: the size cap, the deadline, the JSON depth), `play` (`ServedResponder`:
the dialogue each request carries and the threads that send them; `play_served`), `record` (`ServedInfo`, the evaluation record's
``served`` entry, and `EpisodeUsage`).

Decoding: greedy is sent as temperature 0, sampling as the temperature with a per-request seed; top_p
is 1 in both, as in the local path (`agents.policy.VLMPolicy`, which drops the checkpoint's
generation defaults). vLLM and SGLang fill every field a request leaves out from the checkpoint's
``generation_config.json`` unless started otherwise (Qwen2.5-VL's: ``top_k`` 1, ``repetition_penalty``
1.05), so when ``GET /models`` says the server is one of them (``owned_by``), every request also
carries ``top_k: -1, repetition_penalty: 1.0, min_p: 0.0`` (`NEUTRAL_SAMPLING_FIELDS`); other servers
never get them (hosted APIs refuse unknown fields). `Sampling.extra_body` (``--extra-body``) adds
fields of the user's on top. The fields sent are recorded (``decoding["extra_body"]``) and keyed.

Concurrency: the engine plays ``concurrency`` environments (a V-IRL vision environment holds about 50
MB, a GeneralPoints vision one about 20 MB), and the responder sends each one's request in a thread of
its own; an environment is stepped as soon as its answer is in, so up to ``concurrency`` requests are
in flight. Outcomes are collected in seed order, so the record is the one a sequential run gives. An interrupt (Ctrl-C) stops the run at
once: backoff waits end, no request is sent after it, requests in flight are abandoned.

Faults (`ChatClient.complete`):

- HTTP 408, 409, 429 and 5xx, timeouts (``request_timeout``: a deadline for the whole request, each attempt
  running in a thread of its own that is given up on at the deadline), dropped connections and bodies that
  are not a completion (not JSON, nested deeper than `response.MAX_JSON_DEPTH`, in a content coding not
  asked for, or an error object) are retried up to ``max_attempts``
  in all, waiting a random time in ``[0, min(max_delay, base_delay * 2**retry)]`` (exponential
  backoff with full jitter), and never less than the server's ``Retry-After`` / ``retry-after-ms``
  (honoured up to ``max_retry_after``, 120 s). After the last attempt the episode ends with the verdict
  ``transport_failure`` (`amft_vlm.rollout.episode_metrics.TRANSPORT_FAILURE`): left out of every metric and
  counted apart. Other 4xx answers (a request the server will never take, e.g. a dialogue over its
  context length) fail the episode the same way, with the server's message, without retrying. A request
  failed with the same HTTP 500 and message on every attempt (two or more), once the server has answered
  a request of the run, is that request's own failure (`ServerError`): the episode ends with the verdict
  ``server_error`` (`SERVER_ERROR`), unsolved and counted in every rate, and is counted apart in the record.
- The circuit breaker stops the run with one error (`EndpointRefused`) when every request would fail
  alike: a 401, 403 or 404 (a wrong key, no access, a wrong model name or URL), whenever it comes; or
  none of the first requests of the first ``max(concurrency, 2)`` episodes (the probes) got a
  completion, each refused with another 4xx or out of attempts (a dead server, a wrong port, a request
  form the server never takes). Only the probes' first requests decide, so the decision does not
  depend on thread timing; an answer replayed from the cache counts as a completion, so a rerun
  decides as its first run did; one episode refused alone never stops a run of two or more; and no
  run ends without a completion at all. Finished turns are in the cache, so a rerun loses nothing.
- A completion is the model's answer whatever its shape (`parse_completion`): empty or null content,
  an empty or null ``choices``, a null message and a refusal (``finish_reason`` ``content_filter``)
  all go to the environment as ``""``, which judges them like any other answer; content given as a
  list of text parts is joined; missing token counts are 0, and so are counts that are not counts (NaN,
  infinite, negative, over `client.MAX_TOKEN_COUNT`), flagged. A body with no ``choices`` at all, or an
  error object (``"object": "error"``, which vLLM may send with status 200), is a transport fault.

Hostile servers (`response`): a response body is read up to ``1 MiB + 12 * max_answer_chars`` bytes, counted
after decompression (gzip and deflate are inflated here, never past the cap) and the rest never read; an
answer is kept to ``32 * max_tokens`` characters (`ChatClient.max_answer_chars`; one cut at the body cap is
read as far as it goes), cut answers flagged, and only the cut answer is cached or sent back. Special tokens
in an answer (``<|image_pad|>`` and every ``<|name|>``) are taken out before the environment judges it and
before it goes back in the dialogue (`neutralise_special_tokens`), counted per episode.

Cache (`ResponseCache`): one JSON file per request (the answer, its token counts and whether it was a
refusal), named by the SHA-256 of a canonical JSON of the endpoint (without credentials), the model,
what ``GET /models`` says of it (`server_identity`: its ``id``, ``root`` checkpoint path, ``parent``
and ``owned_by``; not ``created``, which servers stamp per listing), the ``cache_tag``, the messages
(each image as the SHA-256 of its data URL) and the sampling fields sent (extra body fields
included); written atomically once the response is read, before the environment sees it. ``GET
/models`` is retried like a chat request; if it still fails, the identity is None, the one of a server
without ``GET /models``, and a warning says that answers cached by runs that read it are not replayed.
A write that fails warns once and the run goes on without caching.
Greedy runs (temperature 0) share answers across runs and episodes whenever the dialogue is the same;
sampled runs add the sampling seed, the episode's reset seed and the request's index within the
episode to the key (and send a per-request ``seed`` derived from them), so different samples are never
conflated. A rerun of an interrupted evaluation replays every finished turn from the cache and sends
only the rest. Token totals count the requests sent; replayed answers' tokens are counted apart.

Secrets: the API key is read from the environment variable named by ``api_key_env``; neither it nor
credentials in the URL (``user:pass@host``, ``?key=...``) are written to a record, the cache or a log
line (`LogRedactor` also cuts base64 images out of ``-v`` logs), even when a server echoes them back:
every string of every response is scrubbed of them (`LogRedactor.scrub`) as it is parsed.
"""

from amft_vlm.evaluation.served.cache import Completion, ResponseCache
from amft_vlm.evaluation.served.client import (
    NEUTRAL_SAMPLING_FIELDS,
    SERVER_ERROR,
    ChatClient,
    EndpointRefused,
    ServerError,
    TransportFailure,
    engine_extra_body,
    parse_completion,
    server_identity,
)
from amft_vlm.evaluation.served.endpoint import (
    DEFAULT_API_KEY_ENV,
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    LogRedactor,
    RetryPolicy,
    Sampling,
    ServedEndpoint,
    default_cache_dir,
    redact_url,
    retry_after_seconds,
)
from amft_vlm.evaluation.served.play import (
    ServedResponder,
    ServedRun,
    dialogue_messages,
    neutralise_special_tokens,
    play_served,
    png_data_url,
    served_responder,
)
from amft_vlm.evaluation.served.record import EpisodeUsage, ServedInfo

__all__ = [
    "DEFAULT_API_KEY_ENV",
    "NEUTRAL_SAMPLING_FIELDS",
    "SERVER_ERROR",
    "QWEN_MAX_PIXELS",
    "QWEN_MIN_PIXELS",
    "ChatClient",
    "Completion",
    "EndpointRefused",
    "EpisodeUsage",
    "LogRedactor",
    "ResponseCache",
    "RetryPolicy",
    "Sampling",
    "ServedEndpoint",
    "ServedInfo",
    "ServedResponder",
    "ServedRun",
    "ServerError",
    "TransportFailure",
    "default_cache_dir",
    "dialogue_messages",
    "engine_extra_body",
    "neutralise_special_tokens",
    "parse_completion",
    "play_served",
    "png_data_url",
    "redact_url",
    "retry_after_seconds",
    "served_responder",
    "server_identity",
]
