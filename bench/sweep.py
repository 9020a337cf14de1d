"""`gpg-vlm bench sweep`: how one GPG step's time and peak memory grow, one factor at a time.

The model: Qwen2-VL-2B at its published widths and real 151,936-row vocabulary, reduced in depth
to TEXT_LAYERS decoder layers and VISION_LAYERS vision blocks (of 28 and 32), built once by
gpg_vlm.real_shapes. The output layer, the embedding, every width and the vision tower's
attention over all patches of an image (Qwen2-VL has no windows) stay real, so the per-token and
per-patch terms are those of the real model; only the depth multipliers are cut.

Around a base point (BASE: G=4, T=64 completion tokens, one 100k-pixel image), each factor in
FACTORS moves alone: group size 4 / 8 / 16, completion length 64 / 256 / 700, image pixels
100k / 401k / 1M, images per prompt 1 / 2. Every point is one optimizer step of our Trainer
(bench/scale.py's `step_once`: bf16, LoRA r=16, gradient checkpointing, one prompt) in a fresh
process, so its peak RSS is its own. Every completion is forced to exactly T tokens (EOS is
forbidden for T steps, as bench/harness.py does) and the record says how many were generated.
The worker changes two things in its own process only, so bench/scale.py is reused unchanged:
HFRollout.generate gets `min_new_tokens=T` (and records the peak RSS when the rollout ends),
and scale.write_data writes rows of `images` images.

Deliberately left out: more than one step per point, repeats (the machine is shared; the CPU
seconds of each point's process are recorded beside its wall time), GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import scale

RESULTS = Path(__file__).resolve().parent
SHAPE = "qwen2_vl-2b"
TEXT_LAYERS = 2
VISION_LAYERS = 4
README_START = "<!-- sweep-results:start -->"
README_END = "<!-- sweep-results:end -->"


@dataclass(frozen=True)
class Point:
    """One sweep point: the factors that move."""

    group_size: int = 4
    completion_tokens: int = 64
    image_pixels: int = 100_000
    images: int = 1


BASE = Point()
# the longest points (700-token completions) last, so an interrupted sweep keeps the others
FACTORS = {"group_size": (4, 8, 16), "image_pixels": (100_000, 401_408, 1_000_000),
           "images": (1, 2), "completion_tokens": (64, 256, 700)}


def points(only: list[str] | None = None) -> list[tuple[str, Point]]:
    """(factor, point) for the base and every other value of each factor, base first."""
    out = [("base", BASE)]
    for factor, values in FACTORS.items():
        if only and factor not in only:
            continue
        out += [(factor, dataclasses.replace(BASE, **{factor: v}))
                for v in values if v != getattr(BASE, factor)]
    return out


def scale_run(p: Point, threads: int = 0) -> scale.ScaleRun:
    """bench/scale.py's run for point `p`: the qwen2vl2b recipe's values, no pixel cap."""
    return scale.ScaleRun(
        shape=f"{SHAPE}-{TEXT_LAYERS}l-{VISION_LAYERS}v", recipe="bench/sweep.py",
        group_size=p.group_size, max_pixels=2_000_000, min_pixels=3136, learning_rate=1e-6,
        temperature=1.0, recipe_prompts_per_step=1, recipe_max_new_tokens=p.completion_tokens,
        completion_tokens=p.completion_tokens, image_pixels=p.image_pixels, threads=threads)


# ------------------------------------------------------------------ the model
def build(out: Path) -> dict:
    """The reduced-depth checkpoint (this process registers the reduced shape, nothing else)."""
    from gpg_vlm import real_shapes

    full = real_shapes.SHAPES[SHAPE]
    name = f"{SHAPE}-{TEXT_LAYERS}l-{VISION_LAYERS}v"
    real_shapes.SHAPES[name] = dataclasses.replace(
        full, name=name, text=dict(full.text, num_hidden_layers=TEXT_LAYERS),
        vision=dict(full.vision, depth=VISION_LAYERS))
    return real_shapes.make_real_model(name, out)


def ensure_model(cache: Path, log) -> Path:
    path = cache / f"sweep-{SHAPE}-{TEXT_LAYERS}l-{VISION_LAYERS}v"
    if not (path / "real_shape.json").is_file():
        log(f"building {path.name} ...")
        subprocess.run([sys.executable, "-m", "bench.sweep", "--build", str(path)], check=True,
                       env=scale._python_env(), cwd=scale.ROOT)
    return path


# ------------------------------------------------------------------ one point, in its own process
def _worker(spec_path: str) -> int:
    """One point: EOS forbidden for T tokens, `images` images per row, then scale.step_once."""
    import functools

    from gpg_vlm.rollout.hf import HFRollout

    spec = json.loads(Path(spec_path).read_text())
    point, run = Point(**spec["point"]), scale.ScaleRun(**spec["run"])
    generate, rollout_peaks = HFRollout.generate, []

    def forced(self, *args, **kwargs):
        out = generate(self, *args, min_new_tokens=point.completion_tokens, **kwargs)
        rollout_peaks.append(scale._rss_mb())  # the peak so far: set-up and rollout
        return out

    HFRollout.generate = forced
    one_image = scale.write_data
    scale.write_data = functools.partial(_write_rows, one_image, point.images)
    record = scale.step_once(run, Path(spec["model"]), Path(spec["scratch"]))
    record["rollout_peak_rss_mb"] = round(rollout_peaks[0])
    Path(spec["result"]).write_text(json.dumps(record) + "\n")
    return 0


def _write_rows(one_image, images: int, folder: Path, pixels: int, n: int, seed: int = 0) -> Path:
    """scale.write_data's rows with `images` different noise images each."""
    path = one_image(folder, pixels, n * images, seed)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    merged = [dict(rows[i * images], image=[r["image"] for r in rows[i * images:(i + 1) * images]])
              for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in merged), encoding="utf-8")
    return path


