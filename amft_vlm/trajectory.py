"""Token-in/token-out trajectories: what a rollout produced and what a learner trains on.

A `Trajectory` is one episode of an environment played by the policy (or by a model-free agent such
as the oracle expert), kept as the exact token ids the model saw and produced:

- A `Segment` is one dialogue: the prompt tokens of the chat template (system turn, the user's first
  message with its image placeholders expanded), then every response followed by the environment's
  next message, as concatenated token ids. GeneralPoints episodes are one dialogue; VIRL restarts the
  dialogue with a fresh prompt after every correct action, so its episodes hold one segment per
  decision point.
- ``loss_mask`` is 1 exactly on response tokens: the tokens the policy generated (including the stop
  token that ended a response, when the policy generated one). Prompt tokens, image placeholders,
  the environment's messages and a closing ``<|im_end|>`` the rollout appended itself (after a
  response cut off at ``max_new_tokens``, or ended by another stop token) are 0.
- ``sampling_logprobs`` holds each response token's log-prob under the distribution it was drawn
  from (``log_softmax(logits / temperature)``, temperature 1 for greedy decoding), as recorded by
  `agents.vlm_policy.VLMPolicy.generate`; it is 0 wherever the mask is 0.
- Images are uint8 arrays stored once per trajectory; a segment names the one it shows by index.

Decoded text is never tokenised again to rebuild a trajectory: the policy's generated ids go in as
they came out, and the environment's messages are added with `VLMPolicy.encode_follow_up`, whose
tokens are the chat template's own. The responses of a model-free agent (the expert) have no
sampled tokens; they are its text tokenised, followed by ``<|im_end|>``, all with loss mask 1 and no
sampling log-probs (``sampling_temperature is None``). Expert SFT examples are exactly such
trajectories (`amft_vlm.sft_data`).

`TrajectoryBuilder` is the one place where a dialogue becomes tokens; the rollout engine and the SFT
loader both use it, so the two produce identical trajectories for the same episode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agents.chat import Dialogue
from agents.vision_inputs import ImageInputs, ImageLike
from agents.vlm_policy import Generation, TokenSequence, VLMPolicy


@dataclass(frozen=True, eq=False)
class Segment:
    """One dialogue of an episode as token ids, with what is trainable and how it was sampled.

    Attributes:
        token_ids: ``(length,)`` int64 tensor, the prompt, responses and environment messages.
        loss_mask: ``(length,)`` bool tensor, True exactly on response tokens (the spans in
            `turn_spans`).
        sampling_logprobs: ``(length,)`` float32 tensor, each response token's log-prob under the
            sampling distribution; 0 where `loss_mask` is False, and 0 everywhere for responses
            not sampled from the policy (see `Trajectory.sampling_temperature`).
        turn_spans: ``(start, end)`` token index range of each response, in order.
        image_index: index into `Trajectory.images` of the image this dialogue shows, or None.
    """

    token_ids: torch.Tensor
    loss_mask: torch.Tensor
    sampling_logprobs: torch.Tensor
    turn_spans: tuple[tuple[int, int], ...]
    image_index: int | None = None

    def __post_init__(self) -> None:
        length = self.token_ids.shape[0]
        checks = (
            ("token_ids", self.token_ids, torch.int64),
            ("loss_mask", self.loss_mask, torch.bool),
            ("sampling_logprobs", self.sampling_logprobs, torch.float32),
        )
        for name, tensor, dtype in checks:
            if tensor.dtype != dtype or tensor.shape != (length,):
                raise ValueError(
                    f"{name} must be a ({length},) {dtype} tensor; got {tuple(tensor.shape)} {tensor.dtype}"
                )
        if not self.turn_spans:
            raise ValueError("a segment needs at least one response turn")
        expected_mask = torch.zeros(length, dtype=torch.bool)
        previous_end = 1  # a response never starts at token 0: a prompt comes first
        for start, end in self.turn_spans:
            if not previous_end <= start < end <= length:
                raise ValueError(
                    f"turn spans must be non-empty, ordered and inside 1..{length}; got {self.turn_spans}"
                )
            expected_mask[start:end] = True
            previous_end = end
        if not torch.equal(self.loss_mask, expected_mask):
            raise ValueError("loss_mask must be True exactly on the turn spans")
        if not torch.isfinite(self.sampling_logprobs).all():
            raise ValueError("sampling_logprobs must be finite")
        if self.sampling_logprobs[~self.loss_mask].any():
            raise ValueError("sampling_logprobs must be 0 where loss_mask is False")

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segment):
            return NotImplemented
        return (
            self.turn_spans == other.turn_spans
            and self.image_index == other.image_index
            and torch.equal(self.token_ids, other.token_ids)
            and torch.equal(self.loss_mask, other.loss_mask)
            and torch.equal(self.sampling_logprobs, other.sampling_logprobs)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable tensors inside; equality is by value

    @property
    def num_turns(self) -> int:
        """Number of responses in this dialogue."""
        return len(self.turn_spans)

    @property
    def prompt_length(self) -> int:
        """Number of tokens before the first response."""
        return self.turn_spans[0][0]

    @property
    def num_response_tokens(self) -> int:
        """Number of trainable (response) tokens."""
        return int(self.loss_mask.sum())

    @property
    def trainable_positions(self) -> list[int]:
        """Indices of the response tokens: the ``target_positions`` of `VLMPolicy.token_logprobs`."""
        return [position for start, end in self.turn_spans for position in range(start, end)]

    def response_token_ids(self, turn: int) -> list[int]:
        """Token ids of the `turn`-th response of this dialogue."""
        start, end = self.turn_spans[turn]
        return self.token_ids[start:end].tolist()


@dataclass(frozen=True, eq=False)
class Trajectory:
    """One episode as token-in/token-out data, with its rewards and outcome.

    Attributes:
        segments: the episode's dialogues in order (one for GeneralPoints, one per decision point
            for VIRL).
        images: the observation images the segments show, uint8 ``H x W x 3`` arrays (read-only),
            each stored once.
        turn_rewards: the reward of each response, in order across segments.
        success: whether the episode was solved.
        seed: the ``reset`` seed of the episode.
        group: group id; episodes of one group started from the same seed (GRPO groups).
        env_id: the environment id, e.g. ``"GeneralPoints-v0"``.
        source: who answered: ``"policy"`` or a model-free agent's name (e.g. ``"expert"``).
        sampling_temperature: the temperature the responses were sampled at (1.0 for greedy
            decoding), i.e. the one to pass to `VLMPolicy.token_logprobs` to reproduce
            `Segment.sampling_logprobs`; None when the responses were not sampled from the policy
            (expert data), whose sampling log-probs are all 0.
    """

    segments: tuple[Segment, ...]
    images: tuple[np.ndarray, ...]
    turn_rewards: tuple[float, ...]
    success: bool
    seed: int
    group: int
    env_id: str
    source: str
    sampling_temperature: float | None

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a trajectory needs at least one segment")
        turns = sum(segment.num_turns for segment in self.segments)
        if turns != len(self.turn_rewards):
            raise ValueError(f"{turns} response turns but {len(self.turn_rewards)} turn rewards")
        for index, segment in enumerate(self.segments):
            if segment.image_index is not None and not 0 <= segment.image_index < len(self.images):
                raise ValueError(
                    f"segment {index} shows image {segment.image_index}; the trajectory has {len(self.images)}"
                )
        for image in self.images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"images must be uint8 HxWx3 arrays; got {image.dtype} {image.shape}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trajectory):
            return NotImplemented
        return (
            self._outcome() == other._outcome()
            and self.segments == other.segments
            and len(self.images) == len(other.images)
            and all(
                a.shape == b.shape and np.array_equal(a, b)
                for a, b in zip(self.images, other.images, strict=True)
            )
        )

    def _outcome(self) -> tuple:
        return (
            self.turn_rewards,
            self.success,
            self.seed,
            self.group,
            self.env_id,
            self.source,
            self.sampling_temperature,
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def episode_return(self) -> float:
        """Sum of the turn rewards."""
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        """Number of responses (environment steps) in the episode."""
        return len(self.turn_rewards)

    @property
    def has_sampling_logprobs(self) -> bool:
        """Whether `Segment.sampling_logprobs` hold the policy's sampling log-probs (not expert data)."""
        return self.sampling_temperature is not None

    @property
    def num_tokens(self) -> int:
        """Total number of tokens over all segments."""
        return sum(len(segment) for segment in self.segments)

    @property
    def num_response_tokens(self) -> int:
        """Number of trainable tokens: generated by the policy, or the expert's response tokens."""
        return sum(segment.num_response_tokens for segment in self.segments)

    def token_sequences(self, policy: VLMPolicy) -> list[TokenSequence]:
        """One `TokenSequence` per segment, with its image prepared by `policy`, for teacher forcing.

        Pair them with ``[segment.trainable_positions for segment in trajectory.segments]`` in
        `VLMPolicy.token_logprobs`. Each image is prepared once even if several segments show it.
        """
        prepared: dict[int, ImageInputs] = {}
        sequences = []
        for segment in self.segments:
            images = None
            if segment.image_index is not None:
                if segment.image_index not in prepared:
                    prepared[segment.image_index] = policy.prepare_images([self.images[segment.image_index]])
                images = prepared[segment.image_index]
            sequences.append(TokenSequence(token_ids=tuple(segment.token_ids.tolist()), images=images))
        return sequences


