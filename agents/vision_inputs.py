"""Image preparation for Qwen-VL models: smart resize, pixel patches and image-token counts.

Qwen-VL models see an image as a grid of 14x14 patches; every 2x2 block of patches becomes one
``<|image_pad|>`` token in the text. Before patching, the image is resized with Qwen's *smart resize*
rule: both sides become multiples of ``patch_size * merge_size`` (28), the area lands in
``[min_pixels, max_pixels]`` and the aspect ratio is kept as closely as possible.

Resizing uses ``qwen_vl_utils.fetch_image`` (Qwen's reference) where that package imports, and
otherwise `resize_image_pil`, a PIL implementation of the same rule: ``qwen_vl_utils`` imports
torchvision at module level (for its video readers), so without torchvision it cannot be imported at
all. ``tests/agents/test_vision_inputs.py`` checks that both give bit-identical images and pixel
tensors. The model's own image processor then rescales, normalises and patches, with its resizing
switched off, so ``min_pixels`` / ``max_pixels`` are applied exactly once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

try:
    from qwen_vl_utils import fetch_image as _qwen_fetch_image
# Any failure counts: a missing torchvision raises ImportError, a broken one often RuntimeError or OSError.
except Exception as import_error:  # noqa: BLE001
    logger.debug("qwen_vl_utils unavailable (%s); resizing images with resize_image_pil", import_error)
    _qwen_fetch_image = None

QWEN_VL_UTILS_AVAILABLE = _qwen_fetch_image is not None
"""Whether `resize_image` delegates to ``qwen_vl_utils.fetch_image``."""

ImageLike = Image.Image | np.ndarray
"""An image as the environments produce it (uint8 ``H x W x 3`` array) or a PIL image."""

MAX_ASPECT_RATIO = 200
"""Qwen's limit on ``long side / short side``."""


def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Target ``(height, width)`` of Qwen's smart resize rule (as in ``qwen_vl_utils.smart_resize``).

    Each side is rounded to the nearest multiple of `factor` (at least `factor`); if the area then
    exceeds `max_pixels` both sides are scaled down by the same factor and floored to multiples of
    `factor` (never below `factor`), if it is below `min_pixels` they are scaled up and ceiled.

    Args:
        height: original image height in pixels.
        width: original image width in pixels.
        factor: ``patch_size * merge_size`` of the vision tower (28 for Qwen2-VL and Qwen2.5-VL).
        min_pixels: smallest allowed area of the resized image.
        max_pixels: largest allowed area of the resized image.

    Raises:
        ValueError: if the bounds are inconsistent or the aspect ratio exceeds `MAX_ASPECT_RATIO`.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive; got height={height}, width={width}")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio must be at most {MAX_ASPECT_RATIO}; got {max(height, width) / min(height, width):.1f} "
            f"for a {height}x{width} image"
        )
    resized_height = max(factor, round(height / factor) * factor)
    resized_width = max(factor, round(width / factor) * factor)
    if resized_height * resized_width > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        # max(factor, ...) only matters for extreme aspect ratios, where qwen_vl_utils would return 0.
        resized_height = max(factor, math.floor(height / scale / factor) * factor)
        resized_width = max(factor, math.floor(width / scale / factor) * factor)
    elif resized_height * resized_width < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * scale / factor) * factor
        resized_width = math.ceil(width * scale / factor) * factor
    return resized_height, resized_width


