"""gpg-vlm estimate: each term by hand on a toy shape, and the whole against measured CPU peaks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpg_vlm.estimate import Shape, Workload, estimate, lora_parameters

ROOT = Path(__file__).resolve().parent.parent
TOY = Shape(parameters=1000, vision_parameters=100, layers=2, hidden=4, intermediate=8,
            kv_width=2, vocab=10, patch=28)


def test_terms_by_hand():
    w = Workload(dtype="bfloat16", group_size=2, prompts=1, prompt_tokens=3, completion_tokens=2,
                 micro_batch_tokens=100)
    r = estimate(TOY, w, runtime_gb=0.0)
    GB = 1e9
    assert r["weights"] == pytest.approx(2000 / GB)  # 1000 parameters x 2 bytes
    assert r["gradients"] == pytest.approx(2000 / GB)  # full fine-tuning
    assert r["optimizer"] == pytest.approx(4000 / GB)  # two AdamW states
    # shared prefix: 3 prompt tokens once + 2 x 2 completion tokens = 7 tokens; per token and
    # layer (7*4 + 2*2 + 4*8) = 64 values x 2 bytes; 2 layers -> 7 * 64 * 2 * 2 = 1792 bytes
    assert r["activations"] == pytest.approx(1792 / GB)
    assert r["logprob_chunk"] == pytest.approx(3 * 4 * 10 * 4 / GB)  # 4 positions x V fp32 x 3
    assert r["rollout_kv_cache"] == pytest.approx(2 * 2 * 2 * 5 * 2 * 2 / GB)  # 2 rows of 5 tokens


def test_checkpointing_sharding_and_chunks_move_the_right_terms():
    w = Workload(group_size=2, prompts=1, prompt_tokens=3, completion_tokens=2)
    base = estimate(TOY, w)
    ckpt = estimate(TOY, Workload(**{**w.__dict__, "gradient_checkpointing": True}))
    # each row runs 3 + 2 tokens: 10 tokens; layer inputs 2 x 10 x 4 x 2 + one layer 10 x 128
    assert ckpt["activations"] == pytest.approx((2 * 10 * 4 * 2 + 10 * 128) / 1e9)
    fsdp = estimate(TOY, w, gpus=4, sharding="fsdp")
    assert fsdp["weights"] == pytest.approx(base["weights"] / 4)
    assert fsdp["optimizer"] == pytest.approx(base["optimizer"] / 4)
    assert fsdp["weights_gathered_for_rollout"] == base["weights"]  # the rollout gathers all
    chunked = estimate(TOY, Workload(**{**w.__dict__, "logprob_chunk_tokens": 1}))
    assert chunked["logprob_chunk"] == pytest.approx(base["logprob_chunk"] / 4)
    lora = estimate(TOY, Workload(**{**w.__dict__, "lora_r": 1}))
    assert lora["trainable_parameters"] == lora_parameters(TOY, 1) == 2 * (8 + 6 + 6 + 8)


def test_recipes_print_a_table():
    out = subprocess.run([sys.executable, "-m", "gpg_vlm.cli", "estimate", "--config",
                          str(ROOT / "configs" / "qwen25vl3b_geoqa.yaml"), "--gpus", "8",
                          "--sharding", "fsdp", "--json"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["workload"]["prompts"] == 2 and r["weights"] == pytest.approx(3.7546 * 2 / 8, rel=1e-3)


def _measured():
    path = ROOT / "bench" / "scale.json"
    return json.loads(path.read_text())["models"] if path.is_file() else []


@pytest.mark.parametrize("record", _measured(), ids=lambda r: r["shape"])
def test_estimate_is_within_25_percent_of_the_measured_cpu_peak(record):
    """bench/scale.json: one GPG step per recipe model at real shape, peak RSS of its process."""
    from gpg_vlm.estimate import shape_of
    from gpg_vlm.models.forward import LOGPROB_CHUNK_TOKENS

    s = record["settings"]
    w = Workload(dtype=s["dtype"], lora_r=s["lora_r"],
                 gradient_checkpointing=s["gradient_checkpointing"], group_size=s["group_size"],
                 prompts=s["prompts"], prompt_tokens=record["prompt_tokens"] // s["prompts"],
                 completion_tokens=s["completion_tokens"],
                 logprob_chunk_tokens=LOGPROB_CHUNK_TOKENS,
                 trainable_parameters=record["trainable_parameters"])
    shape = shape_of(record["checkpoint"])
    assert shape.parameters == record["parameters"]
    estimated = estimate(shape, w, runtime_gb=0.4)["peak"]  # 0.4 GB: the CPU runtime constant
    measured = record["peak_rss_mb"] * 2 ** 20 / 1e9
    assert abs(estimated - measured) / measured < 0.25, (estimated, measured)
