"""What every variant of `gpg-vlm bench` runs: the workload, the prompt text and the reward.

Both runners (ours in bench/harness.py, TRL's in bench/trl_run.py) build their trainer from
these and nothing else that differs between them; bench/harness.py's docstring lists what is
kept equal and how. Nothing here imports a trainer.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """One benchmark workload; every variant runs exactly this."""

    family: str = "qwen2_vl"
    """Tiny model family (TRL's VLM support is most complete for Qwen2-VL)."""
    size: str = "m"
    """Tiny model size (gpg_vlm.tiny)."""
    image_size: int = 224
    """Image side in px: 64 visual tokens, a realistic share of the prompt."""
    prompts: int = 16
    """N prompts per optimizer step."""
    group_size: int = 8
    """G completions per prompt."""
    completion_tokens: int = 64
    """T: every completion is forced to exactly this many tokens."""
    micro_batch_completions: int = 16
    """Completions per training forward (TRL's per_device_train_batch_size; ours in tokens)."""
    warmup_steps: int = 1
    """Unmeasured steps at the start of each process (lazy initialisation, allocator warm-up)."""
    steps: int = 3
    """Measured steps per variant per round."""
    rounds: int = 3
    """Fresh processes per variant, interleaved so that a slow spell hits every variant."""
    threads: int = 0
    """Torch threads in every process; 0: os.cpu_count()."""
    seed: int = 0
    """Seeds the model, the images and sampling."""

    def __post_init__(self):
        for key in ("prompts", "completion_tokens", "micro_batch_completions", "steps", "rounds"):
            if getattr(self, key) < 1:
                raise ValueError(f"workload {key} must be >= 1, got {getattr(self, key)}")
        if self.group_size < 2:
            raise ValueError(f"workload group_size must be >= 2, got {self.group_size}")
        if self.completions % self.micro_batch_completions:
            raise ValueError(f"workload micro_batch_completions {self.micro_batch_completions} must "
                             f"divide N x G = {self.completions}")
        if self.warmup_steps < 0 or self.threads < 0:
            raise ValueError("workload warmup_steps and threads must be >= 0")

    @property
    def completions(self) -> int:
        return self.prompts * self.group_size  # B

    @property
    def num_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


FULL = Workload()
QUICK = Workload(prompts=4, group_size=4, completion_tokens=16, micro_batch_completions=8,
                 steps=2, rounds=2)
PROMPT_TEMPLATE = "{problem} Answer as <answer>...</answer>."


def bench_reward(completions, **columns) -> list[float]:
    """A reward in [0, 1) from a hash of each completion's text: no cost, varied in every group.

    Accepts plain strings (ours) and TRL's conversational completions
    ([{"role": "assistant", "content": str}]).
    """
    out = []
    for c in completions:
        if isinstance(c, list):
            c = "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in c)
        out.append(zlib.crc32(str(c).encode("utf-8", "replace")) / 2**32)
    return out
