"""Our sampling loop (gpg_vlm/rollout/hf.py) against the loop it replaced, interleaved in one run.

    python -m bench.rollout_loop [--rounds 3] [--threads 1] [--rss-tokens 1024]

Variants (all on the bench model: tiny random Qwen2-VL size m, fp32, N = 16 Fashion-MNIST
prompts with 224x224 images, G = 8, temperature 1):
- `old`: the loop of commit OLD_COMMIT verbatim (read with `git show`): the cache grows by
  concatenation every token, every row decodes until all are done, torch.multinomial samples.
- `old_uniform`: that loop with today's sampler swapped in (one uniform per completion per step).
  It samples the same tokens as `new` for a seed, so on the long-tail workload both produce the
  same completions: the equal-work comparison of the loop changes alone.
- `new`: the current loop (reserved cache, finished rows dropped, the same sampler).

Workloads:
- `equal`: every completion forced to exactly 64 tokens (`min_new_tokens = max_new_tokens`), the
  rollout of `gpg-vlm bench`'s workload; equal work for every variant by construction.
- `tail`: up to 256 tokens, each completion ending at EOS with a long-tailed length law. A hook on
  the output layer sets the EOS probability at completion token t to the hazard of
  P(length > t) = (1 + t / 128) ** -2 (median ~53 tokens, ~11% reach 256): a row-blind rule
  applied identically in every variant, so the lengths follow from what each row samples. The
  bench checks that `old_uniform` and `new` produced identical completions; `old` samples other
  tokens (another random stream) and is listed with its own token count.
- `rss`: one forced-length generate of `--rss-tokens` tokens per variant (`old`, `new`), each in a
  fresh process; peak RSS (VmHWM, reset to the current RSS just before the call) and its rise
  over the RSS before the call. Two shapes: the
  bench's 16 x 8 completions (each layer's keys reach 37 MB, above glibc's largest mmap
  threshold of 32 MB) and 1 x 4 (blocks of at most 1.2 MB, all from glibc's heap, like the cost
  sweep's 4-row point that showed the heap growing with concatenation: bench/README.md). With
  `--rss-real DIR`, also 1 x 4 completions of `--rss-real-tokens` on that real-vocabulary
  checkpoint in bf16 (the sweep's reduced-depth Qwen2-VL-2B: where the heap growth was found).

Times are medians over `--rounds` rounds; the variants' order rotates every round so that a slow
spell on the shared machine hits each. The ratio is the median old time / median new time.

Deliberately left out: GPUs, real-size models (bench/scale.py), the training forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import report
from bench.harness import prepare
from bench.workload import FULL, PROMPT_TEMPLATE
from gpg_vlm.rollout import hf

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "d12319c1cd7257348a24fdb2d58fa8596ccbcab3"  # the last commit with the concatenating loop
VARIANTS = ("old", "old_uniform", "new")
TAIL = dict(max_new_tokens=256, scale=128.0, shape=2.0)


def old_module(uniform_sampler: bool) -> types.ModuleType:
    """gpg_vlm/rollout/hf.py as of OLD_COMMIT, optionally sampling with today's `_sample`."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:gpg_vlm/rollout/hf.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"bench/rollout_loop.py: needs a git checkout holding commit {OLD_COMMIT} "
                         f"(the old loop is read from it): {e}")
    module = types.ModuleType("hf_old")
    exec(compile(source, f"{OLD_COMMIT[:7]}:gpg_vlm/rollout/hf.py", "exec"), module.__dict__)
    if uniform_sampler:  # the old loop keeps all B rows in order, so it draws the same uniforms
        module._sample = lambda probs, generator: hf._sample(
            probs, hf._uniforms(probs.shape[0], generator, probs.device))
    return module


def engines(adapter) -> dict:
    return {"old": old_module(False).HFRollout(adapter), "old_uniform": old_module(True).HFRollout(adapter),
            "new": hf.HFRollout(adapter)}


class TailHook:
    """Output-layer hook: at completion token t, EOS gets probability 1 - S(t+1) / S(t) with
    S(t) = (1 + t / scale) ** -shape; the other tokens keep their relative probabilities."""

    def __init__(self, adapter, scale: float, shape: float):
        vocab = adapter.suppressed.shape[0]
        self.eos = torch.tensor(adapter.eos_token_ids)
        self.others = ~(adapter.suppressed | torch.isin(torch.arange(vocab), self.eos))  # (V,)
        self.scale, self.shape, self.step = scale, shape, 0

    def hazard(self, t: int) -> float:
        survival = lambda k: (1 + k / self.scale) ** -self.shape  # noqa: E731
        return 1 - survival(t + 1) / survival(t)

    def __call__(self, module, inputs, output):
        h = self.hazard(self.step)
        self.step += 1  # one output-layer call per completion token in every variant
        out = output.clone()  # (b, [1,] V)
        rest = torch.logsumexp(out.masked_fill(~self.others, float("-inf")), dim=-1)  # (b, [1])
        out[..., self.eos] = float("-inf")
        out[..., self.eos[0]] = rest + torch.log(torch.tensor(h / (1 - h)))
        return out


