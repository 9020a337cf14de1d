"""The one dataset schema: the `Row` dataclass and the validation of a raw record into it.

Every source (JSONL, Hugging Face datasets, parquet, benchmark adapters, the Fashion-MNIST
suite) ends in `make_row`, so a field is checked the same way wherever it came from and
every error names the row (`Row.source`, e.g. "train.jsonl:17") and the field.
The field meanings are documented in data/README.md.

Text that reaches the prompt (`problem`, `system`, `choices`) may not hold the Qwen-VL
control tokens in `CONTROL_TOKENS`: a tokenizer reads them as tokens, not text, so a row
could forge a chat turn (`<|im_start|>assistant`) or an image slot (`<|image_pad|>`). Once a
tokenizer is loaded, `data.prompts.check_prompts` also refuses its own special tokens.
Image paths with a NUL byte or a name longer than the file system allows are refused here,
never handed to the OS.

Deliberately left out: prompt rendering (chat templates belong to the VLM adapter) and
reward logic (rewards/ reads `solution`, `choices` and `task`, nothing else).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpg_vlm.data.errors import DataError
from gpg_vlm.data.images import image_size, open_image

TASKS = ("grounding", "classification", "reasoning")
FIELDS = ("image", "problem", "solution", "task", "choices", "system")
# Special tokens of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizers (chat turns, vision slots,
# boxes, fill-in-the-middle); tokenizers match them inside any text.
CONTROL_TOKENS = tuple(f"<|{name}|>" for name in (
    "endoftext", "im_start", "im_end", "vision_start", "vision_end", "vision_pad", "image_pad",
    "video_pad", "object_ref_start", "object_ref_end", "box_start", "box_end", "quad_start",
    "quad_end", "fim_prefix", "fim_middle", "fim_suffix", "fim_pad", "repo_name", "file_sep"))
_CONTROL = re.compile("|".join(re.escape(t) for t in CONTROL_TOKENS))
# Linux limits: 255 bytes per path component, 4096 per path
MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 4096


@dataclass(frozen=True)
class Row:
    """One prompt with its verifiable solution.

    `images` holds file paths (already resolved against the dataset folder), encoded bytes or
    in-memory PIL images, in prompt order. `root` is the folder image paths must stay inside
    (None when the caller allowed paths outside it).
    """

    images: tuple[Any, ...]
    problem: str
    solution: Any
    task: str
    choices: list[str] | None = None
    system: str | None = None
    source: str = "<memory>"
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None

    def load_images(self) -> list:
        """Decode every image as RGB; raises DataError naming source, field and file."""
        return [open_image(self._checked(i), self.image_where(i)) for i in range(len(self.images))]

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """Original (W, H) of each image, read from the headers only."""
        return [image_size(self._checked(i), self.image_where(i)) for i in range(len(self.images))]

    def image_where(self, i: int) -> str:
        """The prefix of every message about image i (SOURCE: field 'image'[i])."""
        return f"{self.source}: field 'image'" + (f"[{i}]" if len(self.images) > 1 else "")

    def _checked(self, i: int) -> Any:
        src = self.images[i]
        if self.root is not None and isinstance(src, (str, os.PathLike)):
            check_inside(Path(src), self.root, self.image_where(i))
        return src


def check_inside(path: Path, root: Path, where: str) -> None:
    """Refuse a path that leaves `root` (via '..', an absolute path or a symlink)."""
    try:
        real, real_root = path.resolve(), root.resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # symlink loop, NUL byte
        raise DataError(f"{where}: cannot resolve image path {str(path)[:300]!r}: {exc}") from None
    if real != real_root and real_root not in real.parents:
        raise DataError(
            f"{where}: image path {path} resolves to {real}, outside the dataset folder {real_root}; "
            "pass allow_outside=True to permit it"
        )


def resolve_image(value: Any, where: str, base_dir: Path | None, root: Path | None) -> Any:
    """One image value -> a path (resolved against `base_dir`), bytes or a PIL image."""
    if isinstance(value, dict):  # Hugging Face / parquet image struct
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise DataError(f"{where}: image struct has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise DataError(f"{where}: image bytes are empty")
        return bytes(value)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: image path is an empty string")
        check_path_text(value, where)
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if root is not None:
            check_inside(path, root, where)
        return path
    if type(value).__module__.startswith("PIL."):
        return value
    raise DataError(f"{where}: expected a path, bytes or image, got {type(value).__name__}")


def check_path_text(value: str, where: str) -> None:
    """Refuse a path string no file system accepts (NUL byte, over-long name or path)."""
    if "\x00" in value:
        raise DataError(f"{where}: image path {value[:80]!r} contains a NUL byte")
    encoded = value.encode("utf-8", "surrogateescape")
    longest = max(len(part) for part in encoded.split(b"/"))
    if longest > MAX_NAME_BYTES or len(encoded) > MAX_PATH_BYTES:
        raise DataError(f"{where}: image path {value[:60]!r}... is too long ({len(encoded)} bytes, "
                        f"a name of {longest}; the limits are {MAX_PATH_BYTES} and {MAX_NAME_BYTES})")


def check_text(value: str, name: str, where: str) -> None:
    """Refuse prompt text that holds a control token (module docstring)."""
    m = _CONTROL.search(value)
    if m:
        raise DataError(f"{where}: field {name!r} holds the control token {m.group(0)} at character "
                        f"{m.start()}; the model would read it as a chat turn or image slot, not as text")


def short(value: Any, limit: int = 80) -> str:
    """repr of a value for a one-line message, cut to `limit` characters."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # too deep, or an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _is_number(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:  # an int beyond the float range is not a usable coordinate or value
        return math.isfinite(float(x))
    except OverflowError:
        return False


