"""`gpg-vlm bench scale`: one GPG step of each paper recipe's model at real shape, on this CPU.

For every model that a recipe in configs/*.yaml names (Qwen2-VL-2B, Qwen2.5-VL-3B) the bench
builds a random bf16 checkpoint of the exact published shape (gpg_vlm.real_shapes, real 151,936-row
vocabulary), then runs ONE optimizer step of our Trainer on it, as a user with a small GPU
would: bf16 weights, LoRA on the language model's attention, gradient checkpointing. It records
step time (rollout / train), peak RSS, parameters, trainable parameters and tokens.

What is reduced, and stated in every result: one prompt per step (the recipes use 8 or 16),
completions of `completion_tokens` tokens (random weights almost never sample EOS, so every
completion runs to that limit; the recipes allow 256 or 700), one synthetic image of
`image_pixels` pixels. The group size, pixel bounds, learning rate and temperature are the
recipe's. The reward is a hash of the completion text (noise in [0, 1)), so every group is
informative and the step always trains; no learning is measured, only cost.

Each model runs in a fresh process (its peak RSS is its own); the checkpoint is built by
another process first, so building does not count in the step's peak.

Deliberately left out: GPUs (bench/gpu_check.sh), multi-process runs, more than one step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent
# the published model a recipe's `model:` path names -> real shape
MODEL_SHAPES = {"Qwen2-VL-2B": "qwen2_vl-2b", "Qwen2.5-VL-3B": "qwen2_5_vl-3b"}
README_START = "<!-- scale-results:start -->"
README_END = "<!-- scale-results:end -->"


@dataclass(frozen=True)
class ScaleRun:
    """One model's step; every field is written to the results."""

    shape: str
    """gpg_vlm.real_shapes shape name."""
    recipe: str
    """configs/ file whose group size, pixel bounds, learning rate and temperature are used."""
    group_size: int
    max_pixels: int | None
    min_pixels: int | None
    learning_rate: float
    temperature: float
    recipe_prompts_per_step: int
    recipe_max_new_tokens: int
    prompts: int = 1
    """Prompts in the step (reduced from the recipe's prompts_per_step)."""
    completion_tokens: int = 32
    """max_new_tokens (reduced from the recipe's)."""
    image_pixels: int = 448 * 448
    """Pixels of the synthetic image (448 x 448: 256 visual tokens with 14-pixel patches)."""
    lora_r: int = 16
    gradient_checkpointing: bool = True
    dtype: str = "bfloat16"
    threads: int = 0
    """torch threads (0: torch's default, every CPU; `main` passes `auto_threads()`)."""


def noise_reward(completions: list[str], **columns) -> list[float]:
    """A hash of the completion text in [0, 1): free, and different for every completion."""
    return [zlib.crc32(c.encode("utf-8", "replace")) / 2 ** 32 for c in completions]


