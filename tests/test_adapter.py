"""The VLM adapter against the facts that bite, for every family, fp32 on CPU.

Tolerances: equal computations agree to ~5e-6 here; the tests allow 1e-4. The negative
controls show that a real mistake (another image, scrambled patches, missing
mm_token_type_ids) moves the log-probs by far more than that.
"""

import pytest
import torch

from gpg_vlm.models.adapter import AdapterError, VLMAdapter
from gpg_vlm.models.batch import PromptBatch, Rollout, Sample, micro_batches
from gpg_vlm.models.family import FAMILIES
from gpg_vlm.models.forward import _activation_checkpointing, policy_scores
from gpg_vlm.rollout import make_engine
from gpg_vlm.rollout.hf import _filter_top_k_top_p
from helpers import TOL, mixed_samples, noise_image

def generate(adapter, batch, group_size, **options) -> Rollout:
    """Completions sampled by the hf rollout engine, which shares the adapter's model."""
    return make_engine("hf", adapter).generate(batch, group_size, **options)


def sub_rollout(rollout: Rollout, prompt: int) -> Rollout:
    """The completions of one prompt, re-indexed as prompt 0 of a one-prompt batch."""
    rows = rollout.prompt_index == prompt
    n = int(rows.sum())
    return Rollout(torch.zeros(n, dtype=torch.long), rollout.completion_ids[rows],
                   rollout.completion_mask[rows], rollout.logprobs[rows], [], rollout.truncated[rows])


@pytest.fixture(params=tuple(FAMILIES))
def adapter(request, adapters):
    return adapters(request.param)


def test_training_logprobs_equal_sampling_logprobs(adapter):
    batch = adapter.encode(mixed_samples())
    gen = torch.Generator().manual_seed(0)
    rollout = generate(adapter, batch, group_size=3, max_new_tokens=10, generator=gen)
    assert rollout.completion_ids.shape[0] == 12
    assert rollout.completion_mask.sum() > 0
    trained = adapter.completion_logprobs(batch, rollout)
    assert torch.isfinite(trained).all()
    assert (trained - rollout.logprobs).abs().max() < TOL


def test_entropies_are_those_of_the_masked_tempered_logits(adapter):
    batch = adapter.encode(mixed_samples())
    rollout = generate(adapter, batch, group_size=2, max_new_tokens=6,
                               generator=torch.Generator().manual_seed(3))
    rows = torch.arange(rollout.completion_ids.shape[0])
    seen = []
    hook = adapter.model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        logp, entropy = adapter.logprobs(batch, rollout.prompt_index, rollout.completion_ids,
                                         rollout.completion_mask, 1.5, with_entropy=True)
    finally:
        hook.remove()
    # the output layer sees the unmasked positions only, in row-major order: (n, V)
    logits = (seen[-1].float() / 1.5).masked_fill(adapter.scorer.suppressed, float("-inf"))
    expected = torch.distributions.Categorical(logits=logits).entropy()  # (n,)
    keep = rollout.completion_mask.bool()
    assert (entropy[keep] - expected).abs().max() < TOL
    assert (entropy[~keep] == 0).all() and torch.isfinite(entropy).all()
    plain = adapter.logprobs(batch, rollout.prompt_index, rollout.completion_ids,
                             rollout.completion_mask, 1.5)
    assert torch.equal(plain, logp)
    entropy.sum().backward()  # the bonus trains the model
    grads = [p.grad for p in adapter.model.parameters() if p.grad is not None]
    adapter.model.zero_grad(set_to_none=True)
    assert grads and all(torch.isfinite(g).all() for g in grads)  # no 0 * -inf at masked ids
    assert any(g.abs().sum() > 0 for g in grads)


