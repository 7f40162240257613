"""Key-value caches of the decoding loop: a dialogue's cache between turns and the batch cache of one call.

`DialogueCache` keeps the keys and values of one dialogue after a `generate` call, so its next turn
prefills only the new tokens. `new_batch_cache` builds the cache a `generate` call decodes into:
Hugging Face's ``DynamicCache`` with `_PreallocatedLayer` layers, the dialogues' caches copied in.

This is the one file that builds on transformers internals (``DynamicCache.layers``, subclassing
``DynamicLayer`` and its ``lazy_initialization`` / ``update`` / ``batch_select_indices`` contract). It
is tested against the transformers versions ``pyproject.toml`` allows (``tests/agents/test_kv_cache.py``);
check it here first when moving that range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from agents.policy.encoder import TokenSequence
from agents.vision_inputs import ImageInputs


@dataclass(frozen=True, eq=False)
class DialogueCache:
    """Attention keys and values of a dialogue's tokens so far, kept to continue it without recomputing them.

    `VLMPolicy.generate` with ``keep_cache=True`` returns one with each response (`Generation.cache`):
    the prompt and every generated token but the last, which was never fed to the model. Passed back
    with a prompt that continues exactly those tokens and shows the same images (the next turn of the
    same dialogue), it lets `generate` run the model over the new tokens only. A prompt that does not
    continue it is encoded from scratch, so a stale cache costs time, never correctness.

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

    def is_continued_by(self, prompt: TokenSequence) -> bool:
        """Whether `prompt` is these tokens followed by at least one more, with the same images."""
        length = len(self.token_ids)
        return (
            length < len(prompt)
            and _same_images(self.images, prompt.images)
            and prompt.token_ids[:length] == self.token_ids
        )

    @classmethod
    def from_batch_row(
        cls,
        batch_cache: DynamicCache,
        attention_mask: torch.Tensor,
        batch_row: int,
        prompt: TokenSequence,
        fed_tokens: Sequence[int],
        next_position: int,
    ) -> DialogueCache:
        """Copy one batch row's keys and values (its unmasked columns, `attention_mask`) out of a batch cache.

        Args:
            batch_cache: the cache of a whole batch.
            attention_mask: the row's attention mask over the cache's positions.
            batch_row: the row's index in the batch cache.
            prompt: the row's prompt.
            fed_tokens: the generated tokens fed to the model after the prompt.
            next_position: the rope position of the token after them.
        """
        columns = attention_mask.nonzero().squeeze(1)
        layers = tuple(
            (layer.keys[batch_row].index_select(1, columns), layer.values[batch_row].index_select(1, columns))
            for layer in batch_cache.layers
        )
        token_ids = (*prompt.token_ids, *fed_tokens)
        if layers[0][0].shape[1] != len(token_ids):
            raise RuntimeError(
                f"cache row holds {layers[0][0].shape[1]} positions for {len(token_ids)} fed tokens"
            )
        return cls(token_ids=token_ids, images=prompt.images, layers=layers, next_position=next_position)


KVPrefix = DialogueCache
"""The former name of `DialogueCache`."""


def _same_images(first: ImageInputs | None, second: ImageInputs | None) -> bool:
    if first is second:
        return True
    if first is None or second is None:
        return False
    return torch.equal(first.image_grid_thw, second.image_grid_thw) and torch.equal(
        first.pixel_values, second.pixel_values
    )


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
            self._key_buffer = self._key_buffer.index_select(0, indices)
            self._value_buffer = self._value_buffer.index_select(0, indices)
            self.keys = self._key_buffer[:, :, : self.length]
            self.values = self._value_buffer[:, :, : self.length]


def new_batch_cache(
    dialogue_caches: Sequence[DialogueCache | None], cached_length: int, *, num_layers: int, capacity: int
) -> DynamicCache:
    """A batch cache of `capacity` positions, the first `cached_length` holding each dialogue's cache right-aligned.

    Rows are zero in front of a shorter dialogue cache (all zero without one); the attention mask
    hides them.

    Args:
        dialogue_caches: per batch row, the dialogue cache its prompt continues, or None.
        cached_length: the longest of those caches.
        num_layers: decoder layers of the language model.
        capacity: positions each layer has room for.
    """
    layers = [_PreallocatedLayer(capacity) for _ in range(num_layers)]
    if cached_length:
        reference = next(cache for cache in dialogue_caches if cache is not None)
        for index, layer in enumerate(layers):
            padded = []
            for part, like in enumerate(reference.layers[index]):
                tensor = like.new_zeros((len(dialogue_caches), like.shape[0], cached_length, like.shape[2]))
                for row, cache in enumerate(dialogue_caches):
                    if cache is not None:
                        tensor[row, :, cached_length - len(cache) :] = cache.layers[index][part]
                padded.append(tensor)
            layer.update(*padded)
    batch_cache = DynamicCache()
    batch_cache.layers = layers
    return batch_cache
