"""Evaluation throughput: one row per generate call vs 8 rows in file order (the old
`--batch-size 8`) vs the token-budget plan (rows sorted by length, packed under a budget).

All three run in one process on the same model and rows, interleaved, so the ratios hold on a
shared machine even where the absolute times do not. The completions of the three agree (the
script checks it), so only the speed differs.

    PYTHONPATH=. python bench/eval_batching.py [--size m] [--rows 48] [--max-new-tokens 24]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gpg_vlm.tasks as tasks
from gpg_vlm.data import load_rows
from gpg_vlm.data.prepare import main as prepare
from gpg_vlm.models.adapter import VLMAdapter
from gpg_vlm.tiny import make_tiny_model

TEMPLATE = "{problem} Output the final answer in <answer> </answer> tags."


def in_file_order(n: int):
    """A plan like the old loop's: consecutive chunks of n rows, whatever their lengths."""
    def plan(lengths, token_budget, completions, max_new_tokens):
        return [list(range(i, min(i + n, len(lengths)))) for i in range(0, len(lengths), n)]
    return plan


def tiny_workload(prefix: str, size: str, n_rows: int, init_std: float = 0.02):
    """(model folder, rows, adapter in eval mode): a tiny random Qwen2-VL and n_rows Fashion-MNIST
    test rows, half classification and half counting, in a fresh temporary folder."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    model = make_tiny_model("qwen2_vl", size, root / "model", seed=0, init_std=init_std)
    prepare(["fashion-mnist", "--out", str(root / "data"), "--train-size", "1",
             "--test-size", str(n_rows // 2), "--tasks", "classification", "counting"])
    rows = list(load_rows(root / "data" / "classification_test.jsonl"))
    rows += list(load_rows(root / "data" / "counting_test.jsonl"))
    adapter = VLMAdapter.from_pretrained(model, device="cpu")
    adapter.model.eval()
    return model, rows, adapter


def timed(adapter, rows, args, plan=None, budget=tasks.DEFAULT_TOKEN_BUDGET):
    original = tasks.plan_batches
    if plan is not None:
        tasks.plan_batches = plan
    try:
        start = time.perf_counter()
        result = tasks.evaluate_rows(adapter, rows, TEMPLATE, max_new_tokens=args.max_new_tokens,
                                     token_budget=budget)
        return time.perf_counter() - start, [i["completions"] for i in result["items"]]
    finally:
        tasks.plan_batches = original


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="m")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(2)
    _, rows, adapter = tiny_workload("eval_batching.", args.size, args.rows)
    lengths = [tasks.prompt_tokens(adapter, r, TEMPLATE) for r in rows]
    print(f"{len(rows)} rows, prompt tokens {min(lengths)}..{max(lengths)}, "
          f"max_new_tokens {args.max_new_tokens}, tiny {args.size} model, {torch.get_num_threads()} threads")
    ways = {"one row per call": dict(budget=1), "8 rows in file order": dict(plan=in_file_order(8)),
            f"token budget {tasks.DEFAULT_TOKEN_BUDGET}": {}}
    times = {name: [] for name in ways}
    outputs = {}
    for _ in range(args.repeats):
        for name, how in ways.items():
            seconds, outputs[name] = timed(adapter, rows, args, **how)
            times[name].append(seconds)
    reference = outputs["one row per call"]
    base = statistics.median(times["one row per call"])
    old = statistics.median(times["8 rows in file order"])
    for name in ways:
        median = statistics.median(times[name])
        same = "same completions" if outputs[name] == reference else "COMPLETIONS DIFFER"
        print(f"{name:>24}: {median:7.2f} s  ({len(rows) / median:6.1f} rows/s, "
              f"{base / median:5.2f}x one-per-call, {old / median:4.2f}x 8-in-order; {same})")


if __name__ == "__main__":
    main()
