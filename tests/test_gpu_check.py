"""bench/gpu_check.sh without a GPU: the dry run goes through every stage that needs no CUDA."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402


def _script(tmp_path, *args, wheels=None):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    if wheels is not None:
        env["GPU_CHECK_WHEELS"] = str(wheels)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    return proc, report


def test_dry_run_writes_one_complete_json(tmp_path):
    proc, r = _script(tmp_path, "--dry-run", "--skip-tests")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert r["dry_run"] is True
    assert {r[k]["status"] for k in ("env", "build", "step")} == {"ok"}, r
    assert r["build"]["parameters"] == 3754622976  # the 3B shape, counted on the meta device
    step = r["step"]
    assert math.isfinite(step["loss"]) and step["updated"]
    assert step["completion_tokens"] == step["completions"] * step["settings"]["completion_tokens"]
    assert set(step["mfu"]) == {"datasheet", "measured_matmul"} and step["tokens_per_second"] > 0
    assert (tmp_path / "gpu_check.log").is_file()


def test_without_cuda_and_without_dry_run_it_stops_with_a_reason(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # no wheels: the GPU machine's cp312 wheels would not install into this Python
    proc, r = _script(tmp_path, "--skip-tests", wheels=tmp_path / "no-wheels")
    assert proc.returncode == 1
    assert r["error"].startswith("no CUDA device") and "step" not in r


def test_model_flops_by_hand():
    # 10 parameters of which 4 vision; 3 prompt + 2 completion tokens (G = 2); 7 patches.
    # rollout: 2*6*(3+2) + 2*4*7 = 60 + 56; train, shared prefix, vision trained:
    # 6*6*(3+2) + 6*4*7 = 180 + 168. Total 464. With checkpointing every completion runs its
    # prompt (2*3 + 2 = 8 tokens) at 8 per token: 8*6*8 + 8*4*7 = 384 + 224 -> 724.
    r = {"parameters": 10, "vision_parameters": 4, "prompt_tokens": 3, "completion_tokens": 2,
         "image_patches": 7, "settings": {"gradient_checkpointing": False, "group_size": 2}}
    assert gpu_check.model_flops(r, vision_trained=True) == 464
    r["settings"]["gradient_checkpointing"] = True
    assert gpu_check.model_flops(r, vision_trained=True) == 724
    assert gpu_check.model_flops(r, vision_trained=False) == 60 + 56 + 384 + 2 * 4 * 7
