"""Rewards are bounded: checked return values, checked signatures, hard time and memory budgets.

The runaway inputs are real: without the worker, `(((9^{99})^{99})^{99})^{99}` ran for over 30 s
(a 90-million-digit power) and `(a+b+c+d+e+f+g+h)^{40}` against `^{41}` grew by about 15 MB/s
for as long as it was left (measured on this machine, shared).
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import pytest

from gpg_vlm import rewards
from gpg_vlm.rewards import RewardError, call_reward, reasoning_reward, resolve_reward, take_over_budget
from gpg_vlm.rewards.bounded import Worker

RUNAWAY = [
    ("(((9^{99})^{99})^{99})^{99}", "1"),
    ("(a+b+c+d+e+f+g+h)^{40}", "(a+b+c+d+e+f+g+h)^{41}"),
]
BUDGET_S = 1.0
START_SLACK_S = 30.0  # starting a replacement worker (importing sympy) on a loaded machine


def allocate(n: int) -> bool:
    """A check that needs n bytes (run in the worker by the memory test)."""
    return len(bytearray(n)) == n


@pytest.fixture(scope="module")
def _fast_worker():
    worker = Worker("gpg_vlm.rewards.reasoning:symbolic_equal", time_s=BUDGET_S)
    yield worker
    worker.close()


@pytest.fixture
def fast_budget(_fast_worker, monkeypatch):
    """The reasoning reward's worker with a 1 s budget (one per module: starts are slow)."""
    from gpg_vlm.rewards import reasoning

    monkeypatch.setattr(reasoning, "SYMBOLIC", _fast_worker)
    take_over_budget()
    return _fast_worker


# ---- return values and signatures ----------------------------------------------------------

def _returning(value):
    return lambda completions, **columns: value


BAD_RETURNS = [
    ({"a": 1.0}, "returned a dict {'a': 1.0}; it must return a list of 3 numbers"),
    (None, "returned None; it must return a list of 3 numbers"),
    ("1.0", "returned a str '1.0'"),
    (1.0, "returned a float 1.0"),
    ([1.0, 0.0], "returned 2 values for 3 completions"),
    ([1.0, 0.0, 1.0, 0.0], "returned 4 values for 3 completions"),
    ([1.0, float("nan"), 0.0], "value 1 is nan; rewards must be finite"),
    ([1.0, 0.0, math.inf], "value 2 is inf; rewards must be finite"),
    ([1.0, None, 0.0], "value 1 is None (NoneType), not a real number"),
    ([1.0, "0.5", 0.0], "value 1 is '0.5' (str), not a real number"),
    ([1.0, 0.0, 10**400], "value 2 is 1000"),
    ((x for x in [1.0, 0.0, 1.0]), "returned a generator"),
]


@pytest.mark.parametrize("value, message", BAD_RETURNS)
def test_a_bad_return_value_is_one_line_naming_the_reward(value, message):
    with pytest.raises(RewardError) as exc:
        call_reward("mine", _returning(value), ["a", "b", "c"], {"solution": ["1"] * 3})
    text = str(exc.value)
    assert text.startswith("reward 'mine'") and message in text and "\n" not in text


def test_good_return_values_are_floats():
    np = pytest.importorskip("numpy")
    for value in ([1, 0.5, True], (0.0, 1.0, 2.0), np.array([0.0, 1.0, 0.5]), [np.float32(1), 0, 0]):
        out = call_reward("mine", _returning(value), ["a", "b", "c"], {})
        assert len(out) == 3 and all(type(v) is float for v in out)


def test_a_reward_that_raises_is_named():
    def boom(completions, **columns):
        raise KeyError("solution_text")

    with pytest.raises(RewardError, match=r"^reward 'boom' raised KeyError: 'solution_text'$"):
        call_reward("boom", boom, ["a"], {})


def _no_kwargs(completions, solution):
    return [0.0] * len(completions)


def _needs_unknown(completions, answer_key, **columns):
    return [0.0] * len(completions)


def _keyword_only_completions(*, completions, **columns):
    return [0.0] * len(completions)


def _fine(completions, solution, task=None, **columns):
    return [0.0] * len(completions)


@pytest.mark.parametrize("name, message", [
    ("_no_kwargs", r"must accept \*\*columns"),
    ("_needs_unknown", "requires argument 'answer_key', which is no column"),
    ("_keyword_only_completions", "must take the completions as its first argument"),
])
def test_user_rewards_are_checked_when_resolved(monkeypatch, name, message):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    with pytest.raises(RewardError, match=message):
        resolve_reward(f"test_reward_budgets:{name}")


