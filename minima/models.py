"""Teacher and student models with transformers: one loading path for both, vocabulary checks, FLOP counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from minima.config import ConfigError, ModelConfig
from minima.mixup import Mix, mix_embeddings, mix_positions
from minima.moe import balance_loss, num_experts, routing_counts


def choose_attn_implementation(requested: str, device: torch.device) -> str:
    """flash_attention_2 when installed and on a GPU, else sdpa; an explicit request must be possible here."""
    if requested == "auto":
        return "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"
    if requested == "flash_attention_2" and not (device.type == "cuda" and is_flash_attn_2_available()):
        raise ConfigError(
            "run.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package"
            " (pip install 'minima[flash]'); use run.attn_implementation=auto or sdpa"
        )
    return requested


def hf_config(model: ModelConfig, key: str, defaults: dict[str, Any]) -> PretrainedConfig:
    """The transformers config of a model: read from its directory, or built from ``arch``.

    ``defaults`` fills fields that ``arch`` leaves out (the data's vocab size and special ids), so that tiny recipes
    follow the tokenizer they are trained on.
    """
    if model.path is not None:
        path = Path(model.path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}.path={model.path}: no config.json there; give a local Hugging Face model directory"
            )
        return AutoConfig.from_pretrained(path)
    fields = {**defaults, **model.arch}
    model_type = fields.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as e:
        raise ConfigError(f"{key}.arch.model_type={model_type!r}: {e}") from None


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def has_weights(path: str | Path) -> bool:
    """Whether a model directory holds weights (else it is an architecture only, e.g. a written student config)."""
    return any(any(Path(path).glob(pattern)) for pattern in WEIGHT_FILES)


def build_model(
    model: ModelConfig,
    config: PretrainedConfig,
    *,
    dtype: torch.dtype,
    attn_implementation: str,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """``from_pretrained`` for a directory with weights; ``from_config`` (fresh init) for an architecture, given as
    ``arch`` or as a directory holding only a config.json (as ``tools/pick_student_size.py --write-config`` writes).

    Called inside the ZeRO-3 scope of ``minima.engine.load_model`` so that transformers partitions at construction
    (``device`` None); a whole model is built straight on ``device``, so that eight ranks of a node do not each hold
    a copy in host memory first.
    """
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if model.path is not None and has_weights(model.path):
        if device is not None:
            kwargs["device_map"] = {"": str(device)}
        return AutoModelForCausalLM.from_pretrained(model.path, config=config, **kwargs)
    if device is None:
        return AutoModelForCausalLM.from_config(config, **kwargs)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def check_vocab(name: str, model: ModelConfig, config: PretrainedConfig, tokenizer_dir: Path, vocab_len: int) -> None:
    """Fail before training when a model cannot have been trained with the data's tokenizer.

    A head larger than the tokenizer is fine (padding rows: the KD term compares the first ``vocab_len`` logits); a
    smaller one, or a model directory whose tokenizer files map ids differently, is a different tokenizer.
    """
    if config.vocab_size < vocab_len:
        raise ConfigError(
            f"{name} has vocab_size {config.vocab_size} but the data's tokenizer ({tokenizer_dir}) has {vocab_len}"
            f" tokens: the {name} uses a different tokenizer. Prepare the data with the {name}'s tokenizer"
            " (tools/prepare_data.py --tokenizer DIR) or use models that share one."
        )
    if model.path is None or not any((Path(model.path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return
    theirs = AutoTokenizer.from_pretrained(model.path).get_vocab()
    ours = AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    if theirs != ours:
        only_ours = sorted(set(ours.items()) - set(theirs.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(
            f"{name} tokenizer ({model.path}, {len(theirs)} tokens) differs from the data's ({tokenizer_dir},"
            f" {len(ours)} tokens), e.g. the data maps {only_ours}. Distillation compares distributions token by"
            " token, so teacher, student and data must share one tokenizer."
        )


def count_params(model: torch.nn.Module, *, active: bool = False) -> int:
    """Parameters that do matrix work per token: all but an untied input embedding (a lookup). ``active``: of an
    MoE model's experts only the ``top_k`` of ``E`` that a token goes through (the count FLOPs follow).

    Reads ``ds_numel`` under ZeRO-3, where the local tensors are shards.
    """
    model = causal_lm(model)
    share = 1.0
    if active and num_experts(model.config) > 0:
        share = getattr(model.config, "num_experts_per_tok", 1) / num_experts(model.config)
    numel = {
        id(p): getattr(p, "ds_numel", p.numel()) * (share if ".experts." in name else 1.0)
        for name, p in model.named_parameters()
    }
    total = sum(numel.values())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    return round(total if tied else total - numel[id(emb)])


def last_hidden(
    lm: PreTrainedModel,
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    routing: bool = False,
):
    """A causal LM's last hidden states (B, T, H) after its final norm: its decoder alone, no output head touched.
    With ``routing``, also its router logits: one (B * T, E) tensor per MoE layer (a tuple, empty for a dense model).
    ``inputs_embeds`` (B, T, H) instead of ``input_ids``: the decoder on given input embeddings (MixKD's mixed rows).

    Asking the whole model for ``output_hidden_states`` instead would keep every layer's states alive (gigabytes for a
    frozen 7B teacher); calling its forward would multiply (or, under ZeRO-3, fetch) the output head for nothing.

    ``position_ids`` (B, T) that restart at 0 mark packed sequences (chat data): transformers then keeps attention
    within each of them, with a block-diagonal causal mask under sdpa and eager, and through flash-attn's varlen
    kernel under flash_attention_2, which reads packing from the positions of a single row only: the rows are
    laid end to end for it (each row starts a sequence, so nothing attends across rows either).
    """
    decoder = lm.get_decoder()
    moe = routing and num_experts(lm.config) > 0
    kwargs = {"use_cache": False, **({"output_router_logits": True} if moe else {})}
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    rows, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
    if position_ids is None:
        out = decoder(**inputs, **kwargs)
        hidden = out.last_hidden_state
    elif lm.config._attn_implementation == "flash_attention_2" and rows > 1:
        flat = {k: v.reshape(1, rows * length, *v.shape[2:]) for k, v in inputs.items()}
        out = decoder(**flat, position_ids=position_ids.reshape(1, -1), **kwargs)
        hidden = out.last_hidden_state.view(rows, length, -1)  # router logits: rows already in (B * T) order
    else:
        out = decoder(**inputs, position_ids=position_ids, **kwargs)
        hidden = out.last_hidden_state
    if not routing:
        return hidden
    return hidden, tuple(out.router_logits) if moe else ()


def add_neftune(lm: PreTrainedModel, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """NEFTune (Jain et al., 2023): in training mode, add uniform noise in [-1, 1] * alpha / sqrt(T * H) to the input
    embeddings (T tokens per row, H the hidden size); evaluation and export see the clean model."""

    def noise(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / (output.shape[-2] * output.shape[-1]) ** 0.5
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return lm.get_input_embeddings().register_forward_hook(noise)


class HiddenStates(torch.nn.Module):
    """What both engines run: a transformers causal LM (``.lm``) cut before its output head.

    For the student, ``forward(input_ids, head)`` returns ``(hidden, head, balance)``: ``balance`` (B,) is each
    sequence's load-balancing loss for an MoE student (:func:`minima.moe.balance_loss`; zeros for a dense one), an
    engine output like the others, so its gradient too starts from DeepSpeed's hooks. In training, the routing
    statistics of those forwards accumulate in ``routing`` (:func:`minima.moe.routing_counts`) until
    :meth:`pop_routing`.

    ``forward(input_ids, position_ids=None)`` returns the last hidden states (B, T, H) (positions: see
    :func:`last_hidden`). With ``mix`` (MixKD, :class:`minima.mixup.Mix`) both forms run on 2B rows: the B
    sequences, then their B mixed-up copies, mixed from this model's own input embeddings. With MiniDisc's
    ``candidates`` installed, ``candidate`` selects the assistant the forward runs as (None: the whole model).
    The chunked loss multiplies the output head itself, a chunk of tokens at a time, so no (B, T, V) logits and no
    second fetch of the head ever happen. For the student,
    ``forward(input_ids, head)`` also returns ``head`` (its output embedding, gathered under ZeRO-3 by the caller)
    through a view: every gradient of the step, the head's included, then flows back through the engine's outputs,
    where DeepSpeed's backward hooks start its bookkeeping (the accumulation boundary, ZeRO-Offload's gradient copy,
    the NVMe swapper). A head that reached the loss around the engine would get its gradient reduced before them.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm
        self.top_k = int(getattr(lm.config, "num_experts_per_tok", 1) or 1)
        self.routing: torch.Tensor | None = None  # (L, E + 2) summed routing_counts; not a buffer, not saved
        self.candidates = None  # MiniDisc's CandidateMasks, installed on .lm (minima.candidates); not saved

    def forward(
        self,
        input_ids: torch.Tensor,
        head: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mix: Mix | None = None,
        candidate: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.candidates is not None:  # stays selected through this forward's backward (recomputation included)
            self.candidates.select(candidate)
        if head is not None and head.numel() == 0:
            raise RuntimeError("HiddenStates got a 0-size head: gather it first (minima.engine.gathered) under ZeRO-3")
        # The view is taken before the decoder runs: with tied embeddings the embedding's own ZeRO-3 release after
        # its forward must not take the head away from the loss.
        head_out = None if head is None else head.view_as(head)
        inputs = {"input_ids": input_ids, "position_ids": position_ids}
        if mix is not None:  # the embedding module is called here: its ZeRO-3 hooks (and NEFTune's noise) still run
            embeds = mix_embeddings(self.lm.get_input_embeddings()(input_ids), mix)
            inputs = {"input_ids": None, "inputs_embeds": embeds, "position_ids": mix_positions(position_ids, mix)}
        if head is None:
            return last_hidden(self.lm, **inputs)
        hidden, router_logits = last_hidden(self.lm, **inputs, routing=True)
        if not router_logits:
            return hidden, head_out, hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        if self.training:
            counts = routing_counts(router_logits, self.top_k)
            self.routing = counts if self.routing is None else self.routing + counts
        return hidden, head_out, balance_loss(router_logits, hidden.shape[0], self.top_k)

    def pop_routing(self) -> torch.Tensor | None:
        """The routing statistics summed since the last call (None for a dense model), and start again."""
        routing, self.routing = self.routing, None
        return routing


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a DeepSpeed engine, a :class:`HiddenStates`, or itself."""
    model = getattr(model, "module", model)
    return getattr(model, "lm", model)


def output_head(model: torch.nn.Module) -> torch.nn.Parameter:
    """The (V, H) output embedding whose product with the final hidden states gives the logits."""
    return causal_lm(model).get_output_embeddings().weight


def check_head_path(name: str, model: torch.nn.Module, input_ids: torch.Tensor, gathered) -> None:
    """Fail fast if ``logits != last_hidden @ head^T`` (a biased, scaled or soft-capped head): the chunked loss
    computes logits that way. ``model`` is an engine around :class:`HiddenStates`; ``gathered`` is a context manager
    giving whole parameters under ZeRO-3. Runs the whole causal LM once (its submodules carry ZeRO-3's hooks)."""
    lm = causal_lm(model)
    was_training = model.training
    model.eval()  # no dropout, no NEFTune noise: the two forwards must see the same model
    with torch.no_grad():
        logits = lm(input_ids=input_ids, use_cache=False).logits.float()
        hidden = model(input_ids)
        head = output_head(model)
        with gathered([head]):
            ours = (hidden @ head.t()).float()
    model.train(was_training)
    if not torch.allclose(ours, logits, rtol=1e-2, atol=1e-2 * float(logits.abs().max())):
        raise ConfigError(
            f"the {name}'s logits are not its last hidden state times its output embedding (max difference"
            f" {float((ours - logits).abs().max()):.3g}): its head has a bias, a scale or a soft cap that the chunked"
            " KD loss (minima.losses.kd_loss_from_hidden) does not apply; use a model whose head is a plain linear map"
        )