def to_rgb_image(image: ImageLike) -> Image.Image:
    """Convert an array or PIL image to an RGB PIL image; transparency is composited onto white.

    Args:
        image: a PIL image, or a uint8 array ``H x W`` (grey), ``H x W x 3`` (RGB) or ``H x W x 4`` (RGBA).
    """
    if isinstance(image, np.ndarray):
        if (
            image.dtype != np.uint8
            or image.ndim not in (2, 3)
            or (image.ndim == 3 and image.shape[2] not in (3, 4))
        ):
            raise ValueError(
                f"image arrays must be uint8 HxW, HxWx3 or HxWx4; got dtype {image.dtype}, shape {image.shape}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a numpy array; got {type(image).__name__}")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def resize_image(image: ImageLike, *, min_pixels: int, max_pixels: int, factor: int = 28) -> Image.Image:
    """Resize an image by the smart resize rule, with ``qwen_vl_utils.fetch_image`` where it imports.

    Args:
        image: the image (see `to_rgb_image`).
        min_pixels: smallest allowed area of the result.
        max_pixels: largest allowed area of the result.
        factor: ``patch_size * merge_size`` of the vision tower (``qwen_vl_utils`` assumes merge size 2).
    """
    if _qwen_fetch_image is None or factor % 2:
        return resize_image_pil(image, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)
    element = {"image": to_rgb_image(image), "min_pixels": min_pixels, "max_pixels": max_pixels}
    return _qwen_fetch_image(element, image_patch_size=factor // 2)


def resize_image_pil(image: ImageLike, *, min_pixels: int, max_pixels: int, factor: int = 28) -> Image.Image:
    """`smart_resize` with bicubic filtering in PIL: ``qwen_vl_utils.fetch_image`` without torchvision.

    Args:
        image: the image (see `to_rgb_image`).
        min_pixels: smallest allowed area of the result.
        max_pixels: largest allowed area of the result.
        factor: ``patch_size * merge_size`` of the vision tower.
    """
    rgb = to_rgb_image(image)
    height, width = smart_resize(
        rgb.height, rgb.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return rgb.resize((width, height), resample=Image.Resampling.BICUBIC)


@dataclass(frozen=True)
class ImageInputs:
    """Vision-tower inputs of one or more images, in the layout Qwen-VL's ``forward`` takes.

    Attributes:
        pixel_values: ``(total_patches, channels * temporal_patch * patch * patch)`` float tensor, the
            patches of all images concatenated in order.
        image_grid_thw: ``(num_images, 3)`` int64 tensor of (time, height, width) patch grids.
        merge_size: spatial merge size; ``merge_size**2`` patches make one image token.
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    merge_size: int

    @property
    def num_images(self) -> int:
        """Number of images."""
        return int(self.image_grid_thw.shape[0])

    @property
    def num_image_tokens(self) -> list[int]:
        """Number of ``<|image_pad|>`` tokens each image occupies in the token sequence."""
        return [int(count) for count in self.image_grid_thw.prod(dim=-1) // self.merge_size**2]

    @staticmethod
    def concatenate(parts: Sequence[ImageInputs | None]) -> ImageInputs | None:
        """Concatenate the images of several sequences in order (``None`` entries contribute none)."""
        present = [part for part in parts if part is not None]
        if not present:
            return None
        merge_sizes = {part.merge_size for part in present}
        if len(merge_sizes) != 1:
            raise ValueError(f"cannot batch images with different merge sizes {sorted(merge_sizes)}")
        return ImageInputs(
            pixel_values=torch.cat([part.pixel_values for part in present], dim=0),
            image_grid_thw=torch.cat([part.image_grid_thw for part in present], dim=0),
            merge_size=present[0].merge_size,
        )


def resize_factor(image_processor: Any) -> int:
    """``patch_size * merge_size`` of a Qwen-VL image processor (28 for Qwen2-VL / Qwen2.5-VL)."""
    return int(image_processor.patch_size) * int(image_processor.merge_size)


def default_pixel_bounds(image_processor: Any) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` stored in a Qwen-VL image processor's config.

    Transformers 5 keeps them as ``size.shortest_edge`` / ``size.longest_edge``; older configs that
    only carry ``size.min_pixels`` / ``size.max_pixels`` are read too.
    """
    size = image_processor.size
    bounds = []
    for new_key, old_key in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
        value = getattr(size, new_key, None) or getattr(size, old_key, None)
        if value is None and isinstance(size, dict):
            value = size.get(new_key) or size.get(old_key)
        if value is None:
            raise ValueError(
                f"image processor size {size} gives no {old_key}; pass min_pixels and max_pixels explicitly"
            )
        bounds.append(int(value))
    return bounds[0], bounds[1]


def prepare_images(
    images: Sequence[ImageLike],
    image_processor: Any,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ImageInputs:
    """Smart-resize `images` and turn them into Qwen-VL vision inputs with `image_processor`.

    Args:
        images: images in the order their placeholders appear in the text.
        image_processor: a Qwen2-VL image processor (``Qwen2VLImageProcessorPil``); it rescales,
            normalises and patches; its own resizing is switched off because the images already
            have the smart-resized size.
        min_pixels: smallest resized area; defaults to the processor's ``size["shortest_edge"]``.
        max_pixels: largest resized area; defaults to the processor's ``size["longest_edge"]``.
    """
    if not images:
        raise ValueError("prepare_images needs at least one image")
    if min_pixels is None or max_pixels is None:
        default_min, default_max = default_pixel_bounds(image_processor)
        min_pixels = default_min if min_pixels is None else min_pixels
        max_pixels = default_max if max_pixels is None else max_pixels
    factor = resize_factor(image_processor)
    resized = [
        resize_image(image, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor) for image in images
    ]
    return images_to_inputs(resized, image_processor)


def images_to_inputs(resized_images: Sequence[Image.Image], image_processor: Any) -> ImageInputs:
    """Patch already smart-resized images with `image_processor` (its resizing switched off).

    Args:
        resized_images: RGB images whose sides are multiples of ``patch_size * merge_size``, e.g. from
            `resize_image` or ``qwen_vl_utils.fetch_image``.
        image_processor: a Qwen2-VL image processor.
    """
    factor = resize_factor(image_processor)
    for image in resized_images:
        if image.width % factor or image.height % factor:
            raise ValueError(
                f"image sides must be multiples of {factor} (smart-resize them first); got {image.width}x{image.height}"
            )
    features = image_processor(images=list(resized_images), do_resize=False, return_tensors="pt")
    return ImageInputs(
        pixel_values=features["pixel_values"],
        image_grid_thw=features["image_grid_thw"].to(torch.long),
        merge_size=int(image_processor.merge_size),
    )


def image_token_count(
    height: int,
    width: int,
    *,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 14,
    merge_size: int = 2,
) -> int:
    """Number of ``<|image_pad|>`` tokens an image of ``height x width`` pixels takes after smart resize."""
    factor = patch_size * merge_size
    resized_height, resized_width = smart_resize(
        height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return (resized_height // factor) * (resized_width // factor)
