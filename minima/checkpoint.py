"""Checkpoints you can trust, and resume on any number of GPUs.

Layout: ``<out_dir>/checkpoints/step_00000100/`` holds DeepSpeed's files (every rank's shard of the weights and the
optimizer) and ``minima_state.pt``, which rank 0 writes last, atomically, once every rank has finished: a directory
without it is incomplete, whatever else it holds. ``latest`` then names it (also written atomically), and only then
are old checkpoints pruned. A crash at any moment of a save, on any rank, leaves the previous checkpoint as the one
``run.resume=auto`` picks.

DeepSpeed loads a ZeRO checkpoint only on the data-parallel size it was saved on. On another size, rank 0 converts it
once with DeepSpeed's universal checkpoint tool (``deepspeed.checkpoint.ds_to_universal``) into
``step_.../universal/`` (atomically; reused if present) and the student engine is built with
``"checkpoint": {"load_universal": true}``. That is decided before any model is built (:func:`plan_resume`), so a
resume that cannot work is one message, not a traceback per rank.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minima.config import ConfigError
from minima.dist import barrier, from_rank0
from minima.files import fsync_dir, fsync_tree, write_atomic
from minima.models import causal_lm

if TYPE_CHECKING:
    import deepspeed
    from transformers import PretrainedConfig

CHECKPOINT_PREFIX = "step_"
MINIMA_STATE = "minima_state.pt"
LATEST = "latest"
UNIVERSAL = "universal"
_TAG = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")

log = logging.getLogger("minima")


def checkpoint_tag(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    """A checkpoint directory is complete once minima's state, its last file, is there."""
    return (path / MINIMA_STATE).is_file()


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """The ``step_*`` directories under ``ckpt_root``, oldest step first."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if _TAG.fullmatch(p.name) and p.is_dir()]
    return sorted(dirs, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


# ----------------------------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    engine: deepspeed.DeepSpeedEngine, ckpt_root: Path, step: int, state: dict, *, keep_last: int, is_main: bool
) -> Path:
    """Save the student engine (weights, optimizer, scheduler) and minima's ``state`` (collective call); then prune
    to the newest ``keep_last`` complete checkpoints. Returns the checkpoint directory."""
    path = ckpt_root / checkpoint_tag(step)
    if is_main and path.exists():
        # This step's directory from an earlier attempt (a crash mid-save, or a resume from an older checkpoint):
        # start clean, or its stale files (another world size's shards, a universal copy) would mix with the new ones.
        _remove_checkpoint(path)
    barrier()
    # Every rank writes its own files; DeepSpeed ends with a barrier, so all of them are written when it returns.
    engine.save_checkpoint(str(ckpt_root), tag=path.name, save_latest=False)
    if is_main:
        fsync_tree(path)  # DeepSpeed's files on disk before the marker that vouches for them
        full_state = {**state, "engine": engine_state(engine)}
        write_atomic(path / MINIMA_STATE, lambda f: torch.save(full_state, f))
        write_atomic(ckpt_root / LATEST, lambda f: f.write(path.name.encode()))
        prune_checkpoints(ckpt_root, keep_last=keep_last, newest=path)
    barrier()
    return path


def engine_state(engine: deepspeed.DeepSpeedEngine) -> dict[str, Any]:
    """What a resume needs beyond DeepSpeed's files: the layout it was saved under (data-parallel size, ZeRO stage,
    dtype, offload, the student's parameter shapes) and the torch optimizer's own param groups and step counters,
    which a universal load into ZeRO-3 gets wrong (see :func:`restore_optimizer`)."""
    base = engine.optimizer.optimizer  # the torch optimizer inside ZeRO's wrapper
    steps: list[float | None] = [None] * len(base.param_groups)
    for group, slot in _optimizer_slots(engine):
        if "step" in slot:
            steps[group] = float(slot["step"])
    zero = engine.config.get("zero_optimization", {})
    return {
        "dp_world_size": int(engine.dp_world_size),
        "zero_stage": int(engine.zero_optimization_stage()),
        "bf16": bool(engine.bfloat16_enabled()),
        "offload": _offloads(zero),
        "param_shapes": {n: list(getattr(p, "ds_shape", p.shape)) for n, p in causal_lm(engine).named_parameters()},
        "optimizer": {
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
            "steps": steps,
        },
    }


def prune_checkpoints(ckpt_root: Path, *, keep_last: int, newest: Path) -> list[Path]:
    """Delete checkpoints older than ``newest`` (complete) but the ``keep_last - 1`` newest complete ones, and the
    incomplete leftovers of crashed saves older than it. Newer directories are left alone. A deletion that fails is
    logged (path and error) and the rest go on; returns the directories that could not be deleted."""
    newest_step = int(newest.name.removeprefix(CHECKPOINT_PREFIX))
    older = [p for p in _step_dirs(ckpt_root) if int(p.name.removeprefix(CHECKPOINT_PREFIX)) < newest_step]
    complete = [p for p in older if is_complete(p)]
    kept = set(complete[max(0, len(complete) - (keep_last - 1)) :]) if keep_last > 1 else set()
    failed = []
    for path in older:
        if path in kept:
            continue
        try:
            _remove_checkpoint(path)
        except OSError as e:
            log.warning(f"could not delete the old checkpoint {path}: {e}; it is no longer needed, delete it by hand")
            failed.append(path)
    return failed


def _remove_checkpoint(path: Path) -> None:
    """Marker first, so a deletion interrupted half-way never leaves a directory that looks complete."""
    marker = path / MINIMA_STATE
    if marker.exists():
        marker.unlink()
        fsync_dir(path)
    shutil.rmtree(path)


# ----------------------------------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from


def find_checkpoint(out_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: none (``never``), the one ``latest`` names or else the newest complete one
    (``auto``), or an explicit directory, which must be complete. Never a directory without minima's state."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            what = "does not exist" if not path.exists() else f"has no {MINIMA_STATE} (an interrupted save?)"
            raise ConfigError(
                f"run.resume={resume}: {path} {what}, so it is not a complete minima checkpoint; give a directory"
                f" like <out_dir>/checkpoints/{checkpoint_tag(100)} that holds {MINIMA_STATE}, or run.resume=auto"
                " (the newest complete one) or never"
            )
        return path
    ckpt_root = out_dir / "checkpoints"
    complete = [p for p in _step_dirs(ckpt_root) if is_complete(p)]
    latest = ckpt_root / LATEST
    if not latest.is_file():
        if complete:
            log.warning(f"no {latest}: resuming from the newest complete checkpoint, {complete[-1]}")
        return complete[-1] if complete else None
    tag = latest.read_bytes()[:200].decode(errors="replace").strip()
    if not _TAG.fullmatch(tag):
        why = f"{latest} holds {tag!r}, not a checkpoint name"
    elif not (ckpt_root / tag).is_dir():
        why = f"{latest} names {tag}, which does not exist"
    elif not is_complete(ckpt_root / tag):
        why = f"{latest} names {tag}, which has no {MINIMA_STATE} (an interrupted save)"
    else:
        return ckpt_root / tag
    if complete:
        log.warning(f"{why}: resuming from the newest complete checkpoint, {complete[-1]}")
        return complete[-1]
    log.warning(f"{why}, and there is no complete checkpoint in {ckpt_root}: starting from scratch")
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Resuming, on the same or another number of GPUs


@dataclass(frozen=True)
class ResumePlan:
    """Where a run continues from, decided before any model is built."""

    path: Path
    """The checkpoint directory (``step_...``)."""
    state: dict
    """minima's state saved with it: step, tokens, loader position, config, the engine layout it was saved under."""
    universal: bool
    """Load DeepSpeed's universal conversion (``path/universal``): the data-parallel size changed."""


