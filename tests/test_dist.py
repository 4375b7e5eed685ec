"""Where a process's ranks come from: a launcher, a SLURM job step (srun starting every rank), or neither.

Pure functions of the environment; no process group is made.
"""

from __future__ import annotations

import pytest

from minima.ranks import LaunchError, Ranks, expand_hostlist, expand_tasks_per_node, ranks_from_env, slurm_master_port

# What sbatch's batch shell sees (no SLURM_STEP_* variables): not a job step.
BATCH_SHELL = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_TASKS_PER_NODE": "8(x2)",
    "SLURM_NNODES": "2",
}


def step(procid: int, localid: int, nodeid: int, tasks_per_node: str = "8(x2)", ntasks: int = 16) -> dict[str, str]:
    """What srun exports to one task of a step inside that job (it keeps the job's variables)."""
    return {
        **BATCH_SHELL,
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
    }


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("node7", ["node7"]),
        ("a1,b2", ["a1", "b2"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("gpu-[1,3],login", ["gpu-1", "gpu-3", "login"]),
        ("", []),
    ],
)
def test_hostlist_expands_like_scontrol(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_bad_hostlist_is_a_clear_error():
    with pytest.raises(LaunchError, match=r"host list 'gpu\[3-1\]'"):
        expand_hostlist("gpu[3-1]")


@pytest.mark.parametrize(("text", "counts"), [("8(x2)", [8, 8]), ("2,1", [2, 1]), ("4(x2),2", [4, 4, 2]), ("1", [1])])
def test_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


def test_no_launcher_no_slurm_is_a_world_of_one():
    assert ranks_from_env({}) == Ranks(0, 1, 0, 1, "127.0.0.1", None, "single")
    assert ranks_from_env({"MASTER_PORT": "1234"}).master_port == 1234


def test_batch_shell_is_not_rank_0_of_its_tasks():
    """sbatch's shell has SLURM_NTASKS=16 and SLURM_PROCID=0 but no SLURM_STEP_NUM_TASKS: joining a world of 16 there
    would wait forever for peers nobody starts."""
    assert ranks_from_env(BATCH_SHELL).world_size == 1


def test_step_of_one_task_is_a_world_of_one():
    env = step(0, 0, 0, tasks_per_node="1", ntasks=1)
    assert ranks_from_env(env) == Ranks(0, 1, 0, 1, "127.0.0.1", None, "single")


def test_srun_ranks_from_slurm_variables():
    r = ranks_from_env(step(procid=11, localid=3, nodeid=1))
    assert r == Ranks(11, 16, 3, 8, "gpu07", slurm_master_port("4242"), "slurm")
    assert r.env() == {
        "RANK": "11",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(slurm_master_port("4242")),
    }


def test_uneven_tasks_per_node():
    r = ranks_from_env(step(procid=2, localid=0, nodeid=1, tasks_per_node="2,1", ntasks=3))
    assert (r.rank, r.world_size, r.local_rank, r.local_world_size) == (2, 3, 0, 1)


def test_exported_master_wins_over_the_node_list():
    env = {**step(0, 0, 0), "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "23456"}
    r = ranks_from_env(env)
    assert (r.master_addr, r.master_port) == ("10.0.0.7", 23456)


def test_master_port_is_the_same_on_every_task_and_differs_between_jobs():
    ports = {ranks_from_env(step(p, p % 8, p // 8)).master_port for p in range(16)}
    assert len(ports) == 1
    assert slurm_master_port("4242") != slurm_master_port("4243")
    assert all(10000 <= slurm_master_port(str(j)) < 32768 for j in (0, 1, 19999, 20000, 987654321))


def test_job_nodelist_when_the_step_has_none():
    env = step(0, 0, 0)
    del env["SLURM_STEP_NODELIST"]
    env["SLURM_JOB_NODELIST"] = "cn[100-101]"
    assert ranks_from_env(env).master_addr == "cn100"


def test_launcher_variables_win():
    """torchrun under `srun --ntasks-per-node=1`: one launcher per node, its ranks are the ones that count."""
    env = {
        **step(1, 0, 1, tasks_per_node="1(x2)", ntasks=2),
        "RANK": "13",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "LOCAL_WORLD_SIZE": "8",
        "GROUP_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "29400",
    }
    assert ranks_from_env(env) == Ranks(13, 16, 5, 8, "gpu07", 29400, "launcher")


def test_deepspeed_launcher_local_size():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert ranks_from_env(env).local_world_size == 2


@pytest.mark.parametrize(
    "launcher",
    [
        # srun --ntasks 8 torchrun --standalone --nproc_per_node 1: every task its own world of one
        {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "GROUP_WORLD_SIZE": "1"},
        # srun --ntasks 8 torchrun --standalone --nproc_per_node 8: eight worlds of 8 on the same GPUs
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "GROUP_WORLD_SIZE": "1"},
        # a launcher (or a user's export) saying WORLD_SIZE=1 in a step of several tasks
        {"RANK": "0", "WORLD_SIZE": "1"},
    ],
)
def test_tasks_that_would_be_separate_worlds_are_refused(launcher):
    env = {**step(0, 0, 0, tasks_per_node="8", ntasks=8), **launcher}
    with pytest.raises(LaunchError, match=r"8 tasks .* separate runs into one out_dir.*--ntasks-per-node=1"):
        ranks_from_env(env)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"SLURM_STEP_TASKS_PER_NODE": "8"}, "inconsistent SLURM step"),
        ({"SLURM_NODEID": "2"}, "inconsistent SLURM step"),
        ({"SLURM_LOCALID": "8"}, "inconsistent SLURM step"),
        ({"SLURM_PROCID": "16"}, "SLURM_PROCID=16 outside"),
        ({"SLURM_PROCID": "x"}, r"SLURM_PROCID='x' .* integer"),
        ({"SLURM_STEP_TASKS_PER_NODE": "eight"}, "tasks per node 'eight'"),
    ],
)
def test_inconsistent_step_is_a_clear_error(change, match):
    with pytest.raises(LaunchError, match=match):
        ranks_from_env({**step(0, 0, 0), **change})


def test_init_world_exits_with_the_message(monkeypatch, capsys):
    from minima import dist

    monkeypatch.setattr(dist.os, "environ", {**step(0, 0, 0), "RANK": "0", "WORLD_SIZE": "1"})
    with pytest.raises(SystemExit) as exit_info:
        dist.init_world()
    assert exit_info.value.code == 2
    assert "minima: launch error: this srun step has 16 tasks" in capsys.readouterr().err
