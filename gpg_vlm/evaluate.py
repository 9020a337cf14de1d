"""`gpg-vlm eval`: greedy (or sampled) completions scored by the very rewards used in training.

Rows become prompts and are scored by `gpg_vlm.tasks.scored_batches`, the glue training uses
too (prompts, reward columns, categories), so a training reward and an evaluation metric
cannot drift apart; this module adds the benchmark loading, the settings, the output folder
and the command line. The files and metric conventions are in gpg_vlm.eval_results
(lmms-eval's shape: OUT/results.json, OUT/samples_BENCHMARK.jsonl, OUT/results.md).

Settings: a checkpoint that records what it trained with (trainer_state.json, or
gpg_vlm_training.json in an exported folder) lends its prompt template, completion length and
pixel limits unless the command line sets them; results.json says which value came from where.
A LoRA checkpoint (a PEFT adapter folder) is evaluated on its base model with the adapter merged.

Engines: `--rollout hf` (default) generates with our loop over the loaded model; `--rollout vllm`
with a vLLM engine in this process (gpg_vlm.rollout.vllm), built from the checkpoint's folder (a
LoRA's base) and loaded with the adapter's weights (so a merged LoRA is what it serves). Both get
the same prompts: the adapter's token ids (its chat template) and its resized images, which the
vLLM engine checks token by token against its own expansion. Batches, seeds, files and resuming
are the same for both; results.json records the engine in its config, and `--resume` refuses
another engine. Greedy completions agree between the engines up to fp32 rounding (a near-tie in
the logits can pick another token); sampled ones come from different random streams.

Resuming: OUT/run.json holds the settings, and each batch's rows are appended to the samples
file as soon as they are scored. Ctrl-C or SIGTERM stops between writes and prints the command
that continues; `--resume` checks the settings match, skips the finished rows and ends with the
same numbers as an uninterrupted run (the batch plan and each batch's seed depend only on the
rows and the settings). Without `--resume` a folder holding an evaluation is refused before any
work.

Deliberately left out: GPT-based answer extraction (MathVista's official scorer uses one; we
score with the training reward only) and multi-GPU sharding of the evaluation.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from contextlib import closing, contextmanager
from pathlib import Path

import torch

from gpg_vlm.data import DataError, load_benchmark, load_rows
from gpg_vlm.data.loading import check_images
from gpg_vlm.eval_results import markdown, results_file, sample_line, write_json
from gpg_vlm.export import ExportError, load_adapter, lora_base, training_settings
from gpg_vlm.models.adapter import AdapterError
from gpg_vlm.rollout import ENGINES, RolloutError, RolloutSetupError, make_engine
from gpg_vlm.tasks import (DEFAULT_TOKEN_BUDGET, EXTRACT_MODES, fitting_rows, prompt_tokens,
                           scored_batches)


# ----------------------------------------------------------------------------- gpg-vlm eval

BENCHMARK_NAMES = ("cvbench", "sat", "superclevr", "geoqa", "mathvista", "refcoco", "lisa",
                   "fewshot", "fashion-mnist", "jsonl")
SCHEMA_FILES = ("fashion-mnist", "jsonl")  # files already in the gpg_vlm schema
DEFAULT_TEMPLATE = ("{problem} Output the thinking process in <think> </think> and the final "
                    "answer in <answer> </answer> tags.")
# what a checkpoint can lend (TrainConfig field names) and the value without one
TRAINED_DEFAULTS = {"prompt_template": DEFAULT_TEMPLATE, "max_new_tokens": 256,
                    "min_pixels": None, "max_pixels": None}
RUN_FILE = "run.json"


class EvalError(Exception):
    """A problem with the command's inputs; main prints it as one line and returns 2."""


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived; the finished rows are on disk.

    A BaseException, like KeyboardInterrupt: the signal can land inside code that guards odd
    input with `except Exception` (answer extraction, reward checks), which must not swallow it."""


def load_eval_rows(benchmark: str, data: str, image_root: str | None = None,
                   limit: int | None = None):
    """(the first `limit` rows of `data` read as `benchmark`, images checked; the row count).

    Images are decoded only for the rows kept, so `--limit 20` on a large benchmark is quick,
    and a missing image fails here, naming its row, rather than in the middle of a batch.
    """
    if benchmark not in BENCHMARK_NAMES:
        raise EvalError(f"unknown benchmark {benchmark!r}; valid names: {', '.join(BENCHMARK_NAMES)}")
    try:
        found = Path(data).exists()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        raise EvalError(f"data {str(data)[:200]}: cannot use this path: {exc}") from None
    if not found:
        raise EvalError(f"data {data}: no such file or folder")
    try:
        if benchmark in SCHEMA_FILES:
            if image_root is not None:
                raise EvalError(f"--image-root applies to published benchmark files; {benchmark} "
                                "rows resolve their images against the data file's folder")
            rows = load_rows(data, check_images=False)
        else:
            rows = load_benchmark(benchmark, data, image_root=image_root, check_images=False)
        rows = list(rows)
        total = len(rows)
        rows = rows[:limit] if limit is not None else rows
        for row in rows:
            check_images(row)
    except DataError as exc:
        raise EvalError(str(exc)) from None
    except OSError as exc:
        raise EvalError(f"data {data}: cannot read: {exc.strerror or exc}") from None
    if not rows:
        raise EvalError(f"data {data}: no rows to evaluate")
    return rows, total


def _parser():
    p = argparse.ArgumentParser(prog="gpg-vlm eval", description="Evaluate a checkpoint on a benchmark "
                                "with the training rewards; writes OUT/results.json, "
                                "OUT/samples_BENCHMARK.jsonl and OUT/results.md.")
    p.add_argument("--model", required=True, help="checkpoint folder (full, LoRA or exported)")
    p.add_argument("--benchmark", required=True, help=f"one of: {', '.join(BENCHMARK_NAMES)}")
    p.add_argument("--data", required=True, help="the benchmark's record file (a folder for lisa)")
    p.add_argument("--image-root", default=None, help="folder the images are under (default: the data's folder)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--completions", type=int, default=1,
                   help="K completions per row; K > 1 also reports pass@K")
    p.add_argument("--samples", dest="old_samples", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", dest="old_batch_size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy; default 0 with one completion, 1.0 with K > 1")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="completion length limit (default: the checkpoint's, else 256)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="a longer prompt is a bad row (default: the model's context length minus --max-new-tokens)")
    p.add_argument("--prompt-template", default=None,
                   help="user text, {problem} is replaced (default: the checkpoint's, else the GPG one)")
    p.add_argument("--min-pixels", type=int, default=None, help="image pixel floor (default: the checkpoint's)")
    p.add_argument("--max-pixels", type=int, default=None, help="image pixel cap (default: the checkpoint's)")
    p.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                   help="padded tokens (prompt + completion, all rows) per generate call")
    p.add_argument("--extract", choices=EXTRACT_MODES, default="strict",
                   help="answer extraction: strict (default) is the training reward's; lenient also reads "
                        "boxed answers, final-answer phrases and the last line, for models that ignore "
                        "the answer format (eval/README.md)")
    p.add_argument("--rollout", choices=ENGINES, default="hf",
                   help="what generates: hf (default), our loop over the loaded model; vllm, a vLLM engine "
                        "in this process (pip install 'gpg_vlm[vllm]'; same prompts, files and resuming)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype; auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (K > 1)")
    p.add_argument("--out", default=None, help="output folder (default: runs/eval/BENCHMARK)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted evaluation in --out")
    return p


def _check_args(args) -> float:
    """Validate numbers and return the temperature to use."""
    if args.old_samples is not None:  # a "sample" is a prompt everywhere else in gpg_vlm
        raise EvalError("--samples was renamed to --completions (K completions per row)")
    if args.old_batch_size is not None:
        raise EvalError("--batch-size was replaced by --token-budget (batches are sized by tokens)")
    for name in ("limit", "max_new_tokens", "max_prompt_tokens", "completions", "token_budget",
                 "min_pixels", "max_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.prompt_template is not None and "{problem}" not in args.prompt_template:
        raise EvalError("--prompt-template must contain {problem}")
    temperature = args.temperature
    if temperature is None:
        temperature = 1.0 if args.completions > 1 else 0.0
    if args.completions > 1 and temperature <= 0:
        raise EvalError(f"--completions {args.completions} needs --temperature > 0 (greedy completions "
                        "would all be the same)")
    if args.rollout == "vllm":  # before any work: the one thing missing is named, nothing else
        from gpg_vlm.rollout.vllm import INSTALL_HINT, require_vllm  # imports vllm only when asked

        try:
            require_vllm()
        except RolloutSetupError:
            raise EvalError(f"--rollout vllm needs vLLM, which is not installed: {INSTALL_HINT}") from None
    model = Path(args.model)
    if not model.is_dir():
        raise EvalError(f"model directory {args.model} does not exist")
    if not (model / "config.json").is_file() and not (model / "adapter_config.json").is_file():
        raise EvalError(f"{args.model} has neither config.json nor adapter_config.json: not a "
                        "transformers checkpoint or PEFT adapter")
    return temperature


def resolve_settings(args) -> tuple[dict, dict]:
    """({field: value}, {field: where it came from}) for the TRAINED_DEFAULTS fields."""
    try:
        recorded, source = training_settings(args.model)
    except ExportError as exc:
        raise EvalError(str(exc)) from None
    values, sources = {}, {}
    for field, default in TRAINED_DEFAULTS.items():
        if getattr(args, field) is not None:
            values[field], sources[field] = getattr(args, field), "command line"
        elif field in recorded:
            values[field], sources[field] = recorded[field], f"checkpoint ({source})"
        else:
            values[field] = default
            sources[field] = "default" if default is not None else "default (the model family's)"
    if "{problem}" not in str(values["prompt_template"]):
        raise EvalError(f"prompt_template from {sources['prompt_template']} lacks {{problem}}")
    return values, sources


def check_out(out: Path, resume: bool) -> dict | None:
    """The interrupted run's settings with --resume; refuse a folder that holds an evaluation without it."""
    run = out / RUN_FILE
    if resume:
        if not run.is_file():
            raise EvalError(f"--resume: {out} holds no evaluation to continue (no {RUN_FILE})")
        try:
            return json.loads(run.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EvalError(f"{run}: unreadable ({exc})") from None
    held = [p.name for p in (run, out / "results.json") if p.exists()] + [p.name for p in out.glob("samples_*.jsonl")]
    if held:
        raise EvalError(f"--out {out} already holds an evaluation ({', '.join(sorted(held))}); pass "
                        "--resume to continue it or choose another --out")
    return None


def read_samples(path: Path, n_rows: int) -> dict[int, dict]:
    """{doc_id: line} of a samples file; a torn last line (killed mid-write) is dropped."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    done, kept = {}, 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            doc_id = int(record["doc_id"])
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):  # the last line, without its newline: a torn write
                print(f"gpg-vlm eval: {path}:{number}: dropped an incomplete line", file=sys.stderr)
                break
            raise EvalError(f"{path}:{number}: not a samples line ({exc})") from None
        if not 0 <= doc_id < n_rows:
            raise EvalError(f"{path}:{number}: doc_id {doc_id} outside the {n_rows} rows")
        done[doc_id] = record
        kept += len(line) + 1
    if kept != len(text):
        with open(path, "r+", encoding="utf-8") as f:
            f.truncate(len(text[:kept].encode("utf-8")))
    return done


@contextmanager
def stop_signals():
    """SIGINT/SIGTERM raise Stopped, except inside `holding()`, where they wait for its end."""
    state = {"hold": False, "pending": None}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if state["hold"]:
            state["pending"] = name
        else:
            raise Stopped(name)

    @contextmanager
    def holding():
        state["hold"] = True
        try:
            yield
        finally:
            state["hold"] = False
        if state["pending"]:
            raise Stopped(state["pending"])

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals stay as they were
            pass
    try:
        yield holding
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def resume_command(argv: list[str], out: Path) -> str:
    """This command line with --out made explicit and --resume at the end."""
    args = [a for a in argv if a != "--resume"]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    return "gpg-vlm eval " + " ".join(shlex.quote(a) for a in [*args, "--resume"])


def _settings(args, temperature: float, values: dict, sources: dict) -> dict:
    """Everything that decides the items: compared on --resume, recorded in results.json."""
    return {"model": str(args.model), "benchmark": args.benchmark, "data": str(args.data),
            "image_root": args.image_root, "limit": args.limit, "completions": args.completions,
            "temperature": temperature, "seed": args.seed, "token_budget": args.token_budget,
            "extract": args.extract, "dtype": args.dtype, "rollout": args.rollout, **values,
            "settings_from": sources}


# what a run.json written before a setting existed implies for it
SETTING_BEFORE = {"rollout": "hf"}


def _load(args, values: dict):
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    try:
        adapter = load_adapter(args.model, dtype=dtype, min_pixels=values["min_pixels"],
                               max_pixels=values["max_pixels"])
    except (AdapterError, ExportError, OSError, ValueError) as exc:
        raise EvalError(f"cannot load model {args.model}: {exc}") from None
    adapter.model.eval()
    return adapter


def run(args, argv: list[str]) -> int:
    temperature = _check_args(args)
    out = Path(args.out or Path("runs") / "eval" / args.benchmark)
    previous = check_out(out, args.resume)
    values, sources = resolve_settings(args)
    settings = _settings(args, temperature, values, sources)
    if previous is not None:
        was = {k: previous.get(k, SETTING_BEFORE.get(k)) for k in settings}
        changed = [k for k in settings if k != "settings_from" and was[k] != settings[k]]
        if changed:
            k = changed[0]
            raise EvalError(f"--resume: {k} is {settings[k]!r} now but {was[k]!r} in "
                            f"{out / RUN_FILE}; rerun with the same settings")
    rows, total = load_eval_rows(args.benchmark, args.data, args.image_root, args.limit)
    samples = out / f"samples_{args.benchmark}.jsonl"
    done = read_samples(samples, len(rows)) if previous is not None else {}
    if len(done) < len(rows):
        try:
            with stop_signals() as holding:
                _generate(args, values, temperature, rows, done, out, settings, holding)
        except Stopped as stop:
            if (out / RUN_FILE).is_file():
                note = f"after {len(done)} of {len(rows)} rows (kept in {samples}); continue with:\n  " \
                       f"{resume_command(argv, out)}"
            else:
                note = "before any row was written (nothing to resume)"
            print(f"gpg-vlm eval: stopped by {stop} {note}", file=sys.stderr)
            return 130 if str(stop) == "SIGINT" else 143
        except RolloutError as exc:  # the engine failed; the finished rows are kept
            if not (out / RUN_FILE).is_file():
                raise EvalError(str(exc)) from None
            raise EvalError(f"{exc} (after {len(done)} of {len(rows)} rows, kept in {samples}; "
                            f"continue with: {resume_command(argv, out)})") from None
    items = [done[i] for i in range(len(rows))]
    payload = results_file(args.benchmark, rows, items, settings, total)
    write_json(out / "results.json", payload)
    (out / "results.md").write_text(markdown(args.benchmark, payload), encoding="utf-8")
    _print_summary(args.benchmark, payload, out)
    return 0


def _generate(args, values: dict, temperature: float, rows, done: dict, out: Path, settings: dict,
              holding) -> None:
    """Load the model, then score the unfinished rows, appending each batch's lines to the
    samples file and to `done`. OUT and its run.json appear only once the model has loaded, so a
    model that fails to load leaves no folder to refuse next time."""
    adapter = _load(args, values)
    try:  # prompts too long for the model, or holding its special tokens: one line, no traceback
        fitting_rows(adapter, rows, values["prompt_template"], args.max_prompt_tokens,
                     values["max_new_tokens"])
    except DataError as exc:
        raise EvalError(str(exc)) from None
    engine = make_rollout(args.rollout, adapter, args.model, rows, values, args.seed)
    with closing(engine):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_FILE, settings)
        print("settings: " + ", ".join(f"{k} from {v}" for k, v in settings["settings_from"].items()),
              file=sys.stderr)
        batches = scored_batches(
            adapter, rows, values["prompt_template"], max_new_tokens=values["max_new_tokens"],
            temperature=temperature, completions=args.completions, seed=args.seed,
            token_budget=args.token_budget, skip=set(done), extract=args.extract, progress=True,
            engine=engine)
        _journal(args, rows, batches, done, out, holding)


def make_rollout(name: str, adapter, model: str, rows, values: dict, seed: int):
    """The engine `name` for the loaded `adapter`. A vLLM engine is built from the checkpoint's
    folder (a LoRA's base: the merged weights are loaded into it at start) and sized to these
    rows: the longest prompt plus the completion limit, the most images in one row."""
    if name == "hf":
        return make_engine("hf", adapter)
    longest = max(prompt_tokens(adapter, row, values["prompt_template"]) for row in rows)
    try:
        model_dir = lora_base(model) or Path(model)
        return make_engine(name, adapter, model_dir=model_dir, seed=seed,
                           max_model_len=longest + values["max_new_tokens"],
                           max_images_per_prompt=max(1, max(len(row.images) for row in rows)))
    except (RolloutSetupError, ExportError) as exc:
        raise EvalError(str(exc)) from None


def _journal(args, rows, batches, done: dict, out: Path, holding) -> None:
    """Append each batch's lines to the samples file (and to `done`) as the batch finishes."""
    # closing: the progress bar ends before a stop message is printed
    with open(out / f"samples_{args.benchmark}.jsonl", "a", encoding="utf-8") as journal, closing(batches):
        for batch in batches:
            lines = [sample_line(i, rows[i], item, args.extract) for i, item in batch]
            with holding():  # whole lines only: a signal waits for the write to end
                journal.write("".join(json.dumps(x, ensure_ascii=False, default=str) + "\n"
                                      for x in lines))
                journal.flush()
            done.update((x["doc_id"], x) for x in lines)


def _print_summary(task: str, payload: dict, out: Path) -> None:
    results = payload["results"]
    head = results[task]
    line = f"{task}: accuracy {100 * head['accuracy,none']:.2f}% on {head['n']} rows"
    for key in (k for k in head if k.startswith("pass@") and "_stderr" not in k):
        line += f", {key.removesuffix(',none')} {100 * head[key]:.2f}%"
    if "official_total,none" in head:
        line += f", CV-Bench official total {100 * head['official_total,none']:.2f}%"
    print(line)
    for name in (n for n in payload["group_subtasks"][task] if n.startswith(f"{task}/category=")):
        print(f"  {name.removeprefix(f'{task}/category=')}: {100 * results[name]['accuracy,none']:.2f}%")
    print(f"results in {out / 'results.json'}, {out / f'samples_{task}.jsonl'} and {out / 'results.md'}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(_parser().parse_args(argv), argv)
    except EvalError as exc:
        print(f"gpg-vlm eval: {exc}", file=sys.stderr)
        return 2
