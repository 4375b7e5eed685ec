"""MiniDisc's schedule: the teacher assistant between a teacher and its student, chosen in one trial per round.

    python tools/schedule_assistant.py RECIPE --teacher DIR --student CONFIG --out DIR [--lam 0.2] [overrides ...]
    deepspeed --num_gpus 8 tools/schedule_assistant.py RECIPE --teacher DIR --student CONFIG --out DIR ...

A round, from the current teacher (the given one, then each round's assistant):

1. **Importance** of the teacher's heads, neurons and hidden dims on calibration windows of ``data.dir/train``
   (``minima.importance``, the measure pruning uses).
2. **Candidates**: one mask per sparsity on the teacher's shape, keeping its most important units
   (``minima.candidates``; MiniMA's per-axis rule). Sparsities are those of the original teacher: the candidates
   are the sparsities strictly between the current teacher's and the student's, plus the student's own, the
   "no assistant" choice, a width-only pruning at the student's size. The student's sparsity is
   ``1 - its parameters / the teacher's`` (without embeddings), the scale the candidates' nominal sparsity follows.
3. **Sandwich training**: the distill stage (``minima.distill.train``, the recipe's data, optimizer, KD objective
   and token budget) with the student initialised as the teacher and every micro-batch run once per candidate,
   the teacher frozen in its own inference engine (replicated, node or ZeRO-3, as ``teacher.placement`` says).
4. **Scores** on the held-out split: next-token accuracy (higher is better) of every candidate, the masks on the
   trained shared weights.
5. **Choice** by ``accuracy + lam * sparsity`` (= ``score + lam * (1 - scale)``), and the chosen assistant sliced out
   as a Hugging Face model (``round<r>/assistant``, minima's pruning writer). It teaches the next round.

``--iterations N`` (2, MiniDisc's default) is the number of distillation stages: teacher -> assistants -> student,
so N - 1 rounds of choosing; a round that chooses the student's sparsity ends the schedule (no further assistant).
The last assistant is the teacher of the student's own run, ``python -m minima.distill RECIPE teacher.path=...``
(printed at the end). Every round's table is also written as ``round<r>/assistants.csv`` (columns name, scale,
score) for ``tools/pick_student_size.py --assistants``.

Nothing is lost on a crash or a stop: the sandwich run checkpoints and resumes like any distill run, and a finished
round (its ``round<r>/round.json``) is not run again.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minima.arch import load_arch
from minima.candidates import (
    DEFAULT_SPARSITIES,
    CandidateMasks,
    candidate_plans,
    score_candidates,
    score_sums,
    scores_from_sums,
    slice_candidate,
    tradeoff_select,
)
from minima.config import Config, load_config, load_ds_config
from minima.data import eval_batches
from minima.dist import World, all_reduce_sum, barrier
from minima.files import write_atomic
from minima.importance import Importance, Shape, accumulate_importance, calibration_batches
from minima.models import choose_attn_implementation
from minima.shards import TokenShards

SPARSITY_TOLERANCE = 1e-9


class ScheduleError(ValueError):
    """A teacher, student or option the schedule cannot work with; the message names it and what to do."""


@dataclass(frozen=True)
class Options:
    """What tools/schedule_assistant.py passes: the models, the tradeoff and the candidates."""

    recipe: str
    overrides: tuple[str, ...]
    teacher: Path
    student: str
    out_dir: Path
    lam: float = 0.2
    iterations: int = 2
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    calib_windows: int = 64
    dev_windows: int | None = None
    seed: int = 0


def student_sparsity(teacher: str | Path, student: str | Path) -> float:
    """``1 - student / teacher`` parameters without embeddings (the scale of the candidates' sparsities)."""
    t, s = load_arch(teacher).non_embedding_params(), load_arch(student).non_embedding_params()
    if not 0 < s < t:
        raise ScheduleError(
            f"the student {student} has {s:,} parameters without embeddings, the teacher {teacher} {t:,}: a"
            " teacher assistant lies between a larger teacher and a smaller student"
        )
    return 1.0 - s / t


def round_sparsities(sparsities: tuple[float, ...], teacher: float, student: float) -> list[float]:
    """The candidates of a round whose teacher is at sparsity ``teacher``: those strictly between it and the
    student, ascending, then the student's own (the no-assistant choice)."""
    inside = sorted(s for s in sparsities if teacher + SPARSITY_TOLERANCE < s < student - SPARSITY_TOLERANCE)
    return [*inside, student]


def relative(sparsity: float, teacher: float) -> float:
    """A sparsity of the original teacher as one of the current teacher at ``teacher``: parameters scale by
    ``(1 - s) / (1 - s_t)``."""
    return 1.0 - (1.0 - sparsity) / (1.0 - teacher)


def round_config(opts: Options, teacher_dir: Path, run_dir: Path) -> Config:
    """The recipe with the student initialised as the current teacher, taught by it, in the round's directory."""
    models = [f"student={json.dumps({'path': str(teacher_dir)})}", f"teacher={json.dumps({'path': str(teacher_dir)})}"]
    return load_config(opts.recipe, [*opts.overrides, *models, f"run.out_dir={run_dir}"])


def frozen_model(cfg: Config, model_dir: Path, world: World):
    """A model directory loaded through the distill stage's teacher path (its own inference engine, ZeRO-3 sharded
    over several ranks, whole on one); returns the transformers model (its modules carry ZeRO-3's hooks)."""
    from transformers import AutoConfig

    from minima import engine as ds
    from minima.config import ModelConfig

    bf16 = cfg.run.uses_bf16(world.device.type)
    placement = "zero3" if world.world_size > 1 else "replicated"
    base = load_ds_config(cfg.run.teacher_ds_config, "run.teacher_ds_config")
    ds_config = ds.teacher_ds_config(
        base,
        placement,
        micro_batch_size=cfg.run.micro_batch_size,
        bf16=bf16,
        gpus_per_node=world.local_world_size,
        path=cfg.run.teacher_ds_config,
    )
    attn = choose_attn_implementation(cfg.run.attn_implementation, world.device)
    spec = ModelConfig(path=str(model_dir))
    model = ds.load_model(
        spec,
        AutoConfig.from_pretrained(model_dir),
        ds_config,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        attn_implementation=attn,
        device=world.device,
    )
    return ds.init_teacher(model, ds_config).module.lm


def teacher_importance(cfg: Config, lm, opts: Options, world: World) -> Importance:
    """The importances summed over every rank's share of the calibration windows."""
    from minima import engine as ds

    shards = TokenShards.open(Path(cfg.data.dir) / "train", rank=world.rank, world_size=world.world_size)
    batches = calibration_batches(
        shards,
        seq_len=cfg.data.seq_len,
        num_windows=opts.calib_windows,
        batch_size=cfg.run.micro_batch_size,
        rank=world.rank,
        world_size=world.world_size,
        seed=opts.seed,
        documents=cfg.data.documents,
    )
    shape = Shape.of(lm.config)
    local = accumulate_importance(
        lm, iter(batches), shape, world.device, gathered=ds.gathered, show_progress=world.is_main, total=len(batches)
    )
    return Importance.unflat(all_reduce_sum(local.flat(), world.device), local) if world.world_size > 1 else local


def run_round(r: int, opts: Options, teacher_dir: Path, teacher_sparsity: float, student: float, world: World, log):
    """One round (module docstring); returns its record (also written to ``round<r>/round.json``)."""
    from minima import engine as ds
    from minima.distill import EXIT_REQUEUE, train

    round_dir = opts.out_dir / f"round{r}"
    done = round_dir / "round.json"
    if done.is_file():
        log(f"round {r}: done already ({done})")
        return json.loads(done.read_text())
    cfg = round_config(opts, teacher_dir, round_dir / "train")
    sparsities = round_sparsities(opts.sparsities, teacher_sparsity, student)
    log(f"round {r}: teacher {teacher_dir} (sparsity {teacher_sparsity:.3f}); candidates at {sparsities}")

    # 1-2. Importance on the current teacher, and the candidates' plans on its shape.
    lm = frozen_model(cfg, teacher_dir, world)
    shape, on_teacher = Shape.of(lm.config), [relative(s, teacher_sparsity) for s in sparsities]
    plans = candidate_plans(teacher_importance(cfg, lm, opts, world), shape, on_teacher)
    del lm

    # 3. The sandwich run: the distill stage, every micro-batch once per candidate.
    metrics = train(cfg, world, candidates=CandidateMasks.from_plans(plans, shape, on_teacher))
    if "stopped_at_step" in metrics:
        raise SystemExit(EXIT_REQUEUE)  # the run's checkpoint is saved: run the same command again to continue

    # 4. Scores of every candidate on the trained shared weights.
    trained = Path(metrics["export_dir"])
    lm = frozen_model(cfg, trained, world)
    masks = CandidateMasks.from_plans(plans, shape, on_teacher)
    hooks = masks.install(lm)
    valid = TokenShards.open(Path(cfg.data.dir) / "valid", rank=world.rank, world_size=world.world_size)
    batches = eval_batches(
        valid,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.run.micro_batch_size,
        rank=world.rank,
        world_size=world.world_size,
        max_windows=opts.dev_windows,
        documents=cfg.data.documents,
    )
    rows = score_candidates(lm, masks, batches, world.device, gathered=ds.gathered)
    scores = scores_from_sums(all_reduce_sum(score_sums(rows), world.device), sparsities)

    # 5. The lambda-tradeoff, and the chosen assistant sliced out of the shared weights.
    chosen, table = tradeoff_select(scores, opts.lam, min_sparsity=teacher_sparsity, max_sparsity=student)
    for row, score in zip(table, sorted(scores, key=lambda s: s["sparsity"]), strict=True):
        row |= {"ce": score["ce"], "tokens": score["tokens"]}
    index = sparsities.index(chosen)
    record = {"round": r, "teacher": str(teacher_dir), "teacher_sparsity": teacher_sparsity, "lambda": opts.lam}
    record |= {"student_sparsity": student, "chosen": chosen, "score": "next-token accuracy", "table": table}
    record |= {"trained": str(trained), "tokens": metrics["tokens_seen"], "assistant": None}
    if chosen < student - SPARSITY_TOLERANCE:
        out = round_dir / "assistant"
        slice_candidate(
            lm, plans[index], lm.config, teacher_dir, out, record, gathered=ds.gathered, is_main=world.is_main
        )
        record["assistant"] = str(out)
    hooks.remove()
    if world.is_main:
        write_csv(round_dir / "assistants.csv", table, r)
        write_atomic(done, json.dumps(record, indent=1))
    barrier()
    return record


def write_csv(path: Path, table: list[dict[str, Any]], r: int) -> None:
    """The round's candidates as ``tools/pick_student_size.py --assistants`` reads them (name, scale, score)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "scale", "score"])
        for row in table:
            writer.writerow([f"round{r}-sparsity{row['sparsity']:.3f}", f"{row['scale']:.6f}", f"{row['score']:.6f}"])


def format_table(record: dict[str, Any]) -> str:
    """A round's candidates as a table, the chosen one marked."""
    lines = [
        f"round {record['round']}: score = next-token accuracy on the held-out split; value = score + "
        f"{record['lambda']:g} * sparsity",
        f"{'sparsity':>9} {'scale':>7} {'accuracy':>9} {'ce':>8} {'value':>8}",
    ]
    for row in record["table"]:
        mark = "  <- chosen" if row["chosen"] else ("" if row["eligible"] else "  (not eligible)")
        if abs(row["sparsity"] - record["student_sparsity"]) < SPARSITY_TOLERANCE:
            mark += "  (the student's size: no assistant)"
        numbers = f"{row['sparsity']:>9.3f} {row['scale']:>7.3f} {row['score']:>9.4f} {row['ce']:>8.4f}"
        lines.append(f"{numbers} {row['value']:>8.4f}{mark}")
    return "\n".join(lines)


def schedule(opts: Options, world: World) -> dict[str, Any]:
    """Every round (module docstring); returns the schedule also written to ``<out>/schedule.json``."""

    def log(text: str) -> None:
        if world.is_main:
            print(f"minima: {text}", file=sys.stderr, flush=True)

    if opts.iterations < 2:
        raise ScheduleError(f"--iterations {opts.iterations}: give >= 2 (teacher -> assistant -> student)")
    if not (math.isfinite(opts.lam) and opts.lam >= 0):
        raise ScheduleError(f"--lam {opts.lam} must be a finite number >= 0")
    student = student_sparsity(opts.teacher, opts.student)
    load_config(opts.recipe, list(opts.overrides))  # a bad recipe or override fails before any work
    teacher_dir, teacher_sparsity, rounds = opts.teacher, 0.0, []
    for r in range(1, opts.iterations):
        record = run_round(r, opts, teacher_dir, teacher_sparsity, student, world, log)
        rounds.append(record)
        log(format_table(record))
        if record["assistant"] is None:
            log(f"round {r} chose the student's own size: no further assistant")
            break
        teacher_dir, teacher_sparsity = Path(record["assistant"]), record["chosen"]
    result = {"teacher": str(opts.teacher), "student": opts.student, "student_sparsity": student, "lambda": opts.lam}
    result |= {"rounds": rounds, "student_teacher": str(teacher_dir)}
    result["next"] = (
        f"python -m minima.distill {opts.recipe} teacher.path={teacher_dir} student=... (the student from"
        f" {opts.student}: e.g. tools/prune_to_student.py --teacher {teacher_dir} --target {opts.student})"
    )
    if world.is_main:
        write_atomic(opts.out_dir / "schedule.json", json.dumps(result, indent=1))
    log(f"the student's teacher: {teacher_dir}; next: {result['next']}")
    return result