def test_a_well_formed_user_reward_resolves(monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    assert resolve_reward("test_reward_budgets:_fine").__name__ == "_fine"
    for name in rewards.BUILTIN_REWARDS:  # every built-in passes its own check
        resolve_reward(name)


def test_columns_match_what_the_trainer_passes():
    """COLUMNS names every column tasks.reward_columns builds (precision included)."""
    from types import SimpleNamespace

    from gpg_vlm.data import make_row
    from gpg_vlm.tasks import reward_columns

    row = make_row({"problem": "p", "solution": "1", "task": "reasoning"}, "m:1", extra={"precision": 1})
    batch = SimpleNamespace(image_sizes=[[(4, 4)]], model_image_sizes=[[(28, 28)]])
    assert set(reward_columns([row], batch, [0, 0], "abs")) == set(rewards.COLUMNS)


# ---- time and memory budgets ---------------------------------------------------------------

def test_runaway_symbolic_answers_stop_at_the_budget_and_are_counted(fast_budget):
    assert reasoning_reward(["<answer>x+1</answer>"], solution=["1+x"]) == [1.0]  # worker started
    for answer, solution in RUNAWAY:
        t = time.monotonic()
        assert reasoning_reward([f"<answer>{answer}</answer>"], solution=[solution]) == [0.0]
        assert time.monotonic() - t < BUDGET_S + 1.0
        assert take_over_budget() == {"time": 1, "memory": 0}
        assert take_over_budget() == {"time": 0, "memory": 0}  # counts are taken once
        # the next check goes to the spare process and still works
        assert reasoning_reward(["<answer>x^2+2x+1</answer>"], solution=["(x+1)^2"]) == [1.0]


def test_the_budget_is_what_stops_them():
    """Control: the same input with a larger budget is still running after 3 s."""
    worker = Worker("gpg_vlm.rewards.reasoning:symbolic_equal", time_s=3.0)
    try:
        worker.call("x", "x")  # started
        take_over_budget()
        t = time.monotonic()
        assert worker.call(*RUNAWAY[0]) is False
        assert time.monotonic() - t >= 3.0 and take_over_budget()["time"] == 1
    finally:
        worker.close()


def test_memory_budget_is_enforced_and_counted(monkeypatch):
    import os
    from pathlib import Path

    # the worker imports this file as a module, from the tests folder
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    worker = Worker("test_reward_budgets:allocate", time_s=30.0, memory_bytes=400 << 20)
    try:
        take_over_budget()
        assert worker.call(10 << 20) is True  # 10 MB fits
        t = time.monotonic()
        assert worker.call(2 << 30) is False  # 2 GB does not
        assert time.monotonic() - t < 10
        assert take_over_budget() == {"time": 0, "memory": 1}
        assert worker.call(10 << 20) is True  # replaced, working
    finally:
        worker.close()


def test_budgets_hold_off_the_main_thread_and_under_load(fast_budget):
    """Two threads beside two CPU-burning processes: runaways stop, good answers still score."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    results, times = {}, {}

    def work(k):
        t = time.monotonic()
        answer, solution = RUNAWAY[k % 2]
        results[k] = reasoning_reward(
            [f"<answer>{answer}</answer>", "<answer>x+1</answer>", "<answer>\\frac{1}{2}x</answer>"],
            solution=[solution, "1+x", "x/2"])
        times[k] = time.monotonic() - t

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        t = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=2 * (BUDGET_S + START_SLACK_S))
        elapsed = time.monotonic() - t
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert results == {k: [0.0, 1.0, 1.0] for k in range(2)}
    # checks are serialised: at worst a thread waits for the other's runaway and the restart
    assert elapsed < 2 * (BUDGET_S + START_SLACK_S)
    assert take_over_budget()["time"] == 2


def test_the_training_process_never_imports_sympy():
    code = ("import sys; from gpg_vlm.rewards import reasoning_reward; "
            "assert reasoning_reward(['<answer>x+1</answer>'], solution=['1+x']) == [1.0]; "
            "print('sympy' in sys.modules, 'math_verify' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_worker_that_cannot_start_scores_zero_with_one_warning(caplog):
    worker = Worker("no_such_module_anywhere:fn", time_s=1.0)
    try:
        assert worker.call("a", "b") is False and worker.call("a", "b") is False
        assert worker.broken and worker.current is None and worker.spare is None
    finally:
        worker.close()
    assert caplog.text.count("is unavailable") == 1
