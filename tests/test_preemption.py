"""Pre-emption under every launcher: a running 2-rank job that gets the stop signal (or finds a STOP file) finishes
its optimizer step, checkpoints, records the stop and exits; run again, it resumes and ends exactly where the
uninterrupted run ends (same losses per step, same exported weights)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from minima.distill import EXIT_REQUEUE
from tests.runs import launch

pytestmark = pytest.mark.slow

# (launcher, how the stop is requested, launcher flags). torchrun forwards SIGUSR1 only when told to, and gives the
# workers --shutdown_timeout seconds before SIGKILL; a terminal's Ctrl-C and SLURM signal the whole process group,
# which is how DeepSpeed's single-node runner must be signalled (it does not forward a signal sent to it alone).
CASES = [
    ("torchrun", "SIGUSR1", ["--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown_timeout=120"]),
    ("deepspeed", "SIGTERM to the group", []),
]
# The STOP file (what slurm/distill_3b.sh creates) is tested under srun and torchrun in tests/test_slurm.py.


def start_and_stop(args: list[str], out: Path, launcher: str, how: str, launcher_args=()) -> tuple[int, str]:
    """Start a run, signal it once both ranks are inside the job (engines built), wait for the exit."""
    proc = launch(args, launcher=launcher, background=True, launcher_args=launcher_args)
    log = out / "train.log"
    deadline = time.time() + 240
    while not (log.is_file() and " params (without input embedding)" in log.read_text()):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.2)
    if how == "SIGTERM to the group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(getattr(signal, how))
    output, _ = proc.communicate(timeout=180)
    return proc.returncode, output


def scalars(out: Path, tag: str, after: int = 0) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard")).Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars(tag) if e.step > after}


@pytest.mark.parametrize(("launcher", "how", "launcher_args"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_stop_checkpoints_and_resume_continues_as_uninterrupted(
    kd_run, kd_overrides, tmp_path, launcher, how, launcher_args
):
    out = tmp_path / "run"
    args = [*kd_overrides, f"run.out_dir={out}", "run.eval_every=1"]  # an evaluation is due at every step
    rc, _ = start_and_stop(args, out, launcher, how, launcher_args)
    text = (out / "train.log").read_text()
    assert rc != 0, "a stopped run must not look finished to the job script"
    stopped = json.loads((out / "stopped.json").read_text())
    assert 1 <= stopped["step"] < 6, stopped  # stopped at the first step boundary after the request
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped['step']:08d}"
    assert f"stop requested ({stopped['reason']})" in text and f"exiting with status {EXIT_REQUEUE}" in text
    assert stopped["reason"] == how.split()[0]
    assert stopped["save_seconds"] > 0 and not (out / "metrics.json").exists() and not (out / "STOP").exists()
    assert scalars(out, "val/loss") == {}, "the evaluation due at the stop's step must wait for the resumed run"

    launch(args)  # the same command again: resume=auto continues from the stop's checkpoint
    tag = f"step_{stopped['step']:08d}"
    assert f"resumed from {out / 'checkpoints' / tag}" in (out / "train.log").read_text()
    assert not (out / "stopped.json").exists()
    assert json.loads((out / "metrics.json").read_text())["step"] == 6
    assert scalars(out, "train/loss", stopped["step"]) == scalars(kd_run, "train/loss", stopped["step"])
    a = (kd_run / "export" / "model.safetensors").read_bytes()
    assert a == (out / "export" / "model.safetensors").read_bytes(), "the resumed run ended elsewhere"


def test_single_process_ctrl_c_exits_with_the_requeue_status(tiny_prepared_data, kd_overrides, tmp_path):
    """Without a launcher the rank's own status reaches the caller: 75 after a stop (here Ctrl-C's SIGINT)."""
    out = tmp_path / "single"
    args = [*kd_overrides, f"run.out_dir={out}", "run.tokens_per_step=256", "run.max_steps=50"]
    rc, output = start_and_stop(args, out, "python", "SIGINT")
    assert rc == EXIT_REQUEUE, output[-3000:]
    assert json.loads((out / "stopped.json").read_text())["reason"] == "SIGINT"
