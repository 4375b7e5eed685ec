"""The law of capacity gap as a tool: from a teacher to concrete student architectures, and back.

**The law** (Zhang et al., "Towards the Law of Capacity Gap in Distilling Language Models", ACL 2025): the optimal
teacher grows linearly with the student, ``T* = 2.498 * S - 11.498`` (sizes in millions of parameters, R^2 0.9957),
fitted on pruning-then-distillation runs of GPT-2 and Pythia models below 3B and carried to a 7B teacher (MiniMA:
LLaMA-2-7B -> 3B). Read backwards it sizes the student of a teacher: ``S* = (T + 11.498) / 2.498``, about 0.4 T.
``--fit`` replaces the constants by a line fitted to the user's own runs (:func:`fit_law`).

**Which count.** The law is applied to *total* parameters (input embedding and output head included), because the
paper reports model sizes that way. Tables also give non-embedding parameters: total minus the input embedding and an
untied output head.

**FLOPs per token** (training, forward + backward, PaLM's appendix B): ``6 * N_matmul + 12 * L * n_heads * head_dim
* seq_len``, where ``N_matmul`` counts the weights of every matrix product a token goes through (attention and MLP
projections and the output head, not the input-embedding lookup, norms or biases) and the second term is attention's
``QK^T`` and ``AV`` over a full context of ``seq_len`` (no causal halving). A forward pass alone is a third of it.

**Tiny teachers.** The affine form stops making sense below ~7.7M parameters, where it would give a student at least
as large as the teacher (or, for a refitted line, a student <= 0). There the proportional form ``S* = T / slope`` (the
law's ratio, without the intercept) is used and the output says so; the demo's ~3M-parameter teacher takes this path.

**Candidate students** keep the teacher's family: model_type, vocabulary, head_dim, tie setting and the query heads
per key/value head (where the head count allows it; else the nearest ratio, said in the row). Three derivations,
each enumerated over hardware-friendly sizes, keep the shapes just below and just above the optimum, and all rows are
ranked by ``|log(params / S*)|``:

- *uniform* (MiniMA): one factor f = hidden'/hidden on width, heads, FFN and depth (layers = round(f * L));
- *depth-only*: the teacher's widths, fewer layers;
- *width-only*: the teacher's depth, hidden, heads and FFN scaled by one factor.

Hidden sizes are multiples of 128 and FFN sizes multiples of 256 (nearest multiple). A size below one multiple (tiny
teachers) uses the largest power of two that fits in it as its multiple, so it becomes a power of two, and the row
says so. For LLaMA-2-7B, f = 0.75 gives MiniMA's 24 layers x 3072 hidden (24 heads of 128) x FFN 8192.

**Teacher assistants** (MiniDisc): :func:`assistant_chain` spaces assistants so that every step follows the law as
closely as possible; :func:`select_assistant` picks a measured assistant by MiniDisc's lambda-tradeoff.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import numpy as np

PRESETS_DIR = Path(__file__).parent / "presets"

HIDDEN_MULTIPLE = 128
FFN_MULTIPLE = 256

LAW_COUNT = "total parameters (input embedding and output head included), as the paper reports model sizes"

CAVEATS = (
    "The published constants come from pruning-then-distillation runs with models up to 7B; elsewhere they are an"
    " extrapolation, and --fit with your own runs is the better guide.",
    "Later work (Busbridge et al. 2025, 'Distillation Scaling Laws') finds that the teacher's loss matters more than"
    " its size: a better-trained teacher of the same size can move the optimum.",
)


class LawError(ValueError):
    """Input the law cannot use (a bad model spec, CSV or size); the message names it and says what to give instead."""


# Per family: q/k/v bias, o bias, MLP bias, per-head q/k norms. A string names the config flag that switches it on;
# Qwen2 hard-wires q/k/v biases, so its configs have no flag for them.
FAMILIES: dict[str, tuple[bool | str, bool | str, bool | str, bool]] = {
    "llama": ("attention_bias", "attention_bias", "mlp_bias", False),
    "mistral": (False, False, False, False),
    "qwen2": (True, False, False, False),
    "qwen3": ("attention_bias", "attention_bias", False, True),
}


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer's shape (LLaMA-style: RMSNorm, gated MLP, RoPE), enough to count it exactly."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    name: str = ""
    """Where it came from (preset, path) or how it was derived."""
    base_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The source transformers config as a dict: the fields a written student config inherits (rope, eps, ids)."""

    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention, MLP, two RMSNorms (plus q/k norms where the family has them)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = 2 * h * q + 2 * h * kv + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        return attn + mlp + 2 * h + 2 * self.head_dim * self.qk_norm

    def embedding_params(self) -> int:
        """Input embedding plus an untied output head (a tied head shares the embedding's V x H)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def total_params(self) -> int:
        """Every parameter once: embeddings, layers, the final norm (equals ``sum(p.numel())`` of the HF model)."""
        return self.embedding_params() + self.num_layers * self.layer_params() + self.hidden_size

    def non_embedding_params(self) -> int:
        """Total minus the input embedding and an untied output head."""
        return self.total_params() - self.embedding_params()

    def matmul_params(self) -> int:
        """Weights of the matrix products one token goes through: projections of every layer and the output head."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size
        return self.num_layers * per_layer + self.vocab_size * h

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context ``seq_len``: 6 N_matmul + 12 L n_heads d_head T."""
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return 6.0 * self.matmul_params() + attention

    def shape(self) -> str:
        """One line: layers x hidden, heads / kv heads x head_dim, FFN."""
        return (
            f"{self.num_layers}L x {self.hidden_size} ({self.num_heads}/{self.num_kv_heads} heads x {self.head_dim}),"
            f" FFN {self.intermediate_size}"
        )

    def summary(self, seq_len: int) -> dict[str, Any]:
        """The shape and its counts as plain values (for tables and JSON)."""
        return {
            "model_type": self.model_type,
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "ffn": self.intermediate_size,
            "vocab": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "total_params": self.total_params(),
            "non_embedding_params": self.non_embedding_params(),
            "train_flops_per_token": self.train_flops_per_token(seq_len),
        }

    def to_hf_config(self):
        """A transformers config of this shape that keeps everything else of the source config (rope, eps, ids)."""
        from transformers import AutoConfig

        fields = {k: v for k, v in self.base_config.items() if k not in ("model_type", "_name_or_path", "layer_types")}
        teacher_layers = fields.get("num_hidden_layers", self.num_layers)
        if "max_window_layers" in fields:  # full-attention layers below it: keep the same share of the depth
            share = min(1.0, fields["max_window_layers"] / teacher_layers)
            fields["max_window_layers"] = round(share * self.num_layers)
        fields.update(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if "head_dim" in fields or self.hidden_size != self.num_heads * self.head_dim:
            fields["head_dim"] = self.head_dim
        return AutoConfig.for_model(self.model_type, **fields)


def preset_names() -> list[str]:
    """Built-in teacher configs (``minima/presets/*.json``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def arch_from_hf_config(config, name: str = "") -> Arch:
    """The :class:`Arch` of a transformers config of a supported family (llama, mistral, qwen2, qwen3)."""
    if config.model_type not in FAMILIES:
        raise LawError(
            f"{name or 'config'}: model_type {config.model_type!r} is not supported; the parameter counts know"
            f" {sorted(FAMILIES)}"
        )

    def flag(rule: bool | str) -> bool:
        return bool(getattr(config, rule, False)) if isinstance(rule, str) else rule

    qkv, o, mlp, qk_norm = FAMILIES[config.model_type]
    heads = config.num_attention_heads
    return Arch(
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        qkv_bias=flag(qkv),
        o_bias=flag(o),
        mlp_bias=flag(mlp),
        qk_norm=qk_norm,
        name=name,
        base_config=config.to_dict(),
    )


def load_arch(spec: str | Path) -> Arch:
    """A model given as a preset name (``llama2-7b``), a Hugging Face model directory or a ``config.json`` file."""
    spec = str(spec)
    path = PRESETS_DIR / f"{spec}.json" if spec in preset_names() else Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise LawError(
            f"{spec!r} is neither a preset ({', '.join(preset_names())}) nor a model directory with a config.json"
            " nor a config.json file"
        )
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LawError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise LawError(f"{path}: a transformers config.json needs a 'model_type' (e.g. llama) next to its sizes")
    model_type = fields.pop("model_type")
    if model_type not in FAMILIES:
        raise LawError(
            f"{path}: model_type {model_type!r} is not supported; the parameter counts know {sorted(FAMILIES)}"
        )
    from transformers import AutoConfig  # imports torch (seconds): only once the input is known to be usable

    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers validates sizes (hidden % heads): ValueError, or huggingface_hub's strict
        # dataclass errors (transformers 5), which derive from Exception only
        raise LawError(f"{path}: transformers rejects this {model_type} config: {' '.join(str(e).split())}") from None
    return arch_from_hf_config(config, name=spec)


SUFFIXES = {"K": 3, "M": 6, "B": 9, "G": 9, "T": 12}
"""Powers of ten of the count suffixes."""


def parse_count(text: str | float, what: str = "parameter count") -> float:
    """A positive count written as ``6.7e9``, ``6738415616``, ``7B``, ``350M`` or ``125k``."""
    raw = str(text).strip().replace("_", "")
    exponent = SUFFIXES.get(raw[-1:].upper())
    # Decimal scales exactly, so "1.07B" is the same float as "1.07e9" (float("1.07") * 1e9 is not) and runs written
    # either way group as one student size in fit_law.
    try:
        value = float(Decimal(raw[:-1] if exponent else raw).scaleb(exponent or 0))
    except (InvalidOperation, ValueError):
        raise LawError(f"{what} {text!r} is not a number (write e.g. 6.7e9, 7B or 350M)") from None
    if not math.isfinite(value) or value <= 0:
        raise LawError(f"{what} {text!r} must be a positive number")
    return value


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
# Concrete students


def hardware_size(x: float, multiple: int) -> tuple[int, bool]:
    """``x`` rounded to the nearest multiple of ``multiple``; below one multiple, to a multiple of the largest power
    of two that fits in ``x`` (so a power of two). Returns the size and whether that fallback was used."""
    if x >= multiple:
        return multiple * math.floor(x / multiple + 0.5), False
    small = 1 << max(0, math.floor(math.log2(max(x, 1.0))))
    return small * math.floor(x / small + 0.5), True


@dataclass(frozen=True)
class Candidate:
    """A student architecture of the teacher's family and how it was derived."""

    arch: Arch
    derivation: Literal["uniform", "depth-only", "width-only"]
    factor: float
    """Uniform/width-only: hidden'/hidden; depth-only: layers'/layers."""
    notes: tuple[str, ...] = ()

    def row(self, teacher: Arch, target: float, seq_len: int) -> dict[str, Any]:
        """The table row: the shape, its counts and ratios, the derivation."""
        total = self.arch.total_params()
        return {
            **self.arch.summary(seq_len),
            "ratio_to_teacher": total / teacher.total_params(),
            "ratio_to_optimum": total / target,
            "derivation": f"{self.derivation} x{self.factor:.4g}",
            "notes": list(self.notes),
        }


def _kv_heads(heads: int, group: float) -> int:
    """The divisor of ``heads`` whose query-per-kv ratio is nearest ``group`` (in log ratio; ties: more kv heads)."""
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    return min(divisors, key=lambda d: (abs(math.log(heads / d / group)), -d))


def _scaled(teacher: Arch, hidden: int, layers: int, factor: float, derivation: str) -> Candidate:
    """The teacher with width ``hidden`` (heads and FFN scaled by hidden/teacher hidden) and ``layers`` layers."""
    f = hidden / teacher.hidden_size
    notes = []
    if teacher.hidden_size == teacher.num_heads * teacher.head_dim:
        heads = hidden // teacher.head_dim
    else:
        heads = max(1, round(f * teacher.num_heads))
    ffn, small_ffn = hardware_size(f * teacher.intermediate_size, FFN_MULTIPLE)
    ffn = min(ffn, teacher.intermediate_size)
    if hidden < HIDDEN_MULTIPLE:
        notes.append(f"hidden {hidden} < {HIDDEN_MULTIPLE}: a power of two")
    if small_ffn:
        notes.append(f"FFN {ffn} < {FFN_MULTIPLE}: a multiple of the largest power of two that fits")
    group = teacher.num_heads / teacher.num_kv_heads
    kv = _kv_heads(heads, group)
    if heads / kv != group:
        notes.append(f"{heads} heads: {heads // kv} queries per kv head instead of {group:g}")
    arch = replace(
        teacher,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        name=f"{derivation} x{factor:.4g} of {teacher.name or teacher.model_type}",
    )
    return Candidate(arch, derivation, factor, tuple(notes))  # type: ignore[arg-type]


def _hidden_sizes(teacher: Arch) -> list[int]:
    """Student widths below the teacher's: multiples of 128, and powers of two below 128, in whole heads of head_dim;
    of those, the ones whose head count keeps the teacher's queries per kv head, unless none does."""
    sizes = set(range(HIDDEN_MULTIPLE, teacher.hidden_size, HIDDEN_MULTIPLE))
    sizes |= {1 << j for j in range(int(math.log2(HIDDEN_MULTIPLE))) if 1 << j < teacher.hidden_size}
    if teacher.hidden_size != teacher.num_heads * teacher.head_dim:
        return sorted(sizes)  # attention width is not hidden: heads are scaled on their own
    sizes = {h for h in sizes if h % teacher.head_dim == 0}  # whole heads
    group = teacher.num_heads // teacher.num_kv_heads
    keeping = {h for h in sizes if (h // teacher.head_dim) % group == 0}
    # kv heads come in whole groups, so pruning a teacher into the student keeps its attention structure
    return sorted(keeping or sizes)


def _bracket(cands: list[Candidate], target: float) -> list[Candidate]:
    """The candidates nearest ``target`` from below and from above (by total parameters)."""
    below = [c for c in cands if c.arch.total_params() <= target]
    above = [c for c in cands if c.arch.total_params() > target]
    picked = [max(below, key=lambda c: c.arch.total_params())] if below else []
    return picked + ([min(above, key=lambda c: c.arch.total_params())] if above else [])


DERIVATIONS = ("uniform", "depth-only", "width-only")


def student_candidates(
    teacher: Arch,
    target_params: float,
    derivation: Literal["uniform", "depth-only", "width-only"] | None = None,
) -> list[Candidate]:
    """Students of the teacher's family near ``target_params`` total parameters, closest first.

    Each derivation (uniform, depth-only, width-only; see the module docstring), or only ``derivation`` where given,
    contributes the shape just below and just above the target; the rows are ranked by ``|log(total / target)|``.
    """
    if derivation is not None and derivation not in DERIVATIONS:
        raise LawError(f"derivation {derivation!r} is not one of {list(DERIVATIONS)} (or None for all of them)")
    widths = _hidden_sizes(teacher)
    uniform = [
        _scaled(
            teacher, h, max(1, round(h / teacher.hidden_size * teacher.num_layers)), h / teacher.hidden_size, "uniform"
        )
        for h in widths
    ]
    width_only = [_scaled(teacher, h, teacher.num_layers, h / teacher.hidden_size, "width-only") for h in widths]
    depth_only = [
        Candidate(
            replace(teacher, num_layers=n, name=f"depth-only x{n / teacher.num_layers:.4g} of {teacher.name}"),
            "depth-only",
            n / teacher.num_layers,
        )
        for n in range(1, teacher.num_layers)
    ]
    groups = {"uniform": uniform, "depth-only": depth_only, "width-only": width_only}
    rows = [c for name, group in groups.items() if derivation in (None, name) for c in _bracket(group, target_params)]
    return sorted(rows, key=lambda c: abs(math.log(c.arch.total_params() / target_params)))


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
        except LawError as e:
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
    """MiniDisc's lambda-tradeoff ``score + lam * (1 - scale)`` per assistant, best first (ties: the smaller one).

    A larger ``lam`` favours smaller assistants; ``lam = 0`` picks the best dev score. The score and lambda share a
    unit: with scores in percent, multiply lambda by 100.
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise LawError(f"lambda must be a finite number >= 0, got {lam}")
    scored = [AssistantScore(n, s, v, v + lam * (1 - s)) for n, s, v in candidates]
    return sorted(scored, key=lambda a: (-a.tradeoff, a.scale))


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
