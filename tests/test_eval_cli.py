"""`gpg-vlm eval` on a tiny model: results.json structure, category averages, CV-Bench, errors."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from gpg_vlm.evaluate import cvbench_scores, main, summarize
from gpg_vlm.tasks import reward_columns


@pytest.fixture(scope="module")
def fm_mixed(tmp_path_factory):
    """Three classification and two counting Fashion-MNIST rows in one schema file."""
    from gpg_vlm.data.prepare import main as prepare

    out = tmp_path_factory.mktemp("fm_eval")
    assert prepare(["fashion-mnist", "--out", str(out), "--train-size", "1", "--test-size", "3",
                    "--tasks", "classification", "counting"]) == 0
    lines = (out / "classification_test.jsonl").read_text().splitlines()
    lines += (out / "counting_test.jsonl").read_text().splitlines()[:2]
    (out / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    return out / "mixed.jsonl"


def run_eval(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr()


def test_eval_writes_results_with_categories_that_average_to_the_total(tiny_dirs, fm_mixed, tmp_path, capsys):
    out = tmp_path / "res"
    code, io = run_eval(capsys, "--model", str(tiny_dirs("qwen2_vl")), "--benchmark", "fashion-mnist",
                        "--data", str(fm_mixed), "--max-new-tokens", "4", "--batch-size", "2",
                        "--out", str(out))
    assert code == 0, io.err
    result = json.loads((out / "results.json").read_text())
    summary, items = result["summary"], result["items"]
    assert summary["n"] == 5 and len(items) == 5
    assert {k: v["n"] for k, v in summary["categories"].items()} == {"classification": 3, "counting": 2}
    weighted = sum(c["n"] * c["accuracy"] for c in summary["categories"].values()) / summary["n"]
    assert summary["accuracy"] == pytest.approx(weighted)
    assert summary["accuracy"] == pytest.approx(sum(i["reward"] for i in items) / 5)
    for item in items:
        assert set(item) >= {"source", "category", "solution", "completions", "reward", "rewards"}
        assert len(item["completions"]) == 1 and isinstance(item["completions"][0], str)
    assert [i["source"] for i in items][:1] == ["mixed.jsonl:1"]
    table = (out / "results.md").read_text()
    assert "| classification | 3 |" in table and "| counting | 2 |" in table
    assert "accuracy" in io.out and "classification" in io.out


def test_eval_completions_k_reports_pass_at_k(tiny_dirs, fm_mixed, tmp_path, capsys):
    out = tmp_path / "res"
    code, io = run_eval(capsys, "--model", str(tiny_dirs("qwen2_vl")), "--benchmark", "jsonl",
                        "--data", str(fm_mixed), "--limit", "2", "--completions", "3",
                        "--max-new-tokens", "3", "--out", str(out))
    assert code == 0, io.err
    result = json.loads((out / "results.json").read_text())
    assert result["summary"]["temperature"] == 1.0 and "pass@3" in result["summary"]
    assert result["summary"]["pass@3"] >= result["summary"]["accuracy"]
    assert all(len(i["completions"]) == 3 and len(i["rewards"]) == 3 for i in result["items"])


def test_cvbench_end_to_end_reports_the_combined_score(tiny_dirs, tmp_path, capsys):
    rows = [("2D", "Count", "ADE20K"), ("2D", "Relation", "COCO"), ("3D", "Depth", "Omni3D"),
            ("3D", "Distance", "Omni3D")]
    (tmp_path / "img").mkdir()
    with open(tmp_path / "test.jsonl", "w") as f:
        for i, (kind, task, source) in enumerate(rows):
            Image.new("RGB", (40, 30), (i * 50, 90, 30)).save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"idx": i, "type": kind, "task": task, "source": source,
                                "question": "Which?", "choices": ["a", "b"], "answer": "(A)",
                                "filename": f"img/{i}.png"}) + "\n")
    out = tmp_path / "res"
    code, io = run_eval(capsys, "--model", str(tiny_dirs("qwen2_vl")), "--benchmark", "cvbench",
                        "--data", str(tmp_path / "test.jsonl"), "--max-new-tokens", "2", "--out", str(out))
    assert code == 0, io.err
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary["categories"]) == {"Count", "Relation", "Depth", "Distance"}
    assert set(summary["groups"]["source"]) == {"ADE20K", "COCO", "Omni3D"}
    assert set(summary["cvbench"]) == {"2D", "3D", "overall"}


def _row(category, **extra):
    return SimpleNamespace(extra=dict(category=category, **extra))


def test_summary_numbers_by_hand():
    # Count: 3 rows, rewards 1, 0, 0 -> 1/3; Depth: 1 row, reward 1 -> 1.
    # Overall is the row-weighted mean (1 + 0 + 0 + 1) / 4 = 0.5, not the category mean 2/3.
    rows = [_row("Count", source="ADE20K", type="2D"), _row("Count", source="COCO", type="2D"),
            _row("Count", source="COCO", type="2D"), _row("Depth", source="Omni3D", type="3D")]
    rewards = [1.0, 0.0, 0.0, 1.0]
    result = {"n": 4, "accuracy": 0.5,
              "items": [{"category": r.extra["category"], "reward": x} for r, x in zip(rows, rewards)]}
    summary = summarize("cvbench", rows, result, completions=1)
    assert summary["categories"] == {"Count": {"n": 3, "accuracy": pytest.approx(1 / 3)},
                                     "Depth": {"n": 1, "accuracy": 1.0}}
    assert summary["groups"]["type"] == {"2D": {"n": 3, "accuracy": pytest.approx(1 / 3)},
                                         "3D": {"n": 1, "accuracy": 1.0}}
    # CV-Bench: 2D = (ADE20K 1 + COCO 0) / 2 = 0.5; 3D = Omni3D 1; overall (0.5 + 1) / 2 = 0.75
    assert summary["cvbench"] == {"2D": 0.5, "3D": 1.0, "overall": 0.75}


def test_cvbench_combined_needs_all_three_sources():
    assert cvbench_scores({"ADE20K": {"accuracy": 1.0}, "COCO": {"accuracy": 0.0}}) is None
    # the GPG paper's GRPO row: per-task accuracies weighted by CV-Bench's task sizes give its
    # "Total" (59.47), i.e. the paper reports the micro average, which is `accuracy` here
    sizes, grpo = (788, 650, 600, 600), (59.64, 66.76, 54.16, 56.66)
    assert sum(s * a for s, a in zip(sizes, grpo)) / sum(sizes) == pytest.approx(59.47, abs=0.005)


def test_precision_column_only_when_a_row_has_it():
    batch = SimpleNamespace(image_sizes=[[(10, 10)], [(10, 10)]], model_image_sizes=[[(28, 28)], [(28, 28)]])
    plain = [SimpleNamespace(solution="1", task="reasoning", choices=None, problem="p", extra={})] * 2
    assert "precision" not in reward_columns(plain, batch, [0, 0, 1], "rel1000")
    mathvista = [SimpleNamespace(solution=1.2, task="reasoning", choices=None, problem="p",
                                 extra={"precision": 1}), plain[0]]
    columns = reward_columns(mathvista, batch, [0, 1, 1], "rel1000")
    assert columns["precision"] == [1, None, None]
    from gpg_vlm.rewards import accuracy_reward

    # 1.24 rounds to 1.2 under the row's precision; the row without precision stays exact
    completions = ["<answer>1.24</answer>", "<answer>1</answer>", "<answer>1.0001</answer>"]
    assert accuracy_reward(completions, **columns) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("case", ["no_model", "unknown_benchmark", "unreadable_data", "missing_data",
                                  "missing_image", "old_samples_flag"])
def test_input_errors_are_one_line_exit_2(case, tiny_dirs, tmp_path, capsys):
    model, data = str(tiny_dirs("qwen2_vl")), tmp_path / "d.jsonl"
    data.write_text('{"image": "missing.png", "problem": "p", "solution": "x", "task": "classification"}\n')
    args = {"no_model": ["--model", str(tmp_path / "none"), "--benchmark", "jsonl", "--data", str(data)],
            "unknown_benchmark": ["--model", model, "--benchmark", "mmmu", "--data", str(data)],
            "unreadable_data": ["--model", model, "--benchmark", "jsonl", "--data", str(tmp_path)],
            "missing_data": ["--model", model, "--benchmark", "jsonl", "--data", str(tmp_path / "x.jsonl")],
            "missing_image": ["--model", model, "--benchmark", "jsonl", "--data", str(data)],
            "old_samples_flag": ["--model", model, "--benchmark", "jsonl", "--data", str(data),
                                 "--samples", "3"]}[case]
    code, io = run_eval(capsys, *args, "--out", str(tmp_path / "res"))
    assert code == 2
    if case == "old_samples_flag":
        assert "--samples was renamed to --completions" in io.err
    assert io.err.startswith("gpg-vlm eval: ") and len(io.err.strip().splitlines()) == 1
    assert "Traceback" not in io.err and not (tmp_path / "res").exists()
