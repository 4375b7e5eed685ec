"""Student initialisation by structured pruning of the teacher (MiniMA): every student weight is a teacher weight.

    python tools/prune_to_student.py --teacher /models/Llama-2-7b-hf --target runs/size/config.json \\
        --calib /data/minima-pretrain/train --out /ckpt/minima-3b-init

1. **Importance** of every head, FFN neuron, hidden dimension and layer, measured on calibration windows by
   ``minima.importance`` (mask gradients, per-layer L2 normalisation, block influence; see its docstring).
2. **Layers.** ``symmetric`` (MiniMA) drops ``d = L_teacher - L_student`` layers from both ends, keeping
   ``layers[d // 2 : L_teacher - (d - d // 2)]``: an odd difference drops its extra layer at the output end, which
   keeps the earliest layers, the ones every later layer builds on. ``importance`` drops the layers of least
   *block influence* (ShortGPT): those that change the residual stream least.
3. **Heads (GQA).** Query heads come in ``K`` groups of ``g = H / K`` sharing a kv head. A target of ``h`` heads and
   ``k`` kv heads keeps ``h / k`` query heads per kept kv head, which needs ``k | h`` and ``h / k <= g``. Each group
   first picks its ``h / k`` most important query heads; then the ``k`` groups whose picked heads have the largest
   summed importance are kept. So a target with fewer kv heads at the teacher's ratio keeps whole groups (ranked by
   group importance), and a target that keeps all kv heads selects query heads within each group.
4. **Widths.** Each kept layer keeps its top ``ffn`` neurons; one set of ``hidden`` dimensions is shared by the whole
   residual stream (embeddings, every projection's input or output side, the norms, the output head). Every kept
   index list is in ascending original order, so pruning to the teacher's own shape gives back the teacher exactly.

Runs on one device, or under DeepSpeed ZeRO-3 (``zero3=True`` under a launcher) for a teacher that does not fit one:
each rank takes every ``world_size``-th calibration batch with the teacher sharded, the importance sums are added
over ranks, and all ranks gather one module at a time while rank 0 slices it and writes the student. The weights
are written in the teacher's stored dtype (computing in fp32, the default, keeps them exact).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from minima.config import ModelConfig, load_ds_config
from minima.files import apply_umask
from minima.importance import Importance, Shape, accumulate_importance, calibration_batches, normalised
from minima.models import check_vocab, choose_attn_implementation, has_weights
from minima.shards import TokenShards

FAMILY = ("llama", "mistral", "qwen2")
"""Model types with LLaMA's module layout (q/k/v/o_proj, gate/up/down_proj, RMSNorms); qwen2 adds q/k/v biases."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PruneError(ValueError):
    """A teacher, target or option that cannot be pruned as asked; the message names the value and what to do."""


def read_target(path: str | Path) -> Shape:
    """The target shape from a transformers ``config.json``, given as the file or the directory holding it."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise PruneError(f"target {path}: no config.json there; give a transformers config.json file or its directory")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise PruneError(f"target {file} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise PruneError(f"target {file} must hold a JSON object (a transformers config), got {type(raw).__name__}")
    return shape_of(raw, where=f"target {file}")


def shape_of(config: PretrainedConfig | dict[str, Any], where: str) -> Shape:
    """``Shape.of``, with a missing size reported as a PruneError (the error the tool reports)."""
    try:
        return Shape.of(config, where)
    except ValueError as e:
        raise PruneError(str(e)) from None


def check_target(teacher: Shape, target: Shape, where: str = "target") -> Shape:
    """Validate ``target`` against ``teacher`` before any work; returns it with the teacher's head_dim filled in."""
    names = {
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "ffn": "intermediate_size",
    }
    for field, key in names.items():
        want, have = getattr(target, field), getattr(teacher, field)
        if want < 1 or want > have:
            raise PruneError(
                f"{where} {key}={want} is not in [1, {have}] (the teacher's {key}): pruning only removes units"
            )
    if target.head_dim is not None and target.head_dim != teacher.head_dim:
        raise PruneError(
            f"{where} head_dim={target.head_dim} differs from the teacher's {teacher.head_dim}: pruning keeps whole"
            f" heads, so set head_dim: {teacher.head_dim} in the target (or hidden_size = heads * {teacher.head_dim})"
        )
    if target.heads % target.kv_heads:
        raise PruneError(
            f"{where} num_attention_heads={target.heads} is not a multiple of num_key_value_heads={target.kv_heads}"
        )
    group = teacher.heads // teacher.kv_heads
    if target.heads // target.kv_heads > group:
        raise PruneError(
            f"{where} has {target.heads // target.kv_heads} query heads per kv head (num_attention_heads="
            f"{target.heads}, num_key_value_heads={target.kv_heads}) but the teacher's groups hold {group}: a kept kv"
            f" head keeps only its own query heads; use num_key_value_heads >= {math.ceil(target.heads / group)}"
        )
    return Shape(**{**asdict(target), "head_dim": teacher.head_dim})


