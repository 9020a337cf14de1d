"""`pil_to_tensor`, `resize`, `normalize` for transformers' torchvision image backend; see
torchvision/__init__.py of this shim. Anything else raises."""
import numpy as np
import torch

from torchvision import _unavailable
from torchvision.transforms import InterpolationMode


def pil_to_tensor(image) -> torch.Tensor:
    """A PIL image as a (C, H, W) tensor of its own dtype (uint8 for RGB), as torchvision does."""
    array = np.array(image, copy=True)  # (H, W, C) or (H, W)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (C, H, W)


def resize(image: torch.Tensor, size, interpolation=InterpolationMode.BILINEAR, antialias=True,
           **kwargs) -> torch.Tensor:
    """(..., C, H, W) -> (..., C, h, w); the identity when the size is unchanged (how gpg_vlm
    calls it: its images are already fitted to the model's patch grid)."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(image.shape[-2:]) == (h, w):
        return image
    mode = getattr(interpolation, "value", interpolation)
    if mode not in ("bilinear", "bicubic", "nearest", "nearest-exact"):
        raise RuntimeError(f"gpg_vlm's torchvision stand-in cannot resize with {mode!r}")
    shape = image.shape
    x = image.reshape(-1, *shape[-3:]).float()  # (N, C, H, W)
    smooth = mode in ("bilinear", "bicubic")
    x = torch.nn.functional.interpolate(x, size=(h, w), mode=mode, antialias=antialias and smooth,
                                        align_corners=False if smooth else None)
    if image.dtype == torch.uint8:
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.reshape(*shape[:-2], h, w)


def normalize(image: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    """(image - mean) / std per channel, channels at dim -3."""
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    if inplace:
        return image.sub_(mean).div_(std)
    return (image - mean) / std


def __getattr__(name):
    return _unavailable(f"transforms.v2.functional.{name}")
