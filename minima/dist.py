"""The launcher's environment and torch.distributed, in one place.

Works under ``deepspeed --num_gpus N``, ``torchrun`` and SLURM (which export RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT), and as a single ``python -m`` process, for which it sets up a world of one itself.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    """Read the launcher's environment (or make a world of one) and initialise the process group.

    NCCL on GPUs, gloo on CPUs. On CPU-only machines it also selects DeepSpeed's CPU accelerator, which must happen
    before deepspeed is imported.
    """
    if "RANK" not in os.environ:  # a plain `python -m minima.distill`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # torchrun says LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE; a launcher that says neither runs one node.
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return World(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, local_world_size=local_world_size
    )


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


def shutdown() -> None:
    """Leave cleanly: without the barrier, ranks that exit early abort their peers' gloo sockets."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
