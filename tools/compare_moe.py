#!/usr/bin/env python
"""MiniMoE in miniature: a mixture-of-minimal-experts student against the dense student with the same active
parameters, both distilled from the same teacher for the same tokens, once with a teacher near the law of capacity
gap's optimum for the student and once with a teacher far above it.

Run after ``make demo`` (it reuses the demo's data and teacher)::

    python tools/compare_moe.py --demo runs/demo --out runs/moe_compare

The teacher is the demo's (3.0M parameters). The "near" student is the shape the law picked for it in the demo
(``runs/demo/student_arch``: the teacher is ~0.8x the law's optimal teacher for it); the "far" student is much
smaller (2 layers x 64), so that the same teacher is several times the law's optimal teacher for it: the capacity gap
that MiniMoE addresses. Each MoE student is the dense shape with every FFN turned into ``--experts`` experts of the
dense FFN's width, top-1 with gate-probability scaling (``minima.moe``): the same active parameters per token. The first
four students start from a random initialisation with the same seed; all see the same tokens in the same order (the
``tiny_cpu`` recipe: 0.5 CE + 0.5 KD at T=1). Every number in the table is a held-out loss measured on the whole
held-out split (nats/token).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from minima.arch import load_arch
from minima.demo import SEQ_LEN, launch, run_tool
from minima.evaluate import evaluate_model
from minima.law import PUBLISHED_LAW

FAR_STUDENT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def dense_arch(shape: dict) -> dict:
    """A llama student of ``shape`` (hidden, FFN, layers, heads; kv heads = heads, head_dim = hidden / heads)."""
    return {"model_type": "llama", "num_key_value_heads": shape["num_attention_heads"], **shape}


def moe_arch(shape: dict, experts: int) -> dict:
    """The same shape as a Qwen2-MoE of ``experts`` FFN experts of the dense FFN's width, top-1, no shared expert."""
    moe = {"model_type": "qwen2_moe", "moe_intermediate_size": shape["intermediate_size"], "num_experts": experts}
    moe |= {"num_experts_per_tok": 1, "norm_topk_prob": False, "shared_expert_intermediate_size": 1}
    return {**dense_arch(shape), **moe, "qkv_bias": False}


def flow(arch: dict) -> str:
    """An arch as a YAML flow mapping for a ``student.arch=`` override."""
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in arch.items()) + ", tie_word_embeddings: false}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a `make demo` directory")
    parser.add_argument("--out", type=Path, default=Path("runs/moe_compare"))
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=196_608, help="student training tokens (each run)")
    parser.add_argument("--num-ranks", type=int, default=torch.cuda.device_count() or 2)
    args = parser.parse_args(argv)
    teacher_dir, data_dir = args.demo / "teacher" / "export", args.demo / "data"
    for need in (teacher_dir / "config.json", data_dir / "train" / "index.json", args.demo / "student_arch"):
        if not need.exists():
            raise SystemExit(f"{need} not found: run `make demo` first (or give --demo DIR of a finished demo)")
    near = json.loads((args.demo / "student_arch" / "config.json").read_text())
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    shapes = {"near": {k: near[k] for k in keys}, "far": FAR_STUDENT}
    teacher_params = load_arch(teacher_dir).total_params()
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[compare_moe {time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    # MiniMoE's initialisation for the near student: the teacher pruned to its shape with the FFN kept E/2 times
    # wider (the demo's pruning), then split into E experts with 2/3 common neurons, against the demo's pruned init.
    wide_dir, split_dir = args.out / "pruned_wide", args.out / "pruned_split"
    wide = {**near, "intermediate_size": near["intermediate_size"] * args.experts // 2}
    (args.out / "wide_arch").mkdir(parents=True, exist_ok=True)
    (args.out / "wide_arch" / "config.json").write_text(json.dumps(wide))
    calib = ["--calib", str(data_dir / "train"), "--seq-len", str(SEQ_LEN), "--calib-windows", "128"]
    prune = ["--teacher", str(teacher_dir), "--target", str(args.out / "wide_arch"), "--out", str(wide_dir)]
    shutil.rmtree(wide_dir, ignore_errors=True)  # a previous comparison's
    run_tool("prune_to_student.py", [*prune, *calib], log)
    moefy = ["--dense", str(wide_dir), "--experts", str(args.experts), "--expert-size", str(near["intermediate_size"])]
    run_tool("moefy.py", [*moefy, *calib, "--out", str(split_dir), "--overwrite"], log)

    runs = [
        (gap, kind, f"student.arch={flow(arch)}")
        for gap, shape in shapes.items()
        for kind, arch in (("dense", dense_arch(shape)), ("moe", moe_arch(shape, args.experts)))
    ]
    runs += [("near_pruned", "dense", f"student={{path: {args.demo / 'student_init'}}}")]
    runs += [("near_pruned", "moe", f"student={{path: {split_dir}}}")]
    rows = []
    for gap, kind, student in runs:
        name = f"{gap}_{kind}"
        overrides = [f"data.dir={data_dir}", f"teacher.path={teacher_dir}", student]
        overrides += [f"run.total_tokens={args.tokens}", "run.eval_tokens=32768", "run.save_every=0"]
        metrics = launch(args.out / name, overrides, args.num_ranks, log)
        held_out = evaluate_model(metrics["export_dir"], data_dir, seq_len=SEQ_LEN)
        config = json.loads((Path(metrics["export_dir"]) / "config.json").read_text())
        dense_total = load_arch(args.out / f"{gap}_dense" / "export").total_params()  # the law counts totals
        optimal_teacher = PUBLISHED_LAW.optimal_teacher(dense_total).params
        rows.append(
            {
                "name": name,
                "gap": gap,
                "student": kind,
                "experts": config.get("num_experts", 1),
                "params": metrics["student_params"],
                "active_params": metrics.get("student_active_params", metrics["student_params"]),
                "teacher_over_optimal_teacher": teacher_params / optimal_teacher,
                "tokens": metrics["tokens_seen"],
                "held_out_loss": held_out["loss"],
                "held_out_tokens": held_out["tokens"],
                "export_dir": metrics["export_dir"],
            }
        )
    summary = {"teacher": str(teacher_dir), "teacher_params": teacher_params, "rows": rows}
    summary["wall_s"] = round(time.time() - t_start, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(
        f"\nteacher {teacher_params / 1e6:.2f}M params; held-out loss on {rows[0]['held_out_tokens']} tokens (nats)\n"
    )
    print(
        f"{'student':<18}{'teacher/T*':>11}{'params':>10}{'active':>10}{'tokens':>9}{'val loss':>10}{'MoE-dense':>11}"
    )
    for row in rows:
        dense = next(r for r in rows if r["gap"] == row["gap"] and r["student"] == "dense")
        delta = "" if row is dense else f"{row['held_out_loss'] - dense['held_out_loss']:+.4f}"
        print(
            f"{row['name']:<18}{row['teacher_over_optimal_teacher']:>10.1f}x{row['params'] / 1e6:>9.3f}M"
            f"{row['active_params'] / 1e6:>9.3f}M{row['tokens']:>9}{row['held_out_loss']:>10.4f}{delta:>11}"
        )
    print(f"\nsummary: {args.out / 'summary.json'}  ({summary['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
