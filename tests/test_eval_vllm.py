"""`gpg-vlm eval --rollout vllm`: greedy equals our loop, pass@k, resume; and what needs no vLLM.

The tests marked `vllm` run where vLLM is installed (`make test-vllm`); they use a tiny size `m`
checkpoint (head_dim 32, which vLLM's CPU attention takes) initialised with std 0.1, so that
completions differ from row to row and the equality below can fail (tests/test_vllm_rollout.py
says why 0.1). The others run in the default environment: pass@k by hand, the one-line refusal
without vLLM, and --resume refusing another engine.
"""

import json
import math
import os
import signal
import sys
from types import SimpleNamespace

import pytest
import torch

from gpg_vlm.eval_results import pass_at_k, pass_ks, task_results
from gpg_vlm.evaluate import main
from helpers import assert_one_line

M_INIT_STD = 0.1


def _args(model, data, out, *extra):
    return ["--model", str(model), "--benchmark", "jsonl", "--data", str(data), "--out", str(out),
            *map(str, extra)]


def _samples(out):
    lines = (out / "samples_jsonl.jsonl").read_text().splitlines()
    return sorted((json.loads(x) for x in lines), key=lambda s: s["doc_id"])


def _head(out):
    return json.loads((out / "results.json").read_text())["results"]["jsonl"]


# ------------------------------------------------------------------ default environment

def test_pass_at_k_by_hand():
    # n = 4 completions, c = 1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6;
    # pass@4 = 1 (every draw of 4 holds the correct one)
    assert [pass_at_k(4, 1, k) for k in (1, 2, 4)] == [0.25, 0.5, 1.0]
    # c = 2: pass@2 = 1 - C(2,2)/C(4,2) = 5/6; c = 0: never; c = n: always
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    # k = 1 is the share of correct completions, for every n and c
    assert all(pass_at_k(n, c, 1) == pytest.approx(c / n) for n in (1, 5, 16) for c in range(n + 1))
    assert pass_ks(4) == [1, 2, 4] and pass_ks(5) == [1, 2, 4, 5] and pass_ks(2) == [1, 2]
    with pytest.raises(ValueError, match="n=4, c=5"):
        pass_at_k(4, 5, 1)


