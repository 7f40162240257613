"""A served model as a responder: the dialogue each request carries, and the threads that send the requests."""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from agents.chat import Dialogue
from agents.responder import Answer, NoAnswer, Request
from agents.vision_inputs import ImageLike, resize_image
from amft_vlm.evaluation.served.client import (
    MIN_PROBE_EPISODES,
    SERVER_ERROR,
    ChatClient,
    ServerError,
    TransportCounters,
    TransportFailure,
)
from amft_vlm.evaluation.served.endpoint import Sampling, ServedEndpoint
from amft_vlm.evaluation.served.record import EpisodeUsage, ServedInfo
from amft_vlm.rollout.engine import Episode, RolloutEngine
from amft_vlm.rollout.episode_metrics import TRANSPORT_FAILURE, EpisodeOutcome

logger = logging.getLogger(__name__)

IMAGE_FACTOR = 28
"""Image sides are multiples of this (Qwen-VL's ``patch_size * merge_size``), as for a local model."""

SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
"""A chat template's special token written as text: Qwen's ``<|image_pad|>``, ``<|vision_start|>``, ``<|im_end|>``, ...
(Llama 3's and Phi's take the same form)."""


def neutralise_special_tokens(text: str) -> tuple[str, int]:
    """`text` without the special tokens in it (`SPECIAL_TOKEN`), and how many were taken out.

    A local model never emits an image placeholder (`agents.policy.ChatEncoder.suppressed_token_ids` are given
    probability 0); a served one may, and its server reads the tokens back as tokens when the answer returns in
    the dialogue: an ``<|image_pad|>`` without an image makes ``transformers serve`` fail the request (HTTP 500),
    an ``<|im_end|>`` ends the turn early. Taken out, the answer is the one a model that cannot emit them gives.
    """
    neutral, count = SPECIAL_TOKEN.subn("", text)
    return neutral, count


def png_data_url(image: ImageLike, *, min_pixels: int, max_pixels: int) -> str:
    """`image` smart-resized into ``[min_pixels, max_pixels]`` as a local Qwen-VL model sees it, as a PNG data URL."""
    resized = resize_image(image, min_pixels=min_pixels, max_pixels=max_pixels, factor=IMAGE_FACTOR)
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def dialogue_messages(dialogue: Dialogue, image_url: str | None) -> list[dict[str, Any]]:
    """The OpenAI chat messages of `dialogue` (`Dialogue.to_messages`), the image placeholder given as `image_url`."""
    messages = []
    for message in dialogue.to_messages():
        if isinstance(message["content"], list):
            content = [
                {"type": "image_url", "image_url": {"url": image_url}} if part["type"] == "image" else part
                for part in message["content"]
            ]
            messages.append({"role": message["role"], "content": content})
        else:
            messages.append(message)
    return messages


