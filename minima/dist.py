"""The launcher's environment and torch.distributed, in one place.

Works under ``deepspeed --num_gpus N``, ``torchrun``, ``srun`` starting every rank (SLURM's variables) and as a
single ``python -m`` process, for which it sets up a world of one itself; ``minima.ranks`` says which is which.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from minima.ranks import LaunchError, ranks_from_env

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1
    """Ranks on this node (GPUs per node): what a node-local teacher shard is spread over."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world() -> World:
    """Read the launcher's or SLURM's environment (or make a world of one) and initialise the process group.

    NCCL on GPUs, gloo on CPUs. On CPU-only machines it also selects DeepSpeed's CPU accelerator, which must happen
    before deepspeed is imported. A job that would not form one world exits with a message (status 2), not a
    traceback per rank.
    """
    try:
        ranks = ranks_from_env(os.environ)
    except LaunchError as e:
        print(f"minima: launch error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ.update(ranks.env())  # torch.distributed and DeepSpeed read these
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world_size, local_rank = ranks.rank, ranks.world_size, ranks.local_rank
    if torch.cuda.is_available():
        # A site that binds one GPU to each srun task shows every task its GPU as cuda:0.
        index = local_rank if torch.cuda.device_count() > 1 else 0
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return World(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, local_world_size=ranks.local_world_size
    )


def init_deepspeed_comm() -> None:
    """Wrap the process group in ``deepspeed.comm`` (``zero.Init`` reads the world size from it); idempotent.

    On CPU, DeepSpeed's shared-memory all-reduce creates one 66 MiB segment per rank in /dev/shm and never removes
    it, so every run would leave its segments behind (gigabytes over a test suite, until /dev/shm is full). Every rank
    has mapped all of its peers' segments when the init returns; after a barrier each rank removes its own name, and
    the mappings live on until the process ends, however it ends.
    """
    import deepspeed

    if deepspeed.comm.is_initialized():
        return
    deepspeed.init_distributed()
    if not torch.cuda.is_available():
        barrier()
        with contextlib.suppress(FileNotFoundError):
            shm_segment(dist.get_rank()).unlink()


def shm_segment(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps ``rank``'s segment of this job (named by uid, master address and port)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
    return Path("/dev/shm") / f"{name}_{os.environ.get('MASTER_PORT', '')}_{rank}"


def all_reduce_sum(values: list[float | int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small vector over all ranks (float64, so token counts stay exact)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a small picklable object from ``src`` to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def from_rank0(compute: Callable[[], T], *, is_main: bool, timeout: timedelta = timedelta(minutes=30)) -> T:
    """``compute()`` on rank 0 only, its result on every rank; an exception raised there is raised on every rank.

    The others wait on a CPU (gloo) group of their own with ``timeout``: no GPU collective is pending meanwhile, so a
    long ``compute`` (converting a checkpoint) cannot trip NCCL's watchdog.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return compute()
    group = dist.new_group(backend="gloo", timeout=timeout)
    box: list[object] = [None]
    if is_main:
        try:
            box[0] = ("ok", compute())
        except Exception as e:
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0, group=group)
    dist.destroy_process_group(group)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def shutdown() -> None:
    """Leave cleanly: without the barrier, ranks that exit early abort their peers' gloo sockets."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
