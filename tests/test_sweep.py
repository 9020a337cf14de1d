"""bench/sweep.py: the points it runs, its worker on a tiny checkpoint, and the committed sweep."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import sweep  # noqa: E402
from gpg_vlm import cli  # noqa: E402

COMMITTED = ROOT / "bench" / "sweep.json"


def test_each_point_moves_exactly_one_factor_from_the_base():
    pts = sweep.points()
    assert pts[0] == ("base", sweep.BASE)
    assert len(pts) == 1 + sum(len(v) - 1 for v in sweep.FACTORS.values()) == 8
    for factor, p in pts[1:]:
        moved = [f for f in sweep.FACTORS if getattr(p, f) != getattr(sweep.BASE, f)]
        assert moved == [factor], (factor, p)
    assert [f for f, _ in sweep.points(["images"])] == ["base", "images"]


def test_rows_carry_the_asked_number_of_distinct_images(tmp_path):
    from bench import scale

    path = sweep._write_rows(scale.write_data, 2, tmp_path, 3136, 3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [len(r["image"]) for r in rows] == [2, 2, 2]
    names = [name for r in rows for name in r["image"]]
    assert len(set(names)) == 6 and all((tmp_path / n).is_file() for n in names)


def test_cli_dispatches_to_the_sweep(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "sweep", "--only", "depth"])
    assert exc.value.code == 2 and "invalid choice: 'depth'" in capsys.readouterr().err


@pytest.mark.slow  # two minutes on a busy 2-core machine: a fresh process loads torch twice
def test_a_point_on_a_tiny_checkpoint_forces_the_length_and_the_images(tiny_dirs):
    """The worker's two changes to scale.step_once: EOS forbidden for T tokens (a tiny model
    with a 400-token vocabulary samples EOS early without it) and two images in the prompt."""
    r = sweep.run_point("images", sweep.Point(2, 12, 112 * 112, 2), tiny_dirs("qwen2_vl"), 1,
                        lambda s: None)
    assert r["length_forced"] and r["completion_tokens"] == 2 * 12, r
    assert r["updated"] and r["peak_rss_mb"] > 0 and r["process_cpu_seconds"] > 0
    assert r["image_patches"] == 2 * 64  # two 112 x 112 images: (112 / 14)^2 patches each


def _committed():
    if not COMMITTED.is_file():
        pytest.skip("bench/sweep.json not written yet")
    return json.loads(COMMITTED.read_text())


def test_the_committed_sweep_ran_every_point_at_real_vocabulary_and_forced_length():
    report = _committed()
    ran = [(r["factor"], sweep.Point(**r["point"])) for r in report["points"]]
    assert ran == sweep.points()
    for r in report["points"]:
        assert r["vocab_size"] >= 151_000 and r["hidden_size"] == 1536
        assert r["num_hidden_layers"] == report["model"]["text_layers"]
        assert r["length_forced"] and r["completion_length_max"] == r["point"]["completion_tokens"]
    table = sweep.markdown(report)
    assert table.count("\n") == 1 + len(report["points"])


def test_memory_follows_the_logprob_chunk_not_every_completion_token():
    """From 256 to 700-token completions (G = 4) the trained positions grow from 1,024 to 2,800;
    full-vocabulary fp32 logits for all of them would add (2800 - 1024) x 151,936 x 4 bytes =
    1.08 GB per copy (three copies live in a backward). Chunked at 1,024 positions, the peak
    grows only by the activations of the longer rows."""
    from gpg_vlm.models.forward import LOGPROB_CHUNK_TOKENS

    by = {(r["factor"], r["point"]["completion_tokens"]): r for r in _committed()["points"]}
    short, long = by[("completion_tokens", 256)], by[("completion_tokens", 700)]
    assert 4 * 256 == LOGPROB_CHUNK_TOKENS  # both fill a whole chunk
    one_copy_mb = (4 * 700 - 4 * 256) * 151_936 * 4 / 2 ** 20
    grown = long["peak_rss_mb"] - short["peak_rss_mb"]
    assert grown < one_copy_mb / 2, (grown, one_copy_mb)
