"""The KV-cache keyword across the supported transformers range (>= 5.18, < 6).

transformers 5.24 renames the forward argument `past_key_values` to `cache` (the old name warns
and goes away in 5.40) and the output field likewise; the sampling loop and the training forward
pass and read it through `cache_kwargs` / `output_cache`.
"""

import inspect

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from gpg_vlm.models.forward import cache_kwargs, output_cache


class NewStyle(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return input_ids


class OldStyle(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return input_ids


def test_cache_keyword_follows_the_forward_signature():
    marker = object()
    assert cache_kwargs(NewStyle(), marker) == {"cache": marker}
    assert cache_kwargs(OldStyle(), marker) == {"past_key_values": marker}


def test_installed_models_take_the_chosen_keyword(adapters):
    for family in ("qwen2_vl", "qwen3_vl"):
        model = adapters(family).model
        for module in (model, model.model):
            (key,) = cache_kwargs(module, None)
            assert key in inspect.signature(type(module).forward).parameters


def test_output_cache_reads_the_installed_output_field():
    marker = object()
    field = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
    out = BaseModelOutputWithPast(last_hidden_state=torch.zeros(1), **{field: marker})
    assert output_cache(out) is marker
