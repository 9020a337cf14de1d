"""Evaluation: greedy (or sampled) completions scored by the very rewards used in training.

`reward_columns` builds the per-completion columns every reward receives, for the trainer
and for evaluation alike, so a training reward and an evaluation metric cannot drift apart.
`evaluate_rows` scores rows and reports accuracy overall and per category (a benchmark's own
grouping: CV-Bench task, MathVista question type, Fashion-MNIST suite task).
"""

from __future__ import annotations

from collections import defaultdict


def row_category(row) -> str:
    """The group a row is reported under: the benchmark's category, else its task."""
    return str(row.extra.get("category") or row.extra.get("suite_task") or row.task)


def reward_columns(rows, batch, prompt_index: list[int], box_format: str) -> dict:
    """Dataset columns repeated per completion, plus the image frames grounding needs.

    `rows[i]` and prompt i of `batch` are the same prompt; `prompt_index` maps each completion
    to its prompt.
    """
    first = [batch.image_sizes[i][0] if batch.image_sizes[i] else None for i in prompt_index]
    seen = [batch.model_image_sizes[i][0] if batch.model_image_sizes[i] else None
            for i in prompt_index]
    return {
        "solution": [rows[i].solution for i in prompt_index],
        "task": [rows[i].task for i in prompt_index],
        "choices": [rows[i].choices for i in prompt_index],
        "problem": [rows[i].problem for i in prompt_index],
        "image_size": first,
        "model_image_size": seen,
        "box_format": [box_format] * len(prompt_index),
    }


def samples_of(rows, prompt_template: str):
    """Adapter samples for dataset rows: the template around the problem, the row's images."""
    from gpg_vlm.adapter import Sample

    return [Sample(prompt_template.replace("{problem}", r.problem), r.load_images(), r.system)
            for r in rows]


def evaluate_rows(adapter, rows, prompt_template: str, max_new_tokens: int = 64,
                  batch_size: int = 32, temperature: float = 0.0, samples: int = 1,
                  generator=None, progress: bool = False) -> dict:
    """Accuracy (mean accuracy reward) overall and per category; greedy unless temperature > 0.

    With `samples` = K > 1 (and temperature > 0) each row is sampled K times and also scored
    pass@K (any of the K completions correct).
    """
    import torch
    from tqdm.auto import tqdm

    from gpg_vlm.rewards import accuracy_reward

    totals, counts, passes = defaultdict(float), defaultdict(int), defaultdict(float)
    items = []
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="eval"):
            chunk = rows[start:start + batch_size]
            batch = adapter.encode(samples_of(chunk, prompt_template))
            rollout = adapter.generate(batch, samples, max_new_tokens=max_new_tokens,
                                       temperature=temperature, generator=generator)
            index = rollout.prompt_index.tolist()
            scores = accuracy_reward(rollout.texts, **reward_columns(chunk, batch, index,
                                                                     adapter.box_format))
            for k, row in enumerate(chunk):
                mine = [s for i, s in zip(index, scores) if i == k]
                texts = [t for i, t in zip(index, rollout.texts) if i == k]
                mean = sum(mine) / len(mine)
                for key in ("all", row_category(row)):
                    totals[key] += mean
                    counts[key] += 1
                    passes[key] += float(max(mine) >= 1.0)
                items.append({"source": row.source, "category": row_category(row),
                              "reward": mean, "completions": texts})
    result = {"accuracy": totals["all"] / max(1, counts["all"]), "n": counts["all"]}
    for key in sorted(k for k in counts if k != "all"):
        result[f"accuracy/{key}"] = totals[key] / counts[key]
    if samples > 1:
        result[f"pass@{samples}"] = passes["all"] / max(1, counts["all"])
    result["items"] = items
    return result
