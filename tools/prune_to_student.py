"""Initialise a student by structured pruning of the teacher (MiniMA): ``minima.prune`` on the command line.

One device (CPU or GPU):

    python tools/prune_to_student.py --teacher /models/Llama-2-7b-hf --target runs/size/config.json \\
        --calib /data/minima-pretrain/train --out /ckpt/minima-3b-init

A teacher that does not fit one GPU, sharded with DeepSpeed ZeRO-3 (or torchrun --nproc_per_node 8 ...):

    deepspeed --num_gpus 8 tools/prune_to_student.py --zero3 --teacher /models/Llama-2-7b-hf \\
        --layers 24 --hidden 3072 --heads 24 --kv-heads 24 --ffn 8192 --calib /data/minima-pretrain/train --out DIR

The student is a Hugging Face directory (safetensors, config, the teacher's tokenizer files) plus ``pruning.json``
with what was kept; ``minima.distill ... student='{path: DIR}'`` distils from it. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from minima.config import ConfigError
from minima.importance import Shape
from minima.prune import PruneError, prune_to_student
from minima.shards import DataError

SIZES = (("layers", "num_hidden_layers"), ("hidden", "hidden_size"), ("heads", "num_attention_heads"))
SIZES += (("kv_heads", "num_key_value_heads"), ("ffn", "intermediate_size"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, metavar="DIR", help="local Hugging Face llama/mistral/qwen2 model")
    parser.add_argument("--target", metavar="PATH", help="the student's transformers config.json (file or directory)")
    for field, key in SIZES:
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"the student's {key} (without --target)")
    parser.add_argument(
        "--calib", required=True, metavar="SPLIT", help="prepared split for calibration, e.g. DATA/train"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory for the student")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--calib-windows", type=int, default=256, help="calibration windows (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward/backward per rank (default 8)")
    parser.add_argument(
        "--layer-selection",
        choices=["symmetric", "importance"],
        default="symmetric",
        help="symmetric: drop layers from both ends (MiniMA); importance: drop the least block influence",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available; ignored with --zero3)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sample of calibration windows")
    parser.add_argument("--zero3", action="store_true", help="shard the teacher with DeepSpeed ZeRO-3 over the ranks")
    parser.add_argument("--ds-config", default="ds_configs/zero3_teacher.json", help="DeepSpeed JSON for --zero3")
    parser.add_argument("--attn-implementation", choices=["auto", "flash_attention_2", "sdpa", "eager"], default="auto")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)

    given = [field for field, _ in SIZES if getattr(args, field) is not None]
    if args.target is not None and given:
        parser.error(f"give --target or the sizes, not both (got --target and {['--' + f for f in given]})")
    if args.target is None and len(given) < len(SIZES):
        missing = ["--" + f.replace("_", "-") for f, _ in SIZES if f not in given]
        parser.error(f"give --target PATH, or all five sizes (missing {missing})")
    target = Path(args.target) if args.target else Shape(**{field: getattr(args, field) for field, _ in SIZES})

    try:
        summary = prune_to_student(
            args.teacher,
            target,
            args.calib,
            args.out,
            seq_len=args.seq_len,
            calib_windows=args.calib_windows,
            batch_size=args.batch_size,
            layer_selection=args.layer_selection,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            zero3=args.zero3,
            ds_config=args.ds_config,
            attn_implementation=args.attn_implementation,
        )
    except (PruneError, DataError, ConfigError, FileNotFoundError) as e:
        print(f"prune_to_student: error: {e}", file=sys.stderr)
        return 2
    if args.zero3:
        from minima.dist import shutdown

        shutdown()
    if os.environ.get("RANK", "0") == "0":  # under a launcher, only rank 0 reports
        brief = {key: summary[key] for key in ("student", "teacher_shape", "student_shape")}
        brief.update(layers=summary["kept"]["layers"], calibration=summary["calibration"], runtime=summary["runtime"])
        print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
