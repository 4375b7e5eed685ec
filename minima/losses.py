"""Token-level distillation losses, returned as sums over valid tokens (never means).

Per valid token t (label != IGNORE_INDEX), with zs_t and zt_t the student's and the teacher's logits:

    loss_t = ce_weight * CE(zs_t, label_t) + kd_weight * T^2 * D(softmax(zt_t / T), softmax(zs_t / T))

with D one of ``minima.divergences.DIVERGENCES`` (forward KL, the MiniMA objective, by default). The training loop
sums ``loss_t`` over every micro-batch of every rank of an optimizer step and divides once by the global number of
valid tokens (see ``minima.distill.train_step``). Padding and ignored positions enter neither term.

Two entry points compute the same thing:

- :func:`kd_loss_from_logits` for callers that already hold both models' logits (B, T, V);
- :func:`kd_loss_from_hidden`, used by the training loop, from the final hidden states and the two output heads. It
  visits the valid tokens a chunk at a time: computes both heads' logits for the chunk in fp32, the loss terms, and
  at once the gradients of the student's hidden states and head (no (B, T, V) tensor of either model ever exists and
  nothing is recomputed in backward; ``backward`` only scales the stored gradients).

Vocabularies: teacher and student may differ by padding rows of one tokenizer (e.g. 152064 vs 151936). The KD term
compares the first ``vocab_size`` logits (the tokenizer's length) of both, so teacher logits beyond it never leak
probability mass into the student's target; CE uses the student's whole head.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minima.divergences import token_divergence
from minima.shards import IGNORE_INDEX

# Chunk size when none is given: one (chunk, V) fp32 tensor stays near this many bytes. Eager chunks keep about 5
# such tensors alive with forward KL's closed form and about 10 through autograd (the other divergences); compiled
# chunks fuse most of the rest away, so they can be taller, which the head matmuls need to run efficiently (taller
# chunks are faster on CPU too, e.g. 1024 tokens 1.8x faster than 128 at hidden 1024 and vocabulary 49216, at four
# times the memory: set kd.chunk_tokens to trade; 256 at a 128k vocabulary is also Liger's choice on GPUs).
CHUNK_TENSOR_BYTES = {"eager": 2**25, "compiled": 2**27}


@dataclass
class LossSums:
    """Sums over the valid tokens of one micro-batch; divide by a global token count once, at the end."""

    loss_sum: torch.Tensor
    """Differentiable fp32 scalar: ce_weight * ce_sum + kd_weight * kd_sum (just ce_sum without a teacher)."""
    ce_sum: torch.Tensor
    """Cross-entropy on the true next token, in nats, summed (detached)."""
    kd_sum: torch.Tensor
    """T^2 * divergence, in nats, summed (detached; 0 without a teacher)."""
    num_tokens: torch.Tensor
    """Valid tokens (int64 scalar)."""
    top1_agree: torch.Tensor
    """Valid tokens where the teacher's and the student's most likely next token agree (a count as a float, weighted
    like the other sums by :class:`Targets`; 0 without a teacher)."""


@dataclass(frozen=True)
class Targets:
    """Weighted next-token targets for the rows of a micro-batch: one or more sets of labels, each (R, T) with one
    weight per row (R,). The loss is  sum over sets, rows and valid positions of  weight_row * loss_t, and every
    returned sum (loss, ce, kd, agreement) is weighted the same way. Plain labels are one set of weight 1.

    MixKD (``minima.mixup``) uses two sets: a mixed row predicts the next tokens of both sequences it mixes, with
    weights lambda and 1 - lambda (times ``kd.mixup.weight``).
    """

    sets: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def row_tokens(labels: torch.Tensor | Targets) -> torch.Tensor:
    """(R,) float64 valid positions per row of ``labels`` (B, T), or of weighted :class:`Targets` (each counted with
    its weight: what the loss sums over)."""
    sets = labels.sets if isinstance(labels, Targets) else ((labels, None),)
    return sum((y != IGNORE_INDEX).sum(dim=1).double() * (1.0 if w is None else w.double()) for y, w in sets)


@dataclass(frozen=True)
class _Spec:
    """How to mix CE and KD (the knobs of ``kd.*`` in the recipe, see ``minima.config.KDConfig``)."""

    ce_weight: float
    kd_weight: float
    divergence: str
    temperature: float
    beta: float
    alpha: float


def _terms(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor | None,
    targets: torch.Tensor,
    spec: _Spec,
    vocab_size: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd, top-1 agreement) sums for (n, V_s) student and (n, >= vocab_size) teacher fp32 logits, each
    row weighted by ``weights`` (n,) when given."""
    if weights is None:
        ce = F.cross_entropy(s_logits, targets, reduction="sum")
    else:
        ce = (F.cross_entropy(s_logits, targets, reduction="none") * weights).sum()
    if t_logits is None:
        zero = torch.zeros((), dtype=s_logits.dtype, device=s_logits.device)
        return ce, ce.detach(), zero, zero
    s_shared, t_shared = s_logits[:, :vocab_size], t_logits[:, :vocab_size]
    kd = token_divergence(
        s_shared,
        t_shared,
        divergence=spec.divergence,
        temperature=spec.temperature,
        beta=spec.beta,
        alpha=spec.alpha,
    )
    agree = (s_shared.argmax(-1) == t_shared.argmax(-1)).to(s_logits.dtype)
    if weights is not None:
        kd, agree = kd * weights, agree * weights
    kd, agree = kd.sum(), agree.sum()
    return spec.ce_weight * ce + spec.kd_weight * kd, ce.detach(), kd.detach(), agree


