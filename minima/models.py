"""Teacher and student models with transformers: one loading path for both, vocabulary checks, FLOP counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from minima.config import ConfigError, ModelConfig


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
    model: ModelConfig, config: PretrainedConfig, *, dtype: torch.dtype, attn_implementation: str
) -> PreTrainedModel:
    """``from_pretrained`` for a directory with weights; ``from_config`` (fresh init) for an architecture, given as
    ``arch`` or as a directory holding only a config.json (as ``tools/pick_student_size.py --write-config`` writes).

    Called inside the ZeRO-3 scope of ``minima.engine.load_model`` so that transformers partitions at construction.
    """
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if model.path is not None and has_weights(model.path):
        return AutoModelForCausalLM.from_pretrained(model.path, config=config, **kwargs)
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


def count_params(model: torch.nn.Module) -> int:
    """Parameters that do matrix work per token: all but an untied input embedding (a lookup).

    Reads ``ds_numel`` under ZeRO-3, where the local tensors are shards.
    """
    numel = {id(p): getattr(p, "ds_numel", p.numel()) for p in model.parameters()}
    total = sum(numel.values())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    return total if tied else total - numel[id(emb)]


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H) after its final norm, without computing any logits.

    Runs ``model`` (a transformers causal LM or a DeepSpeed engine around one) with an empty ``logits_to_keep``, so
    the output head multiplies zero positions, and takes the decoder's output through a forward hook: asking for
    ``output_hidden_states`` instead would keep every layer's states alive (gigabytes for a frozen 7B teacher).
    """
    module = getattr(model, "module", model)
    captured: list[torch.Tensor] = []
    handle = module.get_decoder().register_forward_hook(lambda mod, args, out: captured.append(out[0]))
    try:
        no_logits = torch.empty(0, dtype=torch.long, device=input_ids.device)
        model(input_ids=input_ids, logits_to_keep=no_logits, use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def output_head(model: torch.nn.Module) -> torch.nn.Parameter:
    """The (V, H) output embedding whose product with the final hidden states gives the logits."""
    return getattr(model, "module", model).get_output_embeddings().weight


def check_head_path(name: str, model: torch.nn.Module, input_ids: torch.Tensor, gathered) -> None:
    """Fail fast if ``logits != final_hidden @ head^T`` (a biased, scaled or soft-capped head): the chunked loss
    computes logits that way. ``gathered`` is a context manager giving whole parameters under ZeRO-3."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        hidden = final_hidden(model, input_ids)
        head = output_head(model)
        with gathered([head]):
            ours = (hidden @ head.t()).float()
    if not torch.allclose(ours, logits, rtol=1e-2, atol=1e-2 * float(logits.abs().max())):
        raise ConfigError(
            f"the {name}'s logits are not its last hidden state times its output embedding (max difference"
            f" {float((ours - logits).abs().max()):.3g}): its head has a bias, a scale or a soft cap that the chunked"
            " KD loss (minima.losses.kd_loss_from_hidden) does not apply; use a model whose head is a plain linear map"
        )
