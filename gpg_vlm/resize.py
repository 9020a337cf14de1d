"""Image sizing for Qwen-VL inputs: the qwen-vl-utils resizing rules, without torchvision.

Qwen-VL encodes an image as a grid of `patch` x `patch` pixel patches merged 2 x 2, so the
model sees an image whose sides are multiples of `factor = patch * merge` (28 for Qwen2-VL and
Qwen2.5-VL, 32 for Qwen3-VL), with its pixel count kept within [min_pixels, max_pixels].
`smart_resize` gives that size; `qwen_vl_utils.smart_resize` is used where it imports (it
imports torchvision, which has no CPU build), and our implementation of the same rules
otherwise. A test pins the two together where both exist.

This module is pure PIL + math: no torch, no transformers.
"""

from __future__ import annotations

import math

# qwen-vl-utils' defaults, in visual tokens: at least 4 and at most 16384 per image.
MIN_TOKENS = 4
MAX_TOKENS = 16384
MAX_ASPECT_RATIO = 200


def _round_by(n: float, factor: int) -> int:
    return round(n / factor) * factor


def _ceil_by(n: float, factor: int) -> int:
    return math.ceil(n / factor) * factor


def _floor_by(n: float, factor: int) -> int:
    return math.floor(n / factor) * factor


def smart_resize_rules(height: int, width: int, factor: int, min_pixels: int, max_pixels: int
                       ) -> tuple[int, int]:
    """(height, width) the model sees: multiples of `factor`, pixel count within the limits,
    aspect ratio kept as closely as the grid allows."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio must be at most {MAX_ASPECT_RATIO}, got {width}x{height}")
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, _floor_by(height / beta, factor))
        w_bar = max(factor, _floor_by(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


def _qwen_vl_utils_smart_resize():
    try:  # imports torchvision at module level: absent on CPU-only machines
        from qwen_vl_utils.vision_process import smart_resize
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return smart_resize


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int
                 ) -> tuple[int, int]:
    """qwen-vl-utils' smart_resize where it imports, the same rules otherwise."""
    fn = _qwen_vl_utils_smart_resize()
    if fn is not None:
        return tuple(fn(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels))
    return smart_resize_rules(height, width, factor, min_pixels, max_pixels)


def fit_image(image, factor: int, min_pixels: int, max_pixels: int):
    """Return the RGB image resized to what the model sees (bicubic, as qwen-vl-utils does)."""
    from PIL import Image

    if image.mode != "RGB":
        image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    return image
