"""Decoder-only architectures for the law of capacity gap: exact parameter counts, FLOPs, and concrete students.

An :class:`Arch` is a LLaMA-style transformer's shape (llama, mistral, qwen2, qwen3), read from a preset
(``minima/presets/*.json``), a Hugging Face model directory or a ``config.json``, and written back as a transformers
config. :mod:`minima.law` says which *size* a student should have; this module turns that size into shapes.

**Counts.** ``total_params`` is every parameter once (input embedding and output head included; a tied head once) and
equals ``sum(p.numel())`` of the transformers model: the count the law is applied to. ``non_embedding_params`` is
total minus the input embedding and an untied output head.

**FLOPs per token** (training, forward + backward, PaLM's appendix B): ``6 * N_matmul + 12 * L * n_heads * head_dim
* seq_len``, where ``N_matmul`` counts the weights of every matrix product a token goes through (attention and MLP
projections and the output head, not the input-embedding lookup, norms or biases) and the second term is attention's
``QK^T`` and ``AV`` over a full context of ``seq_len`` (no causal halving). A forward pass alone is a third of it.

**Candidate students** keep the teacher's family: model_type, vocabulary, head_dim, tie setting and the query heads
per key/value head (where the head count allows it; else the nearest ratio, said in the row). Three derivations,
each enumerated over hardware-friendly sizes, keep the shapes just below and just above the target size (the law's
optimal student S*), and all rows are ranked by ``|log(params / S*)|``:

- *uniform* (MiniMA): one factor f = hidden'/hidden on width, heads, FFN and depth (layers = round(f * L));
- *depth-only*: the teacher's widths, fewer layers;
- *width-only*: the teacher's depth, hidden, heads and FFN scaled by one factor.

Hidden sizes are multiples of 128 and FFN sizes multiples of 256 (nearest multiple). A size below one multiple (tiny
teachers) uses the largest power of two that fits in it as its multiple, so it becomes a power of two, and the row
says so. For LLaMA-2-7B, f = 0.75 gives MiniMA's 24 layers x 3072 hidden (24 heads of 128) x FFN 8192.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

PRESETS_DIR = Path(__file__).parent / "presets"

HIDDEN_MULTIPLE = 128
FFN_MULTIPLE = 256


class ArchError(ValueError):
    """A model spec or size that cannot be read or counted; the message names it and says what to give instead."""


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
        raise ArchError(
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
        raise ArchError(
            f"{spec!r} is neither a preset ({', '.join(preset_names())}) nor a model directory with a config.json"
            " nor a config.json file"
        )
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArchError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise ArchError(f"{path}: a transformers config.json needs a 'model_type' (e.g. llama) next to its sizes")
    model_type = fields.pop("model_type")
    if model_type not in FAMILIES:
        raise ArchError(
            f"{path}: model_type {model_type!r} is not supported; the parameter counts know {sorted(FAMILIES)}"
        )
    from transformers import AutoConfig  # imports torch (seconds): only once the input is known to be usable

    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers validates sizes (hidden % heads): ValueError, or huggingface_hub's strict
        # dataclass errors (transformers 5), which derive from Exception only
        raise ArchError(f"{path}: transformers rejects this {model_type} config: {' '.join(str(e).split())}") from None
    return arch_from_hf_config(config, name=spec)


SUFFIXES = {"K": 3, "M": 6, "B": 9, "G": 9, "T": 12}
"""Powers of ten of the count suffixes."""


def parse_count(text: str | float, what: str = "parameter count") -> float:
    """A positive count written as ``6.7e9``, ``6738415616``, ``7B``, ``350M`` or ``125k``."""
    raw = str(text).strip().replace("_", "")
    exponent = SUFFIXES.get(raw[-1:].upper())
    # Decimal scales exactly, so "1.07B" is the same float as "1.07e9" (float("1.07") * 1e9 is not) and runs written
    # either way group as one student size in minima.law.fit_law.
    try:
        value = float(Decimal(raw[:-1] if exponent else raw).scaleb(exponent or 0))
    except (InvalidOperation, ValueError):
        raise ArchError(f"{what} {text!r} is not a number (write e.g. 6.7e9, 7B or 350M)") from None
    if not math.isfinite(value) or value <= 0:
        raise ArchError(f"{what} {text!r} must be a positive number")
    return value


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
        raise ArchError(f"derivation {derivation!r} is not one of {list(DERIVATIONS)} (or None for all of them)")
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
