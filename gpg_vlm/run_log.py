"""Where a run's numbers go: metrics.jsonl, TensorBoard, Weights & Biases and the progress bar.

Every process keeps the same in-memory history (the trainer returns it); only the main
process writes files, talks to W&B or draws the progress bar, so a two-process run prints
one bar, not two. Deliberately left out: what is measured (the trainer builds the records).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gpg_vlm.config import ConfigError, TrainConfig

log = logging.getLogger("gpg_vlm.train")


def quiet_unless_main(is_main: bool) -> None:
    """Console output belongs to the main process: elsewhere only errors, and no library bars."""
    if is_main:
        return
    logging.getLogger("gpg_vlm").setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" would be drawn once per process
    transformers_logging.set_verbosity_error()


class RunLog:
    """One record per training step or evaluation, to every configured sink of the main process."""

    def __init__(self, cfg: TrainConfig, is_main: bool):
        self.out = Path(cfg.output_dir)
        self.is_main = is_main
        self.history: list[dict] = []
        self.writer = self.wandb = self.bar = None
        self.cfg = cfg

    def open(self, total_steps: int | None, done_steps: int) -> None:
        """Create the output folder, config.json, the sinks and the bar (main process only)."""
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1) + "\n")
        self.writer = _tensorboard(self.out) if self.cfg.tensorboard else None
        self.wandb = _wandb(self.cfg) if self.cfg.wandb_project else None
        self.bar = tqdm(total=total_steps, initial=done_steps, desc="train", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        self.history.append(record)
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, record["step"])
        if self.bar is not None and "reward" in record:  # a training step, not an evaluation
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{record['reward']:.3f}",
                                 inf=f"{record['informative_fraction']:.2f}")

    def say(self, text: str) -> None:
        """One line on the console, from the main process only (through the bar when drawn)."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(path / "tensorboard"))


def _wandb(cfg: TrainConfig):
    try:
        import wandb
    except ImportError:
        raise ConfigError("config key 'wandb_project': wandb is not installed (pip install wandb)") from None
    return wandb.init(project=cfg.wandb_project, config=cfg.to_dict())


def peak_memory_mb() -> float:
    """Peak accelerator memory of this process, else its peak resident memory (MiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
