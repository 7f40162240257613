"""The rollout engine: the one loop that plays episodes, for every responder (the policy, agents, served models).

`RolloutEngine` keeps ``num_envs`` environments (slots) and a queue of episodes. Each round every
active slot gets an answer, its environment is stepped with it, and what happened is recorded. A slot
whose episode ends is given the next queued episode (``reset``) before the next round, so every
answer belongs to a live episode and no batch row is spent on a finished one. Episodes run multi-turn
until the environment ends them (its attempt budget); when the environment restarts the dialogue
(VIRL, ``info["new_dialogue"]``), the record starts a new dialogue with the fresh prompt and image.
Training rollouts, the trainer's expert data, evaluation, ``amft-vlm play`` and ``amft-vlm collect``
all play through this loop.

Who answers. A responder (`agents.responder.Responder`) answers the active slots' dialogues in one
batch per round: the engine's policy by default (its `agents.policy.PolicyResponder` with the
engine's sampling settings, one batched, left-padded ``generate`` call per round), a model-free
agent (`agents.base.Agent`, e.g. the oracle `ExpertAgent`; no model is called) or a served model
(`amft_vlm.evaluation.served.ServedResponder`). Each answer comes back as a future: a slot whose answer is in
is stepped at once, and a slot that needs an answer gets it asked for in the next batch, so a
responder answering in the background (a served model) never has a row wait for the slowest one,
while one that answers in the call (the policy, an agent) is played round by round.

What is recorded. An engine with a policy records token trajectories
(`amft_vlm.rollout.trajectory.TrajectoryBuilder`: the policy's generated ids as they came out, an agent's
answers tokenised as expert SFT examples are, the environment's replies as chat-template tokens). An
engine without one, ``RolloutEngine(None, env)``, needs no model, tokenizer or transformers at all
(``amft-vlm play``, ``collect`` and ``eval --agent`` stay fast) and records each episode as text
dialogues (`RecordedDialogue`: the `Dialogue` and the reward of each answer). Either way every
episode also yields an `EpisodeOutcome` (each answer's ``info["verdict"]`` and reward, and
``info["success"]``), from which `RolloutStats` and every metric are computed
(`amft_vlm.rollout.episode_metrics.compute_metrics`). A responder that cannot answer a request
(`agents.responder.NoAnswer`) ends its episode there, unsolved, with the verdict it names.

Why ``policy=None`` and not a second class: the two modes differ only in who answers and in the
recorder; the queue, the slots, the seeds, the ``new_dialogue`` rule and the outcome records are one
piece of code, and ``None`` says exactly what is missing. A policy-free engine answers only through a
text responder and records only text; ``collect`` (token trajectories) needs a policy.

Episodes and groups. ``play(seeds, group_size=G)`` (and ``collect``) plays G episodes per seed, all
reset with that seed (the same start state) and sharing a group id (the seed's position in `seeds`),
as GRPO needs. Outcomes and trajectories come back in queue order (seed by seed, G each) whatever
slot played them; ``on_episode`` sees each episode once it has ended and the next batch of requests
is out (so a callback that waits never holds back the requests of the other slots).

Randomness. Environments draw only from their ``reset`` seed and the answers. With
``sampling_seed=s`` each policy episode draws its tokens from its own generator, seeded by
``(s, reset seed, place in its group)``: a collection is then reproducible for the same policy and
seeds whatever ``num_envs``, batch neighbours or process split plays it (up to float differences
between batch shapes, which move a token only when a draw falls within rounding of a boundary).
The G episodes of a group have different places, so they differ when sampling (and are identical
when greedy). Without a sampling seed, tokens come from torch's global generator. A model-free
agent that draws from its own generator (the random baselines) is asked in slot order, so its
episodes depend on ``num_envs``; ``collect``, ``play`` and ``eval`` play agents with one environment,
episode after episode.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from agents.chat import Dialogue
from agents.responder import Answer, NoAnswer, Request, Responder
from amft_vlm.rollout.episode_metrics import EpisodeOutcome, RolloutStats

if TYPE_CHECKING:
    from agents.policy import DialogueCache, VLMPolicy
    from agents.vision_inputs import ImageLike
    from amft_vlm.rollout.trajectory import Trajectory, TrajectoryBuilder

logger = logging.getLogger(__name__)

POLICY_SOURCE = "policy"
"""`Trajectory.source` of trajectories sampled from the policy."""


@dataclass(frozen=True)
class EpisodeSpec:
    """One queued episode: the ``reset`` seed, the group it belongs to and its place in the group."""

    seed: int
    group: int
    member: int = 0


@dataclass(frozen=True)
class RecordedDialogue:
    """One dialogue of an episode played without a policy: its text turns (and image), and each answer's reward."""

    dialogue: Dialogue
    rewards: tuple[float, ...]


