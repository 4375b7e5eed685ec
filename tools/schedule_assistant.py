"""MiniDisc: choose the teacher assistant between a teacher and its student in one trial per round.

    python tools/schedule_assistant.py tiny_cpu --teacher runs/demo/teacher/export --student student.json \\
        --out runs/schedule data.dir=runs/demo/data run.total_tokens=200000
    deepspeed --num_gpus 8 tools/schedule_assistant.py llama2_7b_to_3b --teacher /models/Llama-2-7b-hf \\
        --student runs/size/config.json --out /ckpt/minidisc data.dir=/data/mix run.total_tokens=1e9

RECIPE and the key=value overrides are a distill run's (data, optimizer, KD objective, token budget per round); the
tool sets the student (initialised as the teacher), the teacher and each round's run directory. Each round trains
the weight-shared candidate assistants together, scores them by next-token accuracy on the held-out split, picks
the best ``accuracy + lam * sparsity`` and writes it as a Hugging Face model: ``minima.schedule`` has the method.
Outputs: ``OUT/round<r>/assistant`` (the chosen assistant), ``OUT/round<r>/round.json`` and ``assistants.csv``
(for ``tools/pick_student_size.py --assistants``), ``OUT/schedule.json``. Run the same command again after a stop
(exit status 75): it continues where it stood.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minima.arch import ArchError
from minima.candidates import DEFAULT_SPARSITIES, CandidateError
from minima.config import ConfigError, recipe_names
from minima.prune import PruneError
from minima.schedule import Options, ScheduleError, schedule
from minima.shards import DataError


def sparsity_list(text: str) -> tuple[float, ...]:
    """Comma-separated sparsities, e.g. 0.5,0.6,0.7 (floats in [0, 1))."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers like 0.5,0.7") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every sparsity must be in (0, 1)")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help=f"a distill recipe YAML or one of {recipe_names()}")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe (data.dir=..., ...)")
    parser.add_argument("--teacher", required=True, type=Path, help="the teacher: a local Hugging Face model directory")
    parser.add_argument(
        "--student", required=True, help="the student's size: a config.json, a model directory or a preset"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--lam", type=float, default=0.2, help="lambda of score + lambda * sparsity (default 0.2)")
    parser.add_argument(
        "--iterations", type=int, default=2, help="distillation stages teacher -> ... -> student (default 2: one TA)"
    )
    parser.add_argument(
        "--sparsities",
        type=sparsity_list,
        default=DEFAULT_SPARSITIES,
        help=f"candidate sparsities of the teacher (default {','.join(map(str, DEFAULT_SPARSITIES))})",
    )
    parser.add_argument("--calib-windows", type=int, default=64, help="calibration windows for importance")
    parser.add_argument("--dev-windows", type=int, help="held-out windows to score on (default: the whole split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_intermixed_args(argv)
    opts = Options(
        recipe=args.recipe,
        overrides=tuple(args.overrides),
        teacher=args.teacher,
        student=args.student,
        out_dir=args.out,
        lam=args.lam,
        iterations=args.iterations,
        sparsities=args.sparsities,
        calib_windows=args.calib_windows,
        dev_windows=args.dev_windows,
        seed=args.seed,
    )
    from minima.dist import init_world, shutdown

    world = init_world()
    try:
        schedule(opts, world)
    except (ConfigError, DataError, ScheduleError, CandidateError, PruneError, ArchError, FileNotFoundError) as e:
        print(f"minima: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
