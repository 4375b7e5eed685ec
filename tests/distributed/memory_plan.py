"""The memory plan's components against what the engines really hold, on 2 ranks of the tiny recipe's shapes.

    torchrun --standalone --nproc_per_node 2 tests/distributed/memory_plan.py OUT_DIR STUDENT_JSON:PLACEMENT ...

Builds the teacher and the student through minima.engine as a run does (ZeRO-3 JSONs with persistence threshold 0),
runs one step of minima.distill.train_step, and measures on rank 0: the student's weight shard, its fp32 gradient
partitions, the optimizer's fp32 master weights and Adam moments and the teacher's weights (its hpZ second shard
included). Writes them beside the plan's figures, to OUT_DIR/<student json stem>_<placement>.json, for each
configuration in turn (one launch for all). (Activations are checked in one process: tests/test_memory.py.)
"""

import json
import sys
from pathlib import Path

import torch

from minima.dist import init_world, shutdown

MICRO, SEQ, ACCUM, VOCAB = 2, 64, 2, 1024
STUDENT = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
           "tie_word_embeddings": False}  # fmt: skip
TEACHER = {**STUDENT, "hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 6, "num_key_value_heads": 6}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    out_dir = Path(sys.argv[1])
    world = init_world()
    for spec in sys.argv[2:]:
        student_json, placement = spec.rsplit(":", 1)
        measure(world, out_dir / f"{Path(student_json).stem}_{placement}.json", student_json, placement)
    shutdown()


def measure(world, out: Path, student_json: str, placement: str) -> None:
    """One configuration: build both engines, run a step, write the measured and the planned components."""
    from minima import engine as ds
    from minima.arch import arch_from_hf_config
    from minima.config import derive, load_config, load_ds_config
    from minima.data import Batch
    from minima.distill import train_step
    from minima.memory import job_for, plan
    from minima.models import hf_config

    overrides = [
        "data.dir=(random tokens)",
        f"data.seq_len={SEQ}",
        f"student.arch={json.dumps(STUDENT)}",
        "teacher.path=null",
        f"teacher.arch={json.dumps(TEACHER)}",
        f"run.micro_batch_size={MICRO}",
        f"run.tokens_per_step={MICRO * SEQ * ACCUM * world.world_size}",
        "run.max_steps=1",
        f"run.ds_config={student_json}",
        f"run.teacher_ds_config={Path(student_json).parent / 'ds_teacher.json'}",
        "run.precision=fp32",
        "run.attn_implementation=sdpa",
    ]
    cfg = load_config("tiny_cpu", overrides)
    derived = derive(cfg, world.world_size)
    student_ds = ds.student_ds_config(cfg, derived, load_ds_config(cfg.run.ds_config, "run.ds_config"), False)
    teacher_base = load_ds_config(cfg.run.teacher_ds_config, "run.teacher_ds_config")
    teacher_ds = ds.teacher_ds_config(
        teacher_base, placement, micro_batch_size=MICRO, bf16=False, gpus_per_node=2, path="ds_teacher.json"
    )
    student_hf = hf_config(cfg.student, "student", {"vocab_size": VOCAB})
    teacher_hf = hf_config(cfg.teacher, "teacher", {"vocab_size": VOCAB})
    load = {"dtype": torch.float32, "attn_implementation": "sdpa", "device": world.device}
    teacher = ds.init_teacher(ds.load_model(cfg.teacher, teacher_hf, teacher_ds, **load), teacher_ds)
    student = ds.init_student(ds.load_model(cfg.student, student_hf, student_ds, **load), cfg, derived, student_ds)

    g = torch.Generator().manual_seed(world.rank)
    windows = [torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g) for _ in range(ACCUM)]
    batches = [Batch(input_ids=w[:, :-1].contiguous(), labels=w[:, 1:].contiguous()) for w in windows]

    train_step(student, teacher, batches, cfg.kd, vocab_size=VOCAB, world=world, compiled=False)

    stage = ds.zero_stage(student_ds)
    student_params = list(student.module.parameters())
    student_weights = tensor_bytes(p.ds_tensor for p in student_params) if stage == 3 else tensor_bytes(student_params)
    optimizer = student.optimizer.optimizer  # the torch AdamW that ZeRO steps on its fp32 partitions
    state = [t for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t) and t.dim()]
    master = [p for group in optimizer.param_groups for p in group["params"]]
    # Unique storages, without the weights' own: an fp32 ZeRO-3 engine steps on its weight shards directly.
    weights = {(p.ds_tensor if stage == 3 else p).untyped_storage().data_ptr() for p in student_params}
    owned = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*master, *state]}
    optimizer_bytes = sum(n for ptr, n in owned.items() if ptr not in weights)
    gradients = None
    if stage == 3 and getattr(student.optimizer, "grad_partitions_flat_buffer", None) is not None:
        gradients = tensor_bytes([student.optimizer.grad_partitions_flat_buffer])
    teacher_params = list(teacher.module.parameters())
    if placement == "replicated":
        teacher_weights = tensor_bytes(teacher_params)
    else:
        teacher_weights = tensor_bytes(p.ds_tensor for p in teacher_params)
        teacher_weights += tensor_bytes(
            p.ds_secondary_tensor for p in teacher_params if p.ds_secondary_tensor is not None
        )

    job = job_for(
        cfg,
        arch_from_hf_config(student_hf, "student"),
        arch_from_hf_config(teacher_hf, "teacher"),
        world_size=world.world_size,
        gpus_per_node=2,
        dtype_bytes=4,
        attention="sdpa",
        student_ds=student_ds,
        teacher_ds=teacher_base,
        vocab_size=VOCAB,
        compiled=False,
    )
    planned = plan(job, placement, 2**40).components
    if world.is_main:
        measured = {
            "student weights": student_weights,
            "optimizer states": optimizer_bytes,
            "teacher weights": teacher_weights,
        }
        if gradients is not None:
            measured["student gradients (partitions)"] = gradients
        reduce_bucket = int(student_ds["zero_optimization"].get("reduce_bucket_size", 5e8)) * 4
        planned_partitions = planned["student gradients"] - min(reduce_bucket, job.student.total_params() * 4)
        out.write_text(
            json.dumps(
                {"stage": stage, "measured": measured, "planned": planned, "planned_partitions": planned_partitions},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