def recipe_runs(configs: Path = ROOT / "configs", skipped: list | None = None) -> dict[str, ScaleRun]:
    """shape -> the run of the first recipe (by file name) that uses that model.

    A recipe whose model has no real shape here is left out and appended to `skipped` as
    "file: reason".
    """
    import yaml

    runs: dict[str, ScaleRun] = {}
    for path in sorted(configs.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        name = Path(str(cfg.get("model", ""))).name
        shape = next((s for m, s in MODEL_SHAPES.items() if name.startswith(m + "-") or name == m),
                     None)
        if shape is None:
            if skipped is not None:
                skipped.append(f"{path.name}: model {cfg.get('model')!r} has no real shape here "
                               f"({', '.join(MODEL_SHAPES)})")
            continue
        if shape in runs:
            continue
        runs[shape] = ScaleRun(
            shape=shape, recipe=path.name, group_size=int(cfg["group_size"]),
            max_pixels=cfg.get("max_pixels"), min_pixels=cfg.get("min_pixels"),
            learning_rate=float(cfg["learning_rate"]), temperature=float(cfg.get("temperature", 1.0)),
            recipe_prompts_per_step=int(cfg["prompts_per_step"]),
            recipe_max_new_tokens=int(cfg["max_new_tokens"]))
    return runs


def auto_threads(cpus: int | None = None, load: float | None = None) -> int:
    """Threads for one step: the CPUs the 1-minute load average leaves idle, at least 1.

    A parallel region (every matrix product, every elementwise op) ends when its slowest
    thread does, so on a machine whose other jobs already fill the CPUs a second thread
    mostly waits to be scheduled. Measured at reduced depth on the shared 2-core machine
    (load 10-12): one thread took a quarter of the wall time and half the CPU time of two.
    """
    cpus = cpus or os.cpu_count() or 1
    load = os.getloadavg()[0] if load is None else load
    return max(1, min(cpus, int(cpus - load + 0.5)))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_data(folder: Path, pixels: int, n: int, seed: int = 0) -> Path:
    """`n` rows, each one random square RGB image of about `pixels` pixels."""
    import numpy as np
    from PIL import Image

    side = int(math.isqrt(pixels))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "problem": "What is shown in the picture?",
                                 "solution": "noise", "task": "classification"}))
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def step_once(run: ScaleRun, model_dir: Path, scratch: Path, steps: int = 1) -> dict:
    """`steps` Trainer steps on `model_dir`; the record of the last one (called in a fresh process).

    More than one step lets a GPU run measure a step after the first one's kernel selection.
    """
    import torch

    from gpg_vlm.config import TrainConfig
    from gpg_vlm.tasks import samples_of
    from gpg_vlm.train import Trainer

    if run.threads:
        torch.set_num_threads(run.threads)
    data = write_data(scratch / "data", run.image_pixels, run.prompts * steps)
    cfg = TrainConfig(
        model=str(model_dir), data=str(data), output_dir=str(scratch / "run"), algorithm="gpg",
        group_size=run.group_size, prompts_per_step=run.prompts, beta_th=0.0,
        max_resample_tries=0, rewards={"bench.scale:noise_reward": 1.0},
        max_new_tokens=run.completion_tokens, temperature=run.temperature,
        min_pixels=run.min_pixels, max_pixels=run.max_pixels, learning_rate=run.learning_rate,
        max_steps=steps, dtype=run.dtype, gradient_checkpointing=run.gradient_checkpointing,
        lora_r=run.lora_r, lora_alpha=2 * run.lora_r or 16,  # > 0 even unused
        tensorboard=False, seed=0)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    load_s = time.perf_counter() - t0
    setup_rss = _rss_mb()
    model = trainer.adapter.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = trainer.adapter.encode(samples_of(trainer.rows[: run.prompts], cfg.prompt_template))
    prompt_tokens = int(batch.prompt_lengths().sum())
    patches = int(batch.image_grid_thw.prod(-1).sum()) if batch.image_grid_thw is not None else 0
    seconds = []
    for _ in range(steps):
        t1 = time.perf_counter()
        m = trainer.train_step()
        seconds.append(round(time.perf_counter() - t1, 3))
        trainer.step += 1
    completions = run.prompts * run.group_size
    facts = _model_facts(model_dir, model)
    return {
        "shape": run.shape, "checkpoint": facts["checkpoint"],
        "parameters": facts["parameters"], "vision_parameters": facts["vision_parameters"],
        "trainable_parameters": trainable, "vocab_size": model.config.get_text_config().vocab_size,
        "hidden_size": model.config.get_text_config().hidden_size,
        "num_hidden_layers": facts["num_hidden_layers"],
        "loss": m["loss"], "updated": bool(m["updated"]), "grad_norm": m.get("grad_norm"),
        "step_seconds": seconds[-1], "all_step_seconds": seconds,
        "rollout_seconds": round(m["time_rollout"], 3), "train_seconds": round(m["time_train"], 3),
        "load_seconds": round(load_s, 2),
        "prompt_tokens": prompt_tokens, "image_patches": patches, "completions": completions,
        "completion_tokens": round(m["completion_length_mean"] * completions),
        "completion_length_max": m["completion_length_max"],
        "peak_rss_mb": round(_rss_mb()), "setup_rss_mb": round(setup_rss),
        "settings": asdict(run),
    }


def _model_facts(model_dir: Path, model) -> dict:
    """real_shape.json of a real-shape checkpoint; counted from the model for any other one."""
    path = model_dir / "real_shape.json"
    if path.is_file():
        return json.loads(path.read_text())
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    return {"checkpoint": str(model_dir), "parameters": sum(p.numel() for p in base),
            "vision_parameters": sum(p.numel() for p in model.model.visual.parameters()),
            "num_hidden_layers": model.config.get_text_config().num_hidden_layers}


def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    record = step_once(ScaleRun(**spec["run"]), Path(spec["model"]), Path(spec["scratch"]))
    Path(spec["result"]).write_text(json.dumps(record) + "\n")
    return 0


def _python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def ensure_model(shape: str, cache: Path, log, threads: int = 0) -> Path:
    """The checkpoint of `shape` in `cache`, built by a separate process (with `threads` torch
    threads; 0: torch's default) when missing."""
    path = cache / f"real-{shape}"
    if not (path / "real_shape.json").is_file():
        log(f"building {shape} in {path} (random bf16 weights) ...")
        t0 = time.perf_counter()
        env = _python_env()
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        subprocess.run([sys.executable, "-m", "gpg_vlm.cli", "make-real-model", "--shape", shape,
                        "--out", str(path)], check=True, env=env, cwd=ROOT)
        log(f"built {shape} in {time.perf_counter() - t0:.0f} s")
    return path


