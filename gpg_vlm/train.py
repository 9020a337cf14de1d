"""`gpg-vlm train`: the GPG loop, top to bottom.

One step:
  1. draw N / world_size prompts per process, sample G completions each (adapter.generate);
  2. score every completion with each configured reward, weight and sum them;
  3. beta_th: while fewer than beta_th * N groups (over all processes) are informative and the
     tries are under `max_resample_tries`, draw more prompts; keep N groups, informative first;
  4. advantages per group, alpha = B / (B - M) over all processes (GPG only);
  5. training forward on the completions that carry a gradient, micro-batch by micro-batch,
     loss from gpg_vlm.algo, backward, gradient clipping, optimizer step;
  6. metrics, evaluation and checkpoints at their intervals.

How it differs from the paper's scripts, on purpose: one update per batch (on-policy, so no
old-log-prob pass and GRPO's ratio is 1 at the update); completions whose advantage is zero
are not run through the training forward under GPG (their gradient is exactly zero); the
reference model exists only where the KL weight is > 0 (GRPO's default; opt-in for the others).

This module is the only one that reads the config and touches accelerate, files and logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import resource
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from gpg_vlm import algo
from gpg_vlm.config import ConfigError, TrainConfig
from gpg_vlm.models.batch import micro_batches

log = logging.getLogger("gpg_vlm.train")


class TrainingError(RuntimeError):
    """The run cannot go on (a reward failed, too many non-finite steps); the message says why."""


class PromptStream:
    """Prompt indices in a fresh seeded permutation each epoch; identical on every process."""

    def __init__(self, n_rows: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.n_rows, self.seed, self.epoch, self.cursor = n_rows, seed, epoch, cursor
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n_rows, generator=gen).tolist()

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.cursor >= self.n_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            k = min(n - len(out), self.n_rows - self.cursor)
            out.extend(self._order[self.cursor:self.cursor + k])
            self.cursor += k
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: Path | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        from gpg_vlm.models.adapter import VLMAdapter
        from gpg_vlm.rollout import make_engine
        from gpg_vlm.data import load_rows
        from gpg_vlm.rewards import accuracy_reward, resolve_reward

        self.cfg = cfg
        self.acc = Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        world = self.acc.num_processes
        if cfg.prompts_per_step % world:
            raise ConfigError(f"config key 'prompts_per_step': {cfg.prompts_per_step} is not divisible "
                              f"by the {world} processes; use a multiple of {world}")
        self.n_local = cfg.prompts_per_step // world
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

        try:  # user reward code is imported here, and only when the config names it
            self.rewards = {name: resolve_reward(name, answer_only=cfg.answer_only) if name == "format"
                            else resolve_reward(name) for name in cfg.rewards}
        except ValueError as exc:
            raise ConfigError(f"config key 'rewards': {exc}") from None
        self.accuracy = accuracy_reward
        self.rows = load_rows(cfg.data, on_bad_row=cfg.on_bad_row)
        if not self.rows:
            raise ConfigError(f"config key 'data': {cfg.data} holds no usable rows")
        self.eval_rows = None
        self.last_eval = None  # (step, per-item results) of the latest evaluation
        if cfg.eval_data:
            self.eval_rows = load_rows(cfg.eval_data, on_bad_row=cfg.on_bad_row)
            if cfg.eval_limit:
                self.eval_rows = self.eval_rows[: cfg.eval_limit]

        load = dict(dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                    device=self.acc.device, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                    trust_remote_code=cfg.trust_remote_code)
        # a full-weights checkpoint loads like any model directory; LoRA ones hold the LoRA only
        weights_dir = resume if resume is not None and not cfg.lora_r else cfg.model
        self.adapter = VLMAdapter.from_pretrained(weights_dir, **load)
        self.reference = VLMAdapter.from_pretrained(cfg.model, **load) if cfg.uses_reference else None
        if self.reference is not None:
            self.reference.model.requires_grad_(False).eval()
        self.params = self._setup_trainable(self.adapter.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate,
                                           betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
        # the training forward and the optimizer go through accelerate together (DDP here;
        # FSDP / DeepSpeed configs in configs/accelerate wrap the same pair)
        scorer, self.optimizer = self.acc.prepare(self.adapter.scorer, self.optimizer)
        self.adapter.set_scorer(scorer)
        self.rollout = make_engine("hf", self.adapter)
        self.sample_gen = torch.Generator(device="cpu").manual_seed(
            cfg.seed * 1000 + self.acc.process_index)
        self.stream = PromptStream(len(self.rows), cfg.seed)
        self.max_steps = cfg.max_steps
        if cfg.epochs is not None:
            self.max_steps = max(1, math.ceil(cfg.epochs * len(self.rows) / cfg.prompts_per_step))
        self.step = 0
        self.nonfinite = 0
        self.stop_requested = None
        # printed when a signal stops the run; `main` replaces it with the exact command line
        self.resume_command = "gpg-vlm train --config <same config> --resume"
        self.writer = None
        if resume is not None:
            self._resume(Path(resume))

    # ------------------------------------------------------------- set-up
    def _setup_trainable(self, model) -> list:
        cfg = self.cfg
        if cfg.freeze_vision:
            self.adapter.freeze_vision()
        if cfg.lora_r:
            from peft import LoraConfig, inject_adapter_in_model

            model.requires_grad_(False)
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=list(cfg.lora_target_modules))
            # LoRA layers are injected in place: the adapter keeps using the same model object
            inject_adapter_in_model(lora, model)
            self.lora_config = lora
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
            progress = max(progress, getattr(self, "train_seconds", 0.0) / (60 * cfg.max_minutes))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    # ------------------------------------------------------------- rollout
    def samples(self, rows):
        from gpg_vlm.evaluate import samples_of

        return samples_of(rows, self.cfg.prompt_template)

    def score(self, rows, batch, rollout) -> dict[str, torch.Tensor]:
        """Each reward's values (B,) by name, and their weighted sum under 'total'."""
        from gpg_vlm.evaluate import reward_columns

        columns = reward_columns(rows, batch, rollout.prompt_index.tolist(), self.adapter.box_format)
        scores, total = {}, torch.zeros(len(rollout.texts), dtype=torch.float64)
        for name, fn in self.rewards.items():
            try:
                values = fn(rollout.texts, **columns)
            except Exception as exc:  # a user's reward function: say which one failed
                raise TrainingError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
            values = torch.tensor([float(v) for v in values], dtype=torch.float64)
            if values.shape != total.shape or not torch.isfinite(values).all():
                raise TrainingError(f"reward {name!r} must return {len(rollout.texts)} finite floats")
            scores[name] = values
            total += self.cfg.rewards[name] * values
        scores["total"] = total
        scores["accuracy"] = torch.tensor(self.accuracy(rollout.texts, **columns), dtype=torch.float64)
        return scores

    def collect(self):
        """Sample, score and select this process's N / world_size groups (beta_th resampling)."""
        from gpg_vlm.models.batch import PromptBatch, Rollout

        cfg, G = self.cfg, self.cfg.group_size
        chunks, tries = [], 0
        while True:
            rows = [self.rows[i] for i in self.stream.take(self.n_local)]
            batch = self.adapter.encode(self.samples(rows))
            with self._full_parameters():
                rollout = self.rollout.generate(batch, G, max_new_tokens=cfg.max_new_tokens,
                                                temperature=cfg.temperature, top_p=cfg.top_p,
                                                top_k=cfg.top_k, generator=self.sample_gen)
            t = time.perf_counter()
            scores = self.score(rows, batch, rollout)
            self.timer["reward"] += time.perf_counter() - t
            chunks.append((rows, batch, rollout, scores))
            informative = sum(int(algo.informative_groups(s["total"], G).sum()) for *_, s in chunks)
            informative = self._sum_over_processes(informative)
            if informative >= cfg.beta_th * cfg.prompts_per_step or tries >= cfg.max_resample_tries:
                break
            tries += 1
        rows = [r for c in chunks for r in c[0]]
        batch = PromptBatch.concat([c[1] for c in chunks], self.adapter.pad_token_id)
        rollout = Rollout.concat([c[2] for c in chunks], self.adapter.pad_token_id)
        scores = {k: torch.cat([c[3][k] for c in chunks]) for k in chunks[0][3]}
        keep = algo.select_groups(scores["total"], G, self.n_local)  # (N_local,) informative first
        keep_rows = algo.group_rows(keep, G)
        rows = [rows[i] for i in keep.tolist()]
        batch = batch.select(keep.tolist())
        rollout = rollout.select(keep_rows, torch.arange(self.n_local).repeat_interleave(G))
        scores = {k: v[keep_rows] for k, v in scores.items()}
        return rows, batch, rollout, scores, tries

    def _full_parameters(self):
        """Rollout needs every parameter on every process: gather them where they are sharded.

        DDP and ZeRO-2 keep full parameters (nothing to do). FSDP and ZeRO-3 shard them; the
        gathering below follows their documented APIs but has not been run on a GPU yet.
        """
        from accelerate.utils import DistributedType

        kind = self.acc.distributed_type
        if kind == DistributedType.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel.summon_full_params(self.adapter.scorer, writeback=False)
        if kind == DistributedType.DEEPSPEED and self.acc.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.adapter.model.parameters()))
        return nullcontext()

    # --------------------------------------------------------------- step
    def train_step(self) -> dict:
        cfg, G = self.cfg, self.cfg.group_size
        self.timer = {"rollout": 0.0, "reward": 0.0, "train": 0.0}
        for group in self.optimizer.param_groups:  # the schedule is a function of the step alone
            group["lr"] = cfg.learning_rate * self._lr_factor(self.step)
        t0 = time.perf_counter()
        self.adapter.model.eval()  # sampling: no dropout
        rows, batch, rollout, scores, tries = self.collect()
        self.timer["rollout"] = time.perf_counter() - t0 - self.timer["reward"]
        t1 = time.perf_counter()

        rewards = scores["total"].float()
        advantages = algo.group_advantages(rewards, G, scale_by_std=cfg.std_scaling)  # (B,)
        informative = self._sum_over_processes(int(algo.informative_groups(rewards, G).sum()))
        world = self.acc.num_processes
        alpha = algo.gpg_alpha(cfg.prompts_per_step, informative) if cfg.algorithm == "gpg" else 1.0
        mask = rollout.completion_mask
        num_completions = float(mask.shape[0])  # every rank holds B / W rows: global B / W
        num_tokens = self._sum_over_processes(int(mask.sum())) / world
        metrics = self._rollout_metrics(rows, rollout, scores, informative, alpha, tries)
        if world > 1:  # every process must have computed the same global alpha
            metrics["alpha_per_process"] = self._gather_floats(float(alpha))

        loss_total, updated = 0.0, False
        if informative == 0 and self.reference is None:
            metrics["skipped"] = "no informative group"
        else:
            self.adapter.model.train()
            ref = None
            if self.reference is not None:
                ref = self.reference.completion_logprobs(batch, rollout, cfg.temperature,
                                                         cfg.micro_batch_tokens)
            train_rows = torch.arange(mask.shape[0])
            if self.reference is None and cfg.entropy_coef == 0:
                train_rows = train_rows[advantages != 0]  # zero advantage: zero gradient
            loss_total, entropy = self._backward(batch, rollout, advantages, ref, alpha,
                                                 train_rows, num_completions, num_tokens)
            grad_norm = self._clip_and_check()  # after the all-reduce: equal on every rank
            loss_total = self._sum_over_processes(loss_total) / world
            metrics["grad_norm"] = grad_norm
            if entropy is not None:  # mean next-token entropy of the trained completions
                metrics["entropy"] = self._sum_over_processes(entropy) / world
            if math.isfinite(loss_total) and math.isfinite(grad_norm):
                self.optimizer.step()
                self.rollout.sync_weights(self.adapter.model)
                updated = True
                self.nonfinite = 0
            else:
                self.nonfinite += 1
                metrics["skipped"] = f"non-finite loss or gradient ({self.nonfinite} in a row)"
                log.warning("step %d: non-finite loss %.4g / grad norm %.4g: update skipped",
                            self.step + 1, loss_total, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
        self.timer["train"] = time.perf_counter() - t1
        step_time = time.perf_counter() - t0
        metrics.update(
            loss=loss_total,
            updated=updated,
            lr=self.optimizer.param_groups[0]["lr"],
            time_rollout=self.timer["rollout"], time_reward=self.timer["reward"],
            time_train=self.timer["train"], time_step=step_time,
            tokens_per_second=int(mask.sum()) * world / max(step_time, 1e-9),
            peak_memory_mb=_peak_memory_mb(),
        )
        return metrics

    def _backward(self, batch, rollout, advantages, ref, alpha, train_rows, num_completions,
                  num_tokens) -> tuple[float, float | None]:
        """Backward over the micro-batches: (summed loss, mean entropy or None when not computed)."""
        cfg = self.cfg
        scorer = self.adapter.scorer
        if len(train_rows) == 0:  # take part in the gradient all-reduce with a zero loss
            train_rows = torch.arange(1)
            zero = True
        else:
            zero = False
        rollout_rows = rollout.select(train_rows, rollout.prompt_index[train_rows])
        groups = micro_batches(batch, rollout_rows.prompt_index,
                               rollout_rows.completion_mask, cfg.micro_batch_tokens)
        total, entropy_sum = 0.0, 0.0
        for k, idx in enumerate(groups):
            rows = train_rows[idx]
            mask = rollout.completion_mask[rows]
            t = max(1, int(mask.sum(-1).max()))
            sync = k == len(groups) - 1
            ctx = self.acc.no_sync(scorer) if not sync else nullcontext()
            with ctx:
                lp = self.adapter.logprobs(batch, rollout.prompt_index[rows],
                                           rollout.completion_ids[rows, :t], mask[:, :t],
                                           cfg.temperature, with_entropy=cfg.entropy_coef > 0)
                if cfg.entropy_coef > 0:
                    lp, entropy = lp  # (b, t) each
                mask_t = mask[:, :t].to(lp.device)
                adv = advantages[rows].to(lp.device)
                if cfg.algorithm == "gpg":
                    loss = algo.gpg_loss(lp, adv, mask_t, alpha=alpha, token_mean=cfg.token_mean,
                                         num_completions=num_completions, num_tokens=num_tokens)
                    if ref is not None:
                        loss = loss + algo.kl_penalty(
                            lp, ref[rows, :t].to(lp.device), mask_t, cfg.kl_weight,
                            cfg.token_mean, num_completions=num_completions, num_tokens=num_tokens)
                else:
                    loss = algo.grpo_loss(
                        lp, None, ref[rows, :t].to(lp.device) if ref is not None else None, adv,
                        mask_t, clip_eps=cfg.clip_eps, beta=cfg.kl_weight, token_mean=cfg.token_mean,
                        length_norm=float(cfg.max_new_tokens) if cfg.algorithm == "dr_grpo" else None,
                        num_completions=num_completions, num_tokens=num_tokens)
                if cfg.entropy_coef > 0:
                    bonus = algo.entropy_bonus(entropy, mask_t, cfg.entropy_coef, cfg.token_mean,
                                               num_completions=num_completions,
                                               num_tokens=num_tokens)
                    entropy_sum += float(bonus.detach()) / -cfg.entropy_coef
                    loss = loss + bonus
                if zero:
                    loss = loss * 0.0
                self.acc.backward(loss)
            total += float(loss.detach())
        return total, (entropy_sum if cfg.entropy_coef > 0 else None)

    def _clip_and_check(self) -> float:
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = self.acc.clip_grad_norm_(self.params, limit)
        return float(norm)

    def _rollout_metrics(self, rows, rollout, scores, informative, alpha, tries) -> dict:
        lengths = rollout.completion_mask.sum(-1).float()
        m = {
            "step": self.step + 1,
            "reward": float(scores["total"].mean()),
            "informative_fraction": informative / self.cfg.prompts_per_step,
            "alpha": float(alpha),
            "resample_tries": tries,
            "completion_length_mean": float(lengths.mean()),
            "completion_length_max": int(lengths.max()),
            "truncated_fraction": float(rollout.truncated.float().mean()),
        }
        for name in self.cfg.rewards:
            m[f"reward/{name}"] = float(scores[name].mean())
        from gpg_vlm.evaluate import row_category

        tasks = [row_category(rows[i]) for i in rollout.prompt_index.tolist()]
        for task in sorted(set(tasks)):
            sel = torch.tensor([t == task for t in tasks])
            m[f"accuracy/{task}"] = float(scores["accuracy"][sel].mean())
        return m

    def _gather_floats(self, value: float) -> list[float]:
        t = torch.tensor([value], dtype=torch.float64, device=self.acc.device)
        return self.acc.gather(t).tolist()

    def parameter_checksum(self) -> float:
        """A float fingerprint of the trainable weights (equal on every data-parallel process)."""
        with torch.no_grad():
            return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(self.params)))

    def _sum_over_processes(self, value):
        if self.acc.num_processes == 1:
            return value
        t = torch.tensor(float(value), dtype=torch.float64, device=self.acc.device)
        return type(value)(self.acc.reduce(t, reduction="sum").item())

    # --------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        from gpg_vlm.evaluate import evaluate_rows

        self.adapter.model.eval()
        result = evaluate_rows(self.adapter, self.eval_rows, self.cfg.prompt_template,
                               max_new_tokens=self.cfg.max_new_tokens)
        self.last_eval = (self.step, result.pop("items"))  # per-item results, for reports
        return result

    # ---------------------------------------------------------- checkpoints
    def save(self) -> Path:
        from gpg_vlm.checkpoint import save_checkpoint

        gens = self._gather_generator_states()
        state = {
            "step": self.step,
            "stream": self.stream.state(),
            "nonfinite": self.nonfinite,
            "rng": {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist(),
                    "sampling": gens},
            "world_size": self.acc.num_processes,
            "config": self.cfg.to_dict(),
        }
        path = None
        if self.acc.is_main_process:
            path = save_checkpoint(self.out, self.step, self._model_to_save(), self.cfg.model,
                                   {"optimizer": self.optimizer.state_dict()},
                                   state, keep=self.cfg.save_total_limit)
        self.acc.wait_for_everyone()
        return path or self.out / f"checkpoint-{self.step}"

    def _model_to_save(self):
        model = self.adapter.model
        if not self.cfg.lora_r:
            return model
        return _LoraSaver(model)

    def _gather_generator_states(self) -> list:
        state = self.sample_gen.get_state().tolist()
        if self.acc.num_processes == 1:
            return [state]
        import torch.distributed as dist

        out = [None] * self.acc.num_processes
        dist.all_gather_object(out, state)
        return out

    def _resume(self, path: Path) -> None:
        from gpg_vlm.checkpoint import load_checkpoint_state

        state, opt = load_checkpoint_state(path)
        if state.get("world_size") != self.acc.num_processes:
            raise ConfigError(f"{path} was written by {state.get('world_size')} processes; resume "
                              f"with the same number (now {self.acc.num_processes})")
        if self.cfg.lora_r:
            self._load_lora(path)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.step = int(state["step"])
        self.nonfinite = int(state.get("nonfinite", 0))
        self.stream = PromptStream(len(self.rows), self.cfg.seed, **state["stream"])
        random.setstate(_tuples(state["rng"]["python"]))
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
        self.sample_gen.set_state(torch.tensor(state["rng"]["sampling"][self.acc.process_index],
                                               dtype=torch.uint8))

    def _load_lora(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"{path}: no adapter_model.safetensors to resume the LoRA run from")
        result = set_peft_model_state_dict(self.adapter.model, load_file(str(weights)))
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"{path}: LoRA weights do not match lora_* settings "
                              f"(unexpected {result.unexpected_keys[:3]})")

    # ---------------------------------------------------------------- loop
    def train(self) -> list[dict]:
        cfg = self.cfg
        main = self.acc.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
            self.writer = _tensorboard(self.out) if cfg.tensorboard else None
            self.wandb = _wandb(cfg) if cfg.wandb_project else None
        history = []
        previous_handlers = self._install_signal_handlers()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.max_steps if cfg.max_minutes is None else None, initial=self.step, disable=not main, desc="train",
                   dynamic_ncols=True)
        self.started = time.perf_counter()
        self.train_seconds = 0.0  # training time only: evaluation and saving are not counted
        if self.eval_rows is not None and self.step == 0:
            self._log(self._eval_record(), history)
        try:
            while self.step < self.max_steps:
                t = time.perf_counter()
                metrics = self.train_step()
                self.train_seconds += time.perf_counter() - t
                metrics["train_seconds"] = self.train_seconds
                self.step += 1
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", inf=f"{metrics['informative_fraction']:.2f}")
                self._log(metrics, history)
                if self.nonfinite >= cfg.max_nonfinite_steps:
                    path = self.save()
                    raise TrainingError(
                        f"stopped: {self.nonfinite} consecutive steps had a non-finite loss or "
                        f"gradient; the last good weights are in {path}. Lower learning_rate or "
                        "check the rewards.")
                out_of_time = cfg.max_minutes is not None and self._broadcast_flag(
                    self.train_seconds >= 60 * cfg.max_minutes)
                last = self.step == self.max_steps or out_of_time
                if self.eval_rows is not None and (last or (cfg.eval_steps and self.step % cfg.eval_steps == 0)):
                    self._log(self._eval_record(), history)
                saved = None
                if last or (cfg.save_steps and self.step % cfg.save_steps == 0):
                    saved = self.save()
                if out_of_time:
                    break
                # process 0's flag, so that every process saves and stops at the same step
                if self._broadcast_flag(self.stop_requested is not None):
                    path = saved or self.save()
                    if main:
                        print(f"\n{self.stop_requested}: saved {path} after step {self.step}. "
                              f"Resume with: {self.resume_command}", file=sys.stderr)
                    break
            if self.acc.num_processes > 1:
                self._log({"step": self.step,
                           "parameter_checksums": self._gather_floats(self.parameter_checksum())},
                          history)
        finally:
            for sig, handler in previous_handlers.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(sig, handler)
            bar.close()
            if self.writer is not None:
                self.writer.close()
        return history

    def _eval_record(self) -> dict:
        result = self.evaluate()
        return {"step": self.step, "train_seconds": getattr(self, "train_seconds", 0.0),
                **{f"eval/{k}": v for k, v in result.items()}}

    def _broadcast_flag(self, flag: bool) -> bool:
        """Process 0's decision, so every process stops at the same step."""
        if self.acc.num_processes == 1:
            return flag
        from accelerate.utils import broadcast_object_list

        return bool(broadcast_object_list([flag])[0])

    def _log(self, record: dict, history: list) -> None:
        history.append(record)
        if not self.acc.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if getattr(self, "wandb", None) is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                           step=record["step"])
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.writer.add_scalar(k, v, record["step"])

    def _install_signal_handlers(self) -> dict:
        """SIGTERM / SIGINT finish the current step, save and stop; returns the old handlers."""
        def handler(signum, frame):
            self.stop_requested = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous


