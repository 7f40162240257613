"""Token-in/token-out trajectories: what a rollout produced and what a learner trains on.

A `Trajectory` is one episode of an environment played by the policy (or by a model-free agent such
as the oracle expert), kept as the exact token ids the model saw and produced:

- A `Segment` is one dialogue: the prompt tokens of the chat template (system turn, the user's first
  message with its image placeholders expanded), then every response followed by the environment's
  next message, as concatenated token ids. GeneralPoints episodes are one dialogue; VIRL restarts the
  dialogue with a fresh prompt after every correct action, so its episodes hold one segment per
  decision point.
- ``turn_spans`` are the token ranges of the responses: the tokens the policy generated (including
  the stop token that ended a response, when the policy generated one). Prompt tokens, image
  placeholders, the environment's messages and a closing ``<|im_end|>`` the rollout appended itself
  (after a response cut off at ``max_new_tokens``, or ended by another stop token) lie outside them.
  The loss mask and the trainable positions are read from the spans, which are stored once.
- ``response_logprobs`` holds each response token's log-prob under the distribution it was drawn
  from (``log_softmax(logits / temperature)``, temperature 1 for greedy decoding), as recorded by
  `VLMPolicy.generate`, one per response token.
- Images are uint8 arrays stored once per trajectory, with their vision-tower inputs prepared once
  when the dialogue started (`Trajectory.image_inputs`); a segment names the one it shows by index.

Decoded text is never tokenised again to rebuild a trajectory: the policy's generated ids go in as
they came out, and the environment's messages are added with the encoder's follow-up tokens, whose
tokens are the chat template's own (`ChatEncoder.encode_follow_up`). The responses of a model-free agent (the expert) have no
sampled tokens; they are its text tokenised, followed by ``<|im_end|>``, all with loss mask 1 and no
sampling log-probs (``sampling_temperature is None``). Expert SFT examples are exactly such
trajectories (`amft_vlm.rollout.sft_data`).

`TrajectoryBuilder` is the one place where a dialogue becomes tokens; the rollout engine and the SFT
loader both use it, so the two produce identical trajectories for the same episode.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from agents.chat import Dialogue
from agents.policy import Generation, TokenSequence
from agents.vision_inputs import ImageInputs, ImageLike

if TYPE_CHECKING:
    from agents.policy import ChatEncoder


@dataclass(frozen=True, eq=False)
class Segment:
    """One dialogue of an episode as token ids, with its response turns and how they were sampled.

    The turns are stored once, as `turn_spans`; the loss mask and the trainable positions are read
    from them.

    Attributes:
        token_ids: the prompt, responses and environment messages (the ids `TokenSequence` takes as they are).
        turn_spans: ``(start, end)`` token index range of each response, in order.
        response_logprobs: ``(response tokens,)`` float32 tensor, each response token's log-prob under the
            sampling distribution, in order; 0 for responses not sampled from the policy (see
            `Trajectory.sampling_temperature`).
        image_index: index into `Trajectory.images` of the image this dialogue shows, or None.
    """

    token_ids: tuple[int, ...]
    turn_spans: tuple[tuple[int, int], ...]
    response_logprobs: torch.Tensor
    image_index: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.token_ids, tuple) or not all(type(token) is int for token in self.token_ids):
            raise ValueError(f"token_ids must be a tuple of ints (what TokenSequence takes); got {type(self.token_ids).__name__}")
        length = len(self.token_ids)
        if not self.turn_spans:
            raise ValueError("a segment needs at least one response turn")
        previous_end = 1  # a response never starts at token 0: a prompt comes first
        for start, end in self.turn_spans:
            if not previous_end <= start < end <= length:
                raise ValueError(f"turn spans must be non-empty, ordered and inside 1..{length}; got {self.turn_spans}")
            previous_end = end
        tokens = sum(end - start for start, end in self.turn_spans)
        if self.response_logprobs.dtype != torch.float32 or self.response_logprobs.shape != (tokens,):
            raise ValueError(
                f"response_logprobs must be a ({tokens},) float32 tensor (one per response token); got "
                f"{tuple(self.response_logprobs.shape)} {self.response_logprobs.dtype}"
            )
        if not torch.isfinite(self.response_logprobs).all():
            raise ValueError("response_logprobs must be finite")

    def __len__(self) -> int:
        return len(self.token_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segment):
            return NotImplemented
        return (
            self.turn_spans == other.turn_spans
            and self.image_index == other.image_index
            and self.token_ids == other.token_ids
            and torch.equal(self.response_logprobs, other.response_logprobs)
        )

    __hash__ = None  # type: ignore[assignment]  # a tensor inside; equality is by value

    @property
    def loss_mask(self) -> torch.Tensor:
        """``(len(self),)`` bool tensor, True exactly on response tokens."""
        mask = torch.zeros(len(self.token_ids), dtype=torch.bool)
        for start, end in self.turn_spans:
            mask[start:end] = True
        return mask

    @property
    def sampling_logprobs(self) -> torch.Tensor:
        """`response_logprobs` laid out over all ``(len(self),)`` tokens, 0 off the responses."""
        full = torch.zeros(len(self.token_ids), dtype=torch.float32)
        full[self.loss_mask] = self.response_logprobs
        return full

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
        return int(self.response_logprobs.shape[0])

    @property
    def trainable_positions(self) -> list[int]:
        """Indices of the response tokens: the ``target_positions`` of `VLMPolicy.token_logprobs`."""
        return [position for start, end in self.turn_spans for position in range(start, end)]

    def response_token_ids(self, turn: int) -> list[int]:
        """Token ids of the `turn`-th response of this dialogue."""
        start, end = self.turn_spans[turn]
        return list(self.token_ids[start:end])


@dataclass(frozen=True, eq=False)
class Trajectory:
    """One episode as token-in/token-out data, with its rewards and outcome.

    Attributes:
        segments: the episode's dialogues in order (one for GeneralPoints, one per decision point
            for VIRL).
        images: the observation images the segments show, uint8 ``H x W x 3`` arrays (read-only),
            each stored once.
        image_inputs: each image prepared for the vision tower (the same order as `images`), kept from
            when the trajectory was built so that scoring never processes an image again; empty when
            not prepared (then `token_sequences` prepares them with the encoder it is given).
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
    image_inputs: tuple[ImageInputs, ...] = ()

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
        if self.image_inputs and len(self.image_inputs) != len(self.images):
            raise ValueError(f"{len(self.image_inputs)} prepared image inputs for {len(self.images)} images")

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
    def token_digest(self) -> str:
        """A hash of the start state and every token id of the episode: two episodes with the same digest
        saw and produced the same tokens (what a run's ``rollout_digest`` and ``validation_digest`` combine)."""
        digest = hashlib.blake2b(str(self.seed).encode(), digest_size=16)
        for segment in self.segments:
            digest.update(np.asarray(segment.token_ids, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()

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

    @property
    def turn_lengths(self) -> list[int]:
        """Trainable tokens of each response turn, in order across segments."""
        return [end - start for segment in self.segments for start, end in segment.turn_spans]

    @property
    def image_input_bytes(self) -> int:
        """Bytes held by the prepared image inputs (0 when none are kept)."""
        return sum(inputs.pixel_values.nbytes + inputs.image_grid_thw.nbytes for inputs in self.image_inputs)

    def with_image_inputs(self, encoder: ChatEncoder) -> Trajectory:
        """This trajectory with its images' prepared inputs (itself when it has them, or no images)."""
        if not self.images or self.image_inputs:
            return self
        return dataclasses.replace(self, image_inputs=tuple(encoder.prepare_images([image]) for image in self.images))

    def without_image_inputs(self) -> Trajectory:
        """This trajectory keeping only its uint8 images (a quarter of the prepared inputs' memory at most)."""
        return dataclasses.replace(self, image_inputs=()) if self.image_inputs else self

    def token_sequences(self, encoder: ChatEncoder | None = None) -> list[TokenSequence]:
        """One `TokenSequence` per segment, with its prepared image, for teacher forcing.

        Pair them with ``[segment.trainable_positions for segment in trajectory.segments]`` in
        `VLMPolicy.token_logprobs`. The images come from `image_inputs`; only a trajectory built without
        them needs an `encoder` (a `ChatEncoder` or `VLMPolicy`), which then prepares each image once per call.
        """
        prepared = dict(enumerate(self.image_inputs))
        sequences = []
        for segment in self.segments:
            images = None
            if segment.image_index is not None:
                if segment.image_index not in prepared:
                    if encoder is None:
                        raise ValueError("this trajectory keeps no prepared images: pass the encoder that prepares them")
                    prepared[segment.image_index] = encoder.prepare_images([self.images[segment.image_index]])
                images = prepared[segment.image_index]
            sequences.append(TokenSequence(token_ids=segment.token_ids, images=images))
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
    from. Each image is prepared once, when its dialogue starts, and the trajectory keeps it
    (`Trajectory.image_inputs`).

    Args:
        encoder: the chat template, tokenizer and image processing (a `ChatEncoder`; a `VLMPolicy`,
            which holds one, works too). No model is needed.
        seed: the episode's ``reset`` seed.
        group: the episode's group id.
        env_id: the environment id.
        source: ``"policy"`` or the model-free agent's name.
        sampling_temperature: sampling temperature of generated responses (1.0 for greedy), or
            None for an agent's text responses.
    """

    def __init__(
        self,
        encoder: ChatEncoder,
        *,
        seed: int,
        group: int,
        env_id: str,
        source: str,
        sampling_temperature: float | None,
    ) -> None:
        self.encoder = encoder
        self.seed, self.group, self.env_id, self.source = seed, group, env_id, source
        self.sampling_temperature = sampling_temperature
        self._segments: list[Segment] = []
        self._images: list[np.ndarray] = []
        self._image_inputs: list[ImageInputs] = []
        self._rewards: list[float] = []
        self._token_ids: list[int] = []
        self._logprob_chunks: list[torch.Tensor] = []
        self._spans: list[tuple[int, int]] = []
        self._image_index: int | None = None
        self._open = False

    def start_dialogue(self, text: str, *, image: ImageLike | None = None, system: str | None = None) -> None:
        """Close the current dialogue (if any) and start one whose first user message is `text`."""
        self._close_segment()
        prompt = self.encoder.encode_dialogue(Dialogue.start(text, image=image, system=system))
        self._image_index = None
        if image is not None:
            self._images.append(_frozen_uint8_copy(image))
            self._image_inputs.append(prompt.images)
            self._image_index = len(self._images) - 1
        self._token_ids = list(prompt.token_ids)
        self._logprob_chunks = []
        self._spans = []
        self._open = True

    def prompt(self) -> TokenSequence:
        """The current dialogue's tokens so far, with its image: the prompt for the next response."""
        self._require_open()
        images = self._image_inputs[self._image_index] if self._image_index is not None else None
        return TokenSequence(token_ids=tuple(self._token_ids), images=images)

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
        token_ids = [*self.encoder.tokenize(text), self.encoder.end_of_turn_token_id]
        self._add_response(token_ids, torch.zeros(len(token_ids), dtype=torch.float32), reward)

    def add_user_message(self, text: str) -> None:
        """Append the environment's next message (and the assistant header after it), not trainable.

        A response that does not end with ``<|im_end|>`` (cut off at ``max_new_tokens``, or ended by
        another stop token) is closed first with an ``<|im_end|>`` that is not trainable either.
        """
        self._require_open()
        if not self._spans:
            raise RuntimeError("add_user_message before any response in this dialogue")
        closed = self._token_ids[-1] == self.encoder.end_of_turn_token_id
        self._token_ids.extend(self.encoder.encode_follow_up(text, close_assistant_turn=not closed))

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
            image_inputs=tuple(self._image_inputs),
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
        self._segments.append(
            Segment(
                token_ids=tuple(self._token_ids),
                turn_spans=tuple(self._spans),
                response_logprobs=torch.cat(self._logprob_chunks) if self._logprob_chunks else torch.zeros(0),
                image_index=self._image_index,
            )
        )
        self._open = False