# ----------------------------------------------------------------------------------------------------------------------
# Selection: importances -> kept indices, all in ascending teacher order.


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores (ties to the lower index), returned in ascending order."""
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return sorted(order.tolist())


def select_layers(teacher_layers: int, keep: int, method: str, influence: torch.Tensor | None = None) -> list[int]:
    """Kept teacher layers: ``symmetric`` (the middle, an odd extra dropped at the output end) or ``importance``
    (the ``keep`` layers of largest block influence, ``influence`` (L,))."""
    drop = teacher_layers - keep
    if method == "symmetric":
        front = drop // 2
        return list(range(front, teacher_layers - (drop - front)))
    if method == "importance":
        return top_k(influence, keep)
    raise PruneError(f"layer selection {method!r} is not one of ['symmetric', 'importance']")


def select_heads(scores: torch.Tensor, kv_heads: int, keep_heads: int, keep_kv: int) -> tuple[list[int], list[int]]:
    """(kept query heads, kept kv heads) of one layer from its (H,) head importances; the GQA rule of the module
    docstring: each group's best ``keep_heads / keep_kv`` heads, then the ``keep_kv`` groups whose picks sum highest."""
    group = scores.numel() // kv_heads
    per_group = keep_heads // keep_kv
    picks = [top_k(scores[j * group : (j + 1) * group], per_group) for j in range(kv_heads)]
    group_scores = torch.stack([scores[j * group : (j + 1) * group][p].sum() for j, p in enumerate(picks)])
    kept_kv = top_k(group_scores, keep_kv)
    return [j * group + i for j in kept_kv for i in picks[j]], kept_kv


@dataclass
class Plan:
    """What the student keeps, in teacher numbering; every list ascending. Per-layer lists follow ``layers``."""

    layers: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    neurons: list[list[int]]
    hidden: list[int]


