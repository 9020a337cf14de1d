"""Evaluation: greedy (or sampled) completions scored by the very rewards used in training.

Rows become prompts and are scored by `gpg_vlm.tasks.evaluate_rows`, the glue training uses
too (prompts, reward columns, categories), so a training reward and an evaluation metric
cannot drift apart; this module adds the benchmark loading, summaries and the command line.

`main` is `gpg-vlm eval`: load a checkpoint and a benchmark, generate greedily (or K
completions per row for pass@K), score with `accuracy_reward`, and write OUT/results.json (summary + one record
per row) and OUT/results.md (a table). Summary conventions:
- `accuracy` is the mean reward over all rows (micro average). For grounding rows the reward
  is the IoU, so there it is the mean IoU.
- per category: the same mean over the rows of the category (`row_category`); the overall
  number is their row-weighted mean, not their plain mean.
- CV-Bench also gets its own combined score (the dataset card's definition): 2D = mean of the
  ADE20K and COCO accuracies, 3D = the Omni3D accuracy, overall = (2D + 3D) / 2. The GPG paper's
  CV-Bench "Total" column is instead the micro average over the 2638 rows (its SFT, GRPO and
  GPG rows reproduce exactly from the per-task columns weighted by the task sizes), which is
  `accuracy` here.
- MathVista also reports accuracy per question type (multi_choice / free_form) and per
  answer type, besides the per-task categories.

Deliberately left out: GPT-based answer extraction (MathVista's official scorer uses one; we
score with the training reward only) and multi-GPU sharding of the evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from gpg_vlm.models.adapter import AdapterError, VLMAdapter
from gpg_vlm.data import DataError, load_benchmark, load_rows
from gpg_vlm.data.loading import check_images
from gpg_vlm.tasks import evaluate_rows, fitting_rows


# ----------------------------------------------------------------------------- gpg-vlm eval

BENCHMARK_NAMES = ("cvbench", "sat", "superclevr", "geoqa", "mathvista", "refcoco", "lisa",
                   "fewshot", "fashion-mnist", "jsonl")
SCHEMA_FILES = ("fashion-mnist", "jsonl")  # files already in the gpg_vlm schema
DEFAULT_TEMPLATE = ("{problem} Output the thinking process in <think> </think> and the final "
                    "answer in <answer> </answer> tags.")
# extra fields a benchmark is also broken down by, besides its category
GROUP_FIELDS = {"mathvista": ("question_type", "answer_type"), "cvbench": ("type", "source")}


class EvalError(Exception):
    """A problem with the command's inputs; main prints it as one line and returns 2."""


def load_eval_rows(benchmark: str, data: str, image_root: str | None = None,
                   limit: int | None = None):
    """The rows of `data` read as `benchmark`, the first `limit` of them, images checked.

    Images are decoded only for the rows kept, so `--limit 20` on a large benchmark is quick,
    and a missing image fails here, naming its row, rather than in the middle of a batch.
    """
    if benchmark not in BENCHMARK_NAMES:
        raise EvalError(f"unknown benchmark {benchmark!r}; valid names: {', '.join(BENCHMARK_NAMES)}")
    try:
        found = Path(data).exists()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        raise EvalError(f"data {str(data)[:200]}: cannot use this path: {exc}") from None
    if not found:
        raise EvalError(f"data {data}: no such file or folder")
    try:
        if benchmark in SCHEMA_FILES:
            if image_root is not None:
                raise EvalError(f"--image-root applies to published benchmark files; {benchmark} "
                                "rows resolve their images against the data file's folder")
            rows = load_rows(data, check_images=False)
        else:
            rows = load_benchmark(benchmark, data, image_root=image_root, check_images=False)
        rows = list(rows)[:limit] if limit is not None else list(rows)
        for row in rows:
            check_images(row)
    except DataError as exc:
        raise EvalError(str(exc)) from None
    except OSError as exc:
        raise EvalError(f"data {data}: cannot read: {exc.strerror or exc}") from None
    if not rows:
        raise EvalError(f"data {data}: no rows to evaluate")
    return rows


def _mean_by(items: list[dict], keys: list) -> dict:
    """{key: {"n", "accuracy"}} over the items, in sorted key order (None keys left out)."""
    sums: dict = defaultdict(float)
    counts: dict = defaultdict(int)
    for item, key in zip(items, keys):
        if key is not None:
            sums[str(key)] += item["reward"]
            counts[str(key)] += 1
    return {k: {"n": counts[k], "accuracy": sums[k] / counts[k]} for k in sorted(counts)}


def cvbench_scores(sources: dict) -> dict | None:
    """CV-Bench's combined accuracy from its per-source accuracies (None if a source is absent)."""
    if not all(s in sources for s in ("ADE20K", "COCO", "Omni3D")):
        return None
    two_d = (sources["ADE20K"]["accuracy"] + sources["COCO"]["accuracy"]) / 2
    three_d = sources["Omni3D"]["accuracy"]
    return {"2D": two_d, "3D": three_d, "overall": (two_d + three_d) / 2}


def summarize(benchmark: str, rows, result: dict, completions: int) -> dict:
    """The summary of `evaluate_rows`' result: overall, per category, benchmark extras."""
    items = result["items"]
    summary = {"benchmark": benchmark, "n": result["n"], "accuracy": result["accuracy"]}
    if completions > 1:
        summary[f"pass@{completions}"] = result[f"pass@{completions}"]
    summary["categories"] = _mean_by(items, [it["category"] for it in items])
    groups = {}
    for name in GROUP_FIELDS.get(benchmark, ()):
        groups[name] = _mean_by(items, [row.extra.get(name) for row in rows])
    if groups:
        summary["groups"] = groups
    if benchmark == "cvbench":
        summary["cvbench"] = cvbench_scores(groups.get("source", {}))
    return summary


