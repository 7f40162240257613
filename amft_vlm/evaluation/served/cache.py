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

from amft_vlm.run.safe_io import load_json_text, output_directory, read_regular_text, write_text_atomic

logger = logging.getLogger(__name__)

MAX_ENTRY_BYTES = 64 * 2**20
"""Most bytes of a cache entry read when the caller gives no limit: an entry is one answer and its token counts."""


@dataclass(frozen=True)
class Completion:
    """One answer: its text and token usage, whether it came from the cache, and what was odd about it.

    Attributes:
        text: the answer (cut to the character limit ``max_tokens`` allows when it was longer, credentials masked).
        prompt_tokens: the prompt tokens the server reported (0 when it reported none, or no valid count).
        completion_tokens: the completion tokens it reported (likewise).
        from_cache: replayed from the cache.
        refused: a refusal (``finish_reason`` ``content_filter``, or a ``refusal`` message).
        truncated: the server's answer was longer than the character limit and was cut to it.
        invalid_usage: a token count was there but not a count (not a whole number from 0 to
            `amft_vlm.evaluation.served.client.MAX_TOKEN_COUNT`: NaN, infinite, negative, absurdly large): read as missing.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    from_cache: bool = False
    refused: bool = False
    truncated: bool = False
    invalid_usage: bool = False


class ResponseCache:
    """Completions on disk, one JSON file per request key; safe across threads and processes.

    A write that fails (a full disk, a read-only directory) does not stop the run: the first failure is
    logged once, and the run goes on without writing (entries already there are still read). Entries are
    written and read as any file (`amft_vlm.run.safe_io`): an entry path that is a FIFO, socket, device or directory
    is neither read (a FIFO would block) nor replaced, which counts as such a failed write; an entry that does
    not read (too long, nested too deeply, a token count that is no number) is a miss, asked again.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()
        try:
            output_directory(self.directory)  # a symlink to a directory is followed; a file, FIFO or device refused
        except OSError as error:
            raise ValueError(f"--cache-dir: cannot create {self.directory} ({error.strerror or error}); choose another or --no-cache") from error
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
            server: what ``GET /models`` says of the model (`amft_vlm.evaluation.served.client.server_identity`); None when it
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

    def get(self, key: str, *, max_bytes: int | None = None) -> Completion | None:
        """The cached completion, or None (also for an unreadable file, or one over `max_bytes` (default
        `MAX_ENTRY_BYTES`), which is then replaced).

        An entry written before refusals, cut answers or invalid token counts were stored reads as none of them.
        """
        path = self.directory / f"{key}.json"
        try:  # a FIFO would block the read: refused (InputFileError), as put refuses to replace it
            data = load_json_text(read_regular_text(path, MAX_ENTRY_BYTES if max_bytes is None else max_bytes, what="a cache entry"))
            return Completion(
                str(data["text"]),
                int(data["prompt_tokens"]),
                int(data["completion_tokens"]),
                from_cache=True,
                refused=bool(data.get("refused", False)),
                truncated=bool(data.get("truncated", False)),
                invalid_usage=bool(data.get("invalid_usage", False)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as error:
            logger.warning("ignoring the unreadable cache entry %s (%s)", path, error)
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
            "truncated": completion.truncated,
            "invalid_usage": completion.invalid_usage,
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
