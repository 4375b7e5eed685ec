"""Token-level distillation loss, returned as sums over valid tokens (never means).

Per valid token t (label != IGNORE_INDEX):

    loss_t = ce_weight * CE(student_t, label_t) + kd_weight * T^2 * KL(softmax(zt_t / T) || softmax(zs_t / T))

with zs_t, zt_t the student's and the teacher's logits at position t.

The training loop sums ``loss_t`` over every micro-batch of every rank of an optimizer step and divides once by the
global number of valid tokens (see ``minima.distill``), so a micro-batch with more padding weighs less, exactly as in
a single full batch. Padding and ignored positions contribute to neither term.

Teacher and student may have different vocabulary sizes when they share a tokenizer and differ only by padding rows
(e.g. 152064 vs 151936): the KD term compares the first ``vocab_size`` logits (the tokenizer's length) of both, so
teacher logits of padding rows never reach the student's target. CE uses the student's full head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minima.data import IGNORE_INDEX


@dataclass
class LossSums:
    """Sums over the valid tokens of one micro-batch; divide by a global token count once, at the end."""

    loss_sum: torch.Tensor
    """Differentiable: ce_weight * ce_sum + kd_weight * kd_sum (fp32 scalar). Without a teacher: ce_sum."""
    ce_sum: torch.Tensor
    """Cross-entropy on the true next token, in nats, summed (detached)."""
    kd_sum: torch.Tensor
    """T^2 * KL(teacher || student), in nats, summed (detached; 0 without a teacher)."""
    num_tokens: torch.Tensor
    """Valid tokens (int64 scalar)."""
    top1_agree: torch.Tensor
    """Valid tokens where the teacher's and the student's most likely next token agree (int64; 0 without a teacher)."""


def distill_loss_sums(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> LossSums:
    """Cross-entropy plus forward-KL distillation, summed over valid tokens.

    Args:
        student_logits: (B, T, V_s) next-token logits of the student (any float dtype; computed in fp32).
        labels: (B, T) int64 next-token ids aligned with the logits, IGNORE_INDEX where excluded.
        teacher_logits: (B, T, V_t) logits of the frozen teacher (no grad), or None for plain LM training,
            in which case the loss is the CE sum and the weights do not apply.
        ce_weight, kd_weight: weights of the two terms.
        temperature: T, dividing both models' logits in the KD term; the term is scaled by T^2 so that its gradient
            magnitude does not shrink with T.
        vocab_size: the shared tokenizer length compared by the KD term (defaults to min(V_s, V_t)).
    """
    # (B, T, V) -> (N, V) over valid positions only: padding never enters a softmax that is summed.
    valid = labels != IGNORE_INDEX
    num_tokens = valid.sum()
    s_logits = student_logits[valid].float()  # (N, V_s)
    targets = labels[valid]  # (N,)
    ce_sum = F.cross_entropy(s_logits, targets, reduction="sum")
    if teacher_logits is None:
        zero = torch.zeros((), device=ce_sum.device, dtype=torch.int64)
        return LossSums(ce_sum, ce_sum.detach(), torch.zeros_like(ce_sum.detach()), num_tokens, zero)

    if teacher_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not align with {tuple(student_logits.shape)}"
        )
    v = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
    t_logits = teacher_logits[valid].float()[:, :v]  # (N, v)
    s_shared = s_logits[:, :v]  # (N, v)
    # KL(p_t || p_s) = sum_v p_t (log p_t - log p_s), at temperature T, scaled by T^2.
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    s_logp = F.log_softmax(s_shared / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum")
    kd_sum = kl * temperature**2
    loss_sum = ce_weight * ce_sum + kd_weight * kd_sum
    top1_agree = (t_logits.argmax(-1) == s_shared.argmax(-1)).sum()
    return LossSums(loss_sum, ce_sum.detach(), kd_sum.detach(), num_tokens, top1_agree)
