"""`full_weights` / `checkpoint_weights`: what the vLLM engine is given, checked without vLLM.

The engine loads checkpoint-named full tensors: a LoRA policy must arrive merged (base weight
plus the adapter's delta, under the base name, no lora_* entries), a plain policy unchanged,
a tied output layer under both of its names, and qwen3_vl_moe's fused experts in the released
checkpoints' layout - the one transformers converts from when it loads them.
"""

import torch

from gpg_vlm.models.adapter import VLMAdapter
from gpg_vlm.rollout.vllm import full_weights
from gpg_vlm.rollout.vllm_weights import checkpoint_weights


def test_plain_policy_weights_are_its_state_dict(tiny_dirs):
    model = VLMAdapter.from_pretrained(tiny_dirs("qwen2_vl"), device="cpu").model
    weights = dict(full_weights(model))
    state = model.state_dict()
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)
    assert "lm_head.weight" in weights  # tied: the output layer is sent under its own name too


def test_lora_policy_arrives_merged(tiny_dirs):
    from peft import LoraConfig, inject_adapter_in_model

    base = VLMAdapter.from_pretrained(tiny_dirs("qwen2_5_vl"), device="cpu").model
    names = set(base.state_dict())
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero; give the adapters a real delta
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    weights = dict(full_weights(base))
    assert set(weights) == names  # base names only, no lora_* or base_layer entries
    layer = base.model.language_model.layers[0].self_attn.q_proj  # a LoRA-wrapped linear
    x = torch.randn(3, layer.in_features, generator=gen)
    merged = torch.nn.functional.linear(x, weights["model.language_model.layers.0.self_attn.q_proj.weight"],
                                        weights["model.language_model.layers.0.self_attn.q_proj.bias"])
    with torch.no_grad():
        assert torch.allclose(merged, layer(x), atol=1e-5)
        # control: the base weight alone (the delta left out) gives another output
        assert (torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
                - layer(x)).abs().max() > 1e-2


def test_the_gpu_vllm_config_loads_with_its_engine_settings():
    from pathlib import Path

    from gpg_vlm.config import TrainConfig

    cfg = TrainConfig.from_yaml(str(Path(__file__).parent.parent / "configs/gpu/qwen25vl3b_geoqa_vllm.yaml"))
    assert (cfg.rollout, cfg.dtype, cfg.vllm_sleep) == ("vllm", "bfloat16", True)
    assert (cfg.vllm_gpu_memory_utilization, cfg.vllm_tensor_parallel_size, cfg.vllm_max_model_len) == (0.3, 1, 2048)


def test_qwen3_vl_moe_experts_are_handed_over_in_the_released_layout(tmp_path):
    """Released qwen3_vl_moe checkpoints hold gate_up_proj as (E, H, 2I) and down_proj as
    (E, I, H), transposed against transformers' (E, 2I, H) and (E, H, I) (its conversion mapping
    transposes them on load); vLLM reads the released layout. Size m: no square expert matrix,
    so each layout has its own shape (the exact parity is in tests/test_vllm_families.py)."""
    from gpg_vlm.tiny import make_tiny_model

    model = VLMAdapter.from_pretrained(make_tiny_model("qwen3_vl_moe", "m", tmp_path / "m"),
                                       device="cpu").model
    text = model.config.text_config
    e, h, i = text.num_experts, text.hidden_size, text.moe_intermediate_size
    state, given = model.state_dict(), dict(checkpoint_weights(model))
    assert given.keys() == state.keys()
    experts = [k for k in state if ".mlp.experts." in k]
    assert len(experts) == 2 * text.num_hidden_layers
    for name in experts:
        released = (e, h, 2 * i) if name.endswith("gate_up_proj") else (e, i, h)
        assert given[name].shape == released and torch.equal(given[name], state[name].transpose(1, 2))
    assert all(torch.equal(given[k], state[k]) for k in state if k not in experts)


def test_other_families_are_handed_over_as_held(tiny_dirs):
    """Only qwen3_vl_moe's experts are converted: vLLM reads qwen3_5_moe's fused experts as
    transformers holds them (checked in the engine, tests/test_vllm_families.py)."""
    model = VLMAdapter.from_pretrained(tiny_dirs("qwen3_5_moe"), device="cpu").model
    held = dict(full_weights(model))
    given = dict(checkpoint_weights(model))
    assert given.keys() == held.keys() and all(torch.equal(given[k], held[k]) for k in held)
