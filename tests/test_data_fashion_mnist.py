"""The Fashion-MNIST task suite: exact boxes and counts, determinism, split hygiene, sample fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from gpg_vlm.data import DataError, load_rows
from gpg_vlm.data import fashion_mnist as fm
from gpg_vlm.data.prepare import main as prepare

SIZE = fm.SIDE * fm.SIDE


def synthetic_source(folder: Path) -> Path:
    """idx files whose train items are a solid 200 block and t10k items a solid 100 block.

    Item `i` of class c covers rows/columns [4, 24) of its 28x28 square, so its scaled box is known.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, value in (("train", 200), ("t10k", 100)):
        item = bytes(value if 4 <= r < 24 and 4 <= c < 24 else 0 for r in range(28) for c in range(28))
        labels = bytes(i % 10 for i in range(30))
        fm.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", (30, 28, 28), item * 30)
        fm.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (30,), labels)
    return folder


def ink_box(img: Image.Image, box=None):
    crop = img.convert("L") if box is None else img.convert("L").crop(box)
    return crop.point(lambda v: 255 if v > fm.INK else 0).getbbox()


def test_committed_sample_is_small_balanced_and_readable():
    total = sum(p.stat().st_size for p in fm.SAMPLE_DIR.iterdir())
    assert total < 1_000_000
    for split in fm.SPLITS:
        data = fm.load_split(split, fm.SAMPLE_DIR)
        assert len(data) == 10 * fm.SAMPLE_PER_CLASS
        assert [len(p) for p in data.by_class()] == [fm.SAMPLE_PER_CLASS] * 10


def test_committed_sample_matches_the_debian_files(tmp_path):
    if not (fm.DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    fm.write_sample(tmp_path, fm.SAMPLE_PER_CLASS, fm.DEBIAN_DIR)
    for split in fm.SPLITS:
        ours, committed = fm.load_split(split, tmp_path), fm.load_split(split, fm.SAMPLE_DIR)
        assert ours.pixels == committed.pixels and ours.labels == committed.labels


def test_fallback_to_sample_is_logged_and_can_be_refused(monkeypatch, caplog):
    monkeypatch.setattr(fm, "DEBIAN_DIR", Path("/nonexistent/fashion-mnist"))
    with caplog.at_level(logging.WARNING, logger="gpg_vlm.data"):
        assert fm.find_source() == fm.SAMPLE_DIR
    assert "using the small committed sample" in caplog.text
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fm.find_source(require_full=True)


def test_read_idx_rejects_a_wrong_length(tmp_path):
    fm.write_idx(tmp_path / "x.gz", (3, 28, 28), b"\0" * 10)
    with pytest.raises(DataError, match=r"x\.gz: idx header says \(3, 28, 28\)"):
        fm.read_idx(tmp_path / "x.gz")


@pytest.mark.parametrize("real", [False, True])
def test_grounding_boxes_are_exact(tmp_path, real):
    src = fm.SAMPLE_DIR if real else synthetic_source(tmp_path / "src")
    rows = fm.build_tasks("grounding", "train", 40, seed=1, out_dir=tmp_path / "out", source=src)
    for r in rows:
        img = Image.open(r.images[0])
        assert r.task == "grounding" and 112 <= img.width == img.height <= 224
        boxes = [it["box"] for it in r.extra["items"]]
        assert 1 <= len(boxes) <= 3 and r.solution in boxes
        assert len({it["class"] for it in r.extra["items"]}) == len(boxes)  # "the sneaker" is unambiguous
        for b in boxes:  # the ink inside a box fills it edge to edge
            assert ink_box(img, b) == (0, 0, b[2] - b[0], b[3] - b[1])
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
        assert ink_box(img) == union  # no ink outside the boxes
        name = r.problem.removeprefix("Where is the ").split("?")[0]
        assert [it["box"] for it in r.extra["items"] if it["class"] == name] == [r.solution]


def test_counting_and_spatial_answers_match_the_scene(tmp_path):
    src = synthetic_source(tmp_path / "src")
    counts = fm.build_tasks("counting", "test", 40, seed=2, out_dir=tmp_path / "out", source=src)
    plurals = dict(zip(fm.PLURALS, fm.CLASS_NAMES))
    for r in counts:
        name = plurals[r.problem.removeprefix("How many ").removesuffix(" are there?")]
        assert r.solution == sum(it["class"] == name for it in r.extra["items"]) and 0 <= r.solution <= 5
        assert len(r.extra["items"]) <= 5
    assert {r.solution for r in counts} >= {0, 1, 2, 3}
    spatial = fm.build_tasks("spatial", "test", 40, seed=2, out_dir=tmp_path / "out", source=src)
    for r in spatial:
        a, b = r.extra["items"]
        assert r.problem == f"Is the {a['class']} to the left or to the right of the {b['class']}?"
        assert a["box"][2] <= b["box"][0] or b["box"][2] <= a["box"][0]  # apart along x
        assert r.solution == ("left" if a["box"][0] < b["box"][0] else "right") and r.choices == ["left", "right"]
    assert {r.solution for r in spatial} == {"left", "right"}


def test_classification_rows(tmp_path):
    rows = fm.build_tasks("classification", "train", 20, seed=0, out_dir=tmp_path, image_size=40, source=fm.SAMPLE_DIR)
    data = fm.load_split("train", fm.SAMPLE_DIR)
    for r in rows:
        (item,) = r.extra["items"]
        assert r.choices == list(fm.CLASS_NAMES) and r.solution == item["class"] == fm.CLASS_NAMES[data.labels[item["index"]]]
        expected = data.image(item["index"]).resize((40, 40), Image.Resampling.BILINEAR)
        assert Image.open(r.images[0]).tobytes() == expected.tobytes()


def test_train_rows_use_only_train_images_and_test_rows_only_t10k(tmp_path):
    src = synthetic_source(tmp_path / "src")
    for split, value in (("train", 200), ("test", 100)):
        for task in fm.TASKS:
            for r in fm.build_tasks(task, split, 8, seed=3, out_dir=tmp_path / "out", source=src):
                colors = {v for _, v in Image.open(r.images[0]).convert("L").getcolors()}
                assert max(colors) <= value and (value in colors or r.extra["items"] == [])
                assert r.extra["split"] == split
    with pytest.raises(DataError, match="was given the 'test' split"):
        fm.build_tasks("grounding", "train", 1, 0, tmp_path, source=fm.load_split("test", src))


def test_prepare_data_cli_is_deterministic(tmp_path):
    args = ["fashion-mnist", "--train-size", "6", "--test-size", "4", "--source", str(fm.SAMPLE_DIR), "--seed", "5"]
    assert prepare([*args, "--out", str(tmp_path / "a")]) == 0
    assert prepare([*args, "--out", str(tmp_path / "b")]) == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files_a) == 8 + 4 * (6 + 4)
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    other = tmp_path / "c"
    assert prepare([*args[:-1], "6", "--out", str(other), "--tasks", "grounding"]) == 0
    assert (other / "grounding_train.jsonl").read_bytes() != (tmp_path / "a" / "grounding_train.jsonl").read_bytes()
    for task, kind in fm.TASKS.items():
        rows = load_rows(tmp_path / "a" / f"{task}_train.jsonl")
        assert len(rows) == 6 and all(r.task == kind and r.extra["suite_task"] == task for r in rows)


def test_prepare_data_reports_errors(tmp_path, capsys):
    assert prepare(["fashion-mnist", "--out", str(tmp_path), "--source", str(tmp_path / "none")]) == 1
    assert "cannot read gzipped idx file" in capsys.readouterr().err
