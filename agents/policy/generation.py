"""Batched decoding with explicit sampling, and the boundary a generation backend fills.

`generate` draws each token from ``softmax(logits / T)`` and nothing else (`choose_tokens`), returns
each response's tokens with their log-probs under that distribution (`Generation`), and can keep each
dialogue's key-value cache (`DialogueCache`) so its next turn prefills only the new tokens.
`agents.policy.PolicyResponder` puts it behind the answering seam (`agents.responder.Responder`): a vLLM or
SGLang engine would be another token responder with the same contract (tokens from ``softmax(logits /
temperature)`` exactly, vision placeholders never drawn, log-probs that teacher forcing reproduces).

Why our own decoding loop rather than ``model.generate``: resuming each dialogue from its own cache
puts padding between a row's cached keys and its new tokens, which ``generate``'s position bookkeeping
for Qwen-VL (one rope offset per row, from the first prompt) cannot express. The loop is short: one
prefill, then one forward per token over the rows still generating (finished rows leave the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache

from agents.policy import batching
from agents.policy.encoder import TokenSequence
from agents.policy.kv_cache import DialogueCache, new_batch_cache
from agents.policy.scoring import MIN_SHARED_PREFIX, at_least_float32
from agents.vision_inputs import ImageInputs

if TYPE_CHECKING:
    from agents.policy.loaded_model import LoadedModel


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
    cache: DialogueCache | None = None


def check_sampling(*, temperature: float, max_new_tokens: int, greedy: bool) -> None:
    """Raise ValueError for sampling settings `generate` cannot use."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling; got {temperature} (use greedy=True)")


