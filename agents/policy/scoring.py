"""Teacher-forced scoring: log-probs and entropies of chosen tokens, and hidden states for a critic.

`token_logprobs` reproduces the log-probs generation sampled with (the importance ratio of an
on-policy sample is 1 up to float error): the same ``log_softmax(logits / temperature)`` with the
vision placeholders at probability 0, over the same rope positions (see `agents.policy.batching`).
Two paths give the same numbers up to float rounding: one left-padded pass over the full sequences,
or, when a batch's sequences begin with the same tokens (their shared prefix, e.g. a GeneralPoints
batch shares all but its hand), one pass over those tokens for a single row and then each row's rest.

The full-vocabulary float32 tensors are built `SCORE_CHUNK` target positions at a time, and with
gradients each chunk is recomputed in the backward pass, so only the model's logits are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from agents.policy import batching
from agents.policy.encoder import TokenSequence

if TYPE_CHECKING:
    from agents.policy.loaded_model import LoadedModel

MIN_SHARED_PREFIX = 16
"""`token_logprobs` runs a shared prefix of at least this many tokens once per batch."""

SCORE_CHUNK = 256
"""Target positions whose log-probs (and entropies) are computed together: bounds the float32 full-vocabulary
tensors alive at once to ``SCORE_CHUNK x vocab``."""


def token_logprobs(
    policy: LoadedModel,
    sequences: Sequence[TokenSequence],
    target_positions: Sequence[Sequence[int]],
    *,
    temperature: float,
    with_entropy: bool,
    share_prefix: bool,
    entropy_grad: bool = False,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`VLMPolicy.token_logprobs` (documented there) with `policy`'s model."""
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
    shared = shared_prefix_length(sequences, positions) if share_prefix else 0
    if shared:
        row_logits = _logits_after_shared_prefix(policy, sequences, positions, shared)
    else:
        row_logits = _logits_left_padded(policy, sequences, positions)
    device = policy.device
    suppressed = torch.tensor(policy.encoder.suppressed_token_ids, dtype=torch.long, device=device)
    results, entropies = [], []
    for sequence, targets, logits in zip(sequences, positions, row_logits, strict=True):
        tokens = torch.tensor([sequence.token_ids[t] for t in targets], dtype=torch.long, device=device)
        chunks = range(0, len(targets), SCORE_CHUNK)
        if logits.requires_grad:
            # Recomputed in the backward pass: only the logits are kept, no float32 full-vocabulary copy.
            parts = [
                checkpoint(_chunk_logprobs, logits[i : i + SCORE_CHUNK], tokens[i : i + SCORE_CHUNK], suppressed, temperature, use_reentrant=False)
                for i in chunks
            ]
        else:
            parts = [_chunk_logprobs(logits[i : i + SCORE_CHUNK], tokens[i : i + SCORE_CHUNK], suppressed, temperature) for i in chunks]
        results.append(torch.cat(parts) if parts else at_least_float32(logits.new_zeros(0)))
        if with_entropy and entropy_grad and logits.requires_grad:  # a loss term (an entropy bonus), recomputed like the log-probs
            entropy = [
                checkpoint(_chunk_entropy, logits[i : i + SCORE_CHUNK], suppressed, temperature, use_reentrant=False) for i in chunks
            ]
            entropies.append(torch.cat(entropy) if entropy else at_least_float32(logits.new_zeros(0)))
        elif with_entropy:  # a diagnostic: no graph
            with torch.no_grad():
                entropy = [_chunk_entropy(logits[i : i + SCORE_CHUNK], suppressed, temperature) for i in chunks]
            entropies.append(torch.cat(entropy) if entropy else at_least_float32(logits.new_zeros(0)))
    return (results, entropies) if with_entropy else results


