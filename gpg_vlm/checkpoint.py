"""Checkpoints that are either complete or absent.

A checkpoint `OUTPUT/checkpoint-STEP/` holds the model and processor files
(`save_pretrained`, loadable by `gpg-vlm eval` or transformers directly), `optimizer.pt`
(optimizer and scheduler state, loaded with `torch.load(weights_only=True)`) and
`trainer_state.json` (step, data position, RNG states from `rng_state`, config, the run id and
its lineage: see gpg_vlm.run_folder). It is written into a hidden
temporary folder and renamed into place, so a process killed while saving leaves the previous
checkpoint untouched; `latest_checkpoint` only ever returns complete ones.

Deliberately no pickle: every file here is safetensors, JSON or a weights-only torch file.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from gpg_vlm.config import ConfigError

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# processor files copied from the base checkpoint so a checkpoint loads on its own
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class CheckpointError(RuntimeError):
    """Saving or loading a checkpoint failed; the message names the folder."""


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_to_resume(option: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint `--resume` names: "latest" (the newest complete one) or a path, checked."""
    if not option:
        return None
    resume = latest_checkpoint(output_dir) if option == "latest" else Path(option)
    if resume is None:
        print(f"gpg-vlm train: no complete checkpoint in {output_dir}; starting fresh", file=sys.stderr)
    elif not (resume / STATE_FILE).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); "
                          f"complete ones: {latest_checkpoint(output_dir) or 'none'} "
                          "is the newest, or pass --resume alone")
    return resume


def save_checkpoint(output_dir: str | Path, step: int, model, processor_dirs,
                    optimizer_state: dict, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint-`step` atomically, then delete all but the newest `keep` of its lineage.

    `trainer_state["lineage"]` (run ids, this run's last) decides which checkpoints are this
    run's own: only those are pruned or replaced; another run's checkpoint-`step` is an error.
    `processor_dirs`: where the tokenizer and processor files come from, first found wins.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    lineage = trainer_state.get("lineage") or []
    if final.exists() and not owned_by(final, lineage):
        raise CheckpointError(f"could not save checkpoint {final}: that folder belongs to another run "
                              "(its trainer_state.json names another run id); nothing was replaced")
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for source in ([processor_dirs] if isinstance(processor_dirs, (str, Path)) else processor_dirs):
            copy_processor_files(source, tmp)
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        # the state file is written last: its presence marks the folder complete
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n", encoding="utf-8")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(exc, "strerror", None) or exc
        raise CheckpointError(f"could not save checkpoint {final}: {why} "
                              "(nothing half-written is left; the previous checkpoint is intact)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in [c for c in checkpoints(output_dir) if owned_by(c, lineage)][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # temporary folders of a process killed mid-save; the folder lock (gpg_vlm.run_folder)
    # guarantees no live process is writing one
    for stale in output_dir.glob(".checkpoint-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def owned_by(checkpoint: Path, lineage: list[str]) -> bool:
    """Whether `checkpoint` was written by one of the runs of `lineage` (unrecorded: an older version's)."""
    try:
        state = json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # incomplete or unreadable: never ours to delete
    return (state.get("run_id") or "unrecorded") in lineage


def copy_processor_files(src_dir: str | Path, dst_dir: str | Path) -> None:
    """Copy the tokenizer, processor, template and generation files a model directory needs."""
    for name in PROCESSOR_FILES:
        src = Path(src_dir) / name
        if src.is_file() and not (Path(dst_dir) / name).exists():
            shutil.copy2(src, Path(dst_dir) / name)


def load_checkpoint_state(path: str | Path) -> tuple[dict, dict]:
    """(trainer_state, optimizer_state) of a complete checkpoint folder."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable {STATE_FILE} ({exc})") from None
    try:
        optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"{path}: unreadable {OPTIMIZER_FILE} ({exc})") from None
    return state, optimizer_state


def rng_state(sampling_states: list) -> dict:
    """The RNG states a resumed run needs, as JSON: Python's, torch's and each process's sampler."""
    return {"python": _lists(random.getstate()), "torch": torch.get_rng_state().tolist(),
            "sampling": sampling_states}


def restore_rng(state: dict, sampler: torch.Generator, process_index: int) -> None:
    """Put back what `rng_state` saved; `sampler` gets this process's own state."""
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    sampler.set_state(torch.tensor(state["sampling"][process_index], dtype=torch.uint8))


def _lists(obj):
    return [_lists(o) for o in obj] if isinstance(obj, tuple) else obj


def _tuples(obj):
    return tuple(_tuples(o) for o in obj) if isinstance(obj, list) else obj


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
