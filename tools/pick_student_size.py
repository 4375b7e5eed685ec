"""Size a distillation student (or pick a teacher) with the law of capacity gap: ``minima.law`` from the shell.

The law, T* = 2.498 * S - 11.498 (millions of parameters), says which teacher size gives the best student; read
backwards, which student a teacher suits best (~0.4x). It is applied to the count ``--count`` names: ``active``
(default: the parameters a token goes through, the compute the capacity gap is measured at) or ``total``; the two
differ only for mixtures of experts. Examples::

    # the optimal student of LLaMA-2-7B and a ranked table of concrete architectures of its family
    python tools/pick_student_size.py --teacher llama2-7b
    # ... MiniMA's uniform scaling of depth and width only
    python tools/pick_student_size.py --teacher llama2-7b --derivation uniform
    # ... and write row 2's transformers config, for the recipe's student='{{path: runs/student_arch}}'
    python tools/pick_student_size.py --teacher /models/Llama-2-7b-hf --pick 2 --write-config runs/student_arch
    # MoE students (qwen2_moe, 4 experts of the dense FFN's width, top-1) whose active size is the optimum
    python tools/pick_student_size.py --teacher llama2-7b --moe 4 --write-config runs/student_moe
    # the reverse question: which of these teachers for a 3B student?
    python tools/pick_student_size.py --student-params 3e9 --teachers llama2-7b,llama2-13b,70e9
    # a teacher far above the optimum: a chain of teacher assistants
    python tools/pick_student_size.py --teacher-params 70e9 --student-params 3e9
    # your own runs instead of the published constants, and a plot
    python tools/pick_student_size.py --fit runs.csv --metric loss --teacher llama2-7b --plot law.png
    # MiniDisc: choose among measured assistants
    python tools/pick_student_size.py --assistants assistants.csv --lambda 0.2

Models are presets ({presets}), Hugging Face model directories or config.json files; parameter counts are written
6.7e9, 6738415616, 7B or 350M. ``--json`` prints everything as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from minima.arch import (
    COUNTS,
    DERIVATIONS,
    Arch,
    ArchError,
    Count,
    load_arch,
    parse_count,
    preset_names,
    student_candidates,
)
from minima.law import (
    CAVEATS,
    COUNT_REASONS,
    PUBLISHED_LAW,
    LawError,
    assistant_chain,
    fit_law,
    plot_law,
    rank_teachers,
    read_assistants,
    read_results,
    select_assistant,
)


def human(n: float) -> str:
    """A parameter or FLOP count in short form: 6.74B, 1.38M."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def model_size(spec: str, count: Count) -> tuple[str, float, Arch | None]:
    """A teacher of ``--teachers``: a preset, directory or config.json (counted in ``count``), or a bare count."""
    if spec in preset_names() or Path(spec).exists():
        arch = load_arch(spec)
        return spec, float(arch.params(count)), arch
    try:
        return spec, parse_count(spec), None
    except ArchError:
        raise ArchError(
            f"--teachers: {spec!r} is not a preset ({', '.join(preset_names())}), an existing directory or"
            " config.json, or a parameter count (e.g. 13e9)"
        ) from None


