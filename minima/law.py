"""The law of capacity gap as a tool: from a teacher's size to its student's, and back.

**The law** (Zhang et al., "Towards the Law of Capacity Gap in Distilling Language Models", ACL 2025): the optimal
teacher grows linearly with the student, ``T* = 2.498 * S - 11.498`` (sizes in millions of parameters, R^2 0.9957),
fitted on pruning-then-distillation runs of GPT-2 and Pythia models below 3B and carried to a 7B teacher (MiniMA:
LLaMA-2-7B -> 3B). Read backwards it sizes the student of a teacher: ``S* = (T + 11.498) / 2.498``, about 0.4 T.
Concrete architectures of that size, and the exact counts, are :mod:`minima.arch`'s.

**Which count.** The paper's models are dense and it reports total parameters (input embedding and output head
included, :data:`LAW_COUNT`); for a dense model that is also the count of parameters a token goes through. For a
mixture of experts the two differ, and the caller chooses (:data:`COUNT_REASONS`): *active* parameters (the default of
``tools/pick_student_size.py``: the law is about the capacity gap at a given compute, and a token's compute is its
active parameters) or *total* ones. The functions here take sizes in whichever count they are given.

**Tiny teachers.** The affine form stops making sense below ~7.7M parameters, where it would give a student at least
as large as the teacher (or, for a refitted line, a student <= 0). There the proportional form ``S* = T / slope`` (the
law's ratio, without the intercept) is used and the output says so; the demo's ~3M-parameter teacher takes this path.

**The reverse question.** :func:`rank_teachers` ranks candidate teachers for a student by their distance to the law's
optimal teacher and warns about those beyond it, where a larger teacher is predicted to give a worse student.

**Teacher assistants** (MiniDisc): :func:`assistant_chain` spaces assistants so that every step follows the law as
closely as possible; :func:`select_assistant` picks a measured assistant by MiniDisc's lambda-tradeoff.

**Refitting.** :func:`fit_law` replaces the published constants by a line fitted to the user's own runs (read from a
CSV by :func:`read_results`): per student size the best teacher, then least squares through those points.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from minima.arch import ArchError, parse_count

LAW_COUNT = "total parameters (input embedding and output head included), as the paper reports model sizes"

COUNT_REASONS = {
    "active": "the parameters a token goes through, since the law is about the capacity gap at a given compute (the"
    " paper's models are dense, where active = total); an MoE's unused experts do not count",
    "total": "every parameter, input embedding and output head included, as the paper reports model sizes; an MoE"
    " counts all its experts",
}
"""Why the law would be applied to each count (``--count`` of ``tools/pick_student_size.py``)."""

CAVEATS = (
    "The published constants come from pruning-then-distillation runs with models up to 7B; elsewhere they are an"
    " extrapolation, and --fit with your own runs is the better guide.",
    "Later work (Busbridge et al. 2025, 'Distillation Scaling Laws') finds that the teacher's loss matters more than"
    " its size: a better-trained teacher of the same size can move the optimum.",
)


class LawError(ValueError):
    """Input the law cannot use (a bad CSV, size or setting); the message names it and says what to give instead.

    Bad model specs and counts raise :class:`minima.arch.ArchError`; both derive from ``ValueError``."""


# ---------------------------------------------------------------------------------------------------------------------
# The law


@dataclass(frozen=True)
class Estimate:
    """A size the law gives, and how."""

    params: float
    """Parameters (total count, not millions)."""
    form: Literal["affine", "proportional"]
    """``affine`` = the fitted line; ``proportional`` = its slope alone, where the line leaves its domain."""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Law:
    """``T* = slope * S + intercept_m`` with sizes in millions of parameters."""

    slope: float
    intercept_m: float
    r2: float | None
    source: str
    student_range: tuple[float, float]
    """Student sizes (parameters) the line was fitted on; estimates outside it say they extrapolate."""

    def formula(self) -> str:
        sign = "-" if self.intercept_m < 0 else "+"
        return f"T* = {self.slope:.6g} * S {sign} {abs(self.intercept_m):.6g} (millions of parameters)"

    def _range_note(self, student: float) -> tuple[str, ...]:
        lo, hi = self.student_range
        if lo <= student <= hi:
            return ()
        return (f"outside the student sizes the law was fitted on ({lo / 1e6:.4g}M-{hi / 1e6:.4g}M): extrapolated",)

    def optimal_teacher(self, student_params: float) -> Estimate:
        """The teacher size the law predicts to give the best student of ``student_params`` parameters."""
        teacher = (self.slope * student_params / 1e6 + self.intercept_m) * 1e6
        if teacher > student_params > 0:
            return Estimate(teacher, "affine", self._range_note(student_params))
        self._check_slope()
        note = (
            f"the affine form gives a teacher of {teacher / 1e6:.4g}M, not larger than the student: outside its"
            f" domain, so the proportional form T* = {self.slope:.4g} * S is used"
        )
        return Estimate(self.slope * student_params, "proportional", (note, *self._range_note(student_params)))

    def optimal_student(self, teacher_params: float) -> Estimate:
        """The student size for which ``teacher_params`` is the law's optimal teacher."""
        self._check_slope()
        student = (teacher_params / 1e6 - self.intercept_m) / self.slope * 1e6
        if 0 < student < teacher_params:
            return Estimate(student, "affine", self._range_note(student))
        student_prop = teacher_params / self.slope
        note = (
            f"the affine form gives a student of {student / 1e6:.4g}M for this {teacher_params / 1e6:.4g}M teacher"
            f" ({'not smaller than the teacher' if student > 0 else 'not positive'}): outside its domain, so the"
            f" proportional form S* = T / {self.slope:.4g} is used"
        )
        return Estimate(student_prop, "proportional", (note, *self._range_note(student_prop)))

    def _check_slope(self) -> None:
        if self.slope <= 1:
            raise LawError(
                f"the law's slope is {self.slope:.4g} <= 1 ({self.source}): it never puts the optimal teacher above"
                " the student, so it cannot size a student for a teacher; check the runs behind --fit"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "slope": self.slope,
            "intercept_millions": self.intercept_m,
            "r2": self.r2,
            "source": self.source,
            "formula": self.formula(),
            "student_range": list(self.student_range),
            "applied_to": LAW_COUNT,
        }


