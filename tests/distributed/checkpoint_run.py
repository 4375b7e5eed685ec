"""minima.distill, unchanged, with what the checkpoint tests need to see from inside the run.

    torchrun --standalone --nproc_per_node N tests/distributed/checkpoint_run.py PROBE_DIR tiny_cpu key=value ...

Writes under PROBE_DIR (rank 0 unless said otherwise):
- ``windows_rank{r}.json``: a hash of every training window rank r drew, in order (which data each step consumed);
- ``saved_step{S}.pt``: the student's optimizer as it was when the checkpoint of step S was written (every
  parameter's whole fp32 master weight, exp_avg and exp_avg_sq, the param groups' hyperparameters, each flat tensor's
  step counter, the lr scheduler's state);
- ``loaded.pt``: the same, right after the resume loaded it; ``after_first_step.pt``: the step counters after the
  first optimizer step of the resumed run;
- ``pid_rank{r}``: each rank's process id (for kill -9 from outside).

CRASH=RANK:SAVE:EVENT[:torn] kills rank RANK with SIGKILL at its EVENT-th file write (torch.save or os.replace, counted
from 1) from the start of its SAVE-th checkpoint save on; with ``torn`` the file is half written first.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
from pathlib import Path

import torch

import minima.distill as distill

PROBE = Path(sys.argv[1])
RANK = int(os.environ.get("RANK", "0"))
WINDOWS: list[str] = []
SAVES = [0]  # checkpoint saves started on this rank
CRASH = os.environ.get("CRASH")


def optimizer_dump(engine) -> dict:
    """Whole fp32 weights and Adam moments by parameter name (collective under ZeRO-3), groups, counters, schedule."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from minima.checkpoint import _optimizer_slots

    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 (deepspeed 0.19.8) links each parameter's view of the optimizer state once, right after the first
        # param group's first step, when the other groups have no state yet: their exp_avg is then "not found in
        # optimizer state fragment". Link again, now that every group has its state (views only, no numbers change).
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    params = {}
    for name, p in engine.module.named_parameters():
        params[name] = {
            "fp32": safe_get_full_fp32_param(p).detach().cpu().clone(),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone(),
        }
    base = engine.optimizer.optimizer
    return {
        "params": params,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
        "steps": [(group, float(slot["step"])) for group, slot in _optimizer_slots(engine)],
        "step_tensor_ids": [id(slot["step"]) for _, slot in _optimizer_slots(engine)],
        "scheduler": engine.lr_scheduler.state_dict(),
    }


class RecordingLoader(distill.TokenWindowLoader):
    def __next__(self):
        batch = super().__next__()
        WINDOWS.extend(hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in batch.input_ids)
        return batch


real_save, real_load, real_step = distill.save_checkpoint, distill.load_checkpoint, distill.train_step
resumed = [False]


def save_checkpoint(engine, ckpt_root, step, state, **kwargs):
    SAVES[0] += 1
    path = real_save(engine, ckpt_root, step, state, **kwargs)
    dump = optimizer_dump(engine)
    if RANK == 0:
        torch.save(dump, PROBE / f"saved_step{step}.pt")
    return path


def load_checkpoint(engine, plan):
    state = real_load(engine, plan)
    dump = optimizer_dump(engine)
    if RANK == 0:
        torch.save(dump, PROBE / "loaded.pt")
    resumed[0] = True
    return state


def train_step(student, *args, **kwargs):
    out = real_step(student, *args, **kwargs)
    if resumed[0]:
        resumed[0] = False
        from minima.checkpoint import _optimizer_slots

        if RANK == 0:
            steps = [(g, float(s["step"])) for g, s in _optimizer_slots(student)]
            torch.save({"steps": steps}, PROBE / "after_first_step.pt")
    return out


def install_crash(spec: str) -> None:
    """SIGKILL this rank at its EVENT-th file write from the start of its SAVE-th checkpoint save on."""
    rank, save, event, *torn = spec.split(":")
    if int(rank) != RANK:
        return
    count = [0]

    def due() -> bool:
        if SAVES[0] < int(save):
            return False
        count[0] += 1
        return count[0] == int(event)

    def die(f=None, data: bytes | None = None):
        if torn and f is not None and data is not None:
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as out:
                    out.write(data[: len(data) // 2])
            else:
                f.write(data[: len(data) // 2])
                f.flush()
        print(f"CRASH: rank {RANK} killed at write {event} of save {save}{' (torn)' if torn else ''}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    real_torch_save, real_replace = torch.save, os.replace

    def crashing_save(obj, f, *args, **kwargs):
        if due():
            buf = io.BytesIO()
            real_torch_save(obj, buf, *args, **kwargs)
            die(f, buf.getvalue())
        return real_torch_save(obj, f, *args, **kwargs)

    def crashing_replace(src, dst):
        if due():
            die()
        return real_replace(src, dst)

    torch.save = crashing_save
    os.replace = crashing_replace


def main() -> int:
    PROBE.mkdir(parents=True, exist_ok=True)
    (PROBE / f"pid_rank{RANK}").write_text(str(os.getpid()))
    distill.TokenWindowLoader = RecordingLoader
    distill.save_checkpoint, distill.load_checkpoint, distill.train_step = save_checkpoint, load_checkpoint, train_step
    if CRASH:
        install_crash(CRASH)
    rc = distill.main(sys.argv[2:])
    (PROBE / f"windows_rank{RANK}.json").write_text(json.dumps(WINDOWS))
    return rc


if __name__ == "__main__":
    sys.exit(main())
