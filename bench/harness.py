"""`gpg-vlm bench`: our trainer and TRL's GRPOTrainer on one workload, side by side.

Variants, each run in its own fresh process (so its peak memory is its own):
  gpg          our GPG trainer: no reference model, no old-log-prob pass
  grpo         our GRPO mode: std advantages, ratio clipping, KL (beta 0.04) to a frozen reference
  trl_beta0    TRL GRPOTrainer with beta 0 (TRL then loads no reference model)
  trl_beta004  TRL GRPOTrainer with beta 0.04 (reference model and its log-prob pass)
  gpg_vllm     our GPG trainer with `rollout: vllm` (a colocated vLLM engine, weights synced
               every step); needs vLLM in this environment (.venv-vllm), else reported as not run
  trl_vllm     TRL GRPOTrainer, beta 0, with its colocated vLLM mode; reported as not run on CPU
               (TRL_VLLM_ON_CPU says why; GPG_VLM_BENCH_TRY_TRL_VLLM=1 tries it anyway)

What is equal between the variants:
- the model: one tiny random Qwen2-VL checkpoint (size m by default), fp32, sdpa attention,
  loaded from the same directory; learning rate 1e-6, gradient clipping 1.0, AdamW;
- the prompts: Fashion-MNIST classification rows with 224x224 images (64 visual tokens per
  prompt), the same chat template and prompt text; the bench checks that every variant saw
  prompts of the same token lengths;
- the batch: N prompts x G completions per optimizer step, one update per batch (TRL:
  `gradient_accumulation_steps = steps_per_generation`, so it needs no old-log-prob pass either);
- the completion length: forced to exactly T tokens. TRL: `max_completion_length = T` and
  `generation_kwargs = {"min_new_tokens": T}` (transformers then sets the EOS logits to -inf for
  the first T tokens). Ours: `max_new_tokens = T` and `HFRollout.generate(min_new_tokens=T)`, which
  does the same. The bench fails unless every completion of every step has exactly T tokens;
- the sampled vocabulary: both suppress the five vision tokens;
- the training micro-batch: TRL runs `micro_batch_completions` completions per forward
  (`per_device_train_batch_size`); ours gets `micro_batch_tokens` = that many completions times
  (prompt + completion) tokens, the same padded tokens per forward;
- the reward: `bench_reward`, a hash of the completion text in [0, 1): free to compute and
  different for every completion, so every group carries a gradient in every variant (GPG skips
  zero-advantage completions, which would otherwise make its work smaller than TRL's);
- the number of threads (`torch.set_num_threads` and OMP/MKL variables in every process);
- no gradient checkpointing anywhere (TRL's default is on; off is its faster setting here).

Where it lives: what every variant runs (workload, prompt text, reward) is bench/workload.py;
our runner is `_run_ours` below and TRL's is bench/trl_run.py (with why TRL gets a processor of
the bench's own); each runs inside a worker process that this module spawns; bench/report.py
measures and summarises.

Timing. A step is one optimizer step, wall clock, including reward, reference pass, backward
and optimizer. "rollout" is the time spent producing the completions (prompt and image
preprocessing, generation, decoding: ours `Trainer.train_step`'s `time_rollout`, TRL's
`GRPOTrainer._generate`) less "sync", the time loading the trainer's weights into a vLLM engine
(inside those two in the trainers' own clocks; 0 for the loops); "train" is the rest of the
step. The time to build the trainer (model load, a vLLM engine's start-up) is "setup", in no
step. Per step the bench also records
the process CPU time and the machine's steal time (/proc/stat), because these machines lose
CPU to the hypervisor in spells. Each variant runs `rounds` times in fresh processes, the order
rotating each round, with `warmup_steps` unmeasured steps first; results are medians over all
measured steps.

Deliberately left out: GPUs, multi-process runs, and any learning signal (the reward is
noise; only cost is measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import (clock, machine, markdown, median, prompt_record, ratios, readme_markers,
                          rss_mb, since, split_step, summarize, timed, write_readme)
from bench.trl_run import TRL_VLLM_ON_CPU, run_trl
from bench.workload import FULL, PROMPT_TEMPLATE, QUICK, Workload

# The checkout's root: worker processes import bench.harness and the reward (bench.workload) from it.
CHECKOUT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent  # results.json and README.md live beside the harness
VARIANTS = ("gpg", "grpo", "trl_beta0", "trl_beta004", "gpg_vllm", "trl_vllm")
# the variants that need vLLM: where it cannot be imported they are reported as not run
VLLM_VARIANTS = ("gpg_vllm", "trl_vllm")


# ------------------------------------------------------------------ our trainer
def _run_ours(spec: dict) -> dict:
    """Steps of our Trainer; returns the per-step records."""
    import functools

    from gpg_vlm.config import TrainConfig
    from gpg_vlm.train import Trainer

    w = Workload(**spec["workload"])
    T = w.completion_tokens
    vllm = spec["variant"] == "gpg_vllm"
    cfg = TrainConfig(
        model=spec["model"], data=spec["data"], output_dir=spec["scratch"],
        algorithm="grpo" if spec["variant"] == "grpo" else "gpg",
        kl_beta=None,  # each algorithm's own: none for GPG, 0.04 for GRPO
        group_size=w.group_size, prompts_per_step=w.prompts, beta_th=0.0, max_resample_tries=0,
        rewards={"bench.workload:bench_reward": 1.0}, prompt_template=PROMPT_TEMPLATE,
        max_new_tokens=T, learning_rate=1e-6, max_grad_norm=1.0,
        micro_batch_tokens=spec["micro_batch_tokens"], max_steps=w.warmup_steps + w.steps,
        tensorboard=False, seed=w.seed,
        **(dict(rollout="vllm", vllm_max_model_len=spec["vllm_max_model_len"]) if vllm else {}))
    start = time.perf_counter()
    trainer = Trainer(cfg)
    setup_seconds = time.perf_counter() - start  # model load (and the vLLM engine's start-up)
    prompt_tokens: list[list[int]] = []
    generate = functools.partial(trainer.rollout.generate, min_new_tokens=T)
    sync = {"seconds": 0.0}

    def forced_generate(batch, group_size, **kwargs):  # every completion exactly T tokens
        prompt_tokens.extend(ids[mask.bool()].tolist()
                             for ids, mask in zip(batch.input_ids, batch.attention_mask))
        return generate(batch, group_size, **kwargs)

    trainer.rollout.generate = forced_generate
    # the weight sync runs inside time_rollout; reported on its own
    trainer.rollout.sync_weights = timed(trainer.rollout.sync_weights, sync, "seconds")
    setup_mb = rss_mb()
    steps = []
    try:
        for _ in range(w.warmup_steps + w.steps):
            prompt_tokens.clear()
            sync["seconds"] = 0.0
            start = clock()
            m = trainer.train_step()
            rec = since(start)
            trainer.step += 1
            lengths = (m["completion_length_mean"], m["completion_length_max"])
            rec.update(**split_step(rec["wall"], m["time_rollout"], sync["seconds"]),
                       completion_tokens=round(lengths[0] * w.completions),
                       completion_min=T if lengths == (T, T) else -1,  # mean = max = T: all are T
                       completion_max=lengths[1], **prompt_record(prompt_tokens),
                       updated=bool(m["updated"]), logprob_diff=m.get("rollout_logprob_diff"))
            steps.append(rec)
    finally:
        trainer.rollout.close()
    return {"steps": steps, "setup_rss_mb": setup_mb, "setup_seconds": setup_seconds,
            "reference_model": trainer.reference is not None,
            "gradient_checkpointing": trainer.cfg.gradient_checkpointing}


# ------------------------------------------------------------------ worker process
def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["workload"]["seed"])
    import transformers

    transformers.logging.set_verbosity_error()
    run = run_trl if spec["variant"].startswith("trl") else _run_ours
    result = run(spec)
    result.update(peak_rss_mb=rss_mb(), threads=torch.get_num_threads())
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _spawn(variant: str, spec: dict, scratch: Path) -> dict:
    """Run one variant in a fresh process; its stderr goes to scratch/<variant>.log."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=scratch))
    spec = dict(spec, variant=variant, scratch=str(run_dir / "out"),
                result=str(run_dir / "result.json"))
    (run_dir / "spec.json").write_text(json.dumps(spec))
    threads = str(spec["threads"])
    path = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TQDM_DISABLE="1")
    with open(run_dir / "worker.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "bench.harness", "--worker",
                               str(run_dir / "spec.json")], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    if proc.returncode != 0:
        tail = (run_dir / "worker.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"bench variant {variant} failed (exit {proc.returncode}); "
                           f"log {run_dir / 'worker.log'}:\n{tail}")
    return json.loads((run_dir / "result.json").read_text())


