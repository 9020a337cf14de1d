"""`gpg-vlm make-tiny-model` then `gpg-vlm train` for the families, through the CLI in-process.

Two GPG steps for every family run in the default suite (4-7 s each when the shared machine
was quiet, 40-50 s under load); the Qwen3.5-MoE train-and-resume check (about 30 s: 4 steps,
3 model loads) runs with `make test-slow`. Rewards: `rewards_for_tests:parity_reward`,
informative from the first step on a random model, so every step updates.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpg_vlm.cli import main as cli
from gpg_vlm.models.family import FAMILIES


@pytest.fixture(scope="module")
def fm_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm_families")
    assert cli(["prepare-data", "fashion-mnist", "--out", str(out), "--train-size", "16",
                "--test-size", "4", "--tasks", "classification"]) == 0
    return out / "classification_train.jsonl"


def train(model: Path, data: Path, out: Path, steps: int, *extra: str) -> list[dict]:
    code = cli(["train", f"model={model}", f"data={data}", f"output_dir={out}", "group_size=4",
                "prompts_per_step=2", "max_new_tokens=4", "learning_rate=1e-3",
                f"max_steps={steps}", "save_steps=1", "tensorboard=false", "max_resample_tries=0",
                "lr_schedule=constant", "rewards={'rewards_for_tests:parity_reward': 1.0}", *extra])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def changed_tensors(before: Path, after: Path) -> tuple[int, int, list[str]]:
    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    return len(changed), len(a), changed


def make(family: str, out: Path) -> Path:
    assert cli(["make-tiny-model", "--family", family, "--size", "xs", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_qwen35_moe_trains_with_its_experts_and_resumes_exactly(fm_rows, tmp_path):
    model = make("qwen3_5_moe", tmp_path / "model")
    whole = train(model, fm_rows, tmp_path / "whole", 2)
    assert len(whole) == 2 and all(math.isfinite(s["loss"]) and s["updated"] for s in whole)
    n, total, changed = changed_tensors(model, tmp_path / "whole" / "checkpoint-2")
    assert n == total  # every tensor moved, the experts and the router among them
    assert any(".mlp.experts." in k for k in changed) and any(".mlp.gate." in k for k in changed)
    assert any(".linear_attn." in k for k in changed)

    train(model, fm_rows, tmp_path / "split", 1)
    resumed = train(model, fm_rows, tmp_path / "split", 2, "--resume")
    assert [s["loss"] for s in resumed][-1] == pytest.approx(whole[-1]["loss"], abs=1e-6)
    assert any(abs(s["loss"]) > 0 for s in whole)  # the comparison is not between zeros


@pytest.mark.parametrize("family", tuple(FAMILIES))
def test_two_gpg_steps_for_every_family(family, fm_rows, tmp_path):
    model = make(family, tmp_path / "model")
    steps = train(model, fm_rows, tmp_path / "run", 2)
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)
    assert all(s["updated"] for s in steps)
    n, total, _ = changed_tensors(model, tmp_path / "run" / "checkpoint-2")
    assert n > total // 2