@dataclass(frozen=True)
class Episode:
    """One finished episode, as `RolloutEngine.play` hands it to ``on_episode``.

    Attributes:
        index: its place in the queue (group ``index // group_size``, member ``index % group_size``).
        group: its group id (the position of its seed in the seeds played).
        outcome: each answer's verdict and reward, and success: what the metrics are computed from.
        trajectory: the episode as tokens, from an engine with a policy; None without one.
        dialogues: the episode as text dialogues, from an engine without a policy; empty with one.
    """

    index: int
    group: int
    outcome: EpisodeOutcome
    trajectory: Trajectory | None = None
    dialogues: tuple[RecordedDialogue, ...] = ()


class DialogueRecorder:
    """Records an episode as text dialogues, with each answer's reward: the record of an engine without a policy.

    It has the methods of `TrajectoryBuilder` that a text answer needs, so the engine's loop drives both
    the same way. The engine keeps one for every episode: its dialogue so far is what a text responder
    is asked (`agents.responder.Request.dialogue`).
    """

    def __init__(self) -> None:
        self._finished: list[RecordedDialogue] = []
        self._dialogue: Dialogue | None = None
        self._rewards: list[float] = []

    def start_dialogue(self, text: str, *, image: ImageLike | None = None) -> None:
        """Close the current dialogue (if any) and start one whose first user message is `text`."""
        self._close()
        self._dialogue, self._rewards = Dialogue.start(text, image=image), []

    def add_text_response(self, text: str, reward: float) -> None:
        """Append an answer and its reward."""
        self._dialogue = self._dialogue.with_assistant(text)
        self._rewards.append(reward)

    def add_user_message(self, text: str) -> None:
        """Append the environment's next message."""
        self._dialogue = self._dialogue.with_user(text)

    @property
    def dialogue(self) -> Dialogue | None:
        """The dialogue in progress (None before the first and after `finish`)."""
        return self._dialogue

    def finish(self) -> tuple[RecordedDialogue, ...]:
        """Close the last dialogue and return all of them."""
        self._close()
        return tuple(self._finished)

    def _close(self) -> None:
        if self._dialogue is not None:
            self._finished.append(RecordedDialogue(self._dialogue, tuple(self._rewards)))
            self._dialogue = None


def record_environment_message(
    recorder: TrajectoryBuilder | DialogueRecorder, observation: dict[str, Any], info: dict[str, Any]
) -> bool:
    """Record the environment's next message after an answer; returns whether it starts a new dialogue.

    The message is a reply in the same dialogue, unless the environment restarts the dialogue (VIRL after
    a correct action, ``info["new_dialogue"]``): then it is a fresh prompt (and image).
    """
    if info.get("new_dialogue", False):
        recorder.start_dialogue(observation["text"], image=observation.get("image"))
        return True
    recorder.add_user_message(observation["text"])
    return False


@dataclass
class _Episode:
    """An episode in progress in one slot."""

    index: int
    spec: EpisodeSpec
    dialogue: DialogueRecorder
    """The episode as text: what a text responder answers, and the record of an engine without a policy."""
    tokens: TrajectoryBuilder | None
    """The episode as tokens, from an engine with a policy: what a token responder answers, and its record."""
    observation: dict[str, Any]
    verdicts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    cache: DialogueCache | None = None
    generator: torch.Generator | None = None
    """Where its tokens are drawn from (with a sampling seed), whatever else shares the batch."""


