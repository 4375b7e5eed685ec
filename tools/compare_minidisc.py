#!/usr/bin/env python
"""MiniDisc in miniature: a small student distilled through the teacher assistant MiniDisc chooses, against the same
student distilled directly from a teacher far above the law of capacity gap's optimum for it, and through the
assistant of the law's chain; the same student tokens in every case.

Run after ``make demo`` (it reuses the demo's data and teacher)::

    python tools/compare_minidisc.py --demo runs/demo --out runs/minidisc_compare

The teacher is the demo's; the student is much smaller (2 layers x 64, as in tools/compare_moe.py), so that the
teacher is several times the law's optimal teacher for it. The assistants are width prunings of the teacher (every
layer kept, MiniMA's per-axis rule, ``minima.candidates``) trained for the same tokens:

- **MiniDisc's**: one round of ``tools/schedule_assistant.py`` (candidates at ``--sparsities`` and at the student's
  size, sandwich-trained together, scored by next-token accuracy on the held-out split, chosen by
  ``accuracy + lam * sparsity``);
- **the law's**: the first assistant of ``tools/pick_student_size.py``'s chain (``minima.law``) gives the
  assistant's size; the candidate nearest that size is pruned from the teacher and distilled from it alone.

The three students start from one random initialisation (the same seed) and see the same tokens in the same order
(the ``tiny_cpu`` recipe: 0.5 CE + 0.5 KD at T=1). Held-out losses are measured on the whole held-out split
(nats/token).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from minima.arch import arch_from_hf_config, load_arch
from minima.candidates import shape_at
from minima.demo import SEQ_LEN, launch, run_tool
from minima.evaluate import evaluate_model
from minima.importance import Shape
from minima.law import PUBLISHED_LAW, assistant_chain

STUDENT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def flow(arch: dict) -> str:
    """An arch as a YAML flow mapping for a ``student.arch=`` override."""
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in arch.items()) + "}"


def width_config(teacher_config: dict, sparsity: float) -> dict:
    """The teacher's config.json with the sizes of its width pruning at ``sparsity`` (``minima.candidates``)."""
    shape = shape_at(Shape.of(teacher_config), sparsity)
    sizes = {"hidden_size": shape.hidden, "intermediate_size": shape.ffn, "num_attention_heads": shape.heads}
    return {**teacher_config, **sizes, "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim}


def width_sparsity(teacher_config: dict, params: float) -> float:
    """The sparsity whose width pruning of the teacher has the total parameter count nearest ``params``."""

    def total(s: float) -> int:
        fields = width_config(teacher_config, s)
        return arch_from_hf_config(AutoConfig.for_model(fields.pop("model_type"), **fields)).total_params()

    return min((i / 200 for i in range(200)), key=lambda s: abs(total(s) - params))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a `make demo` directory")
    parser.add_argument("--out", type=Path, default=Path("runs/minidisc_compare"))
    parser.add_argument("--ta-tokens", type=int, default=65_536, help="tokens of each assistant's training")
    parser.add_argument("--tokens", type=int, default=131_072, help="student training tokens (each run)")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9", help="MiniDisc's candidate sparsities")
    parser.add_argument("--lam", type=float, default=0.2, help="MiniDisc's lambda")
    parser.add_argument("--num-ranks", type=int, default=torch.cuda.device_count() or 2)
    args = parser.parse_args(argv)
    teacher_dir, data_dir = args.demo / "teacher" / "export", args.demo / "data"
    for need in (teacher_dir / "config.json", data_dir / "train" / "index.json"):
        if not need.exists():
            raise SystemExit(f"{need} not found: run `make demo` first (or give --demo DIR of a finished demo)")
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[compare_minidisc {time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    student_arch = {**{k: teacher_config[k] for k in ("model_type", "max_position_embeddings")}, **STUDENT}
    student_arch |= {"num_key_value_heads": STUDENT["num_attention_heads"], "tie_word_embeddings": False}
    student_dir = args.out / "student_arch"
    student_dir.mkdir(parents=True, exist_ok=True)
    (student_dir / "config.json").write_text(json.dumps({**teacher_config, **student_arch}))
    teacher_params, student_params = load_arch(teacher_dir).total_params(), load_arch(student_dir).total_params()
    common = [f"data.dir={data_dir}", "run.eval_tokens=32768", "run.save_every=0", "run.eval_every=0"]

    # MiniDisc: one round of the schedule on the demo teacher.
    schedule_dir = args.out / "minidisc"
    shutil.rmtree(schedule_dir, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).parent / "schedule_assistant.py"), "tiny_cpu", *common]
    cmd += [f"run.total_tokens={args.ta_tokens}", "--teacher", str(teacher_dir), "--student", str(student_dir)]
    cmd += ["--out", str(schedule_dir), "--sparsities", args.sparsities, "--lam", str(args.lam)]
    cmd += ["--calib-windows", "64", "--dev-windows", "128"]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    record = json.loads((schedule_dir / "round1" / "round.json").read_text())
    minidisc_ta = Path(record["assistant"]) if record["assistant"] else None

    # The law's chain: its first assistant's size, as the nearest width pruning, distilled from the teacher alone.
    chain = assistant_chain(teacher_params, student_params, PUBLISHED_LAW)
    law_ta, law_sparsity = None, None
    if chain.assistants:
        target = args.out / "law_ta_arch"
        target.mkdir(parents=True, exist_ok=True)
        law_sparsity = width_sparsity(teacher_config, chain.assistants[0])
        (target / "config.json").write_text(json.dumps(width_config(teacher_config, law_sparsity)))
        init = args.out / "law_ta_init"
        shutil.rmtree(init, ignore_errors=True)
        calib = ["--calib", str(data_dir / "train"), "--seq-len", str(SEQ_LEN), "--calib-windows", "64"]
        run_tool(
            "prune_to_student.py",
            ["--teacher", str(teacher_dir), "--target", str(target), "--out", str(init), *calib],
            log,
        )
        overrides = [
            *common,
            f"teacher.path={teacher_dir}",
            f"student={{path: {init}}}",
            f"run.total_tokens={args.ta_tokens}",
        ]
        law_ta = Path(launch(args.out / "law_ta", overrides, args.num_ranks, log)["export_dir"])

    rows = []
    arms = [("direct", teacher_dir), ("minidisc_ta", minidisc_ta), ("law_chain_ta", law_ta)]
    for name, teacher in arms:
        if teacher is None:
            continue
        overrides = [*common, f"teacher.path={teacher}", f"student.arch={flow(student_arch)}"]
        metrics = launch(
            args.out / f"student_{name}", [*overrides, f"run.total_tokens={args.tokens}"], args.num_ranks, log
        )
        held_out = evaluate_model(metrics["export_dir"], data_dir, seq_len=SEQ_LEN)
        taught_by = load_arch(teacher).total_params()
        teacher_loss = evaluate_model(teacher, data_dir, seq_len=SEQ_LEN)["loss"]
        rows.append(
            {
                "student_via": name,
                "teacher": str(teacher),
                "teacher_params": taught_by,
                "teacher_over_optimal_teacher": taught_by / PUBLISHED_LAW.optimal_teacher(student_params).params,
                "teacher_held_out_loss": teacher_loss,
                "tokens": metrics["tokens_seen"],
                "held_out_loss": held_out["loss"],
                "held_out_tokens": held_out["tokens"],
            }
        )
    summary = {"teacher": str(teacher_dir), "teacher_params": teacher_params, "student_params": student_params}
    summary |= {"minidisc_round": record}
    summary["law_chain"] = {"sizes": list(chain.sizes), "notes": list(chain.notes), "width_sparsity": law_sparsity}
    summary |= {"rows": rows, "wall_s": round(time.time() - t_start, 1)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\nteacher {teacher_params / 1e6:.2f}M, student {student_params / 1e6:.3f}M params (total)")
    print(f"MiniDisc chose sparsity {record['chosen']:.3f} (lambda {args.lam:g}); law chain sizes (M): "
          + ", ".join(f"{x / 1e6:.3f}" for x in chain.sizes))  # fmt: skip
    print(f"held-out loss on {rows[0]['held_out_tokens']} tokens (nats)\n")
    print(
        f"{'student taught by':<18}{'params':>9}{'T/T*':>7}{'its loss':>10}{'tokens':>9}"
        f"{'student loss':>14}{'vs direct':>11}"
    )
    for row in rows:
        delta = "" if row is rows[0] else f"{row['held_out_loss'] - rows[0]['held_out_loss']:+.4f}"
        print(
            f"{row['student_via']:<18}{row['teacher_params'] / 1e6:>8.3f}M{row['teacher_over_optimal_teacher']:>6.1f}x"
            f"{row['teacher_held_out_loss']:>10.4f}{row['tokens']:>9}{row['held_out_loss']:>14.4f}{delta:>11}"
        )
    print(f"\nsummary: {args.out / 'summary.json'}  ({summary['wall_s']:.0f} s)")
    return 0 if all(math.isfinite(r["held_out_loss"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
