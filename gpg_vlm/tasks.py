"""Dataset rows as the model and the rewards see them, for training and evaluation alike.

`samples_of` turns rows into prompts (the template around the problem, the row's images);
`reward_columns` builds the per-completion columns every reward receives; `fitting_rows` keeps
the rows whose prompts the loaded model can take (data.prompts); `row_category` is
the group a row is reported under; `evaluate_rows` scores rows greedily (or sampled) with the
accuracy reward, overall and per category, built on `scored_batches`, which the evaluation
command also uses to write items as they finish. The trainer and the evaluator both import this
module and neither imports the other, so a training reward and an evaluation metric cannot drift apart.

Generation is batched by a token budget (`plan_batches`): rows are sorted by prompt length
(measured from the image headers, nothing decoded) and packed into generate calls whose padded
size, completions x rows x (longest prompt + max_new_tokens), stays within the budget. The plan
depends only on the rows and the settings, and each batch samples with its own seed, so a resumed
evaluation that skips finished batches produces the same completions as an uninterrupted one.

Deliberately left out: loading rows (gpg_vlm.data) and the rewards themselves (gpg_vlm.rewards).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from gpg_vlm.data.prompts import check_prompts, prompt_counter, special_tokens_of
from gpg_vlm.models.batch import Sample
from gpg_vlm.resize import smart_resize
from gpg_vlm.rewards import accuracy_reward
from gpg_vlm.rewards.extract import MODES as EXTRACT_MODES, as_tagged, extract
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


# padded tokens per generate call (prompt + completion, all rows): the KV cache of Qwen2.5-VL-7B
# (28 layers, 4 KV heads of 128, bf16: 56 KiB a token) at 32768 tokens is 1.8 GiB, small beside
# the weights, while a call still holds dozens of image prompts
DEFAULT_TOKEN_BUDGET = 32768


def prompt_tokens(adapter, row, prompt_template: str) -> int:
    """The number of tokens `adapter.encode` gives the row's prompt, from image headers only."""
    sample = Sample(prompt_template.replace("{problem}", row.problem), [None] * len(row.images),
                    row.system)
    # rendered as adapter.encode renders it (tests/test_eval_batching.py checks they agree per family)
    text = adapter.tokenizer.apply_chat_template(adapter.messages(sample), tokenize=False,
                                                 chat_template=adapter.chat_template,
                                                 add_generation_prompt=True,
                                                 **dict(adapter.facts.template_kwargs))
    n = len(adapter.tokenizer(text, add_special_tokens=False)["input_ids"])
    for width, height in row.image_sizes:  # each placeholder becomes the image's merged patches
        h, w = smart_resize(height, width, adapter.factor, adapter.min_pixels, adapter.max_pixels)
        n += (h // adapter.factor) * (w // adapter.factor) - 1
    return n


def plan_batches(lengths: list[int], token_budget: int, completions: int,
                 max_new_tokens: int) -> list[list[int]]:
    """Row indices per generate call, longest prompts first (a memory error shows at once).

    A batch of n rows costs completions * n * (its longest prompt + max_new_tokens) padded
    tokens; rows join a batch while that stays <= token_budget. A row that alone exceeds the
    budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]  # sorted: the first is the longest
        if current and completions * (len(current) + 1) * (longest + max_new_tokens) > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def extraction_kind(row) -> str:
    """The kind gpg_vlm.rewards.extract reads a row's completions as (its last-line step differs)."""
    if row.task == "reasoning":
        return "choice" if row.choices else "math"
    return row.task if row.task in ("classification", "grounding") else "math"


def extracted(texts: list[str], rows: list, mode: str = "strict") -> tuple[list, list, list[str]]:
    """(answer per completion or None, the extraction step that found it, the texts the reward
    scores). Strict scores the completions as they are, exactly as in training; lenient scores
    the answer it found, wrapped in answer tags, so the reward and its normalisation stay the same."""
    if mode not in EXTRACT_MODES:
        raise ValueError(f"unknown extraction mode {mode!r}; valid: {', '.join(EXTRACT_MODES)}")
    found = [extract(t, mode, extraction_kind(r), choices=getattr(r, "choices", None),
                     question=getattr(r, "problem", None)) for t, r in zip(texts, rows)]
    scored = texts if mode == "strict" else [as_tagged(answer) for answer, _ in found]
    return [a for a, _ in found], [step for _, step in found], scored


def scored_batches(adapter, rows, prompt_template: str, *, max_new_tokens: int, temperature: float = 0.0,
                   completions: int = 1, seed: int = 0, token_budget: int = DEFAULT_TOKEN_BUDGET,
                   skip=frozenset(), extract: str = "strict", progress: bool = False, engine=None):
    """Yield, per generate call, a list of (row index, item) for the rows not in `skip`.

    An item is {"category", "reward" (mean over the K completions), "rewards", "completions",
    "extracted", "extracted_by", "truncated", "prompt"}; `extract` is "strict" (the training
    reward's reading) or "lenient" (gpg_vlm.rewards.extract, for models that ignore the format). Batch k samples with a generator seeded (seed, k).
    `engine` is the rollout engine that generates (default: the HF loop over `adapter`'s model);
    the caller that passes one also closes it.
    """
    lengths = [prompt_tokens(adapter, row, prompt_template) for row in rows]
    plan = plan_batches(lengths, token_budget, completions, max_new_tokens)
    todo = [(k, batch) for k, batch in enumerate(plan) if not set(batch) <= set(skip)]
    engine = engine or make_engine("hf", adapter)
    with torch.no_grad(), tqdm(total=sum(len(b) for _, b in todo), disable=not progress,
                               desc="eval") as bar:
        for k, batch_rows in todo:
            chunk = [rows[i] for i in batch_rows]
            batch = adapter.encode(samples_of(chunk, prompt_template))
            generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + k)
            rollout = engine.generate(batch, completions, max_new_tokens=max_new_tokens,
                                      temperature=temperature, generator=generator)
            index = rollout.prompt_index.tolist()
            answers, steps, scored = extracted(rollout.texts, [chunk[p] for p in index], extract)
            scores = accuracy_reward(scored, **reward_columns(chunk, batch, index, adapter.box_format))
            out = []
            for j, (i, row) in enumerate(zip(batch_rows, chunk)):
                mine = [n for n, p in enumerate(index) if p == j]  # this row's K completions
                rewards = [float(scores[n]) for n in mine]
                out.append((i, {"category": row_category(row), "reward": sum(rewards) / len(rewards),
                                "rewards": rewards, "completions": [rollout.texts[n] for n in mine],
                                "extracted": [answers[n] for n in mine],
                                "extracted_by": [steps[n] for n in mine],
                                "truncated": [bool(rollout.truncated[n]) for n in mine],
                                "prompt": batch.texts[j]}))
            bar.update(len(out))
            yield out


