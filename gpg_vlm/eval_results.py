"""The files `gpg-vlm eval` writes, in the shape lmms-eval's tools read.

OUT/samples_TASK.jsonl: one line per row, written as soon as its batch finishes (the resume
journal too): doc_id (row index), id (where the row came from), input (the prompt as the model
saw it), target, completions, extracted (the answer each completion gives) and extracted_by (the
extraction step that found it), rewards, reward (their mean), mode (strict or lenient), category,
truncated.

OUT/results.json: {"results": {TASK: {"alias", "METRIC,none", "METRIC_stderr,none", ...},
"TASK/FIELD=VALUE": {...}, ...}, "group_subtasks", "configs": {TASK: the settings used and where
each came from}, "n-samples": {TASK: {"original", "effective"}}, "versions", "model_path",
"date"}. Metric conventions:
- `accuracy` is the mean reward over all rows (micro average); for grounding rows the reward is
  the IoU, so there it is the mean IoU. Its standard error is the sample standard deviation
  over rows / sqrt(n), as lmms-eval computes it.
- each category (and, for MathVista, each question_type and answer_type; for CV-Bench, each type
  and source) is a sub-entry `TASK/FIELD=VALUE` with its own accuracy and standard error.
- CV-Bench: `official_total` is the dataset card's score, (2D + 3D) / 2 with 2D the mean of the
  ADE20K and COCO accuracies and 3D the Omni3D accuracy; `accuracy` stays the plain micro average
  over rows (what the GPG paper's "Total" column is: its rows reproduce from the per-task numbers
  weighted by task sizes). The standard error of the total combines the sources' independent
  standard errors: total = ADE/4 + COCO/4 + Omni3D/2.
- with n > 1 completions per row, `pass@k` for k = 1, 2, 4, ... below n and k = n, each with its
  standard error over rows. A completion is correct when its reward is 1 (a full score). pass@k
  is the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374): with c of a row's n completions
  correct, the chance that k of them drawn without replacement hold a correct one,
  1 - C(n - c, k) / C(n, k), averaged over rows. pass@n is "any completion correct"; pass@1 is
  the mean share of correct completions. The per-completion rewards are in the samples file.

Deliberately left out: lmms-eval's own task registry and YAML configs (our tasks are the
benchmark loaders of gpg_vlm.data) and any model-based judging.
"""

from __future__ import annotations

import json
import math
import platform
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

# extra fields a benchmark is also broken down by, besides its category
GROUP_FIELDS = {"mathvista": ("question_type", "answer_type"), "cvbench": ("type", "source")}


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean): sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that k of n completions, c of them correct, drawn without replacement hold a
    correct one: 1 - C(n - c, k) / C(n, k) (exact integers, so large n loses nothing)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k reported for n completions per row: powers of two below n, then n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i < n]
    return ks + [n]


def _entry(alias: str, items: list[dict], completions: int) -> dict:
    acc, se = mean_stderr([it["reward"] for it in items])
    entry = {"alias": alias, "accuracy,none": acc, "accuracy_stderr,none": se, "n": len(items)}
    if completions > 1:
        correct = [sum(r >= 1.0 for r in it["rewards"]) for it in items]
        for k in pass_ks(completions):
            p, pse = mean_stderr([pass_at_k(completions, c, k) for c in correct])
            entry[f"pass@{k},none"], entry[f"pass@{k}_stderr,none"] = p, pse
    return entry


def cvbench_total(items: list[dict], sources: list) -> dict | None:
    """{"official_total", "2D", "3D"} with standard errors (None if a source has no rows)."""
    by = defaultdict(list)
    for item, source in zip(items, sources):
        by[source].append(item["reward"])
    if not all(by.get(s) for s in ("ADE20K", "COCO", "Omni3D")):
        return None
    (ade, ade_se), (coco, coco_se), (omni, omni_se) = (mean_stderr(by[s]) for s in ("ADE20K", "COCO", "Omni3D"))
    two_d, two_d_se = (ade + coco) / 2, math.sqrt(ade_se ** 2 + coco_se ** 2) / 2
    return {"official_total": (two_d + omni) / 2,
            "official_total_stderr": math.sqrt(two_d_se ** 2 + omni_se ** 2) / 2,
            "2D": two_d, "2D_stderr": two_d_se, "3D": omni, "3D_stderr": omni_se}


def task_results(task: str, rows, items: list[dict], completions: int) -> tuple[dict, list[str]]:
    """(results entries, names of the sub-entries) for the scored `items` of `rows` (same order)."""
    results = {task: _entry(task, items, completions)}
    fields = [("category", [it["category"] for it in items])]
    fields += [(f, [row.extra.get(f) for row in rows]) for f in GROUP_FIELDS.get(task, ())]
    subtasks = []
    for field, keys in fields:
        groups = defaultdict(list)
        for item, key in zip(items, keys):
            if key is not None:
                groups[str(key)].append(item)
        for key in sorted(groups):
            name = f"{task}/{field}={key}"
            results[name] = _entry(f" - {field} {key}", groups[key], completions)
            subtasks.append(name)
    if task == "cvbench":
        total = cvbench_total(items, [row.extra.get("source") for row in rows])
        if total is not None:
            results[task].update({f"{k},none": v for k, v in total.items()})
    return results, subtasks


def sample_line(index: int, row, item: dict, mode: str) -> dict:
    """The samples_TASK.jsonl record of one row."""
    return {"doc_id": index, "id": row.source, "input": item["prompt"], "target": row.solution,
            "completions": item["completions"], "extracted": item["extracted"],
            "extracted_by": item["extracted_by"],
            "rewards": item["rewards"], "reward": item["reward"], "mode": mode,
            "category": item["category"], "truncated": item["truncated"]}


def versions() -> dict:
    """Versions of Python and the packages that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("gpg_vlm", "torch", "transformers", "peft", "safetensors", "pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def results_file(task: str, rows, items: list[dict], config: dict, original: int) -> dict:
    """The whole results.json object (items in row order, each with its row)."""
    results, subtasks = task_results(task, rows, items, config["completions"])
    return {"results": results, "group_subtasks": {task: subtasks}, "configs": {task: config},
            "n-samples": {task: {"original": original, "effective": len(items)}},
            "versions": versions(), "model_path": config["model"],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def markdown(task: str, payload: dict) -> str:
    """results.md: the task's metrics, then one table of its sub-entries."""
    res = payload["results"]
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    head = res[task]
    lines = [f"# {task}: {payload['model_path']}", "", "| metric | value (%) | stderr (%) |", "|---|---:|---:|"]
    for key in (k for k in head if k.endswith(",none") and "_stderr" not in k):
        metric = key[:-len(",none")]
        lines.append(f"| {metric} | {pct(head[key])} | {pct(head.get(f'{metric}_stderr,none', 0.0))} |")
    lines += ["", "| group | n | accuracy (%) | stderr (%) |", "|---|---:|---:|---:|"]
    for name in payload["group_subtasks"][task]:
        e = res[name]
        lines.append(f"| {name[len(task) + 1:]} | {e['n']} | {pct(e['accuracy,none'])} | "
                     f"{pct(e['accuracy_stderr,none'])} |")
    lines += ["", "Accuracy is the mean training reward (for grounding rows: the mean IoU); answers "
              f"read by {payload['configs'][task]['extract']} extraction."]
    if "official_total,none" in head:
        lines.append("CV-Bench official_total = (2D + 3D) / 2 (dataset card); accuracy = micro average.")
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj) -> None:
    """Write JSON through a temporary file, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
