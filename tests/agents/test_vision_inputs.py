"""Qwen-VL image preparation: the smart resize rule and equivalence with ``qwen_vl_utils``.

``qwen_vl_utils`` imports torchvision at module level (for its video readers) and torchvision is not
installed here. Its image functions (``smart_resize``, ``fetch_image``, ``process_vision_info`` on
images) are pure PIL: in ``qwen_vl_utils/vision_process.py`` torchvision appears only in the module
imports and in ``_read_video_torchvision`` / ``fetch_video``. The fixture below therefore imports
``qwen_vl_utils`` with a stub ``torchvision`` in ``sys.modules`` whose every attribute raises, and removes
the stub right after the import: if an image function touched torchvision the test would fail loudly.
"""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from agents.tiny import build_image_processor
from agents.vision_inputs import (
    QWEN_VL_UTILS_AVAILABLE,
    ImageInputs,
    image_token_count,
    images_to_inputs,
    prepare_images,
    resize_image,
    resize_image_pil,
    smart_resize,
)

TORCHVISION_MODULES = ("torchvision", "torchvision.io", "torchvision.transforms")


class _TorchvisionStub(types.ModuleType):
    """A module whose unknown attributes raise, so any use of torchvision is an error."""

    def __getattr__(self, name):
        if name.startswith("__"):  # the import machinery probes __path__ and friends
            raise AttributeError(name)
        raise RuntimeError(f"qwen_vl_utils used torchvision.{name} on the image path")


class _Tripwire:
    def __getattr__(self, name):
        raise RuntimeError(f"qwen_vl_utils used torchvision's InterpolationMode.{name} on the image path")


def _import_qwen_vl_utils_with_torchvision_stub():
    stubs = {name: _TorchvisionStub(name) for name in TORCHVISION_MODULES}
    stubs["torchvision"].io = stubs["torchvision.io"]
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].InterpolationMode = _Tripwire()
    previous = {name: sys.modules.get(name) for name in TORCHVISION_MODULES}
    sys.modules.update(stubs)
    try:
        return importlib.import_module("qwen_vl_utils")
    finally:
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def qwen_vl_utils():
    if importlib.util.find_spec("qwen_vl_utils") is None:
        pytest.skip("qwen_vl_utils is not installed (it is a project dependency: pip install qwen-vl-utils)")
    # Settle transformers' torchvision probe before the stub exists, so the stub cannot fool it.
    torchvision_available = transformers.utils.is_torchvision_available()
    if torchvision_available:
        module = importlib.import_module("qwen_vl_utils")
    else:
        module = _import_qwen_vl_utils_with_torchvision_stub()
        assert "torchvision" not in sys.modules
    assert transformers.utils.is_torchvision_available() == torchvision_available
    return module


@pytest.fixture(scope="module")
def image_processor():
    return build_image_processor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


def _random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(56, 5000),
    aspect=st.floats(0.25, 4.0),
    min_tokens=st.integers(4, 64),
    budget_factor=st.integers(16, 64),
)
def test_smart_resize_rule(height, aspect, min_tokens, budget_factor):
    # With max_pixels >= 16 * min_pixels and moderate aspect ratios the bounds are always reachable.
    width = max(56, round(height * aspect))
    min_pixels, max_pixels = 28 * 28 * min_tokens, 28 * 28 * min_tokens * budget_factor
    resized_height, resized_width = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)

    assert resized_height % 28 == 0 and resized_width % 28 == 0
    assert min_pixels <= resized_height * resized_width <= max_pixels
    # Both sides are scaled by one factor, then moved by less than one 28-pixel patch each.
    tolerance = (1 + 28 / (resized_height - 28)) * (1 + 28 / (resized_width - 28))
    assert 1 / tolerance <= (resized_width / resized_height) / (width / height) <= tolerance


def test_smart_resize_rejects_extreme_aspect_ratios_and_bad_bounds():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2020, min_pixels=784, max_pixels=784 * 16)
    with pytest.raises(ValueError, match="max_pixels"):
        smart_resize(100, 100, min_pixels=784 * 16, max_pixels=784)


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 5000),
    width=st.integers(1, 5000),
    min_tokens=st.integers(1, 64),
    extra_tokens=st.integers(0, 4096),
)
def test_smart_resize_matches_qwen_vl_utils(qwen_vl_utils, height, width, min_tokens, extra_tokens):
    if max(height, width) / min(height, width) > 200:
        return
    min_pixels, max_pixels = 28 * 28 * min_tokens, 28 * 28 * (min_tokens + extra_tokens)
    expected = qwen_vl_utils.smart_resize(
        height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
    )
    if min(expected) == 0:
        # qwen_vl_utils floors a very thin side to 0 pixels (an unusable image); we keep one patch.
        assert 28 in smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        return
    assert smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels) == expected


