"""GPG training with `rollout: vllm`, for all three families: it trains and resumes exactly.

Marked `vllm` (see tests/test_vllm_rollout.py for where they run and why size `s32`).
"""

import math

import pytest
import torch

from gpg_vlm.models.adapter import VLMAdapter
from gpg_vlm.tiny import make_tiny_model
from helpers import make_config

pytestmark = pytest.mark.vllm

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def run(cfg, resume=None):
    """Train to cfg.max_steps; (step records, final trainable weights). The engine is closed after."""
    from gpg_vlm.train import Trainer

    trainer = Trainer(cfg, resume=resume)
    try:
        history = trainer.train()
        return [h for h in history if "reward" in h], [p.detach().clone() for p in trainer.params]
    finally:
        trainer.rollout.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_three_vllm_steps_train_and_resume_exactly(family, tiny_dirs, fm_data, tmp_path):
    from gpg_vlm.checkpoint import latest_checkpoint

    model = make_tiny_model(family, "s32", tmp_path / "model", seed=0, init_std=0.1)

    def cfg(out, steps):
        return make_config(tiny_dirs, fm_data, tmp_path / out, model=str(model), max_steps=steps,
                           rollout="vllm", rewards={"rewards_for_tests:alternating_reward": 1.0},
                           save_steps=2)

    initial = list(VLMAdapter.from_pretrained(model, device="cpu").model.parameters())  # all trained
    whole, final = run(cfg("whole", 3))
    assert len(whole) == 3 and all(h["updated"] for h in whole)
    assert all(math.isfinite(h["loss"]) and h["loss"] != 0 for h in whole)
    assert all(h["rollout_logprob_diff"] < 1e-4 for h in whole)
    assert len(initial) == len(final)
    assert sum(not torch.equal(a, b) for a, b in zip(initial, final)) > len(final) // 2

    run(cfg("split", 2))
    resumed, resumed_final = run(cfg("split", 3), resume=latest_checkpoint(tmp_path / "split"))
    assert [h["step"] for h in resumed] == [3]
    assert abs(resumed[0]["loss"] - whole[2]["loss"]) <= 1e-6
    assert resumed[0]["reward"] == whole[2]["reward"]
    for a, b in zip(final, resumed_final):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