def run_shape(run: ScaleRun, cache: Path, log) -> dict:
    """The step record of `run` (a fresh process), with `build_seconds` (0 when cached) and the
    UTC time it was measured."""
    t0 = time.perf_counter()
    model = ensure_model(run.shape, cache, log, run.threads)
    build_s = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory(prefix="gpg-scale-") as tmp:
        tmp = Path(tmp)
        spec = {"run": asdict(run), "model": str(model), "scratch": str(tmp),
                "result": str(tmp / "result.json")}
        (tmp / "spec.json").write_text(json.dumps(spec))
        log(f"one GPG step of {run.shape} ({run.recipe}) ...")
        subprocess.run([sys.executable, "-m", "bench.scale", "--worker", str(tmp / "spec.json")],
                       check=True, env=_python_env(), cwd=ROOT)
        record = json.loads((tmp / "result.json").read_text())
    return {**record, "build_seconds": build_s,
            "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def merge_models(previous: list[dict], new: list[dict]) -> list[dict]:
    """`previous` records with those of the shapes in `new` replaced (new shapes appended)."""
    fresh = {r["shape"]: r for r in new}
    merged = [fresh.pop(r["shape"], r) for r in previous]
    return merged + [r for r in new if r["shape"] in fresh]


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "note": "shared machine: other jobs ran beside the bench"}


def markdown(report: dict) -> str:
    lines = [
        "| model | recipe | parameters | vocab | G x completion tokens | prompt tokens | step s "
        "(rollout / train) | peak RSS (GiB) | loss | measured (UTC) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["models"]:
        s = r["settings"]
        lines.append(
            f"| {r['checkpoint']} | {s['recipe']} | {r['parameters'] / 1e9:.2f}B "
            f"({r['trainable_parameters'] / 1e6:.1f}M LoRA) | {r['vocab_size']} | "
            f"{r['completions']} x {s['completion_tokens']} | {r['prompt_tokens']} | "
            f"{r['step_seconds']:.0f} ({r['rollout_seconds']:.0f} / {r['train_seconds']:.0f}) | "
            f"{r['peak_rss_mb'] / 1024:.1f} | {r['loss']:.4g} | {r.get('measured_utc', '?')} |")
    return "\n".join(lines)


def write_readme(path: Path, table: str) -> None:
    """The scale table between its own markers in `path`."""
    report.write_readme(path, table, README_START, README_END)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpg-vlm bench scale", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="shapes to run (default: all)")
    parser.add_argument("--output", default=None,
                        help="results JSON (default bench/scale.json, where the records of shapes "
                             "not run now are kept; any other file holds this run only)")
    parser.add_argument("--readme", default=None,
                        help="Markdown file whose scale block is replaced (default: bench/README.md "
                             "when --output is the default, else none)")
    parser.add_argument("--cache", default=None,
                        help="where checkpoints are built (default: $TMPDIR/gpg-vlm-scale)")
    parser.add_argument("--completion-tokens", type=int, default=ScaleRun.completion_tokens)
    parser.add_argument("--image-pixels", type=int, default=ScaleRun.image_pixels)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the build and the step (default: the CPUs the load "
                             "average leaves idle, at least 1; 0: torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    skipped: list[str] = []
    runs = recipe_runs(skipped=skipped)
    for line in skipped:
        print(f"gpg-vlm bench scale: skipped {line}", file=sys.stderr)
    only = args.only or list(runs)
    unknown = [s for s in only if s not in runs]
    if unknown:
        print(f"gpg-vlm bench scale: --only {' '.join(unknown)}: no recipe uses it; "
              f"valid: {', '.join(runs)}", file=sys.stderr)
        return 2
    cache = Path(args.cache or Path(tempfile.gettempdir()) / "gpg-vlm-scale")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    models = []
    for shape in only:
        load = os.getloadavg()[0]
        threads = auto_threads(load=load) if args.threads is None else args.threads
        log(f"{shape}: {threads or 'default'} torch thread(s), load average {load:.1f} "
            f"on {os.cpu_count()} CPUs")
        run = ScaleRun(**{**asdict(runs[shape]), "completion_tokens": args.completion_tokens,
                          "image_pixels": args.image_pixels, "threads": threads})
        command = "gpg-vlm bench scale " + " ".join(argv)
        models.append({**run_shape(run, cache, log), "command": command,
                       "load_average_at_start": round(load, 2)})
    output = Path(args.output or RESULTS / "scale.json")
    if args.output is None and output.is_file():  # the repository's record: keep other shapes
        models = merge_models(json.loads(output.read_text())["models"], models)
    report = {"command": "per record (`command`)", "machine": machine(),
              "models": models, "skipped_recipes": skipped}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    print(table)
    readme = args.readme or (RESULTS / "README.md" if args.output is None else None)
    if readme:
        write_readme(Path(readme), table)
    bad = [r["shape"] for r in models if not math.isfinite(r["loss"])]
    if bad:
        print(f"gpg-vlm bench scale: non-finite loss for {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
