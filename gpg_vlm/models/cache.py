"""Repeat and index a transformers cache along its batch axis, linear-attention states included.

Rollout prefills each prompt once and repeats its cache G times; the training forward runs each
prompt once and indexes its cache out to the rows of its completions. For attention layers the
cache is keys and values. Qwen3.5's Gated DeltaNet layers instead keep, per layer, a
convolution state (the last `linear_conv_kernel_dim` inputs of the causal conv, (B, C, K)) and a
recurrent state (the delta-rule memory, (B, heads, d_k, d_v)). Both are per row and must follow
the rows exactly like keys and values, or every completion continues from another prompt's
memory and the log-probs are silently wrong.

transformers 5.23 does not cover them: `DynamicCache.batch_repeat_interleave` /
`batch_select_indices` raise AttributeError on a `LinearAttentionLayer`, and on the hybrid
`LinearAttentionAndFullAttentionLayer` the inherited `DynamicLayer` methods move keys and values
only, leaving the linear states behind without an error. So the two functions here handle each
layer type they know, by its exact type, and raise `CacheNotIndexable` on any other, so that the
caller can choose the full-row path instead of computing with a half-moved cache.

`select(..., for_backward=True)` also marks each selected recurrent state as not yet allocated:
the next forward then writes its new state into a fresh tensor instead of `copy_`-ing it into
the selected one, which autograd saved as the delta rule's initial state (an in-place write
there would make backward fail). Convolution states need nothing: the continuation only
concatenates them, and `cat` keeps no input for backward.

Deliberately left out: static, sliding-window, quantized and offloaded caches (none of the
supported families builds one in a plain forward); they are reported as not indexable.
"""

from __future__ import annotations

from typing import Callable

import torch


class CacheNotIndexable(TypeError):
    """A cache holding a layer type whose batch axis this module does not know how to move."""


def _layer_kinds():
    from transformers.cache_utils import (DynamicLayer, LinearAttentionAndFullAttentionLayer,
                                          LinearAttentionLayer)

    return {DynamicLayer: ("kv",), LinearAttentionLayer: ("linear",),
            LinearAttentionAndFullAttentionLayer: ("kv", "linear")}


def check_indexable(cache) -> None:
    """Raise CacheNotIndexable naming the first layer of `cache` this module cannot move."""
    kinds = _layer_kinds()
    for i, layer in enumerate(getattr(cache, "layers", None) or []):
        if type(layer) not in kinds:
            raise CacheNotIndexable(f"cache layer {i} is a {type(layer).__name__}; only "
                                    f"{', '.join(k.__name__ for k in kinds)} can be repeated/indexed")
    if not hasattr(cache, "layers"):
        raise CacheNotIndexable(f"{type(cache).__name__} is not a layered transformers Cache")


def is_indexable(cache) -> bool:
    try:
        check_indexable(cache)
    except CacheNotIndexable:
        return False
    return True


def model_cache_indexable(model) -> bool:
    """Whether the cache `model`'s decoder builds (a DynamicCache from its text config, as the
    Qwen-VL decoders build theirs) is made only of layer types this module can move."""
    from transformers.cache_utils import DynamicCache

    return is_indexable(DynamicCache(config=model.config.get_text_config()))


def _apply(cache, fn: Callable[[torch.Tensor], torch.Tensor], fresh_recurrent: bool) -> None:
    check_indexable(cache)
    kinds = _layer_kinds()
    for layer in cache.layers:
        kind = kinds[type(layer)]
        if "kv" in kind and layer.is_initialized and layer.keys.numel() > 0:
            layer.keys = fn(layer.keys)  # (B, heads, S, d)
            layer.values = fn(layer.values)
        if "linear" in kind:
            for k in range(layer.number_of_states):
                if layer.is_conv_states_initialized[k]:
                    layer.conv_states[k] = fn(layer.conv_states[k])  # (B, C, K)
                if layer.is_recurrent_states_initialized[k]:
                    layer.recurrent_states[k] = fn(layer.recurrent_states[k])  # (B, h, dk, dv)
                    if fresh_recurrent:
                        # read as the initial state (has_previous_state stays True), then the
                        # update allocates a new tensor instead of writing into this one
                        layer.is_recurrent_states_initialized[k] = False


def repeat(cache, repeats: int) -> None:
    """Repeat every row of `cache` `repeats` times in place (row i -> rows i*r .. i*r+r-1)."""
    _apply(cache, lambda t: t.repeat_interleave(repeats, dim=0), fresh_recurrent=False)


def select(cache, rows: torch.Tensor, for_backward: bool = False) -> None:
    """Keep (and repeat) the rows `rows` (b,) of `cache` in place, in that order."""
    _apply(cache, lambda t: t.index_select(0, rows.to(t.device)), fresh_recurrent=for_backward)


__all__ = ["CacheNotIndexable", "check_indexable", "is_indexable", "model_cache_indexable", "repeat",
           "select"]
