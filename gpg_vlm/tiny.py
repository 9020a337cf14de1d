"""Build small, randomly initialised Qwen-VL checkpoints offline.

`make_tiny_model(family, size, out, seed)` writes a directory that looks like a real Qwen-VL
checkpoint — `config.json`, `model.safetensors`, `generation_config.json`, tokenizer files,
`preprocessor_config.json` and `chat_template.jinja` — so that `from_pretrained(DIR)` and the
adapter load it through exactly the path a downloaded checkpoint takes.

The tokenizer is a byte-level BPE trained here on a small fixed corpus (prompts, class names,
digits, box syntax, the `<think>`/`<answer>` tags) with the Qwen pre-tokenizer and the Qwen
special tokens appended after the learned vocabulary, as in the real tokenizers (ids differ:
the vocabulary is ~1k, not 151k). Any byte string still encodes, because the byte alphabet is
in the vocabulary.

The six families and what their tiny versions keep of the real ones (transformers 5.23 configs):
- qwen2_vl, qwen2_5_vl, qwen3_vl: dense decoders, full attention in every layer.
- qwen3_vl_moe: Qwen3-VL with a sparse MoE block in every decoder layer (4 experts, top 2;
  the real 30B-A3B has 128, top 8), deepstack vision features as Qwen3-VL.
- qwen3_5, qwen3_5_moe: the hybrid decoder. Gated DeltaNet linear attention with full
  (gated) attention every `full_attention_interval` layers; the real models use 4. Sizes xs
  and s have two layers, so they use `layer_types = [linear, full]` (one layer of each kind:
  the cache then holds convolution and recurrent states AND keys/values); size m has four
  layers and the real 3:1 pattern. Attention uses an explicit head_dim with partial rotary
  (factor 0.25, as the real configs) and interleaved M-RoPE; the linear-attention heads keep
  the real 1:2 ratio of key to value heads and the real convolution kernel of 4. qwen3_5_moe adds
  the routed experts and the gated shared expert of Qwen3.5-MoE. Their tokenizer is the
  Qwen3.5 tokenizer class (its own pre-tokenizer), and their chat template has the Qwen3
  thinking switch in the generation prompt (`enable_thinking`, on unless set to false). Their
  linear-attention heads get decay rates from long to short memory instead of transformers'
  random draw (`_spread_linear_attention_memory`).

Sizes xs, s and m grow in width and depth; s32 is s with two heads of 32 (head_dim 32 is the
smallest vLLM's CPU attention serves), the cheapest checkpoint for the vLLM tests.

Deliberately left out: pretrained weights of any kind (nothing is downloaded) and video
processing (the trainer is image-only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl_moe")
# the hybrid families: linear-attention (Gated DeltaNet) layers beside full attention
HYBRID = ("qwen3_5", "qwen3_5_moe")
# the transformers class of each family (what AutoModelForImageTextToText builds)
MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}
SIZES = ("xs", "s", "s32", "m")

# The special tokens of the Qwen-VL tokenizers, in their order (appended after the BPE vocab).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL / Qwen2.5-VL add a default system turn; Qwen3-VL does not.
_DEFAULT_SYSTEM = "You are a helpful assistant."

# The Qwen3 thinking switch, as the Qwen3.5 templates end their generation prompt: an open
# think block by default, an empty closed one with enable_thinking=false.
_THINKING_PROMPT = (
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)
_PLAIN_PROMPT = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"

CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] != 'system' and default_system %}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class SizeSpec:
    """Widths and depths of one tiny size; head_dim = hidden / heads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    linear_head_dim: int | None = None  # the hybrid families' linear-attention heads; None: head_dim


SIZE_SPECS = {
    "xs": SizeSpec(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64,
                   vision_width=32, vision_depth=1, vision_heads=2),
    "s": SizeSpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                  vision_width=64, vision_depth=2, vision_heads=4),
    # size s's widths with 2 heads of 32: the smallest size vLLM's CPU attention serves (it
    # refuses head_dim 16), for the vLLM tests; linear-attention heads of 64, since vLLM's CPU
    # Gated DeltaNet kernel runs head dims 64 and 128 only
    "s32": SizeSpec(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128,
                    vision_width=64, vision_depth=2, vision_heads=2, linear_head_dim=64),
    "m": SizeSpec(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384,
                  vision_width=128, vision_depth=4, vision_heads=4),
}

VOCAB_SIZE = 1024  # learned BPE entries, before the special tokens


