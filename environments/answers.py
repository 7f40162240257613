"""What both environments share about reading and judging a model's answer."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_TRAILING_COMMA = re.compile(r",\s*([}\]])")


@dataclass(frozen=True)
class Judgement:
    """A verifier's answer to one attempt: the reward, a verdict name, and feedback for the model."""

    reward: float
    verdict: str
    feedback: str

    @property
    def correct(self) -> bool:
        """True when the attempt was right (the verdict ``"correct"``)."""
        return self.verdict == "correct"


def json_object(text: str) -> dict | None:
    """The answer as a JSON object, or None: the whole text, else its outermost ``{...}``.

    Models often wrap JSON in prose or code fences, and leave trailing commas; both are tolerated.
    Deeply nested input cannot crash it (``RecursionError`` counts as "not JSON").
    """
    candidates = [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        for attempt in (candidate, _TRAILING_COMMA.sub(r"\1", candidate)):
            try:
                value = json.loads(attempt)
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                return value
    return None
