"""Real benchmark answer formats (../shared/benchmarks, skipped when absent).

Every ground truth must score 1.0 against itself, and hand-altered values must score 0.
"""

import json
from pathlib import Path

import pytest

from gpg_vlm.rewards import classification_reward, reasoning_reward

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"


def _need(name: str) -> Path:
    path = BENCH / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in _need(name).read_text(encoding="utf-8").splitlines() if line]


def test_geoqa_ground_truths_score_themselves():
    gts = [row["ground_truth"] for row in _jsonl("geoqa_test_prompts.jsonl")]
    assert len(gts) == 754
    got = reasoning_reward([f"<think>...</think><answer>{g}</answer>" for g in gts], solution=gts)
    assert [g for g, r in zip(gts, got) if r != 1.0] == []


@pytest.mark.parametrize("answer,solution", [
    ("141°", "140°"), ("8√{2}", "8√{3}"), ("3√{3}cm", "2√{3}cm"), ("\\frac{3}{4}", "\\frac{4}{3}"),
    ("2π", "3π"), ("2√{2}+2", "2√{2}-2"), ("16平方米", "16π平方米"), ("140° or 40°", "140°"),
])
def test_geoqa_altered_values_score_zero(answer, solution):
    assert reasoning_reward([f"<answer>{answer}</answer>"], solution=[solution]) == [0.0]


def test_superclevr_counts():
    rows = _jsonl("superclevr_test200_counting_problems.jsonl")
    gts = [row["ground_truth"] for row in rows]
    own = reasoning_reward([f"<answer>{g}</answer>" for g in gts], solution=gts)
    off = reasoning_reward([f"<answer>{g + 1}</answer>" for g in gts], solution=gts)
    think = reasoning_reward([f"<think>{g}</think><answer></answer>" for g in gts], solution=gts)
    assert own == [1.0] * len(gts) and off == [0.0] * len(gts) and think == [0.0] * len(gts)


def test_mathvista_answers_score_themselves():
    items = list(json.loads(_need("mathvista_testmini.json").read_text(encoding="utf-8")).values())
    got = reasoning_reward(
        [f"<answer>{x['answer']}</answer>" for x in items],
        solution=[x["answer"] for x in items], choices=[x["choices"] for x in items],
        precision=[x["precision"] for x in items],
    )
    assert [x["pid"] for x, r in zip(items, got) if r != 1.0] == []
    # multiple choice by letter, and a wrong letter
    # Items whose choice texts are letters themselves ("(a)", "(b)", ...) are ambiguous: the
    # text of a choice is read before a letter, so they are left out of the letter check.
    mc = [x for x in items if x["choices"] and not any(len(c.strip("() ")) == 1 for c in x["choices"])]
    letters = [chr(65 + x["choices"].index(x["answer"])) for x in mc]
    wrong = [chr(65 + (x["choices"].index(x["answer"]) + 1) % len(x["choices"])) for x in mc]
    kw = dict(solution=[x["answer"] for x in mc], choices=[x["choices"] for x in mc])
    by_letter = reasoning_reward([f"<answer>({c})</answer>" for c in letters], **kw)
    by_wrong = reasoning_reward([f"<answer>{c}</answer>" for c in wrong], **kw)
    assert by_letter == [1.0] * len(mc)
    # a wrong letter can still be right when two choices have the same text
    dupes = [i for i, x in enumerate(mc) if len({c.strip().lower() for c in x["choices"]}) < len(x["choices"])]
    assert [i for i, r in enumerate(by_wrong) if r != 0.0 and i not in dupes] == []


def test_classification_class_lists_score_themselves():
    for name in ("pets.txt", "oxford_flowers.txt", "fgvc_aircraft.txt", "stanford_cars.txt"):
        classes = [c for c in _need(name).read_text(encoding="utf-8").splitlines() if c]
        got = classification_reward([f"<answer>{c}</answer>" for c in classes], solution=classes)
        assert got == [1.0] * len(classes), name
        # every other class of the list must score 0 (no two names normalise alike)
        shifted = classes[1:] + classes[:1]
        assert classification_reward([f"<answer>{c}</answer>" for c in shifted], solution=classes) == [0.0] * len(classes)
