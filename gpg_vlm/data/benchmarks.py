"""Adapters from published benchmark record formats to the gpg_vlm schema.

Each adapter is a small function `(source, record, ctx) -> list of schema records`, run
through the same validation, image checks and `on_bad_row` policy as `load_rows`. The
benchmark's own fields go to `Row.extra`; `extra["category"]` is the group a benchmark
reports per (CV-Bench task, SAT question_type, MathVista metadata task). Conventions:

- multiple choice: `choices` holds the option texts, `solution` the correct option's text,
  and `problem` lists the options as "(A) ...", the way CV-Bench and MathVista present them;
- grounding: `solution` is an xyxy box in pixels of the original image;
- classification: `solution` is the class name.

Images are looked up under `image_root` (default: the record file's folder). Real record
files usually come without their images, so pass `check_images=False` to load the records
alone. Formats are described in data/README.md.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpg_vlm.data.limits import parse_json
from gpg_vlm.data.loading import Rows, build_rows, read_records
from gpg_vlm.data.schema import DataError, Row, make_row, short


@dataclass(frozen=True)
class Context:
    """What an adapter needs besides the record: where images live and adapter options."""

    image_root: Path
    root: Path | None
    options: dict[str, Any]


def _letters(choices: list[str]) -> str:
    return "\n".join(f"({string.ascii_uppercase[i]}) {c}" for i, c in enumerate(choices))


def _field(record: dict, name: str, source: str, kind: type | tuple = str) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise DataError(f"{source}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{source}: field {name!r} has type {type(value).__name__}")
    return value


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def cvbench(source: str, record: dict, ctx: Context) -> list[dict]:
    """CV-Bench test_2d/test_3d: answer "(C)" indexes `choices`; task/type kept for reporting."""
    question = _field(record, "question", source)
    choices = [str(c) for c in _field(record, "choices", source, list)]
    answer = _field(record, "answer", source).strip()
    letter = answer.strip("()")
    index = string.ascii_uppercase.find(letter) if len(letter) == 1 else -1
    if not 0 <= index < len(choices):
        raise DataError(f"{source}: field 'answer' {answer!r} does not name one of {len(choices)} choices")
    prompt = record.get("prompt") or f"{question} Select from the following choices.\n{_letters(choices)}"
    image = record.get("image") or _field(record, "filename", source)
    keep = ("idx", "type", "source", "source_dataset", "source_filename", "target_class", "target_size", "bbox")
    extra = {k: record[k] for k in keep if k in record}
    extra.update(category=record.get("task"), answer=answer)
    return [dict(image=image, problem=prompt, solution=choices[index], task="reasoning", choices=choices, extra=extra)]


def sat(source: str, record: dict, ctx: Context) -> list[dict]:
    """SAT: 1-2 images in `image_bytes`, options in `answers`, the right one in `correct_answer`."""
    images = _field(record, "image_bytes", source, (list, bytes, dict))
    answers = [str(a) for a in _field(record, "answers", source, list)]
    question = _field(record, "question", source)
    correct = str(_field(record, "correct_answer", source, (str, int, float)))
    return [
        dict(
            image=images,
            problem=f"{question}\n{_letters(answers)}",
            solution=correct,
            task="reasoning",
            choices=answers,
            extra={"category": record.get("question_type")},
        )
    ]


def counting(source: str, record: dict, ctx: Context) -> list[dict]:
    """SuperCLEVR counting prompts (GPG R1-V eval files): integer `ground_truth`."""
    truth = _field(record, "ground_truth", source, int)
    return [dict(image=_field(record, "image_path", source), problem=_field(record, "question", source),
                 solution=truth, task="reasoning")]


def geoqa(source: str, record: dict, ctx: Context) -> list[dict]:
    """GeoQA test prompts: string answers with units ("140°", "8√{3}"), scored by equivalence."""
    return [dict(image=_field(record, "image_path", source), problem=_field(record, "question", source),
                 solution=_field(record, "ground_truth", source), task="reasoning")]


_MATHVISTA_HINT = {
    "integer": "Answer with an integer, e.g. 1, 2, 3, as the final value.",
    "float": "Answer with a number with {precision} decimal place(s), e.g. 1.2, as the final value.",
    "list": "Answer with a Python list, e.g. [1, 2, 3], as the final value.",
    "text": "Answer with the option letter of the correct choice, e.g. A, B, C, D.",
}


def mathvista(source: str, record: dict, ctx: Context) -> list[dict]:
    """MathVista testmini: multi_choice -> options; free_form answers typed by `answer_type`."""
    question = _field(record, "question", source)
    answer = _field(record, "answer", source)
    kind = _field(record, "answer_type", source)
    qtype = _field(record, "question_type", source)
    choices = record.get("choices")
    if qtype == "multi_choice":
        if not isinstance(choices, list):
            raise DataError(f"{source}: field 'choices' must be a list for a multi_choice question")
        choices = [str(c) for c in choices]
        hint = _MATHVISTA_HINT["text"]
        body = f"Question: {question}\nChoices:\n{_letters(choices)}"
        solution: Any = answer
    else:
        choices = None
        hint = _MATHVISTA_HINT.get(kind, "").format(precision=record.get("precision"))
        unit = record.get("unit")
        body = f"Question: {question}" + (f" (Unit: {unit})" if unit else "")
        read = {"integer": int, "float": float, "list": lambda a: parse_json(a, f"{source}: field 'answer'")}
        try:
            solution = read.get(kind, str)(answer)
        except ValueError:  # DataError included
            raise DataError(f"{source}: field 'answer' {short(answer)} is not a valid {kind}") from None
    keep = ("pid", "question_type", "answer_type", "precision", "unit", "metadata")
    extra = {k: record.get(k) for k in keep}
    metadata = record.get("metadata")
    extra.update(answer=answer, category=metadata.get("task") if isinstance(metadata, dict) else None)
    return [dict(image=_field(record, "image", source, (str, dict, bytes)), problem=f"Hint: {hint}\n{body}",
                 solution=solution, task="reasoning", choices=choices, extra=extra)]


_REF_PROMPT = "Please give the bounding box of the region this sentence describes: {}"


def refcoco(source: str, record: dict, ctx: Context) -> list[dict]:
    """RefCOCO/+/g in either published form, detected per record.

    lmms-lab parquet: `bbox` [x, y, w, h] and `answer`, a list of referring expressions of the
    same object (one row each). VLM-R1 JSON: `problem` expression and `solution` xyxy box.
    """
    if "bbox" in record:
        bbox = _field(record, "bbox", source, list)
        if len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise DataError(f"{source}: field 'bbox' must be 4 numbers [x, y, w, h], got {short(bbox)}")
        x, y, w, h = bbox
        expressions = _field(record, "answer", source, (list, str))
        expressions = [expressions] if isinstance(expressions, str) else expressions
        image = record.get("image") or _field(record, "file_name", source)
        keep = {k: record[k] for k in ("question_id", "file_name") if k in record}
        return [dict(image=image, problem=_REF_PROMPT.format(e), solution=[x, y, x + w, y + h],
                     task="grounding", extra=dict(keep, expression=e)) for e in expressions]
    expression = _field(record, "problem", source)
    keep = {k: v for k, v in record.items() if k not in ("image", "problem", "solution")}
    return [dict(image=_field(record, "image", source), problem=_REF_PROMPT.format(expression),
                 solution=_field(record, "solution", source, list), task="grounding", extra=dict(keep, expression=expression))]


def _lisa_records(folder: Path) -> list[tuple[str, Any]]:
    if not folder.is_dir():
        raise DataError(f"{folder}: LISA ReasonSeg expects a folder of name.jpg + name.json pairs")
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            out.append((path.name, parse_json(path.read_bytes().decode("utf-8"), path.name)))
        except UnicodeDecodeError as exc:
            out.append((path.name, DataError(f"{path.name}: not a valid UTF-8 JSON file: {exc}")))
        except DataError as exc:
            out.append((path.name, exc))
    return out


def lisa(source: str, record: dict, ctx: Context) -> list[dict]:
    """LISA ReasonSeg: the target box is the bounding box of all 'target' polygons; one row per text."""
    stem = Path(source).stem
    image = next((f"{stem}{ext}" for ext in (".jpg", ".png", ".jpeg") if (ctx.image_root / f"{stem}{ext}").exists()),
                 f"{stem}.jpg")
    texts = _field(record, "text", source, (list, str))
    texts = [texts] if isinstance(texts, str) else texts
    points = []
    for i, shape in enumerate(_field(record, "shapes", source, list)):
        if not isinstance(shape, dict) or shape.get("label") != "target":
            continue
        pts = shape.get("points")
        if not (isinstance(pts, list) and pts and all(
                isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p) for p in pts)):
            raise DataError(f"{source}: field 'shapes'[{i}].points must be a list of [x, y] number pairs")
        points.extend(pts)
    if not points:
        raise DataError(f"{source}: field 'shapes' has no 'target' polygon")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    box = [min(xs), min(ys), max(xs), max(ys)]
    return [dict(image=image, problem=_REF_PROMPT.format(t), solution=box, task="grounding",
                 extra={"is_sentence": record.get("is_sentence"), "text_index": i, "image_id": stem})
            for i, t in enumerate(texts)]


def fewshot(source: str, record: dict, ctx: Context) -> list[dict]:
    """Visual-RFT classification: {image_path, label, class_name} checked against the class list.

    The published files carry their authors' absolute paths; those are looked up by file name
    under `image_root`.
    """
    classes: list[str] = ctx.options["classes"]
    label = _field(record, "label", source, int)
    name = _field(record, "class_name", source)
    if not 0 <= label < len(classes) or classes[label] != name:
        found = classes[label] if 0 <= label < len(classes) else "out of range"
        raise DataError(f"{source}: field 'label' {label} ({found}) does not match class_name {name!r}")
    image = _field(record, "image_path", source)
    if Path(image).is_absolute():
        image = Path(image).name
    problem = "What is the category of this image?"
    if ctx.options.get("list_classes", True):
        problem += " Answer with one of: " + "; ".join(classes) + "."
    return [dict(image=image, problem=problem, solution=name, task="classification", choices=classes, extra={"label": label})]


def _fewshot_classes(path: Path, classes: str | Path | None) -> list[str]:
    if classes is None:
        stem = path.stem
        for suffix in ("_val", "_test", "_train"):
            stem = stem.removesuffix(suffix)
        classes = path.with_name(stem + ".txt")
    classes = Path(classes)
    if not classes.is_file():
        raise DataError(f"{path}: class list {classes} not found; pass classes=PATH")
    names = [line.strip() for line in classes.read_text(encoding="utf-8").splitlines()]
    if not all(names) or len(set(names)) != len(names):
        raise DataError(f"{classes}: the class list must have one distinct, non-empty name per line")
    return names


ADAPTERS: dict[str, Callable[[str, dict, Context], list[dict]]] = {
    "cvbench": cvbench,
    "sat": sat,
    "superclevr": counting,
    "geoqa": geoqa,
    "mathvista": mathvista,
    "refcoco": refcoco,
    "lisa": lisa,
    "fewshot": fewshot,
}


def load_benchmark(
    name: str,
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    on_bad_row: str = "error",
    check_images: bool = True,
    allow_outside: bool = False,
    classes: str | Path | None = None,
    list_classes: bool = True,
) -> Rows:
    """Load a benchmark's published records as Rows.

    name: one of ADAPTERS. path: the record file (.jsonl/.json/.parquet), or the folder for lisa.
    image_root: folder the image paths are relative to (default: the file's folder).
    classes, list_classes: fewshot only; the class list file (default: `pets.txt` next to
    `pets_val.jsonl`) and whether the prompt lists the classes.
    """
    if name not in ADAPTERS:
        raise DataError(f"unknown benchmark {name!r}; valid names: {', '.join(ADAPTERS)}")
    path = Path(path)
    base = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    options: dict[str, Any] = {"list_classes": list_classes}
    if name == "fewshot":
        options["classes"] = _fewshot_classes(path, classes)
    ctx = Context(base, None if allow_outside else base, options)
    adapter = ADAPTERS[name]

    def convert(source: str, record: Any) -> list[Row]:
        if not isinstance(record, dict):
            raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
        made = adapter(source, record, ctx)
        rows = []
        for i, fields in enumerate(made):
            extra = fields.pop("extra", None)
            where = source + (f"#{i}" if len(made) > 1 else "")
            rows.append(make_row(fields, where, ctx.image_root, ctx.root, extra))
        return rows

    records = _lisa_records(path) if name == "lisa" else read_records(path)
    return build_rows(records, convert, on_bad_row, check_images)
