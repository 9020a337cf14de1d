"""`gpg-vlm score`: score pre-generated completions with the training rewards, no model needed.

Input: a JSONL file, one row per completion, e.g.
`{"completion": "<think>..</think><answer>(B)</answer>", "solution": "(B)", "choices": [...]}`.
Output: the accuracy on stdout and, with `--output`, a JSON file
`{"task", "extract", "accuracy", "n", "skipped", "items": [{"line", "reward", "answer",
"extracted_by"}, ...]}` with the items in input order.

Tasks and the reward each uses (the same functions the trainer optimises):
- classification: `classification_reward`;
- counting, math: `reasoning_reward` (numbers, expressions; a row's `precision`, if present,
  rounds the answer first, as MathVista does);
- choice: `reasoning_reward` with the row's `choices`;
- grounding: `grounding_reward` in the `--box-format` frame (required: frames differ by model
  family and a wrong one still yields plausible numbers); every row needs the original
  `image_size` (W, H), and with abs_resized also the `model_image_size` the model saw.

Extraction (`--extract`, gpg_vlm/rewards/extract.py): `strict` (default) is the training
reward's own reading, `<answer>` tags only (`--accept-bare` also takes an untagged completion
whole); `lenient` is for models that ignore the format: the tag, else `\\boxed{}`, else a
final-answer phrase, else the last number or choice letter of the last line. The answer found
is then judged by the same reward and normalisation; the results say which mode and step.

Rows (score_rows.py): a bad row (invalid JSON, non-UTF-8 bytes, a missing or mistyped field, a
solution that no answer could match) stops the run with `FILE:LINE: ...` naming the field, or
with `--on-bad-row skip` is counted, logged and listed under `skipped`. An input without rows
is an error.

Output: `--output` is checked before any work (not the input, not a folder, its folder
exists). Items are appended to `OUTPUT.partial.jsonl` as they are scored; Ctrl-C or SIGTERM
stops after the current chunk, keeps that file and prints the command that continues
(`--resume`, which skips the lines already scored, and refuses a journal written with other
settings). The finished JSON replaces the journal atomically.

This module imports neither torch nor transformers, so scoring is fast anywhere.
Deliberately left out: any model-based answer extraction or judging.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from gpg_vlm.rewards import classification_reward, grounding_reward, reasoning_reward
from gpg_vlm.rewards.extract import MODES, as_tagged, extract
from gpg_vlm.rewards.grounding import FRAMES
from gpg_vlm.score_rows import TASKS, BadRow, parse_row, read_rows

log = logging.getLogger("gpg_vlm.score")

CHUNK = 64  # rows per reward call and per journal flush: what an interruption may lose at most
JOURNAL_VERSION = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpg-vlm score", description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, help="JSONL file, one completion per row")
    p.add_argument("--task", required=True, choices=TASKS, help="which reward scores the rows")
    p.add_argument("--output", default=None, help="write the per-item scores here (JSON)")
    p.add_argument("--extract", choices=MODES, default="strict",
                   help="strict: <answer> tags only (the training reward); lenient: tag, else "
                        "\\boxed{}, else a final-answer phrase, else the last number/letter")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUTPUT.partial.jsonl")
    p.add_argument("--completion-field", default="completion")
    p.add_argument("--solution-field", default="solution")
    p.add_argument("--choices-field", default="choices", help="task choice: the options list")
    p.add_argument("--question-field", default="question",
                   help="optional question text; lenient extraction passes over numbers it states")
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
                   help="strict mode: a completion without <answer> tags is its own answer")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    return p


def score_items(rows: list[dict], args) -> list[dict]:
    """{reward, answer, extracted_by} per row, by the task's training reward in one batched call."""
    task_kind = "math" if args.task == "counting" else args.task
    found = [extract(r["completion"], args.extract, task_kind, args.accept_bare, r.get("choices"),
                     r.get("question")) for r in rows]
    if args.extract == "lenient":  # the reward reads exactly the answer lenient extraction found
        completions, bare = [as_tagged(answer) for answer, _ in found], False
    else:
        completions, bare = [r["completion"] for r in rows], args.accept_bare
    column = lambda name: [r.get(name) for r in rows]  # noqa: E731
    if args.task == "classification":
        rewards = classification_reward(completions, column("solution"), accept_bare=bare)
    elif args.task in ("math", "counting", "choice"):
        rewards = reasoning_reward(completions, column("solution"), choices=column("choices"),
                                   precision=column("precision"), accept_bare=bare)
    else:
        rewards = grounding_reward(completions, column("solution"), column("image_size"),
                                   model_image_size=column("model_image_size"),
                                   box_format=args.box_format, iou_threshold=args.iou_threshold,
                                   accept_bare=bare)
    return [{"reward": float(r), "answer": a, "extracted_by": step}
            for r, (a, step) in zip(rewards, found)]


