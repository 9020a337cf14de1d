"""`gpg-vlm estimate`: expected peak memory per device of a training config, before renting GPUs.

The model's shape comes from its checkpoint's config.json when `model` is a local directory,
else from the published shape its name matches (gpg_vlm.real_shapes). Parameters are counted on
the meta device. What is estimated, per device, for N devices and a sharding mode:

  weights       P x dtype bytes; fsdp / zero3 keep P / N, but the rollout gathers all P
  gradients     trainable x dtype bytes (LoRA: its own weights only); / N when sharded
  optimizer     AdamW's two states in the parameter dtype (torch keeps them so); / N when sharded
  activations   what autograd keeps for one micro-batch of the training forward: per token and
                layer ~(7h + 2kv + 4I) values (norm inputs, q/k/v/out, the MLP's gate, up,
                product; sdpa and flash attention keep no L x L matrix). With gradient
                checkpointing only each layer's input (h) is kept, plus one layer recomputed.
                The micro-batch: with checkpointing every completion runs prompt + completion
                (b x (L + T) tokens), without it the prompt runs once (L + b x T)
  log-prob      the output layer's logits of the completion tokens in fp32, three copies
                (logits, log-softmax, its gradient), for `logprob_chunk_tokens` tokens at a
                time (all completion tokens of the micro-batch when 0)
  rollout KV    2 x layers x kv_heads x head_dim x (L + T) x (prompts per device x G) x 2 bytes
  runtime       a constant: the framework and its buffers (0.4 GB measured for a CPU process
                after importing the trainer; ~1 GB for a CUDA context)

Peak = max(rollout phase, training phase). Left out: the vision tower's activations (frozen in
LoRA runs; its forward runs without autograd in rollout), fragmentation, and the reference
model of GRPO with KL (add one more weights term).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TEXT_TOKENS = 100  # prompt text and chat template around the image(s), a round figure


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know about a model."""

    parameters: int
    vision_parameters: int
    layers: int
    hidden: int
    intermediate: int
    kv_width: int  # kv_heads x head_dim
    vocab: int
    patch: int  # pixels per visual token side: patch x merge


@dataclass(frozen=True)
class Workload:
    """The config values that size memory (one device's share of a step)."""

    dtype: str = "bfloat16"
    lora_r: int = 0
    gradient_checkpointing: bool = False
    group_size: int = 8
    prompts: int = 1  # per device
    prompt_tokens: int = 612  # per prompt
    completion_tokens: int = 256
    micro_batch_tokens: int = 16384
    logprob_chunk_tokens: int = 0  # 0: not chunked
    trainable_parameters: int | None = None  # measured LoRA size when known


def shape_of(model: str) -> Shape:
    """The shape of a local checkpoint directory, or of the published model `model` names."""
    from gpg_vlm import real_shapes

    path = Path(model)
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        family = config.model_type
    else:
        name = path.name.lower().replace("qwen2.5", "qwen2_5").replace("qwen3.5", "qwen3_5")
        match = [s for s in real_shapes.SHAPES.values()
                 if name.startswith(s.checkpoint.split("/")[1].lower().replace("qwen2.5", "qwen2_5")
                                    .replace("qwen3.5", "qwen3_5").removesuffix("-instruct"))]
        if not match:
            raise ValueError(f"model {model!r}: not a checkpoint directory and not a known "
                             f"published model ({', '.join(s.checkpoint for s in real_shapes.SHAPES.values())})")
        shape = match[0]
        config = real_shapes.build_config(shape, real_shapes._QWEN_SPECIAL_IDS | {"pad_token_id": 0})
        family = shape.family
    counts = real_shapes.count_parameters(config, family)
    text, vision = config.get_text_config(), config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Shape(parameters=counts["parameters"], vision_parameters=counts["vision_parameters"],
                 layers=text.num_hidden_layers, hidden=text.hidden_size,
                 intermediate=text.intermediate_size,
                 kv_width=text.num_key_value_heads * head_dim, vocab=text.vocab_size,
                 patch=vision.patch_size * vision.spatial_merge_size)


def lora_parameters(s: Shape, r: int) -> int:
    """LoRA r on q, k, v, o of every text layer: r x (in + out) each."""
    h, kv = s.hidden, s.kv_width
    return s.layers * r * ((h + h) + (h + kv) + (h + kv) + (h + h))


