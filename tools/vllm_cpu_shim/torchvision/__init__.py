"""A stand-in for torchvision in .venv-vllm only (tools/vllm_venv.sh puts it on that venv's path).

Why: PyPI's torchvision wheels are CUDA builds that fail to import on the CPU build of torch
("operator torchvision::nms does not exist"), and PyPI has no CPU build. vLLM's Qwen-VL modules
import transformers' torchvision-backed image processor at import time, and transformers picks
that backend whenever a `torchvision` is importable; so vLLM cannot load a Qwen-VL model on CPU
without one, and the image processor then needs the few tensor functions it calls.

What it is: the names transformers binds at import time (interpolation and read modes) and the
three functions its torchvision image backend calls for still images -- `pil_to_tensor`,
`resize` and `normalize` -- written with torch's own ops (`resize` uses the antialiased
interpolation kernels torchvision itself calls for tensors). Anything else raises, naming this
file, so nothing else can silently compute with it. It is never installed with the package and
never placed where a real torchvision imports.
"""

__version__ = "0.0.0+gpg-vlm-cpu-shim"


def _unavailable(name):
    def fail(*args, **kwargs):
        raise RuntimeError(f"torchvision.{name} called, but this is gpg_vlm's CPU stand-in "
                           f"({__file__}), which has only pil_to_tensor, resize and normalize")
    fail.__name__ = name
    return fail
