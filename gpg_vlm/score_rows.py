"""The rows of `gpg-vlm score`: reading the JSONL file and checking each row's fields.

A row is bad — `FILE:LINE: ...` naming the field, then an error or, with `--on-bad-row skip`,
a counted and logged skip — when its line is not UTF-8 or not a JSON object (including JSON
deeper or with longer integers than data/limits.py allows), a field is missing, or a field has a
type that no answer could match. A mistyped solution would otherwise score a silent 0 for
every completion, which reads as a wrong model rather than a wrong file. Solutions by task:
- classification: a non-empty class name, or a non-empty list of them;
- counting: a number (not a bool), or a string that reads as one ("3", "three");
- math: a non-empty string or a finite number;
- choice: as math, and it must select one of the row's `choices` (its text, its letter, or a
  value equal to exactly one option);
- grounding: a box [x1, y1, x2, y2] of finite numbers with x1 <= x2 and y1 <= y2, or a
  non-empty list of such boxes.

Deliberately left out: checking completions beyond their type (any text is a valid attempt).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from gpg_vlm.data.limits import parse_json
from gpg_vlm.data.schema import DataError
from gpg_vlm.rewards.grounding import _solution_boxes
from gpg_vlm.rewards.numeric import value_of
from gpg_vlm.rewards.reasoning import _choice_index

log = logging.getLogger("gpg_vlm.score")

TASKS = ("classification", "counting", "math", "choice", "grounding")


class BadRow(ValueError):
    """A row that cannot be scored; the message starts with FILE:LINE."""


def _size(value, where: str, name: str):
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                  and math.isfinite(v) for v in value))
    if not ok:
        raise BadRow(f"{where}: field {name!r} must be [width, height] of positive numbers, got {value!r}")
    return tuple(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_solution(solution, task: str, choices, where: str, name: str) -> None:
    """Raise BadRow unless `solution` is a well-typed solution for `task` (module docstring)."""
    bad = f"{where}: field {name!r}"
    if task == "grounding":
        if _solution_boxes(solution) is not None:
            return
        boxes = []
        if isinstance(solution, (list, tuple)) and solution:
            boxes = solution if isinstance(solution[0], (list, tuple)) else [solution]
        for b in boxes:
            if isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_number(x) for x in b) \
                    and (b[2] < b[0] or b[3] < b[1]):
                raise BadRow(f"{bad}: box {list(b)} has x2 < x1 or y2 < y1 (expected xyxy, not xywh?)")
        raise BadRow(f"{bad} must be a box [x1, y1, x2, y2] of finite numbers or a non-empty list "
                     f"of boxes, got {_short(solution)}")
    if task == "classification":
        names = solution if isinstance(solution, list) else [solution]
        if names and all(isinstance(s, str) and s.strip() for s in names):
            return
        raise BadRow(f"{bad} must be a non-empty class name or a list of them, got {_short(solution)}")
    if not (_is_number(solution) or (isinstance(solution, str) and solution.strip())):
        raise BadRow(f"{bad} must be a non-empty string or a finite number, got {_short(solution)}")
    if task == "counting" and isinstance(solution, str) and value_of(solution) is None:
        raise BadRow(f"{bad} must be a count, got {_short(solution)}")
    if task == "choice" and _choice_index(str(solution).strip(), choices, as_solution=True) is None:
        raise BadRow(f"{bad} {_short(solution)} is none of the choices (by text, letter or value)")


def parse_row(record, where: str, args) -> dict:
    """The reward columns of one row (values, not lists), or BadRow naming the field."""
    if not isinstance(record, dict):
        raise BadRow(f"{where}: expected a JSON object, got {type(record).__name__}")

    def field(name: str):
        if name not in record or record[name] is None:
            raise BadRow(f"{where}: missing field {name!r}")
        return record[name]

    completion = field(args.completion_field)
    if not isinstance(completion, (str, list)):
        raise BadRow(f"{where}: field {args.completion_field!r} must be a string or a message list, "
                     f"got {type(completion).__name__}")
    row = {"completion": completion, "solution": field(args.solution_field)}
    if args.task == "choice":
        choices = field(args.choices_field)
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise BadRow(f"{where}: field {args.choices_field!r} must be a non-empty list of strings")
        row["choices"] = choices
    check_solution(row["solution"], args.task, row.get("choices"), where, args.solution_field)
    if args.task in ("math", "counting", "choice"):
        row["precision"] = record.get(args.precision_field)
        question = record.get(getattr(args, "question_field", "question"))
        row["question"] = question if isinstance(question, str) else None  # lenient extraction only
    if args.task == "grounding":  # every frame clips to the original image
        row["image_size"] = _size(field(args.image_size_field), where, args.image_size_field)
        if args.box_format == "abs_resized":
            row["model_image_size"] = _size(field(args.model_image_size_field), where,
                                            args.model_image_size_field)
    return row


def _record(raw: bytes, number: int, where: str):
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRow(f"{where}: line is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        return None
    try:  # bounded depth and integer size (data/limits.py): a bad row, never a RecursionError
        return parse_json(text, where)
    except DataError as exc:
        raise BadRow(str(exc)) from None


def read_rows(path: Path, args) -> tuple[list[tuple[int, dict]], list[dict]]:
    """(line, columns) of each good row and {line, reason} of each skipped one."""
    rows, skipped = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                record = _record(raw, number, where)
                if record is not None:
                    rows.append((number, parse_row(record, where, args)))
            except BadRow as exc:
                if args.on_bad_row == "error":
                    raise
                log.warning("skipped %s", exc)
                skipped.append({"line": number, "reason": str(exc)})
    return rows, skipped