class ServedResponder:
    """A model behind an OpenAI-compatible API as a text `agents.responder.Responder`: one chat request per row.

    Each request of a batch is sent in a thread of its own (a daemon thread: an interrupted run never
    waits for a request in flight), with its dialogue so far (`dialogue_messages`, the image as a PNG
    data URL encoded once per dialogue); its future resolves to the answer with its special tokens
    taken out (`neutralise_special_tokens`), which the environment judges and the dialogue carries. A
    request that fails by transport (`TransportFailure`) or by a server error on every attempt
    (`ServerError`) resolves to a `agents.responder.NoAnswer` with the verdict ``transport_failure`` or
    ``server_error`` (the episode ends there, unsolved); any other error (the circuit breaker's
    `EndpointRefused`) is raised by the future. `usage` keeps what each episode cost, by its place in
    the engine's queue. Open one with `served_responder`, which closes its client.
    """

    answers_in_tokens = False

    def __init__(self, client: ChatClient) -> None:
        self.name = client.endpoint.model
        self.client = client
        self.usage: dict[int, EpisodeUsage] = {}
        """Each episode's usage, by its place in the queue (`agents.responder.Request.episode`)."""
        self._image_urls: OrderedDict[int, tuple[ImageLike, str]] = OrderedDict()
        self._image_urls_kept = 2 * max(client.endpoint.concurrency, MIN_PROBE_EPISODES)
        self._lock = threading.Lock()

    def respond(self, requests: list[Request]) -> list[Future[Answer]]:
        """Send every request at once, each in its own thread; the futures resolve as the answers come in."""
        futures = []
        for request in requests:
            usage = self.usage.setdefault(request.episode, EpisodeUsage(seed=request.seed))
            future: Future[Answer] = Future()
            name = f"served-{request.episode}-{request.turn}"
            threading.Thread(target=self._answer_into, args=(future, request, usage), name=name, daemon=True).start()
            futures.append(future)
        return futures

    def run(self, outcomes: list[EpisodeOutcome]) -> ServedRun:
        """What the run did: the `outcomes` (queue order), each episode's usage and the client's counters."""
        return ServedRun(
            outcomes=outcomes,
            usage=[self.usage[index] for index in range(len(outcomes))],
            counters=self.client.counters,
            server_identity=self.client.server,
            extra_body=dict(self.client.extra_body),
            max_answer_chars=self.client.max_answer_chars,
            max_response_bytes=self.client.max_response_bytes,
        )

    def _answer_into(self, future: Future[Answer], request: Request, usage: EpisodeUsage) -> None:
        try:
            future.set_result(self._answer(request, usage))
        except (TransportFailure, ServerError) as failure:
            transport = isinstance(failure, TransportFailure)
            if transport:
                usage.transport_failure = str(failure)
            else:
                usage.server_error = str(failure)
            if not self.client.stop.is_set():  # once the run has stopped, an episode still in flight is no news
                how = "by transport" if transport else "by a server error on every attempt (counted as unsolved)"
                logger.warning("episode with seed %d failed %s: %s", request.seed, how, failure)
            future.set_result(NoAnswer(TRANSPORT_FAILURE if transport else SERVER_ERROR, str(failure)))
        except BaseException as error:  # raised in the engine's thread, which stops the run
            future.set_exception(error)

    def _answer(self, request: Request, usage: EpisodeUsage) -> str:
        dialogue = request.dialogue
        image_url = None if dialogue.image is None else self._image_url(request.episode, dialogue.image)
        completion = self.client.complete(dialogue_messages(dialogue, image_url), episode_seed=request.seed, request_index=request.turn)
        usage.answers += 1
        usage.truncated_answers += completion.truncated
        usage.invalid_usage += completion.invalid_usage
        text, special_tokens = neutralise_special_tokens(completion.text)
        usage.neutralised_answers += special_tokens > 0
        if completion.from_cache:
            usage.from_cache += 1
            usage.replayed_prompt_tokens += completion.prompt_tokens
            usage.replayed_completion_tokens += completion.completion_tokens
        else:
            usage.prompt_tokens += completion.prompt_tokens
            usage.completion_tokens += completion.completion_tokens
        return text

    def _image_url(self, episode: int, image: ImageLike) -> str:
        """`image` as a data URL, encoded once per dialogue: every turn of a dialogue resends the same image.

        The last few episodes' URLs are kept (a slot's episode asks again within a few batches); an
        episode pushed out just encodes its image again.
        """
        with self._lock:
            kept = self._image_urls.get(episode)
            if kept is not None and kept[0] is image:
                self._image_urls.move_to_end(episode)
                return kept[1]
        endpoint = self.client.endpoint
        url = png_data_url(image, min_pixels=endpoint.min_pixels, max_pixels=endpoint.max_pixels)
        with self._lock:
            self._image_urls[episode] = (image, url)
            self._image_urls.move_to_end(episode)
            while len(self._image_urls) > self._image_urls_kept:
                self._image_urls.popitem(last=False)
        return url


@contextmanager
def served_responder(endpoint: ServedEndpoint, sampling: Sampling, seeds: Sequence[int]) -> Iterator[ServedResponder]:
    """A `ServedResponder` for a run over `seeds`, its client closed when the block ends.

    The first ``max(concurrency, MIN_PROBE_EPISODES)`` seeds are the client's probes (`ChatClient`). Log lines go
    above the progress bar (``tqdm.contrib.logging.logging_redirect_tqdm``), with the client's `LogRedactor` on them.
    An error in the block (the circuit breaker's `EndpointRefused`, a callback's error, ``KeyboardInterrupt``) stops
    the run at once: no further request is sent, backoff waits end, and requests still in flight are abandoned.
    """
    # The redirect comes first: the client puts its log filter on the handlers there are when it starts.
    with logging_redirect_tqdm():
        client = ChatClient(endpoint, sampling, probe_seeds=[int(seed) for seed in seeds[: max(endpoint.concurrency, MIN_PROBE_EPISODES)]])
        try:
            yield ServedResponder(client)
        except BaseException:
            client.stop.set()
            raise
        finally:
            client.close()