def _frozen_uint8_copy(image: ImageLike) -> np.ndarray:
    """A private read-only uint8 RGB copy, so an environment reusing its buffer cannot change it."""
    array = np.array(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8, copy=True)
    array.flags.writeable = False
    return array


class TrajectoryBuilder:
    """Builds a `Trajectory` turn by turn from dialogue events; the one place dialogues become tokens.

    Call `start_dialogue` at reset (and again whenever the environment restarts the dialogue), then
    for each answer `add_generation` (the policy's sample) or `add_text_response` (a model-free
    agent's text), then `add_user_message` with the environment's reply if the dialogue goes on, and
    `finish` at the end of the episode. `prompt` is the token sequence to generate the next response
    from; it reuses the segment's prepared image, so the image is processed once per dialogue.

    Args:
        policy: gives the chat template, tokenizer and image processing.
        seed: the episode's ``reset`` seed.
        group: the episode's group id.
        env_id: the environment id.
        source: ``"policy"`` or the model-free agent's name.
        sampling_temperature: sampling temperature of generated responses (1.0 for greedy), or
            None for an agent's text responses.
    """

    def __init__(
        self,
        policy: VLMPolicy,
        *,
        seed: int,
        group: int,
        env_id: str,
        source: str,
        sampling_temperature: float | None,
    ) -> None:
        self.policy = policy
        self.seed, self.group, self.env_id, self.source = seed, group, env_id, source
        self.sampling_temperature = sampling_temperature
        self._segments: list[Segment] = []
        self._images: list[np.ndarray] = []
        self._rewards: list[float] = []
        self._token_ids: list[int] = []
        self._logprob_chunks: list[torch.Tensor] = []
        self._spans: list[tuple[int, int]] = []
        self._image_index: int | None = None
        self._image_inputs: ImageInputs | None = None
        self._open = False

    def start_dialogue(self, text: str, *, image: ImageLike | None = None, system: str | None = None) -> None:
        """Close the current dialogue (if any) and start one whose first user message is `text`."""
        self._close_segment()
        prompt = self.policy.encode_dialogue(Dialogue.start(text, image=image, system=system))
        self._image_index = None
        if image is not None:
            self._images.append(_frozen_uint8_copy(image))
            self._image_index = len(self._images) - 1
        self._image_inputs = prompt.images
        self._token_ids = list(prompt.token_ids)
        self._logprob_chunks = [torch.zeros(len(self._token_ids), dtype=torch.float32)]
        self._spans = []
        self._open = True

    def prompt(self) -> TokenSequence:
        """The current dialogue's tokens so far, with its image: the prompt for the next response."""
        self._require_open()
        return TokenSequence(token_ids=tuple(self._token_ids), images=self._image_inputs)

    def add_generation(self, generation: Generation, reward: float) -> None:
        """Append the policy's generated tokens with their sampling log-probs, and their reward."""
        logprobs = generation.logprobs.detach().to(device="cpu", dtype=torch.float32)
        if logprobs.shape != (len(generation.token_ids),):
            raise ValueError(
                f"generation has {len(generation.token_ids)} tokens but {tuple(logprobs.shape)} log-probs"
            )
        self._add_response(generation.token_ids, logprobs, reward)

    def add_text_response(self, text: str, reward: float) -> None:
        """Append a model-free agent's response: its text tokenised plus ``<|im_end|>``, no log-probs.

        These tokens are what the chat template writes for an assistant turn with this text, so a
        policy trained on them learns to close its turn.
        """
        token_ids = [*self.policy.tokenize(text), self.policy.end_of_turn_token_id]
        self._add_response(token_ids, torch.zeros(len(token_ids), dtype=torch.float32), reward)

    def add_user_message(self, text: str) -> None:
        """Append the environment's next message (and the assistant header after it), not trainable.

        A response that does not end with ``<|im_end|>`` (cut off at ``max_new_tokens``, or ended by
        another stop token) is closed first with an ``<|im_end|>`` that is not trainable either.
        """
        self._require_open()
        if not self._spans:
            raise RuntimeError("add_user_message before any response in this dialogue")
        closed = self._token_ids[-1] == self.policy.end_of_turn_token_id
        follow_up = self.policy.encode_follow_up(text, close_assistant_turn=not closed)
        self._token_ids.extend(follow_up)
        self._logprob_chunks.append(torch.zeros(len(follow_up), dtype=torch.float32))

    def finish(self, *, success: bool) -> Trajectory:
        """Close the last dialogue and return the trajectory."""
        self._close_segment()
        return Trajectory(
            segments=tuple(self._segments),
            images=tuple(self._images),
            turn_rewards=tuple(self._rewards),
            success=bool(success),
            seed=self.seed,
            group=self.group,
            env_id=self.env_id,
            source=self.source,
            sampling_temperature=self.sampling_temperature,
        )

    @property
    def num_turns(self) -> int:
        """Responses added so far, over all dialogues."""
        return len(self._rewards)

    def _add_response(self, token_ids: Sequence[int], logprobs: torch.Tensor, reward: float) -> None:
        self._require_open()
        if not token_ids:
            raise ValueError("a response needs at least one token")
        start = len(self._token_ids)
        self._token_ids.extend(int(token) for token in token_ids)
        self._logprob_chunks.append(logprobs)
        self._spans.append((start, len(self._token_ids)))
        self._rewards.append(float(reward))

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("no open dialogue: call start_dialogue first")

    def _close_segment(self) -> None:
        if not self._open:
            return
        length = len(self._token_ids)
        loss_mask = torch.zeros(length, dtype=torch.bool)
        for start, end in self._spans:
            loss_mask[start:end] = True
        self._segments.append(
            Segment(
                token_ids=torch.tensor(self._token_ids, dtype=torch.int64),
                loss_mask=loss_mask,
                sampling_logprobs=torch.cat(self._logprob_chunks),
                turn_spans=tuple(self._spans),
                image_index=self._image_index,
            )
        )
        self._open = False
        self._image_inputs = None
