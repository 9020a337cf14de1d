"""Reliability and security: faults are survived, bad input is refused clearly, nothing is lost.

Faults (real signals and a real SIGKILL in a subprocess, the rest in-process):
- SIGTERM / SIGINT: the step finishes, a checkpoint is saved, the resume command is printed,
  and resuming with it gives the per-step losses of a run that was never interrupted;
- SIGKILL while a checkpoint is written: the previous one stays complete and is resumed from;
- NaN / Inf loss or gradient: the update is skipped and logged; K in a row stop the run;
- a full disk while saving: one line, nothing half-written, the previous checkpoint intact.
Bad input goes through the command lines (`gpg_vlm.cli.main`, the function `gpg-vlm` runs):
each case ends in one line naming the place, never a traceback. Data-loading unit cases
live in test_data_loading.py and score rows in test_score.py; these extend them end to end.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from gpg_vlm.cli import main as cli
from helpers import bomb_png, losses, make_config, png, write_jsonl

TESTS = Path(__file__).parent
PACKAGE = TESTS.parent / "gpg_vlm"

# rewards the config can name as planted_rewards:NAME (written into a folder on sys.path)
PLANTED_REWARDS = '''
calls = [0]

def huge_reward(completions, **columns):
    """1e308 is finite in float64 but inf in float32: the advantages, then the loss, are NaN."""
    return [1e308 if len(c) % 2 == 0 else 0.0 for c in completions]

def huge_once_reward(completions, **columns):
    calls[0] += 1
    if calls[0] == 1:
        return huge_reward(completions)
    return [float(len(c) % 2 == 0) for c in completions]
'''


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A folder on sys.path (and PYTHONPATH for subprocesses) holding planted_rewards.py."""
    folder = tmp_path / "planted"
    folder.mkdir()
    (folder / "planted_rewards.py").write_text(PLANTED_REWARDS)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("planted_rewards", None)
    yield folder
    sys.modules.pop("planted_rewards", None)


@pytest.fixture
def one_thread():
    """Runs compared with a subprocess (OMP_NUM_THREADS=1) use one thread here too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def env(*paths) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(TESTS), *map(str, paths), os.environ.get("PYTHONPATH", "")]))


def write_config(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    """`gpg-vlm ARGV` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = cli(list(map(str, argv)))
    return code, capsys.readouterr().err