PUBLISHED_LAW = Law(
    slope=2.498,
    intercept_m=-11.498,
    r2=0.9957,
    source="Zhang et al., ACL 2025 (published fit)",
    student_range=(1e8, 3e9),  # pilot students from ~100M, up to MiniMA's 3B
)


# ---------------------------------------------------------------------------------------------------------------------
# The reverse question and teacher-assistant chains


@dataclass(frozen=True)
class TeacherChoice:
    """A candidate teacher measured against the law's optimum for a student."""

    name: str
    params: float
    ratio_to_optimum: float
    warning: str | None


def rank_teachers(student_params: float, teachers: list[tuple[str, float]], law: Law = PUBLISHED_LAW):
    """The law's optimal teacher for the student and the candidates ranked by ``|log(T / T*)|`` (best first).

    Teachers beyond the optimum (T > T*) get a warning: there the law predicts that a larger teacher gives a worse
    student. Returns ``(Estimate, [TeacherChoice, ...])``.
    """
    optimum = law.optimal_teacher(student_params)
    ranked = []
    for name, params in teachers:
        ratio = params / optimum.params
        warning = None
        if params <= student_params:
            warning = "not larger than the student: nothing to distil from a teacher this size"
        elif ratio > 1:
            warning = (
                f"beyond the law's optimum (x{ratio:.2f}): a larger teacher is predicted to give a worse student"
                " here; prefer one nearer the optimum or a teacher assistant chain"
            )
        ranked.append(TeacherChoice(name, params, ratio, warning))
    ranked.sort(key=lambda t: (t.params <= student_params, abs(math.log(t.ratio_to_optimum))))  # unusable ones last
    return optimum, ranked


@dataclass(frozen=True)
class Chain:
    """teacher -> assistants -> student, largest first, with each step measured against the law."""

    sizes: tuple[float, ...]
    """Parameters, teacher first, student last."""
    step_ratios: tuple[float, ...]
    """Per step: upper size / the law's optimal teacher for the lower size (1 = exactly the law)."""
    direct_ratio: float
    """Teacher / the law's optimal teacher for the student, when distilling directly."""
    notes: tuple[str, ...] = ()

    @property
    def assistants(self) -> tuple[float, ...]:
        return self.sizes[1:-1]