def plan_resume(
    out_dir: Path,
    resume: str,
    *,
    world_size: int,
    ds_config: dict,
    student_config: PretrainedConfig,
    is_main: bool,
    convert: bool = True,
) -> ResumePlan | None:
    """Which checkpoint to resume from and how (collective call). Rank 0 decides, checks that the checkpoint fits this
    run (the student's shapes, ZeRO stage, dtype; offload only on the same size), converts it to a universal
    checkpoint once when the data-parallel size changed (unless ``convert`` is off: a dry run), and tells every rank.
    A resume that cannot work raises ConfigError on every rank, naming the checkpoint and what to do."""

    def decide() -> ResumePlan | None:
        path = find_checkpoint(out_dir, resume)
        if path is None:
            return None
        state = torch.load(path / MINIMA_STATE, map_location="cpu", weights_only=True)
        universal = _needs_universal(path, state, world_size, ds_config, student_config)
        if universal and convert:
            convert_to_universal(path)
        return ResumePlan(path=path, state=state, universal=universal)

    return _decided_by_rank0(decide, is_main)


def resume_ds_config(ds_config: dict, plan: ResumePlan | None) -> dict:
    """The student engine's config for ``plan``: a universal load must be switched on before deepspeed.initialize."""
    if plan is None or not plan.universal:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def load_checkpoint(engine: deepspeed.DeepSpeedEngine, plan: ResumePlan) -> dict:
    """Restore weights, optimizer and scheduler into a freshly built engine (collective call); return minima's
    state. The engine must have been built with :func:`resume_ds_config`."""
    if engine.load_universal_checkpoint() != plan.universal:
        raise RuntimeError("the student engine was not built with resume_ds_config(ds_config, plan)")
    load_dir, tag = (plan.path, UNIVERSAL) if plan.universal else (plan.path.parent, plan.path.name)
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {load_dir / tag}")
    saved = plan.state.get("engine")
    if saved is not None:
        restore_optimizer(engine, saved["optimizer"])
    return plan.state


