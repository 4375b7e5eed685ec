"""The memory plan: bytes per GPU of every part of a distillation step, for each teacher placement.

Plain arithmetic on the two models' shapes (:class:`minima.arch.Arch`) and the run's settings, so that it answers
before any GPU is touched (``tools/plan_memory.py``) and at the start of every run, where ``teacher.placement=auto``
takes the first placement that fits, in the order of least communication: ``replicated`` (no teacher traffic),
``node`` (all-gathers inside a node; only on more than one node), ``zero3`` (all-gathers over every GPU).

Per GPU, with P the parameters, w the bytes of the compute dtype (2 for bf16, 4 for fp32), N GPUs, G per node:

- student weights: P_s w (ZeRO-1/2) or P_s w / N (ZeRO-3; 0 with parameter offload);
- student gathered: ZeRO-3's working set of whole parameters, up to ``stage3_max_live_parameters`` (those reused
  within ``stage3_max_reuse_distance`` between forward and backward stay gathered) plus the prefetch bucket;
- student gradients: fp32 partitions, P_s 4 / N at ZeRO-2/3 (plus the reduce bucket), whole at ZeRO-1 (P_s (4 + w)
  in bf16: DeepSpeed's BF16 optimizer accumulates in an fp32 copy); 0 on the GPU with optimizer offload;
- optimizer: fp32 master weights and Adam's two moments, 12 P_s / N (8 P_s / N for an fp32 ZeRO-3 engine, whose
  master weights are its weight shards; in host memory with optimizer offload);
- teacher weights: P_t w replicated, P_t w / N under ZeRO-3, P_t w (1/N + 1/G) node-local (hpZ's second shard);
- teacher gathered: a sharded teacher's working set (all of it when it is smaller than the reuse distance, else a
  layer plus the prefetch bucket);
- activations: what the student's forward saves for backward, per layer and token (measured on transformers'
  Llama in fp32 and bf16 with sdpa and eager attention, see :func:`layer_activation_bytes`), times the layers, or
  with activation checkpointing each layer's input plus one layer recomputed;
- teacher forward: one layer's transient tensors (no_grad keeps nothing else);
- loss: the gathered heads (ZeRO-3), the teacher's last hidden states, the head gradient's fp32 accumulator (and its
  cast), the hidden states' gradient and ``chunk`` x vocabulary fp32 buffers: about 5 per chunk for forward KL and
  CE (closed form), 10 for the other KL-type divergences, 16 for the mixtures (JSD, skew KLs); 4, 6 and 9 when
  ``kd.compile`` fuses them (measured on CPU).

The total is the peak: the resident state (weights, gradients, optimizer states, the teacher's weights) plus the
larger of the teacher forward's part (its gathered weights, one layer's tensors) and the student step's (its gathered
weights, activations and the loss), which are never alive together. A plan fits when its total is at most 90% of
the device's memory minus 1 GiB (CUDA context, communication buffers, allocator fragmentation). On CPU the device is
the host's available memory shared by the node's ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from minima.arch import Arch

GiB = 2**30
RESERVE_FRACTION = 0.10
RESERVE_BYTES = GiB
PLACEMENT_ORDER = ("replicated", "node", "zero3")
PHASES = {
    "resident": ("student weights", "student gradients", "optimizer states", "teacher weights"),
    "teacher forward": ("teacher gathered", "teacher forward"),
    "student step": ("student gathered", "activations", "loss"),
}
"""What is alive together: the resident state always; the teacher's gathered weights and forward tensors are freed
before the student's forward, whose gathered weights, saved activations and loss buffers peak together."""
"""Least teacher communication first: the order in which ``auto`` tries them."""

# (chunk, vocab) fp32 tensors alive at once in one chunk of the loss, eager and compiled (measured on CPU, torch
# 2.13): forward KL and plain CE in closed form, the other KL-type divergences and the mixtures through autograd.
CHUNK_TENSORS = {
    ("closed", False): 5,
    ("closed", True): 4,
    ("kl", False): 10,
    ("kl", True): 6,
    ("mixture", False): 16,
    ("mixture", True): 9,
}
MIXTURE_DIVERGENCES = ("jsd", "skew_forward_kl", "skew_reverse_kl")


class PlanError(ValueError):
    """A setting the plan cannot size; the message names it."""


