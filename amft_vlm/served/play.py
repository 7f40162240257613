"""Playing episodes with a served model: the dialogue each request carries, and the threads that play the episodes."""

from __future__ import annotations

import base64
import io
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from agents.chat import Dialogue
from agents.vision_inputs import ImageLike, resize_image
from amft_vlm.episode_metrics import TRANSPORT_FAILURE, EpisodeOutcome
from amft_vlm.rollout import DialogueRecorder, RolloutEngine, record_environment_message
from amft_vlm.served.client import (
    MIN_PROBE_EPISODES,
    SERVER_ERROR,
    ChatClient,
    ServerError,
    TransportCounters,
    TransportFailure,
)
from amft_vlm.served.endpoint import Sampling, ServedEndpoint
from amft_vlm.served.record import EpisodeUsage, ServedInfo

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


class DialogueTracker(gym.Wrapper):
    """Keeps an episode's dialogue so far, recorded as the rollout engine records it, and each answer's verdict and reward.

    The engine hands a responder only the observation and the environment, not its record of the
    dialogue, so a `ServedResponder` reads the dialogue from this wrapper. It records with the engine's
    own `DialogueRecorder` and `record_environment_message` (the feedback and V-IRL restart rule), so
    the dialogue sent is the one the engine records for a local model.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.recorder = DialogueRecorder()
        self.verdicts: list[str] = []
        self.rewards: list[float] = []

    @property
    def dialogue(self) -> Dialogue | None:
        """The dialogue in progress."""
        return self.recorder.dialogue

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """Reset and start the episode's first dialogue."""
        observation, info = self.env.reset(**kwargs)
        self.recorder = DialogueRecorder()
        self.recorder.start_dialogue(observation["text"], image=observation.get("image"))
        self.verdicts, self.rewards = [], []
        return observation, info

    def step(self, action: str) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Step and extend the dialogue with the answer and the environment's next message."""
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.verdicts.append(str(info.get("verdict", "")))
        self.rewards.append(float(reward))
        self.recorder.add_text_response(action, float(reward))
        if not (terminated or truncated):
            record_environment_message(self.recorder, observation, info)
        return observation, reward, terminated, truncated, info


class ServedResponder:
    """An `agents.base.Agent` that asks the served model, with the dialogue so far, for each answer of one episode."""

    def __init__(self, client: ChatClient, usage: EpisodeUsage) -> None:
        self.name = client.endpoint.model
        self.client, self.usage = client, usage
        self._image: ImageLike | None = None
        self._image_url: str | None = None

    def act(self, observation: dict, env: gym.Env) -> str:
        """The served model's answer to the dialogue the `DialogueTracker` `env` holds, its special tokens taken out
        (`neutralise_special_tokens`): the environment judges it and the dialogue carries it without them."""
        dialogue = env.dialogue
        if dialogue.image is not None and dialogue.image is not self._image:
            # Encoded once per dialogue: every turn of it resends the same image.
            endpoint = self.client.endpoint
            self._image = dialogue.image
            self._image_url = png_data_url(dialogue.image, min_pixels=endpoint.min_pixels, max_pixels=endpoint.max_pixels)
        messages = dialogue_messages(dialogue, self._image_url if dialogue.image is not None else None)
        completion = self.client.complete(messages, episode_seed=self.usage.seed, request_index=self.usage.answers)
        self.usage.answers += 1
        self.usage.truncated_answers += completion.truncated
        self.usage.invalid_usage += completion.invalid_usage
        text, special_tokens = neutralise_special_tokens(completion.text)
        self.usage.neutralised_answers += special_tokens > 0
        if completion.from_cache:
            self.usage.from_cache += 1
            self.usage.replayed_prompt_tokens += completion.prompt_tokens
            self.usage.replayed_completion_tokens += completion.completion_tokens
        else:
            self.usage.prompt_tokens += completion.prompt_tokens
            self.usage.completion_tokens += completion.completion_tokens
        return text


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


@contextmanager
def _quiet_engine_summaries() -> Iterator[None]:
    """Silence the engine's per-`play` INFO summary: here every episode is its own `play` call."""
    engine_logger = logging.getLogger("amft_vlm.rollout")
    level = engine_logger.level
    engine_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        engine_logger.setLevel(level)


