"""AdamW parameter groups and the warmup + cosine learning-rate schedule (plain torch, testable anywhere)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def lr_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step``: linear warmup, then cosine down to ``min_lr_ratio``.

    Step 0 is the first update, so warmup reaches the peak at step ``warmup_steps - 1`` instead of wasting a step at 0.
    """

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay matrices (embeddings, projections); do not decay vectors (norm weights, biases).

    Under ZeRO-3 a parameter's local tensor is a flat shard, so its true rank is read from ``ds_shape``.
    """
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
