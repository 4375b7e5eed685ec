"""A mixture-of-experts student from a dense LLaMA-family model: ``tools/moefy.py``.

    python tools/moefy.py --dense /ckpt/minima-3b --experts 8 --out /ckpt/minima-moe-init

The student is transformers' ``qwen2_moe`` configured as a LLaMA-equivalent MoE (see ``minima.moe`` for the routing:
softmax over the ``E`` experts, top-1, the chosen expert's output scaled by its gate probability, not renormalised).
Attention, norms, embeddings and the output head are the dense model's, bit for bit; only each layer's gated FFN
(``down(act(gate(x)) * up(x))``, width ``W``) becomes ``E`` experts and a linear gate (router). Two ways:

- **split** (MiniMoE, the default): the dense FFN's neurons are dealt out to experts of width ``m``. The first
  ``s = round(shared_fraction * m)`` neurons are a common block copied into every expert; expert ``e`` then gets its
  own ``m - s`` neurons taken strided from the rest, neurons ``s + e, s + e + E, s + e + 2E, ...`` (the official
  MiniMoE code's ``specific[e::E]``), truncated to ``m - s``. This needs ``W >= s + E * (m - s)``; the default ``m``
  is the largest that fits. A neuron is a row of gate_proj and up_proj and a column of down_proj, so each expert is
  a sub-network of the dense FFN. With ``calib`` the neurons are first put in order of importance on calibration
  data (``minima.importance``'s mask gradients), so the common block holds the most important ones; otherwise the
  stored order is used. The gate is initialised fresh, normal(0, ``initializer_range``) from ``seed``, as in MiniMoE.
- **upcycle** (MiniMix, sparse upcycling): every expert is a copy of the whole dense FFN (``m = W``), and every
  expert's down_proj is multiplied by ``E``, since the routing scales the chosen expert's output by its gate
  probability (about ``1 / E`` at the start). The gate starts from normal(0, ``initializer_range``) as in split mode,
  so the MoE starts near the dense model's function. ``gate='zeros'`` makes every probability exactly ``1 / E`` and
  the MoE computes the dense model's function exactly (in floating point when ``E`` is a power of two: multiplying by
  ``E`` and by ``1 / E`` is then exact; up to rounding otherwise), but then every token ties and goes to expert 0, and
  the gate rows of the experts not yet chosen get identical gradients and stay tied among themselves until one of
  them is chosen: routing spreads over the experts one at a time. Use it to check the conversion, not to train.

transformers' Qwen2-MoE always builds a shared expert and its sigmoid gate; minima's MoE configs switch it off with
``shared_expert_intermediate_size = minima.moe.SHARED_EXPERT_OFF`` and zero weights, so it contributes exactly 0.
The dense model must be bias-free outside q/k/v (qwen2_moe has no o_proj or MLP bias); qwen2's q/k/v biases are kept
(``qkv_bias``). Mistral/qwen2 sliding-window layers stay sliding. Only FFN experts are supported: MiniMoE's
attention experts are not a standard Hugging Face layer.

The output is a Hugging Face directory (safetensors, config, the dense model's tokenizer files) plus ``moefy.json``
recording how it was made (source, mode, E, top-k, m, s, gate init, scale, seed, parameter counts).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, Qwen2MoeConfig

from minima.models import count_params, has_weights
from minima.moe import SHARED_EXPERT_OFF
from minima.prune import FAMILY, save_model_dir, stored_dtype

MODES = ("split", "upcycle")
GATES = ("zeros", "normal")


class MoefyError(ValueError):
    """A dense model or option that cannot be turned into an MoE as asked; the message names the flag and the fix."""


def fits(width: int, num_experts: int, expert_size: int, shared_fraction: float) -> bool:
    """Whether a split of a ``width``-neuron FFN into ``num_experts`` experts of ``expert_size`` fits:
    ``width >= s + E * (m - s)`` with ``s = round(shared_fraction * m)``."""
    shared = round(shared_fraction * expert_size)
    return expert_size >= 1 and shared + num_experts * (expert_size - shared) <= width


def largest_expert_size(width: int, num_experts: int, shared_fraction: float) -> int:
    """The largest ``m`` whose split fits ``width`` (0 if none does)."""
    return next((m for m in range(width, 0, -1) if fits(width, num_experts, m, shared_fraction)), 0)


def split_neurons(
    width: int, num_experts: int, expert_size: int, shared_fraction: float
) -> tuple[int, list[list[int]]]:
    """(s, per-expert neuron positions) of the MiniMoE split: expert ``e`` holds positions ``0 .. s-1`` then
    ``s + e, s + e + E, ...`` truncated to ``m - s``. Positions index the (possibly importance-ordered) neurons."""
    if not fits(width, num_experts, expert_size, shared_fraction):
        best = largest_expert_size(width, num_experts, shared_fraction)
        # the smallest s with s + E (m - s) <= W, i.e. s >= (E m - W) / (E - 1)
        need = max(0, math.ceil((num_experts * expert_size - width) / (num_experts - 1)))
        hint = f"--expert-size {best} or less" if best else "a larger --shared-fraction"
        if need <= expert_size:
            hint += f", or --shared-fraction {need / expert_size:.4f} or more with --expert-size {expert_size}"
        s = round(shared_fraction * expert_size)
        raise MoefyError(
            f"--expert-size {expert_size} with --shared-fraction {shared_fraction:g} (s = {s} common neurons) needs"
            f" s + E * (m - s) = {s + num_experts * (expert_size - s)} dense FFN neurons for --experts {num_experts},"
            f" but the FFN has {width}; use {hint}"
        )
    shared = round(shared_fraction * expert_size)
    specific = list(range(shared, width))
    return shared, [list(range(shared)) + specific[e::num_experts][: expert_size - shared] for e in range(num_experts)]


def read_dense(dense_dir: str | Path) -> PretrainedConfig:
    """The dense model's config, after checking that it is a bias-free (but for qwen2's q/k/v) gated-MLP
    LLaMA-family causal LM with weights."""
    path = Path(dense_dir)
    if not (path / "config.json").is_file() or not has_weights(path):
        raise MoefyError(
            f"--dense {path}: not a Hugging Face model directory (config.json and weights); give a local directory"
        )
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in FAMILY:
        raise MoefyError(
            f"--dense {path} has model_type {config.model_type!r}; moefy needs the LLaMA-family gated MLP"
            f" (gate/up/down_proj) of {FAMILY}"
        )
    for key in ("attention_bias", "mlp_bias"):
        if getattr(config, key, False):
            raise MoefyError(
                f"--dense {path} has {key}: true, but qwen2_moe has no o_proj or MLP biases; moefy supports bias-free"
                " llama/mistral models (and qwen2, whose only biases are q/k/v)"
            )
    return config


def layer_types(dense: PretrainedConfig) -> list[str]:
    """The dense model's attention per layer: mistral with a ``sliding_window`` slides in every layer, qwen2 says so
    in ``layer_types``, llama never slides."""
    n = dense.num_hidden_layers
    if dense.model_type == "mistral":
        return ["sliding_attention" if dense.sliding_window else "full_attention"] * n
    return list(getattr(dense, "layer_types", None) or ["full_attention"] * n)


def moe_config(dense: PretrainedConfig, num_experts: int, top_k: int, expert_size: int) -> Qwen2MoeConfig:
    """The qwen2_moe config of the student: the dense config's sizes, RoPE, norms, vocabulary and special ids, every
    layer an MoE of ``num_experts`` experts of ``expert_size``, top-``top_k`` routing without renormalisation."""
    types = layer_types(dense)
    sliding = "sliding_attention" in types
    head_dim = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    return Qwen2MoeConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads or dense.num_attention_heads,
        head_dim=head_dim,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        initializer_range=dense.initializer_range,
        rms_norm_eps=dense.rms_norm_eps,
        tie_word_embeddings=dense.tie_word_embeddings,
        rope_parameters=dense.rope_parameters,
        attention_dropout=getattr(dense, "attention_dropout", 0.0),
        use_sliding_window=sliding,
        sliding_window=dense.sliding_window if sliding else None,
        max_window_layers=dense.num_hidden_layers,
        layer_types=types,
        qkv_bias=dense.model_type == "qwen2",
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=False,  # renormalised top-1 weights are exactly 1: the gate would get no task gradient
        moe_intermediate_size=expert_size,
        intermediate_size=expert_size,
        shared_expert_intermediate_size=SHARED_EXPERT_OFF,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=False,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        dtype=stored_dtype(dense),
    )


def neuron_order(
    dense_dir: Path, model: torch.nn.Module, calib: str | Path, device: torch.device, **calibration: Any
) -> torch.Tensor:
    """(L, W) neuron indices per layer, most important first (``minima.importance`` on the calibration split;
    ties keep the stored order)."""
    from minima.importance import Shape, accumulate_importance, calibration_batches
    from minima.shards import TokenShards

    shards = TokenShards.open(calib)
    if model.config.vocab_size < shards.vocab_size:
        raise MoefyError(
            f"--calib {shards.path} holds ids up to {shards.vocab_size - 1} but the dense model's vocab_size is"
            f" {model.config.vocab_size}: prepare the calibration data with its tokenizer"
        )
    batches = calibration_batches(shards, **calibration)
    shape = Shape.of(model.config, f"--dense {dense_dir}")
    imp = accumulate_importance(model.to(device), iter(batches), shape, device, total=len(batches))
    model.to("cpu")
    return torch.argsort(-imp.neurons, dim=-1, stable=True)


def moe_state_dict(
    dense: dict[str, torch.Tensor],
    num_layers: int,
    experts: list[list[int]],
    order: torch.Tensor | None,
    gate: str,
    scale: float,
    init_std: float,
    seed: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The student's weights in ``dtype`` from the dense state dict: everything but the MLPs copied, each layer's
    MLP as fused experts (``gate_up_proj`` (E, 2m, h) = [gate rows; up rows], ``down_proj`` (E, h, m), down times
    ``scale``), the router (E, h) and the switched-off shared expert (zeros). ``experts`` holds positions in
    ``order[i]`` (layer ``i``'s neurons, most important first) or, without an order, dense neuron ids."""
    state = {k: v.to(dtype) for k, v in dense.items() if ".mlp." not in k}
    generator = torch.Generator().manual_seed(seed)
    for i in range(num_layers):
        p = f"model.layers.{i}.mlp."
        gate_w, up_w, down_w = dense[p + "gate_proj.weight"], dense[p + "up_proj.weight"], dense[p + "down_proj.weight"]
        width, hidden = gate_w.shape
        perm = order[i] if order is not None else torch.arange(width)
        idx = [perm[torch.tensor(e, dtype=torch.long)] for e in experts]  # dense neuron ids per expert
        router = torch.zeros(len(experts), hidden)
        if gate == "normal":
            router.normal_(0.0, init_std, generator=generator)
        layer = {
            "experts.gate_up_proj": torch.stack([torch.cat([gate_w[n], up_w[n]]) for n in idx]),  # gate first: chunk(2)
            "experts.down_proj": torch.stack([down_w[:, n] * scale for n in idx]),  # exact in any dtype for scale 2^k
            "gate.weight": router,
            "shared_expert.gate_proj.weight": torch.zeros(SHARED_EXPERT_OFF, hidden),
            "shared_expert.up_proj.weight": torch.zeros(SHARED_EXPERT_OFF, hidden),
            "shared_expert.down_proj.weight": torch.zeros(hidden, SHARED_EXPERT_OFF),
            "shared_expert_gate.weight": torch.zeros(1, hidden),
        }
        state.update({p + k: v.to(dtype) for k, v in layer.items()})  # layer by layer: one fp32 layer at a time
    return state


