"""`gpg-vlm estimate`: expected peak memory per device of a training config, before renting GPUs.

The model's shape comes from its checkpoint's config.json when `model` is a local directory,
else from the published shape its name matches (gpg_vlm.real_shapes). Parameters are counted on
the meta device. What is estimated, per device, for N devices and a sharding mode:

  weights       P x dtype bytes; fsdp / zero3 keep P / N, but the rollout gathers all P
  gradients     trainable x dtype bytes (LoRA: its own weights only); / N when sharded
  optimizer     AdamW's two states in the parameter dtype (torch keeps them so); / N when sharded
  activations   what autograd keeps through the backward of one micro-batch: per token and
                layer (9h + 2kv + 4I) values (two RMSNorms' fp32 input and output, rotated q
                and k, v, the attention output and its copy, the MLP's gate, SiLU, up and
                product; sdpa keeps no L x L matrix: measured, 115 KiB per token at 2B widths
                against 9h + 2kv + 4I = 98 KiB). With gradient checkpointing only each layer's
                input (h) is kept. The micro-batch: with checkpointing every completion runs
                prompt + completion (b x (L + T) tokens), without it the prompt runs once
  layer backward  one layer's backward: its recomputed activations (with checkpointing) plus the
                MLP's three (tokens, I) gradients (measured: 152 KiB per token, formula 150)
  log-prob      the output layer's logits in fp32, three copies alive in a chunk's backward
                (log-softmax saved, the gather's gradient, log-softmax's gradient; measured 11.9
                bytes per position and vocabulary row), for `logprob_chunk_tokens` positions at a
                time (the trainer's LOGPROB_CHUNK_TOKENS; all positions of a micro-batch when 0)
  rollout KV    2 x layers x kv_heads x head_dim x (L + T) x (prompts per device x G) x 2 bytes
  rollout logits  the (B, V) fp32 scores of one decoding step, four copies
  vision transient  the frozen vision tower's largest block in its no-grad forward over the
                prompts' patches (measured 47 KiB per patch at Qwen2-VL's widths, formula 46)
  runtime       a constant: 0.55 GB for a CPU process with the trainer and a real 151k-entry
                tokenizer built (measured 0.53 GiB); 1 GB for a CUDA context

Peak = max(rollout phase, training phase). Training = weights, gradients, optimizer, kept
activations, and both the layer backward and the log-prob chunk: they run one after the other,
but allocators keep freed blocks for reuse rather than returning them (glibc keeps heap blocks
below its 32 MB mmap threshold: the 1M-pixel sweep point peaked at 3,184 MB as run, 2,385 MB
with MALLOC_MMAP_THRESHOLD_=4194304; PyTorch's CUDA caching allocator keeps its blocks), so an
estimate for renting memory does not count on one reusing the other's. Rollout = all weights,
the KV cache and the larger of its logits and the vision transient. Left out: the reference
model of GRPO with KL (add one more weights term). The sweep's rollout peaks were measured
while the sampling loop still grew its KV cache by concatenation, which on CPU also grew glibc's
heap (bench/README.md); the loop now writes into a cache reserved once, whose size is the
rollout KV term above.
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
CPU_RUNTIME_GB = 0.55  # a CPU process after importing torch, transformers and the trainer, and
# building its Trainer (the real 151k-entry tokenizer and processor): measured 0.53 GiB RSS
GPU_RUNTIME_GB = 1.0  # a CUDA context and its kernels
LOGPROB_COPIES = 3  # fp32 (n, V) tensors alive at once in a chunk's backward (see module doc)
ROLLOUT_LOGIT_COPIES = 4  # fp32 (B, V) per decode step: scores, log-softmax, filtered, probs


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
    vision_hidden: int = 0
    vision_intermediate: int = 0


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
    image_patches: int = 0  # per prompt, all its images (before the merge)


def shape_of(model: str, text_layers: int | None = None, vision_layers: int | None = None) -> Shape:
    """The shape of a local checkpoint directory, or of the published model `model` names
    (with `text_layers` / `vision_layers` for a reduced-depth build of it)."""
    import dataclasses

    from gpg_vlm import real_shapes

    path = Path(model)
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        family = config.model_type
    else:
        shape = _published(model)
        shape = dataclasses.replace(
            shape, text=dict(shape.text, num_hidden_layers=text_layers or shape.text["num_hidden_layers"]),
            vision=dict(shape.vision, depth=vision_layers or shape.vision["depth"]))
        config = real_shapes.build_config(shape, real_shapes._QWEN_SPECIAL_IDS | {"pad_token_id": 0})
        family = shape.family
    counts = real_shapes.count_parameters(config, family)
    text, vision = config.get_text_config(), config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vision_hidden = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL: embed_dim
    vision_mlp = getattr(vision, "intermediate_size", None) or vision_hidden * vision.mlp_ratio
    return Shape(parameters=counts["parameters"], vision_parameters=counts["vision_parameters"],
                 layers=text.num_hidden_layers, hidden=text.hidden_size,
                 intermediate=text.intermediate_size,
                 kv_width=text.num_key_value_heads * head_dim, vocab=text.vocab_size,
                 patch=vision.patch_size * vision.spatial_merge_size,
                 vision_hidden=vision_hidden, vision_intermediate=vision_mlp)


def _published(model: str):
    from gpg_vlm import real_shapes

    def key(name: str) -> str:
        return name.lower().replace("qwen2.5", "qwen2_5").replace("qwen3.5", "qwen3_5").removesuffix("-instruct")

    name = key(Path(model).name)
    match = [s for s in real_shapes.SHAPES.values() if name.startswith(key(s.checkpoint.split("/")[1]))]
    if not match:
        raise ValueError(f"model {model!r}: not a checkpoint directory and not a known "
                         f"published model ({', '.join(s.checkpoint for s in real_shapes.SHAPES.values())})")
    return match[0]


def lora_parameters(s: Shape, r: int) -> int:
    """LoRA r on q, k, v, o of every text layer: r x (in + out) each."""
    h, kv = s.hidden, s.kv_width
    return s.layers * r * ((h + h) + (h + kv) + (h + kv) + (h + h))


def _training_terms(s: Shape, w: Workload, b: int) -> dict:
    """Bytes of one training micro-batch: what autograd keeps through the backward, one layer's
    backward, and the log-prob chunk's backward (the last two run one after the other)."""
    L, T, G = w.prompt_tokens, w.completion_tokens, w.group_size
    row = L + T
    per_mb = max(1, min(G * w.prompts, w.micro_batch_tokens // row))
    # per token and layer: two RMSNorms (their fp32 input and bf16 output: 3h values each),
    # rotated q and k, v, the attention output and its copy into o_proj (3h + 2kv), the MLP's
    # gate, SiLU, up and product (4I); the backward adds the MLP's three (tokens, I) gradients
    saved = 9 * s.hidden + 2 * s.kv_width + 4 * s.intermediate
    backward = 3 * s.intermediate
    if w.gradient_checkpointing:
        tokens = per_mb * row  # every row runs prompt + completion
        kept = s.layers * tokens * s.hidden * b  # each layer's input
        layer = tokens * (saved + backward) * b  # one layer recomputed, then its backward
    else:
        tokens = L * math.ceil(per_mb / G) + per_mb * T  # each prompt once
        kept = s.layers * tokens * saved * b
        layer = tokens * backward * b
    positions = per_mb * T
    if w.logprob_chunk_tokens:
        positions = min(positions, w.logprob_chunk_tokens)
    return {"activations": kept, "layer_backward": layer,
            "logprob_chunk": LOGPROB_COPIES * positions * s.vocab * 4,
            "micro_batch_completions": per_mb}


def _vision_transient(s: Shape, w: Workload, b: int) -> float:
    """The frozen vision tower's largest live set, one block of its no-grad forward over the
    prompts' patches: input, residual, packed q/k/v and output (6 x width), the MLP's two
    (patches, intermediate) tensors, q and k rotated in fp32; sdpa keeps no patch x patch matrix."""
    patches = w.image_patches * w.prompts
    return patches * ((6 * s.vision_hidden + 2 * s.vision_intermediate) * b + 2 * s.vision_hidden * 4)


def estimate(s: Shape, w: Workload, gpus: int = 1, sharding: str = "ddp",
             runtime_gb: float = CPU_RUNTIME_GB) -> dict:
    """Bytes per device of each term, and the peak, in GB."""
    b = BYTES[w.dtype]
    shard = gpus if sharding in ("fsdp", "zero3") else 1
    trainable = (w.trainable_parameters if w.trainable_parameters is not None
                 else lora_parameters(s, w.lora_r) if w.lora_r else s.parameters)
    weights_full = s.parameters * b
    weights = weights_full / shard
    grads = trainable * b / shard
    optimizer = 2 * trainable * b / shard
    train = _training_terms(s, w, b)
    rows = w.prompts * w.group_size
    kv = 2 * s.layers * s.kv_width * (w.prompt_tokens + w.completion_tokens) * rows * 2
    rollout_logits = ROLLOUT_LOGIT_COPIES * rows * s.vocab * 4
    vision = _vision_transient(s, w, b)
    runtime = runtime_gb * GB
    rollout_peak = weights_full + optimizer + kv + max(rollout_logits, vision) + runtime
    # the layer's backward and the log-prob chunk's run one after the other, but the allocator
    # keeps freed blocks (see the module doc): both are counted
    train_peak = (weights + grads + optimizer + train["activations"] + train["layer_backward"]
                  + train["logprob_chunk"] + runtime)
    terms = dict(weights=weights, weights_gathered_for_rollout=weights_full, gradients=grads,
                 optimizer=optimizer, activations=train["activations"],
                 layer_backward=train["layer_backward"],
                 logprob_chunk=train["logprob_chunk"], rollout_kv_cache=kv,
                 rollout_logits=rollout_logits, vision_transient=vision, runtime=runtime)
    return {**{k: v / GB for k, v in terms.items()},
            "micro_batch_completions": train["micro_batch_completions"],
            "trainable_parameters": trainable, "rollout_peak": rollout_peak / GB,
            "train_peak": train_peak / GB, "peak": max(rollout_peak, train_peak) / GB}


def workload_of(cfg, gpus: int, images: int = 1) -> Workload:
    """The Workload of a TrainConfig on `gpus` devices (prompts split evenly), images at
    max_pixels, log-probs in the trainer's chunks."""
    from gpg_vlm.models.forward import LOGPROB_CHUNK_TOKENS

    pixels = cfg.max_pixels or 16384 * 28 * 28
    return Workload(dtype=cfg.dtype, lora_r=cfg.lora_r,
                    gradient_checkpointing=cfg.gradient_checkpointing,
                    group_size=cfg.group_size, prompts=max(1, cfg.prompts_per_step // gpus),
                    prompt_tokens=TEXT_TOKENS + images * pixels // (28 * 28),
                    completion_tokens=cfg.max_new_tokens,
                    micro_batch_tokens=cfg.micro_batch_tokens,
                    logprob_chunk_tokens=LOGPROB_CHUNK_TOKENS,
                    image_patches=images * pixels // (14 * 14))


def measured_workload(record: dict) -> Workload:
    """The Workload of one measured step (a record of bench/scale.py's `step_once`, as
    bench/scale.json and bench/sweep.json hold them): one CPU process, its settings' dtype,
    LoRA and checkpointing, its counted prompt tokens and image patches."""
    from gpg_vlm.models.forward import LOGPROB_CHUNK_TOKENS

    s = record["settings"]
    return Workload(dtype=s["dtype"], lora_r=s["lora_r"],
                    gradient_checkpointing=s["gradient_checkpointing"],
                    group_size=s["group_size"], prompts=s["prompts"],
                    prompt_tokens=record["prompt_tokens"] // s["prompts"],
                    completion_tokens=s["completion_tokens"],
                    logprob_chunk_tokens=LOGPROB_CHUNK_TOKENS,
                    trainable_parameters=record["trainable_parameters"],
                    image_patches=record["image_patches"] // s["prompts"])


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
    result = estimate(shape, w, args.gpus, args.sharding, runtime_gb=GPU_RUNTIME_GB)
    if args.json:
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
        print(json.dumps({"config": args.config, "gpus": args.gpus, "sharding": args.sharding,
                          "workload": w.__dict__, **rounded}, indent=1))
        return 0
    print(f"{args.config}: {shape.parameters / 1e9:.2f}B parameters, {args.gpus} device(s), "
          f"{args.sharding}; per device, GB:")
    for key in ("weights", "weights_gathered_for_rollout", "gradients", "optimizer",
                "activations", "layer_backward", "logprob_chunk", "rollout_kv_cache", "rollout_logits",
                "vision_transient", "runtime"):
        print(f"  {key:<30} {result[key]:>8.2f}")
    print(f"  {'rollout phase':<30} {result['rollout_peak']:>8.2f}")
    print(f"  {'training phase':<30} {result['train_peak']:>8.2f}")
    print(f"  {'peak':<30} {result['peak']:>8.2f}")
    return 0
