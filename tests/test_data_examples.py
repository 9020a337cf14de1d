"""data/README.md runs: its schema block is data/examples/rows.jsonl, its snippets run on the
example files, and its table of planted mistakes is what `load_rows` reports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpg_vlm.data import DataError, load_rows

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "data" / "examples"
README = (ROOT / "data" / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_schema_block_is_the_example_file():
    (schema,) = [b for b in blocks("json") if '"task"' in b]
    assert schema == (EXAMPLES / "rows.jsonl").read_text(encoding="utf-8")


def test_example_rows_load_with_their_images_and_cover_every_task():
    rows = load_rows(EXAMPLES / "rows.jsonl")  # check_images: every image decoded
    assert len(rows) == 6 and not rows.skipped
    assert {r.task for r in rows} == {"grounding", "classification", "reasoning"}
    assert any(len(r.images) == 2 for r in rows) and any(not r.images for r in rows)
    assert rows[5].extra == {"id": "text-only-1"}
    for r in rows:
        for image in r.load_images():
            assert image.mode == "RGB"
    sizes = [p.stat().st_size for p in (EXAMPLES / "images").iterdir()]
    assert sizes and sum(sizes) < 16_000  # tiny images, a few KB in all


def test_the_loading_snippet_runs_as_written(monkeypatch):
    (snippet,) = [b for b in blocks("python") if "data/examples/" in b]
    monkeypatch.chdir(ROOT)  # its paths are relative to the checkout, as a reader runs them
    names: dict = {}
    exec(compile(snippet, "data/README.md", "exec"), names)
    assert names["rows"][0].image_sizes == [(64, 32)]
    assert len(names["bad"]) == 2


def test_the_planted_mistakes_are_reported_as_the_table_says(monkeypatch):
    table = re.findall(r"^\| (\d+) \| `(.+?)` \|$", README, flags=re.M)
    assert len(table) == 5
    monkeypatch.chdir(ROOT)  # messages name paths as given, here as the README's snippet gives them
    bad = load_rows("data/examples/bad_rows.jsonl", on_bad_row="skip")
    assert [s.source for s in bad.skipped] == [f"bad_rows.jsonl:{line}" for line, _ in table]
    for skipped, (line, reason) in zip(bad.skipped, table):
        assert skipped.reason.startswith(f"bad_rows.jsonl:{line}: {reason}"), skipped.reason
    with pytest.raises(DataError, match=re.escape(f"bad_rows.jsonl:2: {table[0][1]}")):
        load_rows(EXAMPLES / "bad_rows.jsonl")