def describe(arch: Arch, seq_len: int) -> list[str]:
    tie = "tied" if arch.tie_word_embeddings else "untied"
    active = f"active {arch.active_params():,} ({human(arch.active_params())}), " if arch.moe_layers() else ""
    return [
        f"  {arch.model_type}: {arch.shape()}, vocab {arch.vocab_size} ({tie} embeddings)",
        f"  total {arch.total_params():,} parameters ({human(arch.total_params())}), {active}non-embedding"
        f" {arch.non_embedding_params():,}; {arch.train_flops_per_token(seq_len):.3g} training FLOPs/token at seq"
        f" {seq_len}",
    ]


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows of candidates; ``ffn`` is an expert's width and ``E/k`` experts / top-k for an MoE row."""
    head = (
        f"{'#':>2} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} {'hd':>4} {'ffn':>6} {'E/k':>5} {'vocab':>6}"
        f" {'total':>7} {'active':>7} {'non-emb':>7} {'FLOPs/tok':>9} {'x teach':>7} {'x opt':>6}  derivation"
    )
    lines = [head]
    for i, r in enumerate(rows, 1):
        experts = f"{r['experts']}/{r['experts_per_token']}" if r["experts"] else "-"
        lines.append(
            f"{i:>2} {r['layers']:>6} {r['hidden']:>6} {r['heads']:>5} {r['kv_heads']:>3} {r['head_dim']:>4}"
            f" {r['ffn']:>6} {experts:>5} {r['vocab']:>6} {human(r['total_params']):>7}"
            f" {human(r['active_params']):>7} {human(r['non_embedding_params']):>7}"
            f" {r['train_flops_per_token']:>9.3g} {r['ratio_to_teacher']:>7.3f} {r['ratio_to_optimum']:>6.3f}"
            f"  {r['derivation']}" + "".join(f"\n{'':>8}note: {n}" for n in r["notes"])
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.format(presets=", ".join(preset_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    teacher = parser.add_mutually_exclusive_group()
    teacher.add_argument("--teacher", metavar="MODEL", help="teacher: preset, HF model directory or config.json")
    teacher.add_argument("--teacher-params", metavar="N", help="teacher as a parameter count (in --count), e.g. 6.7e9")
    student = parser.add_mutually_exclusive_group()
    student.add_argument("--student", metavar="MODEL", help="student: preset, HF model directory or config.json")
    student.add_argument("--student-params", metavar="N", help="student as a parameter count (in --count), e.g. 3e9")
    parser.add_argument("--teachers", metavar="A,B,C", help="candidate teachers to rank for the student")
    parser.add_argument(
        "--derivation",
        choices=DERIVATIONS,
        help="only students derived this way (uniform: MiniMA's scaling of depth and width together); default all",
    )
    parser.add_argument(
        "--count",
        choices=COUNTS,
        default="active",
        help="the parameters the law is applied to: active (a token's, default) or total; equal for dense models",
    )
    parser.add_argument(
        "--moe",
        type=int,
        metavar="E",
        help="propose qwen2_moe students: every dense shape's FFN as E experts of its width, sized by --count",
    )
    parser.add_argument("--moe-top-k", type=int, metavar="K", help="experts per token of --moe students (default 1)")
    parser.add_argument("--seq-len", type=int, default=4096, help="context for FLOPs per token (default 4096)")
    parser.add_argument(
        "--fit",
        metavar="CSV",
        help="refit the law on your runs: columns student_params, teacher_params and the --metric column",
    )
    parser.add_argument(
        "--metric",
        choices=("score", "loss"),
        default="score",
        help="the --fit column judging a run: score (higher is better, default) or loss (lower is better)",
    )
    parser.add_argument(
        "--assistants", metavar="CSV", help="measured teacher assistants: columns name, scale (size/teacher), score"
    )
    parser.add_argument(
        "--lambda", dest="lam", type=float, default=0.2, help="MiniDisc's lambda in score + lambda * (1 - scale)"
    )
    parser.add_argument("--write-config", metavar="DIR", help="write the picked student's transformers config.json")
    parser.add_argument("--pick", type=int, default=1, metavar="N", help="table row for --write-config (default 1)")
    parser.add_argument("--plot", metavar="PNG", help="draw the law, the runs and the chosen sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    has_teacher = args.teacher is not None or args.teacher_params is not None
    has_student = args.student is not None or args.student_params is not None
    if not (has_teacher or has_student or args.fit or args.assistants):
        parser.error("give a teacher (--teacher/--teacher-params), a student with --teachers, --fit or --assistants")
    if args.teachers and not has_student:
        parser.error("--teachers ranks teachers for a student: add --student or --student-params")
    if args.teachers and has_teacher:
        parser.error("give either --teacher (one teacher) or --teachers (candidates to rank), not both")
    if has_student and not (has_teacher or args.teachers):
        parser.error("a student needs --teachers to rank, or --teacher/--teacher-params for an assistant chain")
    if args.write_config and (args.teacher is None or has_student):
        parser.error("--write-config needs --teacher MODEL (an architecture to scale) and no student")
    if args.derivation and args.teacher is None:
        parser.error("--derivation restricts the students derived from --teacher MODEL (an architecture to scale)")
    if args.seq_len <= 0 or args.pick < 1:
        parser.error("--seq-len and --pick must be positive")
    if args.moe_top_k is not None and args.moe is None:
        parser.error("--moe-top-k sets the experts per token of --moe E students: add --moe")
    if args.moe is not None and args.teacher is None:
        parser.error("--moe turns the students derived from --teacher MODEL into MoEs: give --teacher MODEL")
    args.moe_top_k = 1 if args.moe_top_k is None else args.moe_top_k

    try:
        out, text = run(args, has_teacher, has_student)
    except (ArchError, LawError) as e:  # bad input: a model spec or count, a CSV, a size the law cannot use
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2) if args.json else "\n".join(text))
    return 0


def run(args: argparse.Namespace, has_teacher: bool, has_student: bool) -> tuple[dict[str, Any], list[str]]:
    """Everything asked for, as a JSON-ready dict and as text lines."""
    out: dict[str, Any] = {}
    text: list[str] = []
    law, fit = PUBLISHED_LAW, None
    if args.fit:
        fit = fit_law(read_results(args.fit, args.metric), args.metric, source=args.fit)
        law = fit.law
        better = "higher" if args.metric == "score" else "lower"
        out["fit"] = {
            "metric": args.metric,
            "better": better,
            "best_teacher_per_student": [{"student_params": s, "teacher_params": t} for s, t in fit.best],
            "notes": list(fit.notes),
        }
        text += [f"fit on {args.fit} ({len(fit.runs)} runs, {args.metric}: {better} is better)"]
        text += [f"  student {human(s)}: best teacher {human(t)}" for s, t in fit.best]
        text += [f"  note: {n}" for n in fit.notes]
    out["law"] = law.to_dict()
    r2 = f", R^2 {law.r2:.4f}" if law.r2 is not None else ""
    count: Count = args.count
    out["count"] = {"used": count, "why": COUNT_REASONS[count]}
    text += [f"law: {law.formula()}{r2} [{law.source}]", f"  applied to {count} parameters: {COUNT_REASONS[count]}"]
    pair = chain = None

    teacher_arch = load_arch(args.teacher) if args.teacher else None
    teacher_params = teacher_arch.params(count) if teacher_arch else None
    if args.teacher_params:
        teacher_params = parse_count(args.teacher_params, "--teacher-params")
    student_params = None
    if has_student:
        student_arch = load_arch(args.student) if args.student else None
        student_params = (
            student_arch.params(count) if student_arch else parse_count(args.student_params, "--student-params")
        )
        out["student"] = {"spec": args.student or args.student_params, "params": student_params, "count": count}
        if student_arch:
            out["student"].update(student_arch.summary(args.seq_len))
        else:
            out["student"][f"{count}_params"] = student_params
    if has_teacher:
        out["teacher"] = {"spec": args.teacher or args.teacher_params, "params": teacher_params, "count": count}
        text += [f"teacher: {args.teacher or args.teacher_params}"]
        if teacher_arch:
            out["teacher"].update(teacher_arch.summary(args.seq_len))
            text += describe(teacher_arch, args.seq_len)
        else:
            out["teacher"][f"{count}_params"] = teacher_params

    if has_teacher and not has_student:  # the optimal student and concrete shapes
        est = law.optimal_student(teacher_params)
        pair = (est.params, teacher_params)
        out["optimal_student"] = {
            "params": est.params,
            "count": count,
            f"{count}_params": est.params,
            "ratio_to_teacher": est.params / teacher_params,
            "form": est.form,
            "notes": list(est.notes),
        }
        if args.moe is None and not (teacher_arch and teacher_arch.moe_layers()):
            out["optimal_student"].update(total_params=est.params, active_params=est.params)  # dense: one count
        text += [
            f"optimal student: {human(est.params)} {count} parameters ({est.params / teacher_params:.3f} x the"
            f" teacher), {est.form} form"
        ]
        text += [f"  note: {n}" for n in est.notes]
        if teacher_arch:
            candidates = student_candidates(
                teacher_arch, est.params, args.derivation, count, args.moe or 0, args.moe_top_k
            )
            rows = [c.row(teacher_arch, est.params, args.seq_len, count) for c in candidates]
            out["candidates"] = rows
            out["derivation"] = args.derivation or "all"
            only = f", {args.derivation} only" if args.derivation else ""
            kind = "the teacher's family"
            if args.moe:
                kind = f"qwen2_moe: {args.moe} experts of the dense FFN's width, top-{args.moe_top_k}"
            text += ["", f"students ({kind}{only}) by {count} parameters, closest to {human(est.params)} first:"]
            text += table(rows)
            if args.write_config:
                if args.pick > len(candidates):
                    raise LawError(f"--pick {args.pick}: the table has {len(candidates)} rows")
                picked = candidates[args.pick - 1]
                picked.arch.to_hf_config().save_pretrained(args.write_config)
                out["written_config"] = {"dir": args.write_config, "row": args.pick, **rows[args.pick - 1]}
                text += [
                    f"wrote row {args.pick} ({picked.arch.shape()}) to {args.write_config}/config.json:"
                    f" use it as student='{{path: {args.write_config}}}' (a random initialisation of this shape)"
                ]
        else:
            text += ["  (give --teacher MODEL instead of a count for concrete architectures)"]

    if has_teacher and has_student:  # teacher assistants between them
        chain = assistant_chain(teacher_params, student_params, law)
        assistants = []
        for size in chain.assistants:
            entry: dict[str, Any] = {"params": size}
            shapes = student_candidates(teacher_arch, size, args.derivation, count) if teacher_arch else []
            if shapes:  # a teacher too small to shrink (one layer, one head) has none
                entry.update(shape=shapes[0].arch.shape(), shape_params=shapes[0].arch.params(count))
            assistants.append(entry)
        out["chain"] = {
            "sizes": list(chain.sizes),
            "assistants": assistants,
            "step_ratio_to_law": list(chain.step_ratios),
            "direct_ratio_to_law": chain.direct_ratio,
            "notes": list(chain.notes),
        }
        text += [
            f"student: {human(student_params)}; distilling directly, the teacher is {chain.direct_ratio:.2f} x the"
            " law's optimal teacher",
            f"chain: {' -> '.join(human(s) for s in chain.sizes)}"
            f" ({len(chain.assistants)} assistant{'s' if len(chain.assistants) != 1 else ''})",
            "  each step's teacher / the law's optimum: " + ", ".join(f"{r:.2f}" for r in chain.step_ratios),
        ]
        text += [f"  assistant {human(a['params'])}: e.g. {a['shape']}" for a in assistants if "shape" in a]
        text += [f"  note: {n}" for n in chain.notes]

    if args.teachers:  # the reverse question
        named = [model_size(s.strip(), count) for s in args.teachers.split(",") if s.strip()]
        if not named:
            raise LawError(f"--teachers {args.teachers!r} names no teacher: give e.g. llama2-7b,llama2-13b,70e9")
        optimum, ranked = rank_teachers(student_params, [(n, p) for n, p, _ in named], law)
        pair = (student_params, optimum.params)
        out["optimal_teacher"] = {"params": optimum.params, "form": optimum.form, "notes": list(optimum.notes)}
        out["teachers_ranked"] = [
            {"name": t.name, "params": t.params, "ratio_to_optimum": t.ratio_to_optimum, "warning": t.warning}
            for t in ranked
        ]
        text += [f"student: {human(student_params)}; the law's optimal teacher: {human(optimum.params)}"]
        text += [f"  note: {n}" for n in optimum.notes]
        for i, t in enumerate(ranked, 1):
            text += [f"  {i}. {t.name}: {human(t.params)} ({t.ratio_to_optimum:.2f} x the optimum)"]
            text += [f"     WARNING: {t.warning}"] if t.warning else []

    if args.assistants:  # MiniDisc
        ranked_ta = select_assistant(read_assistants(args.assistants), args.lam)
        out["assistants"] = {
            "lambda": args.lam,
            "chosen": ranked_ta[0].name,
            "ranked": [{"name": a.name, "scale": a.scale, "score": a.score, "tradeoff": a.tradeoff} for a in ranked_ta],
        }
        text += ["", f"teacher assistants by MiniDisc's score + {args.lam:g} * (1 - scale), best first:"]
        text += [f"{'name':<20} {'scale':>6} {'score':>8} {'tradeoff':>9}"]
        text += [f"{a.name:<20} {a.scale:>6.3f} {a.score:>8.4g} {a.tradeoff:>9.4g}" for a in ranked_ta]
        text += [f"chosen: {ranked_ta[0].name}"]

    if args.plot:
        out["plot"] = str(plot_law(args.plot, law, fit=fit, pair=pair, chain=chain))
        text += [f"plot: {args.plot}"]
    out["caveats"] = list(CAVEATS)
    text += ["", "caveats:", *(f"  - {c}" for c in CAVEATS)]
    return out, text


if __name__ == "__main__":
    sys.exit(main())
