"""A small OpenAI-compatible chat-completions server for the served-model tests, with scripted faults.

`ChatServer` answers ``POST /v1/chat/completions`` and ``GET /v1/models`` on 127.0.0.1 from a
background thread: each request's messages go to an ``answer`` function (the dialogue in, the
completion text out), and every chat request is kept in `ChatServer.requests` (its whole JSON body,
so the sampling fields sent can be checked, and its headers). A script of handlings
(`ChatServer.inject`) is consumed one per chat request, in arrival order, before normal answers resume:

- transport faults: ``"400"`` (a context-length error, not retried), ``"401"``, ``"404"``, ``"429"`` (with
  ``Retry-After``), ``"500"``, ``"hang"`` (never answers), ``"drop"`` (closes the connection without a
  reply), ``"not-json"`` (a 200 whose body is an HTML page), ``"error-200"`` (a 200 whose body is vLLM's
  error object, ``"object": "error"``), ``"empty-body"`` (a 200 whose body is ``{}``);
- malformed completions, the model's answer ``""``: ``"no-choices"`` (``[]``), ``"null-choices"``,
  ``"null-message"``, ``"null-content"``, ``"empty-content"``, ``"refusal"`` (``finish_reason``
  ``content_filter``, a ``refusal`` message and no content);
- odd but complete answers: ``"null-usage"``, ``"null-usage-fields"``, ``"parts-content"`` (the answer
  as two text parts);
- hostile answers (`HOSTILE`): ``"huge-answer"`` (an answer of ``huge_bytes`` characters, far over any
  ``max_tokens``), ``"gzip-bomb"`` (a gzip body of about ``bomb_bytes / 1000`` bytes that inflates to an
  answer of ``bomb_bytes``), ``"drip"`` (the headers at once, then the body one byte every
  ``drip_interval`` seconds), ``"drip-headers"`` (the status line and headers a byte at a time),
  ``"deep-json"`` (``choices`` nested 100,000 lists deep), ``"nan-usage"`` (token counts ``NaN`` and
  ``Infinity``), ``"absurd-usage"`` (``1e30`` and ``-5``), ``"echo-headers"`` (the answer is the request's
  path and headers, the API key included), ``"special-tokens"`` (the normal answer followed by Qwen's
  ``<|vision_start|><|image_pad|><|vision_end|>``), ``"500-image-pad"`` (the HTTP 500 ``transformers
  serve`` gives a text with an image placeholder and no image);
- ``"ok"``: the normal answer (to space faults out in a script).

`ChatServer.inject_listing` scripts ``GET /v1/models`` the same way (``"500"``, ``"429"``, ...), and
``"deep-json"`` and ``"echo-headers"`` (the listed ``root`` is the request's headers).

Run it on its own to evaluate against it from the command line (it answers with the expert's answer
for what it was sent; Ctrl-C or SIGTERM stops it and prints what it was asked)::

    python -m tests.amft_vlm.chat_server --episodes 24 --faults 429,429,429,500,hang,drop,not-json --fail-seed 5
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import io
import json
import signal
import socket
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import gymnasium as gym
import numpy as np
from PIL import Image

from agents.vision_inputs import resize_image

EMPTY_COMPLETIONS = ("no-choices", "null-choices", "null-message", "null-content", "empty-content", "refusal")
"""Malformed completions: the client passes ``""`` to the environment as the model's answer."""

ODD_COMPLETIONS = ("null-usage", "null-usage-fields", "parts-content")
"""Completions of the right answer in an unusual shape."""

NOT_COMPLETIONS = ("not-json", "error-200", "empty-body")
"""Status 200 with a body that is not a completion: a transport fault the client retries."""

HOSTILE = (
    "huge-answer", "gzip-bomb", "drip", "drip-headers", "deep-json", "nan-usage", "absurd-usage", "echo-headers",
    "special-tokens", "500-image-pad",
)
"""Answers of a hostile or broken server (see the module docstring)."""

FAULTS = ("400", "401", "404", "429", "500", "hang", "drop", *NOT_COMPLETIONS, *EMPTY_COMPLETIONS, *ODD_COMPLETIONS, *HOSTILE)
"""Faults `ChatServer.inject` accepts (and ``"ok"``)."""

