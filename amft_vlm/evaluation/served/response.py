"""A server's response as untrusted input: read within a size cap and a deadline, parsed within a depth, scrubbed of credentials.

A hostile or broken server must not exhaust the client, hold it past its deadline or crash the run (`ChatClient`
uses all of this):

- Size. `bound_response`, an HTTP response hook, makes each body stream through `BoundedBody`, which decodes gzip and
  deflate itself, a chunk at a time, never past the cap (`response_byte_limit`, raw or inflated), and stops reading
  there: the rest is never read, so a 50 MB answer or a compression bomb costs at most the cap. A body cut there may
  still hold the model's answer, over-long: `answer_prefix` reads it as far as it goes.
- Time. `BoundedBody` raises `DeadlinePassed` at the first chunk after the request's deadline, so the thread
  reading a body that drips ends soon after the client has given up on it.
- Shape. `parse_json` refuses bodies nested deeper than `MAX_JSON_DEPTH` (``json`` itself raises RecursionError
  on deep nesting: a crash, not a malformed response) and hands every string through the client's scrubber, which
  masks the credentials a server may echo (`amft_vlm.evaluation.served.endpoint.credential_masks`).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

ANSWER_CHARS_PER_TOKEN = 32
"""An answer is cut at this many characters per token of ``max_tokens``: far more than any tokenizer's token holds, so
only an answer the server did not stop at ``max_tokens`` is ever cut."""

RESPONSE_OVERHEAD_BYTES = 1 << 20
"""Bytes a response may take besides its answer (the completion object, usage, a model listing, an error page)."""

JSON_BYTES_PER_CHAR = 12
"""The most bytes one character takes in a JSON string: an escaped surrogate pair (``\\ud83d\\ude00``)."""

MAX_JSON_DEPTH = 64
"""Nesting (objects and lists) a response body may have; a completion has 5 levels, a model listing 3."""

ACCEPTED_ENCODINGS = "gzip, deflate"
"""The ``Accept-Encoding`` every request sends: the content codings `BoundedBody` decodes."""

_CONTENT_START = re.compile(r'"content"\s*:\s*"')
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)


def answer_char_limit(max_tokens: int) -> int:
    """The most characters an answer of `max_tokens` tokens is kept to (`ANSWER_CHARS_PER_TOKEN` each)."""
    return ANSWER_CHARS_PER_TOKEN * max_tokens


def response_byte_limit(max_tokens: int) -> int:
    """The most bytes of a response body read (decoded): an answer at its character limit, every character escaped
    as in the worst case, and `RESPONSE_OVERHEAD_BYTES`."""
    return RESPONSE_OVERHEAD_BYTES + JSON_BYTES_PER_CHAR * answer_char_limit(max_tokens)


class DeadlinePassed(Exception):
    """The request's deadline passed while its body was being read."""


class UndecodableBody(Exception):
    """A body in a content coding that was not asked for, or whose gzip or deflate data is corrupt."""


class MalformedBody(ValueError):
    """A body that is not JSON, or is nested deeper than `MAX_JSON_DEPTH`."""


class BoundedBody:
    """A response body read a chunk at a time, decoded here, and cut at `limit` bytes (and at the deadline).

    Args:
        stream: the HTTP library's raw body stream.
        encoding: the response's ``Content-Encoding`` (``""``, ``identity``, ``gzip`` or ``deflate``).
        limit: the most bytes read, raw or decoded.
        deadline: the `time.monotonic` after which reading raises `DeadlinePassed`; None for none.
        on_read: called with the number of decoded bytes of each chunk kept.

    Attributes:
        truncated: whether the body went on past `limit`; what was read ends there and the rest is never read.
    """

    def __init__(
        self, stream: Iterable[bytes], encoding: str, *, limit: int, deadline: float | None, on_read: Callable[[int], None]
    ) -> None:
        self._stream, self.limit, self._deadline, self._on_read = stream, limit, deadline, on_read
        codings = [coding.strip().lower() for coding in encoding.split(",")]
        codings = [coding for coding in codings if coding not in ("", "identity")]
        self._unsupported = None if codings in ([], ["gzip"], ["x-gzip"], ["deflate"]) else encoding
        # 32 + MAX_WBITS reads a gzip or a zlib header alike (servers send either as "deflate").
        self._decoder = zlib.decompressobj(32 + zlib.MAX_WBITS) if codings else None
        self.truncated = False

    def __iter__(self) -> Iterator[bytes]:
        if self._unsupported is not None:
            raise UndecodableBody(f"the body's content encoding is {self._unsupported!r}, not one asked for ({ACCEPTED_ENCODINGS})")
        raw_bytes = decoded_bytes = 0
        for raw in self._stream:
            if self._deadline is not None and time.monotonic() > self._deadline:
                raise DeadlinePassed
            raw_bytes += len(raw)
            room = self.limit - decoded_bytes
            chunk = raw[: room + 1] if self._decoder is None else self._decompress(raw, room + 1)
            if len(chunk) > room or raw_bytes > self.limit:
                self.truncated = True
                chunk = chunk[:room]
            decoded_bytes += len(chunk)
            self._on_read(len(chunk))
            if chunk:
                yield chunk
            if self.truncated:
                return

    def _decompress(self, raw: bytes, most: int) -> bytes:
        """At most `most` bytes of `raw` inflated (what is left over stays unread: the body is over the limit then)."""
        try:
            return self._decoder.decompress(raw, most)
        except zlib.error as error:
            raise UndecodableBody(f"the body's compressed data is corrupt ({error})") from error

    def close(self) -> None:
        """Close the raw stream (a body cut short closes its connection)."""
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


