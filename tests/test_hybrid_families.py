"""Qwen3.5 (hybrid linear attention) and the MoE families through the adapter, fp32 on CPU.

The adapter tests (tests/test_adapter.py) run for every family; this file adds what only these
families have: negative controls showing that a cache whose linear-attention states are not
repeated or indexed per row is caught by those tests' comparisons, the full-row fallback for a
cache that cannot be indexed, and that the MoE experts and router receive gradients.
"""

import pytest
import torch

from gpg_vlm.models import cache as cache_ops
from gpg_vlm.models.batch import Sample
from gpg_vlm.rollout import make_engine

from test_adapter import TOL, mixed_samples, noise_image

REPEAT, SELECT = cache_ops.repeat, cache_ops.select  # the real ones, before any monkeypatch


def tile_linear_states(cache, repeats):
    """A wrong repeat: keys/values right, linear states tiled (rows 0,1,0,1 instead of 0,0,1,1)."""
    REPEAT(cache, repeats)
    n = None
    for layer in cache.layers:
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            for k, t in states.items():
                if t is not None:
                    n = t.shape[0] // repeats
                    states[k] = t[::repeats][:n].repeat(repeats, *([1] * (t.dim() - 1)))
    assert n is not None, "the model has no linear-attention states"


def stale_linear_rows(cache, rows, for_backward=False):
    """A wrong index: keys/values selected, linear states of the rows in reverse order."""
    SELECT(cache, rows, for_backward=for_backward)
    for layer in cache.layers:
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            for k, t in states.items():
                if t is not None:
                    states[k] = t.flip(0)


def sample_and_score(adapter, samples, group_size=3, max_new_tokens=8, seed=0):
    batch = adapter.encode(samples)
    rollout = make_engine("hf", adapter).generate(
        batch, group_size, max_new_tokens=max_new_tokens,
        generator=torch.Generator().manual_seed(seed))
    return rollout, adapter.completion_logprobs(batch, rollout)


@pytest.mark.parametrize("family", ("qwen3_5", "qwen3_5_moe"))
def test_linear_states_not_repeated_per_row_are_caught(adapters, family, monkeypatch):
    adapter = adapters(family)
    samples = mixed_samples()[:2]
    rollout, trained = sample_and_score(adapter, samples)
    assert (trained - rollout.logprobs).abs().max() < TOL
    monkeypatch.setattr(cache_ops, "repeat", tile_linear_states)
    rollout, trained = sample_and_score(adapter, samples)
    assert (trained - rollout.logprobs).abs().max() > 100 * TOL


def test_linear_states_indexed_to_the_wrong_rows_are_caught(adapters, monkeypatch):
    adapter = adapters("qwen3_5")
    samples = mixed_samples()[:2]
    rollout, trained = sample_and_score(adapter, samples, max_new_tokens=6)
    assert (trained - rollout.logprobs).abs().max() < TOL
    monkeypatch.setattr(cache_ops, "select", stale_linear_rows)
    batch = adapter.encode(samples)
    wrong = adapter.completion_logprobs(batch, rollout)
    assert (wrong - rollout.logprobs).abs().max() > 100 * TOL


def test_a_cache_that_cannot_be_indexed_falls_back_to_full_rows(adapters, monkeypatch):
    """Sampling prefills each prompt G times and training runs full rows; both still agree."""
    adapter = adapters("qwen3_5")
    monkeypatch.setattr(adapter, "cache_indexable", False)
    monkeypatch.setattr(adapter._token_scorer, "cache_indexable", False)

    def refuse(*args, **kwargs):
        raise AssertionError("the fallback must not repeat or index the cache")

    monkeypatch.setattr(cache_ops, "repeat", refuse)
    monkeypatch.setattr(cache_ops, "select", refuse)
    assert adapter.training_forward == "full_rows"
    rollout, trained = sample_and_score(adapter, mixed_samples())
    assert rollout.completion_mask.sum() > 0
    assert (trained - rollout.logprobs).abs().max() < TOL


@pytest.mark.parametrize("family", ("qwen3_5_moe", "qwen3_vl_moe"))
def test_moe_router_and_experts_receive_gradients(adapters, family):
    adapter = adapters(family)
    samples = [Sample("What is this item?", [noise_image(56, 56, 1)]), Sample("Count them.")]
    batch = adapter.encode(samples)
    rollout = make_engine("hf", adapter).generate(batch, 4, max_new_tokens=8,
                                                  generator=torch.Generator().manual_seed(3))
    adapter.model.train()
    try:
        adapter.model.zero_grad()
        lp = adapter.logprobs(batch, rollout.prompt_index, rollout.completion_ids,
                              rollout.completion_mask)
        lp.sum().backward()
        named = dict(adapter.model.named_parameters())
        experts = [n for n in named if ".mlp.experts." in n]
        routers = [n for n in named if n.endswith(".mlp.gate.weight")]
        assert experts and routers
        for name in experts + routers:
            grad = named[name].grad
            assert grad is not None and grad.abs().sum() > 0, name
        # every expert of some layer is used by some token (4 experts, top 2)
        used = [(named[n].grad.flatten(1).abs().sum(1) > 0) for n in experts]
        assert any(u.all() for u in used)
    finally:
        adapter.model.zero_grad()
        adapter.model.eval()
