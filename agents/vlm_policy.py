"""A vision-language model as a policy: token-in/token-out generation and teacher-forced log-probs.

`VLMPolicy` wraps a Hugging Face image-text-to-text model of the Qwen-VL family (Qwen2-VL, Qwen2.5-VL,
or a tiny checkpoint from `agents.tiny`) with its tokenizer and (PIL) image processor, and offers what a
rollout engine and a learner need:

- `VLMPolicy.encode_dialogue`: a `Dialogue` to prompt tokens with the model's chat template, the image
  placeholder expanded to one ``<|image_pad|>`` per merged patch, plus the pixel inputs.
- `VLMPolicy.encode_follow_up`: the exact tokens the chat template puts after the assistant's
  end-of-turn token for the next user message, so multi-turn trajectories are built by concatenating
  token ids and never by re-tokenising decoded text.
- `VLMPolicy.generate`: one batched, left-padded ``model.generate`` with explicit sampling settings,
  returning each sequence's generated tokens with their log-probs under the sampling distribution.
- `VLMPolicy.token_logprobs`: a teacher-forced forward pass over full sequences that reproduces those
  log-probs (the importance ratio of an on-policy sample is 1 up to float error).

Placeholder tokens. The model's forward treats every ``<|image_pad|>`` / ``<|video_pad|>`` in its input
as a slot for vision features, so a response containing one could not be scored by teacher forcing.
Both `generate` and `token_logprobs` therefore give these tokens probability 0 (logit ``-inf``); a
trained model never emits them anyway, a random one would.

Positions. Qwen-VL uses multimodal rope: three position rows (time, height, width) that advance
together on text and follow the patch grid on image tokens. With left padding, positions must ignore
the padding: `generate` lets the model compute them from the attention mask (``get_rope_index`` on
the prompt, then +1 per generated token), and `token_logprobs` computes them with the same
``get_rope_index`` over the attention mask of the full sequence, which yields the same numbers for
every real token (checked by ``tests/agents/test_vlm_policy.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from agents.chat import Dialogue
from agents.vision_inputs import ImageInputs, ImageLike, default_pixel_bounds, prepare_images

logger = logging.getLogger(__name__)

END_OF_TURN_TOKEN = "<|im_end|>"
"""The token that closes every chat turn in Qwen's ChatML template."""

IMAGE_TOKEN = "<|image_pad|>"
"""Qwen's image placeholder token; the chat template writes one per image, the policy expands it."""

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Unique text standing in for an assistant response while locating the follow-up suffix in a
# rendered chat; it contains no template syntax and no special token.
_RESPONSE_PLACEHOLDER = "RESPONSE-PLACEHOLDER-7f3a"


@dataclass(frozen=True)
class TokenSequence:
    """Token ids of one model input (a prompt or a whole trajectory) with the images it shows.

    Attributes:
        token_ids: token ids; each image occupies ``ImageInputs.num_image_tokens`` consecutive
            ``<|image_pad|>`` ids.
        images: the vision inputs of the images in the order they appear, or ``None``.
    """

    token_ids: tuple[int, ...]
    images: ImageInputs | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def extended(self, token_ids: Sequence[int]) -> TokenSequence:
        """This sequence followed by `token_ids` (text only; the images are shared, not copied)."""
        return TokenSequence(
            token_ids=(*self.token_ids, *(int(token) for token in token_ids)), images=self.images
        )


@dataclass(frozen=True)
class Generation:
    """One generated response.

    Attributes:
        token_ids: generated token ids; ends with the stop token (``<|im_end|>`` or eos) when
            `finished`, otherwise it is ``max_new_tokens`` long.
        logprobs: ``(len(token_ids),)`` float32 tensor, log-prob of each token under the distribution
            it was drawn from: ``log_softmax(logits / temperature)``, with temperature 1 for greedy.
        text: decoded response without the final stop token (special tokens inside are kept).
        finished: whether generation stopped at a stop token rather than at ``max_new_tokens``.
    """

    token_ids: list[int]
    logprobs: torch.Tensor
    text: str
    finished: bool


