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

`reserve` serves decoding: transformers' `DynamicLayer` appends each new token's keys and
values by concatenation, a copy of the whole cache per layer per token (most of the rollout's
time on small models, and a fragmented heap at long completions). A reserved layer writes them
into buffers sized once for the prompt plus every completion token and hands the attention the
filled slice, so nothing is copied after the prompt; `select` moves its rows within the same
buffers (finished completions leave the decoding batch without a new allocation). transformers'
own `StaticCache` (5.18-5.23) also writes in place, but hands the attention all of its capacity
every step (the unfilled part masked), so attention costs the full length from the first token,
and it is built empty from the config, not from a prefilled, repeated cache.

Deliberately left out: static, sliding-window, quantized and offloaded caches (none of the
supported families builds one in a plain forward); they are reported as not indexable. A
reserved layer supports `update` and this module's functions, not transformers' own crop,
reset or beam reordering (the rollout never calls them).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


class CacheNotIndexable(TypeError):
    """A cache holding a layer type whose batch axis this module does not know how to move."""


class _ReservedKV:
    """Keys and values in buffers (rows, heads, capacity, d) reserved up front; `keys` and
    `values` are the filled slices (b, heads, S, d) of their first b rows, which the attention
    reads in place (mixed into a transformers layer class by `_reserved_classes`)."""

    key_buffer: torch.Tensor
    value_buffer: torch.Tensor

    def update(self, key_states, value_states, *args, **kwargs):
        b, filled, new = self.keys.shape[0], self.keys.shape[-2], key_states.shape[-2]
        end = filled + new
        if end > self.key_buffer.shape[-2]:
            raise RuntimeError(f"reserved cache full: {filled} + {new} positions exceed its "
                               f"capacity {self.key_buffer.shape[-2]}")
        self.key_buffer[:b, :, filled:end].copy_(key_states)  # (b, heads, new, d)
        self.value_buffer[:b, :, filled:end].copy_(value_states)
        self.keys = self.key_buffer[:b, :, :end]  # (b, heads, S, d), a view
        self.values = self.value_buffer[:b, :, :end]
        return self.keys, self.values


@functools.cache
def _reserved_classes() -> dict:
    """{transformers attention layer type: its reserved subclass}."""
    from transformers.cache_utils import DynamicLayer, LinearAttentionAndFullAttentionLayer

    return {base: type(f"Reserved{base.__name__}", (_ReservedKV, base), {})
            for base in (DynamicLayer, LinearAttentionAndFullAttentionLayer)}


def _layer_kinds():
    from transformers.cache_utils import (DynamicLayer, LinearAttentionAndFullAttentionLayer,
                                          LinearAttentionLayer)

    kinds = {DynamicLayer: ("kv",), LinearAttentionLayer: ("linear",),
             LinearAttentionAndFullAttentionLayer: ("kv", "linear")}
    return kinds | {reserved: kinds[base] for base, reserved in _reserved_classes().items()}


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
        if "kv" in kind and isinstance(layer, _ReservedKV):
            layer.keys, layer.key_buffer = _into_buffer(layer.key_buffer, fn(layer.keys))
            layer.values, layer.value_buffer = _into_buffer(layer.value_buffer, fn(layer.values))
        elif "kv" in kind and layer.is_initialized and layer.keys.numel() > 0:
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


def _into_buffer(buffer: torch.Tensor, moved: torch.Tensor):
    """(filled view, buffer) with `moved` (b, heads, S, d) written into the buffer's first b rows;
    a new buffer only when b exceeds its rows (a repeat), else the same memory is reused."""
    b, filled = moved.shape[0], moved.shape[-2]
    if b > buffer.shape[0]:
        buffer = buffer.new_empty((b, *buffer.shape[1:]))
    buffer[:b, :, :filled].copy_(moved)
    return buffer[:b, :, :filled], buffer


def reserve(cache, capacity: int) -> None:
    """Give every attention layer of `cache` key/value buffers of `capacity` positions, in place:
    later tokens are written into them instead of concatenated (see the module docstring).
    Linear-attention states are fixed-size already and stay as they are."""
    check_indexable(cache)
    classes = _reserved_classes()
    for i, layer in enumerate(cache.layers):
        if type(layer) not in classes or not layer.is_initialized or layer.keys.numel() == 0:
            continue  # already reserved, linear-attention only, or holding nothing yet
        if layer.keys.shape[-2] > capacity:
            raise ValueError(f"cache layer {i} holds {layer.keys.shape[-2]} positions, more than "
                             f"the capacity {capacity} asked for")
        reserved = object.__new__(classes[type(layer)])
        reserved.__dict__.update(layer.__dict__)
        for name in ("key", "value"):
            filled = getattr(layer, f"{name}s")  # (B, heads, S, d)
            buffer = filled.new_empty((*filled.shape[:2], capacity, filled.shape[-1]))
            view, buffer = _into_buffer(buffer, filled)
            setattr(reserved, f"{name}s", view)
            setattr(reserved, f"{name}_buffer", buffer)
        cache.layers[i] = reserved


def repeat(cache, repeats: int) -> None:
    """Repeat every row of `cache` `repeats` times in place (row i -> rows i*r .. i*r+r-1)."""
    _apply(cache, lambda t: t.repeat_interleave(repeats, dim=0), fresh_recurrent=False)


def select(cache, rows: torch.Tensor, for_backward: bool = False) -> None:
    """Keep (and repeat) the rows `rows` (b,) of `cache` in place, in that order."""
    _apply(cache, lambda t: t.index_select(0, rows.to(t.device)), fresh_recurrent=for_backward)


__all__ = ["CacheNotIndexable", "check_indexable", "is_indexable", "model_cache_indexable", "repeat",
           "reserve", "select"]
