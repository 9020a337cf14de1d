"""Helpers shared by several test modules: small image and JSONL writers, trainer configs.

Plain functions, imported as `from helpers import ...` (pytest puts tests/ on sys.path);
fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from gpg_vlm.cli import main as cli
from gpg_vlm.config import TrainConfig
from gpg_vlm.models.batch import Sample


def png(path: Path, value: int = 128, size=(16, 12), mode="RGB") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode in ("L", "I;16", "P") else (value,) * len(mode)
    Image.new(mode, size, color).save(path)
    return path.name


def bomb_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit grayscale PNG of side x side pixels (a few KB, about 400 M pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + side // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def make_config(tiny_dirs, fm_data, out, **changes):
    values = dict(
        model=str(tiny_dirs("qwen2_vl")), data=str(fm_data / "classification_train.jsonl"),
        output_dir=str(out), group_size=4, prompts_per_step=4, max_new_tokens=6,
        learning_rate=1e-3, max_steps=2, rewards={"rewards_for_tests:parity_reward": 1.0},
        tensorboard=False, lr_schedule="constant", max_resample_tries=0)
    values.update(changes)
    return TrainConfig(**values)


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def env(*paths) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *map(str, paths), os.environ.get("PYTHONPATH", "")]))


def write_config(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    """`gpg-vlm ARGV` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = cli(list(map(str, argv)))
    return code, capsys.readouterr().err


def assert_one_line(err: str, *needles: str) -> None:
    """stderr's message line starts with the command and names every needle; no traceback."""
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("gpg-vlm ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    """Step -> loss; a step run again after a resume overwrites the first record."""
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


TOL = 1e-4


def noise_image(width, height, seed):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def mixed_samples():
    """Different image sizes, a text-only prompt, a two-image prompt, a system prompt."""
    return [
        Sample("What is this item?", [noise_image(56, 56, 1)]),
        Sample("Compare the two.", [noise_image(84, 56, 2), noise_image(56, 112, 3)],
               system="Answer briefly."),
        Sample("No image here, just text."),
        Sample("Where is the bag?", [noise_image(150, 100, 4)]),
    ]


def vllm_samples(seed=0):
    """The vLLM tests' prompts: different image sizes, two images in one prompt, a text-only
    prompt, a system turn."""
    return [
        Sample("What is this item?", [noise_image(56, 56, seed + 1)]),
        Sample("Compare the two.", [noise_image(84, 56, seed + 2), noise_image(56, 112, seed + 3)],
               system="Answer briefly."),
        Sample("No image here, just text."),
    ]


def long_samples():
    """Prompts of several KV-cache blocks, so a second rollout of them hits the prefix cache."""
    text = "Count the items on the left and then the items on the right. " * 30
    return [Sample(text, [noise_image(112, 84, 7)]), Sample(text + "How many?")]


def prefix_cache_batch(adapter, engine):
    """`long_samples()` encoded, checked to span full KV blocks that vLLM's prefix cache keeps."""
    batch = adapter.encode(long_samples())
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    assert int(batch.prompt_lengths().min()) > 2 * block
    return batch


def perturb(model, seed: int, scale: float = 0.02) -> None:
    """Move every weight of `model` by seeded noise (tied and expert weights included)."""
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * scale)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def masked_max(a, b, mask):
    return float(((a - b).abs() * mask).max().detach())
