"""Where a run's numbers go: metrics.jsonl, TensorBoard, Weights & Biases and the progress bar.

Every process keeps the same in-memory history (the trainer returns it); only the main
process writes files, talks to W&B or draws the progress bar, so a two-process run prints
one bar, not two. Deliberately left out: what is measured (the trainer builds the records).

metrics.jsonl is a log to trust: strict JSON, one object a line (a NaN or infinity is written
as null and its key listed under "non_finite"); on opening, a partial last line (a process
killed mid-write) is repaired and records past the step the run starts from (a resumed
checkpoint's) are moved to metrics.dropped.jsonl, so every step appears once after any kill and
resume. A write that fails (a full disk) is one line naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
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


class MetricsWriteError(OSError):
    """metrics.jsonl could not be written (errno kept, so the trainer knows the disk failed)."""

    def __str__(self) -> str:
        return f"could not write {self.filename}: {self.strerror}"


def strict_record(record: dict) -> str:
    """One JSON line: non-finite floats become null and are listed under "non_finite"."""
    bad = [k for k, v in record.items() if not _finite(v)]
    if bad:
        record = {**{k: (_finite_only(v) if k in bad else v) for k, v in record.items()}, "non_finite": bad}
    return json.dumps(record, allow_nan=False, default=_number) + "\n"


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(map(_finite, value))
    return True


def _finite_only(value):
    if isinstance(value, (list, tuple)):
        return [_finite_only(v) for v in value]
    return value if _finite(value) else None


def _number(value):  # tensors or numpy scalars that slipped into a record
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return value if math.isfinite(value) else None


def repair_metrics(path: Path, keep_through_step: int) -> tuple[int, int]:
    """Keep the whole JSON lines of `path` with step <= `keep_through_step`; (dropped, repaired).

    Dropped records (later steps of a killed or abandoned run) are appended to
    metrics.dropped.jsonl beside it; a line that is not JSON (a partial write) is dropped there too.
    """
    if not path.is_file():
        return 0, 0
    raw = path.read_bytes()
    kept, dropped, repaired = [], [], 0
    for line in raw.splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            record = None
        if not isinstance(record, dict):
            repaired += 1
            dropped.append(line if line.endswith(b"\n") else line + b"\n")
        elif isinstance(record.get("step"), int) and record["step"] > keep_through_step:
            dropped.append(line)
        else:
            kept.append(line)
    if not dropped:
        return 0, 0
    with open(path.with_name("metrics.dropped.jsonl"), "ab") as f:
        f.writelines(dropped)
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, path)
    return len(dropped) - repaired, repaired


class RunLog:
    """One record per training step or evaluation, to every configured sink of the main process."""

    def __init__(self, cfg: TrainConfig, is_main: bool):
        self.out = Path(cfg.output_dir)
        self.is_main = is_main
        self.history: list[dict] = []
        self.writer = self.wandb = self.bar = None
        self.cfg = cfg
        self.warned_non_finite = False

    def open(self, total_steps: int | None, done_steps: int) -> None:
        """Create the output folder, config.json, the sinks and the bar (main process only);
        metrics.jsonl keeps the records of steps <= `done_steps` (see the module docstring)."""
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        dropped, repaired = repair_metrics(self.out / "metrics.jsonl", done_steps)
        if dropped or repaired:
            log.warning("%s: %d record(s) past step %d and %d partial line(s) moved to %s",
                        self.out / "metrics.jsonl", dropped, done_steps, repaired,
                        self.out / "metrics.dropped.jsonl")
        (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1) + "\n")
        self.writer = _tensorboard(self.out) if self.cfg.tensorboard else None
        self.wandb = _wandb(self.cfg) if self.cfg.wandb_project else None
        self.bar = tqdm(total=total_steps, initial=done_steps, desc="train", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        self.history.append(record)
        if not self.is_main:
            return
        path = self.out / "metrics.jsonl"
        line = strict_record(record)
        if line.endswith(']}\n') and '"non_finite": [' in line and not self.warned_non_finite:
            self.warned_non_finite = True
            log.warning("%s: non-finite values are written as null (their keys under \"non_finite\")", path)
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:
            raise MetricsWriteError(exc.errno, exc.strerror, str(path)) from None
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
