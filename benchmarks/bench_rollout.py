"""Rollout engine throughput (tiny Qwen2-VL on CPU, GeneralPoints-v0 language)

A tiny random Qwen2-VL checkpoint (`agents.tiny`, float32, CPU) plays GeneralPoints-v0 in language
modality, sampling at temperature 1 with up to 48 new tokens per response; the random model never
solves a hand, so every episode runs the full attempt budget (6 answers), which the benchmark checks
for every episode it times. The engine with 16 environments (one batched ``generate`` over all of
them per round) is compared with the engine with 1 environment and with the plain Hugging Face loop
a new user would write (`HuggingFaceLoop`), all measured in the same run.

The Hugging Face loop plays the same 48 episodes (same reset seeds) with 16 environments and the
same slot refilling as the engine (a finished episode's environment starts the next queued one
before the next round; every episode lasting 6 answers, both play three full waves of 16). Each
round it re-renders every active dialogue with the tokenizer's chat template (observation texts as
user turns, its earlier answers as assistant turns), runs one left-padded ``model.generate`` over
them with the engine's sampling law (``softmax(logits / T)``: ``do_sample=True``, ``top_k=0``,
``top_p=1``, no repetition penalty, the vision placeholders suppressed, passed as a complete
``GenerationConfig`` so the checkpoint's near-greedy defaults cannot fill anything in), decodes each
row up to its stop token and steps that environment with the text. Its generated tokens are counted
as the engine's response tokens are: up to and including the stop token, or ``max_new_tokens``.

"Outside the model" is the wall time not spent in the model's forward passes (timed with forward
hooks on the model, and around the engine's lean decode step, which runs the model's layers without
its ``forward``: `agents.policy.generation._decode_step`): environment steps, tokenisation, batching, and ``generate``'s own per-token
bookkeeping (sampling, stopping checks, cache copies); the engine's own share (wall time outside
``generate``) is listed too. The engine keeps each dialogue's key-value cache between its turns; the
same N=16 collection re-encoding every turn from scratch (``reuse_cache=False``) shows what that
saves. Torch runs on one thread: on a shared two-core machine that is faster and far steadier for a
model this small. Each setting is warmed up once, then the four settings are timed in turn,
`REPEATS` times (so a change in the machine's load hits all of them alike), and every figure is the
median over the repeats.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

from agents.policy import VLMPolicy, generation
from agents.tiny import build_tiny_model
from amft_vlm.rollout.engine import RolloutEngine
from amft_vlm.rollout.episode_metrics import OUT_OF_ATTEMPTS, EpisodeOutcome, RolloutStats
from benchmarks.common import Measurement

log = logging.getLogger(__name__)

ENV_ID = "GeneralPoints-v0"
ENV_KWARGS = {"modality": "language"}
MAX_NEW_TOKENS = 48
TEMPERATURE = 1.0
EPISODES = {1: 12, 16: 48}
"""Episodes timed per setting: N=1 plays 12 one after another, N=16 three waves of 16."""
REPEATS = 3
"""Timed collections per setting; the figures are medians over them."""
TARGET_SPEEDUP_OVER_N1 = 6.0
TARGET_SPEEDUP_OVER_HF = 4.0


class ForwardTimer:
    """Accumulates the wall time of a module's forward calls (forward pre-hook to forward hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._started = 0.0
        self._restore_step = None
        self._handles = [
            module.register_forward_pre_hook(self._start),
            module.register_forward_hook(self._stop),
        ]

    def _start(self, module: torch.nn.Module, args: tuple) -> None:
        self._started = time.perf_counter()

    def _stop(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        self.seconds += time.perf_counter() - self._started

    def time_decode_steps(self) -> None:
        """Count the engine's lean decode step (`agents.policy.generation._decode_step`, which runs the model's
        layers without its ``forward``) as forward time too; `remove` undoes it."""
        step = generation._decode_step

        def timed_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            started = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        generation._decode_step = timed_step
        self._restore_step = step

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        if self._restore_step is not None:
            generation._decode_step = self._restore_step


@dataclass(frozen=True)
class TimedRun:
    """One timed collection: its statistics and the share of its wall time outside model forward passes."""

    stats: RolloutStats
    outside_forward: float

    @property
    def outside_generate(self) -> float:
        """Share of the wall time outside ``generate`` calls."""
        return 1.0 - self.stats.generate_seconds / self.stats.wall_seconds

    @property
    def episodes_per_second(self) -> float:
        """Episodes per second of wall time."""
        return self.stats.episodes_per_second

    @property
    def tokens_per_second(self) -> float:
        """Generated (response) tokens per second of wall time."""
        return self.stats.response_tokens_per_second

    @property
    def percent_outside_forward(self) -> float:
        """`outside_forward` in percent."""
        return 100 * self.outside_forward

    @property
    def percent_outside_generate(self) -> float:
        """`outside_generate` in percent."""
        return 100 * self.outside_generate


@dataclass
class _Dialogue:
    """An episode in progress in one slot of the Hugging Face loop."""

    seed: int
    messages: list[dict[str, Any]]
    verdicts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    response_tokens: int = 0


class HuggingFaceLoop:
    """The plain Hugging Face rollout loop: chat template, one batched ``model.generate`` per round.

    What a new user writes without the engine: the checkpoint loaded with the Auto classes, every
    active dialogue re-rendered as a chat each round, ``generate`` over the left-padded batch, the
    new tokens decoded and fed to the environments. It keeps no cache between turns (``generate``
    starts each call from the token ids) and builds no trajectories.

    Args:
        checkpoint_dir: a Qwen-VL checkpoint (model, tokenizer, generation config).
        num_envs: environments played together.
    """

    def __init__(self, checkpoint_dir: str | Path, num_envs: int) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, padding_side="left")
        self.model = AutoModelForImageTextToText.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
        stop_ids = self.model.generation_config.eos_token_id
        self.stop_ids = frozenset([stop_ids] if isinstance(stop_ids, int) else stop_ids)
        config = self.model.config
        # The engine's law, every sampling field set: generate fills a field left unset from the model's
        # generation config, which is the checkpoint's near-greedy one until it is replaced below.
        self.sampling = GenerationConfig(
            do_sample=True,
            temperature=TEMPERATURE,
            top_k=0,
            top_p=1.0,
            typical_p=1.0,
            repetition_penalty=1.0,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.model.generation_config.pad_token_id,
            suppress_tokens=[config.image_token_id, config.video_token_id],
        )
        self.model.generation_config = self.sampling
        self.envs = [gym.make(ENV_ID, **ENV_KWARGS) for _ in range(num_envs)]

    def play(self, seeds: Sequence[int], *, sampling_seed: int) -> tuple[list[EpisodeOutcome], RolloutStats]:
        """Play one episode per reset seed; their outcomes (in seed order) and statistics, as `RolloutEngine.play`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sampling_seed)
            return self._run(seeds)

    def _run(self, seeds: Sequence[int]) -> tuple[list[EpisodeOutcome], RolloutStats]:
        start_time = time.perf_counter()
        queue = deque(enumerate(seeds))
        slots: list[tuple[int, _Dialogue] | None] = [None] * min(len(self.envs), len(seeds))
        outcomes: list[EpisodeOutcome | None] = [None] * len(seeds)
        response_tokens = total_tokens = generate_calls = 0
        generate_seconds = 0.0

        def refill(slot: int) -> None:
            slots[slot] = None
            if queue:
                index, seed = queue.popleft()
                observation, _ = self.envs[slot].reset(seed=seed)
                slots[slot] = index, _Dialogue(seed, [{"role": "user", "content": observation["text"]}])

        for slot in range(len(slots)):
            refill(slot)
        while active := [slot for slot, episode in enumerate(slots) if episode is not None]:
            inputs = self.tokenizer.apply_chat_template(
                [slots[slot][1].messages for slot in active],
                add_generation_prompt=True,
                padding=True,
                return_tensors="pt",
                return_dict=True,
            )
            generate_start = time.perf_counter()
            output = self.model.generate(**inputs, generation_config=self.sampling)
            generate_seconds += time.perf_counter() - generate_start
            generate_calls += 1
            prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
            new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
            for slot, tokens, prompt_length in zip(active, new_tokens, prompt_lengths, strict=True):
                index, episode = slots[slot]
                # A row that stopped early is padded with the pad id (itself a stop id) after its stop token.
                length = next((i + 1 for i, token in enumerate(tokens) if token in self.stop_ids), len(tokens))
                stopped = tokens[length - 1] in self.stop_ids
                # Special tokens inside the response are kept, as the engine keeps them.
                text = self.tokenizer.decode(tokens[: length - 1] if stopped else tokens[:length])
                observation, reward, terminated, truncated, info = self.envs[slot].step(text)
                episode.verdicts.append(info["verdict"])
                episode.rewards.append(float(reward))
                episode.response_tokens += length
                episode.messages.append({"role": "assistant", "content": text})
                if not (terminated or truncated):
                    episode.messages.append({"role": "user", "content": observation["text"]})
                    continue
                outcomes[index] = EpisodeOutcome(
                    episode.seed, tuple(episode.verdicts), tuple(episode.rewards), bool(info["success"])
                )
                response_tokens += episode.response_tokens
                total_tokens += prompt_length + length
                refill(slot)
        finished = [outcome for outcome in outcomes if outcome is not None]
        stats = RolloutStats.from_outcomes(
            finished,
            response_tokens=response_tokens,
            total_tokens=total_tokens,
            wall_seconds=time.perf_counter() - start_time,
            generate_seconds=generate_seconds,
            generate_calls=generate_calls,
        )
        return finished, stats

    def close(self) -> None:
        """Close the environments."""
        for env in self.envs:
            env.close()


def _check_episodes(setting: str, outcomes: Sequence[EpisodeOutcome], expected: int, attempts: int) -> None:
    """Raise unless all `expected` episodes ran the whole attempt budget unsolved, as a random model's must."""
    invalid = [
        outcome
        for outcome in outcomes
        if outcome.success or len(outcome.verdicts) != attempts + 1 or outcome.verdicts[-1] != OUT_OF_ATTEMPTS
    ]
    if len(outcomes) != expected or invalid:
        raise RuntimeError(
            f"{setting}: expected {expected} unsolved episodes of {attempts + 1} answers ending out of attempts; "
            f"got {len(outcomes)} episodes, {len(invalid)} otherwise (first: {invalid[:1]})"
        )