def test_mixed_batch_equals_each_prompt_alone(adapter):
    samples = mixed_samples()
    batch = adapter.encode(samples)
    rollout = generate(adapter, batch, group_size=2, max_new_tokens=8,
                               generator=torch.Generator().manual_seed(1))
    together = adapter.completion_logprobs(batch, rollout)
    for i, sample in enumerate(samples):
        alone_batch = adapter.encode([sample])
        alone = adapter.completion_logprobs(alone_batch, sub_rollout(rollout, i))
        assert (alone - together[rollout.prompt_index == i]).abs().max() < TOL


def test_logprobs_depend_on_the_image(adapter):
    """Negative control: the same completions scored against another image differ clearly."""
    a = adapter.encode([Sample("What is this item?", [noise_image(56, 56, 10)])])
    b = adapter.encode([Sample("What is this item?", [noise_image(56, 56, 11)])])
    rollout = generate(adapter, a, group_size=2, max_new_tokens=6,
                               generator=torch.Generator().manual_seed(2))
    diff = (adapter.completion_logprobs(a, rollout) - adapter.completion_logprobs(b, rollout)).abs()
    assert diff.max() > 100 * TOL


def test_mm_token_type_ids_matter(adapter):
    """Negative control: without mm_token_type_ids the positions (and log-probs) change."""
    batch = adapter.encode([Sample("Where is it?", [noise_image(84, 84, 5)])])
    rollout = generate(adapter, batch, group_size=2, max_new_tokens=6,
                               generator=torch.Generator().manual_seed(3))
    good = adapter.completion_logprobs(batch, rollout)
    batch.mm_token_type_ids.zero_()
    bad = adapter.completion_logprobs(batch, rollout)
    assert (good - bad).abs().max() > 100 * TOL


def test_micro_batch_size_does_not_change_logprobs(adapter):
    batch = adapter.encode(mixed_samples())
    rollout = generate(adapter, batch, group_size=3, max_new_tokens=8,
                               generator=torch.Generator().manual_seed(4))
    whole = adapter.completion_logprobs(batch, rollout, max_tokens=10**6)
    small = adapter.completion_logprobs(batch, rollout, max_tokens=1)  # one row per micro-batch
    assert (whole - small).abs().max() < TOL
    assert len(micro_batches(batch, rollout.prompt_index, rollout.completion_mask, 1)) == 12