def test_results_report_unbiased_pass_at_k_per_row():
    rows = [type("Row", (), {"extra": {}})() for _ in range(2)]
    # row 0: one of four correct (a partial reward 0.5 is not correct); row 1: three of four
    items = [{"category": "c", "rewards": [1.0, 0.0, 0.5, 0.0]},
             {"category": "c", "rewards": [1.0, 1.0, 0.0, 1.0]}]
    for item in items:
        item["reward"] = sum(item["rewards"]) / 4
    head = task_results("t", rows, items, completions=4)[0]["t"]
    assert head["pass@1,none"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    # row 1: 1 - C(1,2)/C(4,2) = 1 (C(1,2) = 0); row 0: 1/2
    assert head["pass@2,none"] == pytest.approx((0.5 + 1.0) / 2)
    assert head["pass@4,none"] == 1.0 and head["pass@4_stderr,none"] == 0.0
    # pass@1 stderr: the two rows' estimates 0.25 and 0.75, sample std sqrt(0.125), over sqrt(2)
    assert head["pass@1_stderr,none"] == pytest.approx(math.sqrt(0.125 / 2))
    assert "pass@3,none" not in head


def test_rollout_vllm_without_vllm_is_one_line(tiny_dirs, fm_mixed, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises, installed or not
    out = tmp_path / "res"
    args = _args(tiny_dirs("qwen2_vl"), fm_mixed, out, "--limit", "1", "--max-new-tokens", "2")
    assert main([*args, "--rollout", "vllm"]) == 2
    assert_one_line(capsys.readouterr().err, "--rollout vllm needs vLLM", "pip install 'gpg_vlm[vllm]'")
    assert not out.exists()  # refused before any work
    # control: the same command with the default engine runs
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["configs"]["jsonl"]["rollout"] == "hf"


def test_resume_refuses_another_engine(tiny_dirs, fm_mixed, tmp_path, capsys):
    out = tmp_path / "res"
    args = _args(tiny_dirs("qwen2_vl"), fm_mixed, out, "--limit", "1", "--max-new-tokens", "2")
    assert main(args) == 0
    run_file = out / "run.json"
    settings = json.loads(run_file.read_text())
    run_file.write_text(json.dumps(dict(settings, rollout="vllm")))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert_one_line(capsys.readouterr().err, "--resume: rollout is 'hf' now but 'vllm'")
    # a run.json written before the setting existed was an hf run: it resumes
    run_file.write_text(json.dumps({k: v for k, v in settings.items() if k != "rollout"}))
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------ with vLLM

@pytest.fixture(scope="module")
def model_m(tmp_path_factory):
    from gpg_vlm.tiny import make_tiny_model

    return make_tiny_model("qwen2_vl", "m", tmp_path_factory.mktemp("eval_vllm") / "m", seed=0,
                           init_std=M_INIT_STD)


GREEDY = ["--max-new-tokens", "8", "--dtype", "float32"]
FIELDS = ("doc_id", "input", "completions", "extracted", "rewards", "truncated")


def _greedy_pair(model, data, root):
    """(hf samples, vllm samples, hf config, vllm config) of one greedy evaluation per engine."""
    assert main(_args(model, data, root / "hf", *GREEDY)) == 0
    assert main(_args(model, data, root / "vllm", *GREEDY, "--rollout", "vllm")) == 0
    configs = [json.loads((root / k / "results.json").read_text())["configs"]["jsonl"] for k in ("hf", "vllm")]
    return _samples(root / "hf"), _samples(root / "vllm"), *configs


@pytest.fixture(scope="module")
def greedy_m(model_m, fm_mixed, tmp_path_factory):
    return _greedy_pair(model_m, fm_mixed, tmp_path_factory.mktemp("greedy_m"))


def _fields(samples):
    return [[s[f] for f in FIELDS] for s in samples]


@pytest.mark.vllm
def test_greedy_vllm_equals_hf(greedy_m):
    hf, vl, hf_config, vl_config = greedy_m
    assert _fields(vl) == _fields(hf)
    # control: the completions depend on the prompt (so equal completions mean equal prompts)
    texts = [s["completions"][0] for s in hf]
    assert len(set(texts)) >= 3, texts
    assert [hf_config["rollout"], vl_config["rollout"]] == ["hf", "vllm"]


@pytest.mark.vllm
def test_greedy_vllm_serves_a_lora_checkpoint_merged(model_m, greedy_m, fm_mixed, tmp_path):
    """A LoRA checkpoint: vLLM is built from the base folder, so only the merged weights it is
    loaded with can make its completions equal our loop's on the merged model."""
    from gpg_vlm.checkpoint import save_checkpoint
    from gpg_vlm.lora import LoraSaver, add_lora
    from gpg_vlm.models.adapter import VLMAdapter

    adapter = VLMAdapter.from_pretrained(model_m, device="cpu")
    add_lora(adapter.model, SimpleNamespace(model=str(model_m), lora_r=4, lora_alpha=16, lora_dropout=0.0,
                                            lora_target_modules=("q_proj", "v_proj")))
    torch.manual_seed(0)
    for name, p in adapter.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    ckpt = save_checkpoint(tmp_path / "run", 1, LoraSaver(adapter.model), model_m, {"optimizer": {}},
                           {"step": 1, "config": {"model": str(model_m), "lora_r": 4}}, keep=1)
    hf, vl, _, _ = _greedy_pair(ckpt, fm_mixed, tmp_path)
    assert _fields(vl) == _fields(hf)
    # control: the adapter changes the completions, so serving the base weights would fail above
    assert [s["completions"] for s in hf] != [s["completions"] for s in greedy_m[0]]


def _kill_on_call(monkeypatch, call: int):
    """The `call`-th vLLM generate sends this process a real SIGTERM (raised before the engine runs)."""
    from gpg_vlm.rollout.vllm import VLLMRollout

    original, calls = VLLMRollout.generate, []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VLLMRollout, "generate", generate)
    return calls


@pytest.mark.vllm
def test_pass_at_k_with_vllm_resumes_exactly(model_m, fm_mixed, tmp_path, capsys, monkeypatch):
    # --token-budget 1: a generate call per row, so a stop falls between rows
    common = ["--max-new-tokens", "6", "--completions", "4", "--temperature", "1.0",
              "--token-budget", "1", "--rollout", "vllm"]
    whole = tmp_path / "whole"
    assert main(_args(model_m, fm_mixed, whole, *common)) == 0, capsys.readouterr().err
    samples, head = _samples(whole), _head(whole)
    assert all(len(s["completions"]) == 4 and len(s["rewards"]) == 4 for s in samples)
    assert any(len(set(s["completions"])) > 1 for s in samples)  # sampled, not greedy
    correct = [sum(r >= 1.0 for r in s["rewards"]) for s in samples]
    for k in (1, 2, 4):
        assert head[f"pass@{k},none"] == pytest.approx(sum(pass_at_k(4, c, k) for c in correct) / 5)

    cut = tmp_path / "cut"
    calls = _kill_on_call(monkeypatch, call=3)
    assert main(_args(model_m, fm_mixed, cut, *common)) == 143 and len(calls) == 3
    assert "stopped by SIGTERM after 2 of 5 rows" in capsys.readouterr().err
    monkeypatch.undo()
    resumed = _kill_on_call(monkeypatch, call=99)
    assert main(_args(model_m, fm_mixed, cut, *common, "--resume")) == 0
    assert len(resumed) == 3  # only the unfinished rows were generated
    assert _samples(cut) == samples and _head(cut) == head
    # control: another seed samples other completions, so the equality above could fail
    monkeypatch.undo()
    assert main(_args(model_m, fm_mixed, tmp_path / "seed1", *common, "--seed", "1")) == 0
    assert [s["completions"] for s in _samples(tmp_path / "seed1")] != [s["completions"] for s in samples]


@pytest.mark.vllm
def test_rollout_bench_runs_and_finds_equal_greedy_completions(capsys):
    from gpg_vlm.cli import checkout_module

    checkout_module("bench.eval_rollout").main(["--rows", "2", "--max-new-tokens", "3", "--k", "2",
                                                "--repeats", "1"])
    lines = [x for x in capsys.readouterr().out.splitlines() if "vllm / hf" in x]
    assert len(lines) == 2 and "same completions" in lines[0] and "sampled" in lines[1], lines