@dataclass(frozen=True)
class Job:
    """What sizes a step's memory: both shapes, the parallel layout, the batch and the engines' settings."""

    student: Arch
    teacher: Arch | None
    world_size: int
    """GPUs (ranks) in all."""
    gpus_per_node: int
    micro_batch_size: int
    """Sequences per GPU per forward."""
    seq_len: int
    dtype_bytes: int
    """Bytes per element of both models' weights and activations: 2 (bf16) or 4 (fp32)."""
    zero_stage: int
    """The student's ZeRO stage: 1, 2 or 3."""
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_accum_fp32: bool = True
    activation_checkpointing: bool = False
    attention: str = "sdpa"
    """flash_attention_2 or sdpa (no seq_len^2 tensor) or eager (softmax probabilities saved)."""
    vocab_size: int | None = None
    """The tokenizer's length compared by the KD term (default: the student's vocabulary)."""
    chunk_tokens: int = 0
    """Tokens per loss chunk (0 = minima.losses.default_chunk_tokens)."""
    compiled: bool = False
    divergence: str = "forward_kl"
    student_zero: dict[str, Any] = field(default_factory=dict)
    """The student JSON's ``zero_optimization`` (bucket sizes)."""
    teacher_zero: dict[str, Any] = field(default_factory=dict)
    """The teacher JSON's ``zero_optimization``."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise PlanError(f"the student's ZeRO stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.world_size < 1 or self.gpus_per_node < 1 or self.world_size % self.gpus_per_node:
            raise PlanError(
                f"{self.world_size} GPUs in all is not a whole number of nodes of {self.gpus_per_node} GPUs"
            )


@dataclass(frozen=True)
class Plan:
    """Bytes per GPU of each part, for one placement of the teacher."""

    placement: str
    components: dict[str, int]
    host_bytes: int
    """Per rank, in host memory (offloaded optimizer state, gradients and weights)."""
    capacity: int
    """Bytes a plan may use on the device (after the reserve)."""
    device_bytes: int

    @property
    def total(self) -> int:
        """The peak: what stays between steps, plus the larger of the teacher's forward and the student's part."""
        phase = {name: sum(self.components.get(k, 0) for k in keys) for name, keys in PHASES.items()}
        return phase["resident"] + max(phase["teacher forward"], phase["student step"])

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "components": dict(self.components),
            "total": self.total,
            "host_bytes": self.host_bytes,
            "capacity": self.capacity,
            "device_bytes": self.device_bytes,
            "fits": self.fits,
        }


def capacity_of(device_bytes: int) -> int:
    """What a plan may use of a device with ``device_bytes``: 90% minus 1 GiB."""
    return max(0, int(device_bytes * (1 - RESERVE_FRACTION)) - RESERVE_BYTES)


def layer_activation_bytes(arch: Arch, tokens: int, seq_len: int, dtype_bytes: int, attention: str) -> int:
    """Bytes one decoder layer's forward saves for backward, for ``tokens`` tokens in sequences of ``seq_len``.

    Per token, for transformers' Llama layer (RMSNorm in fp32, SwiGLU MLP), from the saved tensors measured on CPU:
    the two norms save 4 w H + 8 H (their fp32 copies), the MLP 4 w I (gate, up, SiLU, product); attention saves
    2 w (q + kv) + 4 heads (sdpa, flash: no seq_len^2 tensor) or 4 w q (keys and values repeated to the query heads)
    plus heads x seq_len softmax probabilities (fp32, and their bf16 cast) with eager attention.
    """
    w, h, i = dtype_bytes, arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    per_token = 4 * w * h + 8 * h + 4 * w * i + 8
    if attention == "eager":
        per_token += 4 * w * q + arch.num_heads * seq_len * (4 + (w if w < 4 else 0))
    else:
        per_token += 2 * w * (q + kv) + 4 * arch.num_heads
    return per_token * tokens


def student_activation_bytes(job: Job) -> int:
    """What the student's forward keeps for backward over all its layers (and the final norm)."""
    arch, tokens, w = job.student, job.micro_batch_size * job.seq_len, job.dtype_bytes
    layer = layer_activation_bytes(arch, tokens, job.seq_len, w, job.attention)
    outside = (w + 4) * arch.hidden_size * tokens  # the final norm: its input and its fp32 copy or output
    if job.activation_checkpointing:
        # Each layer keeps its input; backward recomputes one layer at a time.
        return arch.num_layers * w * arch.hidden_size * tokens + layer + outside
    return arch.num_layers * layer + outside