def test_vision_tokens_are_never_sampled_and_masked_alike(adapters):
    adapter = adapters("qwen2_vl")
    ids = [adapter.tokenizer.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")]

    def push_vision_tokens(module, inputs, output):  # make vision tokens overwhelmingly likely
        output = output.clone()
        output[..., ids] += 1000.0
        return output

    handle = adapter.model.lm_head.register_forward_hook(push_vision_tokens)
    try:
        batch = adapter.encode(mixed_samples()[:2])
        rollout = generate(adapter, batch, group_size=4, max_new_tokens=8,
                                   generator=torch.Generator().manual_seed(5))
        sampled = rollout.completion_ids[rollout.completion_mask.bool()]
        assert not torch.isin(sampled, torch.tensor(ids)).any()
        trained = adapter.completion_logprobs(batch, rollout)
        assert torch.isfinite(trained).all()
        assert (trained - rollout.logprobs).abs().max() < TOL
    finally:
        handle.remove()


def test_qwen2_5_rope_positions_match_the_unpadded_single_sequence(adapters):
    """Positions of a left-padded row equal those the model computes for the sequence alone."""
    adapter = adapters("qwen2_5_vl")
    samples = mixed_samples()
    batch = adapter.encode(samples)
    pos = adapter.positions(batch.input_ids, batch.attention_mask, batch.mm_token_type_ids,
                             batch.image_grid_thw)  # (3, N, L)
    for i, sample in enumerate(samples):
        alone = adapter.encode([sample])
        keep = batch.attention_mask[i].bool()
        grid = alone.image_grid_thw
        if grid is not None:  # the model's own rope index, no padding, no attention mask
            ref, _ = adapter.model.model.get_rope_index(
                alone.input_ids, mm_token_type_ids=alone.mm_token_type_ids, image_grid_thw=grid)
        else:
            ref = torch.arange(alone.input_ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        assert torch.equal(pos[:, i, keep], ref[:, 0])
    # and the logits of our explicit positions equal the model's internal computation
    alone = adapter.encode([samples[3]])
    with torch.no_grad():
        ours = adapter.model(input_ids=alone.input_ids, attention_mask=alone.attention_mask,
                             position_ids=adapter.positions(alone.input_ids, alone.attention_mask,
                                                             alone.mm_token_type_ids,
                                                             alone.image_grid_thw),
                             pixel_values=alone.pixel_values, image_grid_thw=alone.image_grid_thw,
                             mm_token_type_ids=alone.mm_token_type_ids).logits
        adapter.model.model.rope_deltas = None
        theirs = adapter.model(input_ids=alone.input_ids, pixel_values=alone.pixel_values,
                               image_grid_thw=alone.image_grid_thw,
                               mm_token_type_ids=alone.mm_token_type_ids).logits
    assert (ours - theirs).abs().max() < TOL


def test_select_slices_patches_per_image():
    """Patches follow their own image, whatever the image sizes around it."""
    grid = torch.tensor([[1, 2, 2], [1, 4, 2], [1, 2, 4]])  # 4, 8 and 8 patches
    patches = torch.arange(20).float().unsqueeze(-1)  # patch k holds the value k
    batch = PromptBatch(
        input_ids=torch.zeros(3, 4, dtype=torch.long), attention_mask=torch.ones(3, 4, dtype=torch.long),
        mm_token_type_ids=torch.zeros(3, 4, dtype=torch.long), pixel_values=patches,
        image_grid_thw=grid, images_per_prompt=[1, 0, 2], image_sizes=[[(1, 1)], [], [(1, 1)] * 2],
        model_image_sizes=[[(1, 1)], [], [(1, 1)] * 2])
    sub = batch.select([2, 0, 2, 1])
    expected = torch.cat([torch.arange(4, 20), torch.arange(0, 4), torch.arange(4, 20)]).float()
    assert torch.equal(sub.pixel_values.squeeze(-1), expected)
    assert sub.image_grid_thw.tolist() == [[1, 4, 2], [1, 2, 4], [1, 2, 2], [1, 4, 2], [1, 2, 4]]
    assert sub.images_per_prompt == [2, 1, 2, 0]
    # control: locating each image as if all images had the same patch count gives a tensor
    # of the right shape with the wrong pixels, so this data tells the two apart
    uniform = patches.shape[0] // grid.shape[0]  # 6 patches "per image"
    counts = grid.prod(-1).tolist()
    images = [1, 2, 0, 1, 2]  # those of prompts 2, 0, 2, 1
    naive = torch.cat([patches[j * uniform: j * uniform + counts[j]] for j in images])
    assert naive.shape == sub.pixel_values.shape
    assert not torch.equal(naive, sub.pixel_values)


def test_reports_image_sizes_and_box_format(adapters):
    # 150x100 to multiples of 28: round(150/28)=5 -> 140, round(100/28)=4 -> 112;
    # to multiples of 32 (Qwen3-VL): round(150/32)=5 -> 160, round(100/32)=3 -> 96.
    expected = {"qwen2_vl": ("rel1000", (140, 112)), "qwen2_5_vl": ("abs_resized", (140, 112)),
                "qwen3_vl": ("rel1000", (160, 96))}
    for family, (box_format, seen) in expected.items():
        adapter = adapters(family)
        batch = adapter.encode([Sample("Where?", [noise_image(150, 100, 0)])])
        assert adapter.box_format == box_format
        assert batch.image_sizes == [[(150, 100)]]
        assert batch.model_image_sizes == [[seen]]


def test_greedy_equals_top_k_one(adapters):
    adapter = adapters("qwen3_vl")
    batch = adapter.encode(mixed_samples()[:2])
    greedy = generate(adapter, batch, 1, max_new_tokens=6, temperature=0)
    top1 = generate(adapter, batch, 1, max_new_tokens=6, top_k=1,
                            generator=torch.Generator().manual_seed(9))
    assert torch.equal(greedy.completion_ids, top1.completion_ids)


def test_top_k_top_p_filter_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7, 0.8 >= 0.7)
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(_filter_top_k_top_p(scores, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_top_k_top_p(scores, 3, 1.0))
    assert kept.tolist() == [[True, True, True, False]]


def test_completion_ends_at_eos_and_mask_covers_it(adapters):
    adapter = adapters("qwen2_vl")
    eos = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def make_eos_likely(module, inputs, output):
        output = output.clone()
        output[..., eos] += 4.0
        return output

    handle = adapter.model.lm_head.register_forward_hook(make_eos_likely)
    try:
        batch = adapter.encode(mixed_samples()[:1])
        r = generate(adapter, batch, 8, max_new_tokens=12, generator=torch.Generator().manual_seed(6))
    finally:
        handle.remove()
    for ids, mask, truncated in zip(r.completion_ids, r.completion_mask, r.truncated):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # a prefix
        if not truncated:
            assert ids[n - 1] == eos and (ids[n:] == adapter.pad_token_id).all()
    assert not r.truncated.all()


def test_bad_inputs_give_clear_errors(tmp_path, adapters):
    with pytest.raises(AdapterError, match="does not exist"):
        VLMAdapter.from_pretrained(tmp_path / "missing")
    with pytest.raises(AdapterError, match="no config.json"):
        VLMAdapter.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(AdapterError, match="not a supported Qwen-VL family"):
        VLMAdapter.from_pretrained(tmp_path)
    adapter = adapters("qwen2_vl")
    with pytest.raises(AdapterError, match="sample 1: its text contains the vision token"):
        adapter.encode([Sample("fine"), Sample("sneaky <|image_pad|>")])
    with pytest.raises(AdapterError, match="group_size"):
        generate(adapter, adapter.encode([Sample("x")]), 0, max_new_tokens=4)


@pytest.mark.parametrize("family", tuple(FAMILIES))
def test_shared_prefix_equals_full_rows_in_value_and_gradient(adapters, family):
    """Prompts run once with a repeated cache == every row running its prompt in full."""
    adapter = adapters(family)
    batch = adapter.encode(mixed_samples())
    rollout = generate(adapter, batch, group_size=3, max_new_tokens=6,
                               generator=torch.Generator().manual_seed(7))
    weights = torch.randn(rollout.completion_ids.shape, generator=torch.Generator().manual_seed(8))

    def value_and_grads(full: bool):
        adapter.model.zero_grad()
        if full:
            adapter.enable_gradient_checkpointing()
        try:
            lp = adapter.logprobs(batch, rollout.prompt_index, rollout.completion_ids,
                                  rollout.completion_mask)
            (lp * weights).sum().backward()
        finally:  # the transformers >= 5.2x name where present (5.18 has only the older one)
            disable = getattr(adapter.model, "activation_checkpointing_disable", None)
            (disable or adapter.model.gradient_checkpointing_disable)()
        grads = {n: p.grad.clone() for n, p in adapter.model.named_parameters() if p.grad is not None}
        adapter.model.zero_grad()
        return lp.detach(), grads

    adapter.model.train()
    try:
        assert adapter.training_forward == "shared_prefix"
        shared, g_shared = value_and_grads(False)
        full, g_full = value_and_grads(True)
    finally:
        adapter.model.eval()
    assert (shared - full).abs().max() < TOL
    assert g_shared.keys() == g_full.keys() and len(g_shared) > 10
    for name in g_shared:
        # fp32 sums in another order: elements agree to 1e-6 of the tensor's largest gradient
        scale = float(g_full[name].abs().max())
        assert torch.allclose(g_shared[name], g_full[name], rtol=1e-3, atol=1e-5 + 1e-6 * scale), name


def test_policy_scores_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    suppressed = torch.tensor([False, True, False])
    scores = policy_scores(logits, 2.0, suppressed)
    assert scores.dtype == torch.float32
    assert scores.tolist() == [[0.5, float("-inf"), 1.5]]
    assert policy_scores(logits, 0.0, suppressed).tolist() == [[1.0, float("-inf"), 3.0]]  # greedy


@pytest.mark.parametrize("family", ("qwen2_vl", "qwen2_5_vl"))  # towers with an input embedding
def test_checkpointing_leaves_a_frozen_vision_tower_out_of_autograd(tiny_dirs, family):
    """transformers hooks the tower's patch embedding so its output requires grad; with the
    tower frozen that records (and back-propagates through) every vision block for nothing.
    The text embedding keeps its hook; a trainable tower still gets gradients (the shared-prefix
    test above compares them)."""
    adapter = VLMAdapter.from_pretrained(tiny_dirs(family), device="cpu")
    adapter.freeze_vision()
    batch = adapter.encode(mixed_samples()[:1])
    model = adapter.model

    def image_features_require_grad() -> bool:
        out = model.model.get_image_features(batch.pixel_values, batch.image_grid_thw,
                                             return_dict=True)
        return any(f.requires_grad for f in out.pooler_output)

    model.train()
    try:
        # the negative control: transformers' own switch makes the frozen tower's output require grad
        FAMILIES[family].enable_checkpointing(model)
        assert image_features_require_grad()
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()
        model.disable_input_require_grads()
        adapter.enable_gradient_checkpointing()
        assert not image_features_require_grad()
        embeds = model.get_input_embeddings()(batch.input_ids[:, :4])
        assert embeds.requires_grad  # the text embedding's hook is kept
    finally:
        model.eval()


def test_the_trainer_reaches_the_model_only_through_the_adapter(tiny_dirs):
    """freeze_vision, enable_gradient_checkpointing and set_scorer, on a fresh (unshared) model."""
    adapter = VLMAdapter.from_pretrained(tiny_dirs("qwen2_vl"), device="cpu")
    vision = {id(p) for p in FAMILIES["qwen2_vl"].vision_module(adapter.model).parameters()}
    adapter.freeze_vision()
    frozen = {id(p) for p in adapter.model.parameters() if not p.requires_grad}
    assert frozen == vision and len(vision) > 0
    assert not _activation_checkpointing(adapter.model)
    adapter.enable_gradient_checkpointing()
    assert _activation_checkpointing(adapter.model) and adapter.model.config.use_cache

    calls = []

    class Counting(torch.nn.Module):  # stands in for a data-parallel wrapper of the scorer
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            calls.append(len(args))
            return self.inner(*args)

    adapter.set_scorer(Counting(adapter.scorer))
    batch = adapter.encode([Sample("What is this item?", [noise_image(56, 56, 1)])])
    rollout = generate(adapter, batch, 2, max_new_tokens=3, generator=torch.Generator().manual_seed(0))
    adapter.completion_logprobs(batch, rollout)
    assert calls  # the training forward went through the wrapper
    # a checkpoint whose vision config disagrees with its family's facts is refused
    adapter.model.config.vision_config.patch_size = 16
    with pytest.raises(AdapterError, match="patch_size 16, spatial_merge_size 2; a qwen2_vl "
                                           "checkpoint has 14, 2"):
        VLMAdapter(adapter.model, adapter.tokenizer, adapter.image_processor,
                   adapter.chat_template, "qwen2_vl")


def test_make_engine_names_what_it_accepts(adapters):
    adapter = adapters("qwen2_vl")
    with pytest.raises(ValueError, match="unknown rollout engine 'vllm2'; valid: hf, vllm"):
        make_engine("vllm2", adapter)
    with pytest.raises(ValueError, match="takes no options, got gpu_memory"):
        make_engine("hf", adapter, gpu_memory=0.5)
    engine = make_engine("hf", adapter)
    engine.sync_weights(adapter.model)  # shares the model: nothing to load
    engine.close()