@pytest.mark.parametrize(
    ("height", "width", "min_pixels", "max_pixels"),
    [
        (1200, 1200, 56 * 56, 28 * 28 * 1280),  # the environments' observation size, Qwen's defaults
        (1200, 1200, 56 * 56, 28 * 28 * 64),
        (333, 517, 56 * 56, 28 * 28 * 16),
        (40, 30, 28 * 28 * 9, 28 * 28 * 100),  # upscaled to reach min_pixels
    ],
)
def test_pixels_identical_to_qwen_vl_utils(
    qwen_vl_utils, image_processor, height, width, min_pixels, max_pixels
):
    array = _random_image(height, width)
    messages = [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "image": Image.fromarray(array),
                    "min_pixels": min_pixels,
                    "max_pixels": max_pixels,
                },
                {"type": "text", "text": "What do you see?"},
            ],
        }
    ]
    reference_images, videos = qwen_vl_utils.process_vision_info(messages)
    assert videos is None

    ours = resize_image_pil(array, min_pixels=min_pixels, max_pixels=max_pixels)
    assert ours.size == reference_images[0].size
    assert np.array_equal(np.asarray(ours), np.asarray(reference_images[0]))

    reference = images_to_inputs(reference_images, image_processor)
    inputs = images_to_inputs([ours], image_processor)
    assert torch.equal(inputs.pixel_values, reference.pixel_values)
    assert torch.equal(inputs.image_grid_thw, reference.image_grid_thw)
    # The public entry point (qwen_vl_utils where it imports, resize_image_pil otherwise) agrees too.
    prepared = prepare_images([array], image_processor, min_pixels=min_pixels, max_pixels=max_pixels)
    assert torch.equal(prepared.pixel_values, reference.pixel_values)


def test_pixels_match_the_processors_own_resize(image_processor):
    # With the processor's own bounds, resizing in the processor or beforehand gives the same pixels.
    array = _random_image(480, 640, seed=1)
    ours = prepare_images([array], image_processor)
    theirs = image_processor(images=[Image.fromarray(array)], return_tensors="pt")
    assert torch.equal(ours.image_grid_thw, theirs["image_grid_thw"])
    assert torch.equal(ours.pixel_values, theirs["pixel_values"])


def test_grid_and_token_counts(image_processor):
    max_pixels = 28 * 28 * 64
    inputs = prepare_images(
        [_random_image(1200, 900), _random_image(100, 300)], image_processor, max_pixels=max_pixels
    )
    # 1200x900 -> 252x168 (9x6 tokens); 100x300 -> 112x308 (4x11 tokens, within budget).
    assert inputs.image_grid_thw.tolist() == [[1, 18, 12], [1, 8, 22]]
    assert inputs.num_image_tokens == [54, 44]
    assert inputs.pixel_values.shape == (18 * 12 + 8 * 22, 3 * 2 * 14 * 14)
    assert inputs.num_image_tokens == [
        image_token_count(1200, 900, min_pixels=56 * 56, max_pixels=max_pixels),
        image_token_count(100, 300, min_pixels=56 * 56, max_pixels=max_pixels),
    ]


def test_min_and_max_pixels_set_the_token_count():
    # 1200x1200 rounds to 1204x1204; over budget it is scaled to sqrt(max_pixels) and floored to 28s.
    assert image_token_count(1200, 1200, min_pixels=3136, max_pixels=28 * 28 * 1280) == 35 * 35  # 980x980
    assert image_token_count(1200, 1200, min_pixels=3136, max_pixels=28 * 28 * 100) == 10 * 10  # 280x280
    assert image_token_count(1200, 900, min_pixels=3136, max_pixels=28 * 28 * 64) == 9 * 6  # 252x168
    assert (
        image_token_count(1200, 1200, min_pixels=3136, max_pixels=1204 * 1204) == 43 * 43
    )  # fits as rounded
    # Small images are scaled up to min_pixels and ceiled to 28s.
    assert image_token_count(56, 56, min_pixels=3136, max_pixels=28 * 28 * 64) == 4
    assert image_token_count(50, 70, min_pixels=28 * 28 * 30, max_pixels=28 * 28 * 64) == 5 * 7  # 140x196


def test_resize_image_falls_back_to_pil_without_torchvision():
    if not transformers.utils.is_torchvision_available():
        assert not QWEN_VL_UTILS_AVAILABLE
    array = _random_image(90, 130)
    assert np.array_equal(
        np.asarray(resize_image(array, min_pixels=56 * 56, max_pixels=28 * 28 * 8)),
        np.asarray(resize_image_pil(array, min_pixels=56 * 56, max_pixels=28 * 28 * 8)),
    )


def test_rgba_is_composited_on_white_and_arrays_validated():
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)  # fully transparent black
    resized = resize_image(rgba, min_pixels=28 * 28, max_pixels=28 * 28)
    assert np.all(np.asarray(resized) == 255)
    with pytest.raises(ValueError, match="uint8"):
        resize_image(np.zeros((28, 28, 3), dtype=np.float32), min_pixels=784, max_pixels=784)


def test_concatenate_keeps_order_and_skips_text_only():
    first = ImageInputs(torch.zeros(4, 2), torch.tensor([[1, 2, 2]]), merge_size=2)
    second = ImageInputs(torch.ones(8, 2), torch.tensor([[1, 2, 4]]), merge_size=2)
    both = ImageInputs.concatenate([first, None, second])
    assert both.image_grid_thw.tolist() == [[1, 2, 2], [1, 2, 4]]
    assert both.num_image_tokens == [1, 2]
    assert torch.equal(both.pixel_values[4:], second.pixel_values)
    assert ImageInputs.concatenate([None, None]) is None