def score_records(records: list[dict], task: str, extract_mode: str = "strict", **options) -> list[dict]:
    """Score in-process: the CLI's row checks and rewards for a list of row dicts.

    `options` are the CLI's options by their argparse names (box_format="rel1000", ...).
    Raises BadRow naming the record index (as `<records>:N`, 1-based) for a bad record.
    """
    args = _parser().parse_args(["--predictions", "-", "--task", task, "--extract", extract_mode])
    for name, value in options.items():
        if not hasattr(args, name):
            raise TypeError(f"score_records: unknown option {name!r}")
        setattr(args, name, value)
    rows = [parse_row(r, f"<records>:{i}", args) for i, r in enumerate(records, start=1)]
    return score_items(rows, args) if rows else []


# ------------------------------------------------------------------ output and journal
def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl")


def _settings(args) -> dict:
    """What a journal must agree on to be continued: the input and everything that scores."""
    keys = ("task", "extract", "completion_field", "solution_field", "choices_field",
            "precision_field", "question_field", "image_size_field", "model_image_size_field", "box_format",
            "iou_threshold", "accept_bare")
    return {"version": JOURNAL_VERSION, "predictions": str(Path(args.predictions).resolve()),
            **{k: getattr(args, k) for k in keys}}


def check_output(args, predictions: Path) -> Path | None:
    """The output path, validated before any work; raises BadRow with the reason."""
    if args.output is None:
        if args.resume:
            raise BadRow("--resume needs --output (the interrupted run's output file)")
        return None
    out = Path(args.output)
    if out.resolve() == predictions.resolve() or journal_path(out).resolve() == predictions.resolve():
        raise BadRow(f"--output {out} is the input file; choose another path")
    if out.is_dir():
        raise BadRow(f"--output {out} is a folder; give a file path")
    if not out.parent.is_dir():
        raise BadRow(f"cannot write {out}: No such file or directory ({out.parent} does not exist)")
    if not os.access(out.parent, os.W_OK):
        raise BadRow(f"cannot write {out}: Permission denied ({out.parent})")
    if journal_path(out).exists() and not args.resume:
        raise BadRow(f"{journal_path(out)} holds an interrupted run: pass --resume to continue "
                     "it, or delete it to start again")
    return out


def read_journal(path: Path, args) -> dict[int, dict]:
    """line -> item already scored; a torn last line (killed mid-write) is dropped."""
    done: dict[int, dict] = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().split("\n")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        raise BadRow(f"{path}: not a score journal (unreadable first line)") from None
    if header != {"journal": _settings(args)}:
        raise BadRow(f"{path} was written with other settings ({header}); delete it or rerun "
                     "with the same options")
    for text in lines[1:]:
        try:
            item = json.loads(text)
        except json.JSONDecodeError:
            continue  # the torn last line, rewritten below
        done[item["line"]] = item
    return done


