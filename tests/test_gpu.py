"""CUDA checks, run on a GPU machine by bench/gpu_check.sh (`pytest -m gpu`); skipped without CUDA.

What the CPU suite cannot show: bf16 with sdpa (and flash-attn when it imports) on CUDA keeps
the forward close to fp32, the backward finite, and the training forward's log-probs equal to
the sampling log-probs. Tolerances: fp32 with TF32 off must agree like on CPU (1e-4); bf16
sampling and training run the same kernels on the same shapes, so they must agree far better
than the bf16-vs-fp32 gap, which the control measures.
"""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _image(width, height, seed):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def _samples():
    from gpg_vlm.models.batch import Sample

    return [Sample("What is this item?", [_image(56, 56, 1)]),
            Sample("Compare the two.", [_image(84, 56, 2), _image(56, 112, 3)]),
            Sample("Where is the bag?", [_image(150, 100, 4)])]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from gpg_vlm.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("gpu-tiny")
    return {f: make_tiny_model(f, "m", root / f, seed=0, init_std=0.1) for f in FAMILIES}


def _load(path, dtype, attn="sdpa"):
    from gpg_vlm.models.adapter import VLMAdapter

    return VLMAdapter.from_pretrained(path, dtype=dtype, attn_implementation=attn, device="cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _generate(adapter, batch, group_size, max_new_tokens, seed):
    from gpg_vlm.rollout import make_engine

    gen = torch.Generator(device="cuda").manual_seed(seed)
    return make_engine("hf", adapter).generate(batch, group_size, max_new_tokens=max_new_tokens,
                                               generator=gen)


def _parity(adapter, seed=0):
    batch = adapter.encode(_samples())
    rollout = _generate(adapter, batch, 4, 12, seed)
    trained = adapter.completion_logprobs(batch, rollout)  # (B, T)
    mask = rollout.completion_mask.bool()
    assert mask.sum() > 0 and torch.isfinite(trained[mask]).all()
    return (trained - rollout.logprobs)[mask].abs().max().item(), batch, rollout


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_sampling_and_training_logprobs_agree(checkpoints, family):
    gap, _, _ = _parity(_load(checkpoints[family], "float32"))
    assert gap < 1e-4, gap


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_sdpa_logprob_parity_is_far_below_the_bf16_error(checkpoints, family):
    bf16 = _load(checkpoints[family], "bfloat16")
    gap, batch, rollout = _parity(bf16)
    # control: the same completions scored in fp32 differ by the bf16 rounding error
    fp32 = _load(checkpoints[family], "float32").completion_logprobs(batch, rollout)
    mask = rollout.completion_mask.bool()
    rounding = (fp32 - rollout.logprobs.float())[mask].abs().max().item()
    assert rounding > 1e-3, rounding  # bf16 really ran
    assert gap < rounding / 4, (gap, rounding)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_backward_is_finite_and_reaches_every_trainable_weight(checkpoints, family):
    adapter = _load(checkpoints[family], "bfloat16")
    adapter.model.train()
    batch = adapter.encode(_samples())
    rollout = _generate(adapter, batch, 2, 8, seed=1)
    lp = adapter.completion_logprobs(batch, rollout)  # (B, T), with grad
    (-(lp * rollout.completion_mask.to(lp.device)).sum()).backward()
    grads = {n: p.grad for n, p in adapter.model.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None and "visual" not in n
               and "embed_tokens" not in n]
    assert not missing[:5], missing[:5]
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
@pytest.mark.parametrize("family", FAMILIES)
def test_flash_attention_matches_sdpa(checkpoints, family):
    sdpa = _load(checkpoints[family], "bfloat16", "sdpa")
    gap, batch, rollout = _parity(sdpa)
    flash = _load(checkpoints[family], "bfloat16", "flash_attention_2")
    theirs = flash.completion_logprobs(batch, rollout)
    mask = rollout.completion_mask.bool()
    assert (theirs - rollout.logprobs)[mask].abs().max().item() < 0.1


def test_a_cpu_generator_samples_cuda_probabilities_like_on_the_cpu(checkpoints):
    """The trainer seeds a CPU generator; sampling on CUDA must accept it and draw the same."""
    from gpg_vlm.rollout.hf import _sample, _uniforms

    probs = torch.softmax(torch.randn(6, 50, generator=torch.Generator().manual_seed(0)), -1)
    on_cpu = _sample(probs, _uniforms(6, torch.Generator().manual_seed(3), "cpu"))
    on_cuda = _sample(probs.cuda(), _uniforms(6, torch.Generator().manual_seed(3), "cuda"))
    assert on_cuda.device.type == "cuda" and torch.equal(on_cuda.cpu(), on_cpu)
    adapter = _load(checkpoints["qwen2_vl"], "bfloat16")
    from gpg_vlm.rollout import make_engine

    rollout = make_engine("hf", adapter).generate(adapter.encode(_samples()), 2, max_new_tokens=4,
                                                  generator=torch.Generator().manual_seed(0))
    assert rollout.completion_mask.sum() > 0