def estimate(s: Shape, w: Workload, gpus: int = 1, sharding: str = "ddp",
             runtime_gb: float = 0.4) -> dict:
    """Bytes per device of each term, and the peak, in GB."""
    b = BYTES[w.dtype]
    shard = gpus if sharding in ("fsdp", "zero3") else 1
    trainable = (w.trainable_parameters if w.trainable_parameters is not None
                 else lora_parameters(s, w.lora_r) if w.lora_r else s.parameters)
    weights_full = s.parameters * b
    weights = weights_full / shard
    grads = trainable * b / shard
    optimizer = 2 * trainable * b / shard
    L, T, G = w.prompt_tokens, w.completion_tokens, w.group_size
    # one micro-batch: as many completions as the token budget allows (at least one)
    row = L + T
    per_mb = max(1, min(G * w.prompts, w.micro_batch_tokens // row))
    per_layer_token = (7 * s.hidden + 2 * s.kv_width + 4 * s.intermediate) * b
    if w.gradient_checkpointing:
        tokens = per_mb * row
        activations = s.layers * tokens * s.hidden * b + tokens * per_layer_token
    else:
        tokens = L * math.ceil(per_mb / G) + per_mb * T
        activations = s.layers * tokens * per_layer_token
    logit_tokens = per_mb * T if not w.logprob_chunk_tokens else min(per_mb * T, w.logprob_chunk_tokens)
    logprob = 3 * logit_tokens * s.vocab * 4
    kv = 2 * s.layers * s.kv_width * row * w.prompts * G * 2
    runtime = runtime_gb * GB
    rollout_peak = weights_full + optimizer + kv + runtime
    train_peak = weights + grads + optimizer + activations + logprob + runtime
    terms = dict(weights=weights, weights_gathered_for_rollout=weights_full, gradients=grads,
                 optimizer=optimizer, activations=activations, logprob_chunk=logprob,
                 rollout_kv_cache=kv, runtime=runtime)
    return {**{k: v / GB for k, v in terms.items()},
            "micro_batch_completions": per_mb, "trainable_parameters": trainable,
            "rollout_peak": rollout_peak / GB, "train_peak": train_peak / GB,
            "peak": max(rollout_peak, train_peak) / GB}


def workload_of(cfg, gpus: int, images: int = 1) -> Workload:
    """The Workload of a TrainConfig on `gpus` devices (prompts split evenly)."""
    pixels = cfg.max_pixels or 16384 * 28 * 28
    return Workload(dtype=cfg.dtype, lora_r=cfg.lora_r,
                    gradient_checkpointing=cfg.gradient_checkpointing,
                    group_size=cfg.group_size, prompts=max(1, cfg.prompts_per_step // gpus),
                    prompt_tokens=TEXT_TOKENS + images * pixels // (28 * 28),
                    completion_tokens=cfg.max_new_tokens,
                    micro_batch_tokens=cfg.micro_batch_tokens,
                    logprob_chunk_tokens=getattr(cfg, "logprob_chunk_tokens", 0) or 0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpg-vlm estimate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="training YAML")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--sharding", choices=("ddp", "fsdp", "zero3"), default="ddp")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    import yaml

    from gpg_vlm.config import TrainConfig

    raw = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    raw.setdefault("data", "unused.jsonl")
    cfg = TrainConfig(**raw)
    try:
        shape = shape_of(cfg.model)
    except ValueError as exc:
        print(f"gpg-vlm estimate: {args.config}: {exc}", file=sys.stderr)
        return 2
    w = workload_of(cfg, args.gpus)
    result = estimate(shape, w, args.gpus, args.sharding, runtime_gb=1.0)
    if args.json:
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
        print(json.dumps({"config": args.config, "gpus": args.gpus, "sharding": args.sharding,
                          "workload": w.__dict__, **rounded}, indent=1))
        return 0
    print(f"{args.config}: {shape.parameters / 1e9:.2f}B parameters, {args.gpus} device(s), "
          f"{args.sharding}; per device, GB:")
    for key in ("weights", "weights_gathered_for_rollout", "gradients", "optimizer",
                "activations", "logprob_chunk", "rollout_kv_cache", "runtime"):
        print(f"  {key:<30} {result[key]:>8.2f}")
    print(f"  {'rollout phase':<30} {result['rollout_peak']:>8.2f}")
    print(f"  {'training phase':<30} {result['train_peak']:>8.2f}")
    print(f"  {'peak':<30} {result['peak']:>8.2f}")
    return 0
