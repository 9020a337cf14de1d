"""`gpg-vlm demo`: RL on real images making a tiny vision-language model better, on a CPU.

1. Build a tiny random Qwen-VL (cached) and the Fashion-MNIST task (train images for training
   prompts, t10k images for the held-out prompts).
2. Format warm-up: supervised training on RANDOM labels, so the model learns to answer
   `<answer>NAME</answer>` with a valid name and nothing about the images (held-out accuracy
   stays at chance: the summary reports it as `accuracy_before`).
3. GPG (or GRPO) from the warm-up weights for a wall-clock budget, with held-out accuracy
   evaluated greedily during training. For classification and counting GPG here carries a
   KL term to the warm-up model (`kl_beta` 0.04), which the paper's GPG does not have:
   `--set kl_beta=0` runs it pure.
4. `metrics.jsonl`, `summary.json`, `report.md` and `curves.png` in the output folder.

Settings: the demo's own few (`DemoSettings`: the tiny model, its data, the format warm-up)
and the RL runs' `TRAINING` values, which are TrainConfig keys; `--set KEY=VALUE` overrides
either, parsed once by gpg_vlm.config (old names give one line naming the new one).

`--compare` runs GPG and GRPO (std-normalised advantages, clip 0.2, KL 0.04 to the frozen
warm-up model) from the same warm-up weights, prompts and budget, and reports both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpg_vlm.models.adapter import VLMAdapter
from gpg_vlm.checkpoint import copy_processor_files
from gpg_vlm.config import RENAMED as CONFIG_RENAMED
from gpg_vlm.config import ConfigError, TrainConfig, build, check_types, parse_overrides
from gpg_vlm.data import load_rows, save_jsonl
from gpg_vlm.data.fashion_mnist import CLASS_NAMES, build_tasks
from gpg_vlm.report import write_reports
from gpg_vlm.rewards.answer import extract_answer
from gpg_vlm.rewards.classification import normalize_text
from gpg_vlm.tasks import samples_of
from gpg_vlm.tiny import make_tiny_model
from gpg_vlm.train import Trainer

TASK_METRIC = {"classification": "accuracy", "counting": "accuracy", "grounding": "mean IoU"}
DEFAULT_NEW_TOKENS = {"classification": 12, "counting": 10, "grounding": 32}
# KL weight to the warm-up model by task (README "The demo"): names and counts are discrete
# answers the paper's GPG drops for good; a box is four numbers that the warm-up drew at random,
# and a KL term to those random draws held the IoU at its warm-up level.
DEFAULT_KL = {"classification": 0.04, "counting": 0.04, "grounding": 0.0}
TEMPLATE = "{problem} Answer as <answer>...</answer>."

# TrainConfig values of the demo's RL runs where they differ from TrainConfig's defaults; what
# was measured for each choice is in the README ("The demo"). `--set KEY=VALUE` overrides any
# TrainConfig key; max_new_tokens and (for GPG) kl_beta default by task (above).
TRAINING = dict(
    prompts_per_step=8,
    group_size=16,  # more chances per group to find a correct answer when the policy is sharp
    learning_rate=3e-4,  # 1e-3 collapsed (informative groups fell to 0.03-0.1)
    beta_th=0.6,  # the paper's best text setting; keeps the batch informative late on
    rewards={"accuracy": 1.0, "format": 0.1},
    answer_only=True,  # the format warm-up teaches `<answer>NAME</answer>` without thinking
    eval_steps=40,
    max_steps=100000,  # the run ends on its time budget (--minutes)
    tensorboard=False,
)


@dataclass(frozen=True)
class DemoSettings:
    """The demo's own settings: the tiny model, its data and the supervised format warm-up."""

    family: str = "qwen2_vl"
    size: str = "s"  # 0.34M parameters: ~0.3 s per step of 8 x 16 completions on 2 cores
    init_std: float = 0.1  # Qwen's 0.02 leaves the image's effect on the answer tiny at first
    image_size: int = 56  # the smallest Qwen-VL input: 4 visual tokens
    train_prompts: int = 4000
    test_prompts: int = 200
    format_warmup_steps: int = 150
    format_warmup_batch: int = 32
    format_warmup_lr: float = 2e-3

    def __post_init__(self):
        check_types(self)


