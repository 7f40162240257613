"""A vision-language model as a policy: token-in/token-out generation and teacher-forced log-probs.

`VLMPolicy` wraps a Hugging Face image-text-to-text model of the Qwen-VL family (Qwen2-VL, Qwen2.5-VL,
or a tiny checkpoint from `agents.tiny`) with its tokenizer and (PIL) image processor, and offers what a
rollout engine and a learner need:

- `VLMPolicy.encode_dialogue`: a `Dialogue` to prompt tokens with the model's chat template, the image
  placeholder expanded to one ``<|image_pad|>`` per merged patch, plus the pixel inputs.
- `VLMPolicy.encode_follow_up`: the exact tokens the chat template puts after the assistant's
  end-of-turn token for the next user message, so multi-turn trajectories are built by concatenating
  token ids and never by re-tokenising decoded text.
- `VLMPolicy.generate`: batched decoding with explicit sampling (``softmax(logits / T)``, nothing
  else), returning each sequence's generated tokens with their log-probs under the sampling
  distribution, and optionally each dialogue's key-value cache (`KVPrefix`) so its next turn
  prefills only the new tokens.
- `VLMPolicy.token_logprobs`: a teacher-forced forward pass over full sequences that reproduces those
  log-probs (the importance ratio of an on-policy sample is 1 up to float error).

Placeholder tokens. The model's forward treats every ``<|image_pad|>`` / ``<|video_pad|>`` in its input
as a slot for vision features, so a response containing one could not be scored by teacher forcing.
Both `generate` and `token_logprobs` therefore give these tokens probability 0 (logit ``-inf``); a
trained model never emits them anyway, a random one would.

Positions. Qwen-VL uses multimodal rope: three position rows (time, height, width) that advance
together on text and follow the patch grid on image tokens. Padding must not move them: `generate`
computes each prompt's positions on its own (``get_rope_index`` when it shows an image) and continues
with +1 per token, a cached prefix carrying its next position; `token_logprobs` runs the same
``get_rope_index`` over the attention mask of the left-padded full sequences. Both give every real
token the same numbers (checked by ``tests/agents/test_vlm_policy.py``).

Why our own decoding loop rather than ``model.generate``: resuming each dialogue from its own cache
puts padding between a row's cached keys and its new tokens, which ``generate``'s position bookkeeping
for Qwen-VL (one rope offset per row, from the first prompt) cannot express. The loop is short: one
prefill, then one forward per token over the rows still generating (finished rows leave the batch).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

from agents.chat import Dialogue
from agents.vision_inputs import ImageInputs, ImageLike, default_pixel_bounds, prepare_images

logger = logging.getLogger(__name__)

END_OF_TURN_TOKEN = "<|im_end|>"
"""The token that closes every chat turn in Qwen's ChatML template."""

IMAGE_TOKEN = "<|image_pad|>"
"""Qwen's image placeholder token; the chat template writes one per image, the policy expands it."""

MIN_SHARED_PREFIX = 16
"""`VLMPolicy.token_logprobs` runs a common prefix of at least this many tokens once per batch."""

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


@dataclass(frozen=True, eq=False)
class KVPrefix:
    """Attention keys and values of a sequence's first tokens, kept to continue it without recomputing them.

    `VLMPolicy.generate` with ``keep_cache=True`` returns one with each response (`Generation.cache`):
    the prompt and every generated token but the last, which was never fed to the model. Passed back
    with a prompt that extends exactly those tokens and shows the same images (the next turn of the same
    dialogue), it lets `generate` run the model over the new tokens only. A prompt that does not extend
    it is encoded from scratch, so a stale prefix costs time, never correctness.

    Attributes:
        token_ids: the tokens whose keys and values are held.
        images: the vision inputs those tokens show.
        layers: per decoder layer, ``(keys, values)``, each ``(kv_heads, len(token_ids), head_dim)``.
        next_position: the rope position of the token after `token_ids`; text advances the three rope
            rows together, so one number says it.
    """

    token_ids: tuple[int, ...]
    images: ImageInputs | None
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    next_position: int

    def __len__(self) -> int:
        return len(self.token_ids)

    def is_prefix_of(self, prompt: TokenSequence) -> bool:
        """Whether `prompt` is these tokens followed by at least one more, with the same images."""
        length = len(self.token_ids)
        return (
            length < len(prompt)
            and _same_images(self.images, prompt.images)
            and prompt.token_ids[:length] == self.token_ids
        )


