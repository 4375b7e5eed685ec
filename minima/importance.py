"""How much each unit of the teacher matters, measured on calibration data: the input to ``minima.prune``.

The units are the ones structured pruning can remove: attention heads, FFN neurons, dimensions of the residual
stream (hidden) and whole decoder layers.

- **Mask gradients.** Multiplicative masks, all 1 so the model is unchanged, sit on every attention head's output
  (before ``o_proj``), every FFN neuron's activation (before ``down_proj``) and every hidden dimension of the
  residual stream (one mask, applied at the embedding output and at every decoder layer's output). Forward hooks
  apply them; the teacher's own weights are frozen and get no gradient. Over the calibration windows, the
  importance of a unit is the sum over batches of ``|d loss / d mask|`` with loss = mean next-token cross-entropy
  of the batch: to first order, how much the loss moves when the unit is removed.
- **Per-layer L2 normalisation.** Head and neuron importances are divided, layer by layer, by their L2 norm (and the
  hidden importance by its own), so that layers are comparable in the summaries. The selection is uniform (the same
  number of heads and neurons in every layer), so this normalisation never changes which units are kept.
- **Block influence.** A layer's influence is ``1 - mean_t cos(x_in_t, x_out_t)`` over the calibration tokens
  (ShortGPT): a layer whose output points where its input did changes the residual stream least.

The calibration windows are a seeded sample of the prepared split, cut like the training windows and dealt to ranks
so that the summed importances do not depend on the number of ranks (under ZeRO-3 each rank measures its share with
the teacher sharded, and the sums are added over ranks: ``Importance.flat`` / ``unflat``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PretrainedConfig

from minima.data import Batch, Windows
from minima.losses import kd_loss_from_hidden
from minima.models import last_hidden, output_head
from minima.shards import IGNORE_INDEX, DataError, TokenShards


@dataclass(frozen=True)
class Shape:
    """The sizes that pruning changes. ``head_dim`` None means the teacher's (explicit sizes on the command line)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    head_dim: int | None = None

    @classmethod
    def of(cls, config: PretrainedConfig | dict[str, Any], where: str = "config") -> Shape:
        """The shape of a transformers config (or its ``config.json`` dict); a missing key is a ValueError naming
        where (``minima.prune`` reports it as a PruneError)."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
        missing = [key for key in keys if get(key) is None]
        if missing:
            raise ValueError(f"{where} lacks {missing}: give a LLaMA-family transformers config.json")
        heads = int(get("num_attention_heads"))
        return cls(
            layers=int(get("num_hidden_layers")),
            hidden=int(get("hidden_size")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            ffn=int(get("intermediate_size")),
            head_dim=int(get("head_dim") or int(get("hidden_size")) // max(heads, 1)),
        )


# ----------------------------------------------------------------------------------------------------------------------
# Mask gradients through forward hooks on an unmodified transformers model.


@dataclass
class Importance:
    """Raw sums over this process's calibration batches (add them over ranks before selecting).

    Attributes:
        heads: (L, H) float64 sum over batches of |d loss / d head mask|.
        neurons: (L, F) float64, the same for FFN neurons.
        hidden: (D,) float64, the same for the residual-stream dimensions.
        cos_sum: (L,) float64 sum over valid tokens of cos(layer input, layer output).
        tokens: valid (predicted) calibration tokens.
    """

    heads: torch.Tensor
    neurons: torch.Tensor
    hidden: torch.Tensor
    cos_sum: torch.Tensor
    tokens: int

    def flat(self) -> torch.Tensor:
        return torch.cat([self.heads.flatten(), self.neurons.flatten(), self.hidden, self.cos_sum, self.tokens_t()])

    def tokens_t(self) -> torch.Tensor:
        return torch.tensor([float(self.tokens)], dtype=torch.float64)

    @classmethod
    def unflat(cls, flat: torch.Tensor, like: Importance) -> Importance:
        sizes = [like.heads.numel(), like.neurons.numel(), like.hidden.numel(), like.cos_sum.numel(), 1]
        h, n, d, c, t = flat.double().cpu().split(sizes)
        return cls(h.view_as(like.heads), n.view_as(like.neurons), d, c, round(float(t)))


@contextmanager
def importance_masks(model: torch.nn.Module, shape: Shape, valid: list[torch.Tensor]) -> Iterator[dict]:
    """Install all-ones masks (fp32, requires_grad) through hooks; yields them with the block-influence sums.

    ``valid`` is a one-element list holding the current batch's (B, T) bool mask of predicted positions, read by
    the block-influence hook. The masks multiply in fp32 and cast back, so that their gradients are fp32 sums even
    for a bf16 model; at 1 they change nothing (bit for bit).
    """
    decoder = model.get_decoder()
    masks = {
        "heads": torch.ones(shape.layers, shape.heads, requires_grad=True),
        "neurons": torch.ones(shape.layers, shape.ffn, requires_grad=True),
        "hidden": torch.ones(shape.hidden, requires_grad=True),
        "cos_sum": torch.zeros(shape.layers, dtype=torch.float64),
    }

    def scale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (x.float() * mask.to(x.device)).to(x.dtype)

    def head_hook(i: int) -> Callable:
        def hook(module, args):  # o_proj input (B, T, H * head_dim): heads side by side
            x = args[0]
            per_head = x.view(*x.shape[:-1], shape.heads, shape.head_dim)
            return (scale(per_head, masks["heads"][i][:, None]).view_as(x), *args[1:])

        return hook

    def neuron_hook(i: int) -> Callable:
        def hook(module, args):  # down_proj input (B, T, F): act(gate) * up
            return (scale(args[0], masks["neurons"][i]), *args[1:])

        return hook

    def layer_hook(i: int) -> Callable:
        def hook(module, args, kwargs, output):  # decoder layer: residual stream in -> out (B, T, D)
            out = output[0] if isinstance(output, tuple) else output
            x_in = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                cos = F.cosine_similarity(x_in.float(), out.float(), dim=-1)  # (B, T)
                masks["cos_sum"][i] += cos[valid[0]].double().sum().cpu()
            out = scale(out, masks["hidden"])
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    handles = [decoder.embed_tokens.register_forward_hook(lambda m, a, out: scale(out, masks["hidden"]))]
    for i, layer in enumerate(decoder.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(neuron_hook(i)))
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
    try:
        yield masks
    finally:
        for handle in handles:
            handle.remove()


def accumulate_importance(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    shape: Shape,
    device: torch.device,
    *,
    gathered: Callable[[list], AbstractContextManager] = lambda params: nullcontext(),
    show_progress: bool = True,
    total: int | None = None,
) -> Importance:
    """Sum |mask gradient| over ``batches`` (loss = the batch's mean next-token CE) and the block-influence cosines.

    ``model`` is a transformers causal LM whose parameters do not require grad (under ZeRO-3, the engine's module:
    its hooks gather the shards for forward and again for backward). ``gathered`` makes the output head whole
    around the chunked CE (``minima.engine.gathered`` under ZeRO-3).
    """
    valid: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool)]
    tokens = 0
    with importance_masks(model, shape, valid) as masks:
        sums = {k: torch.zeros_like(masks[k], dtype=torch.float64) for k in ("heads", "neurons", "hidden")}
        for batch in tqdm(
            batches, total=total, desc="importance", unit="batch", file=sys.stderr, disable=not show_progress
        ):
            input_ids, labels = batch.input_ids.to(device), batch.labels.to(device)
            valid[0] = labels != IGNORE_INDEX
            positions = None if batch.position_ids is None else batch.position_ids.to(device)
            hidden = last_hidden(model, input_ids, positions)  # (B, T, D); the chunked CE never builds (B, T, V) logits
            with gathered([output_head(model)]):
                terms = kd_loss_from_hidden(hidden, output_head(model), labels)
            n = int(terms.num_tokens)
            # Every rank runs every backward, even on an all-padding batch (ZeRO-3 gathers inside it).
            (terms.loss_sum / max(n, 1)).backward()
            for key, total_abs in sums.items():
                total_abs += masks[key].grad.abs().double()
                masks[key].grad = None
            tokens += n
        cos_sum = masks["cos_sum"].clone()
    return Importance(sums["heads"], sums["neurons"], sums["hidden"], cos_sum, tokens)


def normalised(importance: torch.Tensor) -> torch.Tensor:
    """Each row (a layer's vector; or the whole vector if 1-D) divided by its L2 norm; all-zero rows stay zero."""
    norm = importance.norm(dim=-1, keepdim=True)
    return importance / torch.where(norm > 0, norm, torch.ones_like(norm))


# ----------------------------------------------------------------------------------------------------------------------
# Calibration windows.


def calibration_batches(
    shards: TokenShards,
    *,
    seq_len: int,
    num_windows: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    documents: str = "auto",
) -> list[Batch]:
    """This rank's calibration batches: ``num_windows`` windows of ``seq_len + 1`` tokens drawn without replacement
    from the whole split (a seeded sample, so not just its first documents), cut and read like the training windows
    (``minima.data.Windows``, in the ``documents`` mode).

    Global batch ``b`` holds sampled windows ``[b * batch_size, (b + 1) * batch_size)`` and goes to rank
    ``b % world_size``, so the batches, and hence the summed importances, do not depend on the number of ranks.
    Ranks left without a batch in the last round get one all-padding row (labels IGNORE_INDEX, no loss), because
    every rank must run every forward and backward under ZeRO-3.
    """
    if seq_len < 1 or num_windows < 1 or batch_size < 1:
        raise DataError(f"seq_len, calib windows, batch size must be >= 1, got {seq_len}, {num_windows}, {batch_size}")
    windows = Windows(shards, seq_len, documents)
    available = windows.count
    if num_windows > available:
        raise DataError(
            f"{shards.path} holds {available} windows of {seq_len + 1} tokens ({shards.num_tokens} tokens), fewer than"
            f" the {num_windows} calibration windows asked for; lower --calib-windows or --seq-len"
        )
    chosen = np.random.default_rng(seed).choice(available, size=num_windows, replace=False)
    num_batches = math.ceil(num_windows / batch_size)
    batches = []
    for b in range(rank, math.ceil(num_batches / world_size) * world_size, world_size):
        ids = chosen[b * batch_size : (b + 1) * batch_size]
        batches.append(windows.batch(ids, rows=max(len(ids), 1)))  # an empty round: one all-padding row
    return batches