def records(rows, result: dict) -> list[dict]:
    """One JSON-ready record per row: where it came from, its solution and its completions."""
    out = []
    for row, item in zip(rows, result["items"]):
        out.append({"source": row.source, "category": item["category"],
                    "solution": row.solution, "reward": item["reward"],
                    "rewards": item["rewards"], "completions": item["completions"]})
    return out


def markdown(summary: dict, model: str) -> str:
    """results.md: one table of categories, then the benchmark's extra numbers."""
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    lines = [f"# {summary['benchmark']}: {model}", "", "| category | n | accuracy (%) |",
             "|---|---:|---:|"]
    for name, c in summary["categories"].items():
        lines.append(f"| {name} | {c['n']} | {pct(c['accuracy'])} |")
    lines.append(f"| **all** | {summary['n']} | **{pct(summary['accuracy'])}** |")
    for key in (k for k in summary if k.startswith("pass@")):
        lines += ["", f"{key}: {pct(summary[key])}%"]
    for field_name, table in summary.get("groups", {}).items():
        lines += ["", f"| {field_name} | n | accuracy (%) |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['n']} | {pct(v['accuracy'])} |" for k, v in table.items()]
    if summary.get("cvbench"):
        cv = summary["cvbench"]
        lines += ["", f"CV-Bench combined (dataset card): 2D {pct(cv['2D'])}, 3D {pct(cv['3D'])}, "
                      f"overall {pct(cv['overall'])}"]
    lines += ["", "Accuracy is the mean training reward (for grounding rows: the mean IoU)."]
    return "\n".join(lines) + "\n"


def _parser():
    p = argparse.ArgumentParser(prog="gpg-vlm eval", description="Evaluate a checkpoint on a benchmark "
                                "with the training rewards; writes OUT/results.json and OUT/results.md.")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--benchmark", required=True, help=f"one of: {', '.join(BENCHMARK_NAMES)}")
    p.add_argument("--data", required=True, help="the benchmark's record file (a folder for lisa)")
    p.add_argument("--image-root", default=None, help="folder the images are under (default: the data's folder)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--completions", type=int, default=1,
                   help="K completions per row; K > 1 also reports pass@K")
    p.add_argument("--samples", dest="old_samples", default=None, help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy; default 0 with one sample, 1.0 with K > 1")
    p.add_argument("--max-new-tokens", type=int, default=256, help="completion length limit")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="a longer prompt is a bad row (default: the model's context length minus --max-new-tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per generation batch")
    p.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="user text; {problem} is replaced")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype; auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (K > 1)")
    p.add_argument("--out", default=None, help="output folder (default: runs/eval/BENCHMARK)")
    return p


def _check_args(args) -> float:
    """Validate numbers and return the temperature to use."""
    if args.old_samples is not None:  # a "sample" is a prompt everywhere else in gpg_vlm
        raise EvalError("--samples was renamed to --completions (K completions per row)")
    for name in ("limit", "max_new_tokens", "max_prompt_tokens", "batch_size", "completions"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if "{problem}" not in args.prompt_template:
        raise EvalError("--prompt-template must contain {problem}")
    temperature = args.temperature
    if temperature is None:
        temperature = 1.0 if args.completions > 1 else 0.0
    if args.completions > 1 and temperature <= 0:
        raise EvalError(f"--completions {args.completions} needs --temperature > 0 (greedy completions "
                        "would all be the same)")
    if not Path(args.model).is_dir():
        raise EvalError(f"model directory {args.model} does not exist")
    if not (Path(args.model) / "config.json").is_file():
        raise EvalError(f"{args.model} has no config.json: not a transformers checkpoint")
    return temperature


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        temperature = _check_args(args)
        rows = load_eval_rows(args.benchmark, args.data, args.image_root, args.limit)
        dtype = args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        try:
            adapter = VLMAdapter.from_pretrained(args.model, dtype=dtype)
        except (AdapterError, OSError, ValueError) as exc:
            raise EvalError(f"cannot load model {args.model}: {exc}") from None
        adapter.model.eval()
        try:  # prompts too long for the model, or holding its special tokens: one line, no traceback
            rows = fitting_rows(adapter, rows, args.prompt_template, args.max_prompt_tokens,
                                args.max_new_tokens)
        except DataError as exc:
            raise EvalError(str(exc)) from None
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        result = evaluate_rows(adapter, rows, args.prompt_template, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, temperature=temperature,
                               completions=args.completions, generator=generator, progress=True)
    except EvalError as exc:
        print(f"gpg-vlm eval: {exc}", file=sys.stderr)
        return 2
    summary = summarize(args.benchmark, rows, result, args.completions)
    summary.update(model=str(args.model), data=str(args.data), completions=args.completions,
                   temperature=temperature, max_new_tokens=args.max_new_tokens,
                   prompt_template=args.prompt_template)
    out = Path(args.out or Path("runs") / "eval" / args.benchmark)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"summary": summary, "items": records(rows, result)}
    (out / "results.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False, default=str) + "\n",
                                      encoding="utf-8")
    (out / "results.md").write_text(markdown(summary, str(args.model)), encoding="utf-8")
    line = f"{args.benchmark}: accuracy {100 * summary['accuracy']:.2f}% on {summary['n']} rows"
    for key in (k for k in summary if k.startswith("pass@")):
        line += f", {key} {100 * summary[key]:.2f}%"
    if summary.get("cvbench"):
        line += f", CV-Bench combined {100 * summary['cvbench']['overall']:.2f}%"
    print(line)
    for name, c in summary["categories"].items():
        print(f"  {name}: {100 * c['accuracy']:.2f}% ({c['n']})")
    print(f"results in {out / 'results.json'} and {out / 'results.md'}")
    return 0
