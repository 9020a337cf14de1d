"""The dataset schema, safe image loading and `load_rows`: bad rows give clear errors or counted skips."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest
from PIL import Image

from gpg_vlm.data import DataError, Row, load_rows, make_row, save_jsonl
from gpg_vlm.data.images import MAX_PIXELS, image_size, open_image
from helpers import bomb_png, png, write_jsonl


def row(i: int, **kw) -> dict:
    return {"image": f"img/{i}.png", "problem": "What value is this?", "solution": str(i), "task": "reasoning", **kw}


# ---- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, color, expected",
    [
        ("L", 7, (7, 7, 7)),
        ("LA", (200, 0), (255, 255, 255)),  # fully transparent -> the white background
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),  # no ink is white
        ("I;16", 65535, (255, 255, 255)),  # 16 bits scaled to 8
        ("I;16", 256 * 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_modes_convert_to_rgb(tmp_path, mode, color, expected):
    path = tmp_path / "x.tiff"
    Image.new(mode, (3, 2), color).save(path)
    img = open_image(path, "t:1")
    assert img.mode == "RGB" and img.size == (3, 2)
    assert img.getpixel((1, 1)) == expected


def test_palette_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (2, 2), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "p.png", transparency=0)
    rgb = open_image(tmp_path / "p.png", "t:1")
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (255, 0, 0)


def test_float_images_are_rejected(tmp_path):
    Image.new("F", (2, 2), 0.5).save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match=r"t:1: .*f\.tiff.*mode F"):
        open_image(tmp_path / "f.tiff", "t:1")


def test_missing_corrupt_truncated_and_bomb_images(tmp_path):
    with pytest.raises(DataError, match="t:1: image file not found"):
        open_image(tmp_path / "nope.png", "t:1")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"cannot read image .*junk\.png"):
        open_image(tmp_path / "junk.png", "t:1")
    Image.effect_noise((64, 64), 50).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png is corrupt or truncated"):
        open_image(tmp_path / "cut.png", "t:1")
    bomb_png(tmp_path / "bomb.png")
    with pytest.raises(DataError, match=r"bomb\.png.*(over the limit|decompression.bomb)"):
        image_size(tmp_path / "bomb.png", "t:1")
    assert Image.MAX_IMAGE_PIXELS is not None and MAX_PIXELS <= 2 * Image.MAX_IMAGE_PIXELS


def test_image_sources_bytes_pil_and_hf_struct(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (5, 4), 9).save(buf, "PNG")
    pil = Image.new("RGBA", (2, 3), (1, 2, 3, 255))
    r = make_row({"image": [buf.getvalue(), pil, {"bytes": None, "path": "a.png"}], "problem": "p",
                  "solution": 1, "task": "reasoning"}, "t:1", base_dir=tmp_path)
    png(tmp_path / "a.png", size=(7, 6))
    assert r.image_sizes == [(5, 4), (2, 3), (7, 6)]
    assert [im.mode for im in r.load_images()] == ["RGB"] * 3


# ---- schema validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, message",
    [
        ({"problem": "p", "task": "reasoning"}, "missing field 'solution'"),
        (row(1, task="detection"), "field 'task' is 'detection'; expected one of grounding"),
        (row(1, problem=3), "field 'problem' must be a non-empty string"),
        (row(1, solution=None), "field 'solution'"),
        (row(1, solution=True), "field 'solution'"),
        (row(1, solution={"a": 1}), "field 'solution' must be a string, number or list"),
        (row(1, image=5), r"field 'image': expected a path"),
        (row(1, image=["a.png", 7]), r"field 'image'\[1\]"),
        (row(1, choices="abc"), "field 'choices' must be a non-empty list of strings"),
        (row(1, choices=["0", "2"]), "field 'solution' '1' is not one of the choices"),
        (row(1, system=["x"]), "field 'system' must be a string"),
        (row(1, task="grounding", solution=[1, 2, 3]), "box must be 4 numbers"),
        (row(1, task="grounding", solution=[10, 2, 3, 40]), "x2 < x1"),
        (row(1, task="classification", solution=3), "must be the class name"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_make_row_errors_name_source_and_field(record, message):
    with pytest.raises(DataError, match=r"^src\.jsonl:4: .*" + message):
        make_row(record, "src.jsonl:4", base_dir=Path("/data"))


def test_valid_row_fields_and_extra():
    r = make_row(row(3, choices=["3", "4"], system="be brief", id=17), "f.jsonl:1", base_dir=Path("/d"))
    assert r.images == (Path("/d/img/3.png"),) and r.solution == "3" and r.choices == ["3", "4"]
    assert r.system == "be brief" and r.extra == {"id": 17} and r.source == "f.jsonl:1"
    boxes = make_row(row(1, task="grounding", solution=[[0, 0, 1, 1], [2, 2, 3, 3]], image=None), "f:2")
    assert boxes.images == () and boxes.solution == [[0, 0, 1, 1], [2, 2, 3, 3]]


# ---- load_rows ------------------------------------------------------------------------------


def planted(tmp_path: Path) -> Path:
    """Six good rows (image value == solution) with planted bad rows in between."""
    for i in range(6):
        png(tmp_path / "img" / f"{i}.png", value=10 * i)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    bomb_png(tmp_path / "img" / "bomb.png")
    good = [dict(row(i), solution=str(10 * i)) for i in range(6)]
    records = [
        good[0],
        row(9, image="img/missing.png"),  # line 2
        good[1],
        row(9, image="img/corrupt.png"),  # line 4
        good[2],
        dict(row(2), solution={"wrong": "type"}),  # line 6
        good[3],
        row(9, image="img/bomb.png"),  # line 8
        b'{"image": "img/0.png", "problem": "\xff\xfe", "solution": "0", "task": "reasoning"}',  # line 9
        b'{"image": "img/0.png", "problem": ',  # line 10
        good[4],
        row(0, task="segmentation"),  # line 12
        good[5],
    ]
    return write_jsonl(tmp_path / "train.jsonl", records)


def test_planted_bad_rows_error_with_file_line_and_field(tmp_path):
    path = planted(tmp_path)
    with pytest.raises(DataError, match=r"^train\.jsonl:2: field 'image': image file not found: .*missing\.png"):
        load_rows(path)
    lines = path.read_bytes().split(b"\n")
    cases = {
        4: r"train\.jsonl:4: field 'image': .*corrupt\.png",
        6: r"train\.jsonl:6: field 'solution'",
        8: r"train\.jsonl:8: field 'image': .*bomb\.png.*decompression.bomb",
        9: r"train\.jsonl:9: line is not valid UTF-8",
        10: r"train\.jsonl:10: invalid JSON",
        12: r"train\.jsonl:12: field 'task' is 'segmentation'",
    }
    for line, message in cases.items():
        # keep one bad line at a time: every other bad line is blanked out
        keep = [l if (i + 1) == line or (i + 1) not in (2, *cases) else b"" for i, l in enumerate(lines)]
        path.write_bytes(b"\n".join(keep))
        with pytest.raises(DataError, match="^" + message):
            load_rows(path)


def test_planted_bad_rows_skipped_counted_logged_and_never_misaligned(tmp_path, caplog):
    path = planted(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gpg_vlm.data"):
        rows = load_rows(path, on_bad_row="skip")
    assert [s.source for s in rows.skipped] == [f"train.jsonl:{n}" for n in (2, 4, 6, 8, 9, 10, 12)]
    assert len(rows) == 6 and [r.source for r in rows] == [f"train.jsonl:{n}" for n in (1, 3, 5, 7, 11, 13)]
    for r in rows:  # every kept row still sees its own image
        assert r.load_images()[0].getpixel((0, 0)) == (int(r.solution),) * 3
    assert "train.jsonl:8" in caplog.text and "skipped 7 bad row(s), kept 6" in caplog.text


def test_check_images_false_defers_checks_to_load_images(tmp_path):
    path = planted(tmp_path)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:5]))
    rows = load_rows(path, check_images=False)
    assert len(rows) == 5
    with pytest.raises(DataError, match=r"train\.jsonl:2: field 'image'.*missing\.png"):
        rows[1].load_images()


def test_on_bad_row_value_is_checked(tmp_path):
    with pytest.raises(ValueError, match="on_bad_row"):
        load_rows(write_jsonl(tmp_path / "a.jsonl", []), on_bad_row="ignore")


def test_image_paths_must_stay_inside_the_dataset_folder(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    png(outside / "o.png")
    png(data / "in.png")
    (data / "link.png").symlink_to(outside / "o.png")
    for image in ["../elsewhere/o.png", str(outside / "o.png"), "link.png"]:
        path = write_jsonl(data / "t.jsonl", [row(0, image=image)])
        with pytest.raises(DataError, match=r"t\.jsonl:1: field 'image': .*outside the dataset folder.*allow_outside"):
            load_rows(path)
        assert len(load_rows(path, allow_outside=True)) == 1
    assert len(load_rows(write_jsonl(data / "t.jsonl", [row(0, image=str(data / "in.png"))]))) == 1


def test_grounding_box_outside_image_is_reported(tmp_path):
    png(tmp_path / "img" / "0.png", size=(16, 12))
    path = write_jsonl(tmp_path / "g.jsonl", [row(0, task="grounding", solution=[0, 0, 16, 12]),
                                              row(0, task="grounding", solution=[2, 2, 40, 10])])
    with pytest.raises(DataError, match=r"g\.jsonl:2: field 'solution' box .* outside the 16x12 image"):
        load_rows(path)


def test_multi_image_rows_bom_and_blank_lines(tmp_path):
    png(tmp_path / "a.png", 1)
    png(tmp_path / "b.png", 2)
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row(0, image=["a.png", "b.png"])).encode() + b"\n\n  \n")
    (r,) = load_rows(path)
    assert r.images == (tmp_path / "a.png", tmp_path / "b.png") and len(r.load_images()) == 2


def test_save_jsonl_round_trip(tmp_path):
    png(tmp_path / "img" / "0.png")
    rows = load_rows(write_jsonl(tmp_path / "a.jsonl", [row(0, choices=["0", "1"], system="s", id=3)]))
    save_jsonl(rows, tmp_path / "b.jsonl")
    assert json.loads((tmp_path / "b.jsonl").read_text()) == row(0, choices=["0", "1"], system="s", id=3)
    (again,) = load_rows(tmp_path / "b.jsonl")
    assert again.images == rows[0].images and again.extra == {"id": 3}


def test_missing_optional_libraries_give_install_hints(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_rows(tmp_path / "t.parquet")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    with pytest.raises(DataError, match="pip install datasets"):
        load_rows(tmp_path / "ds")
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(DataError, match=r"DatasetDict; pass one split folder, e\.g\. .*dd/train"):
        load_rows(tmp_path / "dd")
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "absent.jsonl")


def test_parquet_with_image_structs_bytes_and_paths(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    buf = io.BytesIO()
    Image.new("LA", (4, 4), (50, 255)).save(buf, "PNG")
    png(tmp_path / "rel.png", 70)
    table = pa.table({
        "image": [{"bytes": buf.getvalue(), "path": None}, {"bytes": None, "path": "rel.png"},
                  {"bytes": b"\x89PNG broken", "path": None}],
        "problem": ["a", "b", "c"],
        "solution": ["50", "70", "0"],
        "task": ["reasoning"] * 3,
    })
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"^t\.parquet\[2\]: field 'image': cannot read image <\d+ bytes>"):
        load_rows(tmp_path / "t.parquet")
    rows = load_rows(tmp_path / "t.parquet", on_bad_row="skip")
    assert [r.load_images()[0].getpixel((0, 0))[0] for r in rows] == [50, 70] and len(rows.skipped) == 1


def test_hf_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (3, 3))], "problem": ["p"], "solution": [1],
                                     "task": ["reasoning"]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    (r,) = load_rows(tmp_path / "ds")
    assert r.image_sizes == [(3, 3)] and r.source == "ds[0]"


def test_row_is_frozen():
    r = make_row(row(1, image=None), "x:1")
    with pytest.raises(AttributeError):
        r.problem = "other"  # type: ignore[misc]
    assert isinstance(r, Row)
