"""grounding_reward: every box form and frame, conversions computed by hand, matching."""

import itertools
import random

import pytest

from gpg_vlm.rewards import grounding_reward
from gpg_vlm.rewards.grounding import giou, iou, max_assignment, parse_boxes

# Original image 2000 x 1000; the ground truth is [200, 200, 600, 400] in its pixels.
GT = [200, 200, 600, 400]
SIZE = (2000, 1000)
MODEL = (1000, 500)  # Qwen2.5-VL saw the image resized to 1000 x 500: scale 2 both ways

FRAME_CASES = [
    # (answer, box_format, expected IoU)
    # rel1000: x * 2000/1000, y * 1000/1000 -> [100,200,300,400] is [200,200,600,400]
    ('{"bbox_2d": [100, 200, 300, 400]}', "rel1000", 1.0),
    ("(100,200),(300,400)", "rel1000", 1.0),
    ("<|box_start|>(100,200),(300,400)<|box_end|>", "rel1000", 1.0),
    ("<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>",
     "rel1000", 1.0),
    ("[100, 200, 300, 400]", "rel1000", 1.0),
    # abs_resized: x * 2000/1000, y * 1000/500 -> [100,100,300,200] is [200,200,600,400]
    ('```json\n[{"bbox_2d": [100, 100, 300, 200], "label": "dog"}]\n```', "abs_resized", 1.0),
    # abs: as written. [200,200,400,400] vs GT: inter 200*200 = 40000, union 80000 -> 0.5
    ("[200, 200, 400, 400]", "abs", 0.5),
    # The same numbers read in each frame give different boxes:
    # rel1000 [200,200,400,400] -> [400,200,800,400]: inter 200*200=40000, union 80000+80000-40000
    ("[200, 200, 400, 400]", "rel1000", 40000 / 120000),
    # abs_resized -> [400,400,800,800]: touches the GT only along y = 400, zero-area overlap
    ("[200, 200, 400, 400]", "abs_resized", 0.0),
    ("[100.5, 200.0, 300.5, 400.0]", "rel1000", (600 - 201) * 200 / (400 * 200 + 400 * 200 - (600 - 201) * 200)),
]


@pytest.mark.parametrize("answer,frame,expected", FRAME_CASES)
def test_frames(answer, frame, expected):
    got = grounding_reward([f"<answer>{answer}</answer>"], solution=[GT], image_size=[SIZE],
                           model_image_size=[MODEL], box_format=[frame])
    assert got == [pytest.approx(expected, abs=1e-12)]


DEGENERATE = [
    # (answer, expected) in the abs frame against GT, image 2000 x 1000
    ("[600, 400, 200, 200]", 0.0),  # inverted
    ("[200, 200, 200, 400]", 0.0),  # zero width
    ("[-100, -100, 600, 400]", 80000 / 240000),  # clipped to [0,0,600,400]: inter 80000
    ("[2100, 1100, 2500, 1500]", 0.0),  # wholly outside
    ("[200, 200, 600]", 0.0),  # three numbers
    ("[200, 200, 600, 400, 5]", 0.0),  # five numbers
    ("[200, 200, 600, 400] [600, 400, 200, 200]", 0.5),  # two preds, one useless: 1 / 2
    ("no box here", 0.0),
    ("", 0.0),
    ("[1e3, 1, 2, 3]", 0.0),
    ("[" + "9" * 30 + ", 0, 1, 1]", 0.0),
]


@pytest.mark.parametrize("answer,expected", DEGENERATE)
def test_degenerate_predictions(answer, expected):
    got = grounding_reward([f"<answer>{answer}</answer>"], [GT], [SIZE], box_format="abs")
    assert got == [pytest.approx(expected, abs=1e-12)]


@pytest.mark.parametrize("solution,size,model,frame", [
    ([600, 400, 200, 200], SIZE, None, "abs"),  # inverted ground truth
    ([200, 200, 600], SIZE, None, "abs"),
    ([], SIZE, None, "abs"),
    (None, SIZE, None, "abs"),
    ("[200, 200, 600, 400]", SIZE, None, "abs"),
    ([200, 200, float("nan"), 400], SIZE, None, "abs"),
    ([True, 200, 600, 400], SIZE, None, "abs"),
    (GT, None, None, "abs"),
    (GT, (0, 1000), None, "abs"),
    (GT, (2000,), None, "abs"),
    (GT, SIZE, None, "abs_resized"),  # no model size
    (GT, SIZE, (0, 0), "abs_resized"),
    (GT, SIZE, None, "xywh"),  # unknown frame
])
def test_malformed_columns_score_zero(solution, size, model, frame):
    answer = "<answer>[200, 200, 600, 400]</answer>"
    assert grounding_reward([answer], [solution], [size], [model], [frame]) == [0.0]


def test_missing_box_format_is_an_error():
    with pytest.raises(ValueError, match="box_format"):
        grounding_reward(["<answer>[0,0,1,1]</answer>"], [GT], [SIZE])


def test_threshold_option():
    half = "<answer>[200, 200, 400, 400]</answer>"  # IoU 0.5 exactly
    less = "<answer>[200, 200, 399, 400]</answer>"
    kw = dict(solution=[GT, GT], image_size=[SIZE, SIZE], box_format="abs")
    assert grounding_reward([half, less], **kw) == [0.5, pytest.approx(199 / 400)]  # inter = pred 199*200, union = GT 400*200
    assert grounding_reward([half, less], iou_threshold=0.5, **kw) == [1.0, 0.0]


