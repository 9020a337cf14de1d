"""Repeating and indexing caches (gpg_vlm.models.cache), straight on the tiny models, fp32 CPU.

The hybrid families (Qwen3.5, Qwen3.5-MoE) hold convolution and recurrent states beside keys and
values; the dense MoE family (Qwen3-VL-MoE) keys and values only. Each test compares a prompt run
once and continued from its moved cache with the same rows run in full, and has a negative
control that moves keys and values right but the linear-attention states to the wrong rows.
"""

import types

import pytest
import torch

from gpg_vlm.models import cache as C

TOL = 1e-4
CACHED_FAMILIES = ("qwen3_5", "qwen3_5_moe", "qwen3_vl_moe")


@pytest.fixture(scope="module")
def models(tiny_dirs):
    from transformers import AutoModelForImageTextToText

    loaded = {}

    def get(family):
        if family not in loaded:
            loaded[family] = AutoModelForImageTextToText.from_pretrained(tiny_dirs(family)).eval()
        return loaded[family]

    return get


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)  # (3, B, S)


def inputs():
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 500, (2, 9), generator=g)  # (N, L), prompt 1 left-padded by 3
    prompt_mask = torch.ones(2, 9, dtype=torch.long)
    prompt_mask[1, :3] = 0
    rows = torch.tensor([0, 0, 1, 1, 1])  # (b,) the prompt of each completion
    completions = torch.randint(10, 500, (5, 6), generator=g)  # (b, T)
    completion_mask = torch.ones(5, 6, dtype=torch.long)
    completion_mask[2, 4:] = 0
    return prompts, prompt_mask, rows, completions, completion_mask


def wrong_linear_rows(cache):
    """Negative control: linear-attention states rolled by one row (keys/values untouched)."""
    for layer in cache.layers:
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            for k, t in states.items():
                if t is not None:
                    states[k] = torch.roll(t, 1, 0)


def logprobs(model, mode):
    """Completion log-probs (b, T): 'full' rows, or the prompt once + a selected cache."""
    prompts, pm, rows, comp, cm = inputs()
    mask = torch.cat([pm[rows], cm], dim=1)  # (b, L+T)
    pos = positions(mask)
    if mode == "full":
        ids = torch.cat([prompts[rows], comp], dim=1)
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             use_cache=False).last_hidden_state[:, 8:14]  # (b, T, H)
    else:
        out = model.model(input_ids=prompts, attention_mask=pm, position_ids=positions(pm),
                          use_cache=True)
        cache = out.past_key_values
        C.select(cache, rows, for_backward=True)
        if mode == "wrong":
            wrong_linear_rows(cache)
        rest = model.model(input_ids=comp[:, :-1], attention_mask=mask[:, :-1],
                           position_ids=pos[:, :, 9:-1], past_key_values=cache,
                           use_cache=True).last_hidden_state  # (b, T-1, H)
        hidden = torch.cat([out.last_hidden_state[rows, -1:], rest], dim=1)
    logp = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
    return logp.gather(-1, comp.unsqueeze(-1)).squeeze(-1) * cm  # (b, T)


@pytest.mark.parametrize("family", CACHED_FAMILIES)
def test_selected_cache_equals_full_rows_in_value_and_gradient(models, family):
    model = models(family)
    weights = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))

    def value_and_grads(mode):
        model.zero_grad()
        lp = logprobs(model, mode)
        (lp * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return lp.detach(), grads

    full, g_full = value_and_grads("full")
    shared, g_shared = value_and_grads("shared")
    assert (full - shared).abs().max() < TOL
    assert g_full.keys() == g_shared.keys() and len(g_full) > 10
    for name in g_full:
        assert torch.allclose(g_full[name], g_shared[name], rtol=1e-3, atol=1e-5), name
    if family != "qwen3_vl_moe":  # negative control: only the hybrid caches have linear states
        assert (full - logprobs(model, "wrong").detach()).abs().max() > 100 * TOL


@pytest.mark.parametrize("family", ("qwen3_5", "qwen3_vl_moe"))
def test_repeated_cache_equals_repeated_prompts(models, family):
    """Prefill N prompts, repeat G times, decode one token == prefill the N*G repeated rows."""
    model = models(family)
    prompts, pm, _, _, _ = inputs()
    g = 3
    nxt = torch.arange(20, 26).view(6, 1)  # (N*G, 1) one next token per row
    with torch.no_grad():
        def decode(tamper=None):
            cache = model.model(input_ids=prompts, attention_mask=pm, position_ids=positions(pm),
                                use_cache=True).past_key_values
            C.repeat(cache, g)
            if tamper:
                tamper(cache)
            mask = torch.cat([pm.repeat_interleave(g, 0), torch.ones(6, 1, dtype=torch.long)], 1)
            return model.model(input_ids=nxt, attention_mask=mask,
                               position_ids=positions(mask)[:, :, -1:], past_key_values=cache,
                               use_cache=True).last_hidden_state[:, -1]  # (N*G, H)

        ids = torch.cat([prompts.repeat_interleave(g, 0), nxt], dim=1)
        mask = torch.cat([pm.repeat_interleave(g, 0), torch.ones(6, 1, dtype=torch.long)], 1)
        full = model.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                           use_cache=False).last_hidden_state[:, -1]
        assert (decode() - full).abs().max() < TOL
        if family == "qwen3_5":  # negative control: linear states of another prompt's rows
            assert (decode(wrong_linear_rows) - full).abs().max() > 100 * TOL