def evaluate_rows(adapter, rows, prompt_template: str, max_new_tokens: int = 64,
                  temperature: float = 0.0, completions: int = 1, seed: int = 0,
                  token_budget: int = DEFAULT_TOKEN_BUDGET, progress: bool = False) -> dict:
    """Accuracy (mean accuracy reward) overall and per category; greedy unless temperature > 0.

    With `completions` = K > 1 (and temperature > 0) each row is sampled K times and also scored
    pass@K (any of the K completions correct). `items` are in row order.
    """
    found = {}
    for batch in scored_batches(adapter, rows, prompt_template, max_new_tokens=max_new_tokens,
                                temperature=temperature, completions=completions, seed=seed,
                                token_budget=token_budget, progress=progress):
        found.update(batch)
    items = [dict(found[i], source=row.source) for i, row in enumerate(rows)]
    return aggregate(items, completions)


def aggregate(items: list[dict], completions: int) -> dict:
    """{"accuracy", "n", "accuracy/CATEGORY"..., "pass@K" (K > 1), "items"} of scored items."""
    totals, counts, passes = defaultdict(float), defaultdict(int), defaultdict(float)
    for item in items:
        for key in ("all", item["category"]):
            totals[key] += item["reward"]
            counts[key] += 1
            passes[key] += float(max(item["rewards"]) >= 1.0)
    result = {"accuracy": totals["all"] / max(1, counts["all"]), "n": counts["all"]}
    for key in sorted(k for k in counts if k != "all"):
        result[f"accuracy/{key}"] = totals[key] / counts[key]
    if completions > 1:
        result[f"pass@{completions}"] = passes["all"] / max(1, counts["all"])
    result["items"] = items
    return result
