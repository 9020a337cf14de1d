"""The policy's weights as the vLLM engine loads them: full tensors in the checkpoint layout.

`checkpoint_weights(model)` yields what a new engine starts from and what `VLLMRollout.sync_weights`
hands to vLLM's `reload_weights(is_checkpoint_format=True)`: the policy's state dict with LoRA merged and FSDP2
shards gathered (`full_weights`), then, per family, each tensor that transformers holds in
another layout than the released checkpoints put back into theirs (`CHECKPOINT_LAYOUT`).
vLLM's loaders read the released checkpoints' layout only; a tensor of equal shape in the
other layout would load without an error and compute something else.

`POLICY_LOAD_FORMAT` is a vLLM load format (registered by `starting_from`) that fills a new
engine with the policy's weights instead of reading the model directory's weight files: their
layout need not be vLLM's (a qwen3_vl_moe checkpoint saved by transformers 5.19 keeps the
transposed experts and fails to load), and the engine needs the policy's current weights anyway
(resume, LoRA). vLLM's own check that every parameter was given stays in force.

`repack_cpu_moe(worker)` runs inside vLLM's worker after each reload: vLLM 0.32's CPU fused-MoE
kernel reads its expert weights in a packed layout that it builds once, at the first load
(`CPUUnquantizedExperts.process_weights_after_loading`); its reload path skips that step on a
weight update (`UnquantizedFusedMoEMethod._setup_kernel` calls it only while `moe_kernel` is
None), so reloaded experts sit unpacked under a kernel that reads them packed. Measured on tiny
qwen3_5_moe: the routed experts' output then differs from transformers' by 1.7 on a scale of
1.0, and sampled log-probs by 2.0-2.2 nats; repacked, the MoE block matches within bf16
rounding. The GPU kernels have no such packed copy.

Deliberately left out: vLLM's kernel-format reload (`is_checkpoint_format=False`), which would
tie this module to each backend's private layouts, and quantized CPU experts (the engine serves
the policy's own bf16 / fp32 weights).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# For each family, the tensors whose layout in transformers 5 differs from the released
# checkpoints' (which vLLM reads), as (name suffix, conversion from transformers to checkpoint).
# - qwen3_vl_moe: transformers holds the fused experts as gate_up_proj (E, 2I, H) and down_proj
#   (E, H, I), the layout its forward multiplies with; the released checkpoints store them
#   transposed, (E, H, 2I) and (E, I, H): transformers' own conversion mapping transposes dims 1
#   and 2 when it loads them (conversion_mapping.py, "qwen3_vl_moe": Transpose(1, 2)), and vLLM's
#   loader transposes them back (`is_fused_checkpoint_transposed=True`). transformers 5.19 saves
#   its own layout, so its saved checkpoints are not the released layout either (vLLM refuses
#   them at load with a shape error; the engine therefore starts without reading them).
#   transformers' own Transpose checks dims, so it reads either layout where the shapes tell
#   them apart and keeps a square matrix as it is; vLLM always transposes, so a square
#   down_proj (H == I) in the wrong layout loads silently wrong (the test's control).
# - qwen3_5_moe: none. Its released checkpoints hold one tensor per expert, transformers fuses
#   them to gate_up_proj (E, 2I, H) = [gate; up] and down_proj (E, H, I), and vLLM's fused-MoE
#   loader takes a fused tensor in exactly that layout (`is_fused_checkpoint_transposed=False`,
#   gate first): checked by equality of vLLM's loaded parameter with transformers' tensor.
CHECKPOINT_LAYOUT = {
    "qwen3_vl_moe": (
        (".mlp.experts.gate_up_proj", lambda t: t.transpose(1, 2)),  # (E, 2I, H) -> (E, H, 2I)
        (".mlp.experts.down_proj", lambda t: t.transpose(1, 2)),  # (E, H, I) -> (E, I, H)
    ),
}


def checkpoint_weights(model):
    """(name, tensor) for every weight of `model` as vLLM's loader reads them: `full_weights`
    with the family's CHECKPOINT_LAYOUT conversions applied."""
    conversions = CHECKPOINT_LAYOUT.get(getattr(model.config, "model_type", ""), ())
    for name, tensor in full_weights(model):
        for suffix, convert in conversions:
            if name.endswith(suffix):
                tensor = convert(tensor).contiguous()
                break
        yield name, tensor