def run_once(engine, batch, workload: str, seed: int, hook: TailHook | None):
    gen = torch.Generator().manual_seed(seed)
    if workload == "equal":
        options = dict(max_new_tokens=FULL.completion_tokens, min_new_tokens=FULL.completion_tokens)
    else:
        hook.step = 0
        options = dict(max_new_tokens=TAIL["max_new_tokens"])
    start = time.perf_counter()
    rollout = engine.generate(batch, FULL.group_size, generator=gen, **options)
    return time.perf_counter() - start, rollout


def timings(adapter, batch, rounds: int, log) -> dict:
    """{workload: {variant: [seconds per round]}} plus the completions' lengths and the checks."""
    eng = engines(adapter)
    hook = TailHook(adapter, TAIL["scale"], TAIL["shape"])
    for e in eng.values():  # warm-up: allocator, lazy initialisation
        e.generate(batch, FULL.group_size, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    out = {w: {v: [] for v in VARIANTS} for w in ("equal", "tail")}
    lengths, checks = {w: {v: [] for v in VARIANTS} for w in out}, []
    for r in range(rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for workload in out:
            handle = adapter.model.lm_head.register_forward_hook(hook) if workload == "tail" else None
            try:
                seen = {}
                for v in order:
                    seconds, rollout = run_once(eng[v], batch, workload, seed=r, hook=hook)
                    out[workload][v].append(seconds)
                    lengths[workload][v] += rollout.completion_mask.sum(1).tolist()
                    seen[v] = rollout
                    log(f"round {r} {workload:5s} {v:11s} {seconds:7.2f} s  "
                        f"{int(rollout.completion_mask.sum())} tokens")
            finally:
                if handle is not None:
                    handle.remove()
            checks.append(equal_work(workload, r, seen))
    return {"seconds": out, "lengths": lengths, "checks": checks}


def equal_work(workload: str, r: int, seen: dict) -> dict:
    """The check that the compared variants produced the same work in round r."""
    if workload == "equal":
        t = FULL.completion_tokens
        ok = all(bool((ro.completion_mask.sum(1) == t).all()) for ro in seen.values())
        return {"round": r, "workload": workload, "ok": ok, "what": f"every completion {t} tokens"}
    a, b = seen["old_uniform"], seen["new"]
    same = a.completion_mask.shape == b.completion_mask.shape and torch.equal(a.completion_ids, b.completion_ids)
    # compared where the mask is 1: the old loop multiplies by the mask, and the hook's -inf at
    # the pad token (an EOS id) makes that NaN after the end of a completion
    keep = a.completion_mask.bool()
    diff = float((a.logprobs - b.logprobs)[keep].abs().max()) if same else float("nan")
    return {"round": r, "workload": workload, "ok": same and diff < 1e-4,
            "what": f"old_uniform and new: identical completions, log-probs within {diff:.1e}"}


def rss_child(variant: str, tokens: int, prompts: int, group_size: int, real: str | None) -> None:
    """One forced-length generate in this fresh process; prints its RSS record as JSON."""
    adapter, batch = load_real(real) if real else load()
    batch = batch.select(list(range(prompts)))
    engine = engines(adapter)[variant]
    # weights are paged in by the first forward (safetensors are mapped): not the loop's memory
    engine.generate(batch, group_size, max_new_tokens=2, generator=torch.Generator().manual_seed(0))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: earlier peaks not counted
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    rollout = engine.generate(batch, group_size, max_new_tokens=tokens, min_new_tokens=tokens,
                              generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    print(json.dumps({"variant": variant, "model": real or "bench", "completions": prompts * group_size,
                      "tokens": int(rollout.completion_mask.sum()), "seconds": seconds,
                      "rss_before_mb": before / 1024, "peak_rss_mb": _status_kb("VmHWM") / 1024}))


def load_real(model: str):
    """A real-vocabulary checkpoint in bf16 and one prompt with a 316 x 316 noise image (100k
    pixels, the cost sweep's base point)."""
    import numpy as np
    from PIL import Image

    from gpg_vlm.models.adapter import VLMAdapter
    from gpg_vlm.models.batch import Sample

    adapter = VLMAdapter.from_pretrained(model, dtype="bfloat16", device="cpu")
    adapter.model.eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (316, 316, 3), dtype=np.uint8))
    return adapter, adapter.encode([Sample("What is shown in the picture?", [image])])


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss(runs: list[tuple], threads: int, log) -> list:
    """runs: (tokens, prompts, G, real checkpoint or None) each; old and new in fresh processes."""
    records = []
    for tokens, prompts, group_size, real in runs:
        for v in VARIANTS[::2]:  # old and new: the sampler does not change the cache's memory
            cmd = [sys.executable, "-m", "bench.rollout_loop", "--rss-child", v, "--rss-tokens",
                   str(tokens), "--rss-shapes", f"{prompts}x{group_size}", "--threads", str(threads)]
            cmd += ["--rss-real", real] if real else []
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"bench/rollout_loop.py: the {v} RSS run failed:\n{done.stderr[-2000:]}")
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
            log(f"rss: {records[-1]}")
    return records