def _layer_params(arch: Arch) -> int:
    return arch.layer_params()


def _zero3_working_set(params: int, layer: int, zero: dict[str, Any], *, backward: bool) -> int:
    """Elements ZeRO-3 holds whole at once: parameters reused within the reuse distance stay gathered (between the
    forward and the backward of a trained model, or between micro-batches of a teacher smaller than the distance),
    up to the live-parameter cap; plus what the prefetcher fetches ahead."""
    max_live = int(zero.get("stage3_max_live_parameters", 1e9))
    reuse = int(zero.get("stage3_max_reuse_distance", 1e9))
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 5e7))
    kept = min(max_live, reuse)
    if backward:
        return min(params, max(layer, kept) + prefetch)
    return params if params <= kept else min(params, layer + prefetch)


def chunk_tokens_of(job: Job) -> int:
    """Tokens per loss chunk, as minima.losses chooses them when ``kd.chunk_tokens`` is 0."""
    if job.chunk_tokens:
        return job.chunk_tokens
    from minima.losses import default_chunk_tokens  # imports torch: only where a plan is made

    return default_chunk_tokens(max(job.student.vocab_size, job.vocab_size or 0), job.compiled)


def plan(job: Job, placement: str, device_bytes: int) -> Plan:
    """The per-GPU bytes of ``job`` with the teacher placed as ``placement`` (replicated, node or zero3)."""
    if placement not in PLACEMENT_ORDER:
        raise PlanError(f"placement must be one of {list(PLACEMENT_ORDER)}, got {placement!r}")
    s, t, n, g, w = job.student, job.teacher, job.world_size, job.gpus_per_node, job.dtype_bytes
    p_s = s.total_params()
    grad_bytes = 4 if (job.grad_accum_fp32 or w == 4) else w
    reduce_bucket = int(job.student_zero.get("reduce_bucket_size", 5e8)) * w
    parts: dict[str, int] = {}
    host = 0

    if job.zero_stage == 3:
        shard = math.ceil(p_s / n) * w
        parts["student weights"] = 0 if job.offload_params else shard
        host += shard if job.offload_params else 0
        parts["student gathered"] = _zero3_working_set(p_s, _layer_params(s), job.student_zero, backward=True) * w
    else:
        parts["student weights"] = p_s * w
    if job.offload_optimizer:
        parts["student gradients"] = min(reduce_bucket, p_s * w)
        host += math.ceil(p_s / n) * (4 + 12)
        parts["optimizer states"] = 0
    else:
        if job.zero_stage == 1:
            parts["student gradients"] = p_s * (4 + w) if w < 4 else p_s * 4 + math.ceil(p_s / n) * 4
        else:
            parts["student gradients"] = math.ceil(p_s / n) * grad_bytes + min(reduce_bucket, p_s * w)
        # Adam's two moments and fp32 master weights; an fp32 ZeRO-3 engine steps on its weight shards directly.
        master = 0 if (job.zero_stage == 3 and w == 4) else 4
        parts["optimizer states"] = math.ceil(p_s / n) * (8 + master)

    if t is not None:
        p_t = t.total_params()
        if placement == "replicated":
            parts["teacher weights"] = p_t * w
        else:
            parts["teacher weights"] = math.ceil(p_t / n) * w + (math.ceil(p_t / g) * w if placement == "node" else 0)
            parts["teacher gathered"] = _zero3_working_set(p_t, _layer_params(t), job.teacher_zero, backward=False) * w

    tokens = job.micro_batch_size * job.seq_len
    parts["activations"] = student_activation_bytes(job)
    if t is not None:
        parts["teacher forward"] = (3 * t.intermediate_size + 4 * t.hidden_size) * tokens * w  # one layer, no_grad

    vocab = max(s.vocab_size, job.vocab_size or 0, t.vocab_size if t is not None else 0)
    loss = s.vocab_size * s.hidden_size * (4 + (w if w < 4 else 0))  # head gradient: fp32 accumulator + its cast
    loss += tokens * s.hidden_size * w  # the hidden states' gradient
    if t is not None:
        loss += tokens * t.hidden_size * w  # the teacher's last hidden states
    if job.zero_stage == 3 and not s.tie_word_embeddings:
        loss += s.vocab_size * s.hidden_size * w  # the gathered student head
    if t is not None and placement != "replicated":
        loss += t.vocab_size * t.hidden_size * w  # the gathered teacher head
    if t is None or job.divergence == "forward_kl":
        kind = "closed"
    else:
        kind = "mixture" if job.divergence in MIXTURE_DIVERGENCES else "kl"
    loss += CHUNK_TENSORS[kind, job.compiled] * min(chunk_tokens_of(job), tokens) * vocab * 4
    parts["loss"] = loss
    return Plan(placement, parts, host, capacity_of(device_bytes), device_bytes)