def assert_one_line(err: str, *needles: str) -> None:
    """stderr's message line starts with the command and names every needle; no traceback."""
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("gpg-vlm ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    """Step -> loss; a step run again after a resume overwrites the first record."""
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_the_printed_resume_matches_an_uninterrupted_run(
        sig, tiny_dirs, fm_data, tmp_path, one_thread, capsys):
    from gpg_vlm.checkpoint import latest_checkpoint, load_checkpoint_state
    from gpg_vlm.train import Trainer

    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", make_config(tiny_dirs, fm_data, out, max_steps=500))
    proc = subprocess.Popen([sys.executable, "-m", "gpg_vlm.cli", "train", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.monotonic() + 180
    while not ((out / "metrics.jsonl").is_file() and step_losses(out)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    ckpt = latest_checkpoint(out)
    k = int(ckpt.name.split("-")[1])
    assert 1 <= k < 500 and max(step_losses(out)) == k
    state, _ = load_checkpoint_state(ckpt)
    assert state["step"] == k
    hint = re.search(rf"{sig.name}: saved .*checkpoint-{k} after step {k}\. Resume with: (.+)$", err, re.M)
    assert hint, err[-2000:]
    assert shlex.split(hint.group(1)) == ["gpg-vlm", "train", "--config", str(config), "--resume"]

    # resume with the printed command, as a user would, for two more steps
    code, err = run(capsys, *shlex.split(hint.group(1))[1:], f"max_steps={k + 2}")
    assert code == 0, err
    got = step_losses(out)
    assert sorted(got) == list(range(1, k + 3))
    reference = losses(Trainer(make_config(tiny_dirs, fm_data, tmp_path / "ref", max_steps=k + 2)).train())
    assert any(abs(x) > 0 for x in reference[k:])  # the comparison is not between zeros
    for step, loss in enumerate(reference, start=1):
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


KILL_ON_SECOND_OPTIMIZER_SAVE = """
import os, signal, sys
import torch
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) == 2:  # checkpoint-2: weights written, optimizer half-written, state absent
        with open(f, "wb") as half:
            half.write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from gpg_vlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_while_saving_keeps_the_previous_checkpoint_and_resume_uses_it(
        tiny_dirs, fm_data, tmp_path, one_thread, capsys):
    from gpg_vlm.models.adapter import VLMAdapter
    from gpg_vlm.checkpoint import latest_checkpoint, load_checkpoint_state

    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml",
                          make_config(tiny_dirs, fm_data, out, max_steps=3, save_steps=1))
    proc = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_OPTIMIZER_SAVE, "train", "--config",
                           str(config)], capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (stale,) = out.glob(".checkpoint-2.*")
    assert (stale / "model.safetensors").is_file() and not (stale / "trainer_state.json").exists()
    assert not (out / "checkpoint-2").exists()
    (out / "checkpoint-9").mkdir()  # a folder without trainer_state.json is never "latest"
    first = out / "checkpoint-1"
    assert latest_checkpoint(out) == first
    state, optimizer = load_checkpoint_state(first)
    assert state["step"] == 1 and optimizer["optimizer"]["state"]
    VLMAdapter.from_pretrained(first, device="cpu")  # the weights load on their own

    code, err = run(capsys, "train", "--config", config, "--resume", stale)
    assert code == 2
    assert_one_line(err, str(stale), "not a complete checkpoint")

    killed_loss = step_losses(out)[2]  # logged before the save that was killed
    code, err = run(capsys, "train", "--config", config, "max_steps=2", "--resume")
    assert code == 0, err
    assert abs(step_losses(out)[2] - killed_loss) <= 1e-6
    assert not list(out.glob(".checkpoint-*"))  # the stale temporary folder is cleaned
    assert latest_checkpoint(out) == out / "checkpoint-2"
    assert load_checkpoint_state(out / "checkpoint-2")[0]["step"] == 2


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_step_is_skipped_logged_and_changes_nothing(where, tiny_dirs, fm_data, tmp_path,
                                                              planted, monkeypatch, caplog):
    from gpg_vlm.train import Trainer

    rewards = {"planted_rewards:huge_reward": 1.0} if where == "loss" else None
    cfg = make_config(tiny_dirs, fm_data, tmp_path / "run", max_steps=1,
                      **({"rewards": rewards} if rewards else {}))
    if where == "gradient":
        real = Trainer._clip_and_check
        monkeypatch.setattr(Trainer, "_clip_and_check", lambda self: real(self) * float("inf"))
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    with caplog.at_level("WARNING", logger="gpg_vlm.train"):
        (step,) = [h for h in trainer.train() if "loss" in h]
    assert not step["updated"] and step["skipped"] == "non-finite loss or gradient (1 in a row)"
    assert not math_isfinite(step["loss"] if where == "loss" else step["grad_norm"])
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))
    assert not trainer.optimizer.state_dict()["state"]  # AdamW never saw the bad gradient
    assert "step 1: non-finite loss" in caplog.text and "update skipped" in caplog.text


def math_isfinite(x: float) -> bool:
    return torch.isfinite(torch.tensor(x)).item()


def test_nonfinite_count_resets_after_a_good_step(tiny_dirs, fm_data, tmp_path, planted):
    from gpg_vlm.train import Trainer

    cfg = make_config(tiny_dirs, fm_data, tmp_path / "run", max_steps=3, max_nonfinite_steps=2,
                      rewards={"planted_rewards:huge_once_reward": 1.0})
    steps = [h for h in Trainer(cfg).train() if "loss" in h]
    assert [h["updated"] for h in steps] == [False, True, True]


def test_k_nonfinite_steps_stop_with_one_line_and_the_last_good_weights(
        tiny_dirs, fm_data, tmp_path, planted, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", make_config(
        tiny_dirs, fm_data, out, max_steps=10, max_nonfinite_steps=2,
        rewards={"planted_rewards:huge_reward": 1.0}))
    code, err = run(capsys, "train", "--config", config)
    assert code == 1
    assert_one_line(err, "stopped: 2 consecutive steps had a non-finite loss",
                    str(out / "checkpoint-2"))
    steps = [r for r in records(out) if "loss" in r]
    assert [r["skipped"] for r in steps] == [f"non-finite loss or gradient ({n} in a row)" for n in (1, 2)]
    # no update was made, so the last good weights are the initial ones
    assert_same_weights(weights(out / "checkpoint-2"), weights(Path(tiny_dirs("qwen2_vl"))))


