"""Process-group set-up for `torchrun`: the same command runs on one CPU, one GPU, or many nodes.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process and nothing is
initialised. gloo is used on the CPU, nccl on CUDA GPUs (one GPU per local rank).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from clipengine.errors import BadInput

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes, and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World(), device
    world = World(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise BadInput(f"local rank {world.local_rank} has no GPU: start at most "
                           f"{torch.cuda.device_count()} processes per node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise BadInput(f"distributed training runs on cuda or cpu, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def mean_over_world(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a tensor over all processes (the tensor itself in a single process)."""
    if not world.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world.world_size


def on_main(compute: Callable[[], T], world: World) -> T:
    """`compute()` run on the main process only and its result given to every process; a `BadInput` it raises
    is raised on every process (so that none waits for the others at the next collective)."""
    result: list[Any] = [None, None]
    if world.is_main:
        try:
            result = [compute(), None]
        except BadInput as e:
            result = [None, str(e)]
    if world.distributed:
        dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise BadInput(result[1])
    return result[0]


def gathered(value: Any, world: World) -> list[Any]:
    """Every process's `value` (picklable), in rank order."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def teardown_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