def check_box(box: Any, where: str) -> None:
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
        raise DataError(f"{where}: a grounding box must be 4 numbers [x1, y1, x2, y2], got {short(box)}")
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        raise DataError(f"{where}: box {list(box)} has x2 < x1 or y2 < y1 (expected xyxy, not xywh?)")


def boxes_of(solution: Any) -> list:
    """A grounding solution is one box or a list of boxes; return the list of boxes."""
    if isinstance(solution, (list, tuple)) and solution and isinstance(solution[0], (list, tuple)):
        return list(solution)
    return [solution]


def _check_solution(solution: Any, task: str, where: str) -> None:
    if isinstance(solution, bool) or solution is None:
        raise DataError(f"{where}: field 'solution' must be a string, number or list, got {short(solution)}")
    if isinstance(solution, (int, float)) and not _is_number(solution):
        raise DataError(f"{where}: field 'solution' is not a finite number within the float range: "
                        f"{str(solution)[:40]}")
    if not isinstance(solution, (str, int, float, list, tuple)):
        raise DataError(f"{where}: field 'solution' must be a string, number or list, got {type(solution).__name__}")
    if task == "grounding":
        for box in boxes_of(solution):
            check_box(box, f"{where}: field 'solution'")
    elif task == "classification" and not (isinstance(solution, str) and solution.strip()):
        raise DataError(f"{where}: field 'solution' of a classification row must be the class name (a string)")


def _optional_str(record: dict, name: str, where: str) -> str | None:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if value is not None:
        check_text(value, name, where)
    return value


def make_row(
    record: Any,
    source: str,
    base_dir: Path | None = None,
    root: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Row:
    """Validate one raw record (schema field names) into a Row; raise DataError naming the field.

    Keys outside the schema are kept in `Row.extra` (benchmark fields for reporting).
    """
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
    for name in ("problem", "solution", "task"):
        if name not in record:
            raise DataError(f"{source}: missing field {name!r}")
    task = record["task"]
    if task not in TASKS:
        raise DataError(f"{source}: field 'task' is {short(task)}; expected one of {', '.join(TASKS)}")
    problem = record["problem"]
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{source}: field 'problem' must be a non-empty string, got {short(problem, 60)}")
    check_text(problem, "problem", source)
    solution = record["solution"]
    _check_solution(solution, task, source)
    if isinstance(solution, tuple):
        solution = list(solution)

    raw = record.get("image")
    if raw is None:
        values: list = []
    elif isinstance(raw, (list, tuple)):
        values = list(raw)
    else:
        values = [raw]
    many = isinstance(raw, (list, tuple))
    images = tuple(
        resolve_image(v, f"{source}: field 'image'" + (f"[{i}]" if many else ""), base_dir, root)
        for i, v in enumerate(values)
    )

    choices = record.get("choices")
    if choices is not None:
        if not (isinstance(choices, (list, tuple)) and choices and all(isinstance(c, str) for c in choices)):
            raise DataError(f"{source}: field 'choices' must be a non-empty list of strings, got {short(choices)}")
        choices = list(choices)
        for i, choice in enumerate(choices):
            check_text(choice, f"choices[{i}]", source)
        if str(solution) not in choices:
            raise DataError(f"{source}: field 'solution' {short(solution)} is not one of the choices {short(choices, 200)}")
    kept = {k: v for k, v in record.items() if k not in FIELDS}
    kept.update(extra or {})
    return Row(
        images=images,
        problem=problem,
        solution=solution,
        task=task,
        choices=choices,
        system=_optional_str(record, "system", source),
        source=source,
        extra=kept,
        root=root,
    )
