"""torchrun support: one process per device, DDP (gloo on CPU, nccl on GPU), only rank 0 writes.

torchrun's contract is its environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); it is read
here, once, by the command line, and passed down as a Dist.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from trainer.errors import TrainError

T = TypeVar("T")
LONG_WAIT = timedelta(hours=24)  # from_main: how long the other ranks wait for rank 0's work (the probe)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:  # one GPU per process: this rank's is cuda:LOCAL_RANK (device.resolve_device agrees)
        torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group(backend="gloo")
    return Dist(rank, world, local)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums VALUES over ranks (identity in a single process)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether FLAG holds on any rank (FLAG itself in a single process)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()



def from_main(work: Callable[[], T], timeout: timedelta = LONG_WAIT) -> T:
    """WORK's result on every rank, run by rank 0 alone while the others wait (the probe, before training).

    They wait in a gloo group of its own with TIMEOUT, not in a barrier of the training group: NCCL's
    watchdog ends a collective after 10 minutes, and a probe over a large dataset takes longer. When WORK
    fails on rank 0, the other ranks stop with its one-line reason instead of waiting."""
    if not dist.is_initialized():
        return work()
    group = dist.new_group(backend="gloo", timeout=timeout)  # every rank creates it, here, in the same order
    message: list[object] = [None]
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            message[0] = ("ok", work())
        except Exception as error:  # sent to the waiting ranks first, then raised here as it was
            failure, message[0] = error, ("failed", (str(error).splitlines() or [type(error).__name__])[0])
    try:
        dist.broadcast_object_list(message, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    status, value = message[0]  # type: ignore[misc]
    if status != "ok":
        raise TrainError(f"rank 0 failed before training started: {value}")
    return value  # type: ignore[return-value]
