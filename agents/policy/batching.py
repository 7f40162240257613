"""Token sequences to a left-padded model batch, and the rope positions that ignore the padding.

Positions. Qwen-VL uses multimodal rope (M-RoPE): three position rows (time, height, width) that
advance together on text and follow the patch grid on image tokens. Padding must not move them:
generation computes each prompt's positions on its own (`prompt_position_ids`, ``get_rope_index``
when it shows an image) and continues with +1 per token, a dialogue's cache carrying its next
position; teacher forcing runs the same ``get_rope_index`` over the attention mask of the left-padded
full sequences (`position_ids`). Both give every real token the same numbers (checked by
``tests/agents/test_vlm_policy.py``). ``get_rope_index`` lives on the model (``model.model``), so
these two functions take it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agents.policy.encoder import IMAGE_TOKEN, ChatEncoder, TokenSequence
from agents.vision_inputs import ImageInputs


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


def check_image_tokens(row: int, sequence: TokenSequence, image_token_id: int) -> None:
    """Raise ValueError unless `sequence` holds exactly the ``<|image_pad|>`` tokens its images fill."""
    image_tokens = sum(1 for token in sequence.token_ids if token == image_token_id)
    expected = 0 if sequence.images is None else sum(sequence.images.num_image_tokens)
    if image_tokens != expected:
        raise ValueError(
            f"sequence {row} has {image_tokens} {IMAGE_TOKEN} tokens but its images need {expected}"
        )


def collate(
    sequences: Sequence[TokenSequence], encoder: ChatEncoder, device: torch.device
) -> PaddedBatch:
    """Left-pad `sequences` with the encoder's pad token into one batch on `device`."""
    if not sequences:
        raise ValueError("need at least one sequence")
    max_length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), max_length), encoder.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), max_length), dtype=torch.long)
    pad_lengths = []
    for row, sequence in enumerate(sequences):
        if len(sequence) == 0:
            raise ValueError(f"sequence {row} is empty")
        check_image_tokens(row, sequence, encoder.image_token_id)
        pad_length = max_length - len(sequence)
        input_ids[row, pad_length:] = torch.tensor(sequence.token_ids, dtype=torch.long)
        attention_mask[row, pad_length:] = 1
        pad_lengths.append(pad_length)
    mm_token_type_ids = (input_ids == encoder.image_token_id).to(torch.int32)
    if encoder.video_token_id is not None:
        mm_token_type_ids[input_ids == encoder.video_token_id] = 2
    mm_token_type_ids[attention_mask == 0] = 0
    images = ImageInputs.concatenate([sequence.images for sequence in sequences])
    if images is not None:
        images = ImageInputs(
            pixel_values=images.pixel_values.to(device),
            image_grid_thw=images.image_grid_thw.to(device),
            merge_size=images.merge_size,
        )
    return PaddedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        mm_token_type_ids=mm_token_type_ids.to(device),
        images=images,
        pad_lengths=pad_lengths,
    )


def position_ids(model: Any, batch: PaddedBatch) -> torch.Tensor:
    """Rope position ids of `batch` that ignore the left padding.

    With images: Qwen-VL's ``model.model.get_rope_index`` over the attention mask,
    ``(3, batch, length)``. Text only: ``cumsum(attention_mask) - 1``, ``(batch, length)``, as
    ``generate`` does. Padding positions get 0 (they are masked out anyway).
    """
    if batch.images is not None:
        positions, _ = model.model.get_rope_index(
            batch.input_ids,
            mm_token_type_ids=batch.mm_token_type_ids,
            image_grid_thw=batch.images.image_grid_thw,
            attention_mask=batch.attention_mask,
        )
        return positions
    positions = batch.attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(batch.attention_mask == 0, 0)


def prompt_position_ids(model: Any, prompt: TokenSequence, image_token_id: int) -> torch.Tensor:
    """Rope positions ``(3, len(prompt))`` of a whole prompt, from the start of its dialogue, on the CPU."""
    if prompt.images is None:
        return torch.arange(len(prompt)).expand(3, -1)
    input_ids = torch.tensor([prompt.token_ids], dtype=torch.long)
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == image_token_id).to(torch.int32),
        image_grid_thw=prompt.images.image_grid_thw.cpu(),
        attention_mask=torch.ones_like(input_ids),
    )
    return positions[:, 0].cpu()