# demo settings of earlier versions (the TrainConfig ones are in gpg_vlm.config.RENAMED)
RENAMED = {
    "warmup_steps": "is now 'format_warmup_steps' (warmup_steps is TrainConfig's learning-rate warm-up)",
    "warmup_batch": "was renamed to 'format_warmup_batch'",
    "warmup_lr": "was renamed to 'format_warmup_lr'",
    "eval_every_steps": "was renamed to 'eval_steps' (the TrainConfig key)",
    "format_weight": "is now part of 'rewards', e.g. rewards={accuracy: 1.0, format: 0.1}",
}


def split_overrides(items: list[str]) -> tuple[DemoSettings, dict]:
    """`--set` items -> (the demo's own settings, TrainConfig overrides), one parser for both.

    The TrainConfig values are checked when each run's config is built (`train_config`)."""
    values = parse_overrides(items)
    mine = {k: values.pop(k) for k in list(values) if k in DEMO_KEYS or k in RENAMED}
    for key in values:
        if key in CONFIG_RENAMED:
            raise ConfigError(f"--set: config key {key!r} {CONFIG_RENAMED[key]}")
    return build(DemoSettings, mine, "--set", RENAMED), values


DEMO_KEYS = frozenset(f.name for f in dataclasses.fields(DemoSettings))


def default_cache() -> Path:
    return Path(os.environ.get("GPG_VLM_CACHE", Path.home() / ".cache" / "gpg_vlm"))


def cached_paths(task: str, settings: DemoSettings, seed: int, cache: Path) -> dict[str, Path]:
    """Where the tiny model (`base`), its format warm-up (`warm`) and the task's JSONL live."""
    base = cache / f"tiny-{settings.family}-{settings.size}-std{settings.init_std}-seed{seed}"
    data = cache / f"fashion-mnist-{task}-{settings.image_size}px-seed{seed}"
    warm = cache / (f"warmup-{task}-{base.name}-{settings.format_warmup_steps}x"
                    f"{settings.format_warmup_batch}")
    return {"base": base, "warm": warm, "train": data / f"{task}_train.jsonl",
            "test": data / f"{task}_test.jsonl"}


def prepare(task: str, settings: DemoSettings, seed: int, paths: dict[str, Path]) -> None:
    """Build the tiny model and the task's train and test JSONL, once (then cached)."""
    if not (paths["base"] / "model.safetensors").is_file():
        make_tiny_model(settings.family, settings.size, paths["base"], seed=seed,
                        init_std=settings.init_std)
    for split, n in (("train", settings.train_prompts), ("test", settings.test_prompts)):
        if not paths[split].is_file():
            rows = build_tasks(task, split, n, seed, paths[split].parent, image_size=settings.image_size)
            save_jsonl(rows, paths[split])


def random_answer(task: str, row, rng: random.Random) -> str:
    """A label of the right form, drawn independently of the image."""
    if task == "classification":
        return rng.choice(CLASS_NAMES)
    if task == "counting":
        return str(rng.randint(0, 5))
    x1, y1 = rng.randint(0, 700), rng.randint(0, 700)
    return f"[{x1}, {y1}, {rng.randint(x1 + 50, 1000)}, {rng.randint(y1 + 50, 1000)}]"


