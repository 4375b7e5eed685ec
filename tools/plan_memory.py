"""Per-GPU memory of a recipe before any GPU is used: ``python tools/plan_memory.py RECIPE [key=value ...]``.

    python tools/plan_memory.py llama2_7b_to_3b teacher.path=llama2-7b --gpus 8 --gpu-memory 80GB
    python tools/plan_memory.py llama2_7b_to_3b teacher.path=/models/Llama-2-7b-hf --gpus 16 --gpus-per-node 8 --json

Prints, for each teacher placement (replicated, node on several nodes, zero3), the bytes per GPU of the student's
weights, gradients and optimizer states (by its ZeRO stage and offload), the teacher, the activations and the loss,
the placement that ``teacher.placement=auto`` takes and, when nothing fits, the changes that would (see
``minima.memory``). A run prints the same plan at start, for its real GPUs. Model paths may also be presets of
``tools/pick_student_size.py`` (llama2-7b, llama2-13b, mistral-7b, qwen2.5-7b, llama3-8b), a model directory or a
config.json, so a job can be planned before its weights are downloaded; ``data.dir`` is not needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from minima.arch import ArchError, arch_from_hf_config, load_arch, parse_count
from minima.config import ConfigError, load_config, load_ds_config, recipe_names
from minima.memory import PlanError, choose, format_choice, job_for


def gpu_memory(text: str) -> int:
    """Bytes from '80GB', '80G', '141GB', '24GiB' or a plain number of bytes."""
    t = text.strip().upper().removesuffix("B")
    scale = 2**30 if t.endswith("GI") else 1
    t = t.removesuffix("I")
    try:
        return int(parse_count(t) * scale)
    except ArchError as e:
        raise argparse.ArgumentTypeError(f"--gpu-memory {text!r}: {e}; write e.g. 80GB") from None


def shape_of(model, key: str):
    """The :class:`Arch` of a recipe's model: a preset name, directory or config.json path, or ``arch`` fields."""
    if model.path is not None:
        return load_arch(model.path)
    from transformers import AutoConfig

    fields = dict(model.arch)
    return arch_from_hf_config(AutoConfig.for_model(fields.pop("model_type"), **fields), key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help=f"a recipe YAML path or one of {recipe_names()}")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. teacher.path=llama2-7b")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default: min(--gpus, 8)")
    parser.add_argument("--gpu-memory", type=gpu_memory, default="80GB", help="memory per GPU (default 80GB)")
    parser.add_argument(
        "--attention",
        choices=["flash_attention_2", "sdpa", "eager"],
        default=None,
        help="default: flash_attention_2 when the recipe says auto",
    )
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if not any(o.startswith("data.dir=") for o in overrides):
        overrides.append("data.dir=(not needed to plan)")
    gpus_per_node = args.gpus_per_node or min(args.gpus, 8)
    try:
        cfg = load_config(args.recipe, overrides)
        student_ds = load_ds_config(cfg.run.ds_config, "run.ds_config")
        teacher_ds = load_ds_config(cfg.run.teacher_ds_config, "run.teacher_ds_config")
        student = shape_of(cfg.student, "student")
        teacher = None if cfg.teacher is None else shape_of(cfg.teacher, "teacher")
        vocab = teacher.vocab_size if teacher is not None else student.vocab_size
        student = replace(student, vocab_size=max(student.vocab_size, vocab))  # arch dicts default to the data's
        bf16 = cfg.run.precision != "fp32"  # auto is bf16 on GPUs
        attention = args.attention or (
            "flash_attention_2" if cfg.run.attn_implementation == "auto" else cfg.run.attn_implementation
        )
        if bf16 and "data_types" not in student_ds:
            student_ds = {**student_ds, "data_types": {"grad_accum_dtype": "fp32"}}  # as minima.engine sets it
        job = job_for(
            cfg,
            student,
            teacher,
            world_size=args.gpus,
            gpus_per_node=gpus_per_node,
            dtype_bytes=2 if bf16 else 4,
            attention=attention,
            student_ds=student_ds,
            teacher_ds=teacher_ds,
            vocab_size=vocab,
            compiled=cfg.kd.compile != "never",
        )
        choice = choose(job, cfg.teacher.placement if cfg.teacher else "auto", args.gpu_memory)
    except (ConfigError, ArchError, PlanError) as e:
        print(f"plan_memory: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {
            "recipe": args.recipe,
            "gpus": args.gpus,
            "gpus_per_node": gpus_per_node,
            "gpu_memory": args.gpu_memory,
            "student_params": student.total_params(),
            "teacher_params": teacher.total_params() if teacher else 0,
            **choice.to_dict(),
        }
        print(json.dumps(out, indent=2))
    else:
        print(format_choice(job, choice))
    return 0 if choice.plans[choice.placement].fits else 1


if __name__ == "__main__":
    sys.exit(main())