def test_full_disk_while_saving_is_one_line_and_leaves_nothing_half_written(
        tiny_dirs, fm_data, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError

    from gpg_vlm.checkpoint import latest_checkpoint

    real_save = modeling_utils.safe_save_file
    saves = []

    def full_on_second(*args, **kwargs):  # safetensors reports ENOSPC as its own error type
        saves.append(1)
        if len(saves) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_on_second)
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml",
                          make_config(tiny_dirs, fm_data, out, max_steps=3, save_steps=1))
    code, err = run(capsys, "train", "--config", config)
    assert code == 1
    assert_one_line(err, "could not save checkpoint", "checkpoint-2", "No space left on device",
                    "previous checkpoint is intact")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert latest_checkpoint(out) == out / "checkpoint-1"

    # the optimizer file (torch.save) on a full disk: same outcome
    monkeypatch.setattr(modeling_utils, "safe_save_file", real_save)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("gpg_vlm.checkpoint.torch.save", no_space)
    code, err = run(capsys, "train", "--config", config, "--resume")
    assert code == 1
    assert_one_line(err, "checkpoint-2", "No space left on device")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]


# ---- bad input through the command lines ----------------------------------------------------


@pytest.mark.parametrize("text, needles", [
    ("group_sise: 4\n", ["unknown key(s) 'group_sise'", "valid keys:", "group_size"]),
    ("group_size: four\n", ["'group_size'"]),
    ("group_size: 1\n", ["'group_size'", "must be >= 2"]),
    ("beta_th: 2\n", ["'beta_th'", "must be in [0, 1], got 2"]),
    ("max_steps: 0\n", ["'max_steps'", "must be > 0"]),
    ("rewards: {accurracy: 1.0}\n", ["'rewards'", "unknown reward 'accurracy'", "'accuracy'"]),
    ("rewards: {'no_such_module:fn': 1.0}\n", ["'rewards'", "cannot import module 'no_such_module'"]),
    ("model: [unclosed\n", ["is not valid YAML"]),
    ("- a\n- list\n", ["expected a mapping"]),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", ["is not UTF-8 text"]),
], ids=["unknown-key", "wrong-type", "group-size-1", "beta-th-2", "max-steps-0", "unknown-reward",
        "reward-module-missing", "not-yaml", "not-a-mapping", "binary"])