def moefy(
    dense_dir: str | Path,
    out_dir: str | Path,
    *,
    num_experts: int,
    mode: str = "split",
    top_k: int = 1,
    expert_size: int | None = None,
    shared_fraction: float = 2 / 3,
    gate: str | None = None,
    seed: int = 0,
    calib: str | Path | None = None,
    seq_len: int = 512,
    calib_windows: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the MoE student of the dense model in ``dense_dir`` to ``out_dir``; returns the record also written to
    ``<out_dir>/moefy.json``.

    Args:
        num_experts: experts per layer, ``E >= 2``.
        mode: ``split`` (MiniMoE) or ``upcycle`` (MiniMix); see the module docstring.
        top_k: experts per token (``num_experts_per_tok``), 1 as in MiniMoE.
        expert_size: ``m``, split only (upcycle's is the dense width); default the largest that fits.
        shared_fraction: split only, the common share of each expert, in [0, 1].
        gate: router init, ``normal`` (the default) or ``zeros`` (upcycle: exactly the dense function, see above).
        seed: seeds a ``normal`` router.
        calib: split only: a prepared split (``<data>/train``) on which to order the neurons by importance first,
            with ``calib_windows`` windows of ``seq_len`` tokens (sampled with ``seed``), ``batch_size`` windows per
            forward/backward on ``device``.
        overwrite: replace a non-empty ``out_dir``.
    """
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    if mode not in MODES:
        raise MoefyError(f"--mode {mode!r} is not one of {list(MODES)}")
    gate = gate or "normal"
    if gate not in GATES:
        raise MoefyError(f"--gate {gate!r} is not one of {list(GATES)}")
    if num_experts < 2:
        raise MoefyError(f"--experts {num_experts}: an MoE needs at least 2 experts (for 1, keep the dense model)")
    if not 1 <= top_k <= num_experts:
        raise MoefyError(f"--top-k {top_k} is not in [1, --experts {num_experts}]")
    if not 0.0 <= shared_fraction <= 1.0:
        raise MoefyError(f"--shared-fraction {shared_fraction:g} is not in [0, 1] (MiniMoE uses 2/3)")
    if mode == "upcycle" and (expert_size is not None or calib is not None):
        raise MoefyError("--mode upcycle copies the whole dense FFN into every expert: drop --expert-size and --calib")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise MoefyError(f"output {out_dir} exists and is not empty; pick a new --out or pass --overwrite")
    dense_config = read_dense(dense_dir)
    width = dense_config.intermediate_size

    if mode == "upcycle":
        m, shared, experts, scale = width, width, [list(range(width))] * num_experts, float(num_experts)
    else:
        if expert_size is None:
            expert_size = largest_expert_size(width, num_experts, shared_fraction)
            if expert_size == 0:
                raise MoefyError(
                    f"no expert size fits {num_experts} experts in the FFN's {width} neurons with --shared-fraction"
                    f" {shared_fraction:g}; use fewer --experts or a larger --shared-fraction"
                )
        shared, experts = split_neurons(width, num_experts, expert_size, shared_fraction)
        m, scale = expert_size, 1.0
    config = moe_config(dense_config, num_experts, top_k, m)

    started = time.perf_counter()
    # fp32 holds every stored dtype exactly; the weights are written back in the stored one
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval().requires_grad_(False)
    if not hasattr(model.model.layers[0].mlp, "gate_proj"):
        raise MoefyError(f"--dense {dense_dir}: its decoder layers lack the gated mlp.gate_proj/up_proj/down_proj")
    order = None
    if calib is not None:
        calibration = {"seq_len": seq_len, "num_windows": calib_windows, "batch_size": batch_size, "seed": seed}
        order = neuron_order(dense_dir, model, calib, torch.device(device), **calibration)
    dense_state = {k: v.detach() for k, v in model.state_dict().items()}
    out_dtype = stored_dtype(dense_config)
    state = moe_state_dict(
        dense_state, config.num_hidden_layers, experts, order, gate, scale, config.initializer_range, seed, out_dtype
    )
    with torch.device("meta"):  # no memory and no random init for weights that are replaced at once
        student = AutoModelForCausalLM.from_config(config, dtype=out_dtype)
    student.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        student.tie_weights()
    record = {
        "dense": str(dense_dir),
        "student": str(out_dir),
        "dense_model_type": dense_config.model_type,
        "mode": mode,
        "num_experts": num_experts,
        "top_k": top_k,
        "dense_intermediate_size": width,
        "expert_size": m,
        "shared_neurons": shared,
        "shared_fraction": shared / m,
        "neurons_per_expert": {"common": shared, "own": m - shared},
        "neuron_order": "importance" if order is not None else "stored",
        "gate_init": gate if gate == "zeros" else f"normal(0, {config.initializer_range})",
        "down_proj_scale": scale,
        "seed": seed,
        "exact_at_init": mode == "upcycle" and gate == "zeros" and num_experts & (num_experts - 1) == 0,
        "params": {
            "total": sum(p.numel() for p in student.parameters()),
            "matrix": count_params(student),
            "active": count_params(student, active=True),
            "dense_matrix": count_params(model),
        },
        "weights_dtype": str(out_dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if calib is not None:
        record["calibration"] = {"split": str(calib), "device": device, **calibration}
    write_moe(student, dense_dir, out_dir, record)
    return record


def write_moe(student: torch.nn.Module, dense_dir: Path, out_dir: Path, record: dict[str, Any]) -> None:
    """The MoE directory with the dense model's tokenizer and ``moefy.json``, crash-safe (minima.prune's writer)."""
    save_model_dir(student, dense_dir, out_dir, "moefy.json", record)
