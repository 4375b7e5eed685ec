"""Token-level divergences between the teacher's and the student's next-token distributions.

Each function takes the two models' logits for N tokens, (N, V) in fp32, softens them by the temperature T
(``logits / T``) and returns the divergence per token, (N,), in nats, scaled by T^2 so that the gradient's magnitude
does not shrink as T grows (Hinton et al.). With p = softmax(teacher / T) and q = softmax(student / T):

- ``forward_kl``       KL(p || q) = sum p (log p - log q)          -- mean-seeking; the MiniMA objective
- ``reverse_kl``       KL(q || p)                                  -- mode-seeking (MiniLLM)
- ``jsd``              generalized Jensen-Shannon with beta, TRL's GKD convention:
                       beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q, for 0 < beta < 1;
                       beta = 0 is forward KL and beta = 1 reverse KL (the limits of JSD / beta and
                       JSD / (1 - beta)); beta = 0.5 is the symmetric Jensen-Shannon divergence
- ``skew_forward_kl``  KL(p || alpha * p + (1 - alpha) * q)        -- DistiLLM's SKL; alpha = 0 is forward KL
- ``skew_reverse_kl``  KL(q || alpha * q + (1 - alpha) * p)        -- DistiLLM's SRKL; alpha = 0 is reverse KL
- ``tvd``              total variation 0.5 * sum |p - q|

Mixtures are formed in log space (``logaddexp``), so no probability underflows to log(0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities, (N, V) -> (N,)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b) from log-probabilities, for 0 < weight_a < 1."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Divergence per token (N,) in nats times T^2, from (N, V) student and teacher logits over the same vocabulary.

    Args:
        student_logits, teacher_logits: (N, V) float logits (computed in their dtype; pass fp32 for the loss).
        divergence: one of ``DIVERGENCES`` (see the module docstring for the definitions).
        temperature: T > 0, dividing both models' logits.
        beta: the generalized JSD's mixture weight of the teacher, in [0, 1].
        alpha: the skew KLs' weight of the distribution being matched, in [0, 1).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        d = _kl(log_p, log_q)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        d = _kl(log_q, log_p)
    elif divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        d = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    elif divergence == "skew_forward_kl":
        d = _kl(log_p, _log_mix(log_p, log_q, alpha) if alpha > 0 else log_q)
    elif divergence == "skew_reverse_kl":
        d = _kl(log_q, _log_mix(log_q, log_p, alpha) if alpha > 0 else log_p)
    elif divergence == "tvd":
        d = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {list(DIVERGENCES)}")
    return d * temperature**2