def _engine_collection(engine: RolloutEngine, timer: ForwardTimer, attempts: int) -> Callable[[], TimedRun]:
    """A function timing one collection of the engine's episodes (checked), after one warm-up collection."""
    episodes = EPISODES[engine.num_envs]
    engine.play(range(1000, 1000 + engine.num_envs), sampling_seed=1, progress=False)

    def collect() -> TimedRun:
        timer.seconds = 0.0
        outcomes, stats = engine.play(range(episodes), sampling_seed=0, progress=False)
        _check_episodes(f"engine N={engine.num_envs}", outcomes, episodes, attempts)
        return TimedRun(stats, 1.0 - timer.seconds / stats.wall_seconds)

    return collect


def _hugging_face_collection(loop: HuggingFaceLoop, timer: ForwardTimer, attempts: int) -> Callable[[], TimedRun]:
    """A function timing one collection of the Hugging Face loop (checked), after one warm-up collection."""
    num_envs = len(loop.envs)
    episodes = EPISODES[num_envs]
    loop.play(range(1000, 1000 + num_envs), sampling_seed=1)

    def collect() -> TimedRun:
        timer.seconds = 0.0
        outcomes, stats = loop.play(range(episodes), sampling_seed=0)
        _check_episodes(f"Hugging Face loop N={num_envs}", outcomes, episodes, attempts)
        return TimedRun(stats, 1.0 - timer.seconds / stats.wall_seconds)

    return collect


