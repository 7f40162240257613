"""Dialogues to model inputs for Qwen-VL models: token ids and prepared images, no model.

`ChatEncoder` holds a Qwen-VL tokenizer (with its chat template), its (PIL) image processor, the pixel
bounds images are resized within and the special token ids a policy needs. It is all that building
trajectories and SFT data takes; `ChatEncoder.from_pretrained` loads it from a checkpoint without
the model's weights.

- `ChatEncoder.encode_dialogue`: a `Dialogue` to prompt tokens with the model's chat template, the image
  placeholder expanded to one ``<|image_pad|>`` per merged patch, plus the pixel inputs.
- `ChatEncoder.encode_follow_up`: the exact tokens the chat template puts after the assistant's
  end-of-turn token for the next user message, so multi-turn trajectories are built by concatenating
  token ids and never by re-tokenising decoded text.

Placeholder tokens. The model's forward treats every ``<|image_pad|>`` / ``<|video_pad|>`` in its input
as a slot for vision features, so a response containing one could not be scored by teacher forcing.
`ChatEncoder.suppressed_token_ids` lists them: generation and scoring give them probability 0 (logit
``-inf``); a trained model never emits them anyway, a random one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, GenerationConfig

from agents.chat import Dialogue
from agents.vision_inputs import ImageInputs, ImageLike, default_pixel_bounds, prepare_images

END_OF_TURN_TOKEN = "<|im_end|>"
"""The token that closes every chat turn in Qwen's ChatML template."""

IMAGE_TOKEN = "<|image_pad|>"
"""Qwen's image placeholder token; the chat template writes one per image, the encoder expands it."""

# Unique text standing in for an assistant response while locating the follow-up tokens in a
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


def load_generation_config(path_or_id: str | Path, *, revision: str | None = None) -> GenerationConfig:
    """The generation config a model loaded from `path_or_id` starts with, without loading the model.

    ``generation_config.json`` where the checkpoint has one, otherwise the config derived from
    ``config.json``: the same fallback as ``from_pretrained`` of a Hugging Face model.
    """
    try:
        return GenerationConfig.from_pretrained(path_or_id, revision=revision)
    except OSError:
        return GenerationConfig.from_pretrained(
            path_or_id, config_file_name="config.json", _from_model_config=True, revision=revision
        )


FOLLOW_UP_MEMO = 4096
"""Environment messages whose follow-up tokens `ChatEncoder` remembers (most feedback texts repeat)."""


