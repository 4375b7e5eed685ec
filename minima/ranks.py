"""Where this process's ranks come from, read from the environment before any process group exists (pure; no
torch import, so that `python -m minima.ranks hostnames LIST`, slurm/launch.sh's stand-in for scontrol, starts at
once).

First match wins (``ranks_from_env``):

1. a launcher: ``torchrun`` / ``deepspeed`` export RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT);
2. a SLURM job step without a launcher (``srun python -m minima.distill ...``, srun starting every rank): SLURM's
   SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID / SLURM_NODEID / SLURM_STEP_TASKS_PER_NODE, the master is the
   first host of SLURM_STEP_NODELIST (or MASTER_ADDR when exported), the port MASTER_PORT or one derived from
   SLURM_JOB_ID;
3. anything else (a single ``python -m`` process, a batch shell, a step of one task): a world of one.

What makes an environment a job step is SLURM_STEP_NUM_TASKS, which srun sets for every task it starts and sbatch /
salloc do not. A batch shell also has SLURM_NTASKS and SLURM_PROCID=0, but treating it as rank 0 of SLURM_NTASKS would
wait forever for peers that nobody starts: a process there (not under srun) is a world of one.

A step whose tasks would each become a world of one, or several worlds (``srun --ntasks 8 torchrun --standalone
--nproc_per_node 1 ...``), is refused with a message saying what to run instead.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import product


class LaunchError(RuntimeError):
    """The environment describes a job that cannot form one world (e.g. every srun task a world of one)."""


@dataclass(frozen=True)
class Ranks:
    """What the environment says about this process's place, before any process group exists."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int | None
    """None for a world of one: any free port will do."""
    source: str
    """'launcher', 'slurm' or 'single'."""

    def env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// initialisation (and DeepSpeed) read."""
        out = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
        }
        if self.master_port is not None:
            out["MASTER_PORT"] = str(self.master_port)
        return out


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list, expanded in order: ``gpu[01-03,07],cpu5`` -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Ranges keep the zero padding of their lower bound; several brackets in one name multiply
    (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2), as ``scontrol show hostnames`` does.
    """
    hosts: list[str] = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        pieces: list[list[str]] = []
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", name):
            if text:
                pieces.append([text])
            if ranges:
                pieces.append(_expand_ranges(ranges, hostlist))
        hosts += ["".join(p) for p in product(*pieces)]
    return hosts


def _expand_ranges(ranges: str, hostlist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise LaunchError(f"cannot read the SLURM host list {hostlist!r}: bad range {part!r}")
        out += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def expand_tasks_per_node(tasks_per_node: str) -> list[int]:
    """SLURM's tasks (or CPUs) per node, one count per node: ``8(x2)`` -> [8, 8]; ``2,1`` -> [2, 1]."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchError(f"cannot read SLURM's tasks per node {tasks_per_node!r}")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts


def slurm_master_port(job_id: str | None) -> int:
    """The port a SLURM job uses when MASTER_PORT is not exported: the same on every node, different for jobs that
    may share a node, and below Linux's ephemeral range (32768+). slurm/launch.sh derives the same number."""
    return 10000 + int(job_id) % 20000 if job_id and job_id.isdigit() else 29500


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise LaunchError(f"{key}={env.get(key)!r} in the environment: expected an integer") from None


def ranks_from_env(env: Mapping[str, str]) -> Ranks:
    """This process's ranks from the environment of a launcher, a SLURM job step or neither (see the module text).

    Pure: reads ``env``, sets nothing. Raises LaunchError for a job step that would not form one world.
    """
    step_tasks = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else None
    if "RANK" in env:  # a launcher's own variables win
        rank, world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        # torchrun exports GROUP_WORLD_SIZE (its agents: nodes); srun starting more copies of the launcher than that
        # makes independent worlds that share GPUs and out_dir.
        launchers = _int(env, "GROUP_WORLD_SIZE") if "GROUP_WORLD_SIZE" in env else world_size
        if step_tasks is not None and step_tasks > 1 and min(world_size, launchers) < step_tasks:
            raise LaunchError(
                f"this srun step has {step_tasks} tasks but each started a launcher whose world has"
                f" {world_size} rank(s) on {launchers} node(s): they would train {step_tasks} separate runs into one"
                " out_dir. Either let srun start every rank (no launcher: `srun --ntasks-per-node=GPUS python -m"
                " minima.distill ...`), or start one launcher per node that knows the others (`srun"
                " --ntasks-per-node=1 torchrun --nnodes $SLURM_NNODES --node_rank $SLURM_NODEID --nproc_per_node GPUS"
                " --master_addr HOST --master_port PORT -m minima.distill ...`); slurm/launch.sh does both."
            )
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        # torchrun says LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE; a launcher that says neither runs one node.
        local_key = next((k for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if k in env), None)
        local_world_size = _int(env, local_key) if local_key else world_size
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
        return Ranks(
            rank, world_size, local_rank, local_world_size, env.get("MASTER_ADDR", "127.0.0.1"), port, "launcher"
        )
    if step_tasks is None or step_tasks == 1:  # not a job step (a batch shell is not one), or a step of one task
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
        return Ranks(0, 1, 0, 1, "127.0.0.1", port, "single")

    rank, local_rank, node = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID"), _int(env, "SLURM_NODEID")
    per_node_key = next((k for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if k in env), None)
    if per_node_key is None:
        raise LaunchError("a SLURM job step without SLURM_STEP_TASKS_PER_NODE: cannot tell the ranks per node")
    per_node = expand_tasks_per_node(env[per_node_key])
    if sum(per_node) != step_tasks or not 0 <= node < len(per_node) or not 0 <= local_rank < per_node[node]:
        raise LaunchError(
            f"inconsistent SLURM step: SLURM_STEP_NUM_TASKS={step_tasks}, {per_node_key}={env[per_node_key]!r},"
            f" SLURM_NODEID={node}, SLURM_LOCALID={local_rank}"
        )
    if not 0 <= rank < step_tasks:
        raise LaunchError(f"SLURM_PROCID={rank} outside a step of {step_tasks} tasks")
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        keys = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        hosts = expand_hostlist(next((env[k] for k in keys if env.get(k)), ""))
        if not hosts:
            raise LaunchError("a SLURM job step without a node list (SLURM_STEP_NODELIST) nor MASTER_ADDR")
        master_addr = hosts[0]
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_master_port(env.get("SLURM_JOB_ID"))
    return Ranks(rank, step_tasks, local_rank, per_node[node], master_addr, port, "slurm")


if __name__ == "__main__":  # `python -m minima.ranks hostnames LIST`: slurm/launch.sh's stand-in for scontrol
    if len(sys.argv) != 3 or sys.argv[1] != "hostnames":
        sys.exit("usage: python -m minima.ranks hostnames HOSTLIST")
    print("\n".join(expand_hostlist(sys.argv[2])))