LISTING_FAULTS = ("deep-json", "echo-headers")
"""Hostile ``GET /v1/models`` answers `ChatServer.inject_listing` accepts besides the error statuses."""

SPECIAL_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"
"""What a tiny random Qwen-VL model served by ``transformers serve`` puts in its answers."""

DEEP_JSON = b'{"object": "chat.completion", "choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
"""A body nested 100,000 lists deep: ``json.loads`` raises RecursionError on it."""

_ERRORS = {
    "400": (400, "This model's maximum context length is 32768 tokens; the messages have 40000 tokens"),
    "401": (401, "invalid api key"),
    "404": (404, "The model `test-model` does not exist"),
    "429": (429, "rate limited"),
    "500": (500, "internal error"),
    "500-image-pad": (500, "Found 1 <|image_pad|> tokens in the text but no images were passed"),
}


@dataclass(frozen=True)
class ReceivedRequest:
    """One chat request the server read: its JSON body, the handling (a fault or ``"ok"``) it got, when it came, its path and headers."""

    body: dict[str, Any]
    handling: str
    arrived: float
    path: str = ""
    headers: dict[str, str] | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The request's chat messages."""
        return self.body["messages"]


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message (the text part of a list content)."""
    content = [message for message in messages if message["role"] == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


def request_images(messages: list[dict[str, Any]]) -> list[np.ndarray]:
    """Every image of `messages`, decoded from its ``data:image/png;base64,`` URL (raises if one is not a PNG)."""
    images = []
    for message in messages:
        if isinstance(message["content"], str):
            continue
        for part in message["content"]:
            if part["type"] == "image_url":
                header, _, payload = part["image_url"]["url"].partition(",")
                assert header == "data:image/png;base64", header
                with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
                    assert image.format == "PNG"
                    images.append(np.asarray(image.convert("RGB")))
    return images


def state_key(text: str, image: np.ndarray | None) -> str:
    """A key for an environment state as a client shows it: the prompt text and the image's pixels."""
    digest = hashlib.sha256(text.encode())
    if image is not None:
        digest.update(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def first_user_key(messages: list[dict[str, Any]]) -> str:
    """`state_key` of a dialogue's first user turn: the state the dialogue started from."""
    first = [message for message in messages if message["role"] == "user"][:1]
    images = request_images(first)
    return state_key(last_user_text(first), images[0] if images else None)


def observation_key(observation: dict[str, Any], *, max_pixels: int) -> str:
    """`state_key` of an observation as the client sends it (the image resized to `max_pixels`)."""
    image = observation.get("image")
    resized = None if image is None else np.asarray(resize_image(image, min_pixels=56 * 56, max_pixels=max_pixels))
    return state_key(observation["text"], resized)


def expert_table(env_id: str, env_kwargs: dict[str, Any], seeds: range | list[int], *, max_pixels: int) -> dict[str, str]:
    """State key (prompt text, image as the client sends it) -> the expert's answer, for every state the expert meets."""
    table = {}
    env = gym.make(env_id, **env_kwargs)
    for seed in seeds:
        observation, _ = env.reset(seed=seed)
        done = False
        while not done:
            answer = env.unwrapped.expert_response()
            table[observation_key(observation, max_pixels=max_pixels)] = answer
            observation, _, terminated, truncated, _ = env.step(answer)
            done = terminated or truncated
    env.close()
    return table


def expert_answer(table: dict[str, str]) -> Callable[[list[dict[str, Any]]], str]:
    """An ``answer`` function: the expert's answer for the dialogue's first user turn (what it was sent), else ``"no idea"``."""
    return lambda messages: table.get(first_user_key(messages), "no idea")


class ChatServer:
    """An OpenAI-compatible chat-completions server on a free local port (use as a context manager).

    Args:
        answer: the completion text for a request's messages.
        retry_after: the ``Retry-After`` header (seconds) of a scripted 429.
        hang_after: once this many requests are answered, every later one hangs (until `resume` or `close`):
            a client killed then has exactly this many answers.
        fault_for: a fault for a request's messages, or None: a request that always fails (e.g. always ``"500"``).
        model: the model ``GET /v1/models`` lists.
        root: the listed model's ``root`` (vLLM lists the checkpoint path there); change it to serve "another checkpoint".
        owned_by: the listed model's ``owned_by`` (``"vllm"`` or ``"sglang"`` to pose as those servers).
        list_models: answer ``GET /v1/models`` (False: 404, as some servers do). Each listing's ``created`` is
            its own time, as vLLM stamps it.
        huge_bytes: the length of a ``"huge-answer"``.
        bomb_bytes: the inflated length of a ``"gzip-bomb"``'s answer.
        drip_interval: seconds between the bytes of a ``"drip"`` or ``"drip-headers"``.

    `sent_bytes` counts the body bytes the server wrote (a hostile answer the client stops reading is cut short).
    """

    def __init__(
        self,
        answer: Callable[[list[dict[str, Any]]], str],
        *,
        retry_after: str = "1",
        hang_after: int | None = None,
        fault_for: Callable[[list[dict[str, Any]]], str | None] | None = None,
        model: str = "test-model",
        root: str | None = "checkpoints/test-model",
        owned_by: str = "chat-server",
        list_models: bool = True,
        huge_bytes: int = 8_000_000,
        bomb_bytes: int = 64_000_000,
        drip_interval: float = 0.25,
    ) -> None:
        self.answer = answer
        self.huge_bytes, self.bomb_bytes, self.drip_interval = huge_bytes, bomb_bytes, drip_interval
        self.sent_bytes = 0
        self.fault_for = fault_for
        self.retry_after = retry_after
        self.hang_after = hang_after
        self.model, self.root, self.owned_by, self.list_models = model, root, owned_by, list_models
        self.requests: list[ReceivedRequest] = []
        self.listings = 0
        self._hanging = 0
        self._faults: deque[str] = deque()
        self._listing_faults: deque[str] = deque()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._closed = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The API base URL (``http://127.0.0.1:PORT/v1``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def inject(self, *faults: str) -> None:
        """Queue handlings (`FAULTS` or ``"ok"``), one per coming request, before normal answers resume."""
        unknown = set(faults) - {*FAULTS, "ok"}
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; choose from {FAULTS} or 'ok'")
        with self._lock:
            self._faults.extend(faults)

    def inject_listing(self, *faults: str) -> None:
        """Queue error answers (``"500"``, ``"429"``, ...) or `LISTING_FAULTS` for the coming ``GET /v1/models``, one each,
        before listings resume."""
        unknown = set(faults) - {*_ERRORS, *LISTING_FAULTS}
        if unknown:
            raise ValueError(f"unknown listing faults {sorted(unknown)}; choose from {sorted(_ERRORS)} or {LISTING_FAULTS}")
        with self._lock:
            self._listing_faults.extend(faults)

    def resume(self) -> None:
        """Stop hanging (`hang_after`): release the requests held and answer the coming ones."""
        with self._lock:
            self.hang_after = None
        self._release.set()

    def hanging(self) -> int:
        """How many requests are being held (``"hang"``) right now."""
        with self._lock:
            return self._hanging

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving; hanging requests are released, dripping answers end."""
        self._release.set()
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()

    def _next_handling(self, body: dict[str, Any], path: str, headers: dict[str, str]) -> str:
        with self._lock:
            answered = sum(request.handling == "ok" for request in self.requests)
            if self.hang_after is not None and answered >= self.hang_after:
                handling = "hang"
            elif self.fault_for is not None and self.fault_for(body["messages"]) is not None:
                handling = self.fault_for(body["messages"])
            else:
                handling = self._faults.popleft() if self._faults else "ok"
            self.requests.append(ReceivedRequest(body, handling, time.monotonic(), path, headers))
        return handling

    def _model_listing(self, headers: dict[str, str]) -> tuple[int, bytes]:
        """The status and body of a ``GET /v1/models``: a scripted error or hostile answer, or the listing."""
        with self._lock:
            self.listings += 1
            fault = self._listing_faults.popleft() if self._listing_faults else None
        if fault == "deep-json":
            return 200, DEEP_JSON
        if fault in _ERRORS:
            status, message = _ERRORS[fault]
            return status, json.dumps({"error": {"message": message}}).encode()
        root = json.dumps(headers) if fault == "echo-headers" else self.root
        card = {"id": self.model, "object": "model", "created": int(time.time()), "owned_by": self.owned_by, "root": root}
        return 200, json.dumps({"object": "list", "data": [card]}).encode()

    def _drip(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        """Write `data` a byte at a time, `drip_interval` apart, until the client leaves or the server closes."""
        for index in range(len(data)):
            if self._closed.wait(self.drip_interval):
                return
            try:
                handler.wfile.write(data[index : index + 1])
                handler.wfile.flush()
            except OSError:
                return
            with self._lock:
                self.sent_bytes += 1

    @functools.cached_property
    def _gzip_bomb(self) -> bytes:
        """A gzip completion whose answer is `bomb_bytes` of ``"a"``, compressed a megabyte at a time (never held whole)."""
        compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        marked = json.dumps(_completion({"model": self.model, "messages": []}, "\x00", "ok"))
        head, _, tail = marked.partition("\\u0000")  # where the answer goes
        parts = [compressor.compress(head.encode())]
        block = b"a" * 1_000_000
        for _ in range(self.bomb_bytes // len(block)):
            parts.append(compressor.compress(block))
        parts += [compressor.compress(tail.encode()), compressor.flush()]
        return b"".join(parts)

    def _hang(self) -> None:
        with self._lock:
            self._hanging += 1
        self._release.wait()
        with self._lock:
            self._hanging -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
                """Quiet: tests read `ChatServer.requests` instead."""

            def do_GET(self) -> None:  # noqa: N802  (http.server's name)
                if server.list_models and urlsplit(self.path).path.rstrip("/").endswith("/models"):
                    status, listing = server._model_listing(dict(self.headers))
                    self._send(status, listing)
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                handling = server._next_handling(body, self.path, dict(self.headers))
                if handling == "hang":
                    server._hang()
                elif handling == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif handling in _ERRORS:
                    status, message = _ERRORS[handling]
                    headers = {"Retry-After": server.retry_after} if status == 429 else {}
                    self._send(status, json.dumps({"error": {"message": message}}).encode(), headers)
                elif handling == "not-json":
                    self._send(200, b"<html>502 Bad Gateway</html>")
                elif handling == "error-200":
                    error = {"object": "error", "message": "the engine is restarting", "type": "InternalServerError", "code": 500}
                    self._send(200, json.dumps(error).encode())
                elif handling == "empty-body":
                    self._send(200, b"{}")
                elif handling == "deep-json":
                    self._send(200, DEEP_JSON)
                elif handling == "gzip-bomb":
                    self._send(200, server._gzip_bomb, {"Content-Encoding": "gzip"})
                elif handling == "drip":
                    payload = json.dumps(_completion(body, server.answer(body["messages"]), "ok")).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.flush()
                    server._drip(self, payload)
                    self.close_connection = True
                elif handling == "drip-headers":
                    server._drip(self, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"." * 4096 + b"\r\n\r\n{}")
                    self.close_connection = True
                else:
                    answer = server.answer(body["messages"]) if handling in ("ok", "nan-usage", "absurd-usage", *ODD_COMPLETIONS) else None
                    if handling == "huge-answer":
                        answer = "x" * server.huge_bytes
                    elif handling == "echo-headers":
                        answer = json.dumps({"path": self.path, "headers": dict(self.headers)})
                    elif handling == "special-tokens":
                        answer = server.answer(body["messages"]) + SPECIAL_TOKENS
                    self._send(200, json.dumps(_completion(body, answer, handling)).encode())

            def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                # A megabyte at a time: a client that stops reading a hostile answer leaves the rest unsent.
                for start in range(0, len(payload), 1 << 20):
                    try:
                        self.wfile.write(payload[start : start + (1 << 20)])
                    except OSError:
                        self.close_connection = True
                        return
                    with server._lock:
                        server.sent_bytes += len(payload[start : start + (1 << 20)])

        return Handler


def _completion(body: dict[str, Any], answer: str | None, handling: str) -> dict[str, Any]:
    """A chat.completion object shaped by `handling`; usage counts characters as tokens (deterministic, so totals can be checked)."""
    prompt = sum(len(last_user_text([message])) for message in body["messages"] if message["role"] == "user")
    completion = len(answer or "")
    content: Any = {"empty-content": ""}.get(handling, answer)
    if handling == "parts-content":
        content = [{"type": "text", "text": answer[: len(answer) // 2]}, {"type": "text", "text": answer[len(answer) // 2 :]}]
    message: Any = {"role": "assistant", "content": content}
    finish_reason = "stop"
    if handling == "refusal":
        message, finish_reason = {"role": "assistant", "content": None, "refusal": "I can't help with that."}, "content_filter"
    elif handling == "null-message":
        message = None
    choices: Any = [{"index": 0, "message": message, "finish_reason": finish_reason}]
    choices = {"no-choices": [], "null-choices": None}.get(handling, choices)
    usage: Any = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    usage = {
        "null-usage": None,
        "null-usage-fields": dict.fromkeys(usage),
        "nan-usage": {"prompt_tokens": float("nan"), "completion_tokens": float("inf"), "total_tokens": float("-inf")},
        "absurd-usage": {"prompt_tokens": 1e30, "completion_tokens": -5, "total_tokens": 1e30},
    }.get(handling, usage)
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices, "usage": usage}


def main(argv: list[str] | None = None) -> None:
    """Serve the expert's answers for a setting's episodes, with faults, until interrupted; then print the requests by handling."""
    from amft_vlm.evaluation.evaluate import paper_setting
    from amft_vlm.evaluation.served import QWEN_MAX_PIXELS

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default="test-model", help="the model name GET /v1/models lists")
    parser.add_argument("--owned-by", default="chat-server", help="the owned_by GET /v1/models lists (vllm, sglang: pose as those)")
    parser.add_argument("--env", default="GeneralPoints-v0")
    parser.add_argument("--modality", default="language")
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0, help="the eval's --seed: episode i is reset with seed S+i")
    parser.add_argument("--max-pixels", type=int, default=QWEN_MAX_PIXELS, help="the eval's --max-pixels (vision)")
    parser.add_argument("--faults", default="", help=f"comma-separated script of handlings, from {', '.join(FAULTS)}, ok")
    parser.add_argument("--fail-seed", type=int, help="every request of this episode's hand gets a 500")
    parser.add_argument("--retry-after", default="1", help="Retry-After of a 429 (seconds)")
    args = parser.parse_args(argv)
    _, env_kwargs = paper_setting(args.env, "id", args.modality)
    seeds = range(args.seed, args.seed + args.episodes)
    table = expert_table(args.env, env_kwargs, seeds, max_pixels=args.max_pixels)
    poisoned = None
    if args.fail_seed is not None:
        env = gym.make(args.env, **env_kwargs)
        poisoned = observation_key(env.reset(seed=args.fail_seed)[0], max_pixels=args.max_pixels)
        env.close()
    with ChatServer(
        expert_answer(table),
        retry_after=args.retry_after,
        fault_for=lambda messages: "500" if first_user_key(messages) == poisoned else None,
        model=args.model,
        owned_by=args.owned_by,
    ) as server:
        server.inject(*[fault for fault in args.faults.split(",") if fault])
        print(server.url, flush=True)
        stopped = threading.Event()
        for number in (signal.SIGINT, signal.SIGTERM):  # a shell starts background jobs with SIGINT ignored
            signal.signal(number, lambda *_: stopped.set())
        while not stopped.wait(1.0):
            pass
        counts = Counter(request.handling for request in server.requests)
        print(f"{len(server.requests)} chat requests ({', '.join(f'{name} x{count}' for name, count in counts.most_common())}), "
              f"{server.listings} model listings", flush=True)


if __name__ == "__main__":
    main()
