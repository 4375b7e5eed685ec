"""MiniDisc's candidate teacher assistants: weight-shared prunings of the teacher, as masks on the teacher's shape.

MiniDisc ("Minimal Distillation Schedule", Zhang et al.) looks for the teacher assistant between a teacher and its
student: candidate assistants are prunings of the teacher at many sparsities that share its weights, trained together
(every batch runs each candidate), scored on a dev set, and the one with the best ``score + lam * sparsity`` is
chosen. This module is the logic of the candidates; the training loop that drives them is ``minima.distill``'s.

- **Sparsities** (:data:`DEFAULT_SPARSITIES`): the official code's 0, 10, ..., 90 % plus 85 and 95 %, of which those
  >= 50 % are kept. Sparsities are floats throughout, compared as numbers (the official code compares them as
  strings, which puts "5" after "10" and tells "0.5" from "0.50").
- **Shape** (:func:`shape_at`, MiniMA's per-axis rule): a matrix's parameters scale with the product of two widths, so
  a sparsity ``s`` keeps the fraction ``k = sqrt(1 - s)`` of every width axis (the official MiniMA code's
  ``sqrt_sparsity = 1 - sqrt(1 - s)``) and every layer: ``kv' = max(1, round(k * kv_heads))`` key/value heads with
  their whole query groups (``heads' = kv' * heads / kv_heads``), ``ffn' = max(1, round(k * ffn))`` neurons and
  ``hidden' = max(1, round(k * hidden))`` residual dimensions, rounding halves up. LlamaConfig refuses a
  ``hidden_size`` that is not a multiple of ``num_attention_heads`` (qwen2 and mistral do not): when the teacher's
  hidden size is such a multiple (every released LLaMA-family checkpoint), ``hidden'`` moves to the nearest multiple of
  ``heads'`` (a half to the larger), so every candidate keeps the divisibility its teacher had and transformers accepts
  it. For LLaMA-2-7B at 50 %: 23 heads, 2898 hidden (2896 before the move), 7784 neurons. Sparsity 0 is the teacher.
  The sparsity is nominal: the embeddings and output head shrink with ``k``, not ``k^2``.
- **Which units** (:func:`candidate_plans`): ``minima.prune.make_plan`` on the teacher's importances, all layers kept,
  so each candidate keeps its most important head groups, neurons and hidden dimensions (and, selection being top-k
  of one ranking, a sparser candidate's units are a subset of a denser one's).
- **Masked forward** (:class:`CandidateMasks`): the candidates run in the teacher's own modules, through hooks that
  never touch a parameter (so they work under ZeRO-3, where a module's parameters are whole only inside its own
  forward, and a forward hook registered after DeepSpeed's may run after their release). The embedding output and
  every ``o_proj`` and ``down_proj`` output are multiplied by the hidden mask, so the residual stream is exactly zero
  on the masked dimensions; each ``o_proj`` input (heads side by side, ``head_dim`` each) by the head mask and each
  ``down_proj`` input by the neuron mask. Each RMSNorm then sees a stream of ``D`` dims of which only ``D'`` can be
  non-zero; with ``c = sqrt(D / D')``::

      norm_D(c x) = w * c x / sqrt(mean_D((c x)^2) + eps)
                  = w * c x / sqrt(c^2 * (D' / D) * mean_D'(x^2) + eps)      (the masked dims add nothing)
                  = c * [w * x / sqrt(mean_D'(x^2) + eps)]  =  c * norm_D'(x)

  so a pre-hook multiplies the norm's input by ``c`` and a forward hook its output by ``1 / c`` (and the hidden mask),
  and every norm (both of each layer and the final one) gives the sliced model's, eps included. The masked model is
  then the sliced model (:func:`slice_candidate`) up to floating-point rounding: RMSNorm computes in fp32 whatever the
  model's dtype, and in bf16 the products by ``c`` and ``1 / c`` round to bf16. ``c`` and ``1 / c`` multiply as Python
  floats, the 0/1 masks are fp32 tensors moved lazily to the activation's device and dtype. With the full model
  selected nothing is changed, and an all-ones candidate (``c = 1``) multiplies by ones: both are bit-identical to
  the model without hooks.
- **The active candidate** is set by :meth:`CandidateMasks.select` and stays until the next call, so the recomputed
  forward of activation checkpointing (in backward) sees the masks its forward saw: select, then forward and backward.
- **Scores** (:func:`score_candidates`): next-token accuracy (higher is better) and mean CE of every candidate on dev
  batches, from the last hidden states and the output head a chunk of tokens at a time; every batch runs every
  candidate, so all ZeRO-3 ranks run the same forwards. Raw sums come back for the all-reduce over ranks.
- **Choice** (:func:`tradeoff_select`): ``value = score + lam * sparsity`` (``= score + lam * (1 - scale)``, the
  tradeoff of ``minima.law.select_assistant``), ``lam`` a float (the official code declares it int, so ``--lam 0.5``
  fails there); among candidates no sparser than the student (the student's own sparsity being "no assistant") and no
  denser than the current teacher; values within 1e-9 count as equal and go to the smaller sparsity, the larger
  assistant, which is then the safer step from the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from numbers import Real
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from minima.data import Batch
from minima.importance import Importance, Shape
from minima.losses import _head_logits, default_chunk_tokens
from minima.models import causal_lm, last_hidden, output_head
from minima.prune import (
    FAMILY,
    Plan,
    check_target,
    make_plan,
    stored_dtype,
    student_config,
    student_state_dict,
    write_student,
)
from minima.shards import IGNORE_INDEX

DEFAULT_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
"""The official MiniDisc sparsities (0, 10, ..., 90 % plus 85 and 95 %) from 50 % up."""
TIE_TOLERANCE = 1e-9
"""Tradeoff values this close count as equal (float sums such as 0.6 + 0.35 * 0.5 and 0.53 + 0.35 * 0.7)."""


class CandidateError(ValueError):
    """A sparsity, plan, model or option the candidates cannot work with; the message names the value."""


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in [0, 1), or a CandidateError naming it."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0 <= sparsity < 1:
        raise CandidateError(
            f"sparsity {sparsity!r} is not a number in [0, 1): it is the fraction of the teacher's width parameters"
            " removed (0 = the teacher, 0.75 keeps half of every width axis)"
        )
    return float(sparsity)


def _round(x: float) -> int:
    """Nearest integer, halves up (Python's ``round`` takes halves to the even neighbour: 2.5 -> 2)."""
    return math.floor(x + 0.5)


def shape_at(teacher: Shape, sparsity: float) -> Shape:
    """The candidate's shape at ``sparsity``: ``k = sqrt(1 - sparsity)`` of every width axis, whole GQA groups, all
    layers (the rule and the hidden-size rounding are in the module docstring)."""
    k = math.sqrt(1.0 - check_sparsity(sparsity))
    group = teacher.heads // teacher.kv_heads
    kv_heads = max(1, _round(k * teacher.kv_heads))
    heads = kv_heads * group
    hidden = max(1, _round(k * teacher.hidden))
    if teacher.hidden % teacher.heads == 0:  # keep the divisibility LlamaConfig asks for
        hidden = heads * min(max(1, _round(hidden / heads)), teacher.hidden // heads)
    return Shape(
        layers=teacher.layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        ffn=max(1, _round(k * teacher.ffn)),
        head_dim=teacher.head_dim,
    )


def _check_sparsities(sparsities: Iterable[float]) -> tuple[float, ...]:
    values = tuple(check_sparsity(s) for s in sparsities)
    if not values:
        raise CandidateError(
            "no candidate sparsities given: give at least one, e.g. minima.candidates.DEFAULT_SPARSITIES"
        )
    if len(set(values)) != len(values):
        raise CandidateError(f"candidate sparsities {list(values)} repeat a value: give each sparsity once")
    return values


def candidate_plans(imp: Importance, teacher: Shape, sparsities: Sequence[float] = DEFAULT_SPARSITIES) -> list[Plan]:
    """One ``minima.prune`` plan per sparsity (in the order given): the teacher's most important units at
    :func:`shape_at`'s sizes, all layers kept. ``imp`` holds the teacher's summed importances."""
    want = {"heads": (teacher.layers, teacher.heads), "neurons": (teacher.layers, teacher.ffn)}
    want |= {"hidden": (teacher.hidden,)}
    for name, size in want.items():
        if tuple(getattr(imp, name).shape) != size:
            raise CandidateError(
                f"importance {name} has shape {tuple(getattr(imp, name).shape)}, the teacher's shape needs {size}"
            )
    plans = []
    for sparsity in _check_sparsities(sparsities):
        target = check_target(teacher, shape_at(teacher, sparsity), where=f"candidate at sparsity {sparsity}")
        plans.append(make_plan(imp, teacher, target, "symmetric"))
    return plans


def plan_shape(plan: Plan, teacher: Shape) -> Shape:
    """The sizes a plan keeps (head_dim the teacher's)."""
    return Shape(
        layers=len(plan.layers),
        hidden=len(plan.hidden),
        heads=len(plan.heads[0]),
        kv_heads=len(plan.kv_heads[0]),
        ffn=len(plan.neurons[0]),
        head_dim=teacher.head_dim,
    )


# ----------------------------------------------------------------------------------------------------------------------
# The masked forward.


class Hooks:
    """The hooks :meth:`CandidateMasks.install` registered: ``remove()`` them, or use as a context manager."""

    def __init__(self, handles: list, on_remove: Callable[[], None]) -> None:
        self.handles, self.on_remove = handles, on_remove

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.on_remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class CandidateMasks:
    """0/1 fp32 masks of N candidates on the teacher's shape, applied through hooks to the candidate selected.

    Attributes:
        sparsities: (N,) the candidates' sparsities, in the order of ``index``.
        heads: (N, L, H) query-head masks; neurons: (N, L, F) FFN-neuron masks; hidden: (N, D) residual-stream masks.
        head_dim: the teacher's head size (the o_proj input holds H heads of it side by side).
        active: the selected candidate, or None for the full model.
    """

    def __init__(
        self,
        sparsities: Sequence[float],
        heads: torch.Tensor,
        neurons: torch.Tensor,
        hidden: torch.Tensor,
        head_dim: int,
    ) -> None:
        self.sparsities = _check_sparsities(sparsities)
        n = len(self.sparsities)
        if not (heads.shape[0] == neurons.shape[0] == hidden.shape[0] == n):
            raise CandidateError(
                f"{n} sparsities but masks for {heads.shape[0]}, {neurons.shape[0]}, {hidden.shape[0]}"
            )
        self.heads, self.neurons, self.hidden = heads.float(), neurons.float(), hidden.float()
        self.head_dim = head_dim
        kept = self.hidden.sum(dim=1)
        if (kept < 1).any():
            raise CandidateError("a candidate keeps no hidden dimension")
        # c = sqrt(D / D') of the module docstring, per candidate, as Python floats (exact in fp64 activations)
        self.norm_scale = [math.sqrt(self.hidden.shape[1] / float(d)) for d in kept]
        self.active: int | None = None
        self._cache: dict[tuple, torch.Tensor] = {}
        self._installed = False

    @classmethod
    def from_plans(cls, plans: Sequence[Plan], teacher: Shape, sparsities: Sequence[float]) -> CandidateMasks:
        """The masks of :func:`candidate_plans`' plans (every plan must keep all of the teacher's layers)."""
        if len(plans) != len(tuple(sparsities)):
            raise CandidateError(f"{len(plans)} plans for {len(tuple(sparsities))} sparsities: give one plan each")
        heads = torch.zeros(len(plans), teacher.layers, teacher.heads)
        neurons = torch.zeros(len(plans), teacher.layers, teacher.ffn)
        hidden = torch.zeros(len(plans), teacher.hidden)
        for c, plan in enumerate(plans):
            if plan.layers != list(range(teacher.layers)):
                raise CandidateError(
                    f"candidate plan {c} keeps layers {plan.layers}: candidates keep all {teacher.layers} layers"
                )
            for layer in range(teacher.layers):
                heads[c, layer, plan.heads[layer]] = 1.0
                neurons[c, layer, plan.neurons[layer]] = 1.0
            hidden[c, plan.hidden] = 1.0
        return cls(sparsities, heads, neurons, hidden, teacher.head_dim)

    def __len__(self) -> int:
        return len(self.sparsities)

    def select(self, index: int | None) -> None:
        """Make candidate ``index`` (or the full model, None) the one every masked forward runs, until the next call."""
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self)):
            raise CandidateError(f"candidate index {index!r} is not None or an int in [0, {len(self)})")
        self.active = index
        self._cache.clear()

    def _on(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The active candidate's ``name`` mask on ``like``'s device, in its dtype (cached until the next select)."""
        key = (name, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name)[self.active].to(like.device, like.dtype)
        return self._cache[key]

    def install(self, model: torch.nn.Module) -> Hooks:
        """Register the hooks on a LLaMA-family transformers model (or an engine / HiddenStates around one)."""
        lm = causal_lm(model)
        check_layout(lm, self)
        if self._installed:
            raise CandidateError("these candidate masks are installed already: remove() the first hooks first")
        decoder = lm.get_decoder()

        def hidden_out(module, args, out):
            return None if self.active is None else out * self._on("hidden", out)

        def heads_in(i: int) -> Callable:
            def hook(module, args):  # o_proj input (B, T, H * head_dim): heads side by side
                if self.active is None:
                    return None
                x = args[0]
                per_head = x.unflatten(-1, (-1, self.head_dim)) * self._on("heads", x)[i][:, None]
                return (per_head.flatten(-2), *args[1:])

            return hook

        def neurons_in(i: int) -> Callable:
            def hook(module, args):  # down_proj input (B, T, F): act(gate) * up
                return None if self.active is None else (args[0] * self._on("neurons", args[0])[i], *args[1:])

            return hook

        def norm_in(module, args):
            if self.active is None:
                return None
            return (args[0] * self.norm_scale[self.active], *args[1:])

        def norm_out(module, args, out):
            if self.active is None:
                return None
            return out * self._on("hidden", out) * (1.0 / self.norm_scale[self.active])

        handles = [decoder.embed_tokens.register_forward_hook(hidden_out)]
        norms = [decoder.norm]
        for i, layer in enumerate(decoder.layers):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(heads_in(i)))
            handles.append(layer.self_attn.o_proj.register_forward_hook(hidden_out))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(neurons_in(i)))
            handles.append(layer.mlp.down_proj.register_forward_hook(hidden_out))
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
        for norm in norms:
            handles.append(norm.register_forward_pre_hook(norm_in))
            handles.append(norm.register_forward_hook(norm_out))
        self._installed = True
        return Hooks(handles, lambda: setattr(self, "_installed", False))


def check_layout(lm: torch.nn.Module, masks: CandidateMasks) -> None:
    """A CandidateError unless ``lm`` is a LLaMA-family causal LM of the masks' shape (reads sizes, no parameter)."""
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type not in FAMILY:
        raise CandidateError(
            f"candidate masks need a LLaMA-family model {FAMILY} (RMSNorms, o_proj, down_proj), got {model_type!r}"
        )
    decoder = lm.get_decoder()
    layers, heads, ffn = masks.heads.shape[1], masks.heads.shape[2], masks.neurons.shape[2]
    have = (
        len(decoder.layers),
        decoder.layers[0].self_attn.o_proj.in_features,
        decoder.layers[0].mlp.down_proj.in_features,
        decoder.embed_tokens.embedding_dim,
    )
    want = (layers, heads * masks.head_dim, ffn, masks.hidden.shape[1])
    if have != want:
        raise CandidateError(
            f"the model has (layers, heads * head_dim, ffn, hidden) = {have} but the candidate masks are for {want}:"
            " build the masks from this model's own shape"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Sandwich training: the distill stage's step, each micro-batch once per candidate.


def attach_candidates(engine: torch.nn.Module, masks: CandidateMasks) -> Hooks:
    """Install ``masks`` on the student engine's model and let its forward select the candidate of each micro-batch
    (``Batch.candidate``, through ``minima.models.HiddenStates``)."""
    hooks = masks.install(engine)
    engine.module.candidates = masks
    return hooks


def sandwich(micro_batches: list[Batch], masks: CandidateMasks | None) -> list[Batch]:
    """MiniDisc's sandwich step: every micro-batch once per candidate, consecutively (the candidates of one
    micro-batch share its teacher forward); unchanged without candidates. The step's one normalisation by all its
    valid tokens then makes the loss the mean of the candidates' losses."""
    if masks is None:
        return micro_batches
    return [replace(mb, candidate=c) for mb in micro_batches for c in range(len(masks))]


# ----------------------------------------------------------------------------------------------------------------------
# Scores on dev batches.


def scores_from_sums(sums: torch.Tensor, sparsities: Sequence[float]) -> list[dict[str, Any]]:
    """Per candidate ``{sparsity, accuracy, ce, correct, ce_sum, tokens}`` from (N, 3) summed (correct, ce_sum,
    tokens), e.g. all-reduced over ranks; accuracy and ce are nan where no token was scored."""
    rows = []
    for sparsity, (correct, ce_sum, tokens) in zip(sparsities, sums.double().cpu().tolist(), strict=True):
        n = round(tokens)
        rows.append(
            {
                "sparsity": float(sparsity),
                "accuracy": correct / n if n else math.nan,
                "ce": ce_sum / n if n else math.nan,
                "correct": round(correct),
                "ce_sum": ce_sum,
                "tokens": n,
            }
        )
    return rows


def score_sums(rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """(N, 3) float64 (correct, ce_sum, tokens) of :func:`score_candidates`' rows, to all-reduce over ranks."""
    return torch.tensor([[r["correct"], r["ce_sum"], r["tokens"]] for r in rows], dtype=torch.float64)


def score_candidates(
    model: torch.nn.Module,
    masks: CandidateMasks,
    batches: Iterable[Batch],
    device: torch.device,
    *,
    gathered: Callable[[list], AbstractContextManager] = lambda params: nullcontext(),
    chunk_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Next-token accuracy (argmax of the logits == label, over labels != IGNORE_INDEX) and mean CE of every
    candidate on this rank's ``batches``; rows as :func:`scores_from_sums`, sums over this rank only.

    ``masks`` must be installed on ``model``. Each batch runs every candidate in turn, so under ZeRO-3, where every
    rank must pass as many batches, all ranks run the same forwards; ``gathered`` makes the output head whole around
    each candidate's chunked products, as in ``minima.importance``. The logits of ``chunk_tokens`` valid tokens at a
    time (default ``minima.losses.default_chunk_tokens``) are formed in fp32, never (B, T, V). The model is in eval
    mode meanwhile; its mode and the selected candidate are restored afterwards.
    """
    lm = causal_lm(model)
    head = output_head(model)
    chunk = chunk_tokens or default_chunk_tokens(lm.config.vocab_size)
    sums = torch.zeros(len(masks), 3, dtype=torch.float64, device=device)
    was_training, was_active = lm.training, masks.active
    lm.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                input_ids, labels = batch.input_ids.to(device), batch.labels.to(device)
                positions = None if batch.position_ids is None else batch.position_ids.to(device)
                valid = labels != IGNORE_INDEX
                targets = labels[valid]
                for c in range(len(masks)):
                    masks.select(c)
                    rows = last_hidden(lm, input_ids, positions)[valid]  # (n, D) valid positions only
                    with gathered([head]):
                        for start in range(0, rows.shape[0], chunk):
                            logits = _head_logits(rows[start : start + chunk], head)  # (chunk, V) fp32
                            y = targets[start : start + chunk]
                            sums[c, 0] += (logits.argmax(-1) == y).sum()
                            sums[c, 1] += F.cross_entropy(logits, y, reduction="sum").double()
                    sums[c, 2] += targets.numel()
    finally:
        masks.select(was_active)
        lm.train(was_training)
    return scores_from_sums(sums, masks.sparsities)


# ----------------------------------------------------------------------------------------------------------------------
# The choice.


def tradeoff_select(
    candidates: Sequence[dict[str, Any]] | Mapping[float, float],
    lam: float,
    *,
    min_sparsity: float = 0.0,
    max_sparsity: float | None = None,
    score_key: str = "accuracy",
) -> tuple[float, list[dict[str, Any]]]:
    """(the chosen sparsity, table rows) by MiniDisc's ``value = score + lam * sparsity``.

    Args:
        candidates: rows holding ``sparsity`` and ``score_key`` (:func:`score_candidates`'), or a mapping sparsity ->
            score; higher scores are better (for a loss, pass its negation).
        lam: the weight of sparsity, in score units per unit of sparsity (scores as fractions: 0.35 trades 3.5 points
            of accuracy for 10 % sparsity); a float >= 0.
        min_sparsity: the current teacher's sparsity; denser candidates are not eligible.
        max_sparsity: the student's sparsity (choosing it means no assistant); sparser candidates are not eligible.

    Rows, by sparsity: ``sparsity, scale (= 1 - sparsity), score, value, eligible, chosen``. Ties within
    :data:`TIE_TOLERANCE` go to the smaller sparsity.
    """
    if isinstance(lam, bool) or not isinstance(lam, Real) or not (math.isfinite(lam) and lam >= 0):
        raise CandidateError(f"lam {lam!r} must be a finite number >= 0 (0 picks the best score)")
    min_sparsity = check_sparsity(min_sparsity)
    if max_sparsity is not None and check_sparsity(max_sparsity) < min_sparsity:
        raise CandidateError(f"max_sparsity {max_sparsity} (the student's) is below min_sparsity {min_sparsity}")
    if isinstance(candidates, Mapping):
        pairs = [(check_sparsity(s), score) for s, score in candidates.items()]
    else:
        missing = [r for r in candidates if "sparsity" not in r or score_key not in r]
        if missing:
            raise CandidateError(f"candidate rows need 'sparsity' and {score_key!r}, got {missing[0]}")
        pairs = [(check_sparsity(r["sparsity"]), r[score_key]) for r in candidates]
    _check_sparsities(s for s, _ in pairs)
    bad = [(s, v) for s, v in pairs if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v)]
    if bad:
        raise CandidateError(
            f"candidate at sparsity {bad[0][0]} has score {bad[0][1]!r}: scores must be finite numbers"
            " (nan: no dev token was scored)"
        )
    high = math.inf if max_sparsity is None else max_sparsity
    rows = [
        {
            "sparsity": s,
            "scale": 1.0 - s,
            "score": float(v),
            "value": float(v) + lam * s,
            "eligible": min_sparsity - TIE_TOLERANCE <= s <= high + TIE_TOLERANCE,
            "chosen": False,
        }
        for s, v in sorted(pairs)
    ]
    eligible = [r for r in rows if r["eligible"]]
    if not eligible:
        raise CandidateError(
            f"no candidate sparsity in [{min_sparsity}, {max_sparsity}] among {[r['sparsity'] for r in rows]}:"
            " include the student's sparsity (the no-assistant choice) among the candidates"
        )
    best = max(r["value"] for r in eligible)
    chosen = next(r for r in eligible if r["value"] >= best - TIE_TOLERANCE)  # rows ascend: the smallest sparsity
    chosen["chosen"] = True
    return chosen["sparsity"], rows


# ----------------------------------------------------------------------------------------------------------------------
# The chosen candidate as a model of its own.


def slice_candidate(
    model: torch.nn.Module,
    plan: Plan,
    teacher_config: PretrainedConfig,
    teacher_dir: str | Path,
    out_dir: str | Path,
    record: dict[str, Any],
    *,
    gathered: Callable[[list], AbstractContextManager] = lambda params: nullcontext(),
    is_main: bool = True,
    record_name: str = "assistant.json",
) -> Shape:
    """Write the candidate of ``plan`` cut out of ``model`` (its current, shared weights) as a Hugging Face model in
    ``out_dir`` (the teacher's stored dtype and tokenizer files, ``record`` plus the kept units in ``record_name``);
    returns its shape. Under ZeRO-3 every rank calls it (``gathered`` is collective) and the ``is_main`` rank writes.
    An existing ``out_dir`` is replaced only if it holds a previous ``record_name``."""
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if is_main and out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / record_name).is_file():
        raise CandidateError(
            f"{out_dir} exists and holds no {record_name}: it is not an assistant; pick a new directory"
        )
    teacher = Shape.of(teacher_config, where="teacher config")
    shape = check_target(teacher, plan_shape(plan, teacher), where="candidate")
    config = student_config(teacher_config, shape, plan.layers)
    state = student_state_dict(
        causal_lm(model), plan, teacher, stored_dtype(teacher_config), gathered=gathered, is_main=is_main
    )
    if is_main:
        kept = {"layers": plan.layers, "heads": plan.heads, "kv_heads": plan.kv_heads, "hidden": plan.hidden}
        kept["neurons_per_layer"] = [len(n) for n in plan.neurons]
        full = {**record, "teacher_shape": asdict(teacher), "assistant_shape": asdict(shape), "kept": kept}
        write_student(state, config, teacher_dir, out_dir, full, record_name=record_name)
    return shape