def assistant_chain(teacher_params: float, student_params: float, law: Law = PUBLISHED_LAW) -> Chain:
    """Assistants between a teacher far above the law's optimum and the student, each step following the law.

    The law's step x -> a * x + b is a pure ratio in u = x + b / (a - 1) (millions): u -> a * u. So n steps from the
    student to the teacher follow the law equally closely when the sizes are geometric in u, each step multiplying u by
    r = (u_T / u_S)^(1/n); n (the assistants are n - 1) is the whole number that makes log r nearest log a. Where the
    student is below the affine form's domain (u_S <= 0) the proportional law is used (u = x). n = 1 means no
    assistant: the teacher is within one step of the law.
    """
    if teacher_params <= student_params:
        raise LawError(
            f"the teacher ({teacher_params / 1e6:.4g}M) must be larger than the student ({student_params / 1e6:.4g}M)"
        )
    law._check_slope()
    shift = law.intercept_m / (law.slope - 1)
    notes = []
    if student_params / 1e6 + shift <= 0:
        shift = 0.0
        notes.append("the student is below the affine form's domain: assistants follow the proportional law")
    u_student, u_teacher = student_params / 1e6 + shift, teacher_params / 1e6 + shift
    span = math.log(u_teacher / u_student)
    steps_exact = span / math.log(law.slope)
    options = {max(1, math.floor(steps_exact)), max(1, math.ceil(steps_exact))}
    steps = min(options, key=lambda n: (abs(span / n - math.log(law.slope)), n))
    ratio = math.exp(span / steps)
    sizes = [(u_student * ratio**i - shift) * 1e6 for i in range(steps + 1)][::-1]
    sizes[0], sizes[-1] = teacher_params, student_params  # exact ends despite rounding
    step_ratios = tuple(sizes[i] / law.optimal_teacher(sizes[i + 1]).params for i in range(steps))
    direct = teacher_params / law.optimal_teacher(student_params).params
    if steps == 1:
        notes.append("no assistant needed: the teacher is within one step of the law from the student")
    return Chain(tuple(sizes), step_ratios, direct, tuple(notes))


# ---------------------------------------------------------------------------------------------------------------------
# Refitting the law on one's own runs


@dataclass(frozen=True)
class Fit:
    """A law fitted to runs: per student size the best teacher, then a least-squares line through those points."""

    law: Law
    runs: tuple[tuple[float, float, float], ...]
    """(student params, teacher params, metric) of every run read."""
    best: tuple[tuple[float, float], ...]
    """(student params, best teacher params) per distinct student size, by student size."""
    metric: Literal["score", "loss"]
    notes: tuple[str, ...] = ()


RESULT_COLUMNS = ("student_params", "teacher_params")


