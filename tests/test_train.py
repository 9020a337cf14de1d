"""The trainer end to end on a tiny model: it learns something, resumes exactly, runs DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import losses, make_config

TESTS = Path(__file__).parent


def test_training_changes_parameters_and_writes_metrics(tiny_dirs, fm_data, tmp_path):
    from gpg_vlm.models.adapter import VLMAdapter
    from gpg_vlm.train import Trainer

    cfg = make_config(tiny_dirs, fm_data, tmp_path / "run", max_steps=3,
                      eval_data=str(fm_data / "classification_test.jsonl"), tensorboard=True)
    trainer = Trainer(cfg)
    assert trainer.reference is None  # GPG never loads a reference model
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.params))
    assert changed > len(before) // 2
    steps = [h for h in history if "reward" in h]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert any(h["updated"] for h in steps)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    for key in ("reward", "reward/rewards_for_tests:parity_reward", "informative_fraction", "alpha",
                "resample_tries", "completion_length_mean", "completion_length_max", "loss",
                "grad_norm", "lr", "time_rollout", "time_reward", "time_train",
                "tokens_per_second", "peak_memory_mb", "accuracy/classification",
                "eval/accuracy"):
        assert key in keys, key
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    # the final checkpoint loads on its own, as a model directory
    ckpt = tmp_path / "run" / "checkpoint-3"
    adapter = VLMAdapter.from_pretrained(ckpt, device="cpu")
    loaded = dict(adapter.model.named_parameters())
    for name, p in trainer.adapter.model.named_parameters():
        assert torch.equal(loaded[name], p.detach()), name


def test_resume_continues_exactly(tiny_dirs, fm_data, tmp_path):
    from gpg_vlm.checkpoint import latest_checkpoint
    from gpg_vlm.train import Trainer

    whole = Trainer(make_config(tiny_dirs, fm_data, tmp_path / "whole", max_steps=4)).train()
    Trainer(make_config(tiny_dirs, fm_data, tmp_path / "split", max_steps=2)).train()
    resumed = Trainer(make_config(tiny_dirs, fm_data, tmp_path / "split", max_steps=4),
                      resume=latest_checkpoint(tmp_path / "split"))
    assert resumed.step == 2
    second = resumed.train()
    assert len(losses(second)) == 2
    first = losses(whole)
    assert any(abs(x) > 0 for x in first)  # the comparison below is not between zeros
    for a, b in zip(first[2:], losses(second)):
        assert abs(a - b) <= 1e-6


def test_no_informative_group_makes_no_update(tiny_dirs, fm_data, tmp_path):
    from gpg_vlm.train import Trainer

    cfg = make_config(tiny_dirs, fm_data, tmp_path / "run", max_steps=1, max_resample_tries=2,
                      rewards={"rewards_for_tests:zero_reward": 1.0})
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    (step,) = [h for h in trainer.train() if "reward" in h]
    assert step["skipped"] == "no informative group" and not step["updated"]
    assert step["resample_tries"] == 2  # beta_th drew more prompts up to the bound
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))


def test_entropy_bonus_adds_to_the_gpg_loss_of_the_same_rollout(tiny_dirs, fm_data, tmp_path):
    from gpg_vlm.train import Trainer

    plain = [h for h in Trainer(make_config(tiny_dirs, fm_data, tmp_path / "a", max_steps=1)).train()
             if "loss" in h][0]
    cfg = make_config(tiny_dirs, fm_data, tmp_path / "b", max_steps=1, entropy_coef=0.5)
    (step,) = [h for h in Trainer(cfg).train() if "loss" in h]
    assert "entropy" not in plain and 0 < step["entropy"] < math.log(2000)
    assert step["reward"] == plain["reward"]  # the same rollout: the bonus acts after sampling
    assert step["loss"] == pytest.approx(plain["loss"] - 0.5 * step["entropy"], abs=1e-5)


def test_gpg_with_a_kl_weight_loads_a_reference_and_starts_at_zero_kl(tiny_dirs, fm_data, tmp_path):
    from gpg_vlm.train import Trainer

    assert Trainer(make_config(tiny_dirs, fm_data, tmp_path / "a")).reference is None
    plain = [h for h in Trainer(make_config(tiny_dirs, fm_data, tmp_path / "b")).train()
             if "loss" in h]
    trainer = Trainer(make_config(tiny_dirs, fm_data, tmp_path / "c", kl_beta=0.5))
    assert trainer.reference is not None
    steps = [h for h in trainer.train() if "loss" in h]
    # step 1: policy == reference, so the KL term is exactly 0; step 2 differs
    assert steps[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-6)
    assert steps[1]["loss"] != pytest.approx(plain[1]["loss"], abs=1e-6)
    assert all(h["alpha"] == p["alpha"] for h, p in zip(steps, plain))


def test_grpo_loads_a_frozen_reference_and_trains(tiny_dirs, fm_data, tmp_path):
    from gpg_vlm.train import Trainer

    trainer = Trainer(make_config(tiny_dirs, fm_data, tmp_path / "run", algorithm="grpo"))
    assert trainer.reference is not None
    assert not any(p.requires_grad for p in trainer.reference.model.parameters())
    ref_before = [p.clone() for p in trainer.reference.model.parameters()]
    steps = [h for h in trainer.train() if "reward" in h]
    assert all(h["updated"] for h in steps)
    assert all(torch.equal(a, b) for a, b in zip(ref_before, trainer.reference.model.parameters()))
    assert all(h["alpha"] == 1.0 for h in steps)  # alpha is GPG's correction only


def test_freeze_vision_and_lora_train_only_what_they_should(tiny_dirs, fm_data, tmp_path):
    from gpg_vlm.train import Trainer

    trainer = Trainer(make_config(tiny_dirs, fm_data, tmp_path / "fv", freeze_vision=True))
    vision = [p.detach().clone() for p in trainer.adapter.model.model.visual.parameters()]
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(vision, trainer.adapter.model.model.visual.parameters()))

    trainer = Trainer(make_config(tiny_dirs, fm_data, tmp_path / "lora", lora_r=4))
    named = dict(trainer.adapter.model.named_parameters())
    base = {k: v.detach().clone() for k, v in named.items() if "lora_" not in k}
    lora = {k: v.detach().clone() for k, v in named.items() if "lora_" in k}
    assert lora and all(p.requires_grad == ("lora_" in k) for k, p in named.items())
    trainer.train()
    named = dict(trainer.adapter.model.named_parameters())
    assert all(torch.equal(v, named[k]) for k, v in base.items())
    assert any(not torch.equal(v, named[k]) for k, v in lora.items())
    assert (tmp_path / "lora" / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_two_process_ddp_on_cpu(tiny_dirs, fm_data, tmp_path, free_port):
    """torchrun with 2 CPU processes (gloo): one global alpha, identical weights everywhere."""
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port), "-m", "gpg_vlm.cli", "train",
            f"model={tiny_dirs('qwen2_vl')}", f"data={fm_data / 'classification_train.jsonl'}",
            f"output_dir={out}", "group_size=4", "prompts_per_step=4", "max_new_tokens=6",
            "learning_rate=1e-3", "max_steps=2", "tensorboard=false", "max_resample_tries=1",
            "rewards={'rewards_for_tests:parity_reward': 1.0}"]
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    # console output belongs to process 0: one training bar, one model-loading bar
    assert run.stderr.count("train:   0%") == 1 and run.stderr.count("Loading weights:   0%") <= 1
    assert run.stdout.count("done: 2 steps") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 2
    for r in steps:
        assert len(r["alpha_per_process"]) == 2 and len(set(r["alpha_per_process"])) == 1
    (final,) = [r for r in records if "parameter_checksums" in r]
    a, b = final["parameter_checksums"]
    assert a == b
    assert any(r["updated"] for r in steps)


def test_prompts_per_step_must_divide_over_processes(tiny_dirs, fm_data, tmp_path, free_port):
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port), "-m", "gpg_vlm.cli", "train",
            f"model={tiny_dirs('qwen2_vl')}", f"data={fm_data / 'classification_train.jsonl'}",
            f"output_dir={out}", "prompts_per_step=3", "max_steps=1"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode != 0
    assert "'prompts_per_step': 3 is not divisible by the 2 processes" in run.stderr
    assert 'gpg_vlm/train.py", line' not in run.stderr  # our message, not our stack trace


def test_gradient_checkpointing_gives_the_same_step(tiny_dirs, fm_data, tmp_path):
    from gpg_vlm.train import Trainer

    plain = Trainer(make_config(tiny_dirs, fm_data, tmp_path / "a", max_steps=1)).train()
    ckpt = Trainer(make_config(tiny_dirs, fm_data, tmp_path / "b", max_steps=1,
                               gradient_checkpointing=True)).train()
    assert losses(plain) and abs(losses(plain)[0] - losses(ckpt)[0]) < 1e-5
    forward = [[h["training_forward"] for h in run if "loss" in h] for run in (plain, ckpt)]
    assert forward == [["shared_prefix"], ["full_rows"]]  # recorded in the metrics
