"""Property tests: no input raises, values stay in range, results are deterministic."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpg_vlm.rewards import (
    classification_reward, format_reward, grounding_reward, reasoning_reward,
)
from gpg_vlm.rewards.grounding import giou, iou

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text biased towards the characters that matter: tags, digits, maths and box syntax.
pieces = st.sampled_from([
    "<answer>", "</answer>", "<think>", "</think>", "<ANSWER>", "(", ")", "[", "]", "{", "}",
    ",", "√", "π", "\\frac", "\\sqrt", "^", "°", "=", "-", ".", " ", "or", "cm", "C", "(C)",
    "bbox_2d", "<|box_start|>", "<|box_end|>", "1", "7", "42", "1000", "猫", "\n", "$",
])
texts = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(pieces, st.text(string.printable, max_size=3)), max_size=30).map("".join),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), texts,
)
values = st.one_of(scalars, st.lists(scalars, max_size=5), st.lists(st.lists(scalars, max_size=5), max_size=3))


def _check(fn, completions, **columns):
    first = fn(completions, **columns)
    assert first == fn(completions, **columns)  # deterministic
    assert len(first) == len(completions)
    assert all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in first)


@FAST
@given(st.lists(texts, max_size=4), st.booleans())
def test_format_never_raises(completions, answer_only):
    _check(format_reward, completions, answer_only=answer_only)


@FAST
@given(st.lists(st.tuples(texts, values), max_size=4), st.booleans())
def test_classification_never_raises(rows, bare):
    _check(classification_reward, [c for c, _ in rows], solution=[s for _, s in rows], accept_bare=bare)


@FAST
@given(st.lists(st.tuples(texts, values, values, scalars), max_size=4))
def test_reasoning_never_raises(rows):
    _check(
        reasoning_reward, [f"<answer>{c}</answer>" for c, *_ in rows],
        solution=[r[1] for r in rows], choices=[r[2] for r in rows], precision=[r[3] for r in rows],
    )


@FAST
@given(st.lists(st.tuples(texts, values, values, values, st.sampled_from(["abs", "rel1000", "abs_resized", "bad", None])), max_size=4), scalars)
def test_grounding_never_raises(rows, threshold):
    _check(
        grounding_reward, [f"<answer>{r[0]}</answer>" for r in rows],
        solution=[r[1] for r in rows], image_size=[r[2] for r in rows],
        model_image_size=[r[3] for r in rows], box_format=[r[4] for r in rows],
        iou_threshold=threshold,
    )


coords = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
boxes = st.tuples(coords, coords, coords, coords)


@FAST
@given(boxes, boxes)
def test_iou_giou_ranges_and_symmetry(a, b):
    assert 0.0 <= iou(a, b) <= 1.0 and iou(a, b) == iou(b, a)
    assert -1.0 <= giou(a, b) <= iou(a, b) + 1e-12
    assert abs(giou(a, b) - giou(b, a)) < 1e-9


@FAST
@given(st.integers(0, 900), st.integers(0, 900), st.integers(1, 100), st.integers(1, 100),
       st.integers(1, 4000), st.integers(1, 4000))
def test_a_box_in_its_own_frame_scores_one(x, y, w, h, width, height):
    # A ground-truth box, written back in each frame by hand, must score IoU 1 (up to rounding
    # of the written numbers, so compare with float writes).
    gt = [x * width / 1000, y * height / 1000, (x + w) * width / 1000, (y + h) * height / 1000]
    rel = f"<answer>({x},{y}),({x + w},{y + h})</answer>"
    got = grounding_reward([rel], [gt], [(width, height)], box_format="rel1000")
    assert abs(got[0] - 1.0) < 1e-6
