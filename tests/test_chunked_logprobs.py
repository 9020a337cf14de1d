"""The training forward's log-probs computed in chunks of output-layer positions.

Chunking must change nothing but memory: values and gradients equal to the one-piece path,
and no more than `chunk_tokens` positions of full-vocabulary logits at once, in the forward
and in the backward (which recomputes each chunk).
"""

import pytest
import torch

from gpg_vlm.models.forward import token_logprobs

V, H = 50, 8


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 5, H, generator=g, requires_grad=True)  # (b, T, H)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    suppressed = torch.zeros(V, dtype=torch.bool)
    suppressed[[3, 7]] = True
    ids = torch.randint(10, V, (3, 5), generator=g)  # never a suppressed id
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    return hidden, head, ids, mask, suppressed


def _run(chunk, with_entropy=False, temperature=0.7):
    hidden, head, ids, mask, suppressed = _inputs()
    out = token_logprobs(hidden, head, ids, mask, temperature, suppressed, chunk, with_entropy)
    lp, ent = out if with_entropy else (out, None)
    loss = (lp * torch.arange(15.0).view(3, 5)).sum() + (ent.sum() if ent is not None else 0)
    loss.backward()
    return lp.detach(), ent, hidden.grad, head.weight.grad


def test_one_piece_equals_the_log_softmax_by_hand():
    hidden, head, ids, mask, suppressed = _inputs()
    lp = token_logprobs(hidden, head, ids, mask, 0.7, suppressed, chunk_tokens=0)
    scores = (hidden @ head.weight.T / 0.7).masked_fill(suppressed, float("-inf"))  # (b, T, V)
    ref = torch.log_softmax(scores, -1).gather(-1, ids[..., None])[..., 0] * mask
    assert torch.allclose(lp, ref, atol=1e-6)
    assert (lp[mask == 0] == 0).all()


@pytest.mark.parametrize("chunk", [1, 2, 4, 9, 100])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunks_give_the_same_values_and_gradients(chunk, with_entropy):
    lp0, ent0, gh0, gw0 = _run(0, with_entropy)
    lp, ent, gh, gw = _run(chunk, with_entropy)
    assert torch.allclose(lp, lp0, atol=1e-6)
    assert torch.allclose(gh, gh0, atol=1e-5) and torch.allclose(gw, gw0, atol=1e-5)
    if with_entropy:
        assert torch.allclose(ent.detach(), ent0.detach(), atol=1e-6)
    # control: the comparison can fail (another temperature moves values and gradients)
    lp_t, _, gh_t, _ = _run(chunk, with_entropy, temperature=0.8)
    assert (lp_t - lp0).abs().max() > 1e-3 and (gh_t - gh0).abs().max() > 1e-3


class _Counting(torch.nn.Module):
    """An output layer that records how many positions each call projects."""

    def __init__(self, head):
        super().__init__()
        self.head, self.calls = head, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.head(x)


@pytest.mark.parametrize("chunk, calls", [(4, [4, 4, 1]), (0, [9])])
def test_at_most_chunk_positions_of_logits_exist_at_once(chunk, calls):
    hidden, head, ids, mask, suppressed = _inputs()  # 9 unmasked positions
    counting = _Counting(head)
    lp = token_logprobs(hidden, counting, ids, mask, 1.0, suppressed, chunk)
    assert counting.calls == calls  # padding positions get no logits at all
    lp.sum().backward()
    # chunked: the backward recomputes each chunk alone; one piece keeps its logits instead
    recomputed = counting.calls[len(calls):]  # in the backward's (reverse) order
    assert sorted(recomputed) == sorted(calls if chunk else [])


def test_scorer_chunks_equal_one_piece_on_a_model(adapters):
    from gpg_vlm.models.batch import Sample
    from gpg_vlm.rollout import make_engine
    import numpy as np
    from PIL import Image

    adapter = adapters("qwen2_vl")
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (56, 56, 3), dtype=np.uint8))
    batch = adapter.encode([Sample("What is this?", [img]), Sample("Just text.")])
    rollout = make_engine("hf", adapter).generate(batch, 3, max_new_tokens=6,
                                                  generator=torch.Generator().manual_seed(0))
    results = []
    for chunk in (0, 5):
        adapter.scorer.chunk_tokens = chunk
        adapter.model.zero_grad(set_to_none=True)
        lp = adapter.logprobs(batch, rollout.prompt_index, rollout.completion_ids,
                              rollout.completion_mask)
        lp.sum().backward()
        grad = adapter.model.lm_head.weight.grad.clone()
        results.append((lp.detach(), grad))
    adapter.scorer.chunk_tokens = 1024
    adapter.model.zero_grad(set_to_none=True)
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)
    assert (results[0][0] - rollout.logprobs).abs().max() < 1e-4  # still the sampled log-probs
