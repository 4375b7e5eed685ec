"""Everything that touches DeepSpeed: engine configs, model loading, the two engines, export (checkpoints are in
``minima.checkpoint``).

The teacher gets its own inference-only engine (no optimizer, no scheduler, eval mode, frozen, never checkpointed),
replicated on every GPU or ZeRO-3 sharded over the node or over all GPUs (``teacher.placement``); the student gets
AdamW, the warmup + cosine schedule and gradient clipping, under ZeRO stage 1, 2 or 3 (``run.ds_config``). Both run
``minima.models.HiddenStates`` around the transformers model, so what ``backward`` starts from is the engine's own
output. A ZeRO-3 model is built inside its own ``HfDeepSpeedConfig`` scope so transformers partitions it at
construction, and the scope is closed before the next model is built (a model built while another's ZeRO-3 scope is
alive is silently partitioned with the wrong config).
"""

from __future__ import annotations

import json
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

from minima.config import Config, ConfigError, Derived, ModelConfig
from minima.dist import init_deepspeed_comm
from minima.files import apply_umask
from minima.models import HiddenStates, build_model, has_weights
from minima.moe import moe_blocks, unused_shared_experts
from minima.optim import lr_lambda, param_groups

STUDENT_STAGES = (1, 2, 3)


def _common(bf16: bool) -> dict[str, Any]:
    return {"bf16": {"enabled": bf16}, "steps_per_print": 2**62, "wall_clock_breakdown": False}


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def student_ds_config(cfg: Config, derived: Derived, base: dict, bf16: bool, repeats: int = 1) -> dict[str, Any]:
    """The student engine's config: the JSON's engine settings (ZeRO stage 1, 2 or 3, buckets, offload) plus the keys
    minima derives (batch, clipping, precision). ``repeats``: forward/backward passes per micro-batch (MiniDisc's
    sandwich runs one per candidate), each an accumulation micro-step for DeepSpeed."""
    stage = zero_stage(base)
    if stage not in STUDENT_STAGES:
        raise ConfigError(
            f"run.ds_config={cfg.run.ds_config} sets zero_optimization.stage={stage}; the student engine needs ZeRO"
            " stage 1, 2 or 3 (ds_configs/zero1.json, zero2.json, zero3.json)"
        )
    config = {
        **base,
        **_common(bf16),
        **derived.ds_batch_keys(cfg.run.micro_batch_size),
        "gradient_clipping": cfg.optim.grad_clip,
    }
    config["gradient_accumulation_steps"] *= repeats
    config["train_batch_size"] *= repeats
    if bf16 and "data_types" not in base:
        # ZeRO accumulates gradients in the engine dtype unless told otherwise; over tens of micro-batches bf16
        # partial sums lose ~1e-2 relative. DeepSpeed's own setting keeps the accumulator in fp32 (at stage 1 it
        # selects its BF16 optimizer, which accumulates in fp32).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def teacher_ds_config(
    base: dict, placement: str, *, micro_batch_size: int, bf16: bool, gpus_per_node: int, path: str
) -> dict[str, Any]:
    """The teacher's inference engine config for a resolved placement (``replicated``, ``node`` or ``zero3``).

    ``base`` (``run.teacher_ds_config``) holds the ZeRO-3 settings of the sharded placements; a replicated teacher is
    a plain engine (stage 0) that keeps a whole copy per GPU. An inference engine still needs a micro-batch size; it
    never sees an optimizer or a scheduler.
    """
    zero = dict(base.get("zero_optimization", {}))
    if zero.get("stage", 3) != 3:
        raise ConfigError(
            f"run.teacher_ds_config={path} sets zero_optimization.stage={zero['stage']}: it holds the ZeRO-3 settings"
            " of the sharded teacher; choose how the teacher is spread with teacher.placement (replicated, node,"
            " zero3 or auto) instead"
        )
    if placement == "replicated":
        zero = {"stage": 0}
    elif placement == "node":
        # ZeRO++ hierarchical partitioning: a second shard of every weight over the GPUs of the node, from which
        # every all-gather is served, so the teacher's traffic never leaves the node.
        zero.update(stage=3, zero_hpz_partition_size=gpus_per_node)
    elif placement == "zero3":
        zero.update(stage=3)
    else:
        raise ValueError(f"unresolved teacher placement {placement!r}")
    rest = {k: v for k, v in base.items() if k != "zero_optimization"}
    common = _common(bf16)
    if placement == "replicated":
        # The weights are loaded in the compute dtype already. With bf16 on, DeepSpeed would wrap even an engine
        # without optimizer at stage 0 in its BF16 optimizer, which keeps fp32 master copies of every weight.
        common["bf16"] = {"enabled": False}
    return {**rest, "zero_optimization": zero, **common, "train_micro_batch_size_per_gpu": micro_batch_size}


def load_model(
    model: ModelConfig,
    config: PretrainedConfig,
    ds_config: dict,
    *,
    dtype: torch.dtype,
    attn_implementation: str,
    device: torch.device,
) -> PreTrainedModel:
    """Build a model for ``ds_config`` with transformers' own weight init: partitioned at construction under ZeRO-3,
    else whole, straight onto ``device``."""
    # zero.Init reads the world size from deepspeed.comm while checking the batch keys, before it would initialise
    # deepspeed.comm itself; wrap the process group that minima.dist created first, or it assumes a world of one.
    init_deepspeed_comm()
    if zero_stage(ds_config) != 3:
        built = build_model(model, config, dtype=dtype, attn_implementation=attn_implementation, device=device)
    else:
        hf_ds = HfDeepSpeedConfig(ds_config)  # transformers holds it weakly: keep it alive while building
        try:
            built = build_model(model, config, dtype=dtype, attn_implementation=attn_implementation)
        finally:
            del hf_ds
            unset_hf_deepspeed_config()
    if model.path is None or not has_weights(model.path):  # fresh init: an MoE's switched-off shared expert at 0
        off = unused_shared_experts(built)
        with deepspeed.zero.GatheredParameters(off, modifier_rank=0, enabled=bool(off) and zero_stage(ds_config) == 3):
            for p in off:
                p.data.zero_()
    return built


