"""Checkpoints outside the trainer: loading any checkpoint for evaluation, and `gpg-vlm export`.

A training checkpoint is one of two kinds:
- full: `config.json` + `*.safetensors` (save_pretrained) and the processor files;
- LoRA: a PEFT adapter folder (`adapter_config.json` naming the base model's path,
  `adapter_model.safetensors`) and the processor files, with no model weights of its own.
Both also hold `trainer_state.json` (whose `config` is the run's TrainConfig) and `optimizer.pt`.

`load_adapter` turns either kind into a VLMAdapter (LoRA: the base model, the adapter loaded with
PEFT and merged). `training_settings` reads what the run trained with (prompt template,
completion length, pixel limits) so an evaluation can use the same. `gpg-vlm export CHECKPOINT
--out DIR [--merge]` writes a folder other tools load as is: the model (with `--merge`, the LoRA
merged into the base weights: a plain Hugging Face checkpoint), the processor and chat template
files, and `gpg_vlm_training.json` (the training settings), never the optimizer state.
Without `--merge` a LoRA checkpoint is written as the PEFT adapter folder it is.

Deliberately left out: uploading to a hub, dtype conversion and sharding choices (the weights
keep the base checkpoint's dtype and transformers' default shard size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from gpg_vlm.checkpoint import PROCESSOR_FILES, STATE_FILE, copy_processor_files
from gpg_vlm.lora import CONFIG_FILE as LORA_CONFIG, WEIGHTS_FILE as LORA_WEIGHTS

SETTINGS_FILE = "gpg_vlm_training.json"
# what an evaluation takes from training, if the run recorded it (TrainConfig field names)
TRAINED_WITH = ("prompt_template", "max_new_tokens", "min_pixels", "max_pixels")


class ExportError(Exception):
    """A checkpoint that cannot be loaded or exported; the message names the folder or file."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return data


def lora_base(path: str | Path) -> Path | None:
    """The base model of a LoRA checkpoint (None for a full checkpoint), checked to exist."""
    path = Path(path)
    if (path / "config.json").is_file() or not (path / LORA_CONFIG).is_file():
        return None
    base = _read_json(path / LORA_CONFIG).get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{path / LORA_CONFIG}: no base_model_name_or_path; set it to the base "
                          "model's folder")
    if not (Path(base) / "config.json").is_file():
        raise ExportError(f"{path / LORA_CONFIG}: base model {base} (base_model_name_or_path) is not "
                          "a checkpoint folder here; edit the field to where the base model is")
    return Path(base)


def training_settings(path: str | Path) -> tuple[dict, str | None]:
    """({field: value} of TRAINED_WITH the checkpoint recorded, the file they came from)."""
    path = Path(path)
    for name, key in ((STATE_FILE, "config"), (SETTINGS_FILE, None)):
        if (path / name).is_file():
            data = _read_json(path / name)
            config = data.get(key, {}) if key else data
            if not isinstance(config, dict):
                raise ExportError(f"{path / name}: field {key!r} is not an object")
            found = {k: config[k] for k in TRAINED_WITH if config.get(k) is not None}
            return found, str(path / name)
    return {}, None


def load_adapter(path: str | Path, **options):
    """A VLMAdapter for a full or LoRA checkpoint (LoRA merged into the base weights)."""
    from gpg_vlm.models.adapter import VLMAdapter

    base = lora_base(path)
    if base is None:
        return VLMAdapter.from_pretrained(path, **options)
    adapter = VLMAdapter.from_pretrained(base, **options)
    merge_lora(adapter.model, path)
    return adapter


def merge_lora(model, path: str | Path):
    """Load the PEFT adapter at `path` onto `model` and merge it in; the same model object is kept."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"{path}: cannot load the LoRA adapter ({exc})") from None
    return peft_model.merge_and_unload()


def _plain_model(base: Path, lora: Path | None):
    """The transformers model of `base` in its stored dtype, with the LoRA at `lora` merged."""
    import transformers

    from gpg_vlm.models.family import FAMILIES

    family = _read_json(base / "config.json").get("model_type")
    if family not in FAMILIES:
        raise ExportError(f"{base}: model_type {family!r} is not a supported Qwen-VL family")
    model_class = getattr(transformers, FAMILIES[family].model_class)
    model = model_class.from_pretrained(base, dtype="auto", use_safetensors=True)
    return merge_lora(model, lora) if lora is not None else model


def export_checkpoint(checkpoint: str | Path, out: str | Path, merge: bool = False) -> str:
    """Write the portable folder `out` for `checkpoint`; returns what was written, in words."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise ExportError(f"checkpoint {checkpoint} does not exist")
    base = lora_base(checkpoint)
    if base is None and not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint}: neither config.json (full checkpoint) nor "
                          f"{LORA_CONFIG} (LoRA checkpoint)")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    if base is not None and merge:
        _plain_model(base, checkpoint).save_pretrained(out, safe_serialization=True)
        kind = "a plain checkpoint (LoRA merged into the base weights)"
    elif base is not None:
        for name in (LORA_CONFIG, LORA_WEIGHTS):
            shutil.copy2(checkpoint / name, out / name)
        kind = f"a PEFT adapter on {base} (pass --merge for a plain checkpoint)"
    else:
        for src in checkpoint.iterdir():
            if src.name == "config.json" or src.name.endswith((".safetensors", ".safetensors.index.json")):
                shutil.copy2(src, out / src.name)
        kind = "a plain checkpoint" + (" (--merge: nothing to merge, it holds all weights)" if merge else "")
    copy_processor_files(checkpoint, out)  # the files the run used, then any the base adds
    if base is not None:
        copy_processor_files(base, out)
    settings, source = training_settings(checkpoint)
    if settings:
        settings["from"] = Path(source).name
        (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    return kind


def _parser():
    p = argparse.ArgumentParser(prog="gpg-vlm export", description="Write a training checkpoint as a "
                                "folder transformers, PEFT, vLLM and evaluation tools load as is.")
    p.add_argument("checkpoint", help="a checkpoint-STEP folder (full or LoRA)")
    p.add_argument("--out", required=True, help="new folder to write")
    p.add_argument("--merge", action="store_true",
                   help="LoRA checkpoints: merge the adapter into the base weights (a plain checkpoint)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        kind = export_checkpoint(args.checkpoint, args.out, args.merge)
    except ExportError as exc:
        print(f"gpg-vlm export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {kind}, with the processor files ({', '.join(_present(args.out))})")
    return 0


def _present(out) -> list[str]:
    return [n for n in PROCESSOR_FILES if (Path(out) / n).is_file()] or ["none found"]
