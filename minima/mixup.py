"""MixKD (Liang et al., ICLR 2021): distillation on linear interpolations of pairs of sequences, ``kd.mixup.*``.

With limited data the student queries the teacher on few inputs, and a large teacher predicts inconsistently off
its training examples. MixKD also asks the student to match the teacher on mixed-up inputs. In minima, a mixed
micro-batch (drawn with probability ``kd.mixup.prob``) is trained on its B sequences and on B mixed ones:

- **Pairs and lambda.** Sequence b is paired with ``partner[b]``, a random cyclic derangement of the micro-batch
  (each sequence is mixed once as the first and once as the second, never with itself), and lambda ~ Beta(alpha,
  alpha) is drawn once per micro-batch.
- **Each model mixes its own input embeddings**, with the same lambda and pairs (teacher and student embeddings
  differ in width): mixed row b = lambda * e(x_b) + (1 - lambda) * e(x_partner[b]). Both run one forward on the 2B
  rows: originals first, then the mixed ones (one ZeRO-3 gather per layer, as for a plain micro-batch). A mixed
  row keeps the positions (the packing of chat data) of the sequence it weighs more.
- **The loss.** On the originals, CE + KD as always. On the mixed rows, ``kd.mixup.weight`` times the student's
  mixup CE (lambda * CE against x_b's next tokens + (1 - lambda) * CE against x_partner[b]'s, each only where
  that sequence's label is valid) plus the KD divergence to the teacher's output on the mixed input, weighted the
  same way; the CE and KD weights are ``kd.ce_weight`` and ``kd.kd_weight``. As :class:`minima.losses.Targets`:
  originals weight 1; the mixed rows two label sets, of weights ``weight * lambda`` and ``weight * (1 - lambda)``.
- **One normalisation.** Every term is a sum over weighted valid tokens, and the step divides once by their
  global count: a mixed token counts ``weight * lambda`` or ``weight * (1 - lambda)``. Because the pairs are a
  permutation, a mixed micro-batch of n valid tokens counts n * (1 + weight). The loss stays a mean per weighted
  token whatever ``prob``: turning mixup on changes what is averaged, not the scale of the learning rate. With
  lambda = 1 the mixed rows equal the originals, so the step is exactly the plain KD step.

The draws are a function of (``data.seed``, step, rank, micro-batch index): a resumed run mixes as the
uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from minima.data import Batch
from minima.losses import Targets
from minima.shards import IGNORE_INDEX


@dataclass(frozen=True)
class Mix:
    """A micro-batch's mixup: mixed row b is ``lam * row b + (1 - lam) * row partner[b]`` (embeddings)."""

    partner: torch.Tensor
    """(B,) int64, a cyclic derangement of the rows."""
    lam: float
    """The weight of row b, from Beta(alpha, alpha)."""


def draw_mixes(micro_batches: list[Batch], mixup, key: tuple[int, ...]) -> list[Batch]:
    """The step's micro-batches, each with its :class:`Mix` (``Batch.mix``) with probability ``mixup.prob``, else
    as they were. ``mixup`` is ``kd.mixup`` (minima.config.MixupConfig); ``key`` = (data.seed, step, rank)."""
    if not mixup.enabled:
        return micro_batches
    out = []
    for i, mb in enumerate(micro_batches):
        rng = np.random.default_rng([*key, i])
        rows = mb.input_ids.shape[0]
        if rows < 2 or rng.random() >= mixup.prob:
            out.append(mb)
            continue
        order = torch.from_numpy(rng.permutation(rows))
        partner = torch.empty(rows, dtype=torch.long)
        partner[order] = order.roll(-1)  # order[k] is mixed with order[k + 1]: a cycle through every row
        out.append(replace(mb, mix=Mix(partner, float(rng.beta(mixup.alpha, mixup.alpha)))))
    return out


def mix_embeddings(embeds: torch.Tensor, mix: Mix) -> torch.Tensor:
    """(2B, T, H): the B rows of ``embeds`` then their B mixed rows."""
    partner = mix.partner.to(embeds.device)
    return torch.cat([embeds, mix.lam * embeds + (1.0 - mix.lam) * embeds[partner]])


def mix_positions(position_ids: torch.Tensor | None, mix: Mix) -> torch.Tensor | None:
    """(2B, T) positions for the rows of :func:`mix_embeddings`: a mixed row keeps those of the sequence it weighs
    more (None stays None: one sequence per row)."""
    if position_ids is None:
        return None
    dominant = position_ids if mix.lam >= 0.5 else position_ids[mix.partner.to(position_ids.device)]
    return torch.cat([position_ids, dominant])


def mixed_targets(labels: torch.Tensor, mix: Mix | None, weight: float) -> torch.Tensor | Targets:
    """The targets of a micro-batch's rows: its labels (B, T) unmixed; with a mix, :class:`Targets` for the 2B rows
    of :func:`mix_embeddings` (originals weight 1; mixed rows both sequences' next tokens, weights ``weight * lam``
    and ``weight * (1 - lam)``)."""
    if mix is None:
        return labels
    rows = labels.shape[0]
    ones, none = torch.ones(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
    first = (torch.cat([labels, labels]), torch.cat([ones, ones * (weight * mix.lam)]))
    second_labels = torch.cat([torch.full_like(labels, IGNORE_INDEX), labels[mix.partner]])
    second = (second_labels, torch.cat([none, ones * (weight * (1.0 - mix.lam))]))
    return Targets((first, second))
