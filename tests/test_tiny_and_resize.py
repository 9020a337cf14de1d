"""Tiny checkpoints (deterministic, loadable by plain transformers) and the resize rules."""

import hashlib
import subprocess
import sys
import textwrap

import pytest

from gpg_vlm.resize import smart_resize, smart_resize_rules


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5_moe"])
def test_same_seed_same_checkpoint_other_seed_other_weights(tmp_path, family):
    from gpg_vlm.tiny import make_tiny_model

    a = make_tiny_model(family, "xs", tmp_path / "a", seed=3)
    b = make_tiny_model(family, "xs", tmp_path / "b", seed=3)
    c = make_tiny_model(family, "xs", tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja",
                 "preprocessor_config.json"):
        assert digest(a / name) == digest(b / name), name
    assert digest(a / "model.safetensors") != digest(c / "model.safetensors")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_5_moe",
                                    "qwen3_vl_moe"])
def test_plain_transformers_loads_the_checkpoint(tiny_dirs, family):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    from gpg_vlm.tiny import MODEL_CLASSES

    path = tiny_dirs(family)
    assert AutoConfig.from_pretrained(path).model_type == family
    model = AutoModelForImageTextToText.from_pretrained(path)
    from gpg_vlm.models.family import FAMILIES

    assert type(model).__name__ == MODEL_CLASSES[family] == FAMILIES[family].model_class
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("<|im_start|>user\nhéllo ✓ 😀<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") == ids[0]
    assert tok.decode(ids) == "<|im_start|>user\nhéllo ✓ 😀<|im_end|>"  # any text round-trips


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_hybrid_families_keep_the_real_layer_pattern_and_tokenizer(tmp_path, family):
    """Qwen3.5: linear attention with full attention every 4th layer; its own tokenizer class."""
    from transformers import AutoConfig, AutoTokenizer

    from gpg_vlm.tiny import make_tiny_model

    m = make_tiny_model(family, "m", tmp_path / "m")
    text = AutoConfig.from_pretrained(m).text_config
    assert text.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert text.linear_num_value_heads == 2 * text.linear_num_key_heads  # the real 1:2 ratio
    rotary = int(text.head_dim * text.rope_parameters["partial_rotary_factor"])
    assert sum(text.rope_parameters["mrope_section"]) == rotary // 2
    if family == "qwen3_5_moe":
        assert (text.num_experts, text.num_experts_per_tok) == (4, 2)
    xs = AutoConfig.from_pretrained(make_tiny_model(family, "xs", tmp_path / "xs")).text_config
    assert xs.layer_types == ["linear_attention", "full_attention"]  # both cache kinds, 2 layers
    assert type(AutoTokenizer.from_pretrained(m)).__name__ == "Qwen3_5Tokenizer"


def test_qwen35_template_has_the_thinking_switch(tiny_dirs):
    from transformers import AutoTokenizer

    path = tiny_dirs("qwen3_5")
    tok = AutoTokenizer.from_pretrained(path)
    template = (path / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    head = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n"
    on = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                 add_generation_prompt=True)
    off = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                  add_generation_prompt=True, enable_thinking=False)
    assert on == head + "<think>\n" and off == head + "<think>\n\n</think>\n\n"


def test_chat_template_matches_the_qwen_format(adapters):
    adapter = adapters("qwen2_vl")
    from gpg_vlm.models.batch import Sample

    from PIL import Image
    batch = adapter.encode([Sample("Hi?", [Image.new("RGB", (28, 28))])])
    assert batch.texts[0] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n"
        "<|im_start|>assistant\n")
    qwen3 = adapters("qwen3_vl").encode([Sample("Hi?")])
    assert qwen3.texts[0] == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"


def test_cli_make_tiny_model(tmp_path, capsys):
    from gpg_vlm.cli import main

    assert main(["make-tiny-model", "--family", "qwen3_vl", "--size", "xs",
                 "--out", str(tmp_path / "m")]) == 0
    assert "qwen3_vl size xs" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize("height,width,factor,expected", [
    (56, 56, 28, (56, 56)),  # already on the grid
    (100, 150, 28, (112, 140)),  # round(100/28)=4, round(150/28)=5
    (10, 10, 28, (56, 56)),  # below min_pixels 4*28*28: scaled up to 2x2 merged patches
    # above max 2.5M px: beta = sqrt(6e6 / 2.5e6) = 1.549; 2000/beta = 1291 -> 46*28 = 1288,
    # 3000/beta = 1936 -> 69*28 = 1932 (floored so the product stays under the limit)
    (2000, 3000, 28, (1288, 1932)),
    (100, 150, 32, (96, 160)),  # Qwen3-VL: multiples of 32
])
def test_smart_resize_by_hand(height, width, factor, expected):
    max_pixels = 2_500_000 if height == 2000 else 16384 * factor * factor
    assert smart_resize_rules(height, width, factor, 4 * factor * factor, max_pixels) == expected
    assert smart_resize(height, width, factor, 4 * factor * factor, max_pixels) == expected


def test_smart_resize_rejects_extreme_aspect_and_empty():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize_rules(10, 2500, 28, 3136, 10**7)
    with pytest.raises(ValueError, match="positive"):
        smart_resize_rules(0, 10, 28, 3136, 10**7)


def test_our_rules_equal_qwen_vl_utils_where_it_imports():
    try:
        from qwen_vl_utils.vision_process import smart_resize as theirs
    except Exception:  # noqa: BLE001 - it imports torchvision, absent on CPU machines
        pytest.skip("qwen-vl-utils needs torchvision, which has no CPU build")
    for h in range(20, 3000, 137):
        for w in range(20, 3000, 211):
            assert smart_resize_rules(h, w, 28, 3136, 1003520) == tuple(
                theirs(h, w, factor=28, min_pixels=3136, max_pixels=1003520))


def test_whole_adapter_path_runs_without_torchvision(tmp_path):
    """Even where torchvision is installed, the path must not need it."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torchvision"] = None  # any import of torchvision now fails
        import torch
        from PIL import Image
        from gpg_vlm.tiny import make_tiny_model
        from gpg_vlm.models.adapter import VLMAdapter
        from gpg_vlm.models.batch import Sample
        from gpg_vlm.rollout import make_engine
        for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            path = make_tiny_model(family, "xs", r"{tmp_path}" + "/" + family)
            adapter = VLMAdapter.from_pretrained(path, device="cpu")
            batch = adapter.encode([Sample("What?", [Image.new("RGB", (40, 60), "red")])])
            rollout = make_engine("hf", adapter).generate(batch, 2, max_new_tokens=4)
            lp = adapter.completion_logprobs(batch, rollout)
            assert (lp - rollout.logprobs).abs().max() < 1e-4
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
