"""The trainer's set-up: who owns the output folder, the rows, the models, what trains.

`SetUp` holds the steps `Trainer.__init__` runs before the first training step, in order:
claim the output folder (lock, lineage, a resumed config compared), seed, check the rewards,
load the rows, load the policy, the reference (only when kl_beta > 0), the optimizer and the
rollout engine, drop the rows whose prompts the loaded model cannot take, then build what the
loop calls (the sampler, the objective, the run log). The loop's own state (step counters, a
resumed checkpoint) is set by `Trainer._start`. Nothing here runs after set-up.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch

from gpg_vlm.checkpoint import CheckpointError
from gpg_vlm.collect import Sampler, resolve_rewards
from gpg_vlm.config import ConfigError
from gpg_vlm.data import load_rows
from gpg_vlm.lora import add_lora
from gpg_vlm.models.adapter import VLMAdapter
from gpg_vlm.objective import Objective
from gpg_vlm.rollout import make_engine
from gpg_vlm.run_folder import FolderLock, RunFolderError, check_config_change, claim
from gpg_vlm.run_log import RunLog
from gpg_vlm.tasks import fitting_rows


def check_dtype(dtype: str, device: torch.device) -> None:
    """Refuse, before any model loads, a dtype the device cannot train in."""
    if device.type == "cpu" and dtype == "float16":
        raise ConfigError("config key 'dtype': float16 cannot be trained on the CPU (no float16 "
                          "matmul backward there); use float32 or bfloat16")
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"config key 'dtype': bfloat16 is not supported by {torch.cuda.get_device_name()}; "
                          "use float32 or float16")


class SetUp:
    """Set-up steps of `Trainer` (gpg_vlm.train), which provides cfg, acc, procs and out."""

    def _set_up(self, resume: Path | None) -> None:
        """After the folder is claimed: seeds, rows, models, then what samples, scores and logs."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        # a bad reward name, or a reward that cannot take (completions, **columns), fails
        # before anything is loaded
        rewards = resolve_rewards(cfg)
        if cfg.rollout == "vllm":  # and so does a missing vLLM
            from gpg_vlm.rollout.vllm import require_vllm

            require_vllm()
        self._load_rows()
        self._load_models(resume)
        self._check_prompts()
        self.sampler = Sampler(cfg, self.adapter, self.rollout, self.procs, self.rows, rewards)
        self.objective = Objective(cfg)
        self.max_steps = cfg.max_steps
        if cfg.epochs is not None:
            self.max_steps = max(1, math.ceil(cfg.epochs * len(self.rows) / cfg.prompts_per_step))
        self.run_log = RunLog(cfg, self.procs.is_main)

    def _claim_folder(self, resume: Path | None, resuming: bool) -> None:
        """Lock output_dir, check a resumed config, and settle this run's lineage (main process)."""
        cfg, say = self.cfg, lambda text: print(text, file=sys.stderr)
        state = None
        if resume is not None:
            try:
                state = json.loads((Path(resume) / "trainer_state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{resume}: unreadable trainer_state.json ({exc})") from None
            check_config_change(state.get("config", {}), cfg.to_dict(), cfg.allow_config_change,
                                Path(resume), say if self.procs.is_main else lambda text: None)
        # processor and tokenizer files of new checkpoints come from the weights' own model
        self.processor_dirs = [resume, cfg.model] if resume is not None and not cfg.lora_r else [cfg.model]
        self.lineage, refused = None, None
        if self.procs.is_main:  # only the main process holds the lock and writes files
            try:
                self.lock = FolderLock(self.out).acquire()
                if self.lock.took_over:
                    say(f"{self.out}: took over the lock left by a process that is gone "
                        f"({self.lock.took_over})")
                self.lineage, _ = claim(self.out, None if resume is None else Path(resume), state,
                                        resuming, cfg.overwrite_output_dir, say)
            except RunFolderError as exc:
                refused = exc
        if self.procs.main_decides(refused is not None):  # every process stops, not only the main
            raise refused or RunFolderError(f"{self.out}: refused by the main process (see its message)")

    def _load_rows(self) -> None:
        cfg = self.cfg
        self.rows = load_rows(cfg.data, on_bad_row=cfg.on_bad_row)
        if not self.rows:
            raise ConfigError(f"config key 'data': {cfg.data} holds no usable rows")
        self.eval_rows = None
        self.last_eval = None  # (step, per-item results) of the latest evaluation
        if cfg.eval_data:
            self.eval_rows = load_rows(cfg.eval_data, on_bad_row=cfg.on_bad_row)[: cfg.eval_limit or None]

    def _check_prompts(self) -> None:
        """Rows whose prompts the loaded model cannot take (too long, its special tokens) are
        bad rows now, under on_bad_row, rather than errors in the middle of the run."""
        cfg = self.cfg
        limit = cfg.max_prompt_tokens
        if cfg.rollout == "vllm":  # the engine refuses prompt + completion over its max_model_len
            engine_limit = cfg.vllm_max_model_len - cfg.max_new_tokens
            limit = engine_limit if limit is None else min(limit, engine_limit)
        fit = dict(max_prompt_tokens=limit, max_new_tokens=cfg.max_new_tokens, on_bad_row=cfg.on_bad_row)
        self.rows = fitting_rows(self.adapter, self.rows, cfg.prompt_template, **fit)
        if not self.rows:
            raise ConfigError(f"config key 'data': {cfg.data} holds no row whose prompt fits the model")
        if self.eval_rows is not None:
            self.eval_rows = fitting_rows(self.adapter, self.eval_rows, cfg.prompt_template, **fit)

    def _load_models(self, resume: Path | None) -> None:
        """Policy (trainable), reference (frozen, only when kl_beta > 0), optimizer, rollout engine."""
        cfg = self.cfg
        load = dict(dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                    device=self.acc.device, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                    trust_remote_code=cfg.trust_remote_code)
        # a full-weights checkpoint loads like any model directory; LoRA ones hold the LoRA only
        weights_dir = resume if resume is not None and not cfg.lora_r else cfg.model
        self.adapter = VLMAdapter.from_pretrained(weights_dir, **load)
        self.reference = VLMAdapter.from_pretrained(cfg.model, **load) if cfg.kl_beta > 0 else None
        if self.reference is not None:
            self.reference.model.requires_grad_(False).eval()
        self._setup_trainable()
        adamw = lambda params: torch.optim.AdamW(  # noqa: E731
            params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
        # DDP (or a DeepSpeed config) through accelerate, or FSDP2 units; the optimizer is built
        # after sharding, over the parameters the processes then hold (gpg_vlm.dist)
        self.scorer, self.optimizer, self.params = self.procs.prepare(self.adapter.model,
                                                                      self.adapter.scorer, adamw)
        self.adapter.set_scorer(self.scorer)
        self.rollout = make_engine(cfg.rollout, self.adapter, **self._engine_options())

    def _engine_options(self) -> dict:
        cfg = self.cfg
        if cfg.rollout != "vllm":
            return {}
        # built from the base directory (always complete); the policy's own weights (a resumed
        # or LoRA policy) are loaded into it before it samples
        return dict(model_dir=cfg.model, seed=cfg.seed * 1000 + self.procs.index,
                    gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, sleep=cfg.vllm_sleep,
                    tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                    max_model_len=cfg.vllm_max_model_len)

    def _setup_trainable(self) -> None:
        cfg, model = self.cfg, self.adapter.model
        if cfg.freeze_vision:
            self.adapter.freeze_vision()
        if cfg.lora_r:
            self.lora_config = add_lora(model, cfg)
        if cfg.gradient_checkpointing:
            self.adapter.enable_gradient_checkpointing()
        model.train()
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("nothing to train: every parameter is frozen")