def load():
    from gpg_vlm.data import load_rows
    from gpg_vlm.models.adapter import VLMAdapter
    from gpg_vlm.tasks import samples_of

    cache = Path(os.environ.get("GPG_VLM_CACHE", Path.home() / ".cache" / "gpg_vlm"))
    model, data, _ = prepare(FULL, cache)
    adapter = VLMAdapter.from_pretrained(model, device="cpu")
    adapter.model.eval()
    rows = list(load_rows(data))[:FULL.prompts]
    return adapter, adapter.encode(samples_of(rows, PROMPT_TEMPLATE))


def table(result: dict) -> str:
    sec, lengths = result["timing"]["seconds"], result["timing"]["lengths"]
    med = {w: {v: statistics.median(s) for v, s in by.items()} for w, by in sec.items()}
    lines = ["| workload | variant | median s | completion tokens per run | longest | old / this | old_uniform / this |",
             "|---|---|---|---|---|---|---|"]
    rounds = len(next(iter(sec["equal"].values())))
    for w in sec:
        for v in VARIANTS:
            n = len(lengths[w][v]) // rounds
            tokens = sum(lengths[w][v]) / rounds
            lines.append(f"| {w} | {v} | {med[w][v]:.2f} | {tokens:.0f} ({n} completions) | "
                         f"{max(lengths[w][v])} | {med[w]['old'] / med[w][v]:.2f} | "
                         f"{med[w]['old_uniform'] / med[w][v]:.2f} |")
    if result.get("rss"):
        lines += ["", "| model | completions x tokens | variant | seconds | RSS before generate (MB) | peak RSS (MB) | rise (MB) |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["rss"]:
            model = "bench (tiny, fp32)" if r["model"] == "bench" else f"{Path(r['model']).name} (bf16)"
            lines.append(f"| {model} | {r['completions']} x {r['tokens'] // r['completions']} | {r['variant']} | "
                         f"{r['seconds']:.1f} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['peak_rss_mb'] - r['rss_before_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rollout_loop", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rss-tokens", type=int, default=1024, help="0: skip the RSS runs")
    p.add_argument("--rss-shapes", default="16x8,1x4",
                   help="prompts x G of each RSS run (16x8: the bench's; 1x4: few rows, small blocks)")
    p.add_argument("--rss-real", metavar="DIR", type=Path,
                   help="also an RSS run (1 x 4 completions) on this real-vocabulary checkpoint in bf16, "
                        "e.g. the cost sweep's (python -m bench.sweep --build DIR; needs gpg_vlm[scale])")
    p.add_argument("--rss-real-tokens", type=int, default=300)
    p.add_argument("--output", type=Path, help="also write the results as JSON here")
    p.add_argument("--rss-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.rss_shapes.split(",")]
    if args.rss_child:
        rss_child(args.rss_child, args.rss_tokens, *shapes[0], str(args.rss_real) if args.rss_real else None)
        return 0
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_start = os.getloadavg()
    adapter, batch = load()
    result = {"command": "python -m bench.rollout_loop " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": report.machine(), "threads": args.threads, "old_commit": OLD_COMMIT,
              "timing": timings(adapter, batch, args.rounds, log)}
    runs = [(args.rss_tokens, *shape, None) for shape in shapes] if args.rss_tokens else []
    runs += [(args.rss_real_tokens, 1, 4, str(args.rss_real.resolve()))] if args.rss_real else []
    result["rss"] = rss(runs, args.threads, log)
    result["load_average"] = {"start": load_start, "end": os.getloadavg()}
    m = result["machine"]
    print(f"{result['command']}\n{result['date']}; {m['cpu']}, {m['cpu_count']} CPUs shared with other "
          f"work (load average {load_start[0]:.1f} at start, {result['load_average']['end'][0]:.1f} "
          f"at end); {args.threads} torch thread(s); torch {m['torch']}, transformers {m['transformers']}\n")
    print(table(result))
    failed = [c for c in result["timing"]["checks"] if not c["ok"]]
    for c in failed:
        print(f"equal-work check FAILED: round {c['round']} {c['workload']}: {c['what']}")
    if args.output:
        args.output.write_text(json.dumps(result) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
