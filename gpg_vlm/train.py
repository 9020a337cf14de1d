"""`gpg-vlm train`: the GPG loop, top to bottom.

One step (`Trainer.train_step`):
  1. draw N / world_size prompts per process, sample G completions each (the rollout engine);
  2. score every completion with each configured reward, weight and sum them;
  3. beta_th: while fewer than beta_th * N groups (over all processes) are informative and the
     tries are under `max_resample_tries`, draw more prompts; keep N groups, informative first;
  4. advantages per group, alpha = B / (B - M) over all processes (GPG only);
  5. training forward on the completions that carry a gradient, micro-batch by micro-batch,
     loss from gpg_vlm.algo, backward, gradient clipping, optimizer step, weights to the engine;
  6. metrics, evaluation and checkpoints at their intervals (`Trainer.train`).

How it differs from the paper's scripts, on purpose: one update per batch (on-policy, so no
old-log-prob pass and GRPO's ratio is 1 at the update); completions whose advantage is zero
are not run through the training forward under GPG (their gradient is exactly zero); the
reference model exists only where kl_beta is > 0 (GRPO's default; opt-in for the others).

What is never lost: the main process locks output_dir and settles which run owns it
(gpg_vlm.run_folder) before any model loads; an error after step k saves step k (unless the disk
failed) and prints the resume command; SIGTERM, SIGINT and SIGHUP finish the step and save; a
second Ctrl-C stops at once; an update that leaves a non-finite weight stops the run unsaved.

This module holds the loop and the choices it makes; the numbers it moves between processes
(gpg_vlm.dist), where they are written (gpg_vlm.run_log), what a checkpoint holds
(gpg_vlm.checkpoint, gpg_vlm.lora) and what a row means (gpg_vlm.tasks) live beside it.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import random
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from gpg_vlm import algo
from gpg_vlm.checkpoint import (CheckpointError, checkpoint_to_resume, load_checkpoint_state,
                                restore_rng, rng_state, save_checkpoint)
from gpg_vlm.collect import (Collected, PromptStream, Sampler, TrainingError, resolve_rewards,
                             rollout_metrics)
from gpg_vlm.config import ConfigError, TrainConfig
from gpg_vlm.data import DataError, load_rows
from gpg_vlm.dist import Processes
from gpg_vlm.lora import LoraSaver, add_lora, load_lora
from gpg_vlm.models.adapter import AdapterError, VLMAdapter
from gpg_vlm.models.batch import micro_batches
from gpg_vlm.rollout import RolloutError, RolloutSetupError, make_engine
from gpg_vlm.run_folder import FolderLock, RunFolderError, check_config_change, claim
from gpg_vlm.run_log import RunLog, peak_memory_mb, quiet_unless_main
from gpg_vlm.tasks import evaluate_rows, fitting_rows

log = logging.getLogger("gpg_vlm.train")


class Objective:
    """The loss of `cfg.algorithm`, chosen once at set-up (gpg_vlm.algo does the math).

    `alpha(informative)` is GPG's bias correction (1 for the GRPO family); calling the object
    gives one micro-batch's loss and its mean entropy (a float, 0.0 when entropy_coef is 0).
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.is_gpg = cfg.algorithm == "gpg"
        # Dr.GRPO divides by the constant max_new_tokens instead of each completion's length
        self.length_norm = float(cfg.max_new_tokens) if cfg.algorithm == "dr_grpo" else None

    def alpha(self, informative: int) -> float:
        return float(algo.gpg_alpha(self.cfg.prompts_per_step, informative)) if self.is_gpg else 1.0

    def __call__(self, lp, entropy, adv, ref, mask, alpha: float, counts: dict, weights=None):
        """lp, entropy, ref, mask, weights (truncated IS, or None): (b, t); adv: (b,);
        counts: num_completions, num_tokens."""
        cfg = self.cfg
        if self.is_gpg:
            loss = algo.gpg_loss(lp, adv, mask, alpha=alpha, token_mean=cfg.token_mean,
                                 token_weights=weights, **counts)
            if ref is not None:
                loss = loss + algo.kl_penalty(lp, ref, mask, cfg.kl_beta, cfg.token_mean, **counts)
        else:
            loss = algo.grpo_loss(lp, None, ref, adv, mask, clip_eps=cfg.clip_eps, beta=cfg.kl_beta,
                                  token_mean=cfg.token_mean, length_norm=self.length_norm,
                                  token_weights=weights, **counts)
        if entropy is None:
            return loss, 0.0
        bonus = algo.entropy_bonus(entropy, mask, cfg.entropy_coef, cfg.token_mean, **counts)
        return loss + bonus, float(bonus.detach()) / -cfg.entropy_coef


