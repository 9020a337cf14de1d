"""The public surface: TRL signature, columns, accuracy dispatch, resolve_reward, light import."""

import functools
import subprocess
import sys
import threading

import pytest

import gpg_vlm.rewards as rewards
from gpg_vlm.rewards import (
    accuracy_reward, classification_reward, format_reward, grounding_reward, reasoning_reward,
    resolve_reward,
)


def test_import_is_pure_python():
    code = (
        "import sys, gpg_vlm.rewards, gpg_vlm.rewards.grounding; "
        "print(','.join(m for m in ('torch', 'transformers', 'math_verify', 'sympy') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""  # math-verify (and sympy) load only when first needed


def test_trl_style_call_ignores_extra_columns():
    # TRL passes prompts, completion_ids, trainer_state and every dataset column
    got = reasoning_reward(
        ["<answer>4</answer>", "<answer>5</answer>"],
        prompts=["p", "p"], completion_ids=[[1], [2]], trainer_state=object(),
        solution=[4, 4], image_path=["a.png", "a.png"],
    )
    assert got == [1.0, 0.0]


def test_column_length_mismatch_is_a_programming_error():
    with pytest.raises(ValueError, match="image_path"):
        format_reward(["a", "b"], image_path=["x"])
    with pytest.raises(ValueError, match="choices"):
        reasoning_reward(["a", "b"], solution=[1, 1], choices=[["1", "2"]])


def test_empty_batch():
    for fn in (format_reward, classification_reward, reasoning_reward):
        assert fn([], solution=[]) == []
    assert grounding_reward([], [], [], box_format="abs") == []


def test_accuracy_dispatches_per_row():
    completions = [
        "<answer>4</answer>", "<answer>four</answer>", "<answer>cat</answer>",
        "<answer>[0, 0, 500, 500]</answer>", "<answer>C</answer>", "<answer>dog</answer>",
    ]
    got = accuracy_reward(
        completions,
        task=["counting", "reasoning", "classification", "grounding", "reasoning", "classification"],
        solution=[4, 4, "cat", [0, 0, 50, 100], "(C)", "cat"],
        choices=[None, None, None, None, ["3", "2", "1"], None],
        image_size=[None, None, None, (100, 200), None, None],
        box_format=[None, None, None, "rel1000", None, None],  # 500/1000 of 100 x 200
        iou_threshold=0.5,
    )
    assert got == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_accuracy_unknown_task_names_the_row():
    with pytest.raises(ValueError, match="row 1: unknown task 'ocr'"):
        accuracy_reward(["a", "b"], task=["reasoning", "ocr"], solution=[1, 1])


@pytest.mark.parametrize("name,fn", [
    ("accuracy", accuracy_reward), ("format", format_reward),
    ("classification", classification_reward), ("reasoning", reasoning_reward),
    ("grounding", grounding_reward),
])
def test_resolve_builtin(name, fn):
    assert resolve_reward(name) is fn


def test_resolve_user_function_and_options():
    assert resolve_reward("gpg_vlm.rewards:format_reward") is format_reward
    thresholded = resolve_reward("grounding", iou_threshold=0.5, box_format="abs")
    assert isinstance(thresholded, functools.partial) and thresholded.__name__ == "grounding_reward"
    assert thresholded(["<answer>[0,0,2,1]</answer>"], [[0, 0, 2, 2]], [(4, 4)]) == [1.0]


@pytest.mark.parametrize("spec,message", [
    ("acuracy", "unknown reward 'acuracy'; use one of \\['accuracy', 'classification'"),
    ("no_such_package.mod:fn", "reward 'no_such_package.mod:fn': cannot import module"),
    ("gpg_vlm.rewards:no_such_fn", "has no function 'no_such_fn'"),
    ("gpg_vlm.rewards:", "expected 'package.module:function'"),
])
def test_resolve_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward(spec)


def test_resolve_rejects_misspelled_option():
    with pytest.raises(ValueError, match="iou_treshold"):
        resolve_reward("grounding", iou_treshold=0.5)


def test_math_verify_works_in_threads():
    results = []

    def work():
        results.append(reasoning_reward(["<answer>x+1</answer>"], solution=["1+x"]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[1.0]] * 4


def test_without_math_verify_numbers_still_work(monkeypatch):
    from gpg_vlm.rewards import reasoning

    monkeypatch.setattr(reasoning, "_HAS_MATH_VERIFY", False)  # as if the package were not installed
    assert reasoning_reward(
        ["<answer>8\\sqrt{3}</answer>", "<answer>x+1</answer>", "<answer>x+1</answer>"],
        solution=["8√{3}", "x+1", "1+x"],
    ) == [1.0, 1.0, 0.0]


def test_public_names():
    assert set(rewards.__all__) >= {
        "format_reward", "classification_reward", "reasoning_reward", "grounding_reward",
        "accuracy_reward", "resolve_reward",
    }


HUGE = [
    "<answer>" + " " * 200_000 + "x</answer>",
    "<answer>answer is" + " " * 200_000 + "x</answer>",
    "<answer>(1,2)" + " " * 200_000 + "x</answer>",
    "<answer>" + "[1, 2, 3, " * 50_000 + "</answer>",
    "<answer>" + "(" * 100_000 + "1" + ")" * 100_000 + "</answer>",
    "<answer>" + "9" * 200_000 + "</answer>",
    "<think>" + "7 " * 100_000 + "</think><answer>" + "猫" * 100_000 + "</answer>",
    "<answer>2^{10^{10}}</answer>",
    "<answer>\\binom{1000000}{500000}</answer>",
    "<answer>1000000!</answer>",
]


def test_huge_and_pathological_answers_are_fast_and_score_zero():
    import time

    start = time.perf_counter()
    n = len(HUGE)
    assert format_reward(HUGE) == [0.0] * 6 + [1.0] + [0.0] * 3  # only one has a think block
    assert classification_reward(HUGE, solution=["cat"] * n) == [0.0] * n
    assert reasoning_reward(HUGE, solution=["1"] * n) == [0.0] * n
    assert reasoning_reward(HUGE, solution=["1"] * n, choices=[["1", "2"]] * n) == [0.0] * n
    assert grounding_reward(HUGE, [[0, 0, 1, 1]] * n, [(10, 10)] * n, box_format="abs") == [0.0] * n
    assert time.perf_counter() - start < 5.0