def run_point(factor: str, p: Point, model: Path, threads: int, log) -> dict:
    run = scale_run(p, threads)
    with tempfile.TemporaryDirectory(prefix="gpg-sweep-") as tmp:
        tmp = Path(tmp)
        spec = {"point": asdict(p), "run": asdict(run), "model": str(model), "scratch": str(tmp),
                "result": str(tmp / "result.json")}
        (tmp / "spec.json").write_text(json.dumps(spec))
        log(f"{factor}: {p} ...")
        before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.sweep", "--worker", str(tmp / "spec.json")],
                       check=True, env=scale._python_env(), cwd=scale.ROOT)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        record = json.loads((tmp / "result.json").read_text())
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    forced = record["completion_tokens"] == p.group_size * p.completion_tokens
    return {"factor": factor, "point": asdict(p), "process_seconds": round(time.perf_counter() - t0, 1),
            "process_cpu_seconds": round(cpu, 1), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2), "length_forced": forced, **record}


# ------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    """The results table; `estimates` (GB per point, gpg_vlm.estimate) adds a column."""
    estimates = _estimates(report)
    lines = ["| factor | G | T | pixels | images | prompt tokens | image patches | completion tokens "
             "| step s (rollout / train) | process CPU s | peak RSS MB (rollout phase) "
             "| estimate MB (error) | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, est in zip(report["points"], estimates):
        p = r["point"]
        rollout = f" ({r['rollout_peak_rss_mb']:,})" if r.get("rollout_peak_rss_mb") else ""
        est_mb = est * 1e9 / 2 ** 20
        lines.append(
            f"| {r['factor']} | {p['group_size']} | {p['completion_tokens']} | {p['image_pixels']:,} | "
            f"{p['images']} | {r['prompt_tokens']} | {r['image_patches']} | {r['completion_tokens']}"
            f"{'' if r['length_forced'] else ' (not forced!)'} | {r['step_seconds']:.0f} "
            f"({r['rollout_seconds']:.0f} / {r['train_seconds']:.0f}) | {r['process_cpu_seconds']:.0f} | "
            f"{r['peak_rss_mb']:,}{rollout} | {est_mb:,.0f} ({est_mb / r['peak_rss_mb'] - 1:+.0%}) | "
            f"{r['load_before']:.1f}-{r['load_after']:.1f} |")
    return "\n".join(lines)


def _estimates(report: dict) -> list[float]:
    """gpg-vlm estimate's peak (GB) of each measured point (gpg_vlm.estimate.measured_workload)."""
    from gpg_vlm.estimate import CPU_RUNTIME_GB, estimate, measured_workload, shape_of

    m = report["model"]
    shape = shape_of(report["points"][0]["checkpoint"], m["text_layers"], m["vision_layers"])
    return [estimate(shape, measured_workload(r), runtime_gb=CPU_RUNTIME_GB)["peak"]
            for r in report["points"]]


def _publish(report: dict, readme) -> None:
    table = markdown(report)
    print(table)
    if readme:
        scale.report.write_readme(Path(readme), table, README_START, README_END)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpg-vlm bench sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(FACTORS), default=None,
                        help="factors to sweep (default: all; the base point always runs)")
    parser.add_argument("--output", default=None, help="results JSON (default bench/sweep.json)")
    parser.add_argument("--readme", default=None,
                        help="Markdown file whose sweep block is replaced (default: bench/README.md "
                             "when --output is the default, else none)")
    parser.add_argument("--cache", default=None,
                        help="where the checkpoint is built (default: $TMPDIR/gpg-vlm-scale)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--table", metavar="JSON",
                        help="run nothing: print (and write to --readme) the table of a results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if args.build:
        build(Path(args.build))
        return 0
    if args.table:
        report = json.loads(Path(args.table).read_text())
        _publish(report, args.readme)
        return 0
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    model = ensure_model(Path(args.cache or Path(tempfile.gettempdir()) / "gpg-vlm-scale"), log)
    report = {"command": "gpg-vlm bench sweep " + " ".join(argv),
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": scale.machine(), "model": {"shape": SHAPE, "text_layers": TEXT_LAYERS,
                                                    "vision_layers": VISION_LAYERS},
              "base": asdict(BASE), "points": []}
    output = Path(args.output or RESULTS / "sweep.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    for factor, p in points(args.only):
        report["points"].append(run_point(factor, p, model, args.threads, log))
        output.write_text(json.dumps(report, indent=1) + "\n")  # each point kept as it lands
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    output.write_text(json.dumps(report, indent=1) + "\n")
    _publish(report, args.readme or (RESULTS / "README.md" if args.output is None else None))
    results = report["points"]
    unforced = [r["factor"] for r in results if not r["length_forced"]]
    if unforced:
        print(f"gpg-vlm bench sweep: completions shorter than T at {', '.join(unforced)}",
              file=sys.stderr)
    return 1 if unforced else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
