"""A vision-language model as a policy: token-in/token-out generation and teacher-forced log-probs.

`VLMPolicy` wraps a Hugging Face image-text-to-text model of the Qwen-VL family (Qwen2-VL, Qwen2.5-VL,
or a tiny checkpoint from `agents.tiny`) with a `ChatEncoder` (its tokenizer and image processor). It
loads the checkpoint, owns the dtype, device and autocast settings, and offers what a rollout engine
and a learner need, each implemented in its own module:

- encoding (`agents.policy.encoder`): `encode_dialogue`, `encode_follow_up`, `tokenize`, ... delegate
  to `VLMPolicy.encoder`, so code holding a policy need not hold an encoder too;
- `collate` / `position_ids` (`agents.policy.batching`): left-padded batches and their rope positions;
- `generate` (`agents.policy.generation`): batched decoding with explicit sampling, each response's
  log-probs and optionally each dialogue's key-value cache (`agents.policy.kv_cache`);
- `responder`: the policy as a token `agents.responder.Responder` with its sampling settings bound
  (`PolicyResponder`), which the rollout engine plays like any other answerer;
- `token_logprobs` / `hidden_states` (`agents.policy.scoring`): teacher-forced log-probs that reproduce
  the sampling ones, entropies, and the hidden states a critic reads.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, GenerationConfig

from agents.chat import Dialogue
from agents.policy import batching, generation, scoring
from agents.policy.batching import PaddedBatch
from agents.policy.encoder import IMAGE_TOKEN, ChatEncoder, TokenSequence
from agents.policy.generation import Generation
from agents.policy.kv_cache import DialogueCache
from agents.responder import Answer, Request, answered
from agents.vision_inputs import ImageInputs, ImageLike

logger = logging.getLogger(__name__)

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _widen_rms_norms(model: torch.nn.Module) -> None:
    """Keep a float64 model in float64 in its RMSNorms too, which transformers' Qwen code computes in float32
    whatever the input: without this a float64 model rounds to float32 there, and two batch layouts of the
    same computation (one process and two, padded and not) differ by ~1e-7 instead of ~1e-15."""

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(forward, module)


def _encoder_attribute(name: str) -> property:
    """A read-only property giving ``self.encoder.<name>``."""
    return property(
        lambda policy: getattr(policy.encoder, name), doc=f"The encoder's `ChatEncoder.{name}`."
    )


class VLMPolicy:
    """A Qwen-VL-family chat model acting as a policy over token sequences.

    Build it with `from_pretrained`. It holds `model` and `encoder` (a `ChatEncoder`); the encoder's
    token ids and pixel bounds read through the policy too: `end_of_turn_token_id` (``<|im_end|>``),
    `stop_token_ids` (end of turn and eos ids), `pad_token_id`, `image_token_id`, `video_token_id`,
    `suppressed_token_ids` (the vision placeholders, never generated), `min_pixels` / `max_pixels`,
    `tokenizer`, `image_processor`.

    The constructor replaces the model's ``generation_config`` with a neutral one (only bos/eos/pad
    ids) and keeps the checkpoint's in `checkpoint_generation_config`: Instruct checkpoints ship
    near-greedy sampling defaults (``top_k=1``, ``top_p=0.001``, ``repetition_penalty=1.05``) that
    ``generate`` merges into every call for each setting the call leaves unset. `generate` also sets
    every sampling setting explicitly, so either measure alone keeps them out.

    Args:
        model: a Hugging Face image-text-to-text model of the Qwen-VL family.
        tokenizer: its tokenizer, with a chat template (not with `encoder`).
        image_processor: its Qwen2-VL image processor (the PIL one works without torchvision).
        min_pixels: smallest resized image area; defaults to the image processor's.
        max_pixels: largest resized image area; defaults to the image processor's.
        encoder: a `ChatEncoder` of the same checkpoint, instead of `tokenizer`, `image_processor`
            and the pixel bounds.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        image_processor: Any = None,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        encoder: ChatEncoder | None = None,
    ) -> None:
        if not hasattr(getattr(model, "model", None), "get_rope_index"):
            raise ValueError(
                f"{type(model).__name__} is not a Qwen-VL-family model (no model.get_rope_index); VLMPolicy "
                "relies on Qwen-VL's image placeholder tokens and multimodal rope positions"
            )
        self.model = model
        self.checkpoint_generation_config = model.generation_config
        if encoder is None:
            if tokenizer is None or image_processor is None:
                raise ValueError("VLMPolicy needs a tokenizer and an image processor, or an encoder")
            encoder = ChatEncoder(
                tokenizer,
                image_processor,
                image_token_id=model.config.image_token_id,
                video_token_id=getattr(model.config, "video_token_id", None),
                eos_token_ids=self.checkpoint_generation_config.eos_token_id,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
            )
        elif tokenizer is not None or image_processor is not None or min_pixels is not None or max_pixels is not None:
            raise ValueError("pass either an encoder or a tokenizer, image processor and pixel bounds, not both")
        if encoder.image_token_id != int(model.config.image_token_id):
            raise ValueError(
                f"tokenizer's {IMAGE_TOKEN} id {encoder.image_token_id} differs from the model config's "
                f"image_token_id {model.config.image_token_id}; tokenizer and model come from different checkpoints"
            )
        self.encoder = encoder
        self.share_prefix = True
        """Let `token_logprobs` run a prefix every sequence shares once (off under sharded training)."""
        self.autocast_dtype: torch.dtype | None = None
        """Run every forward pass under ``torch.autocast`` in this dtype (e.g. bfloat16 compute over float32
        master weights); None runs in the parameters' dtype."""
        model.generation_config = GenerationConfig(
            bos_token_id=self.checkpoint_generation_config.bos_token_id,
            eos_token_id=list(encoder.stop_token_ids),
            pad_token_id=encoder.pad_token_id,
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
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"`` (exactness checks: the tests compare
                one and two processes in it, where rounding cannot flip a sampled token) or a ``torch.dtype``.
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
        if dtype == torch.float64:
            _widen_rms_norms(model)
        encoder = ChatEncoder.from_pretrained(
            path_or_id, min_pixels=min_pixels, max_pixels=max_pixels, revision=revision
        )
        logger.info(
            "loaded %s (%s, %s, %s attention) from %s",
            type(model).__name__,
            dtype,
            device,
            attn_implementation,
            path_or_id,
        )
        return cls(model, encoder=encoder)

    tokenizer = _encoder_attribute("tokenizer")
    image_processor = _encoder_attribute("image_processor")
    min_pixels = _encoder_attribute("min_pixels")
    max_pixels = _encoder_attribute("max_pixels")
    end_of_turn_token_id = _encoder_attribute("end_of_turn_token_id")
    image_token_id = _encoder_attribute("image_token_id")
    video_token_id = _encoder_attribute("video_token_id")
    suppressed_token_ids = _encoder_attribute("suppressed_token_ids")
    stop_token_ids = _encoder_attribute("stop_token_ids")
    pad_token_id = _encoder_attribute("pad_token_id")

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters."""
        return next(self.model.parameters()).dtype

    def autocast(self) -> Any:
        """``torch.autocast`` in `autocast_dtype` (a no-op context without one)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward(self, module: Any = None, **inputs: Any) -> Any:
        """``module(**inputs)`` (the whole model by default) under `autocast_dtype` when one is set."""
        module = self.model if module is None else module
        with self.autocast():
            return module(**inputs)

    def prepare_images(self, images: Sequence[ImageLike]) -> ImageInputs:
        """`ChatEncoder.prepare_images`: smart-resize `images` and build their vision inputs."""
        return self.encoder.prepare_images(images)

    def render(self, dialogue: Dialogue, *, add_generation_prompt: bool) -> str:
        """`ChatEncoder.render`: the chat template's text for `dialogue`."""
        return self.encoder.render(dialogue, add_generation_prompt=add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        """`ChatEncoder.tokenize`: token ids of `text` exactly as written."""
        return self.encoder.tokenize(text)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """`ChatEncoder.decode`: text of `token_ids`."""
        return self.encoder.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def encode_dialogue(self, dialogue: Dialogue, *, add_generation_prompt: bool = True) -> TokenSequence:
        """`ChatEncoder.encode_dialogue`: token ids of `dialogue` with the image's vision inputs."""
        return self.encoder.encode_dialogue(dialogue, add_generation_prompt=add_generation_prompt)

    def expand_image_tokens(self, token_ids: Sequence[int], images: ImageInputs) -> list[int]:
        """`ChatEncoder.expand_image_tokens`: one ``<|image_pad|>`` per image token of each image."""
        return self.encoder.expand_image_tokens(token_ids, images)

    def encode_follow_up(self, text: str, *, close_assistant_turn: bool = False) -> list[int]:
        """`ChatEncoder.encode_follow_up`: the tokens after a response's end of turn when the user says `text`."""
        return self.encoder.encode_follow_up(text, close_assistant_turn=close_assistant_turn)

    def collate(self, sequences: Sequence[TokenSequence]) -> PaddedBatch:
        """Left-pad `sequences` into one batch on the model's device (`batching.collate`)."""
        return batching.collate(sequences, self.encoder, self.device)

    def position_ids(self, batch: PaddedBatch) -> torch.Tensor:
        """Rope position ids of `batch` that ignore the left padding (`batching.position_ids`)."""
        return batching.position_ids(self.model, batch)

    def check_sampling(self, *, temperature: float, max_new_tokens: int, greedy: bool) -> None:
        """Raise ValueError for sampling settings `generate` cannot use."""
        generation.check_sampling(temperature=temperature, max_new_tokens=max_new_tokens, greedy=greedy)

    def generate(
        self,
        prompts: Sequence[TokenSequence],
        *,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        greedy: bool = False,
        caches: Sequence[DialogueCache | None] | None = None,
        keep_cache: bool = False,
        generators: Sequence[torch.Generator] | None = None,
        share_prefix: bool = True,
    ) -> list[Generation]:
        """Generate one response per prompt, all prompts decoded together in one batch.

        Tokens are drawn from ``softmax(logits / temperature)`` exactly: no top-k, top-p, repetition
        penalty or other setting from the checkpoint's generation config, and the vision placeholders
        (`suppressed_token_ids`) at probability 0. A sequence stops at ``<|im_end|>`` or eos; finished
        sequences leave the batch. Use ``torch.manual_seed`` before the call for reproducible sampling.

        The first forward pass (prefill) takes each prompt's uncached tokens, left-padded; a prompt
        that continues its entry in `caches` starts from those keys and values, so a multi-turn
        dialogue pays only for its new tokens.

        Args:
            prompts: prompt token sequences, e.g. from `encode_dialogue` (ending with the assistant header).
            temperature: sampling temperature (ignored when `greedy`).
            max_new_tokens: the most tokens generated per response.
            greedy: take the arg-max token instead of sampling; log-probs are then at temperature 1.
            caches: for each prompt, a `DialogueCache` from an earlier call on the same dialogue, or None.
            keep_cache: return each response's `DialogueCache` in `Generation.cache`.
            generators: one CPU ``torch.Generator`` per prompt to draw its tokens from; a row's draws
                then do not depend on which other prompts share the batch. None draws from torch's
                global generator.
            share_prefix: prefill the tokens all uncached text-only prompts begin with once, for one row (at least
                `MIN_SHARED_PREFIX` of them: a GeneralPoints batch differs only in the hand), then each prompt's own
                tokens; False prefills each prompt whole. The results agree up to float rounding.

        Returns:
            One `Generation` per prompt, in order.
        """
        return generation.generate(
            self,
            prompts,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            caches=caches,
            keep_cache=keep_cache,
            generators=generators,
            share_prefix=share_prefix,
        )

    def responder(
        self, *, temperature: float = 1.0, max_new_tokens: int = 256, greedy: bool = False, keep_cache: bool = True,
        share_prefix: bool = True,
    ) -> PolicyResponder:
        """This policy as a token responder with these sampling settings (see `generate`); checks them now."""
        return PolicyResponder(
            self, temperature=temperature, max_new_tokens=max_new_tokens, greedy=greedy, keep_cache=keep_cache,
            share_prefix=share_prefix,
        )  # fmt: skip

    def token_logprobs(
        self,
        sequences: Sequence[TokenSequence],
        target_positions: Sequence[Sequence[int]],
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
        share_prefix: bool = True,
        entropy_grad: bool = False,
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
                float rounding. Off as well while the policy's `share_prefix` attribute is False.
            entropy_grad: the entropies keep their graph when grad is enabled (an entropy bonus in a loss);
                without it they are detached diagnostics.

        Returns:
            One float32 tensor per sequence with the log-probs of its target positions, in order;
            with `with_entropy`, a pair (log-probs, entropies) of such lists.
        """
        return scoring.token_logprobs(
            self,
            sequences,
            target_positions,
            temperature=temperature,
            with_entropy=with_entropy,
            share_prefix=share_prefix and self.share_prefix,
            entropy_grad=entropy_grad,
        )

    def hidden_states(
        self, sequences: Sequence[TokenSequence], positions: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """The language model's final hidden state (after its last norm) at chosen positions.

        One forward pass of the decoder stack (no LM head, no gradients) over the left-padded batch;
        e.g. position ``start - 1`` of a response is the state the policy chose its first token from.

        Returns:
            One float32 tensor ``(len(positions[i]), hidden_size)`` per sequence.
        """
        return scoring.hidden_states(self, sequences, positions)


class PolicyResponder:
    """A `VLMPolicy` with its sampling settings: a token `agents.responder.Responder`.

    Each `respond` call is one batched `VLMPolicy.generate` over the requests' prompts, with their
    caches and generators; the answers are the `Generation`s, already done.

    Args:
        policy: the policy that answers.
        temperature: sampling temperature (ignored when `greedy`).
        max_new_tokens: the most tokens per response.
        greedy: take the arg-max token instead of sampling.
        keep_cache: return each dialogue's keys and values with its answer, so its next turn prefills
            only the environment's reply (`Generation.cache`).
        share_prefix: prefill the prompts' shared beginning once (`VLMPolicy.generate`).
    """

    answers_in_tokens = True
    name = "policy"

    def __init__(
        self, policy: VLMPolicy, *, temperature: float, max_new_tokens: int, greedy: bool, keep_cache: bool, share_prefix: bool = True
    ) -> None:
        policy.check_sampling(temperature=temperature, max_new_tokens=max_new_tokens, greedy=greedy)
        self.policy = policy
        self.temperature, self.max_new_tokens, self.greedy, self.keep_cache = temperature, max_new_tokens, greedy, keep_cache
        self.share_prefix = share_prefix

    @property
    def sampling_temperature(self) -> float:
        """The temperature of the distribution the tokens are drawn from (1.0 for greedy decoding)."""
        return 1.0 if self.greedy else self.temperature

    def respond(self, requests: list[Request]) -> list[Future[Answer]]:
        """One `Generation` per request's prompt, decoded together in one batch."""
        if any(request.prompt is None for request in requests):
            raise ValueError("a policy answers token prompts; play it in an engine that records tokens: RolloutEngine(policy, ...)")
        generators = [request.generator for request in requests]
        generations = self.policy.generate(
            [request.prompt for request in requests],
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            greedy=self.greedy,
            caches=[request.cache for request in requests],
            keep_cache=self.keep_cache,
            generators=None if any(generator is None for generator in generators) else generators,
            share_prefix=self.share_prefix,
        )
        return [answered(generation) for generation in generations]