def _play_episode(engine: RolloutEngine, client: ChatClient, seed: int) -> tuple[EpisodeOutcome, EpisodeUsage]:
    """One episode; one whose turn failed by transport ends with the verdict ``transport_failure`` (reward 0), one whose
    request the server failed alike on every attempt with the verdict ``server_error`` (reward 0, unsolved)."""
    usage = EpisodeUsage(seed=seed)
    try:
        outcomes, _ = engine.play([seed], responder=ServedResponder(client, usage), progress=False)
        return outcomes[0], usage
    except (TransportFailure, ServerError) as failure:
        transport = isinstance(failure, TransportFailure)
        if transport:
            usage.transport_failure = str(failure)
        else:
            usage.server_error = str(failure)
        if not client.stop.is_set():  # once the run has stopped, an episode still in flight is no news
            how = "by transport" if transport else "by a server error on every attempt (counted as unsolved)"
            logger.warning("episode with seed %d failed %s: %s", seed, how, failure)
        tracker = engine.envs[0]
        verdict = TRANSPORT_FAILURE if transport else SERVER_ERROR
        return EpisodeOutcome(seed, (*tracker.verdicts, verdict), (*tracker.rewards, 0.0), success=False), usage


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
    every attempt while it answered others, with a last verdict ``server_error`` (reward 0, unsolved, in the rates). The first ``max(concurrency, 2)`` episodes are the client's
    probes (`ChatClient`): if none of their first requests gets a completion, the run stops. The first error
    of an episode (the circuit breaker's `EndpointRefused`), or of `on_episode`, or an interrupt
    (``KeyboardInterrupt``) stops the run at once: no further request is sent, backoff waits end, the
    client is closed and the error is raised without waiting for the requests in flight. Every turn
    answered so far is in the cache, so a rerun pays only for the rest. Log lines go above the progress
    bar (``tqdm.contrib.logging.logging_redirect_tqdm``), the client's `LogRedactor` on them.
    """
    seeds = [int(seed) for seed in seeds]
    queued: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    for index, seed in enumerate(seeds):
        queued.put((index, seed))
    finished: queue.SimpleQueue[tuple[int, tuple[EpisodeOutcome, EpisodeUsage] | BaseException]] = queue.SimpleQueue()
    results: list[tuple[EpisodeOutcome, EpisodeUsage] | None] = [None] * len(seeds)

    def work(client: ChatClient) -> None:
        engine = RolloutEngine(None, lambda: DialogueTracker(gym.make(env_id, **env_kwargs)))
        try:
            while not client.stop.is_set():
                try:
                    index, seed = queued.get_nowait()
                except queue.Empty:
                    return
                try:
                    finished.put((index, _play_episode(engine, client, seed)))
                except BaseException as error:  # handed to the calling thread, which stops the run
                    finished.put((index, error))
                    return
        finally:
            engine.close()

    # The redirect comes first: the client puts its log filter on the handlers there are when it starts.
    with logging_redirect_tqdm(), _quiet_engine_summaries():
        client = ChatClient(endpoint, sampling, probe_seeds=seeds[: max(endpoint.concurrency, MIN_PROBE_EPISODES)])
        # Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit, so an
        # interrupted run would linger until its requests in flight time out (--request-timeout, 120 s).
        workers = [
            threading.Thread(target=work, args=(client,), name=f"served-{n}", daemon=True)
            for n in range(min(endpoint.concurrency, len(seeds)))
        ]
        try:
            with tqdm(total=len(seeds), desc=f"eval {env_id} / {endpoint.model}", unit="episode", disable=not progress) as bar:
                for worker in workers:
                    worker.start()
                solved = failed = server_errors = 0
                for _ in seeds:
                    index, result = finished.get()
                    if isinstance(result, BaseException):
                        raise result
                    results[index] = outcome, usage = result
                    solved += outcome.success
                    failed += usage.transport_failure is not None
                    server_errors += usage.server_error is not None
                    bar.update(1)
                    bar.set_postfix(success=solved, transport_failures=failed, server_errors=server_errors, refresh=False)
                    if on_episode is not None:
                        on_episode(index, outcome, usage)
            for worker in workers:
                worker.join()  # each is closing its environment: the queue is empty
        except BaseException:
            # Threads still waiting on a request see `stop` (or their closed connection) and end; nobody waits for them.
            client.stop.set()
            raise
        finally:
            client.close()
    return ServedRun(
        outcomes=[result[0] for result in results],
        usage=[result[1] for result in results],
        counters=client.counters,
        server_identity=client.server,
        extra_body=dict(client.extra_body),
        max_answer_chars=client.max_answer_chars,
        max_response_bytes=client.max_response_bytes,
    )
