"""Read dataset files into validated `Row`s: JSONL, parquet, and Hugging Face `save_to_disk` folders.

`read_records` turns a file into `(source, dict)` pairs ("train.jsonl:17" for line 17,
"train.parquet[17]" for row index 17); `build_rows` validates them with `make_row`, opens the
images when asked, and either raises at the first bad row or skips and counts it. Benchmark
adapters reuse both, so skipping and image checks behave the same everywhere.

Image check policy (`check_images=True`): every image is opened and decoded in full at load
time, so a missing, corrupt, truncated or oversized file is reported at load with its row,
and never later inside a batch. For very large datasets pass `check_images=False`; the same
checks then run in `Row.load_images()` when the batch is built.

JSON goes through `limits.parse_json` (bounded depth and integer size). Hugging Face folders
are read as raw Arrow rows: `datasets` never decodes an image or audio column itself (its
decoders open any format PIL or ffmpeg knows); images go through `images.open_image` only.

`pyarrow` (parquet) and `datasets` (save_to_disk folders) are optional and imported lazily.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gpg_vlm.data.limits import parse_json
from gpg_vlm.data.schema import FIELDS, DataError, Row, boxes_of, make_row, short

log = logging.getLogger("gpg_vlm.data")

ON_BAD_ROW = ("error", "skip")


class Skipped(NamedTuple):
    source: str
    reason: str


class Rows(list):
    """A list of Rows that also carries the rows skipped with `on_bad_row="skip"`."""

    def __init__(self, rows: Iterable[Row] = (), skipped: Iterable[Skipped] = ()):
        super().__init__(rows)
        self.skipped: list[Skipped] = list(skipped)


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            source = f"{path.name}:{number}"
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield source, DataError(f"{source}: line is not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r})")
                continue
            if not text.strip():
                continue
            try:
                yield source, parse_json(text, source)
            except DataError as exc:
                yield source, exc


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a valid UTF-8 JSON file: {exc}") from None
    data = parse_json(text, str(path))
    if isinstance(data, dict):  # keyed records, e.g. MathVista's pid -> record
        for key, record in data.items():
            yield f"{path.name}[{short(key, 60)}]", record
    elif isinstance(data, list):
        for i, record in enumerate(data):
            yield f"{path.name}[{i}]", record
    else:
        raise DataError(f"{path}: expected a JSON list or object of records, got {type(data).__name__}")


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types on a broken file
        raise DataError(f"{path}: cannot read parquet: {type(exc).__name__}: {short(str(exc), 200)}") from None
    for i, record in enumerate(table.to_pylist()):
        yield f"{path.name}[{i}]", record


def _hf_disk_records(path: Path) -> Iterator[tuple[str, Any]]:
    if (path / "dataset_dict.json").is_file():
        info = parse_json((path / "dataset_dict.json").read_bytes(), str(path / "dataset_dict.json"))
        splits = info.get("splits") if isinstance(info, dict) else None
        splits = [s for s in splits if isinstance(s, str)] if isinstance(splits, list) else []
        raise DataError(f"{path}: a DatasetDict; pass one split folder, e.g. {path / (splits or ['train'])[0]}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a save_to_disk folder needs the datasets library: pip install datasets") from None
    # raw Arrow rows: image columns stay {"bytes", "path"} structs, decoded by open_image only
    ds = datasets.load_from_disk(str(path)).with_format("arrow")
    for i in range(len(ds)):
        yield f"{path.name}[{i}]", ds[i].to_pylist()[0]


def read_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(source, record) pairs of a file; a record that could not be parsed is a DataError."""
    path = Path(path)
    try:
        path.is_dir()
        if "\x00" in str(path):
            raise ValueError("a NUL byte in the path")
    except (OSError, ValueError) as exc:  # over-long name
        raise DataError(f"{short(str(path), 200)}: cannot use this path: {exc}") from None
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _hf_disk_records(path)
        raise DataError(f"{path}: a folder that is not a Hugging Face save_to_disk dataset; pass a .jsonl or .parquet file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_records(path)
    if suffix == ".json":
        return _json_records(path)
    return _jsonl_records(path)


def check_images(row: Row) -> None:
    """Decode every image of a row; for single-image grounding also check boxes lie inside it."""
    images = row.load_images()
    if row.task == "grounding" and len(images) == 1:
        w, h = images[0].size
        for box in boxes_of(row.solution):
            # one pixel of slack for annotations rounded outwards
            if box[0] < -1 or box[1] < -1 or box[2] > w + 1 or box[3] > h + 1:
                raise DataError(f"{row.source}: field 'solution' box {list(box)} lies outside the {w}x{h} image")


def _converted(convert: Callable[[str, Any], Iterable[Row]], source: str, record: Any) -> list[Row]:
    try:
        return list(convert(source, record))
    except DataError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
            RecursionError) as exc:  # a value of a type or size no check foresaw: still this row's fault
        raise DataError(f"{source}: cannot convert this record: {type(exc).__name__}: "
                        f"{short(str(exc), 200)}") from None


