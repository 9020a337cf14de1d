"""Grounding reward: boxes read from the answer, mapped to original-image pixels, scored by IoU.

Boxes are xyxy. `parse_boxes(answer)` finds, in order of appearance, every
- `[x1, y1, x2, y2]` (alone, in a list of lists, or as the value of "bbox_2d" in a JSON object
  or a list of objects — the JSON is not needed to be valid, only the bracketed four numbers);
- `(x1,y1),(x2,y2)`, also between `<|box_start|>` and `<|box_end|>` (Qwen2-VL).
Numbers may be negative or decimal; a bracket with any count other than four is not a box.
At most 100 boxes are read (every box read counts in the denominator below).

Frames (`box_format`, per completion or one for all; required, since a wrong frame still
yields plausible numbers):
- "rel1000" (Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE): x * W / 1000, y * H / 1000
  with `image_size` = (W, H). Qwen3-VL's cookbooks (QwenLM/Qwen3-VL, spatial_understanding)
  give 0-1000 relative coordinates; Qwen3.5 and the MoE models keep that frame ("Qwen3-VL and
  3.5 use a relative coordinate system ... normalized to a 0-1000 range",
  agent.viscover.site/knowledge/qwen3-coordinate-system);
- "abs_resized" (Qwen2.5-VL): pixels of the image the model saw, `model_image_size` = (Wm, Hm):
  x * W / Wm, y * H / Hm;
- "abs": pixels of the original image, unchanged.
The `solution` is one box or a list of boxes in original-image pixels.

Degenerate input, decided once: a predicted box is first mapped, then clipped to the image;
a box with x2 < x1 or y2 < y1 (inverted) or zero area after clipping (degenerate, or wholly
outside the image) is kept but overlaps nothing, so it scores 0 and still counts as a
prediction. A solution that is not a box or list of boxes with finite x1 <= x2, y1 <= y2, an
unknown frame, or a missing/non-positive image size makes the item score 0.0.

Reward: with P predictions and G ground-truth boxes, the one-to-one assignment that maximises
the summed score (Hungarian algorithm), divided by max(P, G). The score of a pair is its IoU,
or, with `iou_threshold` set, 1.0 when IoU >= threshold else 0.0. One box against one box is
just its IoU (or the Acc@IoU of RefCOCO with `iou_threshold=0.5`).

Deliberately left out: polygons and masks, xywh input from the model, class labels of
boxes (a box's "label" is ignored), 0-1 normalised coordinates.
"""

import math
import re

from gpg_vlm.rewards._columns import check_columns, per_item
from gpg_vlm.rewards.answer import extract_answer

MAX_BOXES = 100
FRAMES = ("rel1000", "abs_resized", "abs")
_NUM = r"\s*(-?\d{1,9}(?:\.\d{1,9})?)\s*"
_BOX = re.compile(
    r"\[" + ",".join([_NUM] * 4) + r"\]"
    + r"|\(" + _NUM + "," + _NUM + r"\)\s*(?:,\s*)?\(" + _NUM + "," + _NUM + r"\)"
)

Box = tuple[float, float, float, float]