def _read_csv(path: str | Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """The rows of a CSV with a header holding ``columns`` (others are ignored), with their line numbers."""
    path = Path(path)
    if not path.is_file():
        raise LawError(f"{path}: no such file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in columns if c not in header]
        if missing:
            raise LawError(
                f"{path}, line 1: the header needs the columns {list(columns)}; missing {missing} (found {header})"
            )
        rows = []
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if any(row.values()):
                rows.append((reader.line_num, row))
    return rows


def _cell_number(path, line: int, row: dict[str, str], column: str, count: bool) -> float:
    text = row.get(column, "")
    where = f"{path}, line {line}, column {column!r}"
    if count:
        try:
            return parse_count(text)
        except ArchError as e:
            raise LawError(f"{where}: {e}") from None
    try:
        value = float(text)
    except ValueError:
        raise LawError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise LawError(f"{where}: {text!r} is not a finite number")
    return value


def read_results(path: str | Path, metric: Literal["score", "loss"]) -> list[tuple[float, float, float]]:
    """Runs from a CSV with columns ``student_params``, ``teacher_params`` and ``score`` (higher is better) or
    ``loss`` (lower is better), as ``metric`` says. Sizes are counts like 1.3e9 or 1.3B."""
    if metric not in ("score", "loss"):
        raise LawError(f"metric must be 'score' (higher is better) or 'loss' (lower is better), got {metric!r}")
    runs = []
    for line, row in _read_csv(path, (*RESULT_COLUMNS, metric)):
        student, teacher = (_cell_number(path, line, row, c, count=True) for c in RESULT_COLUMNS)
        runs.append((student, teacher, _cell_number(path, line, row, metric, count=False)))
    return runs


def fit_law(runs: list[tuple[float, float, float]], metric: Literal["score", "loss"], source: str = "fit") -> Fit:
    """For each student size the best teacher (highest score / lowest loss), then a least-squares line
    T* = slope * S + intercept (millions) through those points, with its R^2.

    Needs at least 3 distinct student sizes: two points always lie on a line, so R^2 would say nothing.
    """
    students = sorted({s for s, _, _ in runs})
    if len(students) < 3:
        raise LawError(
            f"{source}: fitting the law needs runs for at least 3 distinct student sizes (found {len(students)}:"
            f" {[f'{s / 1e6:.4g}M' for s in students]}); two points always lie on a line"
        )
    sign = 1.0 if metric == "score" else -1.0
    best, notes = [], []
    for s in students:
        trials = sorted((t, v) for st, t, v in runs if st == s)
        teacher = max(trials, key=lambda tv: (sign * tv[1], -tv[0]))[0]  # ties: the smaller teacher
        best.append((s, teacher))
        if len(trials) == 1:
            notes.append(f"student {s / 1e6:.4g}M has one teacher only: its 'best' teacher is no optimum")
        elif teacher == trials[-1][0]:
            notes.append(f"student {s / 1e6:.4g}M: the best teacher is the largest tried; the optimum may lie beyond")
    x = np.array([s for s, _ in best]) / 1e6
    y = np.array([t for _, t in best]) / 1e6
    slope, intercept = np.polyfit(x, y, 1)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - (slope * x + intercept)) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else None
    law = Law(float(slope), float(intercept), r2, f"fit to {source}", (students[0], students[-1]))
    return Fit(law, tuple(runs), tuple(best), metric, tuple(notes))


# ---------------------------------------------------------------------------------------------------------------------
# MiniDisc: choosing a measured teacher assistant


@dataclass(frozen=True)
class AssistantScore:
    """A measured teacher assistant: ``scale`` = its size / the teacher's, in (0, 1]; ``score`` its dev score."""

    name: str
    scale: float
    score: float
    tradeoff: float


def read_assistants(path: str | Path) -> list[tuple[str, float, float]]:
    """``(name, scale, score)`` rows from a CSV with columns ``name``, ``scale`` (assistant size / teacher size, in
    (0, 1]) and ``score`` (dev score, higher is better)."""
    out = []
    for line, row in _read_csv(path, ("name", "scale", "score")):
        scale = _cell_number(path, line, row, "scale", count=False)
        if not 0 < scale <= 1:
            raise LawError(f"{path}, line {line}, column 'scale': {scale} is not in (0, 1] (assistant / teacher size)")
        out.append((row["name"] or f"line {line}", scale, _cell_number(path, line, row, "score", count=False)))
    if not out:
        raise LawError(f"{path}: no assistant rows under the header")
    return out


def select_assistant(candidates: list[tuple[str, float, float]], lam: float = 0.2) -> list[AssistantScore]:
    """MiniDisc's lambda-tradeoff ``score + lam * (1 - scale)`` per assistant, best first (ties: the larger one, as
    in the official code and ``minima.candidates.tradeoff_select``: the safer step from the teacher).

    A larger ``lam`` favours smaller assistants; ``lam = 0`` picks the best dev score. The score and lambda share a
    unit: with scores in percent, multiply lambda by 100.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise LawError(f"lambda must be a finite number >= 0, got {lam}")
    scored = [AssistantScore(n, s, v, v + lam * (1 - s)) for n, s, v in candidates]
    return sorted(scored, key=lambda a: (-round(a.tradeoff, 9), -a.scale))


# ---------------------------------------------------------------------------------------------------------------------
# Plot


def plot_law(
    path: str | Path,
    law: Law,
    fit: Fit | None = None,
    pair: tuple[float, float] | None = None,
    chain: Chain | None = None,
) -> Path:
    """A PNG of the law (student size vs optimal teacher, log-log), the fitted runs, the chosen (student, teacher)
    ``pair`` and an assistant ``chain``. Needs matplotlib."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError:
        raise LawError("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[dev]')") from None
    xs = [*(pair or ()), *(s for s, _, _ in (fit.runs if fit else ())), *(chain.sizes if chain else ())]
    lo, hi = (min(xs) / 4, max(xs) * 2) if xs else (1e8, 1e10)
    grid = np.geomspace(lo, hi, 200)
    teachers = np.array([law.optimal_teacher(s).params for s in grid])
    affine = np.array([law.optimal_teacher(s).form == "affine" for s in grid])
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    if affine.any():
        ax.plot(grid[affine], teachers[affine], color="C0", label=law.formula())
    if (~affine).any():
        ax.plot(grid[~affine], teachers[~affine], "--", color="C0", label=f"proportional T* = {law.slope:.4g} S")
    if fit:
        ax.scatter([s for s, _, _ in fit.runs], [t for _, t, _ in fit.runs], s=12, color="0.6", label="runs")
        ax.scatter(
            [s for s, _ in fit.best], [t for _, t in fit.best], s=30, color="C1", label="best teacher per student"
        )
    if chain and len(chain.sizes) > 2:
        ax.plot(chain.sizes[1:], chain.sizes[:-1], "o-", color="C3", label="assistant chain steps")
    if pair:
        ax.scatter([pair[0]], [pair[1]], marker="*", s=200, color="C2", zorder=3, label="student, teacher")
    ax.set(xscale="log", yscale="log", xlabel="student parameters", ylabel="teacher parameters")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(f"law of capacity gap ({law.source})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