def kd_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
) -> LossSums:
    """CE plus distillation from full logits, summed over valid tokens.

    Args:
        student_logits: (B, T, V_s) (or (N, V_s)) next-token logits of the student; upcast to fp32.
        teacher_logits: (B, T, V_t) logits of the frozen teacher, or None for plain LM training (then the loss is the
            CE sum and the weights do not apply).
        labels: (B, T) (or (N,)) int64 next-token ids aligned with the logits, IGNORE_INDEX where masked.
        ce_weight, kd_weight: weights of the two terms.
        divergence, temperature, beta, alpha: see ``minima.divergences.token_divergence``.
        vocab_size: the shared tokenizer length compared by the KD term (default: min(V_s, V_t)).
    """
    spec = _Spec(ce_weight, kd_weight, divergence, temperature, beta, alpha)
    valid = labels != IGNORE_INDEX
    s_logits = _upcast(student_logits[valid])  # (N, V_s): padding never enters a softmax that is summed
    t_logits = None if teacher_logits is None else _upcast(teacher_logits[valid])  # (N, V_t)
    if t_logits is not None and vocab_size is None:
        vocab_size = min(s_logits.shape[-1], t_logits.shape[-1])
    loss, ce, kd, agree = _terms(s_logits, t_logits, labels[valid], spec, vocab_size or s_logits.shape[-1])
    return LossSums(loss, ce, kd, valid.sum(), agree)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 -> fp32; fp64 stays fp64, for exact references)."""
    return x if x.dtype == torch.float64 else x.float()


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(n, H) @ (V, H)^T -> (n, V) in at least fp32. On GPUs a bf16/fp16 matmul writes fp32 straight from its fp32
    accumulators (no rounding of the logits to 8 mantissa bits); elsewhere, or where torch lacks that kernel, the
    product is upcast."""
    if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return _upcast(torch.mm(hidden, weight.t()))


