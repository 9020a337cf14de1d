"""`gpg-vlm check-reward`: the built-in rewards pass; a naive reward is caught; hangs, raises and
bad returns are reported without blocking the tool."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from gpg_vlm import check_reward
from gpg_vlm.cli import main as cli
from gpg_vlm.reward_battery import TASKS, battery

BUILTIN = {"classification": "classification", "counting": "reasoning", "math": "reasoning",
           "choice": "reasoning", "grounding": "grounding"}


def verdicts(capsys) -> dict[str, str]:
    """case name -> verdict, read from the printed report."""
    rows = [re.match(r"^(.{58}) (control|hack|edge) +(\S+)  (.*)$", line)
            for line in capsys.readouterr().out.splitlines()]
    return {m.group(1).strip(): m.group(4).split(" (")[0] for m in rows if m}


@pytest.mark.parametrize("task", TASKS)
def test_builtin_rewards_pass_every_case(task, capsys):
    assert cli(["check-reward", BUILTIN[task], "--task", task]) == 0
    found = verdicts(capsys)
    assert len(found) == len(battery(task)) and set(found.values()) == {"ok"}


def test_accuracy_reward_passes_on_a_mixed_task_column(capsys):
    assert cli(["check-reward", "gpg_vlm.rewards:accuracy_reward", "--task", "choice"]) == 0


def test_naive_substring_reward_is_caught(capsys):
    assert cli(["check-reward", "naive_rewards:substring_reward", "--task", "classification"]) == 1
    found = verdicts(capsys)
    assert found["right answer"] == "ok"  # the controls pass: it does read right answers
    for hack in ("several answers in one", "answer only inside <think>",
                 "two answer tags, the wrong one last", "right answer inside a wrong one",
                 "the question repeated as the answer"):
        assert found[hack] == "ABOVE ZERO", hack
    assert found["a bytes object"] == "RAISED"


def test_a_hang_is_a_timeout_and_the_next_case_still_runs(capsys):
    start = time.monotonic()
    records = check_reward.check("naive_rewards:hang_on_think_reward", "counting", budget=1.0,
                                 grace=2.0)
    assert time.monotonic() - start < 30
    by_name = {r["name"]: r for r in records}
    assert by_name["answer only inside <think>"]["verdict"] == "TIMEOUT"
    after = records[[r["name"] for r in records].index("answer only inside <think>") + 1]
    assert after["status"] == "ok" and after["score"] == 0.0  # a fresh worker took over
    assert by_name["right answer"]["verdict"] == "MISSED"


def test_start_up_work_is_not_a_hang_but_a_slow_repeat_is(monkeypatch):
    monkeypatch.setattr(check_reward, "battery", lambda task: battery(task)[:3])
    records = check_reward.check("naive_rewards:slow_start_reward", "math", budget=1.0, grace=5.0)
    assert records[0]["verdict"] == "MISSED" and "start-up" in records[0]["note"]  # not TIMEOUT
    assert all(r["verdict"] != "TIMEOUT" for r in records)
    records = check_reward.check("naive_rewards:slow_start_reward", "math", budget=1.0, grace=0.5)
    assert records[0]["verdict"] == "TIMEOUT"  # control: without the grace it is one


def test_bad_return_and_unloadable_rewards(capsys):
    records = check_reward.check("naive_rewards:dict_reward", "math", budget=5.0)
    assert {r["verdict"] for r in records} == {"BAD RETURN"}
    assert "returned dict" in records[0]["message"]
    assert cli(["check-reward", "no_such_module:fn", "--task", "math"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no_such_module" in err


def test_a_reward_that_is_right_on_the_battery_rows_but_never_raises_is_not_flagged_by_edges():
    """Negative control for the verdicts: edge cases never count a score against a reward."""
    case = battery("math")[-1]
    assert case.kind == "edge"
    assert check_reward.verdict(case, "ok", 1.0) == "ok"
    hack = next(c for c in battery("math") if c.kind == "hack")
    assert check_reward.verdict(hack, "ok", 1e-9) == "ABOVE ZERO"
    assert check_reward.verdict(hack, "ok", 0.0) == "ok"


def test_the_readme_shows_the_current_report_for_the_naive_reward(capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    command = "$ PYTHONPATH=tests gpg-vlm check-reward naive_rewards:substring_reward --task classification\n"
    shown = readme.split(command, 1)[1].split("```", 1)[0].rstrip()
    cli(["check-reward", "naive_rewards:substring_reward", "--task", "classification"])
    assert shown == capsys.readouterr().out.rstrip()
