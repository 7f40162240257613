"""The response cache of a served evaluation: one JSON file per request, keyed by everything that decides the answer."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amft_vlm.checkpoint import write_text_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """One answer: its text and token usage, whether it came from the cache, and whether it was a refusal."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    from_cache: bool = False
    refused: bool = False


class ResponseCache:
    """Completions on disk, one JSON file per request key; safe across threads and processes.

    A write that fails (a full disk, a read-only directory) does not stop the run: the first failure is
    logged once, and the run goes on without writing (entries already there are still read).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--cache-dir: cannot create {self.directory} ({error.strerror}); choose another or --no-cache") from error
        self.writable = True
        self._lock = threading.Lock()

    @staticmethod
    def key(
        api_base: str,
        model: str,
        messages: list[dict[str, Any]],
        arguments: dict[str, Any],
        sample: dict[str, int] | None,
        *,
        server: dict[str, Any] | None = None,
        tag: str | None = None,
    ) -> str:
        """The SHA-256 of the canonical JSON of what decides an answer (images by their data URL's hash).

        Args:
            api_base: the endpoint (without credentials).
            model: the model name.
            messages: the dialogue so far.
            arguments: the sampling fields sent (the keywords and the extra body fields, as the request's JSON has them).
            sample: for a sampled request, where it is in the run (sampling seed, episode, request); None when greedy.
            server: what ``GET /models`` says of the model (`amft_vlm.served.client.server_identity`); None when it
                says nothing (no such endpoint, or it failed however often it was asked).
            tag: the user's ``--cache-tag``.
        """
        canonical = {
            "endpoint": api_base,
            "model": model,
            "server": server,
            "tag": tag,
            "messages": [_hash_images(message) for message in messages],
            "sampling": arguments,
            "sample": sample,
        }
        return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def get(self, key: str) -> Completion | None:
        """The cached completion, or None (also for an unreadable file, which is then replaced).

        An entry written before refusals were stored (no ``refused``) reads as no refusal.
        """
        path = self.directory / f"{key}.json"
        try:
            data = json.loads(path.read_text())
            return Completion(
                str(data["text"]),
                int(data["prompt_tokens"]),
                int(data["completion_tokens"]),
                from_cache=True,
                refused=bool(data.get("refused", False)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("ignoring the unreadable cache entry %s", path)
            return None

    def put(self, key: str, completion: Completion) -> None:
        """Store `completion` under `key`, atomically (`write_text_atomic`); a failure only warns, once."""
        if not self.writable:
            return
        data = {
            "text": completion.text,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "refused": completion.refused,
        }
        try:
            write_text_atomic(self.directory / f"{key}.json", json.dumps(data))
        except OSError as error:
            with self._lock:
                warn, self.writable = self.writable, False
            if warn:
                logger.warning(
                    "cannot write the response cache in %s (%s): going on without caching; a rerun will ask again "
                    "for the answers of this one (free the disk or choose another --cache-dir)",
                    self.directory, error.strerror or error,
                )


def _hash_images(message: dict[str, Any]) -> dict[str, Any]:
    if isinstance(message["content"], str):
        return message
    parts = [
        {"type": "image_url", "sha256": hashlib.sha256(part["image_url"]["url"].encode()).hexdigest()}
        if part["type"] == "image_url"
        else part
        for part in message["content"]
    ]
    return {**message, "content": parts}