def default_chunk_tokens(vocab_size: int, compiled: bool = False) -> int:
    """Tokens per chunk so that a (chunk, V) fp32 tensor stays near CHUNK_TENSOR_BYTES (a power of two, >= 16)."""
    n = max(16, CHUNK_TENSOR_BYTES["compiled" if compiled else "eager"] // (4 * vocab_size))
    return 1 << (n.bit_length() - 1)


def _chunk_loss_and_grad(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor | None,
    targets: torch.Tensor,
    spec: _Spec,
    vocab_size: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(d loss / d s_logits, loss, ce, kd, agreement) for one chunk: all the elementwise work, no matmul. Rows
    weighted by ``weights`` (n,) when given.

    Forward KL (the MiniMA objective) and plain CE take the closed form; the other divergences autograd's."""
    if t_logits is None or spec.divergence == "forward_kl":
        return _forward_kl_loss_and_grad(s_logits, t_logits, targets, spec, vocab_size, weights)

    def loss_fn(s):
        loss, ce, kd, agree = _terms(s, t_logits, targets, spec, vocab_size, weights)
        return loss, (ce, kd, agree)

    grad, (loss, (ce, kd, agree)) = torch.func.grad_and_value(loss_fn, has_aux=True)(s_logits)
    return grad, loss, ce, kd, agree


def _forward_kl_loss_and_grad(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor | None,
    targets: torch.Tensor,
    spec: _Spec,
    vocab_size: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The chunk's loss terms and d loss / d s_logits for CE + forward KL in closed form, a few passes over (c, V).

    With q = softmax(s), q_T = softmax(s / T) and p = softmax(t / T) over the shared vocabulary:
    CE = lse(s) - s_y;  KL(p || q_T) = sum p (t - s) / T - lse(t / T) + lse(s / T);  d loss / d s =
    ce_weight (q - onehot(y)) + kd_weight T (q_T - p) (the T^2 of the KD term times the 1 / T of s / T). Generic
    autograd over the same terms keeps about ten (c, V) tensors alive and makes about three times the passes; this
    keeps three or four. Row weights ``w`` (MixKD's targets) scale each row's terms and its gradient row.
    """
    w = weights
    rows = torch.arange(s_logits.shape[0], device=s_logits.device)
    s_max = s_logits.amax(-1, keepdim=True)
    q = torch.sub(s_logits, s_max).exp_()  # (c, V_s), softmax(s) once normalised
    z = q.sum(-1, keepdim=True)
    lse = (s_max + z.log()).squeeze(1)
    ce_rows = lse - s_logits[rows, targets]
    ce = (ce_rows if w is None else ce_rows * w).sum()
    q.div_(z)
    if t_logits is None:
        q.index_put_((rows, targets), torch.tensor(-1.0, dtype=q.dtype, device=q.device), accumulate=True)
        if w is not None:
            q.mul_(w[:, None])
        zero = torch.zeros((), dtype=s_logits.dtype, device=s_logits.device)
        return q, ce, ce.detach(), zero, zero
    v, T = vocab_size, spec.temperature
    s_v, t_v = s_logits[:, :v], t_logits[:, :v]
    t_max = t_v.amax(-1, keepdim=True)
    p = torch.sub(t_v, t_max).div_(T).exp_()  # (c, v), softmax(t / T) once normalised
    zt = p.sum(-1, keepdim=True)
    p.div_(zt)
    lse_t = (t_max / T + zt.log()).squeeze(1)
    same = T == 1.0 and v == s_logits.shape[1]
    if same:
        q_t, lse_s = q, lse
    else:
        sv_max = s_v.amax(-1, keepdim=True)
        q_t = torch.sub(s_v, sv_max).div_(T).exp_()
        zs = q_t.sum(-1, keepdim=True)
        q_t.div_(zs)
        lse_s = (sv_max / T + zs.log()).squeeze(1)
    # sum p (t - s) as two row dot products: no (c, v) temporary
    p_dot = torch.einsum("ij,ij->i", p, t_v) - torch.einsum("ij,ij->i", p, s_v)
    kd_rows = (T * T) * (p_dot / T - lse_t + lse_s)
    agree_rows = (s_v.argmax(-1) == t_v.argmax(-1)).to(s_logits.dtype)
    if w is not None:
        kd_rows, agree_rows = kd_rows * w, agree_rows * w
    kd, agree = kd_rows.sum(), agree_rows.sum()
    ce_w, kd_w = spec.ce_weight, spec.kd_weight
    if same:
        grad = q.mul_(ce_w + kd_w * T).sub_(p, alpha=kd_w * T)
    else:
        grad = q.mul_(ce_w)
        grad[:, :v].add_(q_t.sub_(p), alpha=kd_w * T)
    grad.index_put_((rows, targets), torch.tensor(-ce_w, dtype=q.dtype, device=q.device), accumulate=True)
    if w is not None:
        grad.mul_(w[:, None])
    loss = ce_w * ce + kd_w * kd
    return grad, loss, ce.detach(), kd.detach(), agree


@functools.cache
def _compiled_chunk_loss_and_grad():
    """The same function fused by torch.compile: the ~10 elementwise passes over a (chunk, V) tensor (softmaxes, the
    divergence, its gradient) become a few kernels. Built on first use (not at import); compiled once per chunk shape
    and KD setting."""
    return torch.compile(_chunk_loss_and_grad, dynamic=None)


def _accumulate_head_grad(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """``acc += g^T @ h`` into the fp32 accumulator ``acc`` (V, H): g (c, V) and h (c, H) in the head's dtype.

    On GPUs a bf16/fp16 product is accumulated in fp32 by the matmul itself and added without rounding to 8
    mantissa bits; elsewhere, or where torch lacks that kernel, the product is computed in fp32.
    """
    if acc.is_cuda and g.dtype in (torch.bfloat16, torch.float16):
        try:
            acc.add_(torch.mm(g.t(), h, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError):
            pass
    acc.addmm_(g.t().to(acc.dtype), h.to(acc.dtype))


def _chunked_sums(
    s_hidden,
    s_weight,
    t_hidden,
    t_weight,
    rows,
    targets,
    weights,
    spec,
    vocab_size,
    chunk_tokens,
    compiled,
    need_h,
    need_w,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(sums of loss, ce, kd, agreement; d loss / d s_hidden or None; d loss / d s_weight or None), chunk by chunk.

    Without gradients (``need_h`` and ``need_w`` false: evaluation, or autograd off) only the values are computed and
    nothing of the hidden states' or the head's size is allocated.
    """
    # s_hidden (N, H_s) every position; rows (n,) the valid positions (a row may repeat, once per set of Targets);
    # targets (n,) their next tokens; weights (n,) or None.
    grad_h = torch.zeros_like(s_hidden) if need_h else None
    # fp32 whatever the head's dtype: chunk after chunk adds into it, and bf16 partial sums would lose ~1e-2
    # relative over tens of chunks. Cast to the head's dtype once, at the end.
    acc_dtype = torch.float64 if s_weight.dtype == torch.float64 else torch.float32
    grad_w = torch.zeros(s_weight.shape, dtype=acc_dtype, device=s_weight.device) if need_w else None
    sums = torch.zeros(4, dtype=torch.float64, device=s_hidden.device)  # loss, ce, kd, agreement
    for start in range(0, rows.numel(), chunk_tokens):
        r = rows[start : start + chunk_tokens]
        h = s_hidden[r]  # (c, H_s)
        t_logits = None if t_hidden is None else _head_logits(t_hidden[r], t_weight)  # (c, V_t) fp32
        s_logits = _head_logits(h, s_weight)  # (c, V_s) fp32
        y = targets[start : start + chunk_tokens]
        w = None if weights is None else weights[start : start + chunk_tokens].to(s_logits.dtype)
        if not (need_h or need_w):
            loss, ce, kd, agree = _terms(s_logits, t_logits, y, spec, vocab_size, w)
        else:
            step = _compiled_chunk_loss_and_grad() if compiled else _chunk_loss_and_grad
            g, loss, ce, kd, agree = step(s_logits, t_logits, y, spec, vocab_size, w)  # g: d loss / d logits, fp32
            g = g.to(s_weight.dtype)
            if need_h:
                grad_h.index_add_(0, r, (g @ s_weight).to(grad_h.dtype))  # (c, H_s), one matmul per row
            if need_w:
                _accumulate_head_grad(grad_w, g, h.to(s_weight.dtype))  # (V_s, H_s) += (V_s, c) @ (c, H_s)
        sums += torch.stack([loss.detach().double(), ce.double(), kd.double(), agree.double()])
    if grad_w is not None and grad_w.dtype != s_weight.dtype:
        grad_w = grad_w.to(s_weight.dtype)
    return sums, grad_h, grad_w


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss sums from hidden states and heads, chunk by chunk; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(
        ctx, s_hidden, s_weight, t_hidden, t_weight, rows, targets, weights, spec, vocab_size, chunk_tokens, compiled
    ):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        sums, grad_h, grad_w = _chunked_sums(
            s_hidden,
            s_weight,
            t_hidden,
            t_weight,
            rows,
            targets,
            weights,
            spec,
            vocab_size,
            chunk_tokens,
            compiled,
            need_h,
            need_w,
        )
        ctx.save_for_backward(grad_h, grad_w)
        loss_sum, ce_sum, kd_sum, agree = _split_sums(sums, s_hidden.dtype)
        ctx.mark_non_differentiable(ce_sum, kd_sum, agree)
        return loss_sum, ce_sum, kd_sum, agree

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if getattr(ctx, "done", False):
            raise RuntimeError("kd_loss_from_hidden supports one backward per call (retain_graph is not supported)")
        ctx.done = True
        grad_h, grad_w = ctx.saved_tensors
        # In place: the stored gradients are used once, and a (V, H) copy of the head's gradient would cost memory.
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def _split_sums(sums: torch.Tensor, hidden_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(loss, ce, kd, agreement count) as fp32 (fp64 for fp64 inputs) scalars."""
    dtype = torch.float64 if hidden_dtype == torch.float64 else torch.float32
    return sums[0].to(dtype), sums[1].to(dtype), sums[2].to(dtype), sums[3].to(dtype)


def kd_loss_from_hidden(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    labels: torch.Tensor | Targets,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    *,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
    compiled: bool = False,
) -> LossSums:
    """CE plus distillation from final hidden states and output heads, never materialising (B, T, V) logits.

    Gradients flow to ``student_hidden`` and ``student_head`` (none to the teacher); the head's is accumulated over
    the chunks in fp32 and cast to the head's dtype once. Without autograd (``torch.no_grad()``, or inputs that need
    no gradient) only the values are computed. Under ZeRO-3 the heads are shards: gather them around this call (and,
    for the student's, the backward) with ``minima.engine.gathered``.

    Args:
        student_hidden: (B, T, H_s) the student's last hidden states (after the final norm).
        student_head: (V_s, H_s) the student's output embedding (lm_head weight); logits = hidden @ head^T.
        labels: (B, T) int64 next-token ids, IGNORE_INDEX where masked; best left on the CPU (where the loaders give
            them) when the hidden states are on a GPU: finding the valid positions then needs no synchronisation.
            Or weighted :class:`Targets` (MixKD): then every sum is weighted and ``num_tokens`` is the weighted count.
        teacher_hidden: (B, T, H_t) the teacher's last hidden states, or None for plain LM training.
        teacher_head: (V_t, H_t) the teacher's output embedding.
        ce_weight, kd_weight: weights of the two terms.
        divergence, temperature, beta, alpha: see ``minima.divergences.token_divergence``.
        vocab_size: the shared tokenizer length compared by the KD term (default: min(V_s, V_t)).
        chunk_tokens: valid tokens per chunk (default: :func:`default_chunk_tokens`: at a 49k vocabulary 128, or 512
            when compiled); the result does not depend on it beyond floating-point rounding.
        compiled: fuse each chunk's elementwise work (softmaxes, divergence, gradient) with torch.compile; several
            times faster once compiled (seconds per new chunk shape), worth it for training, not for tiny inputs.
    """
    spec = _Spec(ce_weight, kd_weight, divergence, temperature, beta, alpha)
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("give both teacher_hidden and teacher_head, or neither")
    if teacher_hidden is not None and teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher hidden {tuple(teacher_hidden.shape)} vs student {tuple(student_hidden.shape)}")
    v_s = student_head.shape[0]
    if vocab_size is None:
        vocab_size = v_s if teacher_head is None else min(v_s, teacher_head.shape[0])
    device = student_hidden.device
    # The valid positions are found where the labels are: labels still on the CPU (as the loaders give them) cost
    # no device-to-host synchronisation; the chunk loop needs their count on the host either way.
    rows, targets, weights = _valid_positions(labels)
    num_tokens = torch.full((), rows.numel(), dtype=torch.long) if weights is None else weights.double().sum()
    if rows.device != device:
        pin = device.type == "cuda"
        rows, targets = [(t.pin_memory() if pin else t).to(device, non_blocking=pin) for t in (rows, targets)]
        weights = None if weights is None else (weights.pin_memory() if pin else weights).to(device, non_blocking=pin)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, H_s)
    t_hidden = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    t_head = None if teacher_head is None else teacher_head.detach()
    args = (
        s_hidden,
        student_head,
        t_hidden,
        t_head,
        rows,
        targets,
        weights,
        spec,
        vocab_size,
        chunk_tokens or default_chunk_tokens(max(v_s, vocab_size), compiled),
        compiled,
    )
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad):
        loss, ce, kd, agree = _ChunkedHeadLoss.apply(*args)
    else:
        # Values only: a custom Function's needs_input_grad stays true under no_grad, so the Function would still
        # compute and hold the gradients (a (V, H) head gradient per call in evaluation).
        sums, _, _ = _chunked_sums(*args, need_h=False, need_w=False)
        loss, ce, kd, agree = _split_sums(sums, student_hidden.dtype)
    return LossSums(loss, ce, kd, num_tokens.to(device), agree)


def _valid_positions(labels: torch.Tensor | Targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(flat positions (n,), their next tokens (n,), their weights (n,) or None for plain labels). With Targets, a
    position appears once per set that labels it with a nonzero weight."""
    if isinstance(labels, torch.Tensor):
        flat = labels.reshape(-1)
        rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        return rows, flat[rows], None
    parts = []
    for set_labels, row_weights in labels.sets:
        flat = set_labels.reshape(-1)
        w = row_weights.double().repeat_interleave(set_labels.shape[-1])
        rows = ((flat != IGNORE_INDEX) & (w != 0)).nonzero().squeeze(1)
        parts.append((rows, flat[rows], w[rows]))
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))
