"""Temporary: the model-internals and rollout-engine names of the new layout, on the old adapter.

Removed when gpg_vlm/models and gpg_vlm/rollout land; nothing else may import it but train.py.
"""

from __future__ import annotations

from gpg_vlm.adapter import VLMAdapter


def _freeze_vision(self) -> None:
    self.model.model.visual.requires_grad_(False)


def _enable_gradient_checkpointing(self) -> None:
    model = self.model
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = True  # generation still uses the KV cache


def _set_scorer(self, wrapped) -> None:
    self.scorer = wrapped


for _name, _fn in (("freeze_vision", _freeze_vision),
                   ("enable_gradient_checkpointing", _enable_gradient_checkpointing),
                   ("set_scorer", _set_scorer)):
    if not hasattr(VLMAdapter, _name):
        setattr(VLMAdapter, _name, _fn)


class _HFRollout:
    def __init__(self, adapter):
        self.adapter = adapter

    def generate(self, batch, group_size, **options):
        return self.adapter.generate(batch, group_size, **options)

    def sync_weights(self, model) -> None:
        pass

    def close(self) -> None:
        pass


def make_engine(name: str, adapter, **options):
    assert name == "hf", name
    return _HFRollout(adapter)