def test_planted_config_mistakes_are_one_line(text, needles, tiny_dirs, fm_data, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:  # the mistake sits among valid keys
        base = f"model: {tiny_dirs('qwen2_vl')}\ndata: {fm_data / 'classification_train.jsonl'}\n"
        config.write_text(base + text if not text.startswith("-") else text)
    code, err = run(capsys, "train", "--config", config, f"output_dir={tmp_path / 'out'}")
    assert code == 2
    assert_one_line(err, *needles)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def broken_model(src: Path, dst: Path, case: str) -> tuple[Path, str]:
    """A copy of a tiny checkpoint with one planted fault, and the file the message must name."""
    if case == "missing":
        return dst, str(dst)
    shutil.copytree(src, dst)
    if case == "empty":
        for p in dst.iterdir():
            p.unlink()
        return dst, "no config.json"
    if case == "foreign":
        (dst / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return dst, "model_type 'llama' is not a supported Qwen-VL family"
    if case == "corrupt-config":
        (dst / "config.json").write_text("{")
        return dst, "config.json"
    weights_file = dst / "model.safetensors"
    if case == "no-weights":
        weights_file.unlink()
        return dst, "no model.safetensors"
    if case == "pickle-weights":
        weights_file.rename(dst / "pytorch_model.bin")
        return dst, "pytorch_model.bin"
    if case == "truncated-weights":
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
        return dst, str(weights_file)
    if case == "corrupt-tokenizer":
        (dst / "tokenizer.json").write_text('{"version": ')
        return dst, str(dst / "tokenizer.json")
    if case == "no-tokenizer":
        (dst / "tokenizer.json").unlink()
        return dst, "tokenizer.json"
    if case == "no-preprocessor":
        (dst / "preprocessor_config.json").unlink()
        return dst, str(dst / "preprocessor_config.json")
    raise AssertionError(case)


MODEL_CASES = ["missing", "empty", "foreign", "corrupt-config", "no-weights", "pickle-weights",
               "truncated-weights", "corrupt-tokenizer", "no-tokenizer", "no-preprocessor"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_broken_model_directory_is_one_line_naming_the_file(case, tiny_dirs, fm_data, tmp_path, capsys):
    model, needle = broken_model(Path(tiny_dirs("qwen2_vl")), tmp_path / "model", case)
    config = write_config(tmp_path / "c.yaml", make_config(tiny_dirs, fm_data, tmp_path / "out"))
    code, err = run(capsys, "train", "--config", config, f"model={model}")
    assert code == 2
    assert_one_line(err, needle)


def label_png(folder: Path, i: int) -> str:
    """An image whose pixel value encodes its row's solution (10 * i)."""
    return "img/" + png(folder / "img" / f"{i}.png", value=10 * i)


def good_row(folder: Path, i: int) -> dict:
    return {"image": label_png(folder, i), "problem": "Which value is this?", "solution": str(i),
            "task": "reasoning"}


def bad_record(folder: Path, kind: str):
    """(record or raw line, what the error names) for each planted kind of bad row."""
    img = folder / "img"
    img.mkdir(parents=True, exist_ok=True)
    base = {"problem": "Which value is this?", "solution": "0", "task": "reasoning"}
    if kind == "missing-image":
        return {**base, "image": "img/missing.png"}, "field 'image': image file not found"
    if kind == "corrupt-png":
        (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        return {**base, "image": "img/corrupt.png"}, "field 'image': cannot read image"
    if kind == "truncated-png":
        png(img / "whole.png", size=(64, 64))
        (img / "truncated.png").write_bytes((img / "whole.png").read_bytes()[:-40])
        return {**base, "image": "img/truncated.png"}, "is corrupt or truncated"
    if kind == "huge-png":
        bomb_png(img / "huge.png", side=20000)
        return {**base, "image": "img/huge.png"}, "decompression bomb"
    if kind == "float-mode":
        Image.new("F", (8, 8), 0.5).save(img / "float.tiff")
        return {**base, "image": "img/float.tiff"}, "has mode F"
    if kind == "missing-field":
        return {"image": label_png(folder, 0), "problem": "p", "task": "reasoning"}, "missing field 'solution'"
    if kind == "wrong-type":
        return {**base, "image": label_png(folder, 0), "problem": 7}, "field 'problem' must be a non-empty string"
    if kind == "non-utf8":
        return b'{"image": "img/0.png", "problem": "\xff\xfe", "solution": "0", "task": "reasoning"}', \
            "line is not valid UTF-8"
    if kind == "outside-folder":
        png(folder.parent / "outside.png")
        return {**base, "image": "../outside.png"}, "outside the dataset folder"
    raise AssertionError(kind)


BAD_ROWS = ["missing-image", "corrupt-png", "truncated-png", "huge-png", "float-mode",
            "missing-field", "wrong-type", "non-utf8", "outside-folder"]


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_bad_row_stops_training_naming_file_line_and_field(kind, tiny_dirs, tmp_path, capsys):
    data = tmp_path / "data"
    record, needle = bad_record(data, kind)
    path = write_jsonl(data / "train.jsonl", [good_row(data, 0), good_row(data, 1), record, good_row(data, 2)])
    cfg = make_config(tiny_dirs, tmp_path, tmp_path / "out", data=str(path))
    code, err = run(capsys, "train", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert code == 2
    assert_one_line(err, "train.jsonl:3: ", needle)


def test_bad_rows_skipped_are_counted_logged_and_never_misalign_images(
        tiny_dirs, tmp_path, monkeypatch, capsys, caplog):
    from gpg_vlm.collect import Sampler

    data = tmp_path / "data"
    lines, good = [], []
    for i, kind in enumerate(BAD_ROWS):
        lines.append(good_row(data, i))
        good.append(f"train.jsonl:{len(lines)}")
        lines.append(bad_record(data, kind)[0])
    path = write_jsonl(data / "train.jsonl", lines)
    seen = []
    real_samples = Sampler.samples

    def checked_samples(self, rows):  # every prompt's image is its own row's image
        samples = real_samples(self, rows)
        for row, sample in zip(rows, samples):
            assert sample.images[0].getpixel((0, 0)) == (10 * int(row.solution),) * 3, row.source
            seen.append(row.source)
        return samples

    monkeypatch.setattr(Sampler, "samples", checked_samples)
    cfg = make_config(tiny_dirs, tmp_path, tmp_path / "out", data=str(path), on_bad_row="skip",
                      max_steps=3)
    with caplog.at_level("WARNING", logger="gpg_vlm.data"):
        code, err = run(capsys, "train", "--config", write_config(tmp_path / "c.yaml", cfg))
    assert code == 0, err
    n = len(BAD_ROWS)
    assert f"skipped {n} bad row(s), kept {n}" in caplog.text
    for line in range(2, 2 * n + 1, 2):
        assert f"train.jsonl:{line}:" in caplog.text
    assert len(seen) == 3 * cfg.prompts_per_step and set(seen) <= set(good)
    assert len([r for r in records(tmp_path / "out") if "loss" in r]) == 3


def random_completions(n: int, seed: int = 0) -> list[str]:
    """Arbitrary bytes decoded the ways a pipeline might: lone surrogates, NULs, controls."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        text = raw.decode("utf-8", errors=("surrogateescape", "replace", "ignore")[i % 3])
        if i % 2:
            text = f"<think>{text}</think><answer>{text}</answer>"
        out.append(text)
    return out + ["\x00" * 1000, "<answer>" * 5000, "\ud800<answer>(A)\udfff</answer>", "9" * 100_000]


def test_rewards_never_raise_on_completions_of_arbitrary_bytes():
    from gpg_vlm.rewards import BUILTIN_REWARDS

    completions = random_completions(150)
    n = len(completions)
    columns = {
        "classification": dict(solution=["shirt"] * n),
        "reasoning": dict(solution=["3"] * n),
        "grounding": dict(solution=[[1, 2, 10, 12]] * n, image_size=[(28, 28)] * n, box_format="rel1000"),
        "format": {},
        "accuracy": dict(solution=["3"] * n, task=["reasoning"] * n),
    }
    for name, fn in BUILTIN_REWARDS.items():
        values = fn(completions, **columns[name])
        assert len(values) == n and all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values), name


def test_score_handles_any_completion_bytes_and_malformed_files(tmp_path, capsys):
    good = tmp_path / "p.jsonl"
    lines = [json.dumps({"completion": c, "solution": "3"}).encode() for c in random_completions(60)]
    lines.insert(5, b'{"completion": "<answer>\xff\xfe</answer>", "solution": "3"}')  # not UTF-8
    lines.insert(9, b'{"completion": "<answer>\\udcff3</answer>", "solution": "3"}')  # lone surrogate
    good.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "o.json"
    code, err = run(capsys, "score", "--predictions", good, "--task", "counting", "--output", out,
                    "--on-bad-row", "skip")
    assert code == 0 and "Traceback" not in err
    result = json.loads(out.read_text(encoding="utf-8"))
    assert [s["line"] for s in result["skipped"]] == [6] and "not valid UTF-8" in result["skipped"][0]["reason"]
    assert result["n"] == len(lines) - 1
    assert result["items"][8]["answer"] == "\udcff3"  # written back as the same escape

    code, err = run(capsys, "score", "--predictions", good, "--task", "counting")
    assert code == 2
    assert_one_line(err, f"{good}:6: line is not valid UTF-8")

    as_array = tmp_path / "array.json"
    as_array.write_text(json.dumps([{"completion": "x", "solution": "3"}]))
    image = tmp_path / "image.jsonl"
    png(tmp_path / "image.png")
    image.write_bytes((tmp_path / "image.png").read_bytes())
    for path, needle in [(as_array, f"{as_array}:1: expected a JSON object, got list"),
                         (image, f"{image}:1: line is not valid UTF-8"),
                         (tmp_path, f"{tmp_path}: no such file")]:
        code, err = run(capsys, "score", "--predictions", path, "--task", "math")
        assert code == 2
        assert_one_line(err, needle)
    code, err = run(capsys, "score", "--predictions", good, "--task", "counting", "--on-bad-row",
                    "skip", "--output", tmp_path / "no" / "such" / "dir.json")
    assert code == 2
    assert_one_line(err, "cannot write", "No such file or directory")


# ---- security -------------------------------------------------------------------------------


MARKER_CODE = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
"""


@pytest.mark.parametrize("model_type", ["qwen2_vl", "evil_vl"])
def test_remote_code_in_a_checkpoint_never_runs_by_default(model_type, tiny_dirs, fm_data, tmp_path, capsys):
    from gpg_vlm.models.adapter import VLMAdapter

    model, marker = tmp_path / "model", tmp_path / "MARKER"
    shutil.copytree(tiny_dirs("qwen2_vl"), model)
    (model / "evil.py").write_text(MARKER_CODE.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config.update(model_type=model_type, auto_map={
        "AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
        "AutoModelForImageTextToText": "evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (model / "preprocessor_config.json").write_text(json.dumps({
        **json.loads((model / "preprocessor_config.json").read_text()),
        "auto_map": {"AutoImageProcessor": "evil.EvilProcessor"}}))

    if model_type == "qwen2_vl":  # the library's own classes load; the shipped code is ignored
        VLMAdapter.from_pretrained(model, device="cpu")
    cfg = make_config(tiny_dirs, fm_data, tmp_path / "out", model=str(model), max_steps=1)
    code, err = run(capsys, "train", "--config", write_config(tmp_path / "c.yaml", cfg))
    if model_type == "qwen2_vl":
        assert code == 0, err
    else:
        assert code == 2
        assert_one_line(err, "model_type 'evil_vl' is not a supported Qwen-VL family")
    assert not marker.exists()
    assert cfg.trust_remote_code is False


def test_reward_code_is_imported_only_when_the_config_names_module_function(tmp_path, monkeypatch):
    from gpg_vlm.config import TrainConfig
    from gpg_vlm.rewards import resolve_reward

    marker = tmp_path / "MARKER"
    (tmp_path / "sneaky_reward.py").write_text(
        MARKER_CODE.format(marker=str(marker)) + "\ndef fn(completions, **columns):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("sneaky_reward", "sneaky_reward.fn", "sneaky_reward:", ":fn"):
        with pytest.raises(ValueError):
            resolve_reward(spec)
    # reading a config that names it imports nothing; only building the trainer does
    config = tmp_path / "c.yaml"
    config.write_text("model: m\ndata: d\nrewards: {'sneaky_reward:fn': 1.0}\n")
    TrainConfig.from_yaml(str(config))
    assert not marker.exists() and "sneaky_reward" not in sys.modules
    assert resolve_reward("sneaky_reward:fn")(["x"]) == [0.0]
    assert marker.exists()
    sys.modules.pop("sneaky_reward", None)


def test_decompression_bomb_limit_stays_on(tmp_path, monkeypatch):
    import gpg_vlm.data  # noqa: F401
    import gpg_vlm.train  # noqa: F401
    from gpg_vlm.data import DataError, load_rows

    assert Image.MAX_IMAGE_PIXELS is not None  # importing gpg_vlm leaves PIL's guard on
    (tmp_path / "img").mkdir()
    bomb_png(tmp_path / "img" / "bomb.png", side=20000)
    path = write_jsonl(tmp_path / "t.jsonl", [{"image": "img/bomb.png", "problem": "p", "solution": "1",
                                               "task": "reasoning"}])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone else switched PIL's off
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'image'.*over the limit"):
        load_rows(path)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name, {k.arg: k.value for k in node.keywords}


def test_the_package_never_unpickles_or_runs_untrusted_code():
    unsafe_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in unsafe_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in unsafe_modules:
                problems.append(f"{where}: imports from {node.module}")
        for node, owner, name, kw in _calls(tree):
            line = f"{where}:{node.lineno}"
            if owner == "torch" and name == "load":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    problems.append(f"{line}: torch.load without weights_only=True")
            bare = isinstance(node.func, ast.Name) or owner == "builtins"
            if bare and name in ("eval", "exec"):
                problems.append(f"{line}: {name}()")
            for key in ("trust_remote_code", "allow_pickle"):
                if isinstance(kw.get(key), ast.Constant) and kw[key].value is True:
                    problems.append(f"{line}: {key}=True")
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Attribute) and t.attr == "MAX_IMAGE_PIXELS" for t in node.targets):
                problems.append(f"{where}:{node.lineno}: sets MAX_IMAGE_PIXELS")
    assert not problems, "\n".join(problems)
