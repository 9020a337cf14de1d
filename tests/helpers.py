"""Helpers shared by several test modules: small image and JSONL writers, trainer configs.

Plain functions, imported as `from helpers import ...` (pytest puts tests/ on sys.path);
fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from PIL import Image

from gpg_vlm.config import TrainConfig


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