def restore_optimizer(engine: deepspeed.DeepSpeedEngine, saved: dict) -> None:
    """Put back each param group's hyperparameters and each flat tensor's own step counter.

    Loading a universal checkpoint into ZeRO-3 (deepspeed 0.19.8) copies the first param group's settings into every
    group (the no-decay group of norms and biases got weight_decay 0.1) and gives every sub-group the same ``step``
    tensor object, which the optimizer then increments once per sub-group per step (32 became 34 after one step).
    Harmless after a load that was already right.
    """
    base = engine.optimizer.optimizer
    if len(base.param_groups) != len(saved["param_groups"]):
        n_saved = len(saved["param_groups"])
        raise RuntimeError(f"the optimizer has {len(base.param_groups)} param groups, the checkpoint {n_saved}")
    for group, hyper in zip(base.param_groups, saved["param_groups"], strict=True):
        group.update(hyper)
    for group, slot in _optimizer_slots(engine):
        step = saved["steps"][group]
        if step is not None and "step" in slot:
            old = slot["step"]
            slot["step"] = old.new_tensor(step) if torch.is_tensor(old) else type(old)(step)  # a tensor of its own


def _optimizer_slots(engine: deepspeed.DeepSpeedEngine) -> list[tuple[int, dict]]:
    """(param group index, optimizer state) of every flat fp32 tensor the torch optimizer steps on this rank."""
    zero, base = engine.optimizer, engine.optimizer.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups, out of param_groups between steps
        flats = enumerate(zero.fp32_partitioned_groups_flat)
        return [(zero.sub_group_to_group_id[i], base.state[p]) for i, p in flats if p in base.state]
    return [(i, base.state[p]) for i, g in enumerate(base.param_groups) for p in g["params"] if p in base.state]


def _offloads(zero: dict) -> bool:
    return any(
        zero.get(k, {}).get("device", "none") not in ("none", None) for k in ("offload_optimizer", "offload_param")
    )


