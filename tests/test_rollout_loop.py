"""The sampling loop (gpg_vlm/rollout/hf.py): finished rows leave the batch, nothing else changes.

Run on a full-attention family (qwen2_vl) and a hybrid one (qwen3_5, linear-attention states
beside keys and values), fp32 CPU. A hook on the output layer raises the EOS logit (row-blind,
the same in sampling and in the training forward) so that completions end at different steps and
rows really are dropped mid-way. The checks:
- dropping rows at every finish samples exactly what decoding every row to the end samples;
- the reported log-probs equal the training forward's;
- greedy decoding equals a reference loop that reruns the whole sequence every token (no cache);
- min/max_new_tokens keep their meaning;
and each is shown to fail on a planted bug (a compaction that mixes rows up, or that moves the
keys and values but leaves linear-attention states behind).
"""

import pytest
import torch

from gpg_vlm.models import cache as cache_ops
from gpg_vlm.models.forward import policy_scores
from gpg_vlm.rollout import hf
from helpers import TOL, mixed_samples

FAMILIES = ("qwen2_vl", "qwen3_5")
ALWAYS, NEVER = 0.0, 2.0  # compact_share: drop finished rows at every finish / never
EOS_BOOST = 4.0  # sampled lengths from 1 to 12 of 12 tokens on both tiny models
GREEDY_BOOST = 2.0  # greedy: some rows end at EOS (4 or 6 tokens), others run to 10
SELECT = cache_ops.select  # the real one, before any monkeypatch


class EosBoost:
    """Output-layer hook adding `boost` to the EOS logits; records the batch sizes it sees."""

    def __init__(self, adapter, boost: float):
        self.eos, self.boost, self.rows = adapter.eos_token_ids, boost, []

    def __call__(self, module, inputs, output):
        self.rows.append(output.shape[0])
        output = output.clone()
        output[..., self.eos] += self.boost
        return output


@pytest.fixture
def boosted(adapters, request):
    """(adapter, hook) with EOS made likely, for the family in `request.param`."""
    adapter = adapters(request.param)
    hook = EosBoost(adapter, EOS_BOOST)
    handle = adapter.model.lm_head.register_forward_hook(hook)
    yield adapter, hook
    handle.remove()


def sample(adapter, share, seed=0, group_size=3, **options):
    batch = adapter.encode(mixed_samples())
    options.setdefault("max_new_tokens", 12)
    rollout = hf.HFRollout(adapter, compact_share=share).generate(
        batch, group_size, generator=torch.Generator().manual_seed(seed), **options)
    return batch, rollout


def mixed_up(cache, rows, **options):
    """A planted bug: the kept rows of the cache in the wrong order."""
    SELECT(cache, rows.flip(0), **options)


def linear_states_left_behind(cache, rows, **options):
    """A planted bug: keys and values dropped right, linear-attention states not moved at all."""
    states = [(layer, dict(layer.conv_states), dict(layer.recurrent_states))
              for layer in cache.layers if hasattr(layer, "conv_states")]
    SELECT(cache, rows, **options)
    for layer, conv, recurrent in states:
        for k in conv:
            if conv[k] is not None:
                layer.conv_states[k] = conv[k][:len(rows)]
                layer.recurrent_states[k] = recurrent[k][:len(rows)]


@pytest.mark.parametrize("boosted", FAMILIES, indirect=True)
def test_dropping_finished_rows_changes_nothing_sampled(boosted):
    adapter, hook = boosted
    _, kept = sample(adapter, NEVER)
    assert set(hook.rows[1:]) == {12}  # after the prefill (4 prompts): every row to the end
    hook.rows.clear()
    batch, dropped = sample(adapter, ALWAYS)
    lengths = dropped.completion_mask.sum(1)
    assert len(set(lengths.tolist())) >= 3 and not dropped.truncated.all()  # varied, some EOS
    assert len(set(hook.rows[1:])) >= 3  # rows really left the batch
    assert torch.equal(kept.completion_ids, dropped.completion_ids)
    assert torch.equal(kept.completion_mask, dropped.completion_mask)
    assert torch.equal(kept.truncated, dropped.truncated)
    assert (kept.logprobs - dropped.logprobs).abs().max() < 1e-5
    trained = adapter.completion_logprobs(batch, dropped)
    assert (trained - dropped.logprobs).abs().max() < TOL


@pytest.mark.parametrize("boosted", FAMILIES, indirect=True)
def test_a_compaction_that_mixes_rows_up_is_caught(boosted, monkeypatch):
    adapter, _ = boosted
    _, kept = sample(adapter, NEVER)
    monkeypatch.setattr(cache_ops, "select", mixed_up)
    batch, wrong = sample(adapter, ALWAYS)
    monkeypatch.undo()  # the training forward indexes its cache with the real select
    assert not torch.equal(kept.completion_ids, wrong.completion_ids)
    trained = adapter.completion_logprobs(batch, wrong)
    assert (trained - wrong.logprobs).abs().max() > 100 * TOL


