"""`gpg-vlm score`: score pre-generated completions with the training rewards, no model needed.

Input: a JSONL file, one row per completion, e.g.
`{"completion": "<think>..</think><answer>(B)</answer>", "solution": "(B)", "choices": [...]}`.
Output: the accuracy on stdout and, with `--output`, a JSON file
`{"task", "accuracy", "n", "skipped", "items": [{"line", "reward", "answer"}, ...]}` with the
items in input order.

Tasks and the reward each uses (the same functions the trainer optimises):
- classification: `classification_reward`;
- counting, math: `reasoning_reward` (numbers, expressions; a row's `precision`, if present,
  rounds the answer first, as MathVista does);
- choice: `reasoning_reward` with the row's `choices`;
- grounding: `grounding_reward` in the `--box-format` frame (required: frames differ by model
  family and a wrong one still yields plausible numbers); every row needs the original
  `image_size` (W, H), and with abs_resized also the `model_image_size` the model saw.

A bad row (invalid JSON, non-UTF-8 bytes, a missing or mistyped field) stops the run with
`FILE:LINE: ...` naming the field, or with `--on-bad-row skip` is counted, logged and listed
under `skipped`. Completions need `<answer>` tags unless `--accept-bare` is given.

This module imports neither torch nor transformers, so scoring is fast anywhere.
Deliberately left out: any model-based answer extraction or judging.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gpg_vlm.data.limits import parse_json
from gpg_vlm.data.schema import DataError
from gpg_vlm.rewards import (
    classification_reward, extract_answer, grounding_reward, reasoning_reward,
)
from gpg_vlm.rewards.grounding import FRAMES

log = logging.getLogger("gpg_vlm.score")

TASKS = ("classification", "counting", "math", "choice", "grounding")


class BadRow(ValueError):
    """A row that cannot be scored; the message starts with FILE:LINE."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpg-vlm score", description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, help="JSONL file, one completion per row")
    p.add_argument("--task", required=True, choices=TASKS, help="which reward scores the rows")
    p.add_argument("--output", default=None, help="write the per-item scores here (JSON)")
    p.add_argument("--completion-field", default="completion")
    p.add_argument("--solution-field", default="solution")
    p.add_argument("--choices-field", default="choices", help="task choice: the options list")
    p.add_argument("--precision-field", default="precision",
                   help="counting/math: decimals to round the answer to, used when present")
    p.add_argument("--image-size-field", default="image_size", help="grounding: original (W, H)")
    p.add_argument("--model-image-size-field", default="model_image_size",
                   help="grounding, abs_resized: the (W, H) the model saw")
    p.add_argument("--box-format", choices=FRAMES, default=None,
                   help="grounding: the frame the completions' boxes are in (required)")
    p.add_argument("--iou-threshold", type=float, default=None,
                   help="grounding: score 1 if IoU >= X else 0 (Acc@X) instead of the IoU")
    p.add_argument("--accept-bare", action="store_true",
                   help="a completion without <answer> tags is its own answer")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    return p


def _size(value, where: str, name: str):
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value))
    if not ok:
        raise BadRow(f"{where}: field {name!r} must be [width, height] of positive numbers, got {value!r}")
    return tuple(value)


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
    if args.task in ("math", "counting", "choice"):
        row["precision"] = record.get(args.precision_field)
    if args.task == "grounding":  # every frame clips to the original image
        row["image_size"] = _size(field(args.image_size_field), where, args.image_size_field)
        if args.box_format == "abs_resized":
            row["model_image_size"] = _size(field(args.model_image_size_field), where,
                                            args.model_image_size_field)
    return row


def read_rows(path: Path, args) -> tuple[list[tuple[int, dict]], list[dict]]:
    """(line, columns) of each good row and {line, reason} of each skipped one."""
    rows, skipped = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise BadRow(f"{where}: line is not valid UTF-8 (byte {exc.start})") from None
                if not text.strip():
                    continue
                try:  # bounded depth and integer size: a bad row, never a RecursionError
                    record = parse_json(text, where)
                except DataError as exc:
                    raise BadRow(str(exc)) from None
                rows.append((number, parse_row(record, where, args)))
            except BadRow as exc:
                if args.on_bad_row == "error":
                    raise
                log.warning("skipped %s", exc)
                skipped.append({"line": number, "reason": str(exc)})
    return rows, skipped


def score_rows(rows: list[dict], args) -> list[float]:
    """One reward per row, computed by the task's training reward in one batched call."""
    completions = [r["completion"] for r in rows]
    column = lambda name: [r.get(name) for r in rows]  # noqa: E731
    bare = args.accept_bare
    if args.task == "classification":
        return classification_reward(completions, column("solution"), accept_bare=bare)
    if args.task in ("math", "counting", "choice"):
        return reasoning_reward(completions, column("solution"), choices=column("choices"),
                                precision=column("precision"), accept_bare=bare)
    return grounding_reward(completions, column("solution"), column("image_size"),
                            model_image_size=column("model_image_size"), box_format=args.box_format,
                            iou_threshold=args.iou_threshold, accept_bare=bare)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = Path(args.predictions)
    try:
        if args.task == "grounding" and args.box_format is None:
            raise BadRow("--task grounding needs --box-format (rel1000 for Qwen2-VL/Qwen3-VL, "
                         "abs_resized for Qwen2.5-VL, abs for original-image pixels)")
        if not path.is_file():
            raise BadRow(f"{path}: no such file")
        rows, skipped = read_rows(path, args)
    except BadRow as exc:
        print(f"gpg-vlm score: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gpg-vlm score: {path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    rewards = score_rows([r for _, r in rows], args)
    n = len(rewards)
    accuracy = sum(rewards) / n if n else 0.0
    items = [{"line": line, "reward": float(reward),
              "answer": extract_answer(row["completion"], accept_bare=args.accept_bare)}
             for (line, row), reward in zip(rows, rewards)]
    if args.output:
        result = {"task": args.task, "accuracy": accuracy, "n": n, "skipped": skipped, "items": items}
        try:  # a JSON escape may hold an unpaired surrogate: written back as the same escape
            Path(args.output).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n",
                                         encoding="utf-8", errors="backslashreplace")
        except OSError as exc:
            print(f"gpg-vlm score: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    note = f", {len(skipped)} bad row(s) skipped" if skipped else ""
    print(f"{args.task}: accuracy {100 * accuracy:.2f}% on {n} rows{note}")
    return 0
