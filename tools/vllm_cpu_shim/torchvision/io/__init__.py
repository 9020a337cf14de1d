"""See torchvision/__init__.py of this shim: decoding raises."""
from enum import Enum

from torchvision import _unavailable


class ImageReadMode(Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


decode_image = _unavailable("io.decode_image")


def __getattr__(name):
    return _unavailable(f"io.{name}")