def placements_for(job: Job) -> tuple[str, ...]:
    """The placements that differ on this layout: ``node`` only on several nodes of several GPUs."""
    if job.teacher is None:
        return ("replicated",)
    multi_node = 1 < job.gpus_per_node < job.world_size
    return tuple(p for p in PLACEMENT_ORDER if p != "node" or multi_node)


@dataclass(frozen=True)
class Choice:
    """The placement a run uses, why, and every plan that was weighed."""

    placement: str
    reason: str
    plans: dict[str, Plan]
    suggestions: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "reason": self.reason,
            "plans": {k: p.to_dict() for k, p in self.plans.items()},
            "suggestions": list(self.suggestions),
        }


def choose(job: Job, requested: str, device_bytes: int) -> Choice:
    """Resolve ``teacher.placement`` (auto or explicit) against the plans; say what would fit when nothing does."""
    options = placements_for(job)
    plans = {p: plan(job, p, device_bytes) for p in options}
    if requested == "auto":
        fitting = [p for p in options if plans[p].fits]
        placement = fitting[0] if fitting else options[-1]
        reason = (
            f"auto: {placement} is the first of {list(options)} that fits"
            if fitting
            else f"auto: nothing fits; {placement} needs the least memory"
        )
    else:
        placement = requested
        if placement == "node" and "node" not in options:
            # One node: a node-local shard is the ZeRO-3 shard plus a second copy of it. One GPU per node: it is a
            # whole copy per GPU.
            placement = "zero3" if job.gpus_per_node == job.world_size else "replicated"
            reason = f"node on this layout ({job.world_size} GPUs, {job.gpus_per_node} per node) is {placement}"
            plans.setdefault(placement, plan(job, placement, device_bytes))
        else:
            plans.setdefault(placement, plan(job, placement, device_bytes))
            reason = "as configured"
    suggestions = [] if plans[placement].fits else what_would_fit(job, placement, device_bytes)
    return Choice(placement, reason, plans, suggestions)


def what_would_fit(job: Job, placement: str, device_bytes: int) -> list[str]:
    """Changes that would make ``job`` fit (each alone), as override lines with the total they give."""
    cap = capacity_of(device_bytes)
    out = []

    def attempt(label: str, changed: Job, where: str = placement) -> bool:
        p = plan(changed, where, device_bytes)
        if p.total <= cap:
            out.append(f"{label}: {fmt_bytes(p.total)} per GPU")
            return True
        return False

    if not job.activation_checkpointing:
        attempt("run.activation_checkpointing=true", replace(job, activation_checkpointing=True))
    mb = job.micro_batch_size // 2
    while mb >= 1 and not attempt(f"run.micro_batch_size={mb}", replace(job, micro_batch_size=mb)):
        mb //= 2
    if job.zero_stage != 3:
        attempt("run.ds_config=ds_configs/zero3.json", replace(job, zero_stage=3))
    if not job.offload_optimizer:
        attempt(
            "run.ds_config=ds_configs/zero3_offload.json",
            replace(job, zero_stage=3, offload_optimizer=True, offload_params=True),
        )
    if job.teacher is not None and placement != "zero3":
        attempt("teacher.placement=zero3", job, "zero3")
    nodes = job.world_size // job.gpus_per_node
    for more in range(nodes + 1, 8 * nodes + 1):
        bigger = replace(job, world_size=more * job.gpus_per_node)
        if plan(bigger, "zero3", device_bytes).total <= cap:
            out.append(
                f"{more * job.gpus_per_node} GPUs ({more} nodes) with teacher.placement=zero3:"
                f" {fmt_bytes(plan(bigger, 'zero3', device_bytes).total)} per GPU"
            )
            break
    return out


