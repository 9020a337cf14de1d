"""The benchmark harness: forced completion length, equal-work checks, a smoke run of all variants.

The smoke run uses the `xs` model with N = 2, G = 2 and 4 tokens; the TRL variants run when
trl is installed (the `bench` extra) and are skipped otherwise.
"""

import importlib.util
import json

import pytest
import torch

from gpg_vlm.cli import checkout_module
from gpg_vlm.models.batch import Sample
from gpg_vlm.rollout import hf, make_engine

bench = checkout_module("bench.harness")  # the harness lives in the checkout's bench/, not the package
report = checkout_module("bench.report")
workload = checkout_module("bench.workload")  # what every variant runs: workload, prompt, reward

HAS_TRL = importlib.util.find_spec("trl") is not None


def _batch(adapter):
    from PIL import Image

    image = Image.new("RGB", (56, 56), (200, 30, 30))
    return adapter.encode([Sample("What is this item?", [image]), Sample("How many?", [image])])


def test_min_new_tokens_forces_the_length_even_when_eos_is_likely(adapters, monkeypatch):
    adapter = adapters("qwen2_vl")
    batch = _batch(adapter)
    eos = torch.tensor(adapter.eos_token_ids)
    scores = hf.policy_scores

    def eos_first(logits, temperature, suppressed):  # EOS by far the most likely token
        return scores(logits, temperature, suppressed).index_add(-1, eos, torch.full(
            (logits.shape[0], len(eos)), 50.0))

    monkeypatch.setattr(hf, "policy_scores", eos_first)  # what the sampling loop calls
    engine = make_engine("hf", adapter)
    gen = torch.Generator().manual_seed(0)
    free = engine.generate(batch, 3, max_new_tokens=6, generator=gen)
    assert free.completion_mask.sum(-1).tolist() == [1] * 6  # each stops at its first token
    forced = engine.generate(batch, 3, max_new_tokens=6, min_new_tokens=6, generator=gen)
    assert forced.completion_mask.sum(-1).tolist() == [6] * 6
    assert not torch.isin(forced.completion_ids, eos).any()
    assert forced.truncated.all()  # ended by the length, not by an EOS
    greedy = engine.generate(batch, 1, max_new_tokens=5, min_new_tokens=3, temperature=0.0)
    assert greedy.completion_mask.sum(-1).tolist() == [4, 4]  # EOS allowed from the 4th token


def test_min_new_tokens_keeps_the_reported_logprobs_those_of_the_policy(adapters):
    adapter = adapters("qwen2_vl")
    batch = _batch(adapter)
    gen = torch.Generator().manual_seed(1)
    rollout = make_engine("hf", adapter).generate(batch, 2, max_new_tokens=5, min_new_tokens=5,
                                                  generator=gen)
    with torch.no_grad():
        trained = adapter.completion_logprobs(batch, rollout)
    torch.testing.assert_close(trained, rollout.logprobs, atol=1e-5, rtol=0)


def test_bench_reward_is_the_same_for_plain_and_conversational_completions():
    texts = ["<answer>bag</answer>", "", "x" * 100]
    plain = workload.bench_reward(texts, solution=["bag"] * 3)
    chat = workload.bench_reward([[{"role": "assistant", "content": t}] for t in texts])
    assert plain == chat
    assert all(0.0 <= r < 1.0 for r in plain) and len(set(plain)) == 3


def test_write_readme_replaces_only_the_results_block(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"# Bench\nhow to run\n\n{report.README_START}\nold\n{report.README_END}\ntail\n")
    bench.write_readme(path, "| new |")
    bench.write_readme(path, "| newer |")
    text = path.read_text()
    assert text == f"# Bench\nhow to run\n\n{report.README_START}\n| newer |\n{report.README_END}\ntail\n"