def _area(b: Box) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes; 0.0 when the union has no area."""
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def giou(a: Box, b: Box) -> float:
    """Generalised IoU in [-1, 1]: IoU - (hull - union) / hull; 0.0 when the hull has no area."""
    hull = _area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
    if hull <= 0:
        return 0.0
    inter = _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = _area(a) + _area(b) - inter
    return (inter / union if union > 0 else 0.0) - (hull - union) / hull


def parse_boxes(answer: str) -> list[Box]:
    """Every box written in `answer`, in order, at most MAX_BOXES (module docstring)."""
    boxes = []
    for m in _BOX.finditer(answer):
        boxes.append(tuple(float(g) for g in m.groups() if g is not None))
        if len(boxes) == MAX_BOXES:
            break
    return boxes


def _size(value) -> tuple[float, float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    w, h = float(value[0]), float(value[1])
    return (w, h) if math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0 else None


def _solution_boxes(solution) -> list[Box] | None:
    def box(v):
        if not isinstance(v, (list, tuple)) or len(v) != 4:
            return None
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return None
        b = tuple(float(x) for x in v)
        ok = all(math.isfinite(x) for x in b) and b[0] <= b[2] and b[1] <= b[3]
        return b if ok else None

    single = box(solution)
    if single is not None:
        return [single]
    if not isinstance(solution, (list, tuple)) or not solution:
        return None
    boxes = [box(v) for v in solution]
    return None if any(b is None for b in boxes) else boxes


def to_original(box: Box, box_format: str, image_size, model_image_size=None) -> Box | None:
    """`box` in original-image pixels, clipped to the image; None for an unusable frame/size."""
    size = _size(image_size)
    if size is None:
        return None
    w, h = size
    if box_format == "rel1000":
        sx, sy = w / 1000.0, h / 1000.0
    elif box_format == "abs_resized":
        model = _size(model_image_size)
        if model is None:
            return None
        sx, sy = w / model[0], h / model[1]
    elif box_format == "abs":
        sx, sy = 1.0, 1.0
    else:
        return None
    x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    if x2 < x1 or y2 < y1:  # inverted: kept, but it must overlap nothing after clipping
        return (0.0, 0.0, 0.0, 0.0)
    clip = lambda v, hi: min(max(v, 0.0), hi)  # noqa: E731
    return (clip(x1, w), clip(y1, h), clip(x2, w), clip(y2, h))


def max_assignment(scores: list[list[float]]) -> float:
    """Largest sum of scores[i][j] over a one-to-one assignment of rows to columns.

    Hungarian algorithm with potentials (O(n^2 m), n = rows <= m = columns; the matrix is
    transposed when it is taller than wide). Scores are non-negative, so a full matching
    of the smaller side is always among the best ones.
    """
    if not scores or not scores[0]:
        return 0.0
    if len(scores) > len(scores[0]):
        scores = [list(col) for col in zip(*scores)]
    n, m = len(scores), len(scores[0])
    cost = [[-s for s in row] for row in scores]
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner = [0] * (m + 1)  # owner[j]: the row (1-based) matched to column j, 0 for none
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        best = [math.inf] * (m + 1)
        prev = [0] * (m + 1)
        used = [False] * (m + 1)
        while owner[j0] != 0:
            used[j0] = True
            i0, delta, j1 = owner[j0], math.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < best[j]:
                        best[j], prev[j] = reduced, j0
                    if best[j] < delta:
                        delta, j1 = best[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    best[j] -= delta
            j0 = j1
        while j0:
            owner[j0] = owner[prev[j0]]
            j0 = prev[j0]
    return sum(scores[owner[j] - 1][j - 1] for j in range(1, m + 1) if owner[j])


def box_reward(predicted: list[Box], truth: list[Box], iou_threshold: float | None = None) -> float:
    """Matched score / max(P, G) of boxes in one frame (module docstring); 0.0 if one is empty."""
    if not predicted or not truth:
        return 0.0
    scores = []
    for p in predicted:
        row = [iou(p, t) for t in truth]
        if iou_threshold is not None:
            row = [1.0 if s >= iou_threshold else 0.0 for s in row]
        scores.append(row)
    return min(1.0, max_assignment(scores) / max(len(predicted), len(truth)))


def grounding_reward(
    completions: list, solution: list, image_size: list, model_image_size=None,
    box_format=None, iou_threshold: float | None = None, accept_bare=False, **columns,
) -> list[float]:
    """IoU-based reward per completion (module docstring); always in [0, 1]."""
    n = len(completions)
    check_columns(columns, n)
    if box_format is None:  # no silent default: Qwen2-VL and Qwen2.5-VL frames differ
        raise ValueError(f"grounding_reward needs box_format (a column or option): one of {FRAMES}")
    rows = zip(
        completions, per_item("solution", solution, n), per_item("image_size", image_size, n),
        per_item("model_image_size", model_image_size, n), per_item("box_format", box_format, n),
        per_item("iou_threshold", iou_threshold, n), per_item("accept_bare", accept_bare, n),
    )
    rewards = []
    for completion, sol, size, model_size, frame, threshold, bare in rows:
        answer = extract_answer(completion, accept_bare=bare is True)
        truth = _solution_boxes(sol)
        if answer is None or truth is None or frame not in FRAMES or _size(size) is None:
            rewards.append(0.0)
            continue
        mapped = [to_original(b, frame, size, model_size) for b in parse_boxes(answer)]
        if any(b is None for b in mapped):
            rewards.append(0.0)
            continue
        usable = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        rewards.append(box_reward(mapped, truth, float(threshold) if usable else None))
    return rewards