def shared_prefix_length(sequences: Sequence[TokenSequence], positions: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with that no target needs a logit from; 0 when sharing would not pay.

    Only text-only batches of two or more sequences share (an image changes rope positions after it),
    and only a shared prefix of at least `MIN_SHARED_PREFIX` tokens.
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


def _logits_left_padded(
    policy: LoadedModel, sequences: Sequence[TokenSequence], positions: list[list[int]]
) -> list[torch.Tensor]:
    """Per sequence, the logits ``(len(targets), vocab)`` that predict its targets: one left-padded pass."""
    batch = policy.collate(sequences)
    length = batch.input_ids.shape[1]
    padded_targets = [
        [pad_length + target for target in targets]
        for pad_length, targets in zip(batch.pad_lengths, positions, strict=True)
    ]
    earliest = min((min(targets) for targets in padded_targets if targets), default=length)
    # Only positions earliest-1 .. length-2 predict a target; the LM head skips the rest.
    outputs = policy.forward(
        **batch.model_inputs(policy.dtype),
        position_ids=batching.position_ids(policy.model, batch),
        use_cache=False,
        logits_to_keep=length - earliest + 1,
    )
    first_kept = length - outputs.logits.shape[1]
    return [
        outputs.logits[row, torch.tensor(targets, dtype=torch.long, device=policy.device) - 1 - first_kept]
        for row, targets in enumerate(padded_targets)
    ]


def _logits_after_shared_prefix(
    policy: LoadedModel, sequences: Sequence[TokenSequence], positions: list[list[int]], shared: int
) -> list[torch.Tensor]:
    """As `_logits_left_padded`, but the first `shared` tokens (the same in every row) are run once.

    The shared prefix's keys and values are computed for one row and broadcast to the batch (gradients
    sum back through the broadcast); each row's remainder follows, right-padded, at positions ``shared``
    onward. Same log-probs and gradients as the padded pass up to float rounding, and the shared prefix
    costs one row instead of one per sequence.
    """
    device = policy.device
    shared_ids = torch.tensor([sequences[0].token_ids[:shared]], dtype=torch.long, device=device)
    shared_cache = policy.forward(
        input_ids=shared_ids,
        attention_mask=torch.ones_like(shared_ids),
        position_ids=torch.arange(shared, device=device)[None],
        use_cache=True,
        logits_to_keep=1,  # the shared prefix predicts no target; only its keys and values are wanted
    ).past_key_values
    batch_size = len(sequences)
    for layer in shared_cache.layers:
        layer.keys = layer.keys.expand(batch_size, -1, -1, -1)
        layer.values = layer.values.expand(batch_size, -1, -1, -1)
    rest_length = max(len(sequence) for sequence in sequences) - shared
    input_ids = torch.full((batch_size, rest_length), policy.encoder.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, shared + rest_length), dtype=torch.long)
    attention_mask[:, :shared] = 1
    for row, sequence in enumerate(sequences):
        rest = sequence.token_ids[shared:]
        input_ids[row, : len(rest)] = torch.tensor(rest, dtype=torch.long)
        attention_mask[row, shared : shared + len(rest)] = 1
    outputs = policy.forward(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=(shared + torch.arange(rest_length, device=device)).expand(batch_size, -1),
        past_key_values=shared_cache,
        use_cache=True,
    )
    return [
        outputs.logits[row, torch.tensor(targets, dtype=torch.long, device=device) - 1 - shared]
        for row, targets in enumerate(positions)
    ]


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """`logits` in float32, or in their own dtype when wider (a float64 model keeps float64 probabilities)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _tempered_log_normaliser(logits: torch.Tensor, suppressed: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits / temperature`` in float32 (or wider, `at_least_float32`) with `suppressed` at ``-inf``, its log-sum-exp per row)."""
    scaled = (at_least_float32(logits) / temperature).index_fill(-1, suppressed, float("-inf"))
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


@torch.no_grad()
def hidden_states(
    policy: LoadedModel, sequences: Sequence[TokenSequence], positions: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """`VLMPolicy.hidden_states` (documented there) with `policy`'s model."""
    if len(positions) != len(sequences):
        raise ValueError(f"got {len(positions)} position lists for {len(sequences)} sequences")
    for row, (sequence, wanted) in enumerate(zip(sequences, positions, strict=True)):
        if wanted and not (min(wanted) >= 0 and max(wanted) < len(sequence)):
            raise ValueError(f"positions of sequence {row} must lie in [0, {len(sequence) - 1}]")
    batch = policy.collate(sequences)
    outputs = policy.forward(
        **batch.model_inputs(policy.dtype),
        position_ids=batching.position_ids(policy.model, batch),
        use_cache=False,
        module=policy.model.model,
    )
    states = outputs.last_hidden_state
    return [
        states[row, [batch.pad_lengths[row] + position for position in wanted]].float()
        for row, wanted in enumerate(positions)
    ]
