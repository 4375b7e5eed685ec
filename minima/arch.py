"""Decoder-only architectures for the law of capacity gap: exact parameter counts, FLOPs, and concrete students.

An :class:`Arch` is a LLaMA-style transformer's shape (llama, mistral, qwen2, qwen3, and the mixture-of-experts
qwen2_moe and mixtral), read from a preset (``minima/presets/*.json``), a Hugging Face model directory or a
``config.json``, and written back as a transformers config. :mod:`minima.law` says which *size* a student should have;
this module turns that size into shapes.

**Counts.** ``total_params`` is every parameter once (input embedding and output head included; a tied head once) and
equals ``sum(p.numel())`` of the transformers model. ``active_params`` is what one token goes through: total minus,
in every MoE layer, the ``E - k`` experts the router did not pick (the router, a qwen2_moe shared expert and its
1 x hidden sigmoid gate are active); for a dense model it is the total. ``non_embedding_params`` is total minus the
input embedding and an untied output head. Which count the law is applied to is the caller's choice (``--count``).

**Mixtures of experts.** A qwen2_moe layer ``i`` is sparse unless ``i`` is in ``mlp_only_layers`` or ``(i + 1)`` is
not a multiple of ``decoder_sparse_step`` (transformers' rule); a sparse layer holds ``E`` experts of width
``moe_intermediate_size`` (fused ``gate_up_proj`` (E, 2m, h) and ``down_proj`` (E, h, m)), the router (E, h), a shared
expert of width ``shared_expert_intermediate_size`` and its gate (1, h) (built even at width 0); a dense layer has an
FFN of ``intermediate_size``. Every mixtral layer is sparse: ``num_local_experts`` experts of ``intermediate_size``
and the router, no shared expert. :func:`moe_student` turns a dense shape into minima's MoE student (a LLaMA-equivalent
qwen2_moe, routing as in :mod:`minima.moe`): ``E`` experts each of the dense FFN's width, top-k, so its active size is
the dense shape's plus the router.

**FLOPs per token** (training, forward + backward, PaLM's appendix B): ``6 * N_matmul + 12 * L * n_heads * head_dim
* seq_len``, where ``N_matmul`` counts the weights of every matrix product a token goes through (attention and MLP
projections, the top-k experts, router and shared expert of MoE layers, and the output head; not the input-embedding
lookup, norms or biases) and the second term is attention's ``QK^T`` and ``AV`` over a full context of ``seq_len`` (no
causal halving). A forward pass alone is a third of it.

**Candidate students** keep the teacher's family: model_type, vocabulary, head_dim, tie setting and the query heads
per key/value head (where the head count allows it; else the nearest ratio, said in the row). Three derivations,
each enumerated over hardware-friendly sizes, keep the shapes just below and just above the target size (the law's
optimal student S*), and all rows are ranked by ``|log(params / S*)|``:

- *uniform* (MiniMA): one factor f = hidden'/hidden on width, heads, FFN and depth (layers = round(f * L));
- *depth-only*: the teacher's widths, fewer layers;
- *width-only*: the teacher's depth, hidden, heads and FFN scaled by one factor.

Hidden sizes are multiples of 128 and FFN sizes multiples of 256 (nearest multiple). A size below one multiple (tiny
teachers) uses the largest power of two that fits in it as its multiple, so it becomes a power of two, and the row
says so. For LLaMA-2-7B, f = 0.75 gives MiniMA's 24 layers x 3072 hidden (24 heads of 128) x FFN 8192. An MoE teacher's
students keep its experts and routing, expert and shared-expert widths scaled like the FFN; with ``experts`` every
dense shape is first turned into an MoE (:func:`moe_student`). Shapes are bracketed and ranked by the ``count`` asked
for (active or total parameters).
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
    "qwen2_moe": ("qkv_bias", False, False, False),
    "mixtral": (False, False, False, False),
}

Count = Literal["active", "total"]
COUNTS = ("active", "total")


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
    num_experts: int = 0
    """FFN experts of each MoE layer (0: a dense model)."""
    experts_per_token: int = 0
    """Experts a token goes through in an MoE layer (the router's top-k)."""
    expert_size: int = 0
    """FFN width of one expert (qwen2_moe ``moe_intermediate_size``, mixtral ``intermediate_size``)."""
    shared_expert_size: int = 0
    """qwen2_moe: FFN width of the shared expert every token goes through (its 1 x hidden gate is always there)."""
    sparse_step: int = 1
    """qwen2_moe ``decoder_sparse_step``: layer i is MoE where (i + 1) is a multiple of it."""
    dense_layers: tuple[int, ...] = ()
    """qwen2_moe ``mlp_only_layers``: layers kept dense."""
    name: str = ""
    """Where it came from (preset, path) or how it was derived."""
    base_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The source transformers config as a dict: the fields a written student config inherits (rope, eps, ids)."""

    def moe_layers(self) -> int:
        """How many layers are MoE (transformers' rule: not in ``mlp_only_layers``, (i + 1) % sparse_step == 0)."""
        if not self.num_experts:
            return 0
        return sum(1 for i in range(self.num_layers) if i not in self.dense_layers and (i + 1) % self.sparse_step == 0)

    def expert_params(self) -> int:
        """Parameters of one expert (a bias-free gated FFN of ``expert_size``): gate, up and down projections."""
        return 3 * self.hidden_size * self.expert_size

    def _attention_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return (
            2 * h * q + 2 * h * kv + (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * self.head_dim * self.qk_norm
        )

    def _dense_mlp_params(self) -> int:
        return (
            3 * self.hidden_size * self.intermediate_size
            + (2 * self.intermediate_size + self.hidden_size) * self.mlp_bias
        )

    def _moe_mlp_params(self, experts: int) -> int:
        """An MoE layer's MLP with ``experts`` of its experts: the experts, the router (E x hidden) and, in qwen2_moe,
        the shared expert and its gate (1 x hidden)."""
        h = self.hidden_size
        shared = 3 * h * self.shared_expert_size + h if self.model_type == "qwen2_moe" else 0
        return experts * self.expert_params() + self.num_experts * h + shared

    def layer_params(self) -> int:
        """Parameters of one decoder layer (an MoE layer where the model has any: the largest): attention, MLP, two
        RMSNorms (plus q/k norms where the family has them)."""
        mlp = self._moe_mlp_params(self.num_experts) if self.moe_layers() else self._dense_mlp_params()
        return self._attention_params() + mlp + 2 * self.hidden_size

    def embedding_params(self) -> int:
        """Input embedding plus an untied output head (a tied head shares the embedding's V x H)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def total_params(self) -> int:
        """Every parameter once: embeddings, layers, the final norm (equals ``sum(p.numel())`` of the HF model)."""
        moe, dense = self.moe_layers(), self.num_layers - self.moe_layers()
        mlps = dense * self._dense_mlp_params() + moe * self._moe_mlp_params(self.num_experts)
        layers = self.num_layers * (self._attention_params() + 2 * self.hidden_size) + mlps
        return self.embedding_params() + layers + self.hidden_size

    def active_params(self) -> int:
        """Parameters one token goes through: total minus the ``E - k`` experts it skips in every MoE layer (the
        total for a dense model). The input embedding counts whole, as in the total."""
        return (
            self.total_params() - self.moe_layers() * (self.num_experts - self.experts_per_token) * self.expert_params()
        )

    def params(self, count: Count) -> int:
        """``active_params`` or ``total_params``."""
        if count not in COUNTS:
            raise ArchError(f"count {count!r} is not one of {list(COUNTS)}")
        return self.active_params() if count == "active" else self.total_params()

    def non_embedding_params(self) -> int:
        """Total minus the input embedding and an untied output head."""
        return self.total_params() - self.embedding_params()

    def matmul_params(self) -> int:
        """Weights of the matrix products one token goes through: projections of every layer (in an MoE layer the
        top-k experts, the router and a shared expert with its gate) and the output head."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        moe, dense = self.moe_layers(), self.num_layers - self.moe_layers()
        mlps = dense * 3 * h * self.intermediate_size + moe * self._moe_mlp_params(self.experts_per_token)
        return self.num_layers * (2 * h * q + 2 * h * kv) + mlps + self.vocab_size * h

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context ``seq_len``: 6 N_matmul + 12 L n_heads d_head T."""
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return 6.0 * self.matmul_params() + attention

    def shape(self) -> str:
        """One line: layers x hidden, heads / kv heads x head_dim, FFN (an MoE's experts, top-k, shared expert)."""
        line = (
            f"{self.num_layers}L x {self.hidden_size} ({self.num_heads}/{self.num_kv_heads} heads x {self.head_dim}),"
        )
        if not self.moe_layers():
            return f"{line} FFN {self.intermediate_size}"
        line += f" {self.num_experts} experts of FFN {self.expert_size}, top-{self.experts_per_token}"
        if self.model_type == "qwen2_moe":
            line += f", shared expert {self.shared_expert_size}"
        if self.moe_layers() < self.num_layers:
            line += f", {self.num_layers - self.moe_layers()} dense layers of FFN {self.intermediate_size}"
        return line

    def summary(self, seq_len: int) -> dict[str, Any]:
        """The shape and its counts as plain values (for tables and JSON)."""
        return {
            "model_type": self.model_type,
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "ffn": self.expert_size if self.moe_layers() else self.intermediate_size,
            "vocab": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "experts": self.num_experts if self.moe_layers() else 0,
            "experts_per_token": self.experts_per_token if self.moe_layers() else 0,
            "moe_layers": self.moe_layers(),
            "shared_expert": self.shared_expert_size,
            "total_params": self.total_params(),
            "active_params": self.active_params(),
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
        if self.model_type == "qwen2_moe":
            fields.update(
                qkv_bias=self.qkv_bias,
                num_experts=self.num_experts,
                num_experts_per_tok=self.experts_per_token,
                moe_intermediate_size=self.expert_size,
                shared_expert_intermediate_size=self.shared_expert_size,
                decoder_sparse_step=self.sparse_step,
                mlp_only_layers=list(self.dense_layers),
            )
        elif self.model_type == "mixtral":  # its intermediate_size is the experts' width
            fields.update(
                num_local_experts=self.num_experts,
                num_experts_per_tok=self.experts_per_token,
                intermediate_size=self.expert_size,
            )
        return AutoConfig.for_model(self.model_type, **fields)


def preset_names() -> list[str]:
    """Built-in teacher configs (``minima/presets/*.json``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def arch_from_hf_config(config, name: str = "") -> Arch:
    """The :class:`Arch` of a transformers config of a supported family (llama, mistral, qwen2, qwen3, qwen2_moe,
    mixtral)."""
    if config.model_type not in FAMILIES:
        raise ArchError(
            f"{name or 'config'}: model_type {config.model_type!r} is not supported; the parameter counts know"
            f" {sorted(FAMILIES)}"
        )

    def flag(rule: bool | str) -> bool:
        return bool(getattr(config, rule, False)) if isinstance(rule, str) else rule

    qkv, o, mlp, qk_norm = FAMILIES[config.model_type]
    heads = config.num_attention_heads
    moe: dict[str, Any] = {}
    if config.model_type == "qwen2_moe":
        moe = dict(
            num_experts=config.num_experts,
            experts_per_token=config.num_experts_per_tok,
            expert_size=config.moe_intermediate_size,
            shared_expert_size=config.shared_expert_intermediate_size,
            sparse_step=config.decoder_sparse_step,
            dense_layers=tuple(sorted(set(config.mlp_only_layers or ()))),
        )
    elif config.model_type == "mixtral":
        moe = dict(
            num_experts=config.num_local_experts,
            experts_per_token=config.num_experts_per_tok,
            expert_size=config.intermediate_size,
        )
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
        **moe,
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

    def row(self, teacher: Arch, target: float, seq_len: int, count: Count = "total") -> dict[str, Any]:
        """The table row: the shape, its counts, its ratios to the teacher and the target (in ``count``), the
        derivation."""
        n = self.arch.params(count)
        return {
            **self.arch.summary(seq_len),
            "ratio_to_teacher": n / teacher.params(count),
            "ratio_to_optimum": n / target,
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
    expert, shared = teacher.expert_size, teacher.shared_expert_size
    if teacher.num_experts:  # an MoE teacher: its experts (and a shared expert wider than off) scale like the FFN
        expert = min(hardware_size(f * expert, FFN_MULTIPLE)[0], expert)
        if shared > 1:
            shared = min(hardware_size(f * shared, FFN_MULTIPLE)[0], shared)
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
        expert_size=expert,
        shared_expert_size=shared,
        dense_layers=tuple(i for i in teacher.dense_layers if i < layers),
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


def _bracket(cands: list[Candidate], target: float, count: Count) -> list[Candidate]:
    """The candidates nearest ``target`` from below and from above (by ``count`` parameters)."""
    below = [c for c in cands if c.arch.params(count) <= target]
    above = [c for c in cands if c.arch.params(count) > target]
    picked = [max(below, key=lambda c: c.arch.params(count))] if below else []
    return picked + ([min(above, key=lambda c: c.arch.params(count))] if above else [])


def moe_student(dense: Arch, num_experts: int, top_k: int = 1) -> Arch:
    """minima's MoE student of a dense shape: transformers' qwen2_moe as a LLaMA-equivalent MoE, every layer ``E``
    experts each of the dense FFN's width, top-``k`` routing without renormalisation (:mod:`minima.moe`).

    Attention (q/k/v biases for a qwen2 shape, none for llama/mistral), norms, embeddings, RoPE, eps, positions and
    special ids are the dense shape's; no sliding window. The shared expert Qwen2-MoE always builds is switched off
    at ``minima.moe.SHARED_EXPERT_OFF`` wide (zero weights; see there why not 0). Active parameters: the dense
    shape's, plus per layer the router (E x hidden) and the shared expert with its gate."""
    if dense.num_experts:
        raise ArchError(
            f"{dense.name or dense.model_type} is already an MoE ({dense.num_experts} experts): its students keep its"
            " experts; drop --moe"
        )
    if num_experts < 2:
        raise ArchError(f"--moe {num_experts}: an MoE needs at least 2 experts (e.g. --moe 4)")
    if not 1 <= top_k <= num_experts:
        raise ArchError(f"--moe-top-k {top_k}: must be between 1 and the number of experts ({num_experts})")
    if dense.o_bias or dense.mlp_bias or dense.qk_norm:
        raise ArchError(
            f"{dense.name or dense.model_type} has o_proj/MLP biases or q/k norms, which qwen2_moe does not have:"
            " --moe needs a bias-free llama, mistral or qwen2 teacher"
        )
    from minima.moe import SHARED_EXPERT_OFF  # imports torch: only for MoE students

    inherited = ("rope_parameters", "rms_norm_eps", "max_position_embeddings", "initializer_range", "hidden_act")
    inherited += ("bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "dtype")
    base = {k: dense.base_config[k] for k in inherited if k in dense.base_config}
    base.update(
        head_dim=dense.head_dim,
        norm_topk_prob=False,  # renormalised top-1 weights are exactly 1: the gate would get no task gradient
        use_sliding_window=False,
        output_router_logits=False,
    )
    return replace(
        dense,
        model_type="qwen2_moe",
        num_experts=num_experts,
        experts_per_token=top_k,
        expert_size=dense.intermediate_size,  # intermediate_size stays: qwen2_moe uses it for dense layers only
        shared_expert_size=SHARED_EXPERT_OFF,
        sparse_step=1,
        dense_layers=(),
        name=f"{dense.name}, {num_experts} experts top-{top_k}",
        base_config=base,
    )


DERIVATIONS = ("uniform", "depth-only", "width-only")


def student_candidates(
    teacher: Arch,
    target_params: float,
    derivation: Literal["uniform", "depth-only", "width-only"] | None = None,
    count: Count = "total",
    experts: int = 0,
    top_k: int = 1,
) -> list[Candidate]:
    """Students of the teacher's family near ``target_params`` parameters (``count``: active or total), closest first.

    Each derivation (uniform, depth-only, width-only; see the module docstring), or only ``derivation`` where given,
    contributes the shape just below and just above the target; the rows are ranked by ``|log(params / target)|``.
    With ``experts`` every dense shape becomes its :func:`moe_student` (``experts`` experts, ``top_k``) before that.
    """
    if derivation is not None and derivation not in DERIVATIONS:
        raise ArchError(f"derivation {derivation!r} is not one of {list(DERIVATIONS)} (or None for all of them)")
    if count not in COUNTS:
        raise ArchError(f"count {count!r} is not one of {list(COUNTS)}")
    if experts:
        moe_student(teacher, experts, top_k)  # the teacher's errors (already MoE, biases) once, naming the flag
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
            replace(
                teacher,
                num_layers=n,
                dense_layers=tuple(i for i in teacher.dense_layers if i < n),
                name=f"depth-only x{n / teacher.num_layers:.4g} of {teacher.name}",
            ),
            "depth-only",
            n / teacher.num_layers,
        )
        for n in range(1, teacher.num_layers)
    ]
    groups = {"uniform": uniform, "depth-only": depth_only, "width-only": width_only}
    if experts:
        groups = {
            name: [replace(c, arch=moe_student(c.arch, experts, top_k)) for c in group]
            for name, group in groups.items()
        }
    rows = [
        c for name, group in groups.items() if derivation in (None, name) for c in _bracket(group, target_params, count)
    ]
    return sorted(rows, key=lambda c: abs(math.log(c.arch.params(count) / target_params)))