class ChatEncoder:
    """A Qwen-VL tokenizer and image processor turning dialogues into token sequences; no model.

    Build it with `from_pretrained`, or from a loaded tokenizer and image processor. Attributes worth
    knowing: `end_of_turn_token_id` (``<|im_end|>``), `stop_token_ids` (end of turn and eos ids, which
    end a generated response), `pad_token_id`, `image_token_id`, `video_token_id`,
    `suppressed_token_ids` (the vision placeholders, never generated), `min_pixels` / `max_pixels`.

    Args:
        tokenizer: a Qwen-VL tokenizer with a chat template.
        image_processor: its Qwen2-VL image processor (the PIL one works without torchvision).
        image_token_id: the model config's ``image_token_id``; defaults to the tokenizer's
            ``<|image_pad|>`` id, and must equal it.
        video_token_id: the model config's ``video_token_id``, or None for a model without one.
        eos_token_ids: the eos id or ids of the checkpoint's generation config; they stop a response
            besides ``<|im_end|>`` and the tokenizer's eos.
        min_pixels: smallest resized image area; defaults to the image processor's.
        max_pixels: largest resized image area; defaults to the image processor's.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        *,
        image_token_id: int | None = None,
        video_token_id: int | None = None,
        eos_token_ids: int | Sequence[int] | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._follow_ups: dict[str, tuple[int, ...]] = {}
        if min_pixels is None or max_pixels is None:
            default_min, default_max = default_pixel_bounds(image_processor)
            min_pixels = default_min if min_pixels is None else min_pixels
            max_pixels = default_max if max_pixels is None else max_pixels
        self.min_pixels: int = min_pixels
        self.max_pixels: int = max_pixels
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels ({self.max_pixels}) must be >= min_pixels ({self.min_pixels})")

        self.end_of_turn_token_id = self._token_id(END_OF_TURN_TOKEN)
        tokenizer_image_id = self._token_id(IMAGE_TOKEN)
        self.image_token_id = tokenizer_image_id if image_token_id is None else int(image_token_id)
        if tokenizer_image_id != self.image_token_id:
            raise ValueError(
                f"tokenizer's {IMAGE_TOKEN} id {tokenizer_image_id} differs from the model config's "
                f"image_token_id {self.image_token_id}; tokenizer and model come from different checkpoints"
            )
        self.video_token_id = video_token_id
        self.suppressed_token_ids: tuple[int, ...] = tuple(
            token_id for token_id in (self.image_token_id, self.video_token_id) if token_id is not None
        )
        if eos_token_ids is None:
            eos_ids = []
        elif isinstance(eos_token_ids, int):
            eos_ids = [eos_token_ids]
        else:
            eos_ids = list(eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys([self.end_of_turn_token_id, *eos_ids]))
        pad_token_id = tokenizer.pad_token_id
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else self.stop_token_ids[-1])

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        revision: str | None = None,
    ) -> ChatEncoder:
        """Load the tokenizer and image processor of a checkpoint, and the token ids its configs give.

        Reads ``config.json`` (image and video token ids) and the generation config (eos ids) but no
        weights, so it works where only those files are present. Gives the same ids as
        `agents.policy.VLMPolicy.from_pretrained` on the same checkpoint.

        Args:
            path_or_id: checkpoint directory (e.g. from `agents.tiny.build_tiny_model`) or Hub model id.
            min_pixels: smallest resized image area; defaults to the checkpoint's image processor.
            max_pixels: largest resized image area; defaults to the checkpoint's image processor.
            revision: Hub revision (branch, tag or commit) to load.
        """
        config = AutoConfig.from_pretrained(path_or_id, revision=revision)
        return cls(
            AutoTokenizer.from_pretrained(path_or_id, revision=revision),
            AutoImageProcessor.from_pretrained(path_or_id, backend="pil", revision=revision),
            image_token_id=config.image_token_id,
            video_token_id=getattr(config, "video_token_id", None),
            eos_token_ids=load_generation_config(path_or_id, revision=revision).eos_token_id,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token; a Qwen-VL style tokenizer is needed")
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
                prompt ready for generation.
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
        follow_up = self._follow_ups.get(text)
        if follow_up is None:
            if len(self._follow_ups) >= FOLLOW_UP_MEMO:  # feedback that quotes answers never repeats: stay bounded
                self._follow_ups.clear()
            follow_up = self._follow_ups[text] = tuple(self._render_follow_up(text))
        return [self.end_of_turn_token_id, *follow_up] if close_assistant_turn else list(follow_up)

    def _render_follow_up(self, text: str) -> list[int]:
        """`encode_follow_up` without the closing token, computed; memoised per text (environments repeat)."""
        dialogue = Dialogue.start("question").with_assistant(_RESPONSE_PLACEHOLDER)
        closed = self.render(dialogue, add_generation_prompt=False)
        continued = self.render(dialogue.with_user(text), add_generation_prompt=True)
        closed_response = _RESPONSE_PLACEHOLDER + self.tokenizer.convert_ids_to_tokens(
            self.end_of_turn_token_id
        )
        response_start = closed.find(closed_response)
        through_response = closed[: response_start + len(closed_response)]
        if response_start < 0 or not continued.startswith(through_response):
            raise ValueError(
                "the chat template does not end an assistant turn with its end-of-turn token and keep "
                "that text when the next turn follows; token-level turn concatenation needs both"
            )
        return self.tokenize(continued[len(through_response) :])