def init_teacher(model: PreTrainedModel, ds_config: dict) -> deepspeed.DeepSpeedEngine:
    """The frozen teacher: its own engine around :class:`HiddenStates` without optimizer or scheduler, in eval mode,
    no gradients; replicated (stage 0) or ZeRO-3 sharded, as ``ds_config`` says."""
    model.requires_grad_(False)
    _moe_blocks_as_zero3_leaves(model)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=HiddenStates(model), config=ds_config)
    # Under ZeRO-3 DeepSpeed puts its parameter manager (gather/release hooks, no state) where the optimizer would be.
    assert optimizer is None or isinstance(optimizer, DeepSpeedZeRoOffload), f"teacher engine got {type(optimizer)}"
    assert all(p.dtype == next(model.parameters()).dtype for p in model.parameters()), "mixed teacher dtypes"
    assert scheduler is None, "the teacher engine must not own a scheduler"
    engine.eval()
    return engine


def init_student(model: PreTrainedModel, cfg: Config, derived: Derived, ds_config: dict) -> deepspeed.DeepSpeedEngine:
    """The student engine around :class:`HiddenStates`: AdamW (decoupled decay on matrices), warmup + cosine
    schedule, clipping from the config."""
    if cfg.run.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _moe_blocks_as_zero3_leaves(model)
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
        model=HiddenStates(model),
        optimizer=optimizer,
        # a callable, so that the schedule drives the optimizer DeepSpeed wraps
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
    )
    engine.train()
    return engine


def _moe_blocks_as_zero3_leaves(model: PreTrainedModel) -> None:
    """Under ZeRO-3, gather each MoE block's parameters as one (DeepSpeed's leaf modules): which experts run depends
    on each rank's tokens, and ranks that fetched different expert parameters would wait on each other forever."""
    blocks = {type(block) for block in moe_blocks(model)}
    if blocks:
        deepspeed.utils.set_z3_leaf_modules(model, list(blocks))


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
# Export: a Hugging Face directory (safetensors + config + tokenizer) that AutoModelForCausalLM.from_pretrained loads.


def export_hf(
    engine: deepspeed.DeepSpeedEngine, out_dir: Path, tokenizer_dir: Path, *, is_main: bool, context: int, card: str
) -> None:
    """Gather the student layer by layer onto rank 0 and write it with ``save_pretrained`` (collective call), ready to
    generate: see :func:`_write_hf`."""
    lm = engine.module.lm  # the engine runs HiddenStates around the transformers model
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # also what accelerate uses under ZeRO-3
        if is_main:
            state_dict = {k.removeprefix("lm."): v for k, v in state_dict.items()}
    else:
        state_dict = lm.state_dict() if is_main else None
    if is_main:
        _write_hf(lm, state_dict, out_dir, tokenizer_dir, context=context, card=card)
    torch.distributed.barrier()


def export_hf_fp32(
    engine: deepspeed.DeepSpeedEngine, out_dir: Path, tokenizer_dir: Path, *, is_main: bool, context: int, card: str
) -> None:
    """The optimizer's fp32 master weights as a Hugging Face directory whose config says float32 (collective call).

    Read from the live engine with DeepSpeed's ``safe_get_full_fp32_param`` (what ``zero_to_fp32`` reconstructs from
    a ZeRO checkpoint, and also right for the BF16 optimizer that DeepSpeed uses at stage 1, whose checkpoints
    ``zero_to_fp32`` cannot read); one parameter at a time, gathered onto rank 0's host memory.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    lm = engine.module.lm
    state_dict = {}
    for name, param in lm.named_parameters():
        full = safe_get_full_fp32_param(param)  # a collective under ZeRO-3
        if full is None:  # no mixed precision: the parameter is its own master copy
            full = param.detach()
        if is_main:
            state_dict[name] = full.to("cpu", torch.float32, copy=True)
    if is_main:
        _write_hf(lm, state_dict, out_dir, tokenizer_dir, dtype="float32", context=context, card=card)
    torch.distributed.barrier()


def _write_hf(
    lm: PreTrainedModel,
    state_dict,
    out_dir: Path,
    tokenizer_dir: Path,
    dtype: str | None = None,
    *,
    context: int,
    card: str,
) -> None:
    """``save_pretrained`` + the tokenizer + the model card into a temporary directory, renamed into place when whole;
    permissions as the umask says (safetensors writes 0600).

    What generation needs out of the box: the pad and end-of-turn (EOS) ids in the config and the generation config
    (the tokenizer's pad token, else EOS), and the trained context as the tokenizer's ``model_max_length``.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = context
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lm.config.pad_token_id = pad
    if lm.generation_config is not None:
        lm.generation_config.pad_token_id = pad
        lm.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if dtype is not None:  # save_pretrained records the module's dtype; these tensors have another
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(card)
    apply_umask(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
