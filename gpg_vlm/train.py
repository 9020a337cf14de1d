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

This module holds the loop and the choices it makes; its set-up (gpg_vlm.train_setup), its
loss (gpg_vlm.objective), what its checkpoints hold and what an error saves (gpg_vlm.train_state,
gpg_vlm.checkpoint, gpg_vlm.lora), the numbers it moves between processes and how they hold
the policy (gpg_vlm.dist: ddp or fsdp), where they are written (gpg_vlm.run_log) and what a row
means (gpg_vlm.tasks) live beside it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch

from gpg_vlm import algo
from gpg_vlm.checkpoint import CheckpointError, checkpoint_to_resume
from gpg_vlm.collect import Collected, TrainingError, rollout_metrics
from gpg_vlm.config import ConfigError, TrainConfig
from gpg_vlm.data import DataError
from gpg_vlm.dist import Processes, full_tensor
from gpg_vlm.models.adapter import AdapterError
from gpg_vlm.models.batch import micro_batches
from gpg_vlm.rollout import RolloutError, RolloutSetupError
from gpg_vlm.run_log import peak_memory_mb, quiet_unless_main
from gpg_vlm.tasks import evaluate_rows
from gpg_vlm.train_setup import SetUp, check_dtype
from gpg_vlm.train_state import Checkpoints

log = logging.getLogger("gpg_vlm.train")


class Trainer(SetUp, Checkpoints):
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
        self.procs = Processes(self.acc, cfg.sharding)
        quiet_unless_main(self.procs.is_main)
        if cfg.prompts_per_step % self.procs.world:
            raise ConfigError(f"config key 'prompts_per_step': {cfg.prompts_per_step} is not divisible "
                              f"by the {self.procs.world} processes; use a multiple of {self.procs.world}")
        check_dtype(cfg.dtype, self.acc.device)
        self.out = Path(cfg.output_dir)
        self.lock = None
        try:
            self._claim_folder(resume, resume is not None if resuming is None else resuming)
            self._set_up(resume)
            self._start(resume)
        except BaseException:
            self.close()
            raise

    def _start(self, resume: Path | None) -> None:
        """The loop's state at step 0, or at the resumed checkpoint's step."""
        self.step = self.nonfinite = self.saved_step = 0
        self.weights_bad = False  # set when an update left non-finite weights: nothing more is saved
        self.mid_update = False
        self.train_seconds = 0.0  # training time only: evaluation and saving are not counted
        self.stop_requested = None
        # printed when a signal stops the run; `main` replaces it with the exact command line
        self.resume_command = "gpg-vlm train --config <same config> --resume"
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
               "rollout_logprob_diff": max(procs.gather_floats(stats["diff"])),
               # a tensor gather, not a pickled object gather: this runs every step
               "micro_batches_per_process": [int(n) for n in procs.gather_floats(stats["parts"])]}
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
        stats: the largest |training - rollout| log-prob `diff` over the trained tokens, the
        truncated-IS `weight_sum`, `clipped` and `tokens` counts, this process's `parts`)."""
        cfg, batch, rollout = self.cfg, got.batch, got.rollout
        zero = len(train_rows) == 0
        if zero:  # take part in the gradient all-reduce with a zero loss
            train_rows = torch.arange(1)
        kept = rollout.select(train_rows, rollout.prompt_index[train_rows])
        parts = micro_batches(batch, kept.prompt_index, kept.completion_mask, cfg.micro_batch_tokens)
        total, entropy_total = 0.0, 0.0
        stats = {"diff": 0.0, "weight_sum": 0.0, "clipped": 0, "tokens": 0, "parts": len(parts)}
        parts = self.procs.common_parts(parts)  # (micro-batch, real): a dummy has its loss zeroed
        for k, (idx, real) in enumerate(parts):
            rows = train_rows[idx]
            mask = rollout.completion_mask[rows]  # (b, T)
            t = max(1, int(mask.sum(-1).max()))
            # gradients are all-reduced once, on the last micro-batch
            with self.procs.no_sync(self.scorer, last=k == len(parts) - 1):
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
                if cfg.rollout_is_cap is not None and real:
                    weights, clipped = algo.truncated_is_weights(lp, sampled, mask_t, cfg.rollout_is_cap)
                    stats["weight_sum"] += float(weights.sum())
                    stats["clipped"] += int(clipped.sum())
                    stats["tokens"] += int(mask_t.sum())
                loss, mean_entropy = self.objective(lp, entropy, advantages[rows].to(lp.device), ref_t,
                                                    mask_t, alpha, counts, weights)
                if zero or not real:
                    loss = loss * 0.0
                if not real:
                    mean_entropy = 0.0
                self.acc.backward(loss)
            total += float(loss.detach())
            entropy_total += mean_entropy
        return total, entropy_total, stats

    @torch.no_grad()
    def _logprob_diff(self, got: Collected) -> float:
        """rollout_logprob_diff of a step that trains nothing: over all of its completions."""
        with self.procs.full_parameters(self.scorer, self.adapter.model):  # no per-layer collective
            lp = self.adapter.completion_logprobs(got.batch, got.rollout, self.cfg.temperature,
                                                  self.cfg.micro_batch_tokens)  # (B, T)
        gap = ((lp - got.rollout.logprobs).abs() * got.rollout.completion_mask).max()
        return max(self.procs.gather_floats(float(gap)))

    def _clip_and_check(self) -> float:
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        return self.procs.clip_grad_norm(self.params, limit)

    def parameter_checksum(self) -> float:
        """A float fingerprint of the trainable weights (equal on every data-parallel process)."""
        with torch.no_grad():
            return float(sum((full_tensor(p).double() * (i + 1)).sum() for i, p in enumerate(self.params)))

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
            try:  # closed while our handlers still hold: a second Ctrl-C here stops at once too
                run_log.close()
                self.close()
            finally:
                for sig, handler in previous_handlers.items():
                    if handler is not None:  # None: set outside Python, cannot be put back
                        signal.signal(sig, handler)
        return run_log.history

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

    # ---------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        self.adapter.model.eval()
        with self.procs.full_parameters(self.scorer, self.adapter.model):
            result = evaluate_rows(self.adapter, self.eval_rows, self.cfg.prompt_template,
                                   max_new_tokens=self.cfg.max_new_tokens)
        self.last_eval = (self.step, result.pop("items"))  # per-item results, for reports
        return result

    def _eval_record(self) -> dict:
        result = self.evaluate()
        return {"step": self.step, "train_seconds": self.train_seconds,
                **{f"eval/{k}": v for k, v in result.items()}}

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
    except KeyboardInterrupt:  # a Ctrl-C after the run saved and gave its handlers back
        print("gpg-vlm train: stopped by Ctrl-C while closing; the checkpoints written are complete",
              file=sys.stderr)
        return 130
    steps = [h for h in history if "reward" in h]
    if steps and trainer.procs.is_main:
        print(f"done: {trainer.step} steps, last reward {steps[-1]['reward']:.3f}; "
              f"metrics in {cfg.output_dir}/metrics.jsonl")
    return 0