def test_summarize_flags_unequal_completion_lengths_and_prompts():
    w = bench.Workload(prompts=1, group_size=2, completion_tokens=3, micro_batch_completions=2,
                       warmup_steps=0, steps=1, rounds=1, threads=1)

    def run_result(tokens, prompt_len, checksum):
        step = {"wall": 1.0, "rollout": 0.5, "train": 0.5, "cpu": 1.0, "steal": 0.0,
                "completion_tokens": tokens, "completion_min": tokens // 2,
                "completion_max": tokens // 2, "prompt_tokens": [prompt_len],
                "prompt_checksums": [checksum], "updated": True}
        return {"steps": [step], "peak_rss_mb": 100.0, "setup_rss_mb": 90.0, "threads": 1,
                "reference_model": False, "gradient_checkpointing": False}

    _, ok = bench.summarize(w, {"a": [run_result(6, 10, 7)], "b": [run_result(6, 10, 7)]})
    assert ok == []
    stale = run_result(6, 10, 7)
    stale["steps"][0]["logprob_diff"] = 0.9  # a rollout from other weights than those trained
    _, bad = bench.summarize(w, {"a": [run_result(6, 10, 7)], "b": [stale]})
    assert bad == ["b: rollout and training log-probs differ by 0.9 (> 0.05)"]
    _, bad = bench.summarize(w, {"a": [run_result(6, 10, 7)], "b": [run_result(4, 11, 7)]})
    assert any("b: a step produced 4 completion tokens" in p for p in bad)
    assert any("prompts differ" in p for p in bad)


def test_bench_smoke_run_of_every_variant(tmp_path, monkeypatch):
    w = bench.Workload(size="xs", prompts=2, group_size=2, completion_tokens=4,
                       micro_batch_completions=2, warmup_steps=0, steps=1, rounds=1, threads=1)
    variants = bench.VARIANTS if HAS_TRL else ("gpg", "grpo", *bench.VLLM_VARIANTS)
    # an environment without vLLM (the default one): its variants are listed as not run, with why
    monkeypatch.setattr(bench, "_importable", lambda name: name != "vllm")
    report = bench.run(w, variants, cache=tmp_path, log=lambda s: None)
    assert report["problems"] == []
    assert set(report["not_run"]) == set(bench.VLLM_VARIANTS)
    assert all("vLLM is not installed" in why for why in report["not_run"].values())
    variants = tuple(v for v in variants if v not in bench.VLLM_VARIANTS)
    assert list(report["variants"]) == list(variants)
    for name, v in report["variants"].items():
        assert v["step_seconds"] > 0 and v["peak_memory_mb"] > 0, name
        assert v["reference_model"] == (name in ("grpo", "trl_beta004")), name
        assert v["gradient_checkpointing"] is False
        assert v["threads"] == [1]
    if HAS_TRL:
        assert report["ratios"]["gpg_vs_trl_beta0"] > 0
    report.update(kind="test", command="pytest")
    table = bench.markdown(report)
    assert all(f"| {name} |" in table for name in variants)
    assert "| gpg_vllm | not run: vLLM is not installed" in table
    json.dumps(report)  # the output file is plain JSON


def test_bench_command_without_the_checkout_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from gpg_vlm import cli

    monkeypatch.setattr(cli, "CHECKOUT", tmp_path)  # an installed package: no bench/ beside it
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "source checkout" in err and str(tmp_path) in err


def test_bench_help_runs_from_the_checkout(capsys):
    from gpg_vlm import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--help"])
    assert stop.value.code == 0 and "--quick" in capsys.readouterr().out


def test_a_run_with_a_vllm_variant_writes_the_vllm_block_not_the_main_results():
    from bench.report import README_START, VLLM_README_START, readme_markers

    assert readme_markers(["gpg", "grpo", "trl_beta0"])[0] == README_START
    assert readme_markers(["gpg", "gpg_vllm", "trl_beta0"])[0] == VLLM_README_START
    assert readme_markers(["trl_vllm"])[0] == VLLM_README_START
