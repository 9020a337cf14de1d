"""`gpg-vlm eval` on a tiny model: lmms-eval-shaped files, category averages, CV-Bench, errors."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from gpg_vlm.eval_results import cvbench_total, mean_stderr, task_results
from gpg_vlm.evaluate import main
from gpg_vlm.tasks import reward_columns
def run_eval(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr()


def read_samples(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_eval_writes_lmms_shaped_results(tiny_dirs, fm_mixed, tmp_path, capsys):
    out = tmp_path / "res"
    code, io = run_eval(capsys, "--model", str(tiny_dirs("qwen2_vl")), "--benchmark", "fashion-mnist",
                        "--data", str(fm_mixed), "--max-new-tokens", "4", "--token-budget", "300",
                        "--out", str(out))
    assert code == 0, io.err
    payload = json.loads((out / "results.json").read_text())
    head = payload["results"]["fashion-mnist"]
    samples = read_samples(out / "samples_fashion-mnist.jsonl")
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3, 4]
    for s in samples:
        assert set(s) >= {"doc_id", "id", "input", "target", "completions", "extracted", "rewards",
                          "reward", "mode"} and s["mode"] == "strict"
        assert len(s["completions"]) == 1 and isinstance(s["completions"][0], str)
        assert "<|image_pad|>" in s["input"] and "Output the thinking process" in s["input"]
    rewards = [s["reward"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert head["accuracy,none"] == pytest.approx(sum(rewards) / 5)
    assert head["accuracy_stderr,none"] == pytest.approx(mean_stderr(rewards)[1])
    assert payload["n-samples"]["fashion-mnist"] == {"original": 5, "effective": 5}
    subs = payload["group_subtasks"]["fashion-mnist"]
    assert subs == ["fashion-mnist/category=classification", "fashion-mnist/category=counting"]
    assert [payload["results"][s]["n"] for s in subs] == [3, 2]
    weighted = sum(payload["results"][s]["n"] * payload["results"][s]["accuracy,none"] for s in subs) / 5
    assert head["accuracy,none"] == pytest.approx(weighted)
    config = payload["configs"]["fashion-mnist"]
    assert config["max_new_tokens"] == 4 and config["settings_from"]["max_new_tokens"] == "command line"
    assert config["settings_from"]["prompt_template"] == "default" and config["extract"] == "strict"
    assert payload["versions"]["torch"] and payload["versions"]["transformers"]
    assert payload["model_path"] == str(tiny_dirs("qwen2_vl")) and payload["date"].startswith("20")
    table = (out / "results.md").read_text()
    assert "| category=classification | 3 |" in table and "| category=counting | 2 |" in table
    assert "accuracy" in io.out and "classification" in io.out


def test_eval_completions_k_reports_pass_at_k(tiny_dirs, fm_mixed, tmp_path, capsys):
    out = tmp_path / "res"
    code, io = run_eval(capsys, "--model", str(tiny_dirs("qwen2_vl")), "--benchmark", "jsonl",
                        "--data", str(fm_mixed), "--limit", "2", "--completions", "3",
                        "--max-new-tokens", "3", "--out", str(out))
    assert code == 0, io.err
    payload = json.loads((out / "results.json").read_text())
    head = payload["results"]["jsonl"]
    assert payload["configs"]["jsonl"]["temperature"] == 1.0 and "pass@3,none" in head
    assert head["pass@3,none"] >= head["accuracy,none"]
    assert payload["n-samples"]["jsonl"] == {"original": 5, "effective": 2}
    assert all(len(s["completions"]) == 3 and len(s["rewards"]) == 3
               for s in read_samples(out / "samples_jsonl.jsonl"))


def test_cvbench_end_to_end_reports_official_total_and_accuracy(tiny_dirs, tmp_path, capsys):
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
    payload = json.loads((out / "results.json").read_text())
    head = payload["results"]["cvbench"]
    assert {"official_total,none", "official_total_stderr,none", "2D,none", "3D,none",
            "accuracy,none"} <= set(head)
    assert set(payload["group_subtasks"]["cvbench"]) == {
        "cvbench/category=Count", "cvbench/category=Relation", "cvbench/category=Depth",
        "cvbench/category=Distance", "cvbench/type=2D", "cvbench/type=3D", "cvbench/source=ADE20K",
        "cvbench/source=COCO", "cvbench/source=Omni3D"}
    assert "CV-Bench official total" in io.out


def _row(category, **extra):
    return SimpleNamespace(extra=dict(category=category, **extra))


def _items(rows, rewards):
    return [{"category": r.extra["category"], "reward": x, "rewards": [x]} for r, x in zip(rows, rewards)]


def test_stderr_by_hand():
    # rewards 1, 0, 0, 1: mean 0.5; sample variance (4 * 0.25) / 3 = 1/3; stderr sqrt(1/3 / 4)
    assert mean_stderr([1.0, 0.0, 0.0, 1.0]) == (0.5, pytest.approx(math.sqrt(1 / 12)))
    assert mean_stderr([0.3]) == (0.3, 0.0)


def test_cvbench_numbers_by_hand():
    # ADE20K: 1, 0 -> 0.5 (stderr sqrt(0.5 / 2) = 0.5); COCO: 0, 0 -> 0 (stderr 0);
    # Omni3D: 1, 1, 0, 1 -> 0.75 (variance 0.25, stderr 0.25). 2D = (0.5 + 0) / 2 = 0.25,
    # stderr sqrt(0.25 + 0) / 2 = 0.25; official total = (0.25 + 0.75) / 2 = 0.5, stderr
    # sqrt(0.25^2 + 0.25^2) / 2. Plain accuracy is 4 / 8 = 0.5 as well here, so:
    sources = ["ADE20K", "ADE20K", "COCO", "COCO", "Omni3D", "Omni3D", "Omni3D", "Omni3D"]
    rewards = [1, 0, 0, 0, 1, 1, 0, 1]
    rows = [_row("Count", source=s, type="2D" if s != "Omni3D" else "3D") for s in sources]
    total = cvbench_total(_items(rows, rewards), sources)
    assert total["2D"] == 0.25 and total["3D"] == 0.75 and total["official_total"] == 0.5
    assert total["2D_stderr"] == pytest.approx(0.25)
    assert total["official_total_stderr"] == pytest.approx(math.sqrt(2 * 0.25 ** 2) / 2)
    # one more correct COCO row: COCO 1/3, 2D (0.5 + 1/3) / 2, official total (2D + 0.75) / 2
    # = 0.583, while the plain accuracy is 5 / 9 = 0.556
    rows2, rewards2, sources2 = rows + [_row("Count", source="COCO", type="2D")], rewards + [1], sources + ["COCO"]
    results, _ = task_results("cvbench", rows2, _items(rows2, rewards2), completions=1)
    head = results["cvbench"]
    assert head["accuracy,none"] == pytest.approx(5 / 9)
    assert head["official_total,none"] == pytest.approx(((0.5 + 1 / 3) / 2 + 0.75) / 2)
    assert cvbench_total(_items(rows[:4], rewards[:4]), sources[:4]) is None  # no Omni3D rows


def test_mathvista_is_reported_by_question_type():
    rows = [_row("FQA", question_type="multi_choice", answer_type="text"),
            _row("FQA", question_type="free_form", answer_type="integer"),
            _row("GPS", question_type="free_form", answer_type="integer")]
    results, subs = task_results("mathvista", rows, _items(rows, [1.0, 0.0, 1.0]), completions=1)
    assert results["mathvista/question_type=multi_choice"]["accuracy,none"] == 1.0
    assert results["mathvista/question_type=free_form"]["accuracy,none"] == 0.5
    assert results["mathvista/question_type=free_form"]["n"] == 2
    assert "mathvista/answer_type=integer" in subs and results["mathvista"]["accuracy,none"] == pytest.approx(2 / 3)


def test_paper_cvbench_total_is_the_micro_average():
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
                                  "missing_image", "old_samples_flag",
                                  "old_batch_size_flag", "resume_nothing", "broken_model"])
def test_input_errors_are_one_line_exit_2(case, tiny_dirs, fm_mixed, tmp_path, capsys):
    model, data, fm = str(tiny_dirs("qwen2_vl")), tmp_path / "d.jsonl", fm_mixed
    (tmp_path / "broken").mkdir()  # fails only when loaded: no folder may be left to refuse later
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "qwen2_vl"}')
    data.write_text('{"image": "missing.png", "problem": "p", "solution": "x", "task": "classification"}\n')
    args = {"no_model": ["--model", str(tmp_path / "none"), "--benchmark", "jsonl", "--data", str(data)],
            "unknown_benchmark": ["--model", model, "--benchmark", "mmmu", "--data", str(data)],
            "unreadable_data": ["--model", model, "--benchmark", "jsonl", "--data", str(tmp_path)],
            "missing_data": ["--model", model, "--benchmark", "jsonl", "--data", str(tmp_path / "x.jsonl")],
            "missing_image": ["--model", model, "--benchmark", "jsonl", "--data", str(data)],
            "old_samples_flag": ["--model", model, "--benchmark", "jsonl", "--data", str(data),
                                 "--samples", "3"],
            "old_batch_size_flag": ["--model", model, "--benchmark", "jsonl", "--data", str(data),
                                    "--batch-size", "3"],
            "resume_nothing": ["--model", model, "--benchmark", "jsonl", "--data", str(data), "--resume"],
            "broken_model": ["--model", str(tmp_path / "broken"), "--benchmark", "jsonl", "--data", str(fm)]}[case]
    code, io = run_eval(capsys, *args, "--out", str(tmp_path / "res"))
    assert code == 2
    if case == "old_samples_flag":
        assert "--samples was renamed to --completions" in io.err
    assert io.err.startswith("gpg-vlm eval: ") and len(io.err.strip().splitlines()) == 1
    assert "Traceback" not in io.err and not (tmp_path / "res").exists()


def test_extraction_modes_reach_the_reward_and_the_files(tiny_dirs, fm_mixed, tmp_path, capsys):
    from gpg_vlm.tasks import extracted

    rows = [SimpleNamespace(task="reasoning", choices=None), SimpleNamespace(task="reasoning", choices=["a", "b"]),
            SimpleNamespace(task="classification", choices=None)]
    texts = ["So the total is 12.\nTherefore, the answer is 40.", "The correct option is (B).",
             "<think>maybe a bag</think><answer>sneaker</answer>"]
    answers, steps, scored = extracted(texts, rows, "strict")
    assert answers == [None, None, "sneaker"] and scored == texts  # strict: the training reward's reading
    answers, steps, scored = extracted(texts, rows, "lenient")
    assert answers == ["40", "(B)", "sneaker"] and steps == ["phrase", "phrase", "tag"]
    assert scored[0] == "<answer>40</answer>"
    out = tmp_path / "res"
    code, io = run_eval(capsys, "--model", str(tiny_dirs("qwen2_vl")), "--benchmark", "jsonl", "--data",
                        str(fm_mixed), "--limit", "2", "--max-new-tokens", "3", "--extract", "lenient",
                        "--out", str(out))
    assert code == 0, io.err
    assert json.loads((out / "results.json").read_text())["configs"]["jsonl"]["extract"] == "lenient"
    assert all(s["mode"] == "lenient" and len(s["extracted_by"]) == 1 for s in read_samples(out / "samples_jsonl.jsonl"))
    assert "lenient extraction" in (out / "results.md").read_text()
