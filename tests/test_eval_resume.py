"""`gpg-vlm eval` stopped by a real signal and resumed: kept rows, the continue command, equal numbers."""

import json
import os
import signal

import pytest

from gpg_vlm.evaluate import Stopped, main, read_samples, stop_signals
from gpg_vlm.rollout.hf import HFRollout


def _args(model, data, out, *extra):
    # --token-budget 1: every row is a generate call of its own, so a stop can fall between rows
    return ["--model", str(model), "--benchmark", "jsonl", "--data", str(data), "--max-new-tokens", "5",
            "--token-budget", "1", "--completions", "2", "--temperature", "1.0", "--out", str(out), *extra]


def _kill_on_call(monkeypatch, call: int):
    """The `call`-th generate sends this process a real SIGTERM (its handler raises mid-call)."""
    original, calls = HFRollout.generate, []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HFRollout, "generate", generate)
    return calls


def _results(out):
    payload = json.loads((out / "results.json").read_text())
    samples = sorted((json.loads(x) for x in (out / "samples_jsonl.jsonl").read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    return payload["results"], [(s["doc_id"], s["completions"], s["rewards"]) for s in samples]


def test_sigterm_stops_cleanly_and_resume_equals_an_uninterrupted_run(tiny_dirs, fm_mixed, tmp_path,
                                                                      capsys, monkeypatch):
    model = tiny_dirs("qwen2_vl")
    assert main(_args(model, fm_mixed, tmp_path / "whole")) == 0
    whole = _results(tmp_path / "whole")

    out = tmp_path / "cut"
    calls = _kill_on_call(monkeypatch, call=3)
    code = main(_args(model, fm_mixed, out))
    err = capsys.readouterr().err
    assert code == 143 and len(calls) == 3
    assert "stopped by SIGTERM after 2 of 5 rows" in err
    command = err.split("continue with:\n")[1].strip()
    assert command.startswith("gpg-vlm eval ") and command.endswith("--resume") and str(out) in command
    assert len((out / "samples_jsonl.jsonl").read_text().splitlines()) == 2
    assert not (out / "results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back

    # the same command again without --resume is refused before any work
    assert main(_args(model, fm_mixed, out)) == 2
    assert "pass --resume" in capsys.readouterr().err
    calls.clear()
    monkeypatch.undo()
    resumed_calls = _kill_on_call(monkeypatch, call=99)
    assert main(_args(model, fm_mixed, out, "--resume")) == 0
    assert len(resumed_calls) == 3  # only the three unfinished rows were generated
    assert _results(out) == whole
    # control: the comparison can fail: another seed samples other completions
    assert main(_args(model, fm_mixed, tmp_path / "seed1", "--seed", "1")) == 0
    assert _results(tmp_path / "seed1")[1] != whole[1]


def test_resume_refuses_changed_settings(tiny_dirs, fm_mixed, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cut"
    _kill_on_call(monkeypatch, call=2)
    assert main(_args(tiny_dirs("qwen2_vl"), fm_mixed, out)) == 143
    capsys.readouterr()
    monkeypatch.undo()
    assert main(_args(tiny_dirs("qwen2_vl"), fm_mixed, out, "--resume", "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert "--resume: seed is 3 now but 0 in" in err and len(err.strip().splitlines()) == 1


def test_a_signal_during_a_write_waits_for_the_write(tmp_path):
    order = []
    with pytest.raises(Stopped, match="SIGTERM"):
        with stop_signals() as holding:
            with holding():
                os.kill(os.getpid(), signal.SIGTERM)
                order.append("write finished")
            order.append("not reached")
    assert order == ["write finished"]
    with pytest.raises(Stopped, match="SIGINT"):  # outside a write it stops at once
        with stop_signals():
            os.kill(os.getpid(), signal.SIGINT)
            order.append("not reached")
    assert order == ["write finished"]


def test_a_torn_last_line_is_dropped_and_a_bad_middle_line_named(tmp_path, capsys):
    path = tmp_path / "samples_x.jsonl"
    path.write_text('{"doc_id": 0, "reward": 1}\n{"doc_id": 1, "rew')
    assert list(read_samples(path, 5)) == [0]
    assert path.read_text() == '{"doc_id": 0, "reward": 1}\n'  # ready for appending
    assert "dropped an incomplete line" in capsys.readouterr().err
    path.write_text('{"doc_id": 0}\nnot json\n{"doc_id": 2}\n')
    from gpg_vlm.evaluate import EvalError

    with pytest.raises(EvalError, match="samples_x.jsonl:2: not a samples line"):
        read_samples(path, 5)
    path.write_text('{"doc_id": 7}\n')
    with pytest.raises(EvalError, match="doc_id 7 outside the 5 rows"):
        read_samples(path, 5)


def test_ctrl_c_to_a_running_eval_prints_a_command_that_finishes_it(tiny_dirs, tmp_path):
    """A real SIGINT to a `gpg-vlm eval` process once its first row is on disk; the printed
    command, run as printed, completes it, keeping the rows already written."""
    import shlex
    import subprocess
    import sys
    import time

    from gpg_vlm.data.prepare import main as prepare

    assert prepare(["fashion-mnist", "--out", str(tmp_path / "fm"), "--train-size", "1",
                    "--test-size", "30", "--tasks", "classification"]) == 0
    data, out = tmp_path / "fm" / "classification_test.jsonl", tmp_path / "res"
    args = ["--model", str(tiny_dirs("qwen2_vl")), "--benchmark", "jsonl", "--data", str(data),
            "--max-new-tokens", "64", "--token-budget", "1"]
    cli = [sys.executable, "-m", "gpg_vlm.cli"]
    proc = subprocess.Popen([*cli, "eval", *args, "--out", str(out)], stderr=subprocess.PIPE, text=True)
    samples = out / "samples_jsonl.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if samples.is_file() and samples.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGINT after" in err
    before = samples.read_text().splitlines()
    assert 1 <= len(before) < 30  # stopped part-way, whole lines only
    command = err.split("continue with:\n")[1].strip().splitlines()[0]
    assert command.startswith("gpg-vlm eval ")
    resumed = subprocess.run([*cli, *shlex.split(command)[1:]], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = samples.read_text().splitlines()
    assert after[:len(before)] == before and sorted(json.loads(x)["doc_id"] for x in after) == list(range(30))
    assert json.loads((out / "results.json").read_text())["n-samples"]["jsonl"]["effective"] == 30
    # (that a resumed run's numbers equal an uninterrupted run's is the SIGTERM test above)
