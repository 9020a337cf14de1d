"""Dataset rows as the model and the rewards see them, for training and evaluation alike.

`samples_of` turns rows into prompts (the template around the problem, the row's images);
`reward_columns` builds the per-completion columns every reward receives; `fitting_rows` keeps
the rows whose prompts the loaded model can take (data.prompts); `row_category` is
the group a row is reported under; `evaluate_rows` scores rows greedily (or sampled) with the
accuracy reward, overall and per category. The trainer and the evaluator both import this module and
neither imports the other, so a training reward and an evaluation metric cannot drift apart.

Deliberately left out: loading rows (gpg_vlm.data) and the rewards themselves (gpg_vlm.rewards).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from gpg_vlm.data.prompts import check_prompts, prompt_counter, special_tokens_of
from gpg_vlm.models.batch import Sample
from gpg_vlm.rewards import accuracy_reward
from gpg_vlm.rollout import make_engine


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
    columns = {
        "solution": [rows[i].solution for i in prompt_index],
        "task": [rows[i].task for i in prompt_index],
        "choices": [rows[i].choices for i in prompt_index],
        "problem": [rows[i].problem for i in prompt_index],
        "image_size": first,
        "model_image_size": seen,
        "box_format": [box_format] * len(prompt_index),
    }
    # MathVista rounds float answers to a per-row precision; the column exists only when some
    # row carries one, so rewards of other datasets see exactly the columns they always did
    if any("precision" in rows[i].extra for i in set(prompt_index)):
        columns["precision"] = [rows[i].extra.get("precision") for i in prompt_index]
    return columns


def fitting_rows(adapter, rows, prompt_template: str, max_prompt_tokens: int | None,
                 max_new_tokens: int, on_bad_row: str = "error"):
    """The rows whose prompts this model can take: no special token of its tokenizer, at most
    `max_prompt_tokens` tokens (None: its context length minus `max_new_tokens`). Others are
    bad rows (DataError naming the row, or skipped and counted under on_bad_row="skip")."""
    limit = max_prompt_tokens
    if limit is None:
        context = getattr(adapter.model.config.get_text_config(), "max_position_embeddings", None)
        limit = context - max_new_tokens if context else None
    count = prompt_counter(adapter.tokenizer, prompt_template, adapter.factor, adapter.min_pixels,
                           adapter.max_pixels)
    return check_prompts(rows, count, limit, special_tokens_of(adapter.tokenizer), on_bad_row)


def samples_of(rows, prompt_template: str) -> list[Sample]:
    """One prompt (a `Sample`) per dataset row: the template around the problem, the row's images."""
    return [Sample(prompt_template.replace("{problem}", r.problem), r.load_images(), r.system)
            for r in rows]


def evaluate_rows(adapter, rows, prompt_template: str, max_new_tokens: int = 64,
                  batch_size: int = 32, temperature: float = 0.0, completions: int = 1,
                  generator=None, progress: bool = False) -> dict:
    """Accuracy (mean accuracy reward) overall and per category; greedy unless temperature > 0.

    With `completions` = K > 1 (and temperature > 0) each row is sampled K times and also scored
    pass@K (any of the K completions correct).
    """
    totals, counts, passes = defaultdict(float), defaultdict(int), defaultdict(float)
    items = []
    engine = make_engine("hf", adapter)
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="eval"):
            chunk = rows[start:start + batch_size]
            batch = adapter.encode(samples_of(chunk, prompt_template))
            rollout = engine.generate(batch, completions, max_new_tokens=max_new_tokens,
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
                              "reward": mean, "rewards": mine, "completions": texts})
    result = {"accuracy": totals["all"] / max(1, counts["all"]), "n": counts["all"]}
    for key in sorted(k for k in counts if k != "all"):
        result[f"accuracy/{key}"] = totals[key] / counts[key]
    if completions > 1:
        result[f"pass@{completions}"] = passes["all"] / max(1, counts["all"])
    result["items"] = items
    return result
