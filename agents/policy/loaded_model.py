"""What the decoding loop and the scorer use of a policy: its loaded model and encoder, nothing else.

`agents.policy.generation` and `agents.policy.scoring` take a `LoadedModel` rather than `VLMPolicy`, so the
facade (`agents.policy.policy`) imports them and they never import it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from agents.policy.batching import PaddedBatch
from agents.policy.encoder import ChatEncoder, TokenSequence


class LoadedModel(Protocol):
    """A loaded vision-language model with its encoder, as `VLMPolicy` holds them."""

    model: Any
    """The Hugging Face model (its ``config``, ``model.language_model`` and ``lm_head`` are read)."""
    encoder: ChatEncoder
    """Tokenizer and image processor: pad, stop and suppressed token ids, decoding."""

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (image inputs are cast to it)."""

    def autocast(self) -> Any:
        """The context of every forward pass (mixed precision, or none)."""

    def forward(self, module: Any = None, **inputs: Any) -> Any:
        """One forward pass of the model (or of `module`) under `autocast`."""

    def collate(self, sequences: Sequence[TokenSequence]) -> PaddedBatch:
        """`sequences` left-padded into one batch on `device`."""