def test_linear_states_left_behind_by_a_compaction_are_caught(adapters, monkeypatch):
    adapter = adapters("qwen3_5")
    handle = adapter.model.lm_head.register_forward_hook(EosBoost(adapter, EOS_BOOST))
    try:
        monkeypatch.setattr(cache_ops, "select", linear_states_left_behind)
        batch, wrong = sample(adapter, ALWAYS)
        monkeypatch.undo()
        trained = adapter.completion_logprobs(batch, wrong)
    finally:
        handle.remove()
    assert (trained - wrong.logprobs).abs().max() > 100 * TOL


def reference_greedy(adapter, batch, max_new_tokens, min_new_tokens=0):
    """Greedy completions (ids (N, T), log-probs (N, T), mask (N, T)) by rerunning prompt +
    completion so far through the model for every token: no cache, every row to the end."""
    model, n = adapter.model, batch.num_prompts
    grid = batch.image_grid_thw
    pos = adapter.positions(batch.input_ids, batch.attention_mask, batch.mm_token_type_ids, grid)
    next_pos = pos.amax(dim=(0, 2)) + 1  # (N,)
    eos = torch.tensor(adapter.eos_token_ids)
    ids = torch.zeros((n, 0), dtype=torch.long)
    logps, alive, done = [], [], torch.zeros(n, dtype=torch.bool)
    for step in range(max_new_tokens):
        t = ids.shape[1]
        steps = (next_pos[:, None] + torch.arange(t)).unsqueeze(0).expand(3, -1, -1)  # (3, N, t)
        logits = model(
            input_ids=torch.cat([batch.input_ids, ids], 1),
            attention_mask=torch.cat([batch.attention_mask, torch.ones_like(ids)], 1),
            position_ids=torch.cat([pos, steps], 2), pixel_values=batch.pixel_values,
            image_grid_thw=grid, mm_token_type_ids=torch.cat(
                [batch.mm_token_type_ids, torch.zeros_like(ids)], 1), use_cache=False,
        ).logits[:, -1]  # (N, V)
        scores = policy_scores(logits, 0.0, adapter.suppressed)
        logp = torch.log_softmax(scores, -1)
        if step < min_new_tokens:
            scores[:, eos] = float("-inf")
        token = torch.where(done, adapter.pad_token_id, scores.argmax(-1))
        alive.append(~done)
        logps.append(torch.where(done, 0.0, logp.gather(-1, token[:, None]).squeeze(-1)))
        ids = torch.cat([ids, token[:, None]], 1)
        done = done | torch.isin(token, eos)
        if done.all():
            break
    return ids, torch.stack(logps, 1), torch.stack(alive, 1).long()


@pytest.mark.parametrize("boosted", FAMILIES, indirect=True)
def test_greedy_equals_a_loop_without_cache(boosted):
    adapter, hook = boosted
    hook.boost = GREEDY_BOOST
    batch, rollout = sample(adapter, ALWAYS, group_size=1, max_new_tokens=10, temperature=0.0)
    ids, logps, mask = reference_greedy(adapter, batch, 10)
    assert len(set(mask.sum(1).tolist())) >= 2  # rows end at different steps
    assert torch.equal(rollout.completion_ids, ids)
    assert torch.equal(rollout.completion_mask, mask)
    assert (rollout.logprobs - logps).abs().max() < TOL


@pytest.mark.parametrize("boosted", ("qwen2_vl",), indirect=True)
def test_min_and_max_new_tokens_keep_their_meaning(boosted):
    adapter, hook = boosted
    hook.boost = 1000.0  # EOS is certain wherever it is allowed
    _, r = sample(adapter, ALWAYS, min_new_tokens=4)
    assert (r.completion_mask.sum(1) == 5).all() and not r.truncated.any()
    assert r.completion_mask.shape[1] == 5  # the loop stops once every row has ended
    hook.boost = -1000.0  # EOS never sampled: every completion runs to max_new_tokens
    _, r = sample(adapter, ALWAYS, max_new_tokens=7)
    assert r.completion_mask.shape == (12, 7) and r.completion_mask.all() and r.truncated.all()


def test_the_sampler_by_hand():
    """Inverse transform: cumulative [0, .5, .5, .75, 1, 1] (exact in binary); the first token
    whose cumulative value exceeds u times the total; zero-probability tokens never."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]]).expand(6, -1)
    below_one = 1 - 2.0 ** -53  # the largest float64 below 1
    u = torch.tensor([0.0, 0.49, 0.5, 0.75, 0.999, below_one], dtype=torch.float64)
    assert hf._sample(probs, u).tolist() == [1, 1, 3, 4, 4, 4]
    assert hf._sample(probs * 8, u).tolist() == [1, 1, 3, 4, 4, 4]  # unnormalised rows alike
    # where rounding makes u * total reach the total, the last token with probability, not 5
    assert hf._sample(torch.tensor([[0.0, 0.1, 0.0]]), torch.tensor([below_one],
                                                                    dtype=torch.float64)).item() == 1


def test_the_sampler_draws_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.05, 0.25, 0.0]])
    n = 200_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(hf._sample(probs.expand(n, -1), u), minlength=6).double()
    sigma = (n * probs[0].double() * (1 - probs[0].double())).sqrt()
    assert counts[probs[0] == 0].sum() == 0
    assert ((counts - n * probs[0]).abs() <= 5 * sigma + 1e-9).all()