@dataclass
class PaddedBatch:
    """A left-padded model batch built from `TokenSequence` objects.

    Attributes:
        input_ids: ``(batch, length)`` token ids, padding on the left.
        attention_mask: ``(batch, length)``, 1 on real tokens, 0 on padding.
        mm_token_type_ids: ``(batch, length)``, 1 on image tokens, 2 on video tokens, 0 elsewhere
            (what Qwen-VL's rope index needs to find the images).
        images: all images of the batch concatenated in sequence order, or ``None``.
        pad_lengths: number of padding tokens in front of each sequence.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    images: ImageInputs | None
    pad_lengths: list[int]

    def model_inputs(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's ``forward`` / ``generate``."""
        inputs = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
        }
        if self.images is not None:
            inputs["pixel_values"] = self.images.pixel_values.to(dtype)
            inputs["image_grid_thw"] = self.images.image_grid_thw
        return inputs


class _SampledTokenLogprobs(LogitsProcessor):
    """Records ``log_softmax(logits / temperature)[token]`` for every token `generate` picks.

    Placed in ``logits_processor``, it runs after generate's token suppression and before its warpers
    (temperature), so it sees the next-token logits with the suppressed tokens at ``-inf``. It keeps
    only the previous step's log-probs, ``O(batch * vocab)`` memory, and reads the token chosen from
    them at the next call (or in `finish` for the last step).
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self._previous_logprobs: torch.Tensor | None = None
        self._chosen_logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._previous_logprobs is not None:
            self._record(input_ids[:, -1])
        self._previous_logprobs = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _record(self, chosen: torch.Tensor) -> None:
        previous = self._previous_logprobs
        self._chosen_logprobs.append(previous.gather(1, chosen.to(previous.device)[:, None]).squeeze(1))

    def finish(self, sequences: torch.Tensor, num_generated: int) -> torch.Tensor:
        """``(batch, num_generated)`` log-probs, once generate has returned `sequences`."""
        if num_generated > 0:
            self._record(sequences[:, -1])
        if len(self._chosen_logprobs) != num_generated:
            raise RuntimeError(
                f"recorded {len(self._chosen_logprobs)} sampling steps for {num_generated} generated tokens"
            )
        if num_generated == 0:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self._chosen_logprobs, dim=1).cpu()


class VLMPolicy:
    """A Qwen-VL-family chat model acting as a policy over token sequences.

    Build it with `from_pretrained`. Attributes worth knowing: `end_of_turn_token_id` (``<|im_end|>``),
    `stop_token_ids` (end of turn and eos ids), `pad_token_id`, `image_token_id`,
    `suppressed_token_ids` (the vision placeholders, never generated), `min_pixels` / `max_pixels`.

    The constructor replaces the model's ``generation_config`` with a neutral one (only bos/eos/pad
    ids) and keeps the checkpoint's in `checkpoint_generation_config`: Instruct checkpoints ship
    near-greedy sampling defaults (``top_k=1``, ``top_p=0.001``, ``repetition_penalty=1.05``) that
    ``generate`` merges into every call for each setting the call leaves unset. `generate` also sets
    every sampling setting explicitly, so either measure alone keeps them out.

    Args:
        model: a Hugging Face image-text-to-text model of the Qwen-VL family.
        tokenizer: its tokenizer, with a chat template.
        image_processor: its Qwen2-VL image processor (the PIL one works without torchvision).
        min_pixels: smallest resized image area; defaults to the image processor's.
        max_pixels: largest resized image area; defaults to the image processor's.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        if not hasattr(getattr(model, "model", None), "get_rope_index"):
            raise ValueError(
                f"{type(model).__name__} is not a Qwen-VL-family model (no model.get_rope_index); VLMPolicy "
                "relies on Qwen-VL's image placeholder tokens and multimodal rope positions"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        if min_pixels is None or max_pixels is None:
            default_min, default_max = default_pixel_bounds(image_processor)
            min_pixels = default_min if min_pixels is None else min_pixels
            max_pixels = default_max if max_pixels is None else max_pixels
        self.min_pixels: int = min_pixels
        self.max_pixels: int = max_pixels
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels ({self.max_pixels}) must be >= min_pixels ({self.min_pixels})")

        self.end_of_turn_token_id = self._token_id(END_OF_TURN_TOKEN)
        self.image_token_id = int(model.config.image_token_id)
        if self._token_id(IMAGE_TOKEN) != self.image_token_id:
            raise ValueError(
                f"tokenizer's {IMAGE_TOKEN} id {self._token_id(IMAGE_TOKEN)} differs from the model config's "
                f"image_token_id {self.image_token_id}; tokenizer and model come from different checkpoints"
            )
        self.video_token_id = getattr(model.config, "video_token_id", None)
        self.suppressed_token_ids: tuple[int, ...] = tuple(
            token_id for token_id in (self.image_token_id, self.video_token_id) if token_id is not None
        )
        self.checkpoint_generation_config = model.generation_config
        eos_ids = self.checkpoint_generation_config.eos_token_id
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        if tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys([self.end_of_turn_token_id, *eos_ids]))
        pad_token_id = tokenizer.pad_token_id
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else self.stop_token_ids[-1])
        model.generation_config = GenerationConfig(
            bos_token_id=self.checkpoint_generation_config.bos_token_id,
            eos_token_id=list(self.stop_token_ids),
            pad_token_id=self.pad_token_id,
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        revision: str | None = None,
    ) -> VLMPolicy:
        """Load model, tokenizer and image processor from a local directory or a Hub id.

        Uses ``AutoModelForImageTextToText``, ``AutoTokenizer`` and ``AutoImageProcessor`` with the PIL
        backend, so neither torchvision nor a video processor is needed.

        Args:
            path_or_id: checkpoint directory (e.g. from `agents.tiny.build_tiny_model`) or Hub model id.
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
            device: device to put the model on.
            attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ...
            min_pixels: smallest resized image area; defaults to the checkpoint's image processor.
            max_pixels: largest resized image area; defaults to the checkpoint's image processor.
            revision: Hub revision (branch, tag or commit) to load.
        """
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype; got {dtype!r}")
            dtype = _DTYPES[dtype]
        model = AutoModelForImageTextToText.from_pretrained(
            path_or_id, dtype=dtype, attn_implementation=attn_implementation, revision=revision
        )
        model.to(device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, revision=revision)
        image_processor = AutoImageProcessor.from_pretrained(path_or_id, backend="pil", revision=revision)
        logger.info(
            "loaded %s (%s, %s, %s attention) from %s",
            type(model).__name__,
            dtype,
            device,
            attn_implementation,
            path_or_id,
        )
        return cls(model, tokenizer, image_processor, min_pixels=min_pixels, max_pixels=max_pixels)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token; VLMPolicy needs a Qwen-VL style tokenizer")
        return int(token_id)

    def prepare_images(self, images: Sequence[ImageLike]) -> ImageInputs:
        """Smart-resize `images` within ``[min_pixels, max_pixels]`` and build their vision inputs."""
        return prepare_images(
            images, self.image_processor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )

    def render(self, dialogue: Dialogue, *, add_generation_prompt: bool) -> str:
        """The chat template's text for `dialogue` (one image placeholder per image, not expanded)."""
        return self.tokenizer.apply_chat_template(
            dialogue.to_messages(), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` exactly as written (no BOS/EOS added); special-token strings become special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `token_ids`."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def encode_dialogue(self, dialogue: Dialogue, *, add_generation_prompt: bool = True) -> TokenSequence:
        """Token ids of `dialogue` under the chat template, with the image's vision inputs.

        The image placeholder the template writes (one ``<|image_pad|>``) is expanded at token level to
        ``ImageInputs.num_image_tokens`` copies, which is what the model's ``forward`` expects.

        Args:
            dialogue: the dialogue; its image, if any, is shown with the first user turn.
            add_generation_prompt: end with the assistant header (``<|im_start|>assistant\\n``), i.e. a
                prompt ready for `generate`.
        """
        token_ids = self.tokenize(self.render(dialogue, add_generation_prompt=add_generation_prompt))
        if dialogue.image is None:
            if self.image_token_id in token_ids:
                raise ValueError(
                    f"dialogue without an image renders {IMAGE_TOKEN} tokens; check the turn texts"
                )
            return TokenSequence(token_ids=tuple(token_ids), images=None)
        images = self.prepare_images([dialogue.image])
        return TokenSequence(token_ids=tuple(self.expand_image_tokens(token_ids, images)), images=images)

    def expand_image_tokens(self, token_ids: Sequence[int], images: ImageInputs) -> list[int]:
        """Replace the i-th ``<|image_pad|>`` of `token_ids` by ``images.num_image_tokens[i]`` copies."""
        placeholder_count = sum(1 for token in token_ids if token == self.image_token_id)
        if placeholder_count != images.num_images:
            raise ValueError(
                f"token ids hold {placeholder_count} {IMAGE_TOKEN} placeholders for {images.num_images} images"
            )
        counts = iter(images.num_image_tokens)
        expanded: list[int] = []
        for token in token_ids:
            expanded.extend([token] * next(counts) if token == self.image_token_id else [token])
        return expanded

    def encode_follow_up(self, text: str, *, close_assistant_turn: bool = False) -> list[int]:
        """Tokens that follow an assistant response's end-of-turn token when the user says `text`.

        They are the chat template's own tokens for the next user turn plus the assistant header (for
        Qwen: ``\\n<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n``), found by rendering a
        dialogue around a placeholder response and taking what the template writes after the
        placeholder's end-of-turn token. Appending them to ``prompt + generated tokens`` gives the
        template's tokens of the whole dialogue.

        Args:
            text: the environment's next message (e.g. feedback after a wrong answer).
            close_assistant_turn: prepend the end-of-turn token, for a response cut off at
                ``max_new_tokens`` (its tokens do not end with it).
        """
        dialogue = Dialogue.start("question").with_assistant(_RESPONSE_PLACEHOLDER)
        closed = self.render(dialogue, add_generation_prompt=False)
        continued = self.render(dialogue.with_user(text), add_generation_prompt=True)
        closed_response = _RESPONSE_PLACEHOLDER + self.tokenizer.convert_ids_to_tokens(
            self.end_of_turn_token_id
        )
        response_start = closed.find(closed_response)
        prefix = closed[: response_start + len(closed_response)]
        if response_start < 0 or not continued.startswith(prefix):
            raise ValueError(
                "the chat template does not end an assistant turn with its end-of-turn token and keep "
                "that text when the next turn follows; token-level turn concatenation needs both"
            )
        follow_up = self.tokenize(continued[len(prefix) :])
        return [self.end_of_turn_token_id, *follow_up] if close_assistant_turn else follow_up

    def collate(self, sequences: Sequence[TokenSequence]) -> PaddedBatch:
        """Left-pad `sequences` into one batch on the model's device."""
        if not sequences:
            raise ValueError("need at least one sequence")
        max_length = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), max_length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), max_length), dtype=torch.long)
        pad_lengths = []
        for row, sequence in enumerate(sequences):
            if len(sequence) == 0:
                raise ValueError(f"sequence {row} is empty")
            image_tokens = sum(1 for token in sequence.token_ids if token == self.image_token_id)
            expected = 0 if sequence.images is None else sum(sequence.images.num_image_tokens)
            if image_tokens != expected:
                raise ValueError(
                    f"sequence {row} has {image_tokens} {IMAGE_TOKEN} tokens but its images need {expected}"
                )
            pad_length = max_length - len(sequence)
            input_ids[row, pad_length:] = torch.tensor(sequence.token_ids, dtype=torch.long)
            attention_mask[row, pad_length:] = 1
            pad_lengths.append(pad_length)
        mm_token_type_ids = (input_ids == self.image_token_id).to(torch.int32)
        if self.video_token_id is not None:
            mm_token_type_ids[input_ids == self.video_token_id] = 2
        mm_token_type_ids[attention_mask == 0] = 0
        images = ImageInputs.concatenate([sequence.images for sequence in sequences])
        if images is not None:
            images = ImageInputs(
                pixel_values=images.pixel_values.to(self.device),
                image_grid_thw=images.image_grid_thw.to(self.device),
                merge_size=images.merge_size,
            )
        return PaddedBatch(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            mm_token_type_ids=mm_token_type_ids.to(self.device),
            images=images,
            pad_lengths=pad_lengths,
        )

    def position_ids(self, batch: PaddedBatch) -> torch.Tensor:
        """Rope position ids of `batch` that ignore the left padding.

        With images: Qwen-VL's ``get_rope_index`` over the attention mask, ``(3, batch, length)``.
        Text only: ``cumsum(attention_mask) - 1``, ``(batch, length)``, as ``generate`` does. Padding
        positions get 0 (they are masked out anyway).
        """
        if batch.images is not None:
            position_ids, _ = self.model.model.get_rope_index(
                batch.input_ids,
                mm_token_type_ids=batch.mm_token_type_ids,
                image_grid_thw=batch.images.image_grid_thw,
                attention_mask=batch.attention_mask,
            )
            return position_ids
        position_ids = batch.attention_mask.long().cumsum(-1) - 1
        return position_ids.masked_fill(batch.attention_mask == 0, 0)

    def generation_config(self, *, temperature: float, max_new_tokens: int, greedy: bool) -> GenerationConfig:
        """The explicit ``GenerationConfig`` `generate` uses: plain sampling at `temperature` or greedy.

        Sampling sets ``top_k=0``, ``top_p=1.0``, ``typical_p=1.0``, no min-p/epsilon/eta cutoffs and
        no repetition penalty, so tokens are drawn from ``softmax(logits / temperature)`` exactly, where
        the logits of `suppressed_token_ids` (the vision placeholders) are ``-inf``.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        settings: dict[str, Any] = {
            "do_sample": not greedy,
            "num_beams": 1,
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": 0,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "suppress_tokens": list(self.suppressed_token_ids),
            "eos_token_id": list(self.stop_token_ids),
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if not greedy:
            if not temperature > 0:
                raise ValueError(
                    f"temperature must be > 0 when sampling; got {temperature} (use greedy=True)"
                )
            settings.update(
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                typical_p=1.0,
                epsilon_cutoff=0.0,
                eta_cutoff=0.0,
            )
        return GenerationConfig(**settings)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[TokenSequence],
        *,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        greedy: bool = False,
    ) -> list[Generation]:
        """Generate one response per prompt with a single batched ``model.generate`` call.

        Prompts are left-padded; generation stops per sequence at ``<|im_end|>`` or eos. Use
        ``torch.manual_seed`` before the call for reproducible sampling.

        Args:
            prompts: prompt token sequences, e.g. from `encode_dialogue` (ending with the assistant header).
            temperature: sampling temperature (ignored when `greedy`).
            max_new_tokens: the most tokens generated per response.
            greedy: take the arg-max token instead of sampling; log-probs are then at temperature 1.

        Returns:
            One `Generation` per prompt, in order.
        """
        config = self.generation_config(temperature=temperature, max_new_tokens=max_new_tokens, greedy=greedy)
        batch = self.collate(prompts)
        recorder = _SampledTokenLogprobs(temperature=1.0 if greedy else temperature)
        sequences = self.model.generate(
            **batch.model_inputs(self.dtype),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
        )
        prompt_length = batch.input_ids.shape[1]
        new_tokens = sequences[:, prompt_length:].cpu()
        logprobs = recorder.finish(sequences, new_tokens.shape[1])
        generations = []
        for row in range(len(prompts)):
            tokens = new_tokens[row].tolist()
            stop_index = next(
                (index for index, token in enumerate(tokens) if token in self.stop_token_ids), None
            )
            length = len(tokens) if stop_index is None else stop_index + 1
            response_tokens = tokens[: length if stop_index is None else stop_index]
            generations.append(
                Generation(
                    token_ids=tokens[:length],
                    logprobs=logprobs[row, :length].clone(),
                    text=self.decode(response_tokens),
                    finished=stop_index is not None,
                )
            )
        return generations

    def token_logprobs(
        self,
        sequences: Sequence[TokenSequence],
        target_positions: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher-forced log-probs ``log_softmax(logits / temperature)`` of chosen tokens.

        One forward pass over the left-padded batch of full sequences (images included); the logits of
        `suppressed_token_ids` are set to ``-inf`` as in `generate`. Gradients flow when called with
        grad enabled (wrap in ``torch.no_grad()`` for scoring only).

        Args:
            sequences: full token sequences (prompt + response turns).
            target_positions: for each sequence, indices ``t >= 1`` into its ``token_ids`` whose token
                log-prob ``log p(token_ids[t] | token_ids[:t])`` is wanted, e.g. ``range(len(prompt),
                len(sequence))`` for a single response.
            temperature: the sampling temperature the tokens were drawn at (1 for greedy).

            with_entropy: also return the entropy of the same distribution at each target position.

        Returns:
            One float32 tensor per sequence with the log-probs of its target positions, in order;
            with `with_entropy`, a pair (log-probs, entropies) of such lists.
        """
        if len(target_positions) != len(sequences):
            raise ValueError(
                f"got {len(target_positions)} target position lists for {len(sequences)} sequences"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        positions = [list(targets) for targets in target_positions]
        for row, (sequence, targets) in enumerate(zip(sequences, positions, strict=True)):
            if targets and not (min(targets) >= 1 and max(targets) < len(sequence)):
                raise ValueError(
                    f"target positions of sequence {row} must lie in [1, {len(sequence) - 1}]; got "
                    f"{min(targets)}..{max(targets)}"
                )
        batch = self.collate(sequences)
        length = batch.input_ids.shape[1]
        padded_targets = [
            [pad_length + target for target in targets]
            for pad_length, targets in zip(batch.pad_lengths, positions, strict=True)
        ]
        earliest = min((min(targets) for targets in padded_targets if targets), default=length)
        # Only positions earliest-1 .. length-2 predict a target; the LM head skips the rest.
        logits_to_keep = length - earliest + 1
        outputs = self.model(
            **batch.model_inputs(self.dtype),
            position_ids=self.position_ids(batch),
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
        first_kept = length - outputs.logits.shape[1]
        suppressed = torch.tensor(self.suppressed_token_ids, dtype=torch.long, device=outputs.logits.device)
        results, entropies = [], []
        for row, targets in enumerate(padded_targets):
            index = torch.tensor(targets, dtype=torch.long, device=outputs.logits.device)
            logits = outputs.logits[row, index - 1 - first_kept].float() / temperature
            logits = logits.index_fill(-1, suppressed, float("-inf"))
            tokens = batch.input_ids[row, index]
            log_distribution = torch.log_softmax(logits, dim=-1)
            results.append(log_distribution.gather(1, tokens[:, None]).squeeze(1))
            if with_entropy:
                probabilities = log_distribution.exp()
                # 0 * log 0 is 0: the suppressed tokens have probability 0 and log-prob -inf.
                entropies.append(-(probabilities * log_distribution.masked_fill(probabilities == 0, 0.0)).sum(-1))
        return (results, entropies) if with_entropy else results