def fmt_bytes(n: float) -> str:
    """Bytes as GB (1e9) with two decimals, or MB below 1 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def format_choice(job: Job, choice: Choice) -> str:
    """The plans side by side, the choice and, when nothing fits, what would."""
    names = list(choice.plans)
    rows = sorted({k for p in choice.plans.values() for k in p.components}, key=_component_order)
    width = max(len(r) for r in [*rows, "host (per rank)"]) + 2
    any_plan = next(iter(choice.plans.values()))
    head = (
        f"memory plan per GPU: {job.world_size} GPUs ({job.gpus_per_node} per node) of"
        f" {fmt_bytes(any_plan.device_bytes)} (usable {fmt_bytes(any_plan.capacity)}); student ZeRO-{job.zero_stage}"
        f"{' + offload' if job.offload_optimizer else ''}, {'bf16' if job.dtype_bytes == 2 else 'fp32'},"
        f" micro-batch {job.micro_batch_size} x {job.seq_len}, activation checkpointing"
        f" {'on' if job.activation_checkpointing else 'off'}, {job.attention}"
    )
    lines = [head, "".ljust(width) + "".join(f"{n:>14}" for n in names)]
    for r in rows:
        cells = "".join(f"{fmt_bytes(choice.plans[n].components.get(r, 0)):>14}" for n in names)
        lines.append(r.ljust(width) + cells)
    lines.append("peak".ljust(width) + "".join(f"{fmt_bytes(choice.plans[n].total):>14}" for n in names))
    lines.append("fits".ljust(width) + "".join(f"{'yes' if choice.plans[n].fits else 'no':>14}" for n in names))
    if any(p.host_bytes for p in choice.plans.values()):
        lines.append(
            "host (per rank)".ljust(width) + "".join(f"{fmt_bytes(choice.plans[n].host_bytes):>14}" for n in names)
        )
    if job.teacher is not None:
        lines.append(f"teacher.placement -> {choice.placement} ({choice.reason})")
    if choice.suggestions:
        lines.append("does not fit; each of these would: " + "; ".join(choice.suggestions))
    return "\n".join(lines)


_ORDER = (
    "student weights",
    "student gathered",
    "student gradients",
    "optimizer states",
    "teacher weights",
    "teacher gathered",
    "activations",
    "teacher forward",
    "loss",
)


def _component_order(name: str) -> int:
    return _ORDER.index(name) if name in _ORDER else len(_ORDER)


def job_for(
    cfg: Any,
    student: Arch,
    teacher: Arch | None,
    *,
    world_size: int,
    gpus_per_node: int,
    dtype_bytes: int,
    attention: str,
    student_ds: dict[str, Any],
    teacher_ds: dict[str, Any],
    vocab_size: int,
    compiled: bool,
) -> Job:
    """The :class:`Job` of a run: ``cfg`` a ``minima.config.Config``, the two shapes, and the engines' JSON settings
    (the student's decides the ZeRO stage and offload)."""
    zero = student_ds.get("zero_optimization", {})
    grad_accum = student_ds.get("data_types", {}).get("grad_accum_dtype", "fp32" if dtype_bytes == 2 else None)
    return Job(
        student=student,
        teacher=teacher,
        world_size=world_size,
        gpus_per_node=gpus_per_node,
        micro_batch_size=cfg.run.micro_batch_size,
        seq_len=cfg.data.seq_len,
        dtype_bytes=dtype_bytes,
        zero_stage=int(zero.get("stage", 0)),
        offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme"),
        offload_params=zero.get("offload_param", {}).get("device", "none") in ("cpu", "nvme"),
        grad_accum_fp32=grad_accum in ("fp32", "float32", None) or dtype_bytes == 4,
        activation_checkpointing=cfg.run.activation_checkpointing,
        attention=attention,
        vocab_size=vocab_size,
        chunk_tokens=cfg.kd.chunk_tokens,
        compiled=compiled,
        divergence=cfg.kd.divergence,
        student_zero=zero,
        teacher_zero=teacher_ds.get("zero_optimization", {}),
    )
