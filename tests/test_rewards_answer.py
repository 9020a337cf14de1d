"""Answer extraction and format_reward: table-driven, including malformed and adversarial text."""

import pytest

from gpg_vlm.rewards import extract_answer, format_reward
from gpg_vlm.rewards.answer import completion_text, strip_think

ANSWERS = [
    # (completion, accept_bare, expected answer)
    ("<think>r</think><answer>5</answer>", False, "5"),
    ("<ANSWER>\n  5\n</Answer>", False, "5"),
    ("<answer>4</answer> then <answer>5</answer>", False, "5"),  # the last one wins
    ("<answer>a<answer>b</answer>", False, "b"),  # a second open restarts the pair
    ("<answer><answer>5</answer></answer>", False, "5"),  # nested: the inner pair
    ("<answer>5</answer><answer>6", False, "5"),  # unclosed trailing tag ignored
    ("<answer>6", False, None),
    ("</answer>5<answer>", False, None),
    ("<think>the answer is 5</think>", False, None),  # nothing read from think
    ("<think><answer>5</answer></think>", False, None),
    ("<think><answer>5</answer></think><answer>6</answer>", False, "6"),
    ("<think>x<answer>5</answer>", False, None),  # unclosed think runs to the end
    ("reasoning <answer>5</answer></think><answer>6</answer>", False, "6"),  # Qwen3 template
    ("<ans<think>x</think>wer>5</answer>", False, None),  # blanking cannot glue a tag
    ("<answer>5<think>6</think></answer>", False, "5"),
    ("5", False, None),
    ("5", True, "5"),
    ("<think>3</think> 5 ", True, "5"),
    ("<answer>5", True, None),  # a stray tag is not a bare answer
    ("", False, None),
    ("<answer></answer>", False, ""),
    ("<answer>猫</answer>", False, "猫"),
]


@pytest.mark.parametrize("completion,bare,expected", ANSWERS)
def test_extract_answer(completion, bare, expected):
    assert extract_answer(completion, accept_bare=bare) == expected


def test_conversational_completions_read_the_last_message():
    msgs = [{"role": "assistant", "content": "<answer>5</answer>"}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "<answer>7</answer>"}]}]
    assert extract_answer(msgs) == "5"
    assert extract_answer(parts) == "7"
    assert completion_text(None) == "" and completion_text(42) == "" and completion_text([]) == ""


def test_strip_think_keeps_text_outside_blocks():
    assert strip_think("a<think>b</think>c") == "a c"
    assert strip_think("a</think>c") == " c"
    assert strip_think("<think>a<think>b</think>c</think>d") == "  d"


FORMATS = [
    # (completion, answer_only, expected)
    ("<think>r</think><answer>5</answer>", False, 1.0),
    ("  <think>\nr\n</think>\n\n<answer> 5 </answer>\n", False, 1.0),
    ("<THINK>r</THINK><Answer>5</Answer>", False, 1.0),
    ("<think></think><answer>5</answer>", False, 1.0),  # empty think allowed
    ("<think>r</think><answer> </answer>", False, 0.0),  # blank answer
    ("<answer>5</answer>", False, 0.0),
    ("<answer>5</answer>", True, 1.0),
    ("<think>r</think><answer>5</answer>", True, 1.0),
    ("x<think>r</think><answer>5</answer>", False, 0.0),  # text outside the blocks
    ("<think>r</think>x<answer>5</answer>", False, 0.0),
    ("<think>r</think><answer>5</answer>x", False, 0.0),
    ("<answer>5</answer><think>r</think>", False, 0.0),  # wrong order
    ("<think>r</think><answer>5</answer><answer>6</answer>", False, 0.0),
    ("<think>r<think>s</think></think><answer>5</answer>", False, 0.0),
    ("<think>r</think><answer><answer>5</answer></answer>", False, 0.0),
    ("<think>r</think><answer>5", False, 0.0),
    ("r</think><answer>5</answer>", False, 0.0),
    ("", False, 0.0),
]


@pytest.mark.parametrize("completion,answer_only,expected", FORMATS)
def test_format_reward(completion, answer_only, expected):
    assert format_reward([completion], answer_only=answer_only) == [expected]


def test_format_reward_is_linear_on_huge_adversarial_text():
    import time

    text = "<think>" + "</think><answer>x" * 50_000
    start = time.perf_counter()
    assert format_reward([text, "<think>" + "a" * 10**6 + "</think><answer>1</answer>"]) == [0.0, 1.0]
    assert extract_answer("<answer>" * 100_000 + "1</answer>") == "1"
    assert time.perf_counter() - start < 2.0