def build_rows(
    records: Iterable[tuple[str, Any]],
    convert: Callable[[str, Any], Iterable[Row]],
    on_bad_row: str = "error",
    check: bool = True,
) -> Rows:
    """Turn records into Rows with `convert`; raise on the first bad row or skip and count it."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    rows, skipped = [], []
    for source, record in records:
        try:
            if isinstance(record, DataError):
                raise record
            made = _converted(convert, source, record)
            if check:
                for row in made:
                    check_images(row)
        except DataError as exc:
            if on_bad_row == "error":
                raise
            skipped.append(Skipped(source, str(exc)))
            log.warning("skipped bad row %s", exc)
            continue
        rows.extend(made)
    if skipped:
        log.warning("skipped %d bad row(s), kept %d", len(skipped), len(rows))
    return Rows(rows, skipped)


@dataclass(frozen=True)
class _Folder:
    base: Path
    root: Path | None

    def row(self, source: str, record: Any) -> list[Row]:
        return [make_row(record, source, self.base, self.root)]


def load_rows(
    path: str | Path,
    on_bad_row: str = "error",
    check_images: bool = True,
    allow_outside: bool = False,
) -> Rows:
    """Load a dataset in the gpg_vlm schema (data/README.md) from JSONL, parquet or save_to_disk.

    Image paths are resolved against the file's folder and must stay inside it unless
    `allow_outside`. Returns a list of Rows with `.skipped` (source, reason) for skipped rows.
    """
    path = Path(path)
    base = path if path.is_dir() else path.parent
    folder = _Folder(base, None if allow_outside else base)
    return build_rows(read_records(path), folder.row, on_bad_row, check_images)


def _plain(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        try:
            return value.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            return str(value)
    if isinstance(value, tuple):
        return [_plain(v, base) for v in value]
    return value


def save_jsonl(rows: Iterable[Row], path: str | Path) -> None:
    """Write Rows as schema JSONL; image paths relative to the file's folder, `extra` as top-level keys."""
    path = Path(path)
    lines = []
    for row in rows:
        if not all(isinstance(i, Path) for i in row.images):
            raise DataError(f"{row.source}: only rows whose images are files can be saved as JSONL")
        images = [_plain(i, path.parent) for i in row.images]
        record: dict[str, Any] = {"image": images[0] if len(images) == 1 else (images or None)}
        record.update(problem=row.problem, solution=row.solution, task=row.task)
        if row.choices is not None:
            record["choices"] = row.choices
        if row.system is not None:
            record["system"] = row.system
        clash = set(row.extra) & set(FIELDS)
        if clash:
            raise DataError(f"{row.source}: extra keys {sorted(clash)} clash with schema fields")
        record.update(row.extra)
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
