"""Checkpoints outside the trainer: a LoRA checkpoint is a PEFT adapter, `gpg-vlm export` writes a
folder transformers loads with its own classes, `gpg-vlm eval` takes either and uses what the run
trained with."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from gpg_vlm.checkpoint import save_checkpoint
from gpg_vlm.evaluate import main as eval_main
from gpg_vlm.export import main as export_main
from gpg_vlm.lora import LoraSaver, add_lora
from gpg_vlm.models.adapter import VLMAdapter

TRAINED_TEMPLATE = "Q: {problem} Reply inside <answer> </answer>."
IDS = torch.tensor([[3, 17, 5, 42, 9, 11]])  # a text-only probe, enough to see changed weights


@pytest.fixture(scope="module")
def lora_run(tiny_dirs, tmp_path_factory):
    """A LoRA checkpoint saved by the trainer's own path (LoraSaver + save_checkpoint), with
    non-zero LoRA weights so a forgotten adapter shows in the logits; (base, checkpoint, logits)."""
    base = tiny_dirs("qwen2_vl")
    adapter = VLMAdapter.from_pretrained(base, device="cpu")
    cfg = SimpleNamespace(model=str(base), lora_r=4, lora_alpha=16, lora_dropout=0.0,
                          lora_target_modules=("q_proj", "v_proj"))
    add_lora(adapter.model, cfg)
    torch.manual_seed(0)
    for name, p in adapter.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    with torch.no_grad():
        logits = adapter.model(input_ids=IDS).logits  # (1, 6, V)
    state = {"step": 3, "config": {"model": str(base), "lora_r": 4, "prompt_template": TRAINED_TEMPLATE,
                                   "max_new_tokens": 7, "min_pixels": 3136, "max_pixels": 12544}}
    out = tmp_path_factory.mktemp("lora_run")
    path = save_checkpoint(out, 3, LoraSaver(adapter.model), base, {"optimizer": {}}, state, keep=1)
    return base, path, logits


def test_lora_checkpoint_is_a_peft_adapter_peft_loads(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base, ckpt, logits = lora_run
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(base).resolve()) and config["peft_type"] == "LORA"
    plain = AutoModelForImageTextToText.from_pretrained(base)
    with torch.no_grad():
        before = plain(input_ids=IDS).logits
    model = PeftModel.from_pretrained(plain, ckpt)  # as a new user would, nothing of gpg_vlm
    with torch.no_grad():
        after = model(input_ids=IDS).logits
    assert torch.allclose(after, logits, atol=1e-5)
    assert (before - logits).abs().max() > 1e-2  # control: without the adapter they differ


def test_export_merge_writes_a_plain_checkpoint_transformers_loads(lora_run, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    base, ckpt, logits = lora_run
    out = tmp_path / "plain"
    assert export_main([str(ckpt), "--out", str(out), "--merge"]) == 0
    assert "LoRA merged" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "gpg_vlm_training.json"} <= names
    assert not names & {"optimizer.pt", "trainer_state.json", "adapter_config.json"}
    model = AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    assert torch.allclose(got, logits, atol=1e-4)
    assert not any("lora" in k for k in model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|image_pad|>" in text and text.rstrip().endswith("assistant")  # the chat template came along
    pixels = AutoImageProcessor.from_pretrained(out)(images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, 4, 4]]
    try:  # Qwen's AutoProcessor also builds a video processor, which needs torchvision
        import torchvision  # noqa: F401
    except ImportError:
        return
    from transformers import AutoProcessor

    assert "<|image_pad|>" in AutoProcessor.from_pretrained(out).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    settings = json.loads((out / "gpg_vlm_training.json").read_text())
    assert settings["prompt_template"] == TRAINED_TEMPLATE and settings["max_new_tokens"] == 7


def test_export_without_merge_is_the_peft_adapter_and_full_checkpoints_copy(lora_run, tiny_dirs, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base, ckpt, logits = lora_run
    assert export_main([str(ckpt), "--out", str(tmp_path / "adapter")]) == 0
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, logits, atol=1e-5)
    full = tmp_path / "full-ckpt"
    shutil.copytree(tiny_dirs("qwen2_vl"), full)
    (full / "optimizer.pt").write_bytes(b"x")
    assert export_main([str(full), "--out", str(tmp_path / "full")]) == 0
    assert not (tmp_path / "full" / "optimizer.pt").exists()
    AutoModelForImageTextToText.from_pretrained(tmp_path / "full")
    capsys.readouterr()


@pytest.mark.parametrize("case", ["not_empty", "missing_base", "not_a_checkpoint"])
def test_export_errors_are_one_line(case, lora_run, tmp_path, capsys):
    _, ckpt, _ = lora_run
    out = tmp_path / "out"
    if case == "not_empty":
        out.mkdir()
        (out / "x").write_text("x")
    elif case == "missing_base":
        broken = tmp_path / "broken"
        shutil.copytree(ckpt, broken)
        config = json.loads((broken / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "gone")
        (broken / "adapter_config.json").write_text(json.dumps(config))
        ckpt = broken
    else:
        ckpt = tmp_path
    assert export_main([str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpg-vlm export: ") and len(err.strip().splitlines()) == 1
    assert {"not_empty": "not empty", "missing_base": "base_model_name_or_path",
            "not_a_checkpoint": "neither config.json"}[case] in err


def _rows(tmp_path):
    from gpg_vlm.data.prepare import main as prepare

    assert prepare(["fashion-mnist", "--out", str(tmp_path / "fm"), "--train-size", "1",
                    "--test-size", "3", "--tasks", "classification"]) == 0
    return tmp_path / "fm" / "classification_test.jsonl"


def _eval(model, data, out, *extra):
    assert eval_main(["--model", str(model), "--benchmark", "jsonl", "--data", str(data),
                      "--out", str(out), *extra]) == 0
    payload = json.loads((out / "results.json").read_text())
    samples = [json.loads(x) for x in (out / "samples_jsonl.jsonl").read_text().splitlines()]
    return payload["configs"]["jsonl"], sorted(samples, key=lambda s: s["doc_id"])


def test_eval_takes_a_lora_checkpoint_as_trained_and_equals_its_export(lora_run, tmp_path, capsys):
    base, ckpt, _ = lora_run
    data = _rows(tmp_path)
    config, samples = _eval(ckpt, data, tmp_path / "lora")
    # the run's own settings, and where they came from
    assert config["prompt_template"] == TRAINED_TEMPLATE and config["max_new_tokens"] == 7
    assert config["min_pixels"] == 3136 and config["max_pixels"] == 12544
    assert config["settings_from"]["prompt_template"] == f"checkpoint ({ckpt / 'trainer_state.json'})"
    assert all(s["input"].count("Q: ") == 1 and "Reply inside" in s["input"] for s in samples)
    # the command line wins, and says so
    config2, samples2 = _eval(ckpt, data, tmp_path / "lora2", "--max-new-tokens", "3")
    assert config2["max_new_tokens"] == 3 and config2["settings_from"]["max_new_tokens"] == "command line"
    assert config2["settings_from"]["prompt_template"].startswith("checkpoint")
    # the merged export evaluates to the same completions, with the same settings from its file
    assert export_main([str(ckpt), "--out", str(tmp_path / "plain"), "--merge"]) == 0
    config3, samples3 = _eval(tmp_path / "plain", data, tmp_path / "exported")
    assert config3["settings_from"]["max_new_tokens"].endswith("gpg_vlm_training.json)")
    assert [s["completions"] for s in samples3] == [s["completions"] for s in samples]
    # control: the base model alone answers differently
    _, base_samples = _eval(base, data, tmp_path / "base", "--prompt-template", TRAINED_TEMPLATE,
                            "--max-new-tokens", "7", "--min-pixels", "3136", "--max-pixels", "12544")
    assert [s["completions"] for s in base_samples] != [s["completions"] for s in samples]
    capsys.readouterr()


def test_the_trainer_resumes_from_the_peft_format_and_the_old_one(lora_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from gpg_vlm.lora import PEFT_PREFIX, WEIGHTS_FILE, load_lora

    base, ckpt, logits = lora_run
    weights = load_file(str(ckpt / WEIGHTS_FILE))
    assert weights and all(k.startswith(PEFT_PREFIX) for k in weights)
    old = tmp_path / "old"
    old.mkdir()
    save_file({k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}, str(old / WEIGHTS_FILE))
    for folder in (ckpt, old):
        adapter = VLMAdapter.from_pretrained(base, device="cpu")
        add_lora(adapter.model, SimpleNamespace(model=str(base), lora_r=4, lora_alpha=16, lora_dropout=0.0,
                                                lora_target_modules=("q_proj", "v_proj")))
        load_lora(adapter.model, folder)
        with torch.no_grad():
            assert torch.allclose(adapter.model(input_ids=IDS).logits, logits, atol=1e-6)
