"""Served evaluation throughput (GeneralPoints-v0 vision against a local chat server with latency)

`amft_vlm.evaluation.served.play_served` plays 32 GP-VL episodes against the test suite's OpenAI-compatible
server (`tests.amft_vlm.chat_server`), which answers each request with the expert's answer after a
fixed delay standing in for the model's generation time (`LATENCY_SECONDS`). Every episode is
solved in one turn, so each costs one request: the image sent as a PNG data URL, the answer parsed,
the environment stepped. Measured in the same run: 8 episodes in flight (``--concurrency 8``)
against one at a time, and a rerun answered wholly from the response cache against the first
(uncached) run at concurrency 8. Each figure is the median of `REPEATS` runs.

The server runs in the same process (it decodes every image it receives to look the expert's answer
up), so on a two-core machine the client and server compete for the cores: the concurrent run is
bound by CPU (about 60 ms of client work per episode, mostly the smart resize and PNG encoding of the
1200 px table, the same resize a local model's processor does), not by the 100 ms latency.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import environments  # noqa: F401
from amft_vlm.evaluation.served import QWEN_MAX_PIXELS, Sampling, ServedEndpoint, play_served
from benchmarks.common import Measurement
from tests.amft_vlm.chat_server import ChatServer, expert_answer, expert_table

ENV_ID = "GeneralPoints-v0"
ENV_KWARGS = {"modality": "vision"}
EPISODES = 32
LATENCY_SECONDS = 0.1
CONCURRENCY = 8
REPEATS = 3


def _episodes_per_second(server: ChatServer, concurrency: int, cache_dir: Path | None) -> float:
    endpoint = ServedEndpoint(
        api_base=server.url, model=server.model, concurrency=concurrency,
        cache_dir=None if cache_dir is None else str(cache_dir),
    )  # fmt: skip
    started = time.perf_counter()
    run = play_served(endpoint, ENV_ID, ENV_KWARGS, range(EPISODES), Sampling(temperature=None, max_tokens=64), progress=False)
    elapsed = time.perf_counter() - started
    solved = sum(outcome.success for outcome in run.outcomes)
    assert solved == EPISODES, f"the expert server solved {solved} of {EPISODES} episodes"
    return EPISODES / elapsed


def run() -> list[Measurement]:
    table = expert_table(ENV_ID, ENV_KWARGS, range(EPISODES), max_pixels=QWEN_MAX_PIXELS)
    answer = expert_answer(table)

    def slow_answer(messages):
        time.sleep(LATENCY_SECONDS)
        return answer(messages)

    serial, concurrent, replayed = [], [], []
    with ChatServer(slow_answer, model="expert") as server, tempfile.TemporaryDirectory() as scratch:
        _episodes_per_second(server, CONCURRENCY, None)  # warm-up
        for repeat in range(REPEATS):
            serial.append(_episodes_per_second(server, 1, None))
            cache = Path(scratch) / f"cache-{repeat}"
            concurrent.append(_episodes_per_second(server, CONCURRENCY, cache))
            replayed.append(_episodes_per_second(server, CONCURRENCY, cache))
    serial_rate, concurrent_rate = statistics.median(serial), statistics.median(concurrent)
    return [
        Measurement(
            f"GP-VL served, {LATENCY_SECONDS * 1000:.0f} ms per request, --concurrency {CONCURRENCY}",
            concurrent_rate, "episodes/s", baseline_name="--concurrency 1", baseline_value=serial_rate,
        ),
        Measurement(
            f"GP-VL served, rerun answered from the cache, --concurrency {CONCURRENCY}",
            statistics.median(replayed), "episodes/s", baseline_name="first run (no cache hits)",
            baseline_value=concurrent_rate,
        ),
    ]  # fmt: skip
