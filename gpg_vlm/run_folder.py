"""Who owns an output folder: the lock, the run id and its lineage, and what a new run may do there.

- The lock: `OUTPUT/.gpg-vlm.lock`, an `flock` held by the main process for the whole run and
  holding its pid, host and start time. A second process is refused in one line naming them;
  the kernel drops the lock when its holder dies, so a lock left by a dead process is taken
  over (and said so). Other processes of a data-parallel run never take it.
- The run id: each run gets one (`new_run_id`); a checkpoint records it and its `lineage`
  (the ids of the runs it continues, oldest first). Pruning and `checkpoint-K` replacement
  touch only checkpoints of the current lineage (gpg_vlm.checkpoint).
- `claim`: a fresh run into a folder that holds a run is refused unless `overwrite_output_dir`
  is set, which moves that run's files into `OUTPUT/replaced-<id>/` and says so. `--resume` from
  an older checkpoint of the folder branches: the newer checkpoints are moved into
  `OUTPUT/abandoned-<id>-after-step-K/`, so the next plain `--resume` follows the branch.
  Nothing here deletes a file: what is set aside is moved, and the line says where.

Deliberately left out: what a checkpoint holds (gpg_vlm.checkpoint) and how metrics.jsonl is
repaired (gpg_vlm.run_log; `claim` only tells it which step to keep up to).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path

from gpg_vlm.config import ConfigError

LOCK_FILE = ".gpg-vlm.lock"
# the entries a training run writes into its folder (what overwrite/branching move aside)
RUN_FILES = ("metrics.jsonl", "metrics.dropped.jsonl", "config.json", "tensorboard")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunFolderError(ConfigError):
    """The output folder belongs to another run or process; the message says what to do."""


def new_run_id() -> str:
    """Sortable and unique enough: UTC start time plus 6 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class FolderLock:
    """An exclusive lock on `folder` for this process (`acquire` / `release`)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self.fd = None
        self.took_over = None  # the dead holder's description, when its lock was taken over

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunFolderError(f"{self.path.parent} is in use by another run ({holder}); wait for it, "
                                 "stop it, or choose another output_dir") from None
        old = _read(fd)
        if old:  # the file outlived its holder: the kernel released the flock when it died
            self.took_over = _describe(old)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # emptied first: a later reader sees no holder rather than a stale one
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> dict:
    try:
        value = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def checkpoint_step(path: Path) -> int | None:
    m = _CHECKPOINT.match(Path(path).name)
    return int(m.group(1)) if m else None


def describe_run(folder: Path) -> str | None:
    """What of a training run `folder` holds ("3 checkpoints (newest checkpoint-6), metrics.jsonl"), or None."""
    if not folder.is_dir():
        return None
    found = sorted((s, p.name) for p in folder.iterdir()
                   if (s := checkpoint_step(p)) is not None and p.is_dir())
    parts = []
    if found:
        parts.append(f"{len(found)} checkpoint(s), newest {found[-1][1]}")
    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        parts.append("metrics.jsonl")
    return ", ".join(parts) or None


def set_aside(folder: Path, names: list[str], label: str) -> Path | None:
    """Move the entries `names` of `folder` into `folder/label/` (renames: nothing is copied or deleted)."""
    present = [n for n in names if (folder / n).exists()]
    if not present:
        return None
    target = folder / label
    target.mkdir(parents=True, exist_ok=True)
    for name in present:
        os.replace(folder / name, target / name)
    return target


def claim(folder: Path, resume: Path | None, state: dict | None, resuming: bool,
          overwrite: bool, say) -> tuple[list[str], int]:
    """Decide what this run is in `folder`: (lineage, step whose metrics records are kept).

    `resume`/`state`: the checkpoint resumed from and its trainer state (None: none);
    `resuming`: --resume was given (possibly finding no checkpoint); `say`: one console line.
    """
    folder = Path(folder)
    held = describe_run(folder)
    inside = resume is not None and resume.resolve().parent == folder.resolve()
    if held and not resuming and not overwrite or held and resume is not None and not inside and not overwrite:
        raise RunFolderError(
            f"output_dir {folder} already holds a run ({held}); continue it with --resume, choose "
            f"another output_dir, or set overwrite_output_dir=true (moves that run's files into "
            f"{folder}/replaced-<id>/, deleting nothing)")
    if held and overwrite and not (resuming and (resume is None or inside)):
        label = f"replaced-{new_run_id()}"
        set_aside(folder, _run_entries(folder), label)
        say(f"overwrite_output_dir: the previous run's files in {folder} were moved to {folder / label}/")
        held = None
    if resume is None:
        return [new_run_id()], 0
    step = int(state["step"])
    lineage = list(state.get("lineage") or [state.get("run_id") or "unrecorded"])
    newer = [p.name for p in folder.iterdir() if inside and (checkpoint_step(p) or 0) > step] \
        if folder.is_dir() else []
    if not inside or newer:  # a branch: a new id continuing the checkpoint's lineage
        lineage.append(new_run_id())
    if newer:
        label = f"abandoned-{lineage[-2]}-after-step-{step}"
        set_aside(folder, sorted(newer, key=checkpoint_step), label)
        say(f"--resume {resume}: branching at step {step}; the newer checkpoints "
            f"({', '.join(sorted(newer, key=checkpoint_step))}) were moved to {folder / label}/")
    return lineage, step


def _run_entries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()
            if checkpoint_step(p) is not None or p.name in RUN_FILES or p.name.startswith(".checkpoint-")]


# keys whose change makes a resumed run another run (its data, model, objective or rewards)
RUN_DEFINING = ("model", "data", "algorithm", "group_size", "rewards", "prompt_template", "answer_only",
                "scale_by_std", "kl_beta", "token_mean", "clip_eps", "lora_r", "lora_alpha",
                "lora_target_modules", "freeze_vision", "seed")
# keys that steer this invocation only, never compared
_NOT_COMPARED = ("overwrite_output_dir", "allow_config_change")


def check_config_change(saved: dict, now: dict, allow: bool, where: Path, say) -> list[str]:
    """Compare a checkpoint's config with this run's: refuse RUN_DEFINING changes unless `allow`,
    say the others in one warning line; returns the changed keys."""
    def norm(v):
        return list(v) if isinstance(v, tuple) else v

    changed = [k for k in now if k not in _NOT_COMPARED and k in saved and norm(saved[k]) != norm(now[k])]
    defining = [k for k in changed if k in RUN_DEFINING]
    shown = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
    if defining and not allow:
        raise RunFolderError(
            f"--resume {where}: the config changes what the run is ({', '.join(defining)}: "
            + "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in defining)
            + "); resume with the checkpoint's values, start a new run in another output_dir, "
              "or set allow_config_change=true")
    if changed:
        say(f"--resume {where}: config changed since the checkpoint ({shown})")
    return changed