@dataclass(frozen=True)
class ServedRun:
    """What `play_served` returns: the outcomes in seed order, each episode's usage, the client's counters, the
    server's identity (`server_identity`), the fields sent in every request's body besides the sampling keywords, and
    the limits answers and responses were kept to (`ChatClient.max_answer_chars`, `ChatClient.max_response_bytes`)."""

    outcomes: list[EpisodeOutcome]
    usage: list[EpisodeUsage]
    counters: TransportCounters
    server_identity: dict[str, Any] | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    max_answer_chars: int | None = None
    max_response_bytes: int | None = None

    def info(self, endpoint: ServedEndpoint) -> ServedInfo:
        """The evaluation record's ``served`` entry: `endpoint`'s settings (its URL without credentials, the key's variable
        name, never the key) and this run."""
        return ServedInfo(
            api_base=endpoint.display_url,
            api_key_env=endpoint.api_key_env,
            concurrency=endpoint.concurrency,
            request_timeout=endpoint.request_timeout,
            retry=endpoint.retry,
            cache_dir=endpoint.cache_dir,
            cache_tag=endpoint.cache_tag,
            min_pixels=endpoint.min_pixels,
            max_pixels=endpoint.max_pixels,
            server_identity=self.server_identity,
            max_answer_chars=self.max_answer_chars,
            max_response_bytes=self.max_response_bytes,
            requests_sent=self.counters.requests,
            retries=self.counters.retries,
            answers_from_cache=self.counters.cache_hits,
            refusals=self.counters.refusals,
            faults=dict(sorted(self.counters.faults.items())),
            transport_failures=sum(usage.transport_failure is not None for usage in self.usage),
            server_errors=sum(usage.server_error is not None for usage in self.usage),
            truncated_answers=sum(usage.truncated_answers for usage in self.usage),
            invalid_usage=sum(usage.invalid_usage for usage in self.usage),
            neutralised_answers=sum(usage.neutralised_answers for usage in self.usage),
            bytes_received=self.counters.bytes_received,
            prompt_tokens=sum(usage.prompt_tokens for usage in self.usage),
            completion_tokens=sum(usage.completion_tokens for usage in self.usage),
            replayed_prompt_tokens=sum(usage.replayed_prompt_tokens for usage in self.usage),
            replayed_completion_tokens=sum(usage.replayed_completion_tokens for usage in self.usage),
            episode_usage=tuple(self.usage),
        )


def play_served(
    endpoint: ServedEndpoint,
    env_id: str,
    env_kwargs: dict[str, Any],
    seeds: Sequence[int],
    sampling: Sampling,
    *,
    progress: bool = True,
    on_episode: Callable[[int, EpisodeOutcome, EpisodeUsage], None] | None = None,
) -> ServedRun:
    """Play one episode per seed with the served model, ``endpoint.concurrency`` at a time; outcomes in seed order.

    The rollout engine plays the episodes (``endpoint.concurrency`` environments) and a `ServedResponder` answers.

    Args:
        endpoint: the served model.
        env_id: the environment id.
        env_kwargs: its ``gym.make`` keyword arguments.
        seeds: one ``reset`` seed per episode.
        sampling: the sampling settings.
        progress: show a progress bar, advanced as each episode ends.
        on_episode: called with each episode's index in `seeds`, outcome and usage as it ends (in the
            calling thread, in the order episodes end).

    An episode whose turn failed by transport is recorded with the answers it had and a last verdict
    ``transport_failure`` (reward 0, unsolved; left out of the rates); one whose request the server failed alike on
    every attempt while it answered others, with a last verdict ``server_error`` (reward 0, unsolved, in the rates).
    The first ``max(concurrency, 2)`` episodes are the client's probes (`ChatClient`): if none of their first
    requests gets a completion, the run stops. The first error of an episode (the circuit breaker's
    `EndpointRefused`), or of `on_episode`, or an interrupt (``KeyboardInterrupt``) stops the run at once: no
    further request is sent, backoff waits end, the client is closed and the error is raised without waiting for
    the requests in flight. Every turn answered so far is in the cache, so a rerun pays only for the rest.
    """
    seeds = [int(seed) for seed in seeds]
    num_envs = max(1, min(endpoint.concurrency, len(seeds)))
    with RolloutEngine(None, env_id, env_kwargs=env_kwargs, num_envs=num_envs) as engine, served_responder(endpoint, sampling, seeds) as responder:

        def report(episode: Episode) -> None:
            on_episode(episode.index, episode.outcome, responder.usage[episode.index])

        outcomes, _ = engine.play(seeds, responder=responder, progress=progress, on_episode=None if on_episode is None else report)
        return responder.run(outcomes)