def full_weights(model):
    """(name, tensor) for every weight of `model` under its checkpoint names, as full tensors.

    LoRA layers injected by peft (`<module>.base_layer.weight` + `lora_A` / `lora_B`) are
    merged: the base weight plus each active adapter's delta, under `<module>.weight`. Sharded
    tensors (FSDP2 DTensors) are gathered. Tied weights appear under both names, so an engine
    that keeps its output layer apart from the embedding (vLLM's CPU build repacks it) gets both.
    """
    lora = {name: m for name, m in model.named_modules()
            if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if ".lora_" in name:
            continue
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        if ".base_layer." in name:
            module_name, _, leaf = name.partition(".base_layer.")
            module = lora[module_name]
            if leaf == "weight":
                for adapter_name in module.active_adapters:
                    if adapter_name in module.lora_A:
                        tensor = tensor + module.get_delta_weight(adapter_name).to(tensor.dtype)
            name = f"{module_name}.{leaf}"
        yield name, tensor.detach()


@torch.no_grad()
def repack_cpu_moe(worker) -> int:
    """Pack every CPU fused-MoE layer's reloaded expert weights as its kernel reads them.

    Run in vLLM's worker (`collective_rpc`) right after `reload_weights`, when the weights are
    in the loader's layout; returns the number of layers repacked (0 without CPU MoE layers)."""
    try:
        from vllm.model_executor.layers.fused_moe.experts import cpu_moe
    except ImportError:  # a vLLM without the CPU MoE kernel has nothing to repack
        return 0
    model = worker.model_runner.get_model()
    count = 0
    for name, module in model.named_modules():
        experts = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None),
                          "fused_experts", None)
        if experts is None or type(experts).__module__ != cpu_moe.__name__:
            continue
        if getattr(experts, "_use_zentorch", False):  # zentorch reads the unpacked weights
            continue
        if not isinstance(experts, cpu_moe.CPUUnquantizedExperts):
            raise RuntimeError(f"{name}: CPU MoE experts {type(experts).__name__} are not "
                               "repacked after a weight reload (only the unquantized kernel is)")
        for weight in (module.w13_weight, module.w2_weight):
            weight.data.copy_(cpu_moe.cpu_prepack_moe_weight(weight.data, experts.isa))
        count += 1
    return count


POLICY_LOAD_FORMAT = "gpg_vlm_policy"
_START_WEIGHTS: list | None = None  # what the engine being started in this process loads
_registered = False


@contextmanager
def starting_from(weights: list):
    """Around `vllm.LLM(load_format=POLICY_LOAD_FORMAT)`: the engine loads `weights` at start."""
    global _START_WEIGHTS
    _register_policy_loader()
    _START_WEIGHTS = weights
    try:
        yield
    finally:
        _START_WEIGHTS = None


def _register_policy_loader() -> None:
    global _registered
    if _registered:  # once per process (vLLM warns on a second registration)
        return
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    @register_model_loader(POLICY_LOAD_FORMAT)
    class PolicyLoader(DefaultModelLoader):
        """vLLM's default loading (name mapping, post-processing, the every-parameter check)
        with the policy's weights as the checkpoint."""

        def download_model(self, model_config) -> None:
            pass  # nothing is read from the model directory

        def get_all_weights(self, model_config, model):
            if _START_WEIGHTS is None:
                raise RuntimeError("the policy's weights are handed over in memory, so the vLLM "
                                   "engine must run in the trainer's process "
                                   "(VLLM_ENABLE_V1_MULTIPROCESSING=0)")
            yield from _START_WEIGHTS

    _registered = True


__all__ = ["CHECKPOINT_LAYOUT", "POLICY_LOAD_FORMAT", "checkpoint_weights", "full_weights",
           "repack_cpu_moe", "starting_from"]
