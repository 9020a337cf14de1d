"""`gpg-vlm bench` with the vLLM variant, in the vLLM environment: equal work, weight sync timed.

Marked `vllm` (run by `make test-vllm`). Size s32: the smallest tiny size vLLM's CPU attention
serves. TRL's own vLLM mode is reported as not run on CPU, with the reason (bench/README.md).
"""

import pytest

from gpg_vlm.cli import checkout_module

bench = checkout_module("bench.harness")

pytestmark = pytest.mark.vllm


def test_bench_runs_the_vllm_variant_beside_the_loop(tmp_path):
    w = bench.Workload(size="s32", prompts=2, group_size=2, completion_tokens=4,
                       micro_batch_completions=2, warmup_steps=1, steps=1, rounds=1, threads=1)
    report = bench.run(w, ("gpg", "gpg_vllm", "trl_vllm"), cache=tmp_path, log=lambda s: None)
    assert report["problems"] == []  # same prompts, N x G x T tokens, log-probs of the trained weights
    assert list(report["variants"]) == ["gpg", "gpg_vllm"]
    assert report["not_run"] == {"trl_vllm": bench.TRL_VLLM_ON_CPU}
    loop, engine = report["variants"]["gpg"], report["variants"]["gpg_vllm"]
    assert engine["sync_seconds"] > 0 and loop["sync_seconds"] < engine["sync_seconds"]
    # forced lengths: vLLM reports the EOS-masked log-probs (bench/report.py MAX_LOGPROB_DIFF)
    assert engine["max_logprob_diff"] < 0.05 and loop["max_logprob_diff"] < 1e-4
    assert report["ratios"]["gpg_vllm_rollout_vs_gpg"] > 0
    report.update(kind="test", command="pytest")
    assert "| gpg_vllm |" in bench.markdown(report) and "| trl_vllm | not run: TRL's" in bench.markdown(report)
