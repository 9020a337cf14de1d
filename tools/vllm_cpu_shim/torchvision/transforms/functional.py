"""See torchvision/__init__.py of this shim: the v2 functions, anything else raises."""
from torchvision import _unavailable
from torchvision.transforms import InterpolationMode  # noqa: F401
from torchvision.transforms.v2.functional import normalize, pil_to_tensor, resize  # noqa: F401


def __getattr__(name):
    return _unavailable(f"transforms.functional.{name}")