@functools.cache
def _bounded_body_type(byte_stream: type) -> type:
    """`BoundedBody` as the HTTP library's own ``SyncByteStream`` (httpx's or httpx2's): a response reads from no other."""
    return type("BoundedBody", (BoundedBody, byte_stream), {})


def bound_response(response: Any, *, limit: int, deadline: float | None, on_read: Callable[[int], None]) -> None:
    """The work of an HTTP response hook (``event_hooks={"response": [...]}``, httpx or httpx2): `response` reads its
    body through a `BoundedBody`, whoever reads it (the ``openai`` client reads error bodies itself).

    The response's ``Content-Encoding`` header is taken off: `BoundedBody` decodes, and the HTTP library would decode
    again, a whole chunk at once (a 64 kB chunk of a compression bomb inflates to 64 MB).
    """
    http = sys.modules[type(response).__module__.partition(".")[0]]
    encoding = response.headers.get("content-encoding", "")
    if "content-encoding" in response.headers:
        del response.headers["content-encoding"]
    response.stream = _bounded_body_type(http.SyncByteStream)(response.stream, encoding, limit=limit, deadline=deadline, on_read=on_read)


def parse_json(text: str, scrub: Callable[[str], str]) -> Any:
    """`text` as JSON, with every string in it (object keys too) passed through `scrub`.

    Raises:
        MalformedBody: `text` is not JSON, or is nested deeper than `MAX_JSON_DEPTH`.
    """
    try:
        value = json.loads(text)
    except RecursionError as error:  # the json module's own limit, far deeper than MAX_JSON_DEPTH
        raise MalformedBody(f"the body is nested deeper than {MAX_JSON_DEPTH} levels") from error
    except ValueError as error:
        raise MalformedBody("the body is not JSON") from error
    return _scrubbed(value, scrub, MAX_JSON_DEPTH)


def _scrubbed(value: Any, scrub: Callable[[str], str], depth_left: int) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if not isinstance(value, dict | list):
        return value
    if depth_left == 0:
        raise MalformedBody(f"the body is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, list):
        return [_scrubbed(item, scrub, depth_left - 1) for item in value]
    return {scrub(key): _scrubbed(item, scrub, depth_left - 1) for key, item in value.items()}


def answer_prefix(text: str) -> tuple[str, bool] | None:
    """The first ``"content"`` string of a body cut short at the size cap, as far as it goes, and whether it is whole
    (it ends before the cut); None if the body has none.

    A server that does not stop at ``max_tokens`` sends an answer over the cap; its beginning is the model's answer
    (cut, as a local model's is cut at ``max_new_tokens``). An escape cut in two at the end is left out.
    """
    start = _CONTENT_START.search(text)
    if start is None:
        return None
    escaped = _STRING_BODY.match(text, start.end()).group()
    whole = text.startswith('"', start.end() + len(escaped))
    for cut in range(min(len(escaped), 6) + 1):  # \uXXXX, the longest escape, is 6 characters
        try:
            return json.loads(f'"{escaped[: len(escaped) - cut]}"'), whole
        except ValueError:
            continue
    return None