def _corpus() -> list[str]:
    """A fixed corpus covering the words the demo and tests use; order matters for determinism."""
    classes = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle boot", "cat", "dog", "car", "bird", "flower", "aircraft"]
    words = ("what is this item where how many are there is the to left or right of answer "
             "with one the following choices select from image picture object box think "
             "first reasoning process in mind and then provide user final output a an yes no "
             "count number degree angle triangle circle length area cm meters red blue green "
             "bbox_2d coordinates x y width height located top bottom center").split()
    lines = []
    for name in classes:
        lines.append(f"<think>The item looks like a {name}.</think><answer>{name}</answer>")
        lines.append(f"Where is the {name}? Output its bbox_2d in JSON.")
        lines.append(f"How many {name}s are there?")
    lines.append("What is this item? Answer with one of: " + ", ".join(classes) + ".")
    lines.append(" ".join(words))
    lines.append(" ".join(str(i) for i in range(1001)))
    lines.append('{"bbox_2d": [12, 34, 56, 78]} [0, 0, 1000, 1000] (10,20),(30,40)')
    lines.append("(A) (B) (C) (D) A. B. C. D. The answer is C. 3.14 1/2 \\sqrt{3} √3 ° %")
    return lines * 4


def build_tokenizer(family: str = "qwen2_vl"):
    """A tokenizer with a small learned byte-level BPE, the Qwen specials and template.

    Qwen2-VL to Qwen3-VL(-MoE) ship a Qwen2Tokenizer; Qwen3.5 ships its own class with another
    pre-tokenizer regex (letters with their combining marks, no digit grouping).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken

    if family in HYBRID:
        from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX
        from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer as cls
    else:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
        from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer as cls

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = cls(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
                   special_tokens=True)
    return tok


def _rope_section(rotary_dim: int) -> list[int]:
    # sum(mrope_section) must be rotary_dim / 2 (rotary_dim = head_dim unless the rotary is
    # partial): temporal gets the remainder, h and w split evenly.
    half = rotary_dim // 2
    hw = (half * 3 // 8)
    return [half - 2 * hw, hw, hw]


# Qwen3.5's attention: an explicit head_dim (the real ones use 256 for widths of 1024-5120)
# with a quarter of it rotary; 32 keeps the rotary part (8) wide enough for three M-RoPE axes.
QWEN35_HEAD_DIM = 32
QWEN35_ROTARY_FACTOR = 0.25
FULL_ATTENTION_INTERVAL = 4  # the real Qwen3.5 configs (3 linear layers, then 1 full)
NUM_EXPERTS, EXPERTS_PER_TOKEN = 4, 2


def _layer_types(layers: int) -> list[str]:
    """Qwen3.5's hybrid pattern; with fewer layers than the interval, the last one is full."""
    interval = FULL_ATTENTION_INTERVAL if layers >= FULL_ATTENTION_INTERVAL else layers
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(layers)]


def build_config(family: str, size: str, token_ids: dict[str, int], vocab_size: int,
                 init_std: float = 0.02):
    """The transformers config of one family and size, with the tokenizer's special ids."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    s = SIZE_SPECS[size]
    head_dim = s.hidden // s.heads
    text = dict(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=init_std,
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|im_end|>"],
        pad_token_id=token_ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": _rope_section(head_dim)},
    )
    special = dict(
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    # Qwen3-VL, Qwen3.5 and their MoE versions share one vision tower design (patch 16)
    vision3 = dict(depth=s.vision_depth, hidden_size=s.vision_width,
                   intermediate_size=2 * s.vision_width, num_heads=s.vision_heads,
                   out_hidden_size=s.hidden, patch_size=16, spatial_merge_size=2,
                   temporal_patch_size=2, num_position_embeddings=256, initializer_range=init_std)
    if family == "qwen2_vl":
        vision = dict(depth=s.vision_depth, embed_dim=s.vision_width, hidden_size=s.hidden,
                      num_heads=s.vision_heads, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, initializer_range=init_std)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    if family == "qwen2_5_vl":
        vision = dict(depth=s.vision_depth, hidden_size=s.vision_width,
                      intermediate_size=2 * s.vision_width, num_heads=s.vision_heads,
                      out_hidden_size=s.hidden, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[s.vision_depth - 1], initializer_range=init_std)
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        text["head_dim"] = head_dim  # Qwen3 does not derive it from hidden / heads
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(vision3, deepstack_visual_indexes=[0])
        if family == "qwen3_vl":
            return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **special)
        # every decoder layer sparse (decoder_sparse_step 1, no mlp-only layers), as the real one
        text.update(num_experts=NUM_EXPERTS, num_experts_per_tok=EXPERTS_PER_TOKEN,
                    moe_intermediate_size=s.intermediate // 2, decoder_sparse_step=1,
                    mlp_only_layers=[])
        return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **special)
    # the hybrid Qwen3.5 families
    rotary = int(QWEN35_HEAD_DIM * QWEN35_ROTARY_FACTOR)
    text.update(
        head_dim=QWEN35_HEAD_DIM,
        layer_types=_layer_types(s.layers),
        linear_conv_kernel_dim=4,
        linear_key_head_dim=s.linear_head_dim or head_dim,
        linear_value_head_dim=s.linear_head_dim or head_dim,
        linear_num_key_heads=s.kv_heads, linear_num_value_heads=s.heads,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                         "partial_rotary_factor": QWEN35_ROTARY_FACTOR,
                         "mrope_section": _rope_section(rotary), "mrope_interleaved": True},
    )
    if family == "qwen3_5":
        return transformers.Qwen3_5Config(text_config=text, vision_config=vision3, **special)
    text.update(num_experts=NUM_EXPERTS, num_experts_per_tok=EXPERTS_PER_TOKEN,
                moe_intermediate_size=s.intermediate // 2,
                shared_expert_intermediate_size=s.intermediate // 2)
    return transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision3, **special)


def _preprocessor_config(family: str) -> dict:
    """What a real checkpoint's preprocessor_config.json holds for this family."""
    patch = 14 if family in ("qwen2_vl", "qwen2_5_vl") else 16
    factor = patch * 2
    if patch == 16:  # Qwen3-VL, Qwen3.5 and the MoE versions normalise to [-1, 1]
        mean = std = [0.5, 0.5, 0.5]
    else:  # the CLIP statistics used by Qwen2-VL and Qwen2.5-VL
        mean = [0.48145466, 0.4578275, 0.40821073]
        std = [0.26862954, 0.26130258, 0.27577711]
    # transformers' processing_auto maps qwen3_5, qwen3_5_moe and qwen3_vl_moe to Qwen3VLProcessor
    processor = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(
        family, "Qwen3VLProcessor")
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": mean,
        "image_std": std,
        "patch_size": patch,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": 4 * factor * factor, "longest_edge": 16384 * factor * factor},
    }