def choose_tokens(
    logits: torch.Tensor,
    suppressed: torch.Tensor,
    *,
    temperature: float,
    greedy: bool,
    generators: Sequence[torch.Generator] | None = None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``softmax(logits / temperature)`` with `suppressed` ids at probability 0.

    Returns the chosen ids ``(batch,)`` and their log-probs under that distribution (float32, float64 for a
    float64 model); greedy
    takes the arg-max, whose log-prob is then read at the given temperature. With `generators` (one CPU
    generator per row) each row's uniform draw comes from its own generator; `uniform` ``(batch, 1)``
    float64 gives the draws instead.
    """
    scaled = at_least_float32(logits).index_fill(-1, suppressed, float("-inf"))
    log_distribution = torch.log_softmax(scaled if temperature == 1.0 else scaled / temperature, dim=-1)
    if greedy:
        chosen = log_distribution.argmax(dim=-1)
    else:
        # Inverse CDF: the first token whose cumulative probability exceeds u ~ U(0, total). A token of
        # probability 0 never exceeds the one before it, so it is never drawn. Same law as
        # ``torch.multinomial``, at a sixth of its cost per call on CPU; float64 keeps the sums exact
        # enough for a 150k vocabulary.
        cumulative = log_distribution.double().exp_().cumsum_(dim=-1)
        if uniform is not None:
            uniform = uniform.to(cumulative.device)
        elif generators is None:
            uniform = torch.rand_like(cumulative[:, :1])
        else:
            draws = [torch.rand((1,), generator=generator, dtype=torch.float64) for generator in generators]
            uniform = torch.stack(draws).to(cumulative.device)
        threshold = uniform * cumulative[:, -1:]
        chosen = torch.searchsorted(cumulative, threshold, right=True).squeeze(1)
    return chosen, log_distribution.gather(1, chosen[:, None]).squeeze(1)


@torch.no_grad()
def generate(
    policy: LoadedModel,
    prompts: Sequence[TokenSequence],
    *,
    temperature: float,
    max_new_tokens: int,
    greedy: bool,
    caches: Sequence[DialogueCache | None] | None,
    keep_cache: bool,
    generators: Sequence[torch.Generator] | None,
    share_prefix: bool = True,
) -> list[Generation]:
    """`VLMPolicy.generate` (documented there): check the arguments, then run the decoding loop."""
    check_sampling(temperature=temperature, max_new_tokens=max_new_tokens, greedy=greedy)
    if not prompts:
        raise ValueError("need at least one prompt")
    for row, prompt in enumerate(prompts):
        batching.check_image_tokens(row, prompt, policy.encoder.image_token_id)
    if caches is None:
        caches = [None] * len(prompts)
    elif len(caches) != len(prompts):
        raise ValueError(f"got {len(caches)} caches for {len(prompts)} prompts")
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"got {len(generators)} generators for {len(prompts)} prompts")
    reusable_caches = [
        cache if cache is not None and cache.is_continued_by(prompt) else None
        for prompt, cache in zip(prompts, caches, strict=True)
    ]
    # One autocast context for the whole call: autocast keeps its half-precision copy of each weight
    # until the outermost context exits, instead of re-casting every weight at every token.
    with policy.autocast():
        if share_prefix:
            reusable_caches = _share_prompt_prefix(policy, prompts, reusable_caches)
        return _decode(
            policy,
            prompts,
            reusable_caches,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            keep_cache=keep_cache,
            generators=generators,
        )


def _decode(
    policy: LoadedModel,
    prompts: Sequence[TokenSequence],
    reusable_caches: Sequence[DialogueCache | None],
    *,
    temperature: float,
    max_new_tokens: int,
    greedy: bool,
    keep_cache: bool,
    generators: Sequence[torch.Generator] | None,
) -> list[Generation]:
    """The decoding loop of `generate`: prefill, then one forward per token over the unfinished rows."""
    logits, batch_cache, attention_mask, next_positions = _prefill(
        policy, prompts, reusable_caches, extra=max_new_tokens
    )
    temperature = 1.0 if greedy else temperature
    suppressed = torch.tensor(policy.encoder.suppressed_token_ids, dtype=torch.long, device=policy.device)
    stop_tokens = set(policy.encoder.stop_token_ids)
    rope = None
    if _plain_decoder(policy):
        rope = _text_rope_table(policy, int(next_positions.max()) + max_new_tokens)

    rows = list(range(len(prompts)))  # the prompt of each batch row still generating
    uniforms = None
    if generators is not None and not greedy:
        # Every draw a response may need, one call per row: a row's draws still come from its generator only.
        uniforms = torch.stack(
            [torch.rand(max_new_tokens, generator=generator, dtype=torch.float64) for generator in generators]
        )
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    kept: list[DialogueCache | None] = [None] * len(prompts)
    for step in range(max_new_tokens):
        chosen, chosen_logprobs = choose_tokens(
            logits,
            suppressed,
            temperature=temperature,
            greedy=greedy,
            uniform=None if uniforms is None else uniforms[:, step : step + 1],
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
                kept[row] = DialogueCache.from_batch_row(
                    batch_cache,
                    attention_mask[batch_row],
                    batch_row,
                    prompts[row],
                    tokens[row][:-1],
                    int(next_positions[batch_row]),
                )
        if not going_on:
            break
        if len(going_on) < len(rows):
            index = torch.tensor(going_on, dtype=torch.long, device=policy.device)
            batch_cache.batch_select_indices(index)
            attention_mask, next_positions, chosen = (
                attention_mask[index],
                next_positions[index],
                chosen[index],
            )
            uniforms = None if uniforms is None else uniforms[index]
            rows = [rows[batch_row] for batch_row in going_on]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
        if rope is None:
            logits = policy.forward(
                input_ids=chosen[:, None],
                attention_mask=attention_mask,
                position_ids=next_positions.view(1, -1, 1).expand(3, -1, 1),
                past_key_values=batch_cache,
                use_cache=True,
            ).logits[:, -1]
        else:
            logits = _decode_step(policy, chosen, attention_mask, next_positions, batch_cache, rope)
        next_positions = next_positions + 1

    generations = []
    for row in range(len(prompts)):
        finished = tokens[row][-1] in stop_tokens
        generations.append(
            Generation(
                token_ids=tokens[row],
                logprobs=torch.tensor(logprobs[row], dtype=torch.float32),
                text=policy.encoder.decode(tokens[row][:-1] if finished else tokens[row]),
                finished=finished,
                cache=kept[row],
            )
        )
    return generations


def _plain_decoder(policy: LoadedModel) -> bool:
    """Whether every decoder layer attends to the whole cache, so `_decode_step` may run the layers itself."""
    return set(policy.model.config.get_text_config().layer_types) == {"full_attention"}


def _text_rope_table(policy: LoadedModel, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rope cos and sin ``(length, head_dim)`` of text positions ``0 .. length - 1``.

    A text token's three mrope rows are equal, which is plain rope at its position: the model's own
    rotary embedding over one row of positions gives the table `_decode_step` reads from.
    """
    positions = torch.arange(length, device=policy.device).view(1, 1, -1).expand(3, 1, -1)
    cos, sin = policy.model.model.language_model.rotary_emb(torch.empty(0, device=policy.device), positions)
    return cos[0], sin[0]


def _decode_step(
    policy: LoadedModel,
    token_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    batch_cache: DynamicCache,
    rope: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Next-token logits ``(batch, vocab)`` after one more text token per row at rope `positions`.

    The Qwen2 decoder step written out over the model's modules, the projections called as modules
    (LoRA adapters apply): the model's forward spends more time in its wrappers (image handling, rope
    index, a 4-D mask rebuilt from the 2-D one, output records) than in the layers at small sizes.
    Same arithmetic as the forward pass (rope from `_text_rope_table`, attention on the key/value heads
    with the grouped queries folded as Hugging Face folds them for one token).
    """
    text_model = policy.model.model.language_model
    batch = token_ids.shape[0]
    hidden = text_model.embed_tokens(token_ids[:, None])
    cos = rope[0].index_select(0, positions).to(hidden.dtype)[:, None, None, :]
    sin = rope[1].index_select(0, positions).to(hidden.dtype)[:, None, None, :]
    # One additive mask for all layers: a boolean one is converted to this inside every attention call.
    mask = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device)
    mask = mask.masked_fill_(attention_mask == 0, float("-inf"))[:, None, None, :]
    for layer, layer_cache in zip(text_model.layers, batch_cache.layers, strict=True):
        attention, mlp = layer.self_attn, layer.mlp
        heads, kv_heads, dim = attention.num_heads, attention.num_key_value_heads, attention.head_dim
        normed = _rms_norm(hidden, layer.input_layernorm)
        query = attention.q_proj(normed).view(batch, heads, 1, dim)
        key = attention.k_proj(normed).view(batch, kv_heads, 1, dim)
        value = attention.v_proj(normed).view(batch, kv_heads, 1, dim)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        keys, values = layer_cache.update(key, value)
        grouped_query = query.view(batch, kv_heads, heads // kv_heads, dim)
        attended = torch.nn.functional.scaled_dot_product_attention(
            grouped_query, keys, values, attn_mask=mask.to(query.dtype), scale=attention.scaling
        )
        hidden = hidden + attention.o_proj(attended.reshape(batch, 1, heads * dim))
        normed = _rms_norm(hidden, layer.post_attention_layernorm)
        hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed))
    return policy.model.lm_head(_rms_norm(hidden, text_model.norm)[:, -1])


def _rms_norm(hidden: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """Qwen's RMSNorm (statistics in float32, or float64 for a float64 model) with the weight and epsilon of `norm`."""
    normed = at_least_float32(hidden)
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * normed.to(hidden.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _share_prompt_prefix(
    policy: LoadedModel, prompts: Sequence[TokenSequence], reusable_caches: Sequence[DialogueCache | None]
) -> list[DialogueCache | None]:
    """`reusable_caches`, each uncached text-only prompt given the cache of the tokens all of them begin with.

    Environment prompts share their instructions (a GeneralPoints batch differs only in the hand): that
    prefix runs once, for one row, instead of once per prompt. Only from two such prompts sharing
    `MIN_SHARED_PREFIX` tokens; prompts with an image keep their own prefill (rope follows the image).
    """
    rows = [
        row
        for row, (prompt, cache) in enumerate(zip(prompts, reusable_caches, strict=True))
        if cache is None and prompt.images is None
    ]
    if len(rows) < 2:
        return list(reusable_caches)
    first = prompts[rows[0]].token_ids
    shared = min(len(prompts[row]) for row in rows) - 1  # every row keeps a token to prefill
    for row in rows[1:]:
        ids = prompts[row].token_ids
        shared = next((i for i in range(shared) if ids[i] != first[i]), shared)
    if shared < MIN_SHARED_PREFIX:
        return list(reusable_caches)
    input_ids = torch.tensor([first[:shared]], dtype=torch.long, device=policy.device)
    prefix_cache = policy.forward(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        position_ids=torch.arange(shared, device=policy.device).view(1, 1, -1).expand(3, 1, -1),
        use_cache=True,
        logits_to_keep=1,
    ).past_key_values
    cache = DialogueCache(
        token_ids=tuple(first[:shared]),
        images=None,
        layers=tuple((layer.keys[0], layer.values[0]) for layer in prefix_cache.layers),
        next_position=shared,
    )
    sharing = set(rows)
    return [cache if row in sharing else reusable for row, reusable in enumerate(reusable_caches)]


def _prefill(
    policy: LoadedModel,
    prompts: Sequence[TokenSequence],
    reusable_caches: Sequence[DialogueCache | None],
    *,
    extra: int,
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
    """Run the model over each prompt's uncached tokens, in a batch cache with room for `extra` more.

    Each prompt's new tokens are left-padded; a prompt continuing a cache starts from its keys and
    values, so padding sits between a row's cached keys and its new tokens: the attention mask hides
    it and the rope positions skip it.

    Returns the next-token logits ``(batch, vocab)``, the batch's key-value cache, its attention
    mask ``(batch, cache length)`` and each row's next rope position ``(batch,)``.
    """
    cached = [0 if cache is None else len(cache) for cache in reusable_caches]
    new_tokens = [prompt.token_ids[length:] for prompt, length in zip(prompts, cached, strict=True)]
    cached_length, new_length = max(cached), max(len(tokens) for tokens in new_tokens)
    batch = len(prompts)
    input_ids = torch.full((batch, new_length), policy.encoder.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, cached_length + new_length), dtype=torch.long)
    position_ids = torch.zeros((3, batch, new_length), dtype=torch.long)
    next_positions, images = [], []
    for row, (prompt, cache, tokens) in enumerate(zip(prompts, reusable_caches, new_tokens, strict=True)):
        start = new_length - len(tokens)
        input_ids[row, start:] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, cached_length - cached[row] : cached_length] = 1
        attention_mask[row, cached_length + start :] = 1
        if cache is not None:
            positions = cache.next_position + torch.arange(len(tokens))
        else:
            positions = batching.prompt_position_ids(policy.model, prompt, policy.encoder.image_token_id)
            if prompt.images is not None:
                images.append(prompt.images)
        position_ids[:, row, start:] = positions
        next_positions.append(int(positions.max()) + 1)

    batch_cache = new_batch_cache(
        reusable_caches,
        cached_length,
        num_layers=policy.model.config.get_text_config().num_hidden_layers,
        capacity=cached_length + new_length + extra,
    )
    inputs: dict[str, Any] = {
        "input_ids": input_ids.to(policy.device),
        "attention_mask": attention_mask.to(policy.device),
        "position_ids": position_ids.to(policy.device),
        "past_key_values": batch_cache,
        "use_cache": True,
        "logits_to_keep": 1,
    }
    if images:
        merged = ImageInputs.concatenate(images)
        inputs["pixel_values"] = merged.pixel_values.to(policy.device, policy.dtype)
        inputs["image_grid_thw"] = merged.image_grid_thw.to(policy.device)
    outputs = policy.forward(**inputs)
    return (
        outputs.logits[:, -1],
        outputs.past_key_values,
        inputs["attention_mask"],
        torch.tensor(next_positions, dtype=torch.long, device=policy.device),
    )
