"""Safe image opening: every image the trainer sees goes through `open_image`.

An image source is a file path, encoded bytes, an in-memory PIL image, or the
`{"bytes": ..., "path": ...}` dict that Hugging Face `datasets` and parquet files use.
`open_image` returns a fully decoded RGB image or raises `DataError` naming where the
image came from (row source and field) and what is wrong with it:

- only raster formats in `FORMATS` are ever identified (PNG, JPEG, WEBP, BMP, GIF, TIFF):
  PIL would otherwise hand an EPS/PS file to Ghostscript, so no dataset value can make a
  library start another program; an in-memory image of another format is refused too;
- missing or unreadable files, paths with NUL bytes or over-long names, formats outside
  the list; every failure while decoding, whatever PIL raises, is one `DataError`;
- truncated or corrupt files (decoded in full, so a cut-off PNG/JPEG fails here, not later);
- decompression bombs: more than `MAX_PIXELS` pixels is refused from the header alone,
  before any pixel is decoded (PIL's own limit stays on; we never set it to None);
- an aspect ratio above `MAX_ASPECT_RATIO` (qwen-vl-utils' smart_resize refuses it, so the
  model could never be shown the image), also from the header alone;
- EXIF orientation is applied (as transformers' `load_image` does), so sizes, pixels and
  grounding boxes refer to the upright image; `image_size` reports the upright size too;
- modes: RGB is kept; L, 1, P, LA, PA, RGBA, CMYK, YCbCr, LAB, HSV are converted, alpha
  composited on white; 16-bit grayscale (I;16*, I) is always divided by 256, whatever the
  image holds (no per-image stretching: a dark 16-bit image stays dark); float images (F)
  are rejected because their value range is unknown.

Deliberately left out: resizing (the VLM adapter owns it) and caching.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from gpg_vlm.data.errors import DataError

# PIL's default bomb limit (about 89.5 M pixels); an explicit constant so that a caller who
# sets `Image.MAX_IMAGE_PIXELS = None` elsewhere does not switch our check off.
MAX_PIXELS = 89_478_485
# qwen-vl-utils' smart_resize raises beyond this ratio of the long to the short side
# (gpg_vlm.resize.MAX_ASPECT_RATIO; a test pins the two together).
MAX_ASPECT_RATIO = 200
# The formats PIL may identify. Each decodes in-process; EPS/PS (Ghostscript) and the
# other plugins are never tried. JPEG files from cameras open as "MPO", JPEG's own class.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_OPENED_AS = set(FORMATS) | {"MPO"}

_CONVERTIBLE = {"RGB", "L", "1", "P", "LA", "PA", "RGBA", "RGBa", "La", "CMYK", "YCbCr", "LAB", "HSV"}
# EXIF orientations 5-8 turn the image by 90 degrees: width and height swap
_SWAPPING = {5, 6, 7, 8}


def describe(src: Any) -> str:
    """Short human name of an image source for error messages."""
    if isinstance(src, (str, os.PathLike)):
        return repr(str(src)) if "\x00" in str(src) else str(src)[:300]
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<in-memory {src.mode} image {src.width}x{src.height}>"
    return f"<{type(src).__name__}>"


def _file(src: Any, where: str) -> Path:
    try:
        path = Path(src)
        if path.is_file():
            return path
    except (OSError, ValueError) as exc:  # NUL byte, name too long, unreadable folder
        raise DataError(f"{where}: cannot use image path {describe(src)}: {exc}") from None
    raise DataError(f"{where}: image file not found: {describe(src)}")


def _identify(src: Any, where: str) -> Image.Image:
    """PIL's lazy open, restricted to FORMATS; every failure is a DataError."""
    if isinstance(src, (bytes, bytearray)):
        fp: Any = io.BytesIO(src)
    elif isinstance(src, (str, os.PathLike)):
        fp = _file(src, where)
    else:
        raise DataError(f"{where}: unsupported image value of type {type(src).__name__}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit; we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp, formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{where}: image {describe(src)} refused as a decompression bomb (over {MAX_PIXELS} pixels): {exc}") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{where}: cannot read image {describe(src)}: not a {'/'.join(FORMATS)} "
                        "image (other formats are refused; convert it first)") from None
    except Exception as exc:  # noqa: BLE001 - a hostile header may make any plugin raise anything
        raise DataError(f"{where}: cannot read image {describe(src)}: {type(exc).__name__}: {exc}") from None


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block means no orientation, as in PIL
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _open_lazy(src: Any, where: str) -> Image.Image:
    """Open the source, reading only the header; check the format and the size limits."""
    if isinstance(src, Image.Image):
        img = src
        if img.format is not None and img.format not in _OPENED_AS:
            raise DataError(f"{where}: in-memory image of format {img.format} refused; "
                            f"only {'/'.join(FORMATS)} images are decoded")
    else:
        img = _identify(src, where)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: image {describe(src)} has an empty size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise DataError(
            f"{where}: image {describe(src)} is {w}x{h} = {w * h} pixels, over the limit of "
            f"{MAX_PIXELS} (decompression-bomb guard); resize it before training"
        )
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise DataError(f"{where}: image {describe(src)} is {w}x{h}, an aspect ratio over "
                        f"{MAX_ASPECT_RATIO}, which the Qwen-VL resize rules refuse; crop or pad it")
    return img


def image_size(src: Any, where: str) -> tuple[int, int]:
    """Upright (W, H) of an image from its header only; raises DataError like `open_image`."""
    img = _open_lazy(src, where)
    w, h = img.size
    swap = _orientation(img) in _SWAPPING
    if img is not src:
        img.close()
    return (h, w) if swap else (w, h)


def _to_rgb(img: Image.Image, src: Any, where: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I"):
        # 16-bit PNGs/TIFFs open as I;16* (or I): one fixed scale, 65535 -> 255, for every image
        wide = img.convert("I")
        lo, hi = wide.getextrema()
        if lo < 0 or hi > 65535:
            raise DataError(f"{where}: image {describe(src)} has mode {mode} with values {lo}..{hi}, outside 16 bits")
        return wide.point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
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
    """Decode an image source in full and return it upright, as RGB; `where` prefixes every error."""
    img = _open_lazy(src, where)
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error, ...
        raise DataError(f"{where}: image {describe(src)} is corrupt or truncated: {type(exc).__name__}: {exc}") from None
    try:
        if _orientation(img) != 1:
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img, src, where)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{where}: cannot convert image {describe(src)} from mode {img.mode}: {type(exc).__name__}: {exc}") from None
