"""The demo pipeline end to end, shrunk to seconds (the learning target is checked by the
full `gpg-vlm demo`, see README)."""

import json

import pytest


@pytest.mark.parametrize("task", ["classification", "counting", "grounding"])
def test_demo_writes_its_outputs(tmp_path, task):
    from gpg_vlm.demo import main

    out = tmp_path / "demo"
    code = main(["--task", task, "--minutes", "0.05", "--out", str(out), "--cache", str(tmp_path / "cache"),
                 "--set", "size=xs", "format_warmup_steps=3", "format_warmup_batch=4", "train_prompts=16",
                 "test_prompts=4", "prompts_per_step=2", "group_size=2", "eval_steps=2",
                 "max_new_tokens=6"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("task", "algorithm", "accuracy_before", "accuracy_after", "seconds", "steps"):
        assert key in summary
    assert summary["task"] == task and summary["steps"] >= 1
    assert 0.0 <= summary["accuracy_before"] <= 1.0
    assert (out / "report.md").read_text().startswith("# gpg-vlm demo")
    assert (out / "curves.png").stat().st_size > 10_000
    assert any("eval/accuracy" in json.loads(line) for line in (out / "metrics.jsonl").open())
    assert summary["settings"]["kl_beta"] == (0.0 if task == "grounding" else 0.04)  # resolved
    if task != "grounding":  # held-out accuracy by true answer, and how often each is answered
        table = summary["by_answer"]
        assert sum(v["n"] for v in table.values()) == 4
        assert sum(v["answer_share"] for v in table.values()) <= 1.0 + 1e-9
        assert set(summary["never_answered"]) <= set(table)
        assert "by true answer" in (out / "report.md").read_text()


def test_demo_compare_runs_both(tmp_path):
    from gpg_vlm.demo import main

    out = tmp_path / "cmp"
    assert main(["--compare", "--minutes", "0.03", "--out", str(out), "--cache", str(tmp_path / "c"),
                 "--set", "size=xs", "format_warmup_steps=2", "format_warmup_batch=4", "train_prompts=16",
                 "test_prompts=4", "prompts_per_step=2", "group_size=2", "max_new_tokens=6"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["compare"]) == {"gpg", "grpo"}
    assert (out / "gpg" / "metrics.jsonl").is_file() and (out / "grpo" / "metrics.jsonl").is_file()


def test_set_overrides_go_to_the_demo_or_to_trainconfig_and_bad_ones_name_the_key():
    from gpg_vlm.config import ConfigError
    from gpg_vlm.demo import split_overrides, train_config

    settings, overrides = split_overrides(["learning_rate=1e-3", "group_size=32", "kl_beta=0", "size=m"])
    assert settings.size == "m" and set(overrides) == {"learning_rate", "group_size", "kl_beta"}
    paths = dict(model="m", data="d", eval_data="e", output_dir="o")

    def config(task, algorithm="gpg", given=overrides):
        return train_config(algorithm, task, given, paths, 1.0, 0)

    cfg = config("classification")
    assert (cfg.learning_rate, cfg.group_size, cfg.kl_beta) == (1e-3, 32, 0.0)  # the paper's GPG
    assert config("classification", given={}).kl_beta == 0.04
    assert config("classification", "grpo").kl_beta == 0.04  # GRPO keeps its own KL weight
    assert config("grounding", given={}).kl_beta == 0.0
    assert config("grounding", given={}).max_new_tokens == 32
    for bad, needle in (("group_size=2.5", "'group_size': expected int"),
                        ("learning_rate=fast", "'learning_rate': expected float"),
                        ("kl_beta=yes", "'kl_beta'"), ("size=2", "'size': expected str"),
                        ("nonsense=1", "unknown key"),
                        # old names: one line naming the new one
                        ("warmup_batch=4", "'format_warmup_batch'"),
                        ("warmup_steps=4", "'format_warmup_steps'"),
                        ("eval_every_steps=2", "'eval_steps'"),
                        ("format_weight=0.2", "'rewards'"),
                        ("kl_weight=0.1", "renamed to 'kl_beta'")):
        with pytest.raises(ConfigError, match=needle):
            config("classification", given=split_overrides([bad])[1])


def test_a_bad_setting_is_one_line_before_the_warm_up(tmp_path, capsys):
    from gpg_vlm.demo import main

    cache = tmp_path / "cache"
    assert main(["--minutes", "0.01", "--out", str(tmp_path / "o"), "--cache", str(cache),
                 "--set", "size=xs", "train_prompts=8", "test_prompts=4", "kl_beta=-1"]) == 2
    assert "config key 'kl_beta': must be >= 0" in capsys.readouterr().err
    assert not list(cache.glob("warmup-*"))  # nothing trained for a run that cannot start
