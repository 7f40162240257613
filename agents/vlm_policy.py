"""The former home of `VLMPolicy`; everything now lives in `agents.policy`, re-exported here.

New code imports from `agents.policy`. ``SCORE_CHUNK`` here is a copy: patch
``agents.policy.scoring.SCORE_CHUNK``, which scoring reads.
"""

from agents.policy import (
    END_OF_TURN_TOKEN,
    IMAGE_TOKEN,
    MIN_SHARED_PREFIX,
    SCORE_CHUNK,
    ChatEncoder,
    DialogueCache,
    Generation,
    KVPrefix,
    PaddedBatch,
    TokenSequence,
    VLMPolicy,
    check_sampling,
    choose_tokens,
)

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
    "TokenSequence",
    "VLMPolicy",
    "check_sampling",
    "choose_tokens",
]
