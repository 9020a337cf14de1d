"""bench/scale.py without running a model: recipes -> shapes, arguments, the README block."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import scale  # noqa: E402
from gpg_vlm import cli  # noqa: E402


def test_every_recipe_names_a_real_shape_with_its_own_settings():
    runs = scale.recipe_runs()
    assert set(runs) == {"qwen2_vl-2b", "qwen2_5_vl-3b"}
    geoqa = runs["qwen2_5_vl-3b"]
    assert (geoqa.recipe, geoqa.group_size, geoqa.max_pixels) == ("qwen25vl3b_geoqa.yaml", 8, 401408)
    assert geoqa.prompts == 1 and geoqa.completion_tokens == 32  # the stated reductions


def test_a_recipe_without_a_real_shape_is_skipped_and_named(tmp_path):
    (tmp_path / "x.yaml").write_text("model: /m/Llava-7B\ngroup_size: 8\n")
    skipped = []
    assert scale.recipe_runs(tmp_path, skipped) == {}
    assert skipped == ["x.yaml: model '/m/Llava-7B' has no real shape here "
                       "(Qwen2-VL-2B, Qwen2.5-VL-3B)"]


def test_cli_dispatch_and_a_bad_only(capsys):
    assert cli.main(["bench", "scale", "--only", "qwen9"]) == 2
    assert "--only qwen9: no recipe uses it; valid: qwen2_5_vl-3b, qwen2_vl-2b" in capsys.readouterr().err


def test_readme_block_is_replaced_not_duplicated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{scale.README_START}\nold\n{scale.README_END}\ntail\n")
    scale.write_readme(readme, "| new |")
    scale.write_readme(readme, "| newer |")
    text = readme.read_text()
    assert text.count(scale.README_START) == 1 and "| newer |" in text and "old" not in text
    assert text.startswith("intro\n") and text.endswith("tail\n")


def test_noise_reward_is_deterministic_and_in_range():
    r = scale.noise_reward(["a", "b", "a"])
    assert r[0] == r[2] != r[1] and all(0 <= x < 1 for x in r)


def test_merge_keeps_other_shapes_and_replaces_rerun_ones():
    old = [{"shape": "a", "v": 1}, {"shape": "b", "v": 1}]
    merged = scale.merge_models(old, [{"shape": "b", "v": 2}, {"shape": "c", "v": 2}])
    assert merged == [{"shape": "a", "v": 1}, {"shape": "b", "v": 2}, {"shape": "c", "v": 2}]
    assert scale.merge_models([], [{"shape": "a"}]) == [{"shape": "a"}]


def test_auto_threads_leaves_a_busy_machine_one_thread():
    assert scale.auto_threads(cpus=2, load=0.1) == 2  # idle: every CPU
    assert scale.auto_threads(cpus=2, load=1.2) == 1
    assert scale.auto_threads(cpus=2, load=12.0) == 1  # never 0 (0 would mean torch's default)
    assert scale.auto_threads(cpus=16, load=3.0) == 13
