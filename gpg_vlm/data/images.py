"""Safe image opening: every image the trainer sees goes through `open_image`.

An image source is a file path, encoded bytes, an in-memory PIL image, or the
`{"bytes": ..., "path": ...}` dict that Hugging Face `datasets` and parquet files use.
`open_image` returns a fully decoded RGB image or raises `DataError` naming where the
image came from (row source and field) and what is wrong with it:

- missing or unreadable files, formats PIL cannot identify;
- truncated or corrupt files (decoded in full, so a cut-off PNG/JPEG fails here, not later);
- decompression bombs: more than `MAX_PIXELS` pixels is refused from the header alone,
  before any pixel is decoded (PIL's own limit stays on; we never set it to None);
- modes: RGB is kept; L, 1, P, LA, PA, RGBA, CMYK, YCbCr, LAB, HSV are converted, alpha
  composited on white; 16-bit grayscale (I;16*, I) is scaled to 8 bits; float images (F)
  are rejected because their value range is unknown.

Deliberately left out: resizing (the VLM adapter owns it) and caching.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from gpg_vlm.data.schema import DataError

# PIL's default bomb limit (about 89.5 M pixels); an explicit constant so that a caller who
# sets `Image.MAX_IMAGE_PIXELS = None` elsewhere does not switch our check off.
MAX_PIXELS = 89_478_485

_CONVERTIBLE = {"RGB", "L", "1", "P", "LA", "PA", "RGBA", "RGBa", "La", "CMYK", "YCbCr", "LAB", "HSV"}


def describe(src: Any) -> str:
    """Short human name of an image source for error messages."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<in-memory {src.mode} image {src.width}x{src.height}>"
    return f"<{type(src).__name__}>"


def _open_lazy(src: Any, where: str) -> Image.Image:
    """Open the source, reading only the header; check the pixel limit."""
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (bytes, bytearray)):
            fp: Any = io.BytesIO(src)
        elif isinstance(src, (str, os.PathLike)):
            path = Path(src)
            if not path.is_file():
                raise DataError(f"{where}: image file not found: {path}")
            fp = path
        else:
            raise DataError(f"{where}: unsupported image value of type {type(src).__name__}")
        try:
            with warnings.catch_warnings():
                # PIL only warns between 1x and 2x its limit; we refuse both.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(f"{where}: image {describe(src)} refused as a decompression bomb (over {MAX_PIXELS} pixels): {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{where}: cannot read image {describe(src)}: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: image {describe(src)} has an empty size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise DataError(
            f"{where}: image {describe(src)} is {w}x{h} = {w * h} pixels, over the limit of "
            f"{MAX_PIXELS} (decompression-bomb guard); resize it before training"
        )
    return img


def image_size(src: Any, where: str) -> tuple[int, int]:
    """(W, H) of an image from its header only; raises DataError like `open_image`."""
    img = _open_lazy(src, where)
    size = img.size
    if img is not src:
        img.close()
    return size


def _to_rgb(img: Image.Image, src: Any, where: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I"):
        # 16-bit PNGs open as I;16 (or I); anything above 8 bits is scaled from 16 bits.
        wide = img.convert("I")
        lo, hi = wide.getextrema()
        if lo < 0 or hi > 65535:
            raise DataError(f"{where}: image {describe(src)} has mode {mode} with values {lo}..{hi}, outside 16 bits")
        if hi > 255:
            wide = wide.point(lambda v: v * (1 / 256))
        return wide.convert("L").convert("RGB")
    if mode not in _CONVERTIBLE:
        raise DataError(f"{where}: image {describe(src)} has mode {mode}, which cannot be converted to RGB safely")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(src: Any, where: str) -> Image.Image:
    """Decode an image source in full and return it as RGB; `where` prefixes every error."""
    img = _open_lazy(src, where)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{where}: image {describe(src)} is corrupt or truncated: {exc}") from None
    try:
        return _to_rgb(img, src, where)
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot convert image {describe(src)} from mode {img.mode}: {exc}") from None
