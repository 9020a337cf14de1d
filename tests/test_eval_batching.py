"""Evaluation batched by a token budget: lengths from headers, the plan by hand, batching changes nothing."""

import pytest
from PIL import Image

from gpg_vlm.data.schema import Row
from gpg_vlm.models.family import FAMILIES
from gpg_vlm.tasks import evaluate_rows, plan_batches, prompt_tokens, samples_of

TEMPLATE = "{problem} Answer in <answer> </answer> tags."


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Rows of different prompt lengths: images of several sizes, one, two or no images."""
    root = tmp_path_factory.mktemp("batching")
    sizes = [(28, 28), (90, 40), (200, 150), (40, 300), (64, 64)]
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 100, 200)).save(root / f"{i}.png")
    out = []
    for i in range(len(sizes)):
        images = [str(root / f"{i}.png")] + ([str(root / f"{(i + 1) % 5}.png")] if i % 2 else [])
        out.append(Row(images=tuple(images), problem="How many? " * (i + 1), solution="3", task="counting",
                       source=f"rows:{i}"))
    out.append(Row(images=(), problem="What is 2 + 2?", solution="4", task="reasoning", source="rows:5"))
    return out


@pytest.mark.parametrize("family", tuple(FAMILIES))
def test_prompt_tokens_match_the_encoded_length(family, adapters, rows):
    adapter = adapters(family)
    expected = [int(adapter.encode(samples_of([r], TEMPLATE)).attention_mask.sum()) for r in rows]
    assert [prompt_tokens(adapter, r, TEMPLATE) for r in rows] == expected
    assert len(set(expected)) > 3  # the rows really differ in length


def test_plan_by_hand():
    # lengths 10, 50, 30, 20; max_new_tokens 10, K = 2, budget 200.
    # longest first: 50 (1 row costs 2 * 1 * 60 = 120; with 30: 2 * 2 * 60 = 240 > 200) alone;
    # then 30 (2 * 1 * 40 = 80), + 20 (2 * 2 * 40 = 160), + 10 (2 * 3 * 40 = 240 > 200) -> [2, 3];
    # then 10 alone.
    assert plan_batches([10, 50, 30, 20], 200, 2, 10) == [[1], [2, 3], [0]]
    # a row over the budget still gets its own batch; a huge budget is one batch
    assert plan_batches([500, 5], 100, 1, 10) == [[0], [1]]
    assert plan_batches([10, 50, 30, 20], 10 ** 6, 2, 10) == [[1, 2, 3, 0]]
    for budget in (50, 120, 300, 1000):
        lengths = [7, 33, 12, 90, 45, 45, 3]
        plan = plan_batches(lengths, budget, 3, 8)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        for b in plan:
            assert len(b) == 1 or 3 * len(b) * (max(lengths[i] for i in b) + 8) <= budget


def test_batched_completions_equal_one_row_at_a_time(adapters, rows):
    adapter = adapters("qwen2_vl")
    one = evaluate_rows(adapter, rows, TEMPLATE, max_new_tokens=6, token_budget=1)
    batched = evaluate_rows(adapter, rows, TEMPLATE, max_new_tokens=6, token_budget=10 ** 6)
    assert [i["completions"] for i in batched["items"]] == [i["completions"] for i in one["items"]]
    assert [i["source"] for i in batched["items"]] == [r.source for r in rows]  # row order kept
    assert batched["accuracy"] == one["accuracy"]
