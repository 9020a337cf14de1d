"""Runs that share a folder, change their config, fail mid-way or meet hostile numbers lose nothing.

Each class goes through `gpg-vlm train` (`gpg_vlm.cli.main` in this process, or a subprocess
where a real signal or a second process is needed) and ends in one line naming the place:
- the output folder has one owner: a fresh run into a used folder is refused, overwrite moves
  the old run aside, `--resume checkpoint-K` branches and the next `--resume` follows the branch,
  pruning touches only the run's own lineage; the demo reuses its folders;
- a lock: a second process is refused naming the holder; a dead holder's lock is taken over;
- a resumed config that changes what the run is is refused; other changes are listed;
- an error after step k (a reward that raises, an image that vanished) saves step k and prints
  the resume command, which continues exactly; SIGHUP saves like SIGTERM; a second Ctrl-C stops;
- an update that leaves non-finite weights stops with the last good checkpoint; float16 on CPU
  is refused before any model loads;
- metrics.jsonl: one record per step after a resume, a partial line repaired, strict JSON;
- config numbers (NaN, infinity, ranges) and names refused at start.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import (assert_one_line, env, losses, make_config, records, run, step_losses, weights,
                     write_config)

RAISING_REWARDS = '''
import os
calls = [0]

def raises_on_third_call(completions, **columns):
    calls[0] += 1
    if calls[0] == 3:
        raise ValueError("reward server hiccup")
    return [float(len(c) % 2 == 0) for c in completions]

def removes_images_on_second_call(completions, **columns):
    calls[0] += 1
    if calls[0] == 2:
        import shutil
        shutil.rmtree(os.environ["VANISHING_IMAGES"])
    return [float(len(c) % 2 == 0) for c in completions]

def slow(completions, **columns):
    import time
    time.sleep(2.0)
    return [float(len(c) % 2 == 0) for c in completions]
'''


@pytest.fixture
def raising(plant_module):
    return plant_module("raising_rewards", RAISING_REWARDS)


def state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def train(capsys, config, *extra):
    return run(capsys, "train", "--config", config, *extra)


# ---- 1. who owns a run folder ---------------------------------------------------------------


def test_fresh_run_into_a_used_folder_is_refused_and_overwrite_moves_the_old_run_aside(
        tiny_dirs, fm_data, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", make_config(tiny_dirs, fm_data, out, max_steps=2))
    assert train(capsys, config)[0] == 0
    before = (out / "metrics.jsonl").read_bytes(), weights(out / "checkpoint-2")

    code, err = train(capsys, config, "max_steps=1")
    assert code == 2
    assert_one_line(err, str(out), "already holds a run", "checkpoint-2", "--resume",
                    "overwrite_output_dir=true")
    assert (out / "metrics.jsonl").read_bytes() == before[0]  # not appended to
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]

    code, err = train(capsys, config, "max_steps=1", "overwrite_output_dir=true")
    assert code == 0, err
    (aside,) = out.glob("replaced-*")
    assert f"were moved to {aside}" in err
    assert (aside / "metrics.jsonl").read_bytes() == before[0]
    old = weights(aside / "checkpoint-2")
    assert all(torch.equal(old[k], before[1][k]) for k in old)
    assert [r["step"] for r in records(out) if "loss" in r] == [1]
    assert state(out / "checkpoint-1")["run_id"] != state(aside / "checkpoint-2")["run_id"]


def test_resume_from_an_older_checkpoint_branches_and_the_next_resume_follows_the_branch(
        tiny_dirs, fm_data, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", make_config(
        tiny_dirs, fm_data, out, max_steps=3, save_steps=1, save_total_limit=2))
    assert train(capsys, config)[0] == 0
    first = state(out / "checkpoint-3")["run_id"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]

    code, err = train(capsys, config, "--resume", out / "checkpoint-2", "max_steps=3", "save_steps=0")
    assert code == 0, err
    (aside,) = out.glob("abandoned-*")
    assert "branching at step 2" in err and str(aside) in err
    assert state(aside / "checkpoint-3")["run_id"] == first  # the abandoned branch, kept whole
    branch = state(out / "checkpoint-3")
    assert branch["lineage"][0] == first and branch["run_id"] != first
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3]
    dropped = [json.loads(line) for line in (out / "metrics.dropped.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dropped if "loss" in r] == [3]

    code, err = train(capsys, config, "--resume", "max_steps=4")  # the plain resume: the branch
    assert code == 0, err
    assert state(out / "checkpoint-4")["run_id"] == branch["run_id"]
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]
    # pruning kept 2 of the lineage and never touched the abandoned branch
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert (aside / "checkpoint-3" / "trainer_state.json").is_file()


class _Weights:
    def save_pretrained(self, path, safe_serialization=True):
        (Path(path) / "model.safetensors").write_bytes(b"w")


def test_pruning_and_replacing_touch_only_the_runs_own_lineage(tmp_path):
    from gpg_vlm.checkpoint import CheckpointError, checkpoints, save_checkpoint

    def save(step, lineage, keep=1):
        return save_checkpoint(tmp_path, step, _Weights(), [], {}, {"step": step, "run_id": lineage[-1],
                                                                    "lineage": lineage}, keep=keep)

    save(5, ["other"])
    save(1, ["mine"])
    save(2, ["mine"])
    save(3, ["mine", "branch"], keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3", "checkpoint-5"]
    with pytest.raises(CheckpointError, match="checkpoint-5: that folder belongs to another run"):
        save(5, ["mine"])
    assert state(tmp_path / "checkpoint-5")["run_id"] == "other"
    save(2, ["mine", "again"], keep=5)  # a run may replace its lineage's checkpoint (the control)
    assert state(tmp_path / "checkpoint-2")["run_id"] == "again"


def test_the_demo_reuses_its_own_folders_a_second_time(tmp_path):
    from gpg_vlm.demo import main

    argv = ["--compare", "--minutes", "0.02", "--out", str(tmp_path / "cmp"), "--cache", str(tmp_path / "c"),
            "--set", "size=xs", "format_warmup_steps=2", "format_warmup_batch=4", "train_prompts=8",
            "test_prompts=2", "prompts_per_step=2", "group_size=2", "max_new_tokens=4"]
    assert main(argv) == 0
    assert main(argv) == 0
    for algorithm in ("gpg", "grpo"):
        folder = tmp_path / "cmp" / algorithm
        assert len(list(folder.glob("replaced-*/checkpoint-*"))) == 1  # the first run, moved aside
        steps = [r["step"] for r in records(folder) if "loss" in r]
        assert steps == list(range(1, len(steps) + 1))  # the second run's own records only


# ---- 2. the lock ----------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from gpg_vlm.run_folder import FolderLock
FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_busy_folder_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(
        tiny_dirs, fm_data, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", make_config(tiny_dirs, fm_data, out, max_steps=1))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE,
                              text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = train(capsys, config)
        assert code == 2
        assert_one_line(err, str(out), "in use by another run", f"pid {holder.pid}", "started ")
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    code, err = train(capsys, config)  # the holder is gone: its lock is taken over, and said so
    assert code == 0, err
    assert f"took over the lock left by a process that is gone (pid {holder.pid}" in err
    assert (out / ".gpg-vlm.lock").read_text() == ""  # released at the end


# ---- 3. resume with a changed config --------------------------------------------------------


def test_resume_refuses_a_run_defining_change_lists_the_others_and_keeps_the_processor(
        tiny_dirs, fm_data, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", make_config(tiny_dirs, fm_data, out, max_steps=1))
    assert train(capsys, config)[0] == 0

    code, err = train(capsys, config, "--resume", "group_size=2", "max_steps=2")
    assert code == 2
    assert_one_line(err, "checkpoint-1", "changes what the run is", "group_size: 4 -> 2",
                    "allow_config_change=true")
    assert not (out / "checkpoint-2").exists()

    other = tmp_path / "other_model"  # the same weights, a different tokenizer_config.json
    shutil.copytree(tiny_dirs("qwen2_vl"), other)
    tok = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**tok, "model_max_length": 77}))
    code, err = train(capsys, config, "--resume", f"model={other}", "max_steps=2")
    assert code == 2 and "model: " in err

    code, err = train(capsys, config, "--resume", f"model={other}", "allow_config_change=true",
                      "learning_rate=2e-3", "max_steps=2")
    assert code == 0, err
    assert re.search(r"config changed since the checkpoint \(.*learning_rate: 0\.001 -> 0\.002", err)
    saved = (out / "checkpoint-2" / "tokenizer_config.json").read_text()
    assert saved == (out / "checkpoint-1" / "tokenizer_config.json").read_text()
    assert saved != (other / "tokenizer_config.json").read_text()  # the control


# ---- 4. errors mid-run keep progress --------------------------------------------------------


@pytest.mark.parametrize("fault", ["reward raises", "image vanishes"])
def test_an_error_after_step_k_saves_step_k_and_the_printed_resume_continues_exactly(
        fault, tiny_dirs, fm_data, tmp_path, raising, one_thread, monkeypatch, capsys):
    import shutil

    from gpg_vlm.train import Trainer

    data = tmp_path / "data"  # a copy whose images the reward may remove
    shutil.copytree(fm_data, data)
    monkeypatch.setenv("VANISHING_IMAGES", str(data / "images"))
    reward = "raises_on_third_call" if fault == "reward raises" else "removes_images_on_second_call"
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", make_config(
        tiny_dirs, data, out, max_steps=4, rewards={f"raising_rewards:{reward}": 1.0}))
    code, err = train(capsys, config)
    k = 2
    assert code == (1 if fault == "reward raises" else 2)
    assert_one_line(err, "reward server hiccup" if fault == "reward raises" else "image file not found")
    hint = re.search(rf"stopped by \w+ after step {k}: progress saved in {out / f'checkpoint-{k}'}\. "
                     r"Resume with: (.+)$", err, re.M)
    assert hint, err
    assert state(out / f"checkpoint-{k}")["step"] == k
    if fault == "image vanishes":
        return  # resuming needs the images back; the step-k checkpoint is what is checked
    code, err = run(capsys, *shlex.split(hint.group(1))[1:], "max_steps=4")
    assert code == 0, err
    got = step_losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    sys.modules.pop("raising_rewards")
    reference = losses(Trainer(make_config(tiny_dirs, fm_data, tmp_path / "ref", max_steps=4)).train())
    assert any(abs(x) > 0 for x in reference[k:])
    for step, loss in enumerate(reference, start=1):
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


def _start(config, out, raising_dir):
    proc = subprocess.Popen([sys.executable, "-m", "gpg_vlm.cli", "train", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(raising_dir))
    deadline = time.monotonic() + 180
    while not ((out / "metrics.jsonl").is_file() and step_losses(out)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    return proc


def test_sighup_saves_like_sigterm_and_a_second_ctrl_c_stops_at_once(
        tiny_dirs, fm_data, tmp_path, raising):
    out = tmp_path / "hup"
    config = write_config(tmp_path / "hup.yaml", make_config(tiny_dirs, fm_data, out, max_steps=500))
    proc = _start(config, out, raising)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    k = max(step_losses(out))
    assert re.search(rf"SIGHUP: saved .*checkpoint-{k} after step {k}\. Resume with: ", err), err[-2000:]

    out = tmp_path / "int"  # a slow reward: the second Ctrl-C lands inside a step
    config = write_config(tmp_path / "int.yaml", make_config(
        tiny_dirs, fm_data, out, max_steps=500, rewards={"raising_rewards:slow": 1.0}))
    proc = _start(config, out, raising)
    time.sleep(0.5)  # past step 1's end (where a stop request saves at once): inside step 2's reward
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert_one_line(err, "stopped at once by a second Ctrl-C")
    assert not list(out.glob("checkpoint-*"))


# ---- 8. non-finite weights, dtypes ----------------------------------------------------------


def test_an_update_that_leaves_non_finite_weights_stops_with_the_last_good_checkpoint(
        tiny_dirs, fm_data, tmp_path, monkeypatch, capsys):
    real, calls = torch.optim.AdamW.step, [0]

    def step(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:  # the second update overflows one weight
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", make_config(tiny_dirs, fm_data, out, max_steps=5,
                                                             save_steps=1))
    code, err = train(capsys, config)
    assert code == 1
    assert_one_line(err, "step 2: the update left non-finite weights (1 tensor(s)",
                    f"last good checkpoint is {out / 'checkpoint-1'}", "learning_rate")
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert all(torch.isfinite(w).all() for w in weights(out / "checkpoint-1").values())
    assert [r["step"] for r in records(out) if "loss" in r] == [1]  # step 2 never logged as done


@pytest.fixture
def no_model_loads(monkeypatch):
    from gpg_vlm.models.adapter import VLMAdapter

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was refused")

    monkeypatch.setattr(VLMAdapter, "from_pretrained", refuse)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case")
def test_float16_on_cpu_is_refused_before_any_model_loads(tiny_dirs, fm_data, tmp_path, no_model_loads,
                                                           capsys):
    config = write_config(tmp_path / "run.yaml", make_config(tiny_dirs, fm_data, tmp_path / "run"))
    code, err = train(capsys, config, "dtype=float16")
    assert code == 2
    assert_one_line(err, "'dtype'", "float16 cannot be trained on the CPU")
    assert not (tmp_path / "run").exists()


# ---- 9. metrics.jsonl -----------------------------------------------------------------------


def test_metrics_hold_one_record_per_step_after_resume_with_a_partial_line_repaired(
        tiny_dirs, fm_data, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", make_config(tiny_dirs, fm_data, out, max_steps=3,
                                                             save_steps=2, save_total_limit=5))
    assert train(capsys, config)[0] == 0
    with open(out / "metrics.jsonl", "a") as f:  # a process killed mid-write
        f.write('{"step": 4, "lo')
    (out / "checkpoint-3").rename(tmp_path / "lost-3")  # as if killed before saving step 3
    code, err = train(capsys, config, "--resume", "max_steps=4")
    assert code == 0, err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    dropped = (out / "metrics.dropped.jsonl").read_text().splitlines()
    assert json.loads(dropped[0])["step"] == 3 and dropped[1] == '{"step": 4, "lo'


def test_metrics_are_strict_json_and_a_full_disk_names_the_file(
        tiny_dirs, fm_data, tmp_path, planted, monkeypatch, capsys):
    import builtins

    import gpg_vlm.run_log as run_log

    out = tmp_path / "nan"
    config = write_config(tmp_path / "nan.yaml", make_config(
        tiny_dirs, fm_data, out, max_steps=1, rewards={"planted_rewards:huge_reward": 1.0}))
    assert train(capsys, config)[0] == 0
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (step,) = [json.loads(line, parse_constant=pytest.fail) for line in text.splitlines()]
    assert step["loss"] is None and "loss" in step["non_finite"]

    def full(path, *args, **kwargs):
        if str(path).endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(run_log, "open", full, raising=False)
    out = tmp_path / "full"
    config = write_config(tmp_path / "full.yaml", make_config(tiny_dirs, fm_data, out, max_steps=3))
    code, err = train(capsys, config)
    assert code == 1
    assert_one_line(err, f"could not write {out / 'metrics.jsonl'}: No space left on device")
    assert "not saving after a disk error" in err


# ---- 10. config validation ------------------------------------------------------------------


@pytest.mark.parametrize("override, needles", [
    ("learning_rate=.nan", ("'learning_rate'", "finite")),
    ("learning_rate=3", ("'learning_rate'", "(0, 1]")),
    ("adam_betas=[0.9, .inf]", ("'adam_betas'", "finite")),
    ("adam_betas=[0.9, 1.0]", ("'adam_betas'", "[0, 1)")),
    ("lora_dropout=1.5", ("'lora_dropout'", "[0, 1)")),
    ("epochs=.inf", ("'epochs'", "finite")),
    ("temperature=.nan", ("'temperature'",)),
    ("clip_eps=-.inf", ("'clip_eps'",)),
    ("max_grad_norm=.nan", ("'max_grad_norm'", "finite")),
    ("max_pixels=0", ("'max_pixels'", ">= 1")),
    ("min_pixels=5000", ("'min_pixels'", "above max_pixels")),
    ("eval_limit=-1", ("'eval_limit'", ">= 1")),
    ("output_dir=' '", ("'output_dir'", "empty")),
    ("attn_implementation=flash_attn", ("'attn_implementation'", "sdpa")),
    ("seed=-1", ("'seed'",)),
])
def test_every_number_and_name_is_checked_before_any_model_loads(override, needles, tiny_dirs, fm_data,
                                                                   tmp_path, no_model_loads, capsys):
    config = write_config(tmp_path / "run.yaml", make_config(tiny_dirs, fm_data, tmp_path / "run",
                                                             max_pixels=4000))
    code, err = train(capsys, config, override)
    assert code == 2
    assert_one_line(err, *needles)
    assert not (tmp_path / "run").exists()


def test_lora_target_modules_the_model_lacks_are_one_line(tiny_dirs, fm_data, tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", make_config(tiny_dirs, fm_data, tmp_path / "run",
                                                             lora_r=4))
    code, err = train(capsys, config, "lora_target_modules=[q_proj, qkv_projection]")
    assert code == 2
    assert_one_line(err, "'lora_target_modules'", "qkv_projection", "q_proj")


def test_claim_and_repair_without_a_model(tmp_path):
    """The folder rules on their own: a run that never saved may be resumed (from step 0), not
    started again by accident; metrics past the resumed step and a partial line are set aside."""
    from gpg_vlm.run_folder import RunFolderError, claim
    from gpg_vlm.run_log import repair_metrics

    said = []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"st')
    with pytest.raises(RunFolderError, match="already holds a run \\(metrics.jsonl\\)"):
        claim(tmp_path, None, None, resuming=False, overwrite=False, say=said.append)
    lineage, _ = claim(tmp_path, None, None, resuming=True, overwrite=False, say=said.append)
    assert len(lineage) == 1 and not said
    assert repair_metrics(tmp_path / "metrics.jsonl", 1) == (1, 1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
    assert (tmp_path / "metrics.dropped.jsonl").read_text() == '{"step": 2, "loss": 0.25}\n{"st\n'
    assert repair_metrics(tmp_path / "metrics.jsonl", 1) == (0, 0)  # nothing more to do
