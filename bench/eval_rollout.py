"""Evaluation throughput by rollout engine: `gpg-vlm eval --rollout hf` (our loop, token-budget
batches) against `--rollout vllm` (a vLLM engine in this process) on the same rows.

Both engines get the same batch plan (the token budget's), the same prompts and seeds, through
gpg_vlm.tasks.scored_batches, the code `gpg-vlm eval` runs; they alternate within one process,
so the ratio holds on a shared machine where the absolute times do not. Two workloads: greedy
(one completion per row; the script checks the engines' completions agree, so the work is
equal) and pass@k (K sampled completions per row at temperature 1; the two engines' random
streams differ, so completion tokens per second is reported beside items per second). vLLM's
start-up (engine build and weight load) is timed apart: it is paid once per `gpg-vlm eval`.

Needs vLLM (run it with the vLLM environment's python, e.g. /work/venv-vllm or .venv-vllm):

    PYTHONPATH=. .venv-vllm/bin/python bench/eval_rollout.py [--rows 24] [--max-new-tokens 16] [--k 4]

Deliberately left out: a GPU run (on a GPU the balance differs: our loop is one forward per
token for the whole batch, vLLM schedules and pages its KV cache) and other model sizes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from bench.eval_batching import tiny_workload
from gpg_vlm.rollout import make_engine
from gpg_vlm.tasks import DEFAULT_TOKEN_BUDGET, prompt_tokens, scored_batches

TEMPLATE = "{problem} Output the final answer in <answer> </answer> tags."


class Counted:
    """An engine whose generate calls also count the completion tokens they produce."""

    def __init__(self, engine):
        self.engine, self.tokens = engine, 0

    def generate(self, batch, group_size, **options):
        rollout = self.engine.generate(batch, group_size, **options)
        self.tokens += int(rollout.completion_mask.sum())
        return rollout


def timed(adapter, engine, rows, args, completions: int, temperature: float):
    """(seconds, completion tokens, completions per row) of one evaluation of `rows`."""
    counted = Counted(engine)
    start = time.perf_counter()
    found = {}
    for batch in scored_batches(adapter, rows, TEMPLATE, max_new_tokens=args.max_new_tokens,
                                temperature=temperature, completions=completions, seed=0,
                                token_budget=args.token_budget, engine=counted):
        found.update(batch)
    seconds = time.perf_counter() - start
    return seconds, counted.tokens, [found[i]["completions"] for i in range(len(rows))]


def load(args):
    return tiny_workload("eval_rollout.", "m", args.rows, init_std=0.1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--k", type=int, default=4, help="completions per row of the pass@k workload")
    p.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(2)  # before vLLM's CPU worker makes set_num_threads a no-op
    model, rows, adapter = load(args)
    lengths = [prompt_tokens(adapter, r, TEMPLATE) for r in rows]
    start = time.perf_counter()
    vllm = make_engine("vllm", adapter, model_dir=model, seed=0,
                       max_model_len=max(lengths) + args.max_new_tokens)
    startup = time.perf_counter() - start
    engines = {"hf": make_engine("hf", adapter), "vllm": vllm}
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} {os.cpu_count()} cores "
          f"(load average {os.getloadavg()[0]:.1f} at start), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; tiny qwen2_vl m, fp32; {len(rows)} rows, prompt tokens "
          f"{min(lengths)}..{max(lengths)}, max_new_tokens {args.max_new_tokens}, token budget "
          f"{args.token_budget}, median of {args.repeats} interleaved repeats; vLLM start-up {startup:.1f} s")
    try:
        for label, completions, temperature in (("greedy", 1, 0.0), (f"pass@{args.k}", args.k, 1.0)):
            runs = {name: [] for name in engines}
            for _ in range(args.repeats):
                for name, engine in engines.items():
                    runs[name].append(timed(adapter, engine, rows, args, completions, temperature))
            report(label, rows, runs, startup)
    finally:
        vllm.close()


def report(label: str, rows, runs: dict, startup: float) -> None:
    rate = {}
    for name, found in runs.items():
        seconds = statistics.median(s for s, _, _ in found)
        tokens = statistics.median(t for _, t, _ in found)
        rate[name] = len(rows) / seconds
        print(f"  {label:>7} {name:>4}: {seconds:7.2f} s, {rate[name]:6.2f} items/s, "
              f"{tokens / seconds:7.1f} completion tokens/s ({tokens:.0f} tokens)")
    with_startup = len(rows) / (statistics.median(s for s, _, _ in runs["vllm"]) + startup)
    if label == "greedy":
        agree = "same completions" if runs["hf"][0][2] == runs["vllm"][0][2] else "COMPLETIONS DIFFER"
    else:
        agree = "sampled: each engine's own random stream"
    print(f"  {label:>7} vllm / hf: {rate['vllm'] / rate['hf']:.2f}x items/s "
          f"({with_startup / rate['hf']:.2f}x counting vLLM's start-up once); {agree}")


if __name__ == "__main__":
    main()