def test_transformers_alone_does_not_move_linear_states(models):
    """Why the module exists: transformers 5.23's own method fails on the hybrid cache."""
    model = models("qwen3_5")
    prompts, pm, _, _, _ = inputs()
    with torch.no_grad():
        cache = model.model(input_ids=prompts, attention_mask=pm, position_ids=positions(pm),
                            use_cache=True).past_key_values
    assert C.is_indexable(cache)
    with pytest.raises(AttributeError):
        cache.batch_repeat_interleave(2)


def test_unknown_layer_types_are_refused():
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    sliding = types.SimpleNamespace(layers=[DynamicLayer(), DynamicSlidingWindowLayer(4)])
    assert not C.is_indexable(sliding)
    with pytest.raises(C.CacheNotIndexable, match="layer 1 is a DynamicSlidingWindowLayer"):
        C.repeat(sliding, 2)
    with pytest.raises(C.CacheNotIndexable):
        C.select(object(), torch.tensor([0]))


INTO_BUFFER = C._into_buffer


def rows_not_moved(buffer, moved):
    """A planted bug: dropping rows shrinks the view but leaves the buffer's rows where they were."""
    if moved.shape[0] < buffer.shape[0]:
        return buffer[:moved.shape[0], :, :moved.shape[-2]], buffer
    return INTO_BUFFER(buffer, moved)


def decode_steps(model, reserve: bool, capacity: int = 13):
    """Hidden states (6, 4, H) of 4 tokens decoded one by one after 2 prompts repeated 3 times,
    rows [4, 1, 0] kept after the second; with the plain or the reserved cache; and the cache."""
    prompts, pm, _, _, _ = inputs()
    cache = model.model(input_ids=prompts, attention_mask=pm, position_ids=positions(pm),
                        use_cache=True).past_key_values
    C.repeat(cache, 3)
    if reserve:
        C.reserve(cache, capacity)
    mask = pm.repeat_interleave(3, 0)  # (6, L)
    nxt = torch.arange(20, 44).view(6, 4)  # (6, 4) the tokens fed
    rows, out = torch.arange(6), torch.zeros(6, 4, model.config.get_text_config().hidden_size)
    for step in range(4):
        if step == 2:
            keep = torch.tensor([4, 1, 0])
            C.select(cache, keep)
            rows, mask = rows[keep], mask[keep]
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1)
        out[rows, step] = model.model(
            input_ids=nxt[rows, step:step + 1], attention_mask=mask,
            position_ids=positions(mask)[:, :, -1:], past_key_values=cache,
            use_cache=True).last_hidden_state[:, -1]
    return out, cache


@pytest.mark.parametrize("family", ("qwen2_vl", "qwen3_5"))
def test_reserved_cache_decodes_like_the_concatenating_one(models, family, monkeypatch):
    """Writing into reserved buffers (rows dropped in place) == transformers' concatenation."""
    model = models(family)
    with torch.no_grad():
        plain, _ = decode_steps(model, reserve=False)
        reserved, cache = decode_steps(model, reserve=True)
        assert (plain - reserved).abs().max() < 1e-5
        layers = [layer for layer in cache.layers if hasattr(layer, "key_buffer")]
        assert layers and all(layer.keys.shape == (3, layer.keys.shape[1], 13, layer.keys.shape[3])
                              for layer in layers)  # 9 prompt + 4 decoded positions: full
        # the attention reads the buffer in place: no copy per token
        assert all(layer.keys.data_ptr() == layer.key_buffer.data_ptr() for layer in layers)
        with pytest.raises(RuntimeError, match="capacity 12"):
            decode_steps(model, reserve=True, capacity=12)
        monkeypatch.setattr(C, "_into_buffer", rows_not_moved)  # negative control
        wrong, _ = decode_steps(model, reserve=True)
        assert (plain - wrong).abs().max() > 100 * TOL


def test_reserving_keeps_one_buffer_while_decoding(models):
    """The buffers are allocated once by reserve; decoding and dropping rows reuse them."""
    model = models("qwen2_vl")
    prompts, pm, _, _, _ = inputs()
    with torch.no_grad():
        cache = model.model(input_ids=prompts, attention_mask=pm, position_ids=positions(pm),
                            use_cache=True).past_key_values
        C.reserve(cache, 12)
        buffers = [layer.key_buffer.data_ptr() for layer in cache.layers]
        mask = pm
        for step, keep in enumerate((None, torch.tensor([1]), None)):
            if keep is not None:
                C.select(cache, keep)
                mask = mask[keep]
            mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=torch.long)], 1)
            model.model(input_ids=torch.full((len(mask), 1), 30 + step), attention_mask=mask,
                        position_ids=positions(mask)[:, :, -1:], past_key_values=cache,
                        use_cache=True)
        assert [layer.key_buffer.data_ptr() for layer in cache.layers] == buffers
        assert cache.get_seq_length() == 12


def test_one_token_completions_run_the_prompt_and_the_continuation(adapters):
    """The training forward runs the decoder twice per micro-batch whatever T is: under FSDP2
    each run gathers every layer, so a process whose completions all have one token must not
    skip the continuation while another runs it (the collectives would no longer pair up)."""
    from helpers import mixed_samples

    adapter = adapters("qwen2_vl")
    batch = adapter.encode(mixed_samples()[:2])
    prompt_index = torch.tensor([0, 0, 1, 1])
    ids = torch.tensor([[5, 9, 7], [6, 9, 7], [7, 9, 7], [8, 9, 7]])  # (b, T)
    calls = []
    hook = adapter.model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            one = adapter.logprobs(batch, prompt_index, ids[:, :1], torch.ones(4, 1))
            assert len(calls) == 2
            three = adapter.logprobs(batch, prompt_index, ids, torch.ones(4, 3))
            assert len(calls) == 4
    finally:
        hook.remove()
    assert one.shape == (4, 1) and (one[:, 0] - three[:, 0]).abs().max() < TOL
