"""`gpg-vlm score` through the command line: extraction modes, bad solutions, output checks,
incremental results, interruption and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpg_vlm import score
from gpg_vlm.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_lenient_mode_reads_untagged_answers_and_the_results_say_so(tmp_path):
    src = write(tmp_path / "p.jsonl", [
        {"completion": "Therefore, the answer is 40.", "solution": 40},
        {"completion": "We get $\\boxed{2\\sqrt{3}}$", "solution": "2√{3}"},
        {"completion": "2 + 2 = 4\n5", "solution": 5},
        {"completion": "<answer>7</answer> so the answer is 40", "solution": 40},  # tag wins
    ])
    for mode, rewards in (("strict", [0, 0, 0, 0]), ("lenient", [1, 1, 1, 0])):
        out = tmp_path / f"{mode}.json"
        assert cli(["score", "--predictions", str(src), "--task", "math", "--extract", mode,
                    "--output", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["extract"] == mode
        assert [i["reward"] for i in result["items"]] == rewards
    steps = [i["extracted_by"] for i in json.loads((tmp_path / "lenient.json").read_text())["items"]]
    assert steps == ["phrase", "boxed", "last_line", "tag"]


BAD_SOLUTIONS = [
    ("math", {"solution": {"value": 3}}, "field 'solution' must be a non-empty string or a finite number"),
    ("math", {"solution": True}, "must be a non-empty string or a finite number, got True"),
    ("math", {"solution": "  "}, "must be a non-empty string"),
    ("math", {"solution": [1, 2]}, "must be a non-empty string or a finite number"),
    ("counting", {"solution": "many"}, "must be a count"),
    ("classification", {"solution": ""}, "must be a non-empty class name"),
    ("classification", {"solution": 3}, "must be a non-empty class name"),
    ("choice", {"solution": "5cm", "choices": ["6cm", "7cm"]}, "is none of the choices"),
    ("grounding", {"solution": "[1, 2, 3, 4]", "image_size": [10, 10]}, "must be a box"),
    ("grounding", {"solution": [8, 2, 3, 4], "image_size": [10, 10]}, "x2 < x1 or y2 < y1"),
    ("grounding", {"solution": [[1, 2, 3, 4], [1, 2]], "image_size": [10, 10]}, "must be a box"),
    ("grounding", {"solution": [], "image_size": [10, 10]}, "must be a box"),
]


@pytest.mark.parametrize("task,fields,message", BAD_SOLUTIONS)
def test_a_mistyped_solution_is_a_bad_row_not_a_silent_zero(tmp_path, capsys, task, fields, message):
    src = write(tmp_path / "p.jsonl", [{"completion": "<answer>3</answer>", **fields}])
    args = ["score", "--predictions", str(src), "--task", task, "--output", str(tmp_path / "o.json")]
    args += ["--box-format", "abs"] if task == "grounding" else []
    assert cli(args) == 2
    err = one_line(capsys)
    assert f"{src}:1: " in err and message in err
    assert not (tmp_path / "o.json").exists()


def test_mistyped_rows_are_skipped_and_listed_with_skip(tmp_path, capsys):
    src = write(tmp_path / "p.jsonl", [{"completion": "<answer>3</answer>", "solution": 3},
                                       {"completion": "<answer>3</answer>", "solution": False},
                                       '{"completion": "x", "solution": ' + "9" * 5000 + "}",
                                       "[" * 100_000 + "]" * 100_000])
    out = tmp_path / "o.json"
    assert cli(["score", "--predictions", str(src), "--task", "counting", "--output", str(out),
                "--on-bad-row", "skip"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 1 and [s["line"] for s in result["skipped"]] == [2, 3, 4]
    assert "too deep" in result["skipped"][2]["reason"] or "unreadable" in result["skipped"][2]["reason"]


def test_empty_input_is_an_error(tmp_path, capsys):
    for rows, needle in (([], "no rows to score (empty input)"),
                         (["", "  "], "no rows to score (empty input)"),
                         ([{"completion": "x"}], "missing field 'solution'")):
        src = write(tmp_path / "p.jsonl", rows)
        assert cli(["score", "--predictions", str(src), "--task", "math"]) == 2
        assert needle in one_line(capsys)
    src = write(tmp_path / "p.jsonl", [{"completion": "x"}])
    assert cli(["score", "--predictions", str(src), "--task", "math", "--on-bad-row", "skip"]) == 2
    assert "no rows to score (1 bad row(s) skipped)" in one_line(capsys)


def test_output_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    src = write(tmp_path / "p.jsonl", [{"completion": "<answer>3</answer>", "solution": 3}])
    monkeypatch.setattr(score, "read_rows", lambda *a: pytest.fail("rows were read first"))
    for output, needle in ((src, "is the input file"),
                           (tmp_path / "." / "p.jsonl", "is the input file"),
                           (tmp_path, "is a folder"),
                           (tmp_path / "no" / "dir.json", "cannot write")):
        assert cli(["score", "--predictions", str(src), "--task", "math", "--output", str(output)]) == 2
        assert needle in one_line(capsys)
    assert src.read_text().startswith('{"completion"')  # the input is untouched
    assert cli(["score", "--predictions", str(src), "--task", "math", "--resume"]) == 2
    assert "--resume needs --output" in one_line(capsys)


def rows(n: int) -> list[dict]:
    return [{"completion": f"<answer>{i % 7}</answer>", "solution": i % 5} for i in range(n)]


def test_ctrl_c_keeps_the_scored_chunks_and_resume_finishes_identically(tmp_path, capsys, monkeypatch):
    src = write(tmp_path / "p.jsonl", rows(300))
    whole, out = tmp_path / "whole.json", tmp_path / "out.json"
    assert cli(["score", "--predictions", str(src), "--task", "math", "--output", str(whole)]) == 0
    real, calls = score.score_items, []

    def interrupted(chunk, args):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(chunk, args)

    monkeypatch.setattr(score, "score_items", interrupted)
    args = ["score", "--predictions", str(src), "--task", "math", "--output", str(out)]
    assert cli(args) == 130
    err = capsys.readouterr().err
    assert "interrupted after 128 of 300 rows" in err and "--resume" in err
    journal = score.journal_path(out)
    assert len(journal.read_text().splitlines()) == 1 + 128 and not out.exists()
    # a torn last line (a kill in the middle of a write) is dropped on resume
    with open(journal, "a") as f:
        f.write('{"line": 129, "rew')
    assert cli(args) == 2 and "--resume to continue" in one_line(capsys)  # not silently redone
    monkeypatch.setattr(score, "score_items", real)
    assert cli(args + ["--extract", "lenient", "--resume"]) == 2  # other settings: refused
    assert "other settings" in one_line(capsys)
    assert cli(args + ["--resume"]) == 0
    assert "resuming: 128 of 300 rows already scored" in capsys.readouterr().err
    assert json.loads(out.read_text()) == json.loads(whole.read_text()) and not journal.exists()


def test_sigterm_stops_cleanly_and_prints_the_resume_command(tmp_path):
    src = write(tmp_path / "p.jsonl", rows(2000))
    out = tmp_path / "out.json"
    slow = ("import sys, time, gpg_vlm.score as s; f = s.score_items; "
            "s.score_items = lambda r, a: (time.sleep(0.3), f(r, a))[1]; sys.exit(s.main(sys.argv[1:]))")
    args = ["--predictions", str(src), "--task", "math", "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", slow, *args], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
    journal = score.journal_path(out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not journal.exists() or len(journal.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted after" in err and "continue with: gpg-vlm score" in err and "--resume" in err
    kept = len(journal.read_text().splitlines()) - 1
    assert 64 <= kept < 2000 and kept % 64 == 0
    assert cli(["score", *args, "--resume"]) == 0
    assert json.loads(out.read_text())["n"] == 2000