def test_several_boxes_one_to_one():
    gts = [[0, 0, 10, 10], [20, 0, 30, 10]]
    kw = dict(image_size=[(100, 100)], box_format="abs")
    both = '<answer>[{"bbox_2d": [20,0,30,10]}, {"bbox_2d": [0,0,10,10]}]</answer>'
    assert grounding_reward([both], [gts], **kw) == [1.0]
    # the same box twice matches one ground truth only: (1 + 0) / 2
    twice = "<answer>[0,0,10,10], [0,0,10,10]</answer>"
    assert grounding_reward([twice], [gts], **kw) == [0.5]
    # one prediction, two ground truths: 1 / max(1, 2)
    assert grounding_reward(["<answer>[0,0,10,10]</answer>"], [gts], **kw) == [0.5]
    # spamming boxes is diluted: 2 exact matches among 10 predictions -> 2 / 10
    spam = "<answer>" + "[0,0,10,10] [20,0,30,10] " + "[50,50,60,60] " * 8 + "</answer>"
    assert grounding_reward([spam], [gts], **kw) == [pytest.approx(0.2)]


def test_greedy_would_be_wrong_but_assignment_is_optimal():
    # greedy takes 0.9 first and is left with 0.0; the optimum is 0.8 + 0.8
    assert max_assignment([[0.9, 0.8], [0.8, 0.0]]) == pytest.approx(1.6)


def test_assignment_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 5), rng.randint(1, 5)
        s = [[rng.choice([0.0, 0.25, 0.5, rng.random()]) for _ in range(m)] for _ in range(n)]
        k = min(n, m)
        brute = max(
            sum(s[i][j] for i, j in zip(rows, cols))
            for rows in itertools.permutations(range(n), k)
            for cols in itertools.combinations(range(m), k)
        )
        assert max_assignment(s) == pytest.approx(brute)


def test_iou_and_giou_by_hand():
    a, b = (0, 0, 2, 2), (1, 1, 3, 3)  # inter 1, union 7, hull 9
    assert iou(a, b) == pytest.approx(1 / 7)
    assert giou(a, b) == pytest.approx(1 / 7 - 2 / 9)
    far = (10, 10, 11, 11)  # no overlap, union 5, hull 121
    assert iou(a, far) == 0.0 and giou(a, far) == pytest.approx(-116 / 121)
    assert iou(a, a) == 1.0 and giou(a, a) == 1.0
    point = (1, 1, 1, 1)
    assert iou(point, point) == 0.0 and giou(point, point) == 0.0
    assert iou((2, 2, 0, 0), a) == 0.0  # inverted boxes have no area


def test_parse_boxes_forms_and_order():
    text = 'first (1,2),(3,4) then {"bbox_2d": [5, 6, 7, 8]} and [-1.5, 0, 2.5, 3]'
    assert parse_boxes(text) == [(1, 2, 3, 4), (5, 6, 7, 8), (-1.5, 0, 2.5, 3)]
    assert len(parse_boxes("[0,0,1,1]" * 500)) == 100


# Each family's own frame (gpg_vlm.models.family; sources in its docstring): Qwen2.5-VL writes
# pixels of the resized image, every other family 0-1000 of the image.
FAMILY_FRAMES = {"qwen2_vl": "rel1000", "qwen2_5_vl": "abs_resized", "qwen3_vl": "rel1000",
                 "qwen3_vl_moe": "rel1000", "qwen3_5": "rel1000", "qwen3_5_moe": "rel1000"}
# One box in each frame, by hand, for an original 200 x 100 image the model saw as 400 x 200,
# with the truth [20, 10, 60, 50] in original pixels:
# rel1000: [100,100,300,500] * (200/1000, 100/1000) = [20, 10, 60, 50]
# abs_resized: [40,20,120,100] * (200/400, 100/200) = [20, 10, 60, 50]
FRAME_ANSWERS = {"rel1000": '{"bbox_2d": [100, 100, 300, 500]}',
                 "abs_resized": '{"bbox_2d": [40, 20, 120, 100]}'}


@pytest.mark.parametrize("family", sorted(FAMILY_FRAMES))
def test_each_family_is_scored_in_its_own_frame(family):
    from gpg_vlm.models.family import FAMILIES

    frame = FAMILIES[family].box_format
    assert frame == FAMILY_FRAMES[family]
    other = next(f for f in FRAME_ANSWERS if f != frame)

    def score(answer):
        return grounding_reward([f"<answer>{answer}</answer>"], solution=[[20, 10, 60, 50]],
                                image_size=[(200, 100)], model_image_size=[(400, 200)],
                                box_format=[frame])[0]

    assert score(FRAME_ANSWERS[frame]) == pytest.approx(1.0)
    # negative control, by hand: the other frame's numbers read in this one miss the truth.
    # rel1000 reading [40,20,120,100] -> [8,2,24,10]: overlap only along y=10, IoU 0;
    # abs_resized reading [100,100,300,500] -> [50,50,150,250] clipped to [50,50,150,100]:
    # overlap only along y=50, IoU 0.
    assert score(FRAME_ANSWERS[other]) == 0.0


def test_every_family_has_a_frame_test():
    from gpg_vlm.models.family import FAMILIES

    assert set(FAMILIES) == set(FAMILY_FRAMES)
