"""gpg-vlm estimate: each term by hand on a toy shape, and the whole against measured CPU peaks."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpg_vlm.estimate import BYTES, Shape, Workload, estimate, lora_parameters

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
    # layer (9*4 + 2*2 + 4*8) = 72 values x 2 bytes; 2 layers -> 7 * 72 * 2 * 2 = 2016 bytes
    assert r["activations"] == pytest.approx(2016 / GB)
    # one layer's backward without checkpointing: the MLP's 3 x 8 gradient values per token
    assert r["layer_backward"] == pytest.approx(7 * 3 * 8 * 2 / GB)
    assert r["logprob_chunk"] == pytest.approx(3 * 4 * 10 * 4 / GB)  # 4 positions x V fp32 x 3
    assert r["rollout_kv_cache"] == pytest.approx(2 * 2 * 2 * 5 * 2 * 2 / GB)  # 2 rows of 5 tokens


def test_checkpointing_sharding_and_chunks_move_the_right_terms():
    w = Workload(group_size=2, prompts=1, prompt_tokens=3, completion_tokens=2)
    base = estimate(TOY, w)
    ckpt = estimate(TOY, Workload(**{**w.__dict__, "gradient_checkpointing": True}))
    # each row runs 3 + 2 tokens: 10 tokens; layer inputs 2 layers x 10 x 4 values x 2 bytes;
    # one layer recomputed (72 values) and its backward (24) per token: 10 x 96 x 2 bytes
    assert ckpt["activations"] == pytest.approx(2 * 10 * 4 * 2 / 1e9)
    assert ckpt["layer_backward"] == pytest.approx(10 * 96 * 2 / 1e9)
    assert ckpt["train_peak"] - ckpt["activations"] - ckpt["layer_backward"] == pytest.approx(
        base["train_peak"] - base["activations"] - base["layer_backward"])
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
    """(id, record, shape_of keywords) of every step measured in bench/scale.json (full depth),
    bench/sweep.json and its re-run on the current code, bench/sweep-rerun.json (their stated
    reduced depths)."""
    out = []
    scale = ROOT / "bench" / "scale.json"
    if scale.is_file():
        out += [(r["shape"], r, {}) for r in json.loads(scale.read_text())["models"]]
    for name in ("sweep", "sweep-rerun"):
        sweep = ROOT / "bench" / f"{name}.json"
        if not sweep.is_file():
            continue
        report = json.loads(sweep.read_text())
        depth = {"text_layers": report["model"]["text_layers"],
                 "vision_layers": report["model"]["vision_layers"]}
        out += [(f"{name}-{{factor}}-G{{group_size}}-T{{completion_tokens}}-px{{image_pixels}}-i{{images}}"
                 .format(factor=r["factor"], **r["point"]), r, depth) for r in report["points"]]
    return out


MEASURED = _measured()


@functools.lru_cache(maxsize=None)
def _shape(checkpoint: str, text_layers=None, vision_layers=None):
    from gpg_vlm.estimate import shape_of

    return shape_of(checkpoint, text_layers, vision_layers)


def _relative_error(record, depth, **change) -> float:
    """(estimate - measured) / measured of one measured step's CPU peak RSS."""
    from gpg_vlm.estimate import CPU_RUNTIME_GB, measured_workload

    shape = _shape(record["checkpoint"], **depth)
    assert shape.parameters == record["parameters"]  # the estimate sees the measured model
    w = measured_workload(record)
    estimated = estimate(shape, Workload(**{**w.__dict__, **change}), runtime_gb=CPU_RUNTIME_GB)["peak"]
    measured = record["peak_rss_mb"] * 2 ** 20 / 1e9
    return (estimated - measured) / measured


def test_measured_steps_are_there():
    ids = [i for i, _, _ in MEASURED]
    assert {"qwen2_vl-2b", "qwen2_5_vl-3b"} <= set(ids) and len(ids) >= 10, ids


@pytest.mark.parametrize("record,depth", [(r, d) for _, r, d in MEASURED],
                         ids=[i for i, _, _ in MEASURED])
def test_estimate_is_within_25_percent_of_the_measured_cpu_peak(record, depth):
    """One GPG step per point, peak RSS of its own process: bf16, LoRA, checkpointing, CPU."""
    error = _relative_error(record, depth)
    assert abs(error) < 0.25, f"estimate off by {error:+.0%}"


def test_a_wrong_term_fails_the_comparison(monkeypatch):
    """Negative controls, each on the points its term dominates. Log-probs estimated unchunked
    (full-vocabulary logits of every completion token of the micro-batch at once) overshoot the
    700-token point: the measured peak shows those logits never existed at once. The log-prob
    chunk left out undershoots the points that fill a whole chunk (1,024 positions). bf16
    weights counted as fp32 overshoot the full-depth models, where weights dominate."""
    from gpg_vlm import estimate as module

    sweep = [(r, d) for i, r, d in MEASURED if i.startswith("sweep-")]
    long = [(r, d) for r, d in sweep if r["point"]["completion_tokens"] == 700]
    full_chunk = [(r, d) for r, d in sweep
                  if r["point"]["group_size"] * r["point"]["completion_tokens"] >= 1024]
    full_depth = [(r, d) for i, r, d in MEASURED if not i.startswith("sweep-")]
    assert long and len(full_chunk) >= 3 and full_depth
    assert all(_relative_error(r, d, logprob_chunk_tokens=0) > 0.25 for r, d in long)
    monkeypatch.setattr(module, "LOGPROB_COPIES", 0)
    assert all(_relative_error(r, d) < -0.25 for r, d in full_chunk)
    monkeypatch.undo()
    monkeypatch.setitem(BYTES, "bfloat16", 4)
    assert all(_relative_error(r, d) > 0.25 for r, d in full_depth)