def warm_up(model_dir: Path, train_file: Path, out: Path, task: str, settings: DemoSettings,
            seed: int) -> Path:
    """Supervised format warm-up on random labels; the result is a checkpoint directory."""
    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    rng = random.Random(seed)
    adapter = VLMAdapter.from_pretrained(model_dir, device="cpu")
    rows = load_rows(train_file)
    end = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
    opt = torch.optim.AdamW(adapter.model.parameters(), lr=settings.format_warmup_lr)
    adapter.model.train()
    for step in range(settings.format_warmup_steps):
        batch_rows = rng.sample(list(rows), settings.format_warmup_batch)
        batch = adapter.encode(samples_of(batch_rows, TEMPLATE))
        targets = [adapter.tokenizer(f"<answer>{random_answer(task, r, rng)}</answer>",
                                     add_special_tokens=False)["input_ids"] + [end]
                   for r in batch_rows]
        width = max(len(t) for t in targets)
        ids = torch.full((len(targets), width), adapter.pad_token_id, dtype=torch.long)  # (b, w)
        mask = torch.zeros((len(targets), width), dtype=torch.long)  # (b, w)
        for i, t in enumerate(targets):
            ids[i, :len(t)] = torch.tensor(t)
            mask[i, :len(t)] = 1
        lp = adapter.logprobs(batch, torch.arange(len(targets)), ids, mask)  # (b, w)
        loss = -(lp.sum() / mask.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    adapter.model.save_pretrained(tmp)
    copy_processor_files(model_dir, tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another run finished the same (deterministic) warm-up first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def train_config(algorithm: str, task: str, overrides: dict, paths: dict, minutes: float,
                 seed: int) -> TrainConfig:
    """The trainer config of one demo run (validated: a bad `--set` value fails here).

    `paths`: model, data, eval_data, output_dir. kl_beta and max_new_tokens default by task;
    a `--set kl_beta` applies to the GPG run only (GRPO keeps its own 0.04, as in its paper)."""
    by_task = {"max_new_tokens": DEFAULT_NEW_TOKENS[task],
               "kl_beta": DEFAULT_KL[task] if algorithm == "gpg" else None}
    mine = {k: v for k, v in overrides.items() if algorithm == "gpg" or k != "kl_beta"}
    # the demo owns its folder: a previous demo run there is moved aside (replaced-<id>/), not mixed in
    values = {**TRAINING, "overwrite_output_dir": True, **by_task, **mine, **paths, "algorithm": algorithm,
              "max_minutes": minutes, "seed": seed, "prompt_template": TEMPLATE}
    return TrainConfig.from_dict(values, where="--set")


def run_algorithm(cfg: TrainConfig, task: str) -> dict:
    trainer = Trainer(cfg)
    history = trainer.train()
    run = {"history": history, "steps": trainer.step, "seconds": trainer.train_seconds}
    if task != "grounding":
        if trainer.last_eval[0] != trainer.step:  # stopped early: evaluate the final weights
            trainer.evaluate()
        run["by_answer"] = answer_breakdown(trainer.eval_rows, trainer.last_eval[1])
    return run


def answer_breakdown(rows, items: list[dict]) -> dict:
    """Per true answer: held-out greedy accuracy and the share of all answers that name it.

    `items` are `evaluate_rows` results for `rows`, in order. A policy that has stopped naming
    a class at all (share 0) can never be rewarded for it again: this table shows that failure.
    """
    answered = [normalize_text(extract_answer(i["completions"][0]) or "") for i in items]
    table = {}
    for truth in sorted({normalize_text(str(r.solution)) for r in rows}):
        mine = [i["reward"] for r, i in zip(rows, items) if normalize_text(str(r.solution)) == truth]
        table[truth] = {"n": len(mine), "accuracy": round(sum(mine) / len(mine), 4),
                        "answer_share": round(answered.count(truth) / len(items), 4)}
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpg-vlm demo", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASK_METRIC), default="classification")
    parser.add_argument("--minutes", type=float, default=12.0,
                        help="training wall-clock budget (warm-up and evaluations come on top)")
    parser.add_argument("--algorithm", choices=["gpg", "grpo"], default="gpg")
    parser.add_argument("--compare", action="store_true", help="run GPG and GRPO side by side")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="where the tiny model and data are cached")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="a demo setting (DemoSettings) or any TrainConfig key, e.g. "
                             "--set learning_rate=1e-3 size=m")
    args = parser.parse_args(argv)
    cache = Path(args.cache) if args.cache else default_cache()
    out = Path(args.out)
    algorithms = ["gpg", "grpo"] if args.compare else [args.algorithm]
    try:  # every value checked before the warm-up, so that a bad one costs nothing
        settings, overrides = split_overrides(args.set)
        paths = cached_paths(args.task, settings, args.seed, cache)
        configs = {a: train_config(a, args.task, overrides, {
            "model": str(paths["warm"]), "data": str(paths["train"]), "eval_data": str(paths["test"]),
            "output_dir": str(out / a if args.compare else out)}, args.minutes, args.seed)
            for a in algorithms}
    except ConfigError as exc:
        print(f"gpg-vlm demo: bad setting: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    prepare(args.task, settings, args.seed, paths)
    warm_up(paths["base"], paths["train"], paths["warm"], args.task, settings, args.seed)
    results = {}
    for algorithm, cfg in configs.items():
        results[algorithm] = run_algorithm(cfg, args.task)
    shown = {**dataclasses.asdict(settings), **next(iter(configs.values())).to_dict()}
    summary = write_reports(out, args.task, results, shown, time.perf_counter() - t0,
                            compare=args.compare)
    print(json.dumps(summary, indent=1))
    return 0