# ------------------------------------------------------------------ set-up and report
def prepare(w: Workload, cache: Path) -> tuple[Path, Path, int]:
    """(model dir, data JSONL, longest prompt in tokens), built once and cached."""
    from gpg_vlm.models.adapter import VLMAdapter
    from gpg_vlm.data import load_rows, save_jsonl
    from gpg_vlm.data.fashion_mnist import build_tasks
    from gpg_vlm.tasks import samples_of
    from gpg_vlm.tiny import make_tiny_model

    model = cache / f"bench-{w.family}-{w.size}-seed{w.seed}"
    if not (model / "model.safetensors").is_file():
        make_tiny_model(w.family, w.size, model, seed=w.seed)
    n_rows = w.prompts * (w.warmup_steps + w.steps)
    data = cache / f"bench-classification-{w.image_size}px-{n_rows}-seed{w.seed}" / "rows.jsonl"
    if not data.is_file():
        rows = build_tasks("classification", "train", n_rows, w.seed, data.parent,
                           image_size=w.image_size)
        save_jsonl(rows, data)
    adapter = VLMAdapter.from_pretrained(model, device="cpu")
    batch = adapter.encode(samples_of(load_rows(data), PROMPT_TEMPLATE))
    return model, data, int(batch.prompt_lengths().max())


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def not_runnable(variant: str) -> str | None:
    """Why `variant` cannot run in this Python environment (None: it can)."""
    if variant in VLLM_VARIANTS and not _importable("vllm"):
        return (f"vLLM is not installed in this environment ({sys.executable}); run the bench with "
                ".venv-vllm/bin/python -m bench.harness (`make test-vllm` builds it)")
    if variant == "trl_vllm" and not os.environ.get("GPG_VLM_BENCH_TRY_TRL_VLLM"):
        import torch

        if not torch.cuda.is_available():
            return TRL_VLLM_ON_CPU
    return None


