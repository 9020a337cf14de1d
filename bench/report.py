"""The benchmark's measurements and report: the per-step readings a worker records (wall, CPU
and steal time, memory, which prompts it saw), then medians per variant, the equal-work checks,
the ratios ours / TRL, the machine description and the Markdown table for bench/README.md.

It runs no trainer and spawns nothing (bench/harness.py does that).
"""

from __future__ import annotations

import os
import platform
import json
import statistics
import time
import zlib
from pathlib import Path

from bench.workload import Workload

README_START = "<!-- bench-results:start -->"
README_END = "<!-- bench-results:end -->"
# a run with a vLLM variant (a vLLM environment: other transformers) has a block of its own
VLLM_README_START = "<!-- vllm-results:start -->"
VLLM_README_END = "<!-- vllm-results:end -->"


def readme_markers(variants) -> tuple[str, str]:
    """The README block a run's table goes to: the vLLM block when any variant samples with vLLM."""
    if any(v.endswith("vllm") for v in variants):
        return VLLM_README_START, VLLM_README_END
    return README_START, README_END
# The largest |rollout - training forward| log-prob the bench accepts. Forced lengths widen the
# gap for vLLM: with min_tokens it reports the log-probs of the EOS-masked distribution, off by
# -log(1 - p_eos) (0.004-0.006 measured on the bench's random models), where the loop reports the
# unmasked ones (~1e-6). Other weights or other prompts move log-probs by far more (~1).
MAX_LOGPROB_DIFF = 0.05


def steal_seconds() -> float:
    """Machine-wide CPU time stolen by the hypervisor so far (0 where /proc/stat is missing)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def clock() -> tuple[float, float, float]:
    return time.perf_counter(), time.process_time(), steal_seconds()


def since(start: tuple[float, float, float]) -> dict:
    wall, cpu, steal = (b - a for a, b in zip(start, clock()))
    return {"wall": wall, "cpu": cpu, "steal": steal}


def split_step(wall: float, generation: float, sync: float) -> dict:
    """A step's wall time split: rollout (generation less the weight sync inside it), the sync,
    and train (the rest)."""
    return {"rollout": generation - sync, "sync": sync, "train": wall - generation}


def timed(fn, seconds: dict, key: str):
    """`fn`, adding the wall time of every call to `seconds[key]`."""
    def call(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[key] += time.perf_counter() - t
        return out

    return call


def prompt_record(prompts: list[list[int]]) -> dict:
    """The prompts a step sampled: their token lengths and a checksum of each one's token ids."""
    return {"prompt_tokens": sorted({len(p) for p in prompts}),
            "prompt_checksums": [zlib.crc32(json.dumps([int(t) for t in p]).encode()) for p in prompts]}


def rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize(w: Workload, results: dict[str, list[dict]]) -> tuple[dict, list[str]]:
    """Per-variant medians and the equal-work checks; returns (variants, problems)."""
    variants, problems, prompt_sets = {}, [], {}
    B, T = w.completions, w.completion_tokens
    for name, runs in results.items():
        steps = [s for r in runs for s in r["steps"][w.warmup_steps:]]
        all_steps = [s for r in runs for s in r["steps"]]
        for s in all_steps:
            if s["completion_tokens"] != B * T or s["completion_min"] != T or s["completion_max"] != T:
                problems.append(f"{name}: a step produced {s['completion_tokens']} completion tokens "
                                f"(min {s['completion_min']}, max {s['completion_max']}), "
                                f"expected {B} x {T}")
            if not s["updated"]:
                problems.append(f"{name}: a step made no optimizer update")
            if (s.get("logprob_diff") or 0.0) > MAX_LOGPROB_DIFF:  # samples of stale weights
                problems.append(f"{name}: rollout and training log-probs differ by "
                                f"{s['logprob_diff']:.2g} (> {MAX_LOGPROB_DIFF})")
        prompt_sets[name] = (sorted({t for s in all_steps for t in s["prompt_tokens"]}),
                             sorted({c for s in all_steps for c in s["prompt_checksums"]}))
        step = median([s["wall"] for s in steps])
        variants[name] = {
            "step_seconds": step,
            "rollout_seconds": median([s["rollout"] for s in steps]),
            # loading the trainer's weights into a vLLM engine (0 for the loop, which samples
            # from the policy itself); inside "rollout" in the trainers' own logs
            "sync_seconds": median([s.get("sync", 0.0) for s in steps]),
            "train_seconds": median([s["train"] for s in steps]),
            "cpu_seconds": median([s["cpu"] for s in steps]),
            "steal_seconds": median([s["steal"] for s in steps]),
            "completion_tokens_per_second": B * T / step,
            "peak_memory_mb": max(r["peak_rss_mb"] for r in runs),
            "setup_memory_mb": max(r["setup_rss_mb"] for r in runs),
            # building the trainer: model load, and a vLLM engine's start-up (not in any step)
            "setup_seconds": median([r.get("setup_seconds", float("nan")) for r in runs]),
            "max_logprob_diff": max((s["logprob_diff"] for s in all_steps
                                     if s.get("logprob_diff") is not None), default=None),
            "round_step_seconds": [median([s["wall"] for s in r["steps"][w.warmup_steps:]])
                                   for r in runs],
            "step_seconds_all": [s["wall"] for s in steps],
            "prompt_tokens": prompt_sets[name][0],
            "distinct_prompts": len(prompt_sets[name][1]),
            "reference_model": any(r["reference_model"] for r in runs),
            "gradient_checkpointing": any(r["gradient_checkpointing"] for r in runs),
            "threads": sorted({r["threads"] for r in runs}),
        }
    if len({repr(p) for p in prompt_sets.values()}) > 1:
        problems.append("the variants' prompts differ (token lengths, token-id checksums): "
                        f"{prompt_sets}")
    if any(v["threads"] != [w.num_threads] for v in variants.values()):
        problems.append(f"thread counts differ from {w.num_threads}: "
                        f"{ {k: v['threads'] for k, v in variants.items()} }")
    return variants, problems


