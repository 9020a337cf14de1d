"""What a checkpoint of the trainer holds, how it is written and resumed, and what an error saves.

`Checkpoints` is the checkpoint side of `Trainer` (gpg_vlm.train): `_state` is the trainer
state of the current step, `save` writes it (main process; the others wait), `_resume` reads
one back, and `_keep_progress` saves the last complete step when an error stops the run;
`_check_weights` stops a run whose update left non-finite weights, which are never saved.

Under sharding: fsdp every process holds a shard: a save gathers the full weights and optimizer
state (every process takes part; process 0 receives them on the CPU and writes), so the
checkpoint is the same ordinary one a DDP or one-process run writes and resumes, and
`gpg-vlm eval` loads. Resuming under fsdp loads the weights whole (before sharding) and the
optimizer state through torch.distributed.checkpoint. An error's lone save is skipped there:
it cannot gather without the other processes.
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch

from gpg_vlm.checkpoint import (CheckpointError, load_checkpoint_state, restore_rng, rng_state,
                                save_checkpoint)
from gpg_vlm.collect import PromptStream, TrainingError
from gpg_vlm.config import ConfigError
from gpg_vlm.lora import LoraSaver, load_lora

_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


class Checkpoints:
    """Checkpoint steps of `Trainer` (gpg_vlm.train), which provides the state they save."""

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
        if self.procs.fsdp:
            self.run_log.say(f"not saving: under sharding: fsdp a save needs every process; the last "
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
        whole = self._gathered_state() if self.procs.fsdp else None  # every process takes part
        path = self._write_checkpoint(self.good_state, whole) if self.procs.is_main else None
        self.procs.wait()
        return path or self.out / f"checkpoint-{self.step}"

    def _write_checkpoint(self, state: dict, whole: tuple | None = None) -> Path:
        """`whole`: (weights, optimizer state) gathered from the shards (fsdp), else None."""
        model = LoraSaver(self.adapter.model) if self.cfg.lora_r else self.adapter.model
        optimizer = self.optimizer.state_dict()
        if whole is not None:
            model, optimizer = _WithWeights(self.adapter.model, whole[0]), whole[1]
        path = save_checkpoint(self.out, state["step"], model, self.processor_dirs,
                               {"optimizer": optimizer}, state, keep=self.cfg.save_total_limit)
        self.saved_step = state["step"]
        return path

    def _resume(self, path: Path) -> None:
        state, opt = load_checkpoint_state(path)
        if state.get("world_size") != self.procs.world:
            raise ConfigError(f"{path} was written by {state.get('world_size')} processes; resume "
                              f"with the same number (now {self.procs.world})")
        if self.cfg.lora_r:
            load_lora(self.adapter.model, path)
        if self.procs.fsdp:
            self._load_sharded_optimizer(opt["optimizer"], path)
        else:
            self.optimizer.load_state_dict(opt["optimizer"])
        self.step = int(state["step"])
        self.nonfinite = int(state.get("nonfinite", 0))
        self.sampler.stream = PromptStream(len(self.rows), self.cfg.seed, **state["stream"])
        restore_rng(state["rng"], self.sampler.generator, self.procs.index)

    def _check_weights(self) -> None:
        """Stop, saving nothing of this step, when the update left a NaN or infinite weight."""
        with torch.no_grad():  # one device sync for all tensors
            local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]  # own shards
            finite = torch.stack([torch.isfinite(p).all() for p in local]).cpu()  # (P,)
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

    # ------------------------------------------------------------ fsdp only
    def _gathered_state(self) -> tuple:
        """(weights, optimizer state) of the sharded policy, whole on process 0's CPU (empty on
        the others), the optimizer state keyed by parameter index as `Optimizer.state_dict()`."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = self.adapter.model
        weights = get_model_state_dict(model, options=whole)
        by_name = get_optimizer_state_dict(model, self.optimizer, options=whole)
        if not self.procs.is_main:
            return weights, None
        index = {name: i for i, name in enumerate(self._parameter_names())}
        state = {index[name]: value for name, value in by_name["state"].items()}
        groups = [{**group, "params": [index[name] for name in group["params"]]}
                  for group in by_name["param_groups"]]
        return weights, {"state": state, "param_groups": groups}

    def _load_sharded_optimizer(self, saved: dict, path: Path) -> None:
        """A checkpoint's optimizer state (keyed by index, whole) into the sharded optimizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self._parameter_names()
        if len(saved.get("param_groups", [])) != len(self.optimizer.param_groups) or \
                sum(len(g["params"]) for g in saved["param_groups"]) != len(names):
            raise ConfigError(f"{path}: its optimizer state holds other parameters than this run trains")
        state = {names[i]: value for i, value in saved["state"].items()}
        groups = [{**group, "params": [names[i] for i in group["params"]]} for group in saved["param_groups"]]
        set_optimizer_state_dict(self.adapter.model, self.optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))

    def _parameter_names(self) -> list[str]:
        """The name of each optimized parameter, in the optimizer's index order."""
        names = {id(p): n for n, p in self.adapter.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]


class _WithWeights:
    """`save_pretrained` of `model` writing the given (gathered) weights instead of its own."""

    def __init__(self, model, weights: dict):
        self.model, self.weights = model, weights

    def save_pretrained(self, path, safe_serialization=True):
        # tied parameters (output layer = embedding) arrive gathered as two tensors; one tensor
        # under both names lets save_pretrained drop the alias as it does for the live model
        first = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if name in self.weights:
                self.weights[name] = self.weights[first.setdefault(id(p), name)]
        self.model.save_pretrained(path, state_dict=self.weights, safe_serialization=safe_serialization)
