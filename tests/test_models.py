"""Model configs from arch or directory, attention choice, FLOP-relevant parameter counts."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from minima.config import ConfigError, ModelConfig
from minima.models import choose_attn_implementation, count_params, hf_config


def tiny(tied: bool) -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=tied,
    )
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_count_params_leaves_out_only_an_untied_input_embedding(tied):
    model = tiny(tied)
    total = sum(p.numel() for p in model.parameters())
    expected = total if tied else total - 100 * 16
    assert count_params(model) == expected


def test_arch_fills_vocab_and_special_ids_from_the_data():
    cfg = hf_config(
        ModelConfig(arch={"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2}),
        "student",
        {"vocab_size": 777, "bos_token_id": 1, "eos_token_id": 2},
    )
    assert cfg.vocab_size == 777 and cfg.eos_token_id == 2 and cfg.hidden_size == 16


def test_unknown_model_type_and_missing_directory_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"student.arch.model_type='nope'"):
        hf_config(ModelConfig(arch={"model_type": "nope"}), "student", {})
    with pytest.raises(ConfigError, match=r"teacher.path=.*no config.json"):
        hf_config(ModelConfig(path=str(tmp_path)), "teacher", {})


def test_attention_choice_on_cpu():
    cpu = torch.device("cpu")
    assert choose_attn_implementation("auto", cpu) == "sdpa"
    assert choose_attn_implementation("eager", cpu) == "eager"
    with pytest.raises(ConfigError, match=r"flash_attention_2 needs a CUDA GPU"):
        choose_attn_implementation("flash_attention_2", cpu)


def test_a_directory_with_only_a_config_is_an_architecture(tmp_path):
    """A written student config (no weights) builds a fresh model of that shape; a directory with weights loads them."""
    from minima.models import build_model, has_weights

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg.save_pretrained(tmp_path / "arch")
    assert not has_weights(tmp_path / "arch")
    spec = ModelConfig(path=str(tmp_path / "arch"))
    model = build_model(spec, hf_config(spec, "student", {}), dtype=torch.float32, attn_implementation="sdpa")
    assert model.config.hidden_size == 16
    trained = AutoModelForCausalLM.from_config(cfg)
    trained.save_pretrained(tmp_path / "weights")
    assert has_weights(tmp_path / "weights")
    spec = ModelConfig(path=str(tmp_path / "weights"))
    loaded = build_model(spec, hf_config(spec, "student", {}), dtype=torch.float32, attn_implementation="sdpa")
    torch.testing.assert_close(loaded.lm_head.weight, trained.lm_head.weight)


def test_neftune_noise_only_in_training_and_of_the_published_scale() -> None:
    """NEFTune adds uniform noise in [-1, 1] * alpha / sqrt(T * H) to the input embeddings in training mode only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minima.models import add_neftune

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    ids = torch.randint(0, 64, (2, 10))
    clean = lm.get_input_embeddings()(ids).detach()
    handle = add_neftune(lm, alpha=5.0)
    embed = lm.get_input_embeddings()
    lm.train()
    noise = embed(ids).detach() - clean
    bound = 5.0 / (10 * 16) ** 0.5
    assert 0 < noise.abs().max() <= bound and noise.abs().max() > 0.9 * bound  # uniform up to the bound
    lm.eval()
    assert torch.equal(embed(ids), clean)
    handle.remove()
    lm.train()
    assert torch.equal(embed(ids), clean)
