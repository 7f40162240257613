"""A Qwen-VL model as a policy, one concept per module.

- `encoder`: `ChatEncoder` (tokenizer + image processor, no model) and `TokenSequence`.
- `batching`: `PaddedBatch`, left-padded collation, multimodal rope positions.
- `kv_cache`: `DialogueCache` (a dialogue's keys and values between turns) and the batch cache.
- `generation`: the decoding loop, `Generation`, `choose_tokens`.
- `scoring`: teacher-forced log-probs and entropies, hidden states for a critic.
- `policy`: `VLMPolicy`, loading and a facade over the above; `PolicyResponder`, the policy as a token responder.
"""

from agents.policy.batching import PaddedBatch
from agents.policy.encoder import END_OF_TURN_TOKEN, IMAGE_TOKEN, ChatEncoder, TokenSequence
from agents.policy.generation import Generation, check_sampling, choose_tokens
from agents.policy.kv_cache import DialogueCache, KVPrefix
from agents.policy.policy import PolicyResponder, VLMPolicy
from agents.policy.scoring import MIN_SHARED_PREFIX, SCORE_CHUNK

__all__ = [
    "END_OF_TURN_TOKEN",
    "IMAGE_TOKEN",
    "MIN_SHARED_PREFIX",
    "SCORE_CHUNK",
    "ChatEncoder",
    "DialogueCache",
    "Generation",
    "KVPrefix",
    "PaddedBatch",
    "PolicyResponder",
    "TokenSequence",
    "VLMPolicy",
    "check_sampling",
    "choose_tokens",
]