def _same_images(first: ImageInputs | None, second: ImageInputs | None) -> bool:
    if first is second:
        return True
    if first is None or second is None:
        return False
    return torch.equal(first.image_grid_thw, second.image_grid_thw) and torch.equal(
        first.pixel_values, second.pixel_values
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
        cache: with ``generate(..., keep_cache=True)``, the keys and values of the prompt and the
            response, to continue this dialogue in the next call; otherwise None.
    """

    token_ids: list[int]
    logprobs: torch.Tensor
    text: str
    finished: bool
    cache: KVPrefix | None = None


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
        self.share_prefix = True
        """Let `token_logprobs` run a prefix every sequence shares once (off under sharded training)."""
        self.autocast_dtype: torch.dtype | None = None
        """Run every forward pass under ``torch.autocast`` in this dtype (e.g. bfloat16 compute over float32
        master weights); None runs in the parameters' dtype."""
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

    def _autocast(self) -> Any:
        """``torch.autocast`` in `autocast_dtype` (a no-op context without one)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _forward(self, module: Any = None, **inputs: Any) -> Any:
        """``module(**inputs)`` (the whole model by default) under `autocast_dtype` when one is set."""
        module = self.model if module is None else module
        with self._autocast():
            return module(**inputs)

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

    def _check_image_tokens(self, row: int, sequence: TokenSequence) -> None:
        image_tokens = sum(1 for token in sequence.token_ids if token == self.image_token_id)
        expected = 0 if sequence.images is None else sum(sequence.images.num_image_tokens)
        if image_tokens != expected:
            raise ValueError(
                f"sequence {row} has {image_tokens} {IMAGE_TOKEN} tokens but its images need {expected}"
            )

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
            self._check_image_tokens(row, sequence)
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

    def check_sampling(self, *, temperature: float, max_new_tokens: int, greedy: bool) -> None:
        """Raise ValueError for sampling settings `generate` cannot use."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling; got {temperature} (use greedy=True)")

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[TokenSequence],
        *,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        greedy: bool = False,
        caches: Sequence[KVPrefix | None] | None = None,
        keep_cache: bool = False,
        generators: Sequence[torch.Generator] | None = None,
    ) -> list[Generation]:
        """Generate one response per prompt, all prompts decoded together in one batch.

        Tokens are drawn from ``softmax(logits / temperature)`` exactly: no top-k, top-p, repetition
        penalty or other setting from the checkpoint's generation config, and the vision placeholders
        (`suppressed_token_ids`) at probability 0. A sequence stops at ``<|im_end|>`` or eos; finished
        sequences leave the batch. Use ``torch.manual_seed`` before the call for reproducible sampling.

        The first forward pass (prefill) takes each prompt's uncached tokens, left-padded; a prompt
        whose entry in `caches` is a prefix of it starts from those keys and values, so a multi-turn
        dialogue pays only for its new tokens. Padding sits between a row's cached keys and its new
        tokens; the attention mask hides it and the rope positions skip it.

        Args:
            prompts: prompt token sequences, e.g. from `encode_dialogue` (ending with the assistant header).
            temperature: sampling temperature (ignored when `greedy`).
            max_new_tokens: the most tokens generated per response.
            greedy: take the arg-max token instead of sampling; log-probs are then at temperature 1.
            caches: for each prompt, a `KVPrefix` from an earlier call on the same dialogue, or None.
            keep_cache: return each response's `KVPrefix` in `Generation.cache`.
            generators: one CPU ``torch.Generator`` per prompt to draw its tokens from; a row's draws
                then do not depend on which other prompts share the batch. None draws from torch's
                global generator.

        Returns:
            One `Generation` per prompt, in order.
        """
        self.check_sampling(temperature=temperature, max_new_tokens=max_new_tokens, greedy=greedy)
        if not prompts:
            raise ValueError("need at least one prompt")
        for row, prompt in enumerate(prompts):
            self._check_image_tokens(row, prompt)
        if caches is None:
            caches = [None] * len(prompts)
        elif len(caches) != len(prompts):
            raise ValueError(f"got {len(caches)} caches for {len(prompts)} prompts")
        if generators is not None and len(generators) != len(prompts):
            raise ValueError(f"got {len(generators)} generators for {len(prompts)} prompts")
        prefixes = [
            cache if cache is not None and cache.is_prefix_of(prompt) else None
            for prompt, cache in zip(prompts, caches, strict=True)
        ]
        # One autocast context for the whole call: autocast keeps its half-precision copy of each weight
        # until the outermost context exits, instead of re-casting every weight at every token.
        with self._autocast():
            return self._generate(prompts, prefixes, temperature=temperature, max_new_tokens=max_new_tokens, greedy=greedy, keep_cache=keep_cache, generators=generators)

    def _generate(
        self,
        prompts: Sequence[TokenSequence],
        prefixes: Sequence[KVPrefix | None],
        *,
        temperature: float,
        max_new_tokens: int,
        greedy: bool,
        keep_cache: bool,
        generators: Sequence[torch.Generator] | None,
    ) -> list[Generation]:
        """The decoding loop of `generate` (arguments checked there)."""
        logits, cache, attention_mask, next_positions = self._prefill(prompts, prefixes, extra=max_new_tokens)
        temperature = 1.0 if greedy else temperature
        suppressed = torch.tensor(self.suppressed_token_ids, dtype=torch.long, device=self.device)
        stop_tokens = set(self.stop_token_ids)

        rows = list(range(len(prompts)))  # the prompt of each batch row still generating
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        kept: list[KVPrefix | None] = [None] * len(prompts)
        for step in range(max_new_tokens):
            chosen, chosen_logprobs = choose_tokens(
                logits,
                suppressed,
                temperature=temperature,
                greedy=greedy,
                generators=None if generators is None else [generators[row] for row in rows],
            )
            going_on = []
            for batch_row, (row, token, logprob) in enumerate(
                zip(rows, chosen.tolist(), chosen_logprobs.tolist(), strict=True)
            ):
                tokens[row].append(token)
                logprobs[row].append(logprob)
                if token not in stop_tokens and step + 1 < max_new_tokens:
                    going_on.append(batch_row)
                elif keep_cache:
                    kept[row] = self._take_prefix(
                        cache,
                        attention_mask[batch_row],
                        batch_row,
                        prompts[row],
                        tokens[row][:-1],
                        int(next_positions[batch_row]),
                    )
            if not going_on:
                break
            if len(going_on) < len(rows):
                index = torch.tensor(going_on, dtype=torch.long, device=self.device)
                cache.batch_select_indices(index)
                attention_mask, next_positions, chosen = (
                    attention_mask[index],
                    next_positions[index],
                    chosen[index],
                )
                rows = [rows[batch_row] for batch_row in going_on]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
            outputs = self._forward(
                input_ids=chosen[:, None],
                attention_mask=attention_mask,
                position_ids=next_positions.view(1, -1, 1).expand(3, -1, 1),
                past_key_values=cache,
                use_cache=True,
            )
            logits = outputs.logits[:, -1]
            next_positions = next_positions + 1

        generations = []
        for row in range(len(prompts)):
            finished = tokens[row][-1] in stop_tokens
            generations.append(
                Generation(
                    token_ids=tokens[row],
                    logprobs=torch.tensor(logprobs[row], dtype=torch.float32),
                    text=self.decode(tokens[row][:-1] if finished else tokens[row]),
                    finished=finished,
                    cache=kept[row],
                )
            )
        return generations

    def _prefill(
        self, prompts: Sequence[TokenSequence], prefixes: Sequence[KVPrefix | None], *, extra: int
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Run the model over each prompt's uncached tokens, in a cache with room for `extra` more.

        Returns the next-token logits ``(batch, vocab)``, the batch's key-value cache, its attention
        mask ``(batch, cache length)`` and each row's next rope position ``(batch,)``.
        """
        cached = [0 if prefix is None else len(prefix) for prefix in prefixes]
        chunks = [prompt.token_ids[length:] for prompt, length in zip(prompts, cached, strict=True)]
        past_length, chunk_length = max(cached), max(len(chunk) for chunk in chunks)
        batch = len(prompts)
        input_ids = torch.full((batch, chunk_length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, past_length + chunk_length), dtype=torch.long)
        position_ids = torch.zeros((3, batch, chunk_length), dtype=torch.long)
        next_positions, images = [], []
        for row, (prompt, prefix, chunk) in enumerate(zip(prompts, prefixes, chunks, strict=True)):
            start = chunk_length - len(chunk)
            input_ids[row, start:] = torch.tensor(chunk, dtype=torch.long)
            attention_mask[row, past_length - cached[row] : past_length] = 1
            attention_mask[row, past_length + start :] = 1
            if prefix is not None:
                positions = prefix.next_position + torch.arange(len(chunk))
            else:
                positions = self._prompt_positions(prompt)
                if prompt.images is not None:
                    images.append(prompt.images)
            position_ids[:, row, start:] = positions
            next_positions.append(int(positions.max()) + 1)

        inputs: dict[str, Any] = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "position_ids": position_ids.to(self.device),
            "past_key_values": self._new_cache(prefixes, past_length, capacity=past_length + chunk_length + extra),
            "use_cache": True,
            "logits_to_keep": 1,
        }
        if images:
            merged = ImageInputs.concatenate(images)
            inputs["pixel_values"] = merged.pixel_values.to(self.device, self.dtype)
            inputs["image_grid_thw"] = merged.image_grid_thw.to(self.device)
        outputs = self._forward(**inputs)
        return (
            outputs.logits[:, -1],
            outputs.past_key_values,
            inputs["attention_mask"],
            torch.tensor(next_positions, dtype=torch.long, device=self.device),
        )

    def _new_cache(self, prefixes: Sequence[KVPrefix | None], length: int, *, capacity: int) -> DynamicCache:
        """A batch cache of `capacity` positions, the first `length` holding each prefix right-aligned.

        Rows are zero in front of a shorter prefix (all zero without one); the attention mask hides them.
        """
        layers = [
            _PreallocatedLayer(capacity) for _ in range(self.model.config.get_text_config().num_hidden_layers)
        ]
        if length:
            reference = next(prefix for prefix in prefixes if prefix is not None)
            for index, layer in enumerate(layers):
                padded = []
                for part, like in enumerate(reference.layers[index]):
                    tensor = like.new_zeros((len(prefixes), like.shape[0], length, like.shape[2]))
                    for row, prefix in enumerate(prefixes):
                        if prefix is not None:
                            tensor[row, :, length - len(prefix) :] = prefix.layers[index][part]
                    padded.append(tensor)
                layer.update(*padded)
        cache = DynamicCache()
        cache.layers = layers
        return cache

    def _prompt_positions(self, prompt: TokenSequence) -> torch.Tensor:
        """Rope positions ``(3, len(prompt))`` of a whole prompt, from the start of its dialogue."""
        if prompt.images is None:
            return torch.arange(len(prompt)).expand(3, -1)
        input_ids = torch.tensor([prompt.token_ids], dtype=torch.long)
        positions, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=(input_ids == self.image_token_id).to(torch.int32),
            image_grid_thw=prompt.images.image_grid_thw.cpu(),
            attention_mask=torch.ones_like(input_ids),
        )
        return positions[:, 0].cpu()

    @staticmethod
    def _take_prefix(
        cache: DynamicCache,
        attention_mask: torch.Tensor,
        batch_row: int,
        prompt: TokenSequence,
        fed_tokens: Sequence[int],
        next_position: int,
    ) -> KVPrefix:
        """Copy one batch row's keys and values (its unmasked columns) out of the batch cache."""
        columns = attention_mask.bool()
        layers = tuple(
            (layer.keys[batch_row][:, columns], layer.values[batch_row][:, columns]) for layer in cache.layers
        )
        token_ids = (*prompt.token_ids, *fed_tokens)
        if layers[0][0].shape[1] != len(token_ids):
            raise RuntimeError(
                f"cache row holds {layers[0][0].shape[1]} positions for {len(token_ids)} fed tokens"
            )
        return KVPrefix(token_ids=token_ids, images=prompt.images, layers=layers, next_position=next_position)

    @torch.no_grad()
    def hidden_states(
        self, sequences: Sequence[TokenSequence], positions: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """The language model's final hidden state (after its last norm) at chosen positions.

        One forward pass of the decoder stack (no LM head, no gradients) over the left-padded batch;
        e.g. position ``start - 1`` of a response is the state the policy chose its first token from.

        Returns:
            One float32 tensor ``(len(positions[i]), hidden_size)`` per sequence.
        """
        if len(positions) != len(sequences):
            raise ValueError(f"got {len(positions)} position lists for {len(sequences)} sequences")
        for row, (sequence, wanted) in enumerate(zip(sequences, positions, strict=True)):
            if wanted and not (min(wanted) >= 0 and max(wanted) < len(sequence)):
                raise ValueError(f"positions of sequence {row} must lie in [0, {len(sequence) - 1}]")
        batch = self.collate(sequences)
        outputs = self._forward(
            self.model.model, **batch.model_inputs(self.dtype), position_ids=self.position_ids(batch), use_cache=False
        )
        states = outputs.last_hidden_state
        return [
            states[row, [batch.pad_lengths[row] + position for position in wanted]].float()
            for row, wanted in enumerate(positions)
        ]

    def token_logprobs(
        self,
        sequences: Sequence[TokenSequence],
        target_positions: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        share_prefix: bool = True,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher-forced log-probs ``log_softmax(logits / temperature)`` of chosen tokens.

        One forward pass over the left-padded batch of full sequences (images included), or over a
        prefix the sequences share and then their remainders (`share_prefix`); the logits of
        `suppressed_token_ids` are set to ``-inf`` as in `generate`. Gradients flow when called with
        grad enabled (wrap in ``torch.no_grad()`` for scoring only).

        Args:
            sequences: full token sequences (prompt + response turns).
            target_positions: for each sequence, indices ``t >= 1`` into its ``token_ids`` whose token
                log-prob ``log p(token_ids[t] | token_ids[:t])`` is wanted, e.g. ``range(len(prompt),
                len(sequence))`` for a single response.
            temperature: the sampling temperature the tokens were drawn at (1 for greedy).
            with_entropy: also return the entropy of the same distribution at each target position.
            share_prefix: run the tokens all sequences begin with (at least `MIN_SHARED_PREFIX`, before
                any target, text-only batches) once instead of once per sequence; same results up to
                float rounding (see `_logits_after_shared_prefix`).

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
        shared = self._shared_prefix_length(sequences, positions) if share_prefix and self.share_prefix else 0
        if shared:
            row_logits = self._logits_after_shared_prefix(sequences, positions, shared)
        else:
            row_logits = self._logits_left_padded(sequences, positions)
        suppressed = torch.tensor(self.suppressed_token_ids, dtype=torch.long, device=self.device)
        results, entropies = [], []
        for sequence, targets, logits in zip(sequences, positions, row_logits, strict=True):
            tokens = torch.tensor([sequence.token_ids[t] for t in targets], dtype=torch.long, device=self.device)
            chunks = range(0, len(targets), SCORE_CHUNK)
            if logits.requires_grad:
                # Recomputed in the backward pass: only the logits are kept, no float32 full-vocabulary copy.
                parts = [
                    checkpoint(_chunk_logprobs, logits[i : i + SCORE_CHUNK], tokens[i : i + SCORE_CHUNK], suppressed, temperature, use_reentrant=False)
                    for i in chunks
                ]
            else:
                parts = [_chunk_logprobs(logits[i : i + SCORE_CHUNK], tokens[i : i + SCORE_CHUNK], suppressed, temperature) for i in chunks]
            results.append(torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32))
            if with_entropy:  # a diagnostic: no graph
                with torch.no_grad():
                    entropy = [_chunk_entropy(logits[i : i + SCORE_CHUNK], suppressed, temperature) for i in chunks]
                entropies.append(torch.cat(entropy) if entropy else logits.new_zeros(0, dtype=torch.float32))
        return (results, entropies) if with_entropy else results

    def _logits_left_padded(self, sequences: Sequence[TokenSequence], positions: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, the logits ``(len(targets), vocab)`` that predict its targets: one left-padded pass."""
        batch = self.collate(sequences)
        length = batch.input_ids.shape[1]
        padded_targets = [
            [pad_length + target for target in targets]
            for pad_length, targets in zip(batch.pad_lengths, positions, strict=True)
        ]
        earliest = min((min(targets) for targets in padded_targets if targets), default=length)
        # Only positions earliest-1 .. length-2 predict a target; the LM head skips the rest.
        outputs = self._forward(
            **batch.model_inputs(self.dtype),
            position_ids=self.position_ids(batch),
            use_cache=False,
            logits_to_keep=length - earliest + 1,
        )
        first_kept = length - outputs.logits.shape[1]
        return [
            outputs.logits[row, torch.tensor(targets, dtype=torch.long, device=self.device) - 1 - first_kept]
            for row, targets in enumerate(padded_targets)
        ]

    def _shared_prefix_length(self, sequences: Sequence[TokenSequence], positions: list[list[int]]) -> int:
        """Tokens every sequence starts with that no target needs a logit from; 0 when sharing would not pay.

        Only text-only batches of two or more sequences share (an image changes rope positions after it).
        """
        if len(sequences) < 2 or any(sequence.images is not None for sequence in sequences):
            return 0
        first = sequences[0].token_ids
        common = min(len(sequence) for sequence in sequences) - 1  # every row keeps a token after it
        for sequence in sequences[1:]:
            ids = sequence.token_ids
            common = next((i for i in range(common) if ids[i] != first[i]), common)
        earliest = min((min(targets) for targets in positions if targets), default=common + 1)
        shared = min(common, earliest - 1)
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _logits_after_shared_prefix(
        self, sequences: Sequence[TokenSequence], positions: list[list[int]], shared: int
    ) -> list[torch.Tensor]:
        """As `_logits_left_padded`, but the first `shared` tokens (the same in every row) are run once.

        The prefix's keys and values are computed for one row and broadcast to the batch (gradients sum
        back through the broadcast); each row's remainder follows, right-padded, at positions ``shared``
        onward. Same log-probs and gradients as the padded pass up to float rounding, and the prefix
        costs one row instead of one per sequence (a GeneralPoints batch shares all but its hand).
        """
        prefix = torch.tensor([sequences[0].token_ids[:shared]], dtype=torch.long, device=self.device)
        cache = self._forward(
            input_ids=prefix,
            attention_mask=torch.ones_like(prefix),
            position_ids=torch.arange(shared, device=self.device)[None],
            use_cache=True,
            logits_to_keep=1,  # the prefix predicts no target; only its keys and values are wanted
        ).past_key_values
        batch_size = len(sequences)
        for layer in cache.layers:
            layer.keys = layer.keys.expand(batch_size, -1, -1, -1)
            layer.values = layer.values.expand(batch_size, -1, -1, -1)
        rest_length = max(len(sequence) for sequence in sequences) - shared
        input_ids = torch.full((batch_size, rest_length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, shared + rest_length), dtype=torch.long)
        attention_mask[:, :shared] = 1
        for row, sequence in enumerate(sequences):
            rest = sequence.token_ids[shared:]
            input_ids[row, : len(rest)] = torch.tensor(rest, dtype=torch.long)
            attention_mask[row, shared : shared + len(rest)] = 1
        outputs = self._forward(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=(shared + torch.arange(rest_length, device=self.device)).expand(batch_size, -1),
            past_key_values=cache,
            use_cache=True,
        )
        return [
            outputs.logits[row, torch.tensor(targets, dtype=torch.long, device=self.device) - 1 - shared]
            for row, targets in enumerate(positions)
        ]


class _PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer writing into buffers sized once per `VLMPolicy.generate` call.

    Hugging Face's ``DynamicLayer`` concatenates its whole cache at every token, a copy that grows with
    the dialogue; here each token is one write. ``keys`` / ``values`` are views of the filled part.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Keys in the values' dtype: under bf16 autocast the rotary embedding hands keys over in float32,
        # and attention casts them back to bf16 anyway, so a float32 key cache only costs memory.
        self.dtype, self.device = value_states.dtype, key_states.device
        batch, heads, _, _ = key_states.shape
        self._key_buffer = key_states.new_zeros((batch, heads, self.capacity, key_states.shape[-1]), dtype=value_states.dtype)
        self._value_buffer = value_states.new_zeros((batch, heads, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"cache of {self.capacity} positions cannot take position {end}")
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._key_buffer, self._value_buffer = self._key_buffer[indices], self._value_buffer[indices]
            self.keys = self._key_buffer[:, :, : self.length]
            self.values = self._value_buffer[:, :, : self.length]


SCORE_CHUNK = 256
"""Target positions whose log-probs (and entropies) are computed together: bounds the float32 full-vocabulary
tensors alive at once to ``SCORE_CHUNK x vocab``."""


def _tempered_log_normaliser(logits: torch.Tensor, suppressed: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits / temperature`` in float32 with `suppressed` at ``-inf``, its log-sum-exp per row)."""
    scaled = (logits.float() / temperature).index_fill(-1, suppressed, float("-inf"))
    return scaled, torch.logsumexp(scaled, dim=-1)


def _chunk_logprobs(logits: torch.Tensor, tokens: torch.Tensor, suppressed: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(logits / temperature)[token]`` per row (suppressed ids at probability 0)."""
    scaled, normaliser = _tempered_log_normaliser(logits, suppressed, temperature)
    return scaled.gather(1, tokens[:, None]).squeeze(1) - normaliser


def _chunk_entropy(logits: torch.Tensor, suppressed: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per row, in nats (suppressed ids contribute 0)."""
    scaled, normaliser = _tempered_log_normaliser(logits, suppressed, temperature)
    log_distribution = scaled - normaliser[:, None]
    probabilities = log_distribution.exp()
    # 0 * log 0 is 0: the suppressed tokens have probability 0 and log-prob -inf.
    return -(probabilities * log_distribution.masked_fill(probabilities == 0, 0.0)).sum(-1)


def choose_tokens(
    logits: torch.Tensor,
    suppressed: torch.Tensor,
    *,
    temperature: float,
    greedy: bool,
    generators: Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``softmax(logits / temperature)`` with `suppressed` ids at probability 0.

    Returns the chosen ids ``(batch,)`` and their log-probs under that distribution (float32); greedy
    takes the arg-max, whose log-prob is then read at the given temperature. With `generators` (one CPU
    generator per row) each row's uniform draw comes from its own generator.
    """
    scaled = logits.float() / temperature
    log_distribution = torch.log_softmax(scaled.index_fill(-1, suppressed, float("-inf")), dim=-1)
    if greedy:
        chosen = log_distribution.argmax(dim=-1)
    else:
        # Inverse CDF: the first token whose cumulative probability exceeds u ~ U(0, total). A token of
        # probability 0 never exceeds the one before it, so it is never drawn. Same law as
        # ``torch.multinomial``, at a sixth of its cost per call on CPU; float64 keeps the sums exact
        # enough for a 150k vocabulary.
        cumulative = log_distribution.double().exp().cumsum(dim=-1)
        if generators is None:
            uniform = torch.rand_like(cumulative[:, :1])
        else:
            draws = [torch.rand((1,), generator=generator, dtype=torch.float64) for generator in generators]
            uniform = torch.stack(draws).to(cumulative.device)
        threshold = uniform * cumulative[:, -1:]
        chosen = torch.searchsorted(cumulative, threshold, right=True).squeeze(1)
    return chosen, log_distribution.gather(1, chosen[:, None]).squeeze(1)