def make_tiny_model(family: str, size: str, out: str | os.PathLike, seed: int = 0,
                    init_std: float = 0.02) -> Path:
    """Write a random checkpoint of `family`/`size` to `out` and return its path.

    The directory is written to a temporary sibling and renamed into place, so an interrupted
    build never leaves a half-written checkpoint behind.
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    out = Path(out)
    tok = build_tokenizer(family)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = build_config(family, size, ids, vocab_size=len(tok), init_std=init_std)
    model_cls = getattr(transformers, MODEL_CLASSES[family])
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if family in HYBRID:
        _spread_linear_attention_memory(model)

    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
            pad_token_id=ids["<|endoftext|>"],
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
        ).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(_preprocessor_config(family), indent=2) + "\n", encoding="utf-8")
        # only Qwen2-VL and Qwen2.5-VL add a default system turn
        default_system = _DEFAULT_SYSTEM if family in ("qwen2_vl", "qwen2_5_vl") else ""
        template = ("{%- set default_system = " + json.dumps(default_system) + " %}"
                    + CHAT_TEMPLATE + (_THINKING_PROMPT if family in HYBRID else _PLAIN_PROMPT))
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


@contextmanager
def staged_dir(out: Path):
    """A private folder beside `out` to write a checkpoint into; on success it replaces `out`
    in one rename (readable like any folder), on any error it is removed and `out` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is readable like any other
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _spread_linear_attention_memory(model) -> None:
    """Give the Gated DeltaNet heads decay rates from long to short memory.

    transformers draws A = exp(A_log) from U(0.01, 16): with a tiny model's two heads both can
    land above 1, and then the recurrent state forgets a token within one or two steps, so a
    prompt's state would not depend on the prompt beyond its last tokens (which every prompt
    shares: the template's assistant header). Trained models keep long-memory heads; here A
    runs geometrically from 1e-3 (a memory of hundreds of tokens) to 1 over each layer's heads,
    with no random draw.
    """
    import torch

    for module in model.modules():
        a_log = getattr(module, "A_log", None)
        if isinstance(a_log, torch.nn.Parameter):
            with torch.no_grad():
                a_log.copy_(torch.linspace(-3.0, 0.0, a_log.numel()) * torch.log(torch.tensor(10.0)))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpg-vlm make-tiny-model", description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--size", choices=SIZES, default="s")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-std", type=float, default=0.02,
                        help="std of the random initialisation (Qwen's own is 0.02; tests use a "
                             "larger one so that outputs depend strongly on every input)")
    args = parser.parse_args(argv)
    path = make_tiny_model(args.family, args.size, args.out, args.seed, args.init_std)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        n = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"wrote {args.family} size {args.size} ({n / 1e6:.2f}M parameters) to {path}")
    return 0


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