def _open_journal(out: Path, args, done: dict[int, dict]):
    """The journal, rewritten from `done` (dropping any torn line), open for appending."""
    path = journal_path(out)
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(json.dumps({"journal": _settings(args)}) + "\n")
        for item in done.values():
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return open(path, "a", encoding="utf-8", errors="backslashreplace")


def _write_result(out: Path, result: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    # a JSON escape may hold an unpaired surrogate: written back as the same escape
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8",
                   errors="backslashreplace")
    os.replace(tmp, out)


class _Stop(BaseException):
    """SIGTERM arrived: stop (a BaseException, like Ctrl-C's KeyboardInterrupt, so that reward code
    guarding odd input with `except Exception` cannot swallow it)."""


def _score_all(rows, args, journal, done: dict[int, dict]) -> dict[int, dict]:
    """Score the rows not in `done`, chunk by chunk, appending each chunk to the journal."""
    todo = [(line, row) for line, row in rows if line not in done]
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        items = score_items([row for _, row in chunk], args)
        for (line, _), item in zip(chunk, items):
            done[line] = {"line": line, **item}
            if journal is not None:
                journal.write(json.dumps(done[line], ensure_ascii=False) + "\n")
        if journal is not None:
            journal.flush()
    return done


def _resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a != "--resume"]
    return "gpg-vlm score " + " ".join(shlex.quote(a) for a in [*args, "--resume"])


def _fail(message: str) -> int:
    print(f"gpg-vlm score: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = Path(args.predictions)
    try:
        if args.task == "grounding" and args.box_format is None:
            raise BadRow("--task grounding needs --box-format (rel1000 for Qwen2-VL/Qwen3-VL, "
                         "abs_resized for Qwen2.5-VL, abs for original-image pixels)")
        if args.accept_bare and args.extract == "lenient":
            raise BadRow("--accept-bare applies to --extract strict; lenient reads untagged "
                         "completions by its own steps")
        if not path.is_file():
            raise BadRow(f"{path}: no such file")
        out = check_output(args, path)
        rows, skipped = read_rows(path, args)
        if not rows:
            raise BadRow(f"{path}: no rows to score" + (f" ({len(skipped)} bad row(s) skipped)"
                                                         if skipped else " (empty input)"))
        done = read_journal(journal_path(out), args) if out and args.resume and \
            journal_path(out).exists() else {}
    except BadRow as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or path}: cannot read: {exc.strerror or exc}")
    if done:
        print(f"resuming: {len(done)} of {len(rows)} rows already scored", file=sys.stderr)
    journal = None

    def on_term(signum, frame):
        raise _Stop()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None  # signals: main thread only
    try:
        journal = _open_journal(out, args, done) if out else None
        done = _score_all(rows, args, journal, done)
    except (KeyboardInterrupt, _Stop) as exc:
        scored = sum(1 for line, _ in rows if line in done)
        note = (f"; continue with: {_resume_command(argv)}" if out else
                " (nothing kept: pass --output to keep and resume)")
        print(f"gpg-vlm score: interrupted after {scored} of {len(rows)} rows{note}", file=sys.stderr)
        return 143 if isinstance(exc, _Stop) else 130
    except OSError as exc:
        return _fail(f"cannot write {journal_path(out)}: {exc.strerror or exc}")
    finally:
        if journal is not None:
            journal.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    items = [done[line] for line, _ in rows]
    n = len(items)
    accuracy = sum(i["reward"] for i in items) / n
    if out:
        result = {"task": args.task, "extract": args.extract, "accuracy": accuracy, "n": n,
                  "skipped": skipped, "items": items}
        try:
            _write_result(out, result)
            journal_path(out).unlink()
        except OSError as exc:
            return _fail(f"cannot write {out}: {exc.strerror or exc}")
    note = f", {len(skipped)} bad row(s) skipped" if skipped else ""
    print(f"{args.task}: accuracy {100 * accuracy:.2f}% on {n} rows ({args.extract} extraction){note}")
    return 0