class RolloutEngine:
    """Plays batches of episodes of ``num_envs`` environments, answered by a `VLMPolicy` or any other responder.

    Args:
        policy: the policy whose tokenizer and image processor build the token records, and which
            answers when ``play`` is given no other responder; None for an engine that plays only text
            responders (model-free agents, served models) and records text (see the module docstring).
        env: an environment id for ``gym.make`` (e.g. ``"GeneralPoints-v0"``) or a function returning a
            new environment.
        env_kwargs: ``gym.make`` keyword arguments when `env` is an id, e.g. ``{"modality": "language"}``.
        num_envs: environments played together; each batch of requests has up to this many.
        temperature: the policy's sampling temperature (ignored when `greedy`).
        max_new_tokens: the most tokens per policy response; a longer response is cut off and closed
            with a non-trainable ``<|im_end|>`` before the environment's reply.
        greedy: the policy takes the arg-max token instead of sampling.
        reuse_cache: keep each dialogue's attention keys and values between its turns, so a turn's
            prefill runs only over the environment's reply instead of the whole dialogue; costs the
            memory of one cache per slot. Off gives the same trajectories (up to float rounding).

    Example:
        >>> engine = RolloutEngine(policy, "GeneralPoints-v0", env_kwargs={"modality": "language"}, num_envs=16)
        >>> trajectories, stats = engine.collect(range(64), group_size=4, sampling_seed=0)
        >>> outcomes, stats = RolloutEngine(None, "VIRL-v0").play(range(8), responder=ExpertAgent())
    """

    def __init__(
        self,
        policy: VLMPolicy | None,
        env: str | Callable[[], gym.Env],
        *,
        env_kwargs: dict[str, Any] | None = None,
        num_envs: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        greedy: bool = False,
        reuse_cache: bool = True,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be at least 1; got {num_envs}")
        if isinstance(env, str):
            env_id, kwargs = env, dict(env_kwargs or {})
            self._make_env: Callable[[], gym.Env] = lambda: gym.make(env_id, **kwargs)
        elif env_kwargs:
            raise ValueError("env_kwargs only apply to an environment id; bind them in your env function")
        else:
            self._make_env = env
        # The policy's own responder; building it validates the settings now rather than at the first round.
        self.policy_responder: Responder | None = None
        if policy is not None:
            self.policy_responder = policy.responder(
                temperature=temperature, max_new_tokens=max_new_tokens, greedy=greedy, keep_cache=reuse_cache
            )
        self.policy = policy
        self.reuse_cache = reuse_cache
        self.num_envs = num_envs
        self.temperature, self.max_new_tokens, self.greedy = temperature, max_new_tokens, greedy
        self.envs: list[gym.Env] = []

    @property
    def sampling_temperature(self) -> float:
        """The temperature of the policy's sampling distribution (1.0 for greedy decoding)."""
        return 1.0 if self.greedy else self.temperature

    def play(
        self,
        seeds: Sequence[int],
        *,
        group_size: int = 1,
        responder: Responder | None = None,
        sampling_seed: int | None = None,
        progress: bool = True,
        on_episode: Callable[[Episode], None] | None = None,
    ) -> tuple[list[EpisodeOutcome], RolloutStats]:
        """Play `group_size` episodes per seed; return each episode's outcome and the statistics.

        Args:
            seeds: ``reset`` seeds; seed ``seeds[i]`` gives group ``i``.
            group_size: episodes per seed (G of GRPO).
            responder: who answers (`agents.responder.Responder`): a model-free agent (e.g.
                `ExpertAgent`), a served model, another token responder; None for the engine's policy.
                Required by an engine without a policy.
            sampling_seed: seeds torch's generator for this collection (the caller's state is
                restored afterwards) and gives each episode its own token generator; None samples
                from the current state. Only for an engine with a policy.
            progress: show a progress bar over episodes.
            on_episode: called with every `Episode` (outcome and record) as it ends, in the order
                episodes end (queue order with one environment); the engine keeps no record itself,
                so a long collection can be written out episode by episode.

        Returns:
            The outcomes in queue order (``seeds[0]`` x `group_size`, then ``seeds[1]``, ...) and the
            collection's statistics.
        """
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1; got {group_size}")
        if self.policy is None and responder is None:
            raise ValueError("an engine without a policy needs a responder: a model-free agent or a served model to answer")
        if self.policy is None and sampling_seed is not None:
            raise ValueError("sampling_seed seeds the policy's sampling; an engine without a policy samples nothing")
        responder = self.policy_responder if responder is None else responder
        if responder.answers_in_tokens and self.policy is None:
            raise ValueError(f"{responder.name} answers token prompts; play it in an engine with a policy to encode them")
        specs = [
            EpisodeSpec(seed=int(seed), group=group, member=member)
            for group, seed in enumerate(seeds)
            for member in range(group_size)
        ]
        if self.policy is None:
            return self._run(specs, responder, progress=progress, on_episode=on_episode)
        device = self.policy.device
        fork_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices, enabled=sampling_seed is not None):
            if sampling_seed is not None:
                torch.manual_seed(sampling_seed)
            return self._run(specs, responder, progress=progress, on_episode=on_episode, sampling_seed=sampling_seed)

    def collect(
        self,
        seeds: Sequence[int],
        *,
        group_size: int = 1,
        responder: Responder | None = None,
        sampling_seed: int | None = None,
        progress: bool = True,
    ) -> tuple[list[Trajectory], RolloutStats]:
        """Play `group_size` episodes per seed and return their token trajectories and statistics.

        Args:
            seeds: ``reset`` seeds; seed ``seeds[i]`` gives group ``i``.
            group_size: episodes per seed (G of GRPO).
            responder: who answers instead of the policy (e.g. `ExpertAgent`); None for the policy.
            sampling_seed: seeds torch's generator for this collection (the caller's state is
                restored afterwards); None samples from the current state.
            progress: show a progress bar over episodes.

        Returns:
            The trajectories in queue order (``seeds[0]`` x `group_size`, then ``seeds[1]``, ...) and
            the collection's statistics.
        """
        if self.policy is None:
            raise ValueError("collect returns token trajectories and needs a policy; play model-free agents with play()")
        episodes: list[Episode] = []
        _, stats = self.play(
            seeds, group_size=group_size, responder=responder, sampling_seed=sampling_seed, progress=progress, on_episode=episodes.append
        )
        episodes.sort(key=lambda episode: episode.index)
        return [episode.trajectory for episode in episodes], stats

    def close(self) -> None:
        """Close the environments."""
        for env in self.envs:
            env.close()
        self.envs = []

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(
        self,
        specs: list[EpisodeSpec],
        responder: Responder,
        *,
        progress: bool,
        on_episode: Callable[[Episode], None] | None,
        sampling_seed: int | None = None,
    ) -> tuple[list[EpisodeOutcome], RolloutStats]:
        start_time = time.perf_counter()
        while len(self.envs) < min(self.num_envs, len(specs)):
            self.envs.append(self._make_env())
        queue = deque(enumerate(specs))
        outcomes: list[EpisodeOutcome | None] = [None] * len(specs)
        slots: list[_Episode | None] = [None] * min(len(self.envs), len(specs))
        pending: dict[int, Future[Answer]] = {}
        source = POLICY_SOURCE if responder is self.policy_responder else responder.name
        env_id = self._env_id(0) if self.envs else ""
        generate_seconds, generate_calls, finished, successes = 0.0, 0, 0, 0
        response_tokens, total_tokens = 0, 0

        def refill(slot: int) -> None:
            slots[slot] = self._start_episode(slot, *queue.popleft(), source, responder, sampling_seed) if queue else None

        with tqdm(total=len(specs), desc=f"rollout {env_id} / {source}", unit="episode", disable=not progress) as bar:
            for slot in range(len(slots)):
                refill(slot)
            ended: list[Episode] = []
            while True:
                # One batch of requests: every active slot that is not waiting for an answer already.
                asking = [slot for slot, episode in enumerate(slots) if episode is not None and slot not in pending]
                if asking:
                    respond_start = time.perf_counter()
                    answers = responder.respond([self._request(slot, slots[slot]) for slot in asking])
                    if responder.answers_in_tokens:
                        generate_seconds += time.perf_counter() - respond_start
                        generate_calls += 1
                    pending.update(zip(asking, answers, strict=True))
                # Report the episodes that ended only now, once the next requests are out: a callback that waits
                # (an interrupted evaluation's) holds no other slot's request back.
                for episode in ended:
                    if episode.trajectory is not None:
                        response_tokens += episode.trajectory.num_response_tokens
                        total_tokens += episode.trajectory.num_tokens
                    if on_episode is not None:
                        on_episode(episode)
                    finished += 1
                    successes += episode.outcome.success
                    bar.set_postfix(success=f"{successes / finished:.0%}", refresh=False)
                    bar.update(1)
                if not pending:
                    break
                ready = [slot for slot in sorted(pending) if pending[slot].done()]
                if not ready:
                    wait(pending.values(), return_when=FIRST_COMPLETED)
                    ready = [slot for slot in sorted(pending) if pending[slot].done()]
                # Step every answered environment; a finished slot starts its next episode before the next batch.
                ended = []
                for slot in ready:
                    episode = self._step(slot, slots[slot], pending.pop(slot).result())
                    if episode is not None:
                        outcomes[episode.index] = episode.outcome
                        ended.append(episode)
                        refill(slot)
        played = [outcome for outcome in outcomes if outcome is not None]
        stats = RolloutStats.from_outcomes(
            played,
            response_tokens=response_tokens,
            total_tokens=total_tokens,
            wall_seconds=time.perf_counter() - start_time,
            generate_seconds=generate_seconds,
            generate_calls=generate_calls,
        )
        logger.info("rollout %s (%s): %s", env_id, source, stats.summary())
        return played, stats

    def _env_id(self, slot: int) -> str:
        env = self.envs[slot]
        return env.spec.id if env.spec is not None else type(env.unwrapped).__name__

    def _start_episode(
        self, slot: int, index: int, spec: EpisodeSpec, source: str, responder: Responder, sampling_seed: int | None = None
    ) -> _Episode:
        observation, _ = self.envs[slot].reset(seed=spec.seed)
        tokens, generator = None, None
        if self.policy is not None:
            # Imported here: it loads transformers, which only an engine with a policy needs.
            from amft_vlm.rollout.trajectory import TrajectoryBuilder

            tokens = TrajectoryBuilder(
                self.policy.encoder,
                seed=spec.seed,
                group=spec.group,
                env_id=self._env_id(slot),
                source=source,
                sampling_temperature=responder.sampling_temperature if responder.answers_in_tokens else None,
            )
            tokens.start_dialogue(observation["text"], image=observation.get("image"))
            if sampling_seed is not None:
                # Seeded by (sampling seed, reset seed, place in group) alone: the same draws whichever slot,
                # batch, num_envs or process plays the episode.
                state = np.random.SeedSequence([sampling_seed, spec.seed, spec.member]).generate_state(1)[0]
                generator = torch.Generator().manual_seed(int(state))
        dialogue = DialogueRecorder()
        dialogue.start_dialogue(observation["text"], image=observation.get("image"))
        return _Episode(index=index, spec=spec, dialogue=dialogue, tokens=tokens, observation=observation, generator=generator)

    def _request(self, slot: int, episode: _Episode) -> Request:
        """What the responder is asked for `slot`'s episode: its dialogue so far, as text and (with a policy) as tokens."""
        return Request(
            episode=episode.index,
            seed=episode.spec.seed,
            member=episode.spec.member,
            turn=len(episode.rewards),
            dialogue=episode.dialogue.dialogue,
            observation=episode.observation,
            env=self.envs[slot],
            prompt=None if episode.tokens is None else episode.tokens.prompt(),
            cache=episode.cache,
            generator=episode.generator,
        )

    def _step(self, slot: int, episode: _Episode, answer: Answer) -> Episode | None:
        """Step `slot`'s environment with `answer`; the finished `Episode` if the episode ended, else None."""
        if isinstance(answer, NoAnswer):
            if episode.tokens is not None:
                raise ValueError(f"an engine recording tokens cannot record an unanswered turn ({answer.reason})")
            episode.verdicts.append(answer.verdict)
            episode.rewards.append(0.0)
            return self._finish(episode, success=False)
        text = answer if isinstance(answer, str) else answer.text
        observation, reward, terminated, truncated, info = self.envs[slot].step(text)
        episode.verdicts.append(str(info.get("verdict", "")))
        episode.rewards.append(float(reward))
        episode.dialogue.add_text_response(text, float(reward))
        if episode.tokens is not None:
            if isinstance(answer, str):
                episode.tokens.add_text_response(answer, float(reward))
            else:
                episode.tokens.add_generation(answer, float(reward))
        if terminated or truncated:
            return self._finish(episode, success=bool(info.get("success", False)))
        new_dialogue = record_environment_message(episode.dialogue, observation, info)
        if episode.tokens is not None:
            record_environment_message(episode.tokens, observation, info)
        # A new dialogue shares no attention keys and values with the last one.
        episode.cache = None if isinstance(answer, str) or new_dialogue else answer.cache
        episode.observation = observation
        return None

    def _finish(self, episode: _Episode, *, success: bool) -> Episode:
        outcome = EpisodeOutcome(episode.spec.seed, tuple(episode.verdicts), tuple(episode.rewards), success)
        if episode.tokens is None:
            return Episode(episode.index, episode.spec.group, outcome, dialogues=episode.dialogue.finish())
        return Episode(episode.index, episode.spec.group, outcome, trajectory=episode.tokens.finish(success=success))
