"""Fixtures shared by the whole suite: tiny Qwen2-VL / Qwen2.5-VL checkpoints, encoders and policies.

Each is built once per test session. The policies are shared: a test that changes one (its
``share_prefix`` or ``autocast_dtype``, its weights, hooks) puts it back before it ends, or builds
its own from `tiny_checkpoints`.
"""

import pytest
import torch

from agents.policy import ChatEncoder, VLMPolicy
from agents.tiny import ARCHITECTURES, build_tiny_model

MAX_PIXELS = 28 * 28 * 16
"""At most 16 image tokens per image, so vision tests stay fast."""


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Checkpoint directory of each tiny architecture (seed 0), built once per test session."""
    return {arch: build_tiny_model(arch, tmp_path_factory.mktemp(arch), seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_encoders(tiny_checkpoints):
    """A `ChatEncoder` per tiny architecture (images capped at `MAX_PIXELS`), no model loaded."""
    return {
        arch: ChatEncoder.from_pretrained(path, max_pixels=MAX_PIXELS) for arch, path in tiny_checkpoints.items()
    }


@pytest.fixture(scope="session")
def tiny_policies(tiny_checkpoints):
    """A float32 CPU `VLMPolicy` per tiny architecture (images capped at `MAX_PIXELS`)."""
    return {
        arch: VLMPolicy.from_pretrained(path, max_pixels=MAX_PIXELS)
        for arch, path in tiny_checkpoints.items()
    }


@pytest.fixture(scope="session")
def tiny_policies_float64(tiny_checkpoints):
    """The same tiny policies in float64, for comparisons of two code paths that sample or decode greedily.

    Two batch layouts of one float32 computation differ by ~1e-7, which can flip a greedy near-tie or a
    sampled token whose draw falls that close to a boundary, on one machine and not another; in float64
    they differ by ~1e-15, so a test comparing tokens fails only for a real difference.
    """
    return {
        arch: VLMPolicy.from_pretrained(path, max_pixels=MAX_PIXELS, dtype="float64")
        for arch, path in tiny_checkpoints.items()
    }


@pytest.fixture
def one_torch_thread():
    """Run torch on one thread for the test: the tiny models are faster so on a shared machine, and steadier.

    Use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