class _LoraSaver:
    """save_pretrained for a model with injected LoRA layers: the LoRA weights only."""

    def __init__(self, model):
        self.model = model

    def save_pretrained(self, path, safe_serialization=True):
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
        save_file(weights, str(Path(path) / "adapter_model.safetensors"))


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(path / "tensorboard"))


def _wandb(cfg):
    try:
        import wandb
    except ImportError:
        raise ConfigError("config key 'wandb_project': wandb is not installed (pip install wandb)") from None
    return wandb.init(project=cfg.wandb_project, config=cfg.to_dict())


def _jsonable(obj):
    if isinstance(obj, tuple):
        return [_jsonable(o) for o in obj]
    return obj


def _tuples(obj):
    if isinstance(obj, list):
        return tuple(_tuples(o) for o in obj)
    return obj


def _resume_command(argv: list[str]) -> str:
    """This run's own command line with `--resume` (newest complete checkpoint) at the end."""
    import shlex

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
    from gpg_vlm.models.adapter import AdapterError
    from gpg_vlm.checkpoint import STATE_FILE, CheckpointError, latest_checkpoint
    from gpg_vlm.data import DataError

    try:
        cfg = TrainConfig.from_yaml(args.config, args.overrides)
        resume = None
        if args.resume:
            resume = latest_checkpoint(cfg.output_dir) if args.resume == "latest" else Path(args.resume)
            if resume is None:
                print(f"gpg-vlm train: no complete checkpoint in {cfg.output_dir}; starting fresh",
                      file=sys.stderr)
            elif not (resume / STATE_FILE).is_file():
                raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); "
                                  f"complete ones: {latest_checkpoint(cfg.output_dir) or 'none'} "
                                  "is the newest, or pass --resume alone")
        trainer = Trainer(cfg, resume=resume)
        trainer.resume_command = _resume_command(argv)
        history = trainer.train()
    # bad input: exit 2; a run that had to stop (non-finite steps, a failing reward or save,
    # a full disk): exit 1. One line either way, never a library's traceback.
    except (ConfigError, DataError, AdapterError) as exc:
        print(f"gpg-vlm train: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError, OSError) as exc:
        print(f"gpg-vlm train: {exc}", file=sys.stderr)
        return 1
    steps = [h for h in history if "reward" in h]
    if steps and trainer.acc.is_main_process:
        print(f"done: {trainer.step} steps, last reward {steps[-1]['reward']:.3f}; "
              f"metrics in {cfg.output_dir}/metrics.jsonl")
    return 0