def _median(runs: Sequence[TimedRun], figure: str) -> float:
    """The median over `runs` of the `TimedRun` property named `figure`."""
    return statistics.median(getattr(run, figure) for run in runs)


def run() -> list[Measurement]:
    """Tokens/s against the Hugging Face loop and N=1, episodes/s, cache reuse and overhead shares at N=16."""
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        build_tiny_model("qwen2-vl", checkpoint_dir, seed=0)
        policy = VLMPolicy.from_pretrained(checkpoint_dir)
        hugging_face = HuggingFaceLoop(checkpoint_dir, num_envs=16)
    attempts = hugging_face.envs[0].unwrapped.max_attempts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine_timer, hugging_face_timer = ForwardTimer(policy.model), ForwardTimer(hugging_face.model)
    engine_timer.time_decode_steps()
    engines = {
        name: RolloutEngine(
            policy,
            ENV_ID,
            env_kwargs=ENV_KWARGS,
            num_envs=num_envs,
            temperature=TEMPERATURE,
            max_new_tokens=MAX_NEW_TOKENS,
            reuse_cache=reuse_cache,
        )
        for name, num_envs, reuse_cache in (("N=1", 1, True), ("N=16", 16, True), ("N=16 (no cache reuse)", 16, False))
    }
    try:
        collections = {name: _engine_collection(engine, engine_timer, attempts) for name, engine in engines.items()}
        collections["Hugging Face loop N=16"] = _hugging_face_collection(hugging_face, hugging_face_timer, attempts)
        runs: dict[str, list[TimedRun]] = {name: [] for name in collections}
        for repeat in range(REPEATS):
            for name, collect in collections.items():
                timed = collect()
                runs[name].append(timed)
                log.info(
                    "repeat %d, %s: %s; %.1f%% of wall time outside forward passes, %.1f%% outside generate",
                    repeat + 1,
                    name,
                    timed.stats.summary(),
                    timed.percent_outside_forward,
                    timed.percent_outside_generate,
                )
    finally:
        engine_timer.remove()
        hugging_face_timer.remove()
        for engine in engines.values():
            engine.close()
        hugging_face.close()
        torch.set_num_threads(threads)
    single, batched = runs["N=1"], runs["N=16"]
    uncached, baseline = runs["N=16 (no cache reuse)"], runs["Hugging Face loop N=16"]
    log.info(
        "engine N=16 / Hugging Face loop N=16 generated tokens/s, per repeat: %s",
        ", ".join(f"{e.tokens_per_second / h.tokens_per_second:.2f}x" for e, h in zip(batched, baseline, strict=True)),
    )
    tokens_vs_baseline = _median(batched, "tokens_per_second") / _median(baseline, "tokens_per_second")
    speedup = _median(batched, "episodes_per_second") / _median(single, "episodes_per_second")
    batched_outside = _median(batched, "percent_outside_forward")
    return [
        Measurement(
            name=f"engine, N=16 envs, generated tokens, vs the plain Hugging Face loop ({MAX_NEW_TOKENS} new tokens)",
            value=_median(batched, "tokens_per_second"),
            unit="tokens/s",
            baseline_name="chat template + model.generate, N=16",
            baseline_value=_median(baseline, "tokens_per_second"),
            target=f">= {TARGET_SPEEDUP_OVER_HF:g}x the Hugging Face loop",
            met=tokens_vs_baseline >= TARGET_SPEEDUP_OVER_HF,
        ),
        Measurement(
            name=f"engine, N=16 envs, {MAX_NEW_TOKENS} new tokens",
            value=_median(batched, "episodes_per_second"),
            unit="episodes/s",
            baseline_name="N=1",
            baseline_value=_median(single, "episodes_per_second"),
            target=f">= {TARGET_SPEEDUP_OVER_N1:g}x N=1",
            met=speedup >= TARGET_SPEEDUP_OVER_N1,
        ),
        Measurement(
            name="engine, N=16 envs, dialogue caches kept between turns",
            value=_median(batched, "episodes_per_second"),
            unit="episodes/s",
            baseline_name="every turn re-encoded",
            baseline_value=_median(uncached, "episodes_per_second"),
        ),
        Measurement(
            name="engine, N=16 envs, generated tokens",
            value=_median(batched, "tokens_per_second"),
            unit="tokens/s",
            baseline_name="N=1",
            baseline_value=_median(single, "tokens_per_second"),
        ),
        Measurement(
            name="engine, N=16 envs, wall time outside model forward passes",
            value=batched_outside,
            unit="%",
            baseline_name="N=1",
            baseline_value=_median(single, "percent_outside_forward"),
            target="< 15%",
            met=batched_outside < 15,
            lower_is_better=True,
        ),
        Measurement(
            name="Hugging Face loop, N=16 envs, wall time outside model forward passes",
            value=_median(baseline, "percent_outside_forward"),
            unit="%",
            lower_is_better=True,
        ),
        Measurement(
            name="engine, N=16 envs, wall time outside generate (the engine's own work)",
            value=_median(batched, "percent_outside_generate"),
            unit="%",
            baseline_name="N=1",
            baseline_value=_median(single, "percent_outside_generate"),
            lower_is_better=True,
        ),
    ]
