"""LoRA through peft, injected in place: set-up, saving and loading of the LoRA weights only.

The layers are injected into the policy model itself (no PeftModel wrapper), so the adapter and
the rollout engine keep using the same model object. peft is imported only when LoRA is on.

A LoRA checkpoint is a standard PEFT adapter folder: `adapter_config.json` (with the base
model's path in `base_model_name_or_path`) and `adapter_model.safetensors`, whose keys carry
PEFT's `base_model.model.` prefix, so `PeftModel.from_pretrained(base, CHECKPOINT)` loads it as
written. Loading here accepts both the prefixed keys and the unprefixed ones older checkpoints hold.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from gpg_vlm.config import ConfigError, TrainConfig

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel adds in front of the model's own module names


def add_lora(model, cfg: TrainConfig):
    """Freeze `model` and inject LoRA layers (cfg.lora_*) into it; returns the LoraConfig."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, _ in model.named_modules()]
    missing = [t for t in cfg.lora_target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"config key 'lora_target_modules': {', '.join(missing)} name(s) no module of "
                          f"{cfg.model}; its linear layers are named {', '.join(linear)}")
    model.requires_grad_(False)
    base = Path(cfg.model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules),
                      # absolute, so the saved adapter finds its base from any working directory
                      base_model_name_or_path=str(base.resolve()) if base.exists() else cfg.model)
    inject_adapter_in_model(lora, model)
    return lora


class LoraSaver:
    """`save_pretrained` for a model with injected LoRA layers: a PEFT adapter folder."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, path, safe_serialization=True):
        from peft import get_peft_model_state_dict

        weights = {PEFT_PREFIX + k: v.detach().cpu().contiguous()
                   for k, v in get_peft_model_state_dict(self.model).items()}
        save_file(weights, str(Path(path) / WEIGHTS_FILE), metadata={"format": "pt"})
        config = getattr(self.model, "peft_config", {}).get("default")
        if config is None:
            raise ConfigError("the model has no injected LoRA layers to save (peft_config missing)")
        config.save_pretrained(str(path))


def load_lora(model, path: Path) -> None:
    """Load the LoRA weights of checkpoint `path` into `model` (its layers already injected)."""
    from peft import set_peft_model_state_dict

    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{path}: no {WEIGHTS_FILE} to resume the LoRA run from")
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"{path}: LoRA weights do not match lora_* settings "
                          f"(unexpected {result.unexpected_keys[:3]})")
