"""Everything that touches DeepSpeed: engine configs, ZeRO-3 model loading, the two engines, checkpoints, export.

The teacher gets its own inference-only engine (no optimizer, no scheduler, eval mode, frozen, never checkpointed);
the student gets AdamW, the warmup + cosine schedule and gradient clipping. Both are ZeRO-3 sharded: each model is
built inside its own ``HfDeepSpeedConfig`` scope so transformers partitions it at construction, and the scope is
closed before the next model is built (a model built while another's ZeRO-3 scope is alive is silently partitioned
with the wrong config).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # must precede `import deepspeed`; gloo + CPU accelerator on CPU-only machines
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from minima.config import Config, Derived, ModelConfig
from minima.models import build_model
from minima.optim import lr_lambda, param_groups

CHECKPOINT_PREFIX = "step_"
MINIMA_STATE = "minima_state.pt"


def ds_configs(
    cfg: Config, derived: Derived, student_base: dict, teacher_base: dict, bf16: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The student's and the teacher's engine configs: JSON engine settings plus the keys minima derives."""
    common = {"bf16": {"enabled": bf16}, "steps_per_print": 2**62, "wall_clock_breakdown": False}
    student = {
        **student_base,
        **common,
        **derived.ds_batch_keys(cfg.run.micro_batch_size),
        "gradient_clipping": cfg.optim.grad_clip,
    }
    # An inference engine still needs a micro-batch size; it never sees an optimizer or a scheduler.
    teacher = {**teacher_base, **common, "train_micro_batch_size_per_gpu": cfg.run.micro_batch_size}
    return student, teacher


def load_model(
    model: ModelConfig, config: PretrainedConfig, ds_config: dict, *, dtype: torch.dtype, attn_implementation: str
) -> PreTrainedModel:
    """Build a model partitioned for ``ds_config`` at construction (ZeRO-3), with transformers' own weight init."""
    # zero.Init reads the world size from deepspeed.comm while checking the batch keys, before it would initialise
    # deepspeed.comm itself; wrap the process group that minima.dist created first, or it assumes a world of one.
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed()
    hf_ds = HfDeepSpeedConfig(ds_config)  # transformers holds it weakly: keep it alive while building
    try:
        return build_model(model, config, dtype=dtype, attn_implementation=attn_implementation)
    finally:
        del hf_ds
        unset_hf_deepspeed_config()


def init_teacher(model: PreTrainedModel, ds_config: dict) -> deepspeed.DeepSpeedEngine:
    """The frozen teacher: its own ZeRO-3 engine without optimizer or scheduler, in eval mode, no gradients."""
    model.requires_grad_(False)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, config=ds_config)
    # Under ZeRO-3 DeepSpeed puts its parameter manager (gather/release hooks, no state) where the optimizer would be.
    assert optimizer is None or isinstance(optimizer, DeepSpeedZeRoOffload), f"teacher engine got {type(optimizer)}"
    assert scheduler is None, "the teacher engine must not own a scheduler"
    engine.eval()
    return engine


def init_student(model: PreTrainedModel, cfg: Config, derived: Derived, ds_config: dict) -> deepspeed.DeepSpeedEngine:
    """The student engine: AdamW (decoupled decay on matrices), warmup + cosine schedule, clipping from the config."""
    if cfg.run.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = param_groups(model.named_parameters(), cfg.optim.weight_decay)
    opt_kwargs = {"lr": cfg.optim.lr, "betas": (cfg.optim.beta1, cfg.optim.beta2), "eps": cfg.optim.eps}
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed requires its own CPU Adam there (built on first use).
        optimizer = deepspeed.ops.adam.DeepSpeedCPUAdam(groups, adamw_mode=True, **opt_kwargs)
    else:
        # A client torch optimizer: no JIT-compiled optimizer op, fused kernel on GPUs.
        optimizer = torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **opt_kwargs)
    schedule = lr_lambda(derived.warmup_steps, derived.total_steps, cfg.optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # a callable, so that the schedule drives the optimizer DeepSpeed wraps
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
    )
    engine.train()
    return engine


@contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Whole parameters inside the block under ZeRO-3 (a no-op for ordinary ones).

    Used around the chunked loss and the backward that follows it: the loss reads the full output heads, and the
    student head's gradient, produced inside the block, is reduce-scattered by ZeRO-3's hooks as usual.
    """
    zero3 = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not zero3:
        yield
        return
    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
        yield


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: <out_dir>/checkpoints/step_00000100/ (DeepSpeed's files + minima_state.pt) and a 'latest' pointer that
# is written only once every rank has finished, so a crash mid-save never leaves 'latest' pointing at a partial one.


def checkpoint_tag(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def save_checkpoint(
    engine: deepspeed.DeepSpeedEngine, ckpt_root: Path, step: int, state: dict, *, keep_last: int, is_main: bool
) -> Path:
    """Save the student engine (weights, optimizer, scheduler) and minima's state; prune to the newest ``keep_last``."""
    tag = checkpoint_tag(step)
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"minima": state}, save_latest=False)
    if is_main:
        torch.save(state, ckpt_root / tag / MINIMA_STATE)
        tmp = ckpt_root / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_root / "latest")  # atomic: readers see the old tag or the new one
        tags = sorted(p.name for p in ckpt_root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(ckpt_root / old, ignore_errors=True)
    torch.distributed.barrier()
    return ckpt_root / tag


def find_checkpoint(out_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: the newest complete one (auto), none (never), or an explicit directory."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = out_dir / "checkpoints" / "latest"
        return latest.parent / latest.read_text().strip() if latest.is_file() else None
    path = Path(resume)
    if not (path / MINIMA_STATE).is_file():
        raise FileNotFoundError(
            f"run.resume={resume}: not a complete minima checkpoint (no {MINIMA_STATE}); give a directory like"
            f" <out_dir>/checkpoints/{checkpoint_tag(100)}, or run.resume=auto / never"
        )
    return path


def load_checkpoint(engine: deepspeed.DeepSpeedEngine, path: Path) -> dict:
    """Restore weights, optimizer and scheduler into a freshly initialised engine; return minima's state."""
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {path}")
    return client_state["minima"]


# ----------------------------------------------------------------------------------------------------------------------
# Export: a Hugging Face directory (safetensors + config + tokenizer) that AutoModelForCausalLM.from_pretrained loads.


def export_hf(engine: deepspeed.DeepSpeedEngine, out_dir: Path, tokenizer_dir: Path, *, is_main: bool) -> None:
    """Gather the student layer by layer onto rank 0 and write it with ``save_pretrained`` (collective call)."""
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # also what accelerate uses under ZeRO-3
    else:
        state_dict = engine.module.state_dict() if is_main else None
    if is_main:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    torch.distributed.barrier()
