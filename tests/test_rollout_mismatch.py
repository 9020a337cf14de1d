"""What the trainer does about its rollout engine, with either engine (the default suite runs
these with the HF loop; tests/test_vllm_*.py run vLLM itself):

- `rollout_logprob_diff` is logged every step, trained or not, and catches an engine whose
  log-probs are off (a fake engine shifts them by a known amount);
- `rollout_is_cap`: the truncated-IS mean and clip fraction, by hand for that shift;
- an engine that fails mid-run stops the run with the last finished step saved, and resuming
  from it gives the uninterrupted run's numbers;
- `rollout: vllm` where vLLM is missing, or a vllm_* key without it, is one line.
"""

import math

import pytest
import torch

from gpg_vlm.config import ConfigError
from gpg_vlm.rollout import RolloutError
from helpers import losses, make_config


class ShiftedEngine:
    """The HF loop whose reported log-probs are `shift` lower than the policy's."""

    def __init__(self, engine, shift):
        self.engine, self.shift = engine, shift

    def generate(self, *args, **kwargs):
        rollout = self.engine.generate(*args, **kwargs)
        rollout.logprobs = (rollout.logprobs - self.shift) * rollout.completion_mask
        return rollout

    def sync_weights(self, model):
        self.engine.sync_weights(model)

    def close(self):
        self.engine.close()


def trainer_with(cfg, shift=None):
    from gpg_vlm.train import Trainer

    trainer = Trainer(cfg)
    if shift is not None:
        trainer.rollout = trainer.sampler.engine = ShiftedEngine(trainer.rollout, shift)
    return trainer


def test_logprob_diff_is_logged_every_step_and_catches_a_shift(tiny_dirs, fm_data, tmp_path):
    steps = [h for h in trainer_with(make_config(tiny_dirs, fm_data, tmp_path / "a", max_steps=2)).train()
             if "reward" in h]
    assert len(steps) == 2 and all(h["rollout_logprob_diff"] < 1e-4 for h in steps)
    shifted = [h for h in trainer_with(make_config(tiny_dirs, fm_data, tmp_path / "b", max_steps=1),
                                       shift=0.5).train() if "reward" in h]
    assert abs(shifted[0]["rollout_logprob_diff"] - 0.5) < 1e-4
    # a step with no informative group trains nothing and still reports the difference
    idle = [h for h in trainer_with(make_config(
        tiny_dirs, fm_data, tmp_path / "c", max_steps=1, rewards={"rewards_for_tests:zero_reward": 1.0}),
        shift=0.25).train() if "reward" in h]
    assert idle[0]["skipped"] == "no informative group"
    assert abs(idle[0]["rollout_logprob_diff"] - 0.25) < 1e-4


def test_truncated_importance_sampling_mean_and_clip_fraction(tiny_dirs, fm_data, tmp_path):
    # the engine reports log mu = log pi - 0.5, so pi / mu = e^0.5 = 1.6487 on every token:
    # cap 1.2 clips all of them (mean 1.2, fraction 1); cap 2.0 none (mean 1.6487, fraction 0)
    def run(name, cap):
        cfg = make_config(tiny_dirs, fm_data, tmp_path / name, max_steps=1, rollout_is_cap=cap)
        return [h for h in trainer_with(cfg, shift=0.5).train() if "reward" in h][0]

    low, high = run("low", 1.2), run("high", 2.0)
    assert abs(low["rollout_is_mean"] - 1.2) < 1e-4 and low["rollout_is_clip_fraction"] == 1.0
    assert abs(high["rollout_is_mean"] - math.exp(0.5)) < 1e-3
    assert high["rollout_is_clip_fraction"] == 0.0
    # the weights scale the loss: with the same completions, loss(cap 2.0) / loss(cap 1.2) = e^0.5 / 1.2
    assert abs(high["loss"] / low["loss"] - math.exp(0.5) / 1.2) < 1e-3
    plain = [h for h in trainer_with(make_config(tiny_dirs, fm_data, tmp_path / "plain", max_steps=1)).train()
             if "reward" in h][0]
    assert "rollout_is_mean" not in plain


def test_an_engine_failure_saves_the_last_finished_step_and_resumes_exactly(tiny_dirs, fm_data, tmp_path):
    from gpg_vlm.checkpoint import latest_checkpoint
    from gpg_vlm.train import Trainer

    whole = losses(Trainer(make_config(tiny_dirs, fm_data, tmp_path / "whole", max_steps=3)).train())
    trainer = Trainer(make_config(tiny_dirs, fm_data, tmp_path / "failed", max_steps=3))
    engine, calls = trainer.rollout, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RolloutError("vLLM engine failed while sampling: RuntimeError: boom")
        return engine.generate(*args, **kwargs)

    trainer.sampler.engine = type("Failing", (), {"generate": staticmethod(failing)})()
    with pytest.raises(RolloutError, match="boom"):
        trainer.train()
    assert (tmp_path / "failed" / "checkpoint-2").is_dir()  # the last finished step
    resumed = Trainer(make_config(tiny_dirs, fm_data, tmp_path / "failed", max_steps=3),
                      resume=latest_checkpoint(tmp_path / "failed"))
    assert resumed.step == 2
    assert abs(losses(resumed.train())[0] - whole[2]) <= 1e-6


def test_vllm_settings_need_vllm(tiny_dirs, fm_data, tmp_path):
    with pytest.raises(ConfigError, match="'vllm_sleep': applies only with rollout: vllm"):
        make_config(tiny_dirs, fm_data, tmp_path, vllm_sleep=True)
    with pytest.raises(ConfigError, match="'rollout': 'sglang' is not one of hf, vllm"):
        make_config(tiny_dirs, fm_data, tmp_path, rollout="sglang")


def test_rollout_vllm_without_vllm_is_one_line(tiny_dirs, fm_data, tmp_path, capsys, monkeypatch):
    import builtins

    from gpg_vlm.train import main

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):  # as where vLLM is not installed, whatever is here
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    model = tiny_dirs("qwen2_vl")
    capsys.readouterr()
    monkeypatch.setattr(builtins, "__import__", no_vllm)
    code = main([f"model={model}", f"data={fm_data / 'classification_train.jsonl'}",
                 f"output_dir={tmp_path}", "rollout=vllm", "max_steps=1",
                 "rewards={rewards_for_tests:parity_reward: 1.0}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "rollout: vllm needs vLLM, which is not installed: pip install 'gpg_vlm[vllm]'" in err[0]


def test_smoke_config_parses_with_either_engine():
    from pathlib import Path

    from gpg_vlm.config import TrainConfig

    path = Path(__file__).parent.parent / "configs" / "smoke" / "tiny_m_classification.yaml"
    assert TrainConfig.from_yaml(str(path)).rollout == "hf"
    cfg = TrainConfig.from_yaml(str(path), ["rollout=vllm", "max_steps=3"])
    assert (cfg.rollout, cfg.max_steps, cfg.model) == ("vllm", 3, "runs/tiny-m-qwen2vl")
