"""Cross-process helpers of the trainer: sums, gathers, decisions, and how the policy is held.

Each helper is a no-op with one process, so the single-process path never touches
torch.distributed. Two ways to hold the policy over W processes (TrainConfig.sharding):

- ddp: accelerate wraps the training forward in DistributedDataParallel; every process keeps
  full parameters, gradients and optimizer state.
- fsdp: torch's FSDP2 (`fully_shard`): each decoder layer and vision block (the model's
  `_no_split_modules`) is one unit, the training forward (TokenScorer, in `_Copied`) the root
  holding the rest (embeddings, output layer, merger). Parameters, gradients and optimizer state are
  DTensors sharded over the W processes. Rollout, the engine's weight sync, checkpoints and
  the parameter checksum see full tensors (`full_parameters`, `full_tensor`).

accelerate's own FSDP (distributed_type FSDP) is refused, not mapped: it stops on CPU ("no
available devices found"), and on GPUs it would wrap the model its own way before our
sharding. Launch with torchrun or an accelerate DDP config and set `sharding: fsdp` instead.
DeepSpeed ZeRO-3 goes through accelerate and has NOT been run yet (no GPU so far).
Deliberately left out: anything about the loss; the trainer decides what to sum, this module
only moves the numbers and holds the shards.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from gpg_vlm.config import ConfigError


class ShardingError(ConfigError):
    """A launch that cannot shard the way the config asks (one line for the user)."""


class Processes:
    """The data-parallel processes of one run, seen through an `accelerate.Accelerator`."""

    def __init__(self, accelerator, sharding: str = "ddp"):
        from accelerate.utils import DistributedType

        self.acc = accelerator
        self.world = accelerator.num_processes
        self.index = accelerator.process_index
        self.is_main = accelerator.is_main_process
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ShardingError(
                "accelerate's FSDP launcher config is not used by gpg-vlm: launch with torchrun "
                "--nproc_per_node N (or accelerate launch --config_file configs/accelerate/ddp.yaml) "
                "and set sharding: fsdp in the training config")
        # one process holds everything: nothing to shard
        self.fsdp = sharding == "fsdp" and self.world > 1

    # ------------------------------------------------------------- numbers
    def sum(self, value):
        """`value` (int or float) summed over the processes, of the same type."""
        if self.world == 1:
            return value
        t = torch.tensor(float(value), dtype=torch.float64, device=self.acc.device)
        return type(value)(self.acc.reduce(t, reduction="sum").item())

    def gather_floats(self, value: float) -> list[float]:
        """Every process's `value`, in process order."""
        t = torch.tensor([value], dtype=torch.float64, device=self.acc.device)
        return self.acc.gather(t).tolist()

    def gather_objects(self, obj) -> list:
        """Every process's JSON-able `obj`, in process order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def main_decides(self, flag: bool) -> bool:
        """Process 0's decision, so that every process stops or saves at the same step."""
        if self.world == 1:
            return flag
        from accelerate.utils import broadcast_object_list

        return bool(broadcast_object_list([flag])[0])

    def wait(self) -> None:
        self.acc.wait_for_everyone()

    # ------------------------------------------------------ holding the policy
    def prepare(self, model, scorer, optimizer_of):
        """Wrap the training forward `scorer` (which calls `model`) for data parallelism and build
        the optimizer with `optimizer_of(params)` over the trainable parameters, after sharding
        (FSDP2 replaces the parameters with DTensors). Returns (scorer, optimizer, params)."""
        if not self.fsdp:
            params = [p for p in model.parameters() if p.requires_grad]
            scorer, optimizer = self.acc.prepare(scorer, optimizer_of(params))
            return scorer, optimizer, params
        from torch.distributed.fsdp import fully_shard

        units = set(getattr(model, "_no_split_modules", None) or ())
        blocks = [m for m in model.modules() if type(m).__name__ in units]
        if not blocks:
            raise ShardingError(f"sharding: fsdp found no decoder layer or vision block in "
                                f"{type(model).__name__} (its _no_split_modules: {sorted(units)})")
        for block in reversed(blocks):  # a unit inside another first; the root holds the rest
            fully_shard(block)
        scorer = fully_shard(_Copied(scorer))
        # FSDP2 takes the first unit to run forward as its root; rollout runs the model, not the
        # scorer, and would make a decoder layer the root. Settle the scorer as root now.
        scorer._get_fsdp_state()._lazy_init()
        params = [p for p in model.parameters() if p.requires_grad]
        return scorer, optimizer_of(params), params

    def no_sync(self, scorer, last: bool):
        """Around one micro-batch's backward: gradients are reduced over the processes only on
        the `last` one (earlier ones accumulate locally)."""
        if last:
            return nullcontext()
        if self.fsdp:
            return _without_gradient_sync(scorer)
        return self.acc.no_sync(scorer)

    def common_parts(self, parts: list) -> list[tuple]:
        """(micro-batch, real) pairs, as many on every process: under fsdp each training forward
        gathers every unit (a collective), so a process with fewer micro-batches runs its first
        one again as a dummy (`real` False) whose loss the trainer zeroes."""
        pairs = [(part, True) for part in parts]
        if not self.fsdp:
            return pairs
        most = int(max(self.gather_floats(float(len(parts)))))
        return pairs + [(parts[0], False)] * (most - len(parts))

    def clip_grad_norm(self, params, limit: float) -> float:
        """Clip to `limit`; returns the global gradient norm (equal on every process)."""
        norm = self.acc.clip_grad_norm_(params, limit)
        return float(full_tensor(norm))

    def full_parameters(self, wrapped, model):
        """Rollout needs every parameter on every process: gather them where they are sharded.

        DDP and ZeRO-2 keep full parameters (nothing to do). FSDP2: every unit is gathered and
        kept whole until the context ends, so that generation runs no collective and the
        processes may sample different numbers of tokens. ZeRO-3 follows DeepSpeed's documented
        API but has not been run yet. `wrapped` is the prepared training forward, `model` the
        policy model inside it.
        """
        if self.fsdp:
            return _gathered(wrapped)
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.DEEPSPEED and self.acc.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(model.parameters()))
        return nullcontext()


class _Copied(torch.nn.Module):
    """The FSDP2 root: the training forward, its log-probs returned as copies. FSDP2 hooks its
    pre-backward on the root's outputs, and those are views (b, T) of one (b, T, 1 or 2) tensor,
    where an in-place op would skip the hook (it warns so); a copy of (b, T) floats rules it out."""

    def __init__(self, scorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, *args, **kwargs):
        out = self.scorer(*args, **kwargs)  # (b, T) or ((b, T), (b, T))
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a sharded DTensor gathered (every process must call this together), else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _units(root) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextmanager
def _without_gradient_sync(root):
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


@contextmanager
def _gathered(root):
    """Every FSDP2 unit under `root` unsharded (full plain tensors) inside; sharded again after.

    Forward hooks would otherwise reshard each unit after its forward and gather it again at the
    next token: a collective per layer per token, which hangs once two processes stop sampling
    at different lengths. With resharding after forward off, those hooks find the unit whole
    and do nothing."""
    units = _units(root)
    with torch.no_grad():
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
    try:
        yield
    finally:
        for unit in units:  # FSDP2's defaults: the root keeps its parameters after forward
            unit.set_reshard_after_forward(unit is not root, recurse=False)
            unit.reshard()