def make_plan(imp: Importance, teacher: Shape, target: Shape, layer_selection: str) -> Plan:
    """Select layers, heads, neurons and hidden dimensions from summed importances."""
    influence = 1.0 - imp.cos_sum / max(imp.tokens, 1)
    layers = select_layers(teacher.layers, target.layers, layer_selection, influence)
    heads, neurons = normalised(imp.heads), normalised(imp.neurons)
    picked = [select_heads(heads[i], teacher.kv_heads, target.heads, target.kv_heads) for i in layers]
    return Plan(
        layers=layers,
        heads=[q for q, _ in picked],
        kv_heads=[kv for _, kv in picked],
        neurons=[top_k(neurons[i], target.ffn) for i in layers],
        hidden=top_k(imp.hidden, target.hidden),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Slicing the teacher's weights into the student's.


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of whole units of ``size`` rows (heads of ``head_dim``), e.g. heads [1, 3] of 2 -> [2, 3, 6, 7]."""
    return (torch.tensor(units, dtype=torch.long)[:, None] * size + torch.arange(size)).flatten()


def _take(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if cols is not None:
        t = t.index_select(1, cols.to(t.device))
    return t


def slice_layer(
    params: dict[str, torch.Tensor], q_rows: torch.Tensor, kv_rows: torch.Tensor, neurons: torch.Tensor, hidden
) -> dict[str, torch.Tensor]:
    """One decoder layer's parameters (names relative to the layer) cut to the kept heads, neurons and hidden dims."""
    rules = {  # name -> (rows, columns) of the teacher tensor to keep
        "self_attn.q_proj": (q_rows, hidden),
        "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden),
        "self_attn.o_proj": (hidden, q_rows),
        "mlp.gate_proj": (neurons, hidden),
        "mlp.up_proj": (neurons, hidden),
        "mlp.down_proj": (hidden, neurons),
        "input_layernorm": (hidden, None),
        "post_attention_layernorm": (hidden, None),
    }
    out = {}
    for name, tensor in params.items():
        module, _, kind = name.rpartition(".")
        if module not in rules:
            raise PruneError(f"decoder-layer parameter {name!r} is not part of the LLaMA-family layout {list(rules)}")
        rows, cols = rules[module]
        out[name] = _take(tensor, rows, cols if kind == "weight" else None)  # a bias lies along the output side
    return out


def student_config(teacher_config: PretrainedConfig, target: Shape, layers: list[int]) -> PretrainedConfig:
    """The teacher's config with the student's sizes; per-layer fields (``layer_types``) follow the kept ``layers``.

    Raises PruneError when transformers refuses the sizes (e.g. LlamaConfig wants hidden_size divisible by
    num_attention_heads even with an explicit head_dim); called once before the importance pass so that this fails
    in seconds, not after it.
    """
    fields = teacher_config.to_dict()
    fields.update(
        num_hidden_layers=target.layers,
        hidden_size=target.hidden,
        num_attention_heads=target.heads,
        num_key_value_heads=target.kv_heads,
        intermediate_size=target.ffn,
        head_dim=target.head_dim,  # explicit: hidden / heads need not equal the teacher's head size
    )
    if fields.get("layer_types") is not None:
        fields["layer_types"] = [fields["layer_types"][i] for i in layers]
    try:
        return type(teacher_config).from_dict(fields)
    except Exception as e:  # transformers validates with ValueError or huggingface_hub's strict-dataclass errors
        reason = str(e.__cause__ or e).strip().rstrip(".")
        raise PruneError(
            f"transformers refuses a {teacher_config.model_type} student with num_hidden_layers={target.layers},"
            f" hidden_size={target.hidden}, num_attention_heads={target.heads}, num_key_value_heads={target.kv_heads},"
            f" intermediate_size={target.ffn}, head_dim={target.head_dim}: {reason}; choose sizes that"
            f" {type(teacher_config).__name__} accepts"
        ) from None


def student_state_dict(
    model: torch.nn.Module, plan: Plan, shape: Shape, out_dtype: torch.dtype, *, gathered, is_main: bool
) -> dict[str, torch.Tensor] | None:
    """The student's weights (on CPU, in ``out_dtype``) cut from ``model``, one module at a time.

    Under ZeRO-3 every rank must call this (``gathered`` is collective); only rank 0 keeps the slices.
    """
    decoder = model.get_decoder()
    hidden = torch.tensor(plan.hidden, dtype=torch.long)
    state: dict[str, torch.Tensor] = {}

    def cut(prefix: str, module: torch.nn.Module, slicer: Callable[[dict], dict]) -> None:
        params = dict(module.named_parameters())
        with gathered(list(params.values())):
            if is_main:
                for name, t in slicer({n: p.detach() for n, p in params.items()}).items():
                    state[f"{prefix}{name}"] = t.to("cpu", out_dtype).clone()

    cut("model.embed_tokens.", decoder.embed_tokens, lambda p: {"weight": _take(p["weight"], None, hidden)})
    layers = tqdm(
        list(enumerate(plan.layers)), desc="writing layers", unit="layer", file=sys.stderr, disable=not is_main
    )
    for i, teacher_layer in layers:
        q_rows, kv_rows = _rows(plan.heads[i], shape.head_dim), _rows(plan.kv_heads[i], shape.head_dim)
        neurons = torch.tensor(plan.neurons[i], dtype=torch.long)
        cut(
            f"model.layers.{i}.",
            decoder.layers[teacher_layer],
            lambda p, q=q_rows, kv=kv_rows, n=neurons: slice_layer(p, q, kv, n, hidden),
        )
    cut("model.norm.", decoder.norm, lambda p: {"weight": _take(p["weight"], hidden, None)})
    head = model.get_output_embeddings()
    if head.weight is decoder.embed_tokens.weight:
        if is_main:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    else:
        cut("lm_head.", head, lambda p: {"weight": _take(p["weight"], None, hidden)})
    return state if is_main else None


# ----------------------------------------------------------------------------------------------------------------------
# The teacher, and the whole job.


def read_teacher(teacher_dir: str | Path) -> PretrainedConfig:
    """The teacher's config, after checking that the directory is a LLaMA-family causal LM with weights."""
    path = Path(teacher_dir)
    if not (path / "config.json").is_file() or not has_weights(path):
        raise PruneError(
            f"teacher {path}: not a Hugging Face model directory (config.json and weights); give a local directory"
        )
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in FAMILY:
        raise PruneError(
            f"teacher {path} has model_type {config.model_type!r}; pruning supports the LLaMA-family layout {FAMILY}"
        )
    return config


def stored_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype the teacher's weights are stored in (its config's ``dtype``; fp32 when it does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def prune_to_student(
    teacher_dir: str | Path,
    target: Shape | str | Path,
    calib_split_dir: str | Path,
    out_dir: str | Path,
    *,
    seq_len: int = 512,
    calib_windows: int = 256,
    batch_size: int = 8,
    layer_selection: str = "symmetric",
    device: str | None = None,
    dtype: str = "fp32",
    seed: int = 0,
    zero3: bool = False,
    ds_config: str = "ds_configs/zero3_teacher.json",
    attn_implementation: str = "auto",
) -> dict[str, Any]:
    """Prune the teacher in ``teacher_dir`` to ``target`` and write the student to ``out_dir``; returns the summary
    that is also written to ``<out_dir>/pruning.json``.

    Args:
        teacher_dir: local Hugging Face causal LM of the LLaMA family (llama, mistral, qwen2).
        target: the student's shape: a ``Shape``, or a transformers ``config.json`` (file or directory) of which only
            the sizes are read; everything else (vocabulary, RoPE, norms, tied embeddings) stays the teacher's.
        calib_split_dir: a prepared split (``<data>/train`` of ``tools/prepare_data.py``).
        out_dir: where the student goes (``save_pretrained`` + the teacher's tokenizer files + ``pruning.json``); an
            existing directory is replaced only if it holds a previous ``pruning.json``.
        seq_len: tokens per calibration window; calib_windows: how many windows (tokens = their product).
        batch_size: windows per forward/backward (per rank).
        layer_selection: ``symmetric`` or ``importance`` (block influence), see the module docstring.
        device: ``cpu``, ``cuda``, ``cuda:1``, ... (default: cuda if available); ignored with ``zero3``.
        dtype: compute dtype, ``fp32`` or ``bf16``; weights are written in the teacher's stored dtype.
        seed: seeds the sample of calibration windows.
        zero3: shard the teacher with DeepSpeed ZeRO-3 over the launcher's ranks (``ds_config`` holds the engine
            settings); a collective call: every rank calls it, rank 0 writes.
    """
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    teacher_config = read_teacher(teacher_dir)
    teacher = shape_of(teacher_config, where=f"teacher {teacher_dir / 'config.json'}")
    where = "target" if isinstance(target, Shape) else f"target {target}"
    target = check_target(teacher, target if isinstance(target, Shape) else read_target(target), where)
    if layer_selection not in ("symmetric", "importance"):
        raise PruneError(f"layer selection {layer_selection!r} is not one of ['symmetric', 'importance']")
    if dtype not in DTYPES:
        raise PruneError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    max_positions = getattr(teacher_config, "max_position_embeddings", None)
    if max_positions and seq_len > max_positions:  # importance measured where the teacher was never trained
        raise PruneError(
            f"--seq-len {seq_len} exceeds the teacher's max_position_embeddings {max_positions}: calibrate on"
            f" windows the teacher was trained for (--seq-len {max_positions} or less)"
        )
    student_config(teacher_config, target, list(range(target.layers)))  # refused sizes fail before any work
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "pruning.json").is_file():
        raise PruneError(f"output {out_dir} exists and is not a pruned checkpoint (no pruning.json); pick a new --out")

    world = None
    if zero3:
        from minima.dist import init_world

        world = init_world()
    elif int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
        raise PruneError("launched on several ranks without zero3: add --zero3 to shard the teacher over them")
    rank, world_size = (world.rank, world.world_size) if world else (0, 1)
    is_main = rank == 0
    run_device = world.device if world else torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    shards = TokenShards.open(calib_split_dir, rank=rank, world_size=world_size)
    tokenizer_dir = shards.path.parent / "tokenizer"
    if tokenizer_dir.is_dir():
        check_vocab("teacher", ModelConfig(path=str(teacher_dir)), teacher_config, tokenizer_dir, shards.vocab_size)
    elif teacher_config.vocab_size < shards.vocab_size:
        raise PruneError(
            f"{shards.path} holds ids up to {shards.vocab_size - 1} but the teacher's vocab_size is"
            f" {teacher_config.vocab_size}: prepare the calibration data with the teacher's tokenizer"
        )
    batches = calibration_batches(
        shards,
        seq_len=seq_len,
        num_windows=calib_windows,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )

    started = time.perf_counter()
    compute_dtype = DTYPES[dtype]
    attn = choose_attn_implementation(attn_implementation, run_device)
    if zero3:
        from minima import engine as ds  # the only module that imports deepspeed

        engine_config = load_ds_config(ds_config, "--ds-config")
        if engine_config.get("zero_optimization", {}).get("stage") != 3:
            raise PruneError(f"--ds-config {ds_config} must set zero_optimization.stage 3 for the sharded teacher")
        engine_config.update(
            train_micro_batch_size_per_gpu=batch_size, bf16={"enabled": dtype == "bf16"}, steps_per_print=2**62
        )
        model_spec = ModelConfig(path=str(teacher_dir))
        loaded = ds.load_model(
            model_spec, teacher_config, engine_config, dtype=compute_dtype, attn_implementation=attn, device=run_device
        )
        # A plain loss.backward() on the output of engine(...) is refused by DeepSpeed for an engine without a ZeRO
        # optimizer, and engine.backward needs one; the engine's module carries ZeRO-3's gather hooks for forward
        # and backward alike, so the masks' gradients come from calling it directly.
        model = ds.init_teacher(loaded, engine_config).module.lm
        gathered = ds.gathered
    else:
        model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=compute_dtype, attn_implementation=attn)
        model = model.to(run_device).eval().requires_grad_(False)
        gathered = lambda params: nullcontext()  # noqa: E731
    layout = model.get_decoder().layers[0]
    if not (hasattr(layout, "self_attn") and hasattr(layout.self_attn, "o_proj") and hasattr(layout, "mlp")):
        raise PruneError(f"teacher {teacher_dir}: its decoder layers lack self_attn.o_proj / mlp.down_proj")

    local = accumulate_importance(
        model, iter(batches), teacher, run_device, gathered=gathered, show_progress=is_main, total=len(batches)
    )
    if world_size > 1:
        from minima.dist import all_reduce_sum

        imp = Importance.unflat(all_reduce_sum(local.flat(), run_device), local)
    else:
        imp = local
    plan = make_plan(imp, teacher, target, layer_selection)
    out_dtype = stored_dtype(teacher_config)
    state = student_state_dict(model, plan, teacher, out_dtype, gathered=gathered, is_main=is_main)
    summary = _summary(imp, plan, teacher, target, teacher_dir, out_dir, teacher_config.model_type)
    summary["calibration"] = {
        "split": str(shards.path),
        "windows": calib_windows,
        "seq_len": seq_len,
        "tokens": imp.tokens,
        "batch_size": batch_size,
        "seed": seed,
    }
    summary["runtime"] = {
        "device": str(run_device),
        "compute_dtype": dtype,
        "weights_dtype": str(out_dtype).removeprefix("torch."),
        "zero3": zero3,
        "world_size": world_size,
        "partitioned_params": sum(
            hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel for p in model.parameters()
        ),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if is_main:
        write_student(state, student_config(teacher_config, target, plan.layers), teacher_dir, out_dir, summary)
    if world is not None:
        from minima.dist import barrier

        barrier()
    return summary


def _summary(
    imp: Importance, plan: Plan, teacher: Shape, target: Shape, teacher_dir: Path, out_dir: Path, model_type: str
) -> dict[str, Any]:
    """What was kept and how much of the (per-layer L2-normalised) importance it carries: with unit-norm vectors, a
    kept set's share is the sum of its squared importances, in [0, 1]."""
    heads, neurons, hidden = normalised(imp.heads), normalised(imp.neurons), normalised(imp.hidden)

    def share(v: torch.Tensor, kept: list[int]) -> float:
        return round(float((v[kept] ** 2).sum()), 6)

    return {
        "teacher": str(teacher_dir),
        "student": str(out_dir),
        "model_type": model_type,
        "teacher_shape": asdict(teacher),
        "student_shape": asdict(target),
        "kept": {
            "layers": plan.layers,
            "heads": plan.heads,
            "kv_heads": plan.kv_heads,
            "neurons_per_layer": [len(n) for n in plan.neurons],
            "hidden": plan.hidden,
        },
        "importance": {
            "heads": [[round(float(x), 6) for x in row] for row in heads],
            "layer_influence": [round(float(x), 6) for x in 1.0 - imp.cos_sum / max(imp.tokens, 1)],
            "kept_share": {
                "heads": [share(heads[layer], kept) for layer, kept in zip(plan.layers, plan.heads, strict=True)],
                "neurons": [share(neurons[layer], kept) for layer, kept in zip(plan.layers, plan.neurons, strict=True)],
                "hidden": share(hidden, plan.hidden),
            },
        },
    }


def write_student(
    state: dict[str, torch.Tensor],
    config: PretrainedConfig,
    teacher_dir: Path,
    out_dir: Path,
    summary: dict,
    *,
    record_name: str = "pruning.json",
) -> None:
    """``save_pretrained`` (safetensors) of the student, the teacher's tokenizer files and ``summary`` as
    ``record_name``; written to a temporary sibling directory first, so a crash never leaves a half-written
    checkpoint at ``out_dir``."""
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):  # no memory and no random init for weights that are replaced at once
        student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        student.tie_weights()
    save_model_dir(student, teacher_dir, out_dir, record_name, summary)


def save_model_dir(model: torch.nn.Module, source_dir: Path, out_dir: Path, record_name: str, record: dict) -> None:
    """``save_pretrained`` (safetensors), the source model's tokenizer files and a JSON record of how the model was
    made, written to a temporary sibling first so a crash never leaves a half-written checkpoint at ``out_dir``."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, tmp / name)
    (tmp / record_name).write_text(json.dumps(record, indent=1))
    apply_umask(tmp)  # safetensors writes 0600: readable by the group as the rest of the run directory
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
