"""Benchmark adapters: the real record files in ../shared/benchmarks (when present) and our own fixtures."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from gpg_vlm.data import DataError, load_benchmark

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


def png_bytes(size=(64, 48), color=(0, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(DataError, match="unknown benchmark 'mmmu'; valid names: cvbench, sat, superclevr, geoqa, mathvista"):
        load_benchmark("mmmu", "x.jsonl")


# ---- real record files ----------------------------------------------------------------------


def test_real_superclevr_counting():
    rows = load_benchmark("superclevr", shared("superclevr_test200_counting_problems.jsonl"), check_images=False)
    assert len(rows) == 200 and all(r.task == "reasoning" and isinstance(r.solution, int) for r in rows)
    assert rows[0].solution == 4 and rows[0].images[0].name == "superCLEVR_new_025000.png"
    assert rows[0].images[0].parent == SHARED.resolve() / "images" or rows[0].images[0].parent == SHARED / "images"


def test_real_geoqa():
    rows = load_benchmark("geoqa", shared("geoqa_test_prompts.jsonl"), check_images=False)
    assert len(rows) == 754 and rows[0].solution == "140°" and rows[0].source == "geoqa_test_prompts.jsonl:1"
    assert rows[753].images[0].as_posix().endswith("Geo170K/images/test/753.png")


def test_real_mathvista_testmini():
    rows = load_benchmark("mathvista", shared("mathvista_testmini.json"), check_images=False)
    assert len(rows) == 1000
    multi = [r for r in rows if r.extra["question_type"] == "multi_choice"]
    assert len(multi) == 540 and all(r.choices and r.solution in r.choices for r in multi)
    assert all("(A) " in r.problem for r in multi)
    by_pid = {r.extra["pid"]: r for r in rows}
    assert by_pid["1"].solution == 1.2 and by_pid["1"].extra["precision"] == 1 and by_pid["1"].choices is None
    assert by_pid["225"].solution == [0, 2, 0, 2, 1, 7, 1, 2, 0, 3, 0, 6]
    assert by_pid["3"].solution == "145°" and "(C) 145°" in by_pid["3"].problem
    kinds = Counter(type(r.solution).__name__ for r in rows if r.choices is None)
    assert kinds == {"int": 418, "float": 40, "list": 2}
    with_unit = [r for r in rows if r.extra["unit"]]
    assert len(with_unit) == 50 and all(f"(Unit: {r.extra['unit']})" in r.problem for r in with_unit)
    assert Counter(r.extra["category"] for r in rows)["figure question answering"] > 0


@pytest.mark.parametrize("name, count, classes", [("pets", 3669, 37), ("oxford_flowers", 2463, 102),
                                                  ("fgvc_aircraft", 3333, 100), ("stanford_cars", 8041, 196)])
def test_real_fewshot_validation_sets(name, count, classes, tmp_path):
    rows = load_benchmark("fewshot", shared(f"{name}_val.jsonl"), check_images=False, image_root=tmp_path)
    assert len(rows) == count
    assert all(r.task == "classification" and len(r.choices) == classes and r.solution == r.choices[r.extra["label"]]
               for r in rows)
    # the authors' absolute paths are looked up by file name under image_root
    assert all(r.images[0].parent == tmp_path for r in rows)


# ---- our own fixtures, with generated images -------------------------------------------------


def test_cvbench_fixture_with_images(tmp_path):
    root = tmp_path / "cvb"
    shutil.copy(FIXTURES / "cvbench_test_2d.jsonl", root.mkdir() or root)
    for rec in map(json.loads, (root / "cvbench_test_2d.jsonl").read_text().splitlines()):
        (root / rec["filename"]).parent.mkdir(parents=True, exist_ok=True)
        (root / rec["filename"]).write_bytes(png_bytes())
    rows = load_benchmark("cvbench", root / "cvbench_test_2d.jsonl")
    assert [r.solution for r in rows] == ["1", "right", "bed"]
    assert [(r.extra["type"], r.extra["category"]) for r in rows] == [("2D", "Count"), ("2D", "Relation"), ("3D", "Depth")]
    assert rows[0].choices == ["3", "2", "1", "0"] and rows[0].problem.endswith("(C) 1\n(D) 0")
    assert rows[0].extra["answer"] == "(C)" and rows[0].load_images()[0].size == (64, 48)


def test_cvbench_bad_answer_letter():
    path = FIXTURES / "cvbench_test_2d.jsonl"
    rows = load_benchmark("cvbench", path, check_images=False)
    assert len(rows) == 3


def test_cvbench_answer_out_of_range(tmp_path):
    rec = json.loads((FIXTURES / "cvbench_test_2d.jsonl").read_text().splitlines()[0])
    rec["answer"] = "(F)"
    (tmp_path / "t.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'answer' '\(F\)' does not name one of 4 choices"):
        load_benchmark("cvbench", tmp_path / "t.jsonl", check_images=False)
    assert load_benchmark("cvbench", tmp_path / "t.jsonl", check_images=False, on_bad_row="skip").skipped


def test_refcoco_vlmr1_json_form(tmp_path):
    for name in ("img_a", "img_b"):
        (tmp_path / "coco").mkdir(exist_ok=True)
        (tmp_path / "coco" / f"{name}.png").write_bytes(png_bytes())
    rows = load_benchmark("refcoco", FIXTURES / "refcoco_vlmr1.json", image_root=tmp_path)
    assert [r.solution for r in rows] == [[4, 6, 20, 30], [10.5, 2.0, 30.25, 18.0]]
    assert all(r.task == "grounding" for r in rows) and rows[0].extra["expression"] == "the red square on the left"
    assert "the red square on the left" in rows[0].problem and rows[0].extra["normal_caption"] == "a red square"


def test_refcoco_lmms_lab_parquet_form(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "question_id": ["q1", "q2"],
        "image": [{"bytes": png_bytes(), "path": None}, {"bytes": png_bytes(), "path": None}],
        "file_name": ["a.jpg", "b.jpg"],
        "answer": [["left dog", "the brown dog"], ["man in red"]],
        "bbox": [[10.0, 5.0, 20.0, 30.0], [0.0, 0.0, 64.0, 48.0]],
    })
    pq.write_table(table, tmp_path / "val.parquet")
    rows = load_benchmark("refcoco", tmp_path / "val.parquet")
    assert [r.solution for r in rows] == [[10.0, 5.0, 30.0, 35.0]] * 2 + [[0.0, 0.0, 64.0, 48.0]]
    assert [r.source for r in rows] == ["val.parquet[0]#0", "val.parquet[0]#1", "val.parquet[1]"]
    assert rows[1].extra["expression"] == "the brown dog" and rows[2].extra["question_id"] == "q2"


def test_sat_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "image_bytes": [[png_bytes(), png_bytes((32, 32))], [png_bytes()], [b"not an image"]],
        "question": ["Did the camera move left?", "Is the box closer than the ball?", "?"],
        "answers": [["yes", "no"], ["yes", "no"], ["a", "b"]],
        "question_type": ["ego_movement", "depth", "x"],
        "correct_answer": ["no", "yes", "a"],
    })
    pq.write_table(table, tmp_path / "sat.parquet")
    rows = load_benchmark("sat", tmp_path / "sat.parquet", on_bad_row="skip")
    assert len(rows) == 2 and [s.source for s in rows.skipped] == ["sat.parquet[2]"]
    assert rows[0].image_sizes == [(64, 48), (32, 32)] and rows[0].solution == "no"
    assert rows[0].choices == ["yes", "no"] and "(B) no" in rows[0].problem
    assert rows[1].extra["category"] == "depth"


def test_lisa_reasonseg_polygons_to_box(tmp_path):
    shutil.copytree(FIXTURES / "lisa", tmp_path / "lisa")
    for stem in ("scene_a", "scene_b"):
        Image.new("RGB", (64, 64)).save(tmp_path / "lisa" / f"{stem}.jpg")
    rows = load_benchmark("lisa", tmp_path / "lisa")
    # scene_a: the union of both target polygons, the 'ignore' polygon left out
    assert [r.solution for r in rows] == [[5.0, 8.0, 35.0, 30.0]] * 2 + [[1, 2, 10, 40]]
    assert [r.source for r in rows] == ["scene_a.json#0", "scene_a.json#1", "scene_b.json"]
    assert rows[1].problem.endswith("where would you put a plate?") and rows[0].extra["is_sentence"] is True


def test_lisa_without_target_polygon(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"text": ["t"], "shapes": [{"label": "ignore", "points": [[0, 0]]}]}))
    with pytest.raises(DataError, match=r"x\.json: field 'shapes' has no 'target' polygon"):
        load_benchmark("lisa", tmp_path, check_images=False)


def test_fewshot_fixture_with_images(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("cat_1", "dog_1"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "cat_2.png")
    rows = load_benchmark("fewshot", FIXTURES / "tinypets_val.jsonl", image_root=tmp_path)
    assert [r.solution for r in rows] == ["tabby cat", "golden retriever", "siamese cat"]
    assert rows[0].problem.endswith("Answer with one of: tabby cat; golden retriever; siamese cat.")
    short = load_benchmark("fewshot", FIXTURES / "tinypets_val.jsonl", image_root=tmp_path, list_classes=False)
    assert short[0].problem == "What is the category of this image?"


def test_fewshot_label_mismatch_is_an_error(tmp_path):
    (tmp_path / "c.txt").write_text("a\nb\n")
    (tmp_path / "c_val.jsonl").write_text(json.dumps({"image_path": "x.png", "label": 1, "class_name": "a"}) + "\n")
    with pytest.raises(DataError, match=r"c_val\.jsonl:1: field 'label' 1 \(b\) does not match class_name 'a'"):
        load_benchmark("fewshot", tmp_path / "c_val.jsonl", check_images=False)
    with pytest.raises(DataError, match="class list .*missing.txt not found"):
        load_benchmark("fewshot", tmp_path / "c_val.jsonl", classes=tmp_path / "missing.txt")


def test_benchmark_images_must_stay_under_image_root(tmp_path):
    (tmp_path / "g.jsonl").write_text(json.dumps({"image_path": "../../etc/x.png", "question": "q", "ground_truth": "1"}) + "\n")
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'image': .*outside the dataset folder"):
        load_benchmark("geoqa", tmp_path / "g.jsonl", check_images=False)