def run(w: Workload, variants=VARIANTS, cache: Path | None = None, log=print) -> dict:
    """Prepare the workload, run every variant `rounds` times interleaved, and summarize.

    A variant this environment cannot run (vLLM missing) is left out of the rounds and listed
    under `not_run` with the reason."""
    from gpg_vlm.demo import default_cache

    cache = Path(cache) if cache else default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]  # > 0 before we start: other work shares the CPUs
    not_run = {v: reason for v in variants if (reason := not_runnable(v))}
    for v, reason in not_run.items():
        log(f"{v}: not run: {reason}")
    variants = tuple(v for v in variants if v not in not_run)
    model, data, prompt_len = prepare(w, cache)
    spec = {"workload": dataclasses.asdict(w), "model": str(model), "data": str(data),
            "threads": w.num_threads,
            "micro_batch_tokens": w.micro_batch_completions * (prompt_len + w.completion_tokens),
            # the engines' context: the longest prompt and its completion, in whole 256s
            "vllm_max_model_len": -(-(prompt_len + w.completion_tokens + 1) // 256) * 256}
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="gpg-vlm-bench-") as scratch:
        for r in range(w.rounds):
            k = r % len(variants)
            for variant in (*variants[k:], *variants[:k]):  # rotate: no variant always first
                t = time.perf_counter()
                result = _spawn(variant, spec, Path(scratch))
                results[variant].append(result)
                walls = [s["wall"] for s in result["steps"][w.warmup_steps:]]
                log(f"round {r + 1}/{w.rounds} {variant:<12} median step {median(walls):.2f} s, "
                    f"peak {result['peak_rss_mb']:.0f} MB ({time.perf_counter() - t:.0f} s in all)")
    variants_out, problems = summarize(w, {v: results[v] for v in variants})
    return {"variants": variants_out, "ratios": ratios(variants_out), "problems": problems,
            "not_run": not_run,
            "workload": {**dataclasses.asdict(w), "threads": w.num_threads,
                         "micro_batch_tokens": spec["micro_batch_tokens"],
                         "prompt_tokens": prompt_len},
            "machine": {**machine(), "load_average_start": load_start,
                        "load_average_end": os.getloadavg()[0]},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpg-vlm bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="reduced workload for development (a few minutes); targets are "
                             "judged on the full one")
    parser.add_argument("--output", default=None,
                        help="results JSON (default bench/results.json, quick: bench/results-quick.json)")
    parser.add_argument("--readme", default=None,
                        help="Markdown file whose results block is replaced (default: "
                             "bench/README.md for the full workload, none for --quick)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all CPUs)")
    parser.add_argument("--rounds", type=int, default=None, help="override the workload's rounds")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--cache", default=None, help="where the tiny model and images are cached")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    w = QUICK if args.quick else FULL
    w = dataclasses.replace(w, threads=args.threads, rounds=args.rounds or w.rounds)
    if any(v.startswith("trl") for v in args.variants):
        try:
            import trl  # noqa: F401
        except ImportError:
            print("gpg-vlm bench: TRL is not installed; pip install -c constraints.txt "
                  "'.[bench]' (or pass --variants gpg grpo)", file=sys.stderr)
            return 2
    report = run(w, tuple(args.variants), args.cache, log=lambda s: print(s, file=sys.stderr))
    report["kind"] = "quick" if args.quick else "full"
    report["command"] = "gpg-vlm bench " + " ".join(argv)
    output = Path(args.output or RESULTS / ("results-quick.json" if args.quick else "results.json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    print(table)
    readme = args.readme or (None if args.quick else RESULTS / "README.md")
    if readme:
        write_readme(Path(readme), table, *readme_markers(args.variants))
    for problem in report["problems"]:
        print(f"gpg-vlm bench: equal-work check failed: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