def _needs_universal(
    path: Path, state: dict, world_size: int, ds_config: dict, student_config: PretrainedConfig
) -> bool:
    """Whether ``path`` must go through a universal conversion for this run; ConfigError if it cannot be resumed."""
    saved = state.get("engine")
    if saved is None:
        log.warning(f"{path} predates minima's record of the engine layout: loading it as saved (same world size)")
        return False
    fresh = " or start afresh (run.resume=never, or another run.out_dir)"
    shapes = _param_shapes(student_config)
    if saved["param_shapes"] != shapes:
        diffs = [
            f"{n}: saved {saved['param_shapes'].get(n)}, now {shapes.get(n)}"
            for n in sorted(set(saved["param_shapes"]) | set(shapes))
            if saved["param_shapes"].get(n) != shapes.get(n)
        ]
        raise ConfigError(
            f"checkpoint {path} holds a student of another shape ({len(diffs)} tensors differ, e.g. {diffs[:3]}):"
            f" resume with the student it was trained with (its config is in {path / MINIMA_STATE}'s 'config'){fresh}"
        )
    zero = ds_config.get("zero_optimization", {})
    stage, saved_cfg = int(zero.get("stage", 0)), state.get("config", {}).get("run", {}).get("ds_config", "?")
    if saved["zero_stage"] != stage:
        raise ConfigError(
            f"checkpoint {path} was saved under ZeRO stage {saved['zero_stage']} (run.ds_config={saved_cfg}), this"
            f" run uses stage {stage}: a checkpoint resumes under the stage it was saved with; resume with"
            f" run.ds_config={saved_cfg}{fresh}"
        )
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    if saved["bf16"] != bf16:
        was, now = ("bf16", "fp32") if saved["bf16"] else ("fp32", "bf16")
        raise ConfigError(
            f"checkpoint {path} was saved with {was} engines, this run uses {now}: resume with"
            f" run.precision={was}{fresh}"
        )
    universal = saved["dp_world_size"] != world_size
    if universal and (saved["offload"] or _offloads(zero)):
        raise ConfigError(
            f"checkpoint {path} was saved on {saved['dp_world_size']} data-parallel ranks, this run has {world_size},"
            " and ZeRO-Offload is on: minima resumes on another number of GPUs only without offload (DeepSpeed's"
            f" universal loading is not verified with its CPU optimizer); resume on {saved['dp_world_size']} GPUs,"
            " or with a ds_config without offload_optimizer / offload_param on both sides"
        )
    return universal


def _param_shapes(config: PretrainedConfig) -> dict[str, list[int]]:
    """The student's parameter shapes, from a model on the meta device (nothing allocated, nothing initialised)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: list(p.shape) for n, p in model.named_parameters()}


def convert_to_universal(path: Path) -> Path:
    """DeepSpeed's universal checkpoint of ``path`` in ``path/universal`` (made once, atomically; reused)."""
    out = path / UNIVERSAL
    if (out / "zero" / "optimizer_state.pt").is_file():
        log.info(f"resuming on another number of ranks: reusing the universal checkpoint {out}")
        return out
    from deepspeed.checkpoint import ds_to_universal

    tmp = path / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    args = Namespace(
        input_folder=str(path),
        output_folder=str(tmp),
        # In-process and serial: worker processes forked from a rank that holds a process group are asking for trouble.
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # ZeRO-1/2 checkpoints of a plain (non-Megatron) model carry no universal_checkpoint_info; DeepSpeed's own
        # switch for that adds the default one.
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    (path / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's own pointer (to the tmp name): not used
    fsync_tree(tmp)
    tmp.rename(out)
    fsync_dir(path)
    log.info(f"converted {path} to a universal checkpoint in {out} ({time.perf_counter() - t0:.1f} s)")
    return out


def _decided_by_rank0(decide: Callable[[], Any], is_main: bool) -> Any:
    """``decide()`` on rank 0 only (it may convert a checkpoint), its result on every rank; whatever goes wrong there
    is a ConfigError on every rank (the traceback logged on rank 0). The wait may be long: a conversion of a large
    checkpoint can outlast NCCL's watchdog, so the result travels over a CPU group with a long timeout."""

    def guarded() -> Any:
        try:
            return decide()
        except ConfigError:
            raise
        except Exception as e:  # a failed conversion: the traceback here, a message on every rank
            log.exception("resuming failed")
            raise ConfigError(f"preparing the resume failed on rank 0: {type(e).__name__}: {e}") from None

    return from_rank0(guarded, is_main=is_main, timeout=timedelta(hours=3))
