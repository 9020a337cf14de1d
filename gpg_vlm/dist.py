"""Cross-process helpers of the trainer: sums, gathers and decisions shared by every process.

Each helper is a no-op with one process, so the single-process path never touches
torch.distributed. Deliberately left out: anything about the model or the loss; the trainer
decides what to sum, this module only moves the numbers.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel


class Processes:
    """The data-parallel processes of one run, seen through an `accelerate.Accelerator`."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.world = accelerator.num_processes
        self.index = accelerator.process_index
        self.is_main = accelerator.is_main_process

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

    def full_parameters(self, wrapped, model):
        """Rollout needs every parameter on every process: gather them where they are sharded.

        DDP and ZeRO-2 keep full parameters (nothing to do). FSDP and ZeRO-3 shard them; the
        gathering below follows their documented APIs but has not been run on a GPU yet.
        `wrapped` is the module accelerate prepared, `model` the policy model inside it.
        """
        from accelerate.utils import DistributedType

        kind = self.acc.distributed_type
        if kind == DistributedType.FSDP:
            return FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)
        if kind == DistributedType.DEEPSPEED and self.acc.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(model.parameters()))
        return nullcontext()
