"""Mixture-of-experts students (MiniMoE): the load-balancing loss, routing statistics and router jitter.

An MoE student is an ordinary transformers model: ``qwen2_moe`` configured as a LLaMA-equivalent MoE
(``tools/moefy.py`` and ``tools/pick_student_size.py --moe E`` write such configs): each layer's FFN is ``E`` experts
and a linear gate. **Routing** (MiniMoE's and Switch's): softmax over the experts, top-1 (``num_experts_per_tok``),
the chosen expert's output scaled by its gate probability (``norm_topk_prob: false``). Renormalising the chosen
probabilities (Mixtral's routing) would make a top-1 expert's weight exactly 1, so the gate would learn from the
balancing loss alone.

**The balancing loss** is Switch's ``E * sum_e f_e * P_e`` (``f_e`` the fraction of tokens whose top-k choices include
expert ``e``, counted as transformers' ``load_balancing_loss_func`` does; ``P_e`` the mean gate probability), averaged
over layers as in MiniMoE. minima computes it **per sequence** (over the sequence's tokens) and the objective weighs
each sequence's value by its count of valid tokens::

    objective = (sum_tokens (ce_weight * CE + kd_weight * KD) + balance_weight * sum_seq n_seq * balance_seq) / N

with ``N`` the valid tokens of the whole optimizer step, the step's single normalisation. A balancing loss per
micro-batch (transformers' per-forward mean) would make the objective depend on how the global batch is cut into
micro-batches and ranks; per sequence it does not, so the step's gradient is the same at any accumulation and
world size.
"""

from __future__ import annotations

import math

import torch

SHARED_EXPERT_OFF = 1
"""``shared_expert_intermediate_size`` of minima's MoE configs: transformers' Qwen2-MoE always builds a shared expert,
and ZeRO-3 cannot gather the zero-size parameters a width of 0 gives (DeepSpeed 0.19: ``torch.cat`` of an empty list),
so the shared expert is 1 wide with zero weights. Its output and all its gradients are then exactly 0 (its MLP's
input activation is silu(0) * 0), so it stays 0 under AdamW and weight decay: 3 * hidden + hidden parameters per
layer that compute nothing. :func:`zero_unused_shared_experts` sets it for freshly initialised models."""


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The sparse MoE blocks of a transformers model (modules with a ``gate`` and ``experts``), in layer order."""
    return [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]


def num_experts(config) -> int:
    """Experts per MoE layer of a transformers config (0 for a dense model)."""
    return int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0)


def unused_shared_experts(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of the shared experts that minima's MoE configs switch off (:data:`SHARED_EXPERT_OFF`)."""
    if getattr(model.config, "shared_expert_intermediate_size", None) != SHARED_EXPERT_OFF:
        return []
    blocks = [b for b in moe_blocks(model) if hasattr(b, "shared_expert")]
    return [p for b in blocks for p in (*b.shared_expert.parameters(), *b.shared_expert_gate.parameters())]


def balance_loss(router_logits: tuple[torch.Tensor, ...], batch_size: int, top_k: int) -> torch.Tensor:
    """Per-sequence Switch load-balancing loss, averaged over layers: (B,) in fp32.

    ``router_logits`` holds one (B * T, E) tensor per MoE layer, rows in (sequence, position) order. The token
    fractions ``f`` carry no gradient (a count of top-k choices); the gradient flows through the mean probabilities.
    Perfect balance gives ``top_k`` (1 for top-1); everything on one expert with certainty gives ``E * top_k``.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float().view(batch_size, -1, logits.shape[-1]), dim=-1)  # (B, T, E)
        e = probs.shape[-1]
        chosen = torch.topk(probs.detach(), top_k, dim=-1).indices.view(batch_size, -1)  # (B, T * k)
        # scatter_add, not one_hot or bincount: no device-to-host sync
        counts = torch.zeros_like(probs[:, 0]).scatter_add_(1, chosen, torch.ones_like(chosen, dtype=probs.dtype))
        fraction = counts / probs.shape[1]  # (B, E), sums to k
        losses.append(e * (fraction * probs.mean(dim=1)).sum(dim=-1))  # (B,)
    return torch.stack(losses).mean(dim=0)


@torch.no_grad()
def routing_counts(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """(L, E + 2) float64 per layer: tokens chosen by each expert (top-k choices), the summed router entropy (nats)
    and the token count. Summed over micro-batches and ranks, it gives each layer's expert load and entropy."""
    rows = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        counts = torch.zeros(probs.shape[-1], dtype=torch.float64, device=probs.device)
        counts.scatter_add_(0, chosen, torch.ones_like(chosen, dtype=torch.float64))
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum().double()
        rows.append(torch.cat([counts, entropy.view(1), counts.new_tensor([probs.shape[0]])]))
    return torch.stack(rows)


def routing_scalars(counts: torch.Tensor, top_k: int) -> dict[str, float]:
    """TensorBoard scalars from summed :func:`routing_counts`: per layer the load of every expert (its share of the
    top-k choices), the share of the most loaded expert (1 / E is balanced, 1 is collapse) and the mean router
    entropy (log E is uniform), plus the worst layer's share and the mean entropy over layers."""
    scalars: dict[str, float] = {}
    e = counts.shape[1] - 2
    tokens = counts[:, -1].clamp_min(1)
    for layer, row in enumerate(counts):
        load = row[:e] / (tokens[layer] * top_k)
        for expert in range(e):
            scalars[f"moe/layer_{layer}/load_expert_{expert}"] = float(load[expert])
        scalars[f"moe/layer_{layer}/max_share"] = float(load.max())
        scalars[f"moe/layer_{layer}/entropy"] = float(row[e] / tokens[layer])
    shares = [scalars[f"moe/layer_{layer}/max_share"] for layer in range(len(counts))]
    scalars["moe/max_share"] = max(shares)
    scalars["moe/entropy"] = float((counts[:, e] / tokens).mean())
    scalars["moe/entropy_uniform"] = math.log(e)
    return scalars


def add_router_jitter(model: torch.nn.Module, eps: float) -> list[torch.utils.hooks.RemovableHandle]:
    """MiniMoE's (and Switch's) multiplicative jitter: in training mode, each gate's input is multiplied by noise
    uniform in [1 - eps, 1 + eps] (the experts see the clean input); evaluation and export see the plain model."""

    def jitter(module: torch.nn.Module, args: tuple) -> tuple | None:
        if not module.training:
            return None
        x = args[0]
        return (x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps), *args[1:])

    return [block.gate.register_forward_pre_hook(jitter) for block in moe_blocks(model)]