def ratios(variants: dict) -> dict:
    def ratio(a, b, key="step_seconds"):
        if a in variants and b in variants:
            return variants[a][key] / variants[b][key]
        return None

    return {
        "gpg_vs_trl_beta0": ratio("gpg", "trl_beta0"),
        "gpg_vs_trl_beta004": ratio("gpg", "trl_beta004"),
        "gpg_mem_vs_trl_beta0": ratio("gpg", "trl_beta0", "peak_memory_mb"),
        "grpo_vs_trl_beta004": ratio("grpo", "trl_beta004"),
        "gpg_cpu_vs_trl_beta0": ratio("gpg", "trl_beta0", "cpu_seconds"),
        "gpg_cpu_vs_trl_beta004": ratio("gpg", "trl_beta004", "cpu_seconds"),
        # vLLM against our loop: the rollout alone (weight sync apart), then sync included
        "gpg_vllm_rollout_vs_gpg": ratio("gpg_vllm", "gpg", "rollout_seconds"),
        "gpg_vllm_rollout_and_sync_vs_gpg": _sum_ratio(variants, "gpg_vllm", "gpg",
                                                       ("rollout_seconds", "sync_seconds")),
        "gpg_vllm_vs_gpg": ratio("gpg_vllm", "gpg"),
        "gpg_vllm_vs_trl_vllm": ratio("gpg_vllm", "trl_vllm"),
    }


def _sum_ratio(variants: dict, a: str, b: str, keys) -> float | None:
    if a in variants and b in variants:
        return sum(variants[a][k] for k in keys) / sum(variants[b][k] for k in keys)
    return None


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version}


def markdown(report: dict) -> str:
    w, m = report["workload"], report["machine"]
    lines = [
        f"Measured {report['date']} with `{report['command']}` ({report['kind']} workload) on "
        f"{m['cpu']} ({m['cpu_count']} CPUs), {w['threads']} threads; torch {m['torch']}, "
        f"transformers {m['transformers']}, TRL {m['trl']}. One-minute load average "
        f"{m['load_average_start']:.1f} at the start, {m['load_average_end']:.1f} at the end.",
        "",
        f"Workload: tiny {w['family']} size {w['size']}, {w['image_size']}x{w['image_size']} images, "
        f"N = {w['prompts']} prompts x G = {w['group_size']} completions of exactly "
        f"{w['completion_tokens']} tokens, {w['micro_batch_completions']} completions per training "
        f"forward; medians over {w['rounds']} rounds x {w['steps']} steps per variant.",
        "",
        "| variant | step s | rollout s | weight sync s | train s | CPU s/step | steal s/step "
        "| completion tok/s | peak MB | set-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in report["variants"].items():
        lines.append(f"| {name} | {v['step_seconds']:.2f} | {v['rollout_seconds']:.2f} | "
                     f"{v.get('sync_seconds', 0.0):.2f} | {v['train_seconds']:.2f} | "
                     f"{v['cpu_seconds']:.2f} | {v['steal_seconds']:.2f} | "
                     f"{v['completion_tokens_per_second']:.0f} | {v['peak_memory_mb']:.0f} | "
                     f"{v.get('setup_seconds', float('nan')):.1f} |")
    for name, reason in report.get("not_run", {}).items():
        lines.append(f"| {name} | not run: {reason} |" + " |" * 8)
    lines.append("")
    r = report["ratios"]
    lines.append("Ratios (step time unless named): " + ", ".join(
        f"{k} = {v:.3f}" for k, v in r.items() if v is not None) + ".")
    if report["problems"]:
        lines += ["", "**Equal-work checks failed:** " + "; ".join(report["problems"])]
    return "\n".join(lines)


def write_readme(path: Path, table: str, start: str = README_START, end: str = README_END) -> None:
    """Replace the block of `path` between the markers `start` and `end` with `table`
    (appended under a Results heading when the file has no such block yet)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + "## Results\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