class Trainer:
    """One run: set-up, then `train()` calls `train_step()` until the step or time budget ends."""

    def __init__(self, cfg: TrainConfig, resume: Path | None = None, resuming: bool | None = None):
        """`resume`: the checkpoint to continue; `resuming`: --resume was given (default: resume
        is not None), so a folder whose run never saved a checkpoint may be started again."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        self.acc = Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.procs = Processes(self.acc)
        quiet_unless_main(self.procs.is_main)
        if cfg.prompts_per_step % self.procs.world:
            raise ConfigError(f"config key 'prompts_per_step': {cfg.prompts_per_step} is not divisible "
                              f"by the {self.procs.world} processes; use a multiple of {self.procs.world}")
        _check_dtype(cfg.dtype, self.acc.device)
        self.out = Path(cfg.output_dir)
        self.lock = None
        try:
            self._claim_folder(resume, resume is not None if resuming is None else resuming)
            self._set_up(resume)
        except BaseException:
            self.close()
            raise

    def _set_up(self, resume: Path | None) -> None:
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
        self.step = self.nonfinite = self.saved_step = 0
        self.weights_bad = False  # set when an update left non-finite weights: nothing more is saved
        self.mid_update = False
        self.train_seconds = 0.0  # training time only: evaluation and saving are not counted
        self.stop_requested = None
        # printed when a signal stops the run; `main` replaces it with the exact command line
        self.resume_command = "gpg-vlm train --config <same config> --resume"
        self.run_log = RunLog(cfg, self.procs.is_main)
        # True when the policy has weights the rollout engine has not loaded yet (after an
        # update or a resume); the next step loads them before it samples
        self.engine_stale = False
        if resume is not None:
            self._resume(Path(resume))
            self.saved_step = self.step
            self.engine_stale = True
        self.good_state = self._state()  # what an error before the next step saves

    def close(self) -> None:
        """Give the output folder back (the lock); the trainer stays usable for evaluation."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------- set-up
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
        self.params = self._setup_trainable()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate,
                                           betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
        # the training forward and the optimizer go through accelerate together (DDP here;
        # FSDP / DeepSpeed configs in configs/accelerate wrap the same pair)
        self.scorer, self.optimizer = self.acc.prepare(self.adapter.scorer, self.optimizer)
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

    def _setup_trainable(self) -> list:
        cfg, model = self.cfg, self.adapter.model
        if cfg.freeze_vision:
            self.adapter.freeze_vision()
        if cfg.lora_r:
            self.lora_config = add_lora(model, cfg)
        if cfg.gradient_checkpointing:
            self.adapter.enable_gradient_checkpointing()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("nothing to train: every parameter is frozen")
        return params

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.max_steps - cfg.warmup_steps))
        if cfg.max_minutes is not None:  # with a time budget the schedule follows the clock too
            progress = max(progress, self.train_seconds / (60 * cfg.max_minutes))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    # ------------------------------------------------------------- the step
    def train_step(self) -> dict:
        """One optimizer step: steps 1-5 of the module docstring; returns the step's metrics."""
        cfg, G, procs = self.cfg, self.cfg.group_size, self.procs
        for group in self.optimizer.param_groups:  # the schedule is a function of the step alone
            group["lr"] = cfg.learning_rate * self._lr_factor(self.step)
        t0 = time.perf_counter()
        self.adapter.model.eval()  # 1-3: sample (no dropout), score, resample for beta_th
        gathered = lambda: self.procs.full_parameters(self.scorer, self.adapter.model)  # noqa: E731
        if self.engine_stale:  # the last update, into the engine before it samples
            with gathered():
                self.rollout.sync_weights(self.adapter.model)
            self.engine_stale = False
        got = self.sampler.collect(gathered)
        rollout_seconds = time.perf_counter() - t0 - got.reward_seconds

        t1 = time.perf_counter()  # 4: advantages per group, alpha over all processes
        rewards = got.scores["total"].float()  # (B,)
        advantages = algo.group_advantages(rewards, G, scale_by_std=cfg.scale_by_std)  # (B,)
        informative = procs.sum(int(algo.informative_groups(rewards, G).sum()))
        alpha = self.objective.alpha(informative)
        metrics = rollout_metrics(self.step + 1, cfg, got, informative, alpha)
        if procs.world > 1:  # every process must have computed the same global alpha
            metrics["alpha_per_process"] = procs.gather_floats(alpha)

        if informative == 0 and self.reference is None:  # 5: forward, backward, update
            metrics.update(skipped="no informative group", loss=0.0, updated=False,
                           rollout_logprob_diff=self._logprob_diff(got))
        else:
            metrics.update(self._update(got, advantages, alpha))
        step_time = time.perf_counter() - t0
        metrics.update(
            lr=self.optimizer.param_groups[0]["lr"], time_rollout=rollout_seconds,
            time_reward=got.reward_seconds, time_train=time.perf_counter() - t1, time_step=step_time,
            tokens_per_second=int(got.rollout.completion_mask.sum()) * procs.world / max(step_time, 1e-9),
            peak_memory_mb=peak_memory_mb(),
            # "shared_prefix", or "full_rows" (gradient checkpointing, or a cache the adapter
            # cannot index): which training forward ran
            training_forward=self.adapter.training_forward,
        )
        return metrics

    def _update(self, got: Collected, advantages: torch.Tensor, alpha: float) -> dict:
        """Step 5: backward over the completions that carry a gradient, clip, step, sync weights."""
        cfg, procs = self.cfg, self.procs
        self.adapter.model.train()
        ref = None
        if self.reference is not None:
            ref = self.reference.completion_logprobs(got.batch, got.rollout, cfg.temperature,
                                                     cfg.micro_batch_tokens)  # (B, T)
        mask = got.rollout.completion_mask  # (B, T)
        train_rows = torch.arange(mask.shape[0])
        if self.reference is None and cfg.entropy_coef == 0:
            train_rows = train_rows[advantages != 0]  # zero advantage: zero gradient
        # every rank holds B / W rows: the global per-rank means of completions and tokens
        counts = {"num_completions": float(mask.shape[0]),
                  "num_tokens": procs.sum(int(mask.sum())) / procs.world}
        loss, entropy, stats = self._backward(got, advantages, ref, alpha, train_rows, counts)
        grad_norm = self._clip_and_check()  # after the all-reduce: equal on every rank
        out = {"grad_norm": grad_norm, "loss": procs.sum(loss) / procs.world, "updated": False,
               "rollout_logprob_diff": max(procs.gather_floats(stats["diff"]))}
        if cfg.rollout_is_cap is not None:  # over the trained tokens of every process
            tokens = max(procs.sum(stats["tokens"]), 1)
            out["rollout_is_mean"] = procs.sum(stats["weight_sum"]) / tokens
            out["rollout_is_clip_fraction"] = procs.sum(stats["clipped"]) / tokens
        if cfg.entropy_coef > 0:  # mean next-token entropy of the trained completions
            out["entropy"] = procs.sum(entropy) / procs.world
        if math.isfinite(out["loss"]) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.mid_update = True  # weights of step k+1, state of step k until the step ends
            self._check_weights()
            self.engine_stale = True  # loaded at the start of the next step (sync_weights)
            out["updated"], self.nonfinite = True, 0
        else:
            self.nonfinite += 1
            out["skipped"] = f"non-finite loss or gradient ({self.nonfinite} in a row)"
            log.warning("step %d: non-finite loss %.4g / grad norm %.4g: update skipped",
                        self.step + 1, out["loss"], grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def _backward(self, got: Collected, advantages, ref, alpha, train_rows, counts) -> tuple:
        """Backward over the micro-batches of `train_rows`: (summed loss, summed mean entropy,
        stats: the largest |training - rollout| log-prob `diff` over the trained tokens, and the
        truncated-IS `weight_sum`, `clipped` and `tokens` counts)."""
        cfg, batch, rollout = self.cfg, got.batch, got.rollout
        zero = len(train_rows) == 0
        if zero:  # take part in the gradient all-reduce with a zero loss
            train_rows = torch.arange(1)
        kept = rollout.select(train_rows, rollout.prompt_index[train_rows])
        parts = micro_batches(batch, kept.prompt_index, kept.completion_mask, cfg.micro_batch_tokens)
        total, entropy_total = 0.0, 0.0
        stats = {"diff": 0.0, "weight_sum": 0.0, "clipped": 0, "tokens": 0}
        for k, idx in enumerate(parts):
            rows = train_rows[idx]
            mask = rollout.completion_mask[rows]  # (b, T)
            t = max(1, int(mask.sum(-1).max()))
            # gradients are all-reduced once, on the last micro-batch
            with self.acc.no_sync(self.scorer) if k < len(parts) - 1 else nullcontext():
                out = self.adapter.logprobs(batch, rollout.prompt_index[rows],
                                            rollout.completion_ids[rows, :t], mask[:, :t],
                                            cfg.temperature, with_entropy=cfg.entropy_coef > 0)
                lp, entropy = out if cfg.entropy_coef > 0 else (out, None)  # (b, t) each
                ref_t = None if ref is None else ref[rows, :t].to(lp.device)
                mask_t = mask[:, :t].to(lp.device)  # (b, t)
                sampled = rollout.logprobs[rows, :t].to(lp.device)  # (b, t): the engine's
                gap = ((lp.detach() - sampled).abs() * mask_t).max()
                stats["diff"] = max(stats["diff"], float(gap))
                weights = None
                if cfg.rollout_is_cap is not None:
                    weights, clipped = algo.truncated_is_weights(lp, sampled, mask_t, cfg.rollout_is_cap)
                    stats["weight_sum"] += float(weights.sum())
                    stats["clipped"] += int(clipped.sum())
                    stats["tokens"] += int(mask_t.sum())
                loss, mean_entropy = self.objective(lp, entropy, advantages[rows].to(lp.device), ref_t,
                                                    mask_t, alpha, counts, weights)
                if zero:
                    loss = loss * 0.0
                self.acc.backward(loss)
            total += float(loss.detach())
            entropy_total += mean_entropy
        return total, entropy_total, stats

    @torch.no_grad()
    def _logprob_diff(self, got: Collected) -> float:
        """rollout_logprob_diff of a step that trains nothing: over all of its completions."""
        lp = self.adapter.completion_logprobs(got.batch, got.rollout, self.cfg.temperature,
                                              self.cfg.micro_batch_tokens)  # (B, T)
        gap = ((lp - got.rollout.logprobs).abs() * got.rollout.completion_mask).max()
        return max(self.procs.gather_floats(float(gap)))

    def _check_weights(self) -> None:
        """Stop, saving nothing of this step, when the update left a NaN or infinite weight."""
        with torch.no_grad():  # one device sync for all tensors
            finite = torch.stack([torch.isfinite(p).all() for p in self.params]).cpu()  # (P,)
        bad = (~finite).nonzero().flatten().tolist()
        if not self.procs.sum(len(bad)):
            return
        self.weights_bad = True  # these weights are never saved
        names = {id(p): n for n, p in self.adapter.model.named_parameters()}
        first = names.get(id(self.params[bad[0]]), f"parameter {bad[0]}") if bad else "on another process"
        last = self.out / f"checkpoint-{self.saved_step}" if self.saved_step else None
        raise TrainingError(
            f"step {self.step + 1}: the update left non-finite weights ({len(bad)} tensor(s), first "
            f"{first}); they were not saved. The last good checkpoint is "
            f"{last or 'none (no checkpoint was saved yet; set save_steps)'}; "
            f"lower learning_rate (now {self.cfg.learning_rate:g}) or max_grad_norm")

    def _clip_and_check(self) -> float:
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        return float(self.acc.clip_grad_norm_(self.params, limit))

    def parameter_checksum(self) -> float:
        """A float fingerprint of the trainable weights (equal on every data-parallel process)."""
        with torch.no_grad():
            return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(self.params)))

    # ---------------------------------------------------------------- loop
    def train(self) -> list[dict]:
        """Step after step until max_steps or max_minutes; returns every record logged."""
        run_log = self.run_log
        run_log.open(self.max_steps if self.cfg.max_minutes is None else None, self.step)
        previous_handlers = _catch_stop_signals(self)
        try:
            if self.eval_rows is not None and self.step == 0:
                run_log.log(self._eval_record())
            while self.step < self.max_steps:
                t = time.perf_counter()
                metrics = self.train_step()
                self.train_seconds += time.perf_counter() - t
                metrics["train_seconds"] = self.train_seconds
                self.step += 1
                self.mid_update = False
                self.good_state = self._state()  # the step is complete: this is what a save holds
                run_log.log(metrics)
                if self._after_step():
                    break
            if self.procs.world > 1:
                run_log.log({"step": self.step,
                             "parameter_checksums": self.procs.gather_floats(self.parameter_checksum())})
        except Exception as exc:
            self._keep_progress(exc)
            raise
        finally:
            for sig, handler in previous_handlers.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(sig, handler)
            run_log.close()
            self.close()
        return run_log.history

    def _keep_progress(self, exc: Exception) -> None:
        """An error stopped the run after step k: save step k (unless the disk failed) and say so.

        Only the process that met the error runs this, so it writes without waiting for the
        others (in a multi-process run, only when that is the main process).
        """
        k = self.good_state["step"]
        if not self.procs.is_main or k == 0 or self.weights_bad:
            return
        if self.mid_update:  # the weights moved past step k: a save would mix two steps
            self.run_log.say(f"not saving: the error came after step {k + 1}'s update; the last "
                             f"checkpoint is {self.out / f'checkpoint-{self.saved_step}' if self.saved_step else 'none'}")
            return
        if isinstance(exc, CheckpointError) or getattr(exc, "errno", None) in _DISK_ERRNOS:
            self.run_log.say(f"not saving after a disk error; the last checkpoint is "
                             f"{self.out / f'checkpoint-{self.saved_step}' if self.saved_step else 'none'}")
            return
        try:
            path = self._write_checkpoint(self.good_state) if self.saved_step != k else \
                self.out / f"checkpoint-{k}"
        except Exception as again:  # noqa: BLE001 - say both, keep the first error as the cause
            self.run_log.say(f"{type(exc).__name__} after step {k}; saving checkpoint-{k} failed too: {again}")
            return
        self.run_log.say(f"stopped by {type(exc).__name__} after step {k}: progress saved in {path}. "
                         f"Resume with: {self.resume_command}")

    def _after_step(self) -> bool:
        """Step 6: stop on non-finite steps; evaluate and save at their intervals. True: stop."""
        cfg, procs = self.cfg, self.procs
        if self.nonfinite >= cfg.max_nonfinite_steps:
            path = self.save()
            raise TrainingError(
                f"stopped: {self.nonfinite} consecutive steps had a non-finite loss or "
                f"gradient; the last good weights are in {path}. Lower learning_rate or "
                "check the rewards.")
        # process 0's decisions, so that every process evaluates, saves and stops at the same step
        out_of_time = cfg.max_minutes is not None and procs.main_decides(
            self.train_seconds >= 60 * cfg.max_minutes)
        last = self.step == self.max_steps or out_of_time
        if self.eval_rows is not None and (last or (cfg.eval_steps and self.step % cfg.eval_steps == 0)):
            self.run_log.log(self._eval_record())
        saved = self.save() if last or (cfg.save_steps and self.step % cfg.save_steps == 0) else None
        if out_of_time:
            return True
        if procs.main_decides(self.stop_requested is not None):
            path = saved or self.save()
            self.run_log.say(f"{self.stop_requested}: saved {path} after step {self.step}. "
                             f"Resume with: {self.resume_command}")
            return True
        return False

    # --------------------------------------------------- evaluation, checkpoints
    def evaluate(self) -> dict:
        self.adapter.model.eval()
        result = evaluate_rows(self.adapter, self.eval_rows, self.cfg.prompt_template,
                               max_new_tokens=self.cfg.max_new_tokens)
        self.last_eval = (self.step, result.pop("items"))  # per-item results, for reports
        return result

    def _eval_record(self) -> dict:
        result = self.evaluate()
        return {"step": self.step, "train_seconds": self.train_seconds,
                **{f"eval/{k}": v for k, v in result.items()}}

    def _state(self) -> dict:
        """The trainer state of a checkpoint of the current step (every process takes part)."""
        return {
            "step": self.step,
            "stream": self.sampler.stream.state(),
            "nonfinite": self.nonfinite,
            "rng": rng_state(self.procs.gather_objects(self.sampler.generator.get_state().tolist())),
            "world_size": self.procs.world,
            "config": self.cfg.to_dict(),
            "run_id": self.lineage[-1] if self.lineage else None,
            "lineage": self.lineage,
        }

    def save(self) -> Path:
        path = self._write_checkpoint(self.good_state) if self.procs.is_main else None
        self.procs.wait()
        return path or self.out / f"checkpoint-{self.step}"

    def _write_checkpoint(self, state: dict) -> Path:
        model = LoraSaver(self.adapter.model) if self.cfg.lora_r else self.adapter.model
        path = save_checkpoint(self.out, state["step"], model, self.processor_dirs,
                               {"optimizer": self.optimizer.state_dict()},
                               state, keep=self.cfg.save_total_limit)
        self.saved_step = state["step"]
        return path

    def _resume(self, path: Path) -> None:
        state, opt = load_checkpoint_state(path)
        if state.get("world_size") != self.procs.world:
            raise ConfigError(f"{path} was written by {state.get('world_size')} processes; resume "
                              f"with the same number (now {self.procs.world})")
        if self.cfg.lora_r:
            load_lora(self.adapter.model, path)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.step = int(state["step"])
        self.nonfinite = int(state.get("nonfinite", 0))
        self.sampler.stream = PromptStream(len(self.rows), self.cfg.seed, **state["stream"])
        restore_rng(state["rng"], self.sampler.generator, self.procs.index)


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def _check_dtype(dtype: str, device: torch.device) -> None:
    """Refuse, before any model loads, a dtype the device cannot train in."""
    if device.type == "cpu" and dtype == "float16":
        raise ConfigError("config key 'dtype': float16 cannot be trained on the CPU (no float16 "
                          "matmul backward there); use float32 or bfloat16")
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"config key 'dtype': bfloat16 is not supported by {torch.cuda.get_device_name()}; "
                          "use float32 or float16")


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C: stop now, saving nothing."""


def _catch_stop_signals(trainer: Trainer) -> dict:
    """SIGTERM / SIGINT / SIGHUP finish the current step, save and stop; a second Ctrl-C stops
    at once. Returns the old handlers."""
    def handler(signum, frame):
        if trainer.stop_requested is not None and signum == signal.SIGINT:
            raise StoppedAtOnce()
        trainer.stop_requested = signal.Signals(signum).name
        if signum == signal.SIGINT and trainer.procs.is_main:
            os.write(2, b"\nCtrl-C: finishing this step, then saving; Ctrl-C again stops at once\n")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return previous


def _resume_command(argv: list[str]) -> str:
    """This run's own command line with `--resume` (newest complete checkpoint) at the end."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--resume":  # its optional PATH follows unless that is an option or override
            nxt = argv[i + 1] if i + 1 < len(argv) else "-"
            skip = not nxt.startswith("-") and "=" not in nxt
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["gpg-vlm", "train", *kept, "--resume"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gpg-vlm train", description="GPG / GRPO / Dr.GRPO training from a YAML config.",
        epilog="Overrides: key=value pairs after the options, e.g. learning_rate=1e-5 max_steps=50.")
    parser.add_argument("--config", help="YAML file of TrainConfig keys (see gpg_vlm/config.py)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest complete checkpoint in output_dir, or from PATH")
    parser.add_argument("overrides", nargs="*", help="key=value")
    args = parser.parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `... --resume max_steps=9`: argparse took the override for the optional PATH
        args.overrides.append(args.resume)
        args.resume = "latest"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = TrainConfig.from_yaml(args.config, args.overrides)
        trainer = Trainer(cfg, resume=checkpoint_to_resume(args.resume, cfg.output_dir),
                          resuming=bool(args.resume))
        trainer.resume_command = _resume_command(argv)
        try:
            history = trainer.train()
        finally:
            trainer.rollout.close()
    # bad input: exit 2; a run that had to stop (non-finite steps, a failing reward or save,
    # a full disk): exit 1. One line either way, never a library's traceback.
    except (ConfigError, DataError, AdapterError, RolloutSetupError) as exc:
        print(f"gpg-vlm train: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError, RolloutError, OSError) as exc:
        print(f"gpg-vlm train: {exc}", file=sys.stderr)
        return 1
    except StoppedAtOnce:
        print("gpg-vlm train: stopped at once by a second Ctrl-C; nothing was saved after the last "
              "checkpoint", file=sys.stderr)
        return 130
    steps = [h for h in history if "reward" in h]
    if steps and trainer.procs.is_main:
        print(f"done: {trainer.step} steps, last reward {steps[-1]['reward']:.3f}; "
              f"metrics in {cfg.output_dir}/metrics.jsonl")
    return 0
