"""MoE students from dense models (minima.moefy, tools/moefy.py) on tiny llama, mistral and qwen2 models.

Upcycling must reproduce the dense model's logits bit for bit when E is a power of two; a split must put the
documented neuron slices in every expert (rebuilt here from the rule, independently of the code); everything outside
the MLPs is the dense model's; the written directory reloads with ``AutoModelForCausalLM`` and generates.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from minima.moe import SHARED_EXPERT_OFF
from minima.moefy import MoefyError, largest_expert_size, moefy, split_neurons

REPO = Path(__file__).resolve().parent.parent
VOCAB = 1024  # the tiny tokenizer's
SIZES = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
SIZES |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def cli_main(argv: list[str]) -> int:
    """``tools/moefy.py``'s ``main`` in-process (a subprocess costs seconds of imports)."""
    spec = importlib.util.spec_from_file_location("moefy_tool", REPO / "tools" / "moefy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and two threads fighting other work for 2 cores run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_dense(path: Path, config, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A seeded random dense model; every parameter (norms and biases too) random, so a wrong copy shows."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.to(dtype).save_pretrained(path)
    return path


DENSE = {
    "llama": lambda: LlamaConfig(**SIZES, tie_word_embeddings=False),
    "llama_tied": lambda: LlamaConfig(**SIZES, tie_word_embeddings=True),
    "llama_bf16": lambda: LlamaConfig(**SIZES, tie_word_embeddings=False),  # stored in bf16, written back in bf16
    "qwen2": lambda: Qwen2Config(**SIZES, tie_word_embeddings=False),  # q/k/v biases
    "mistral_sliding": lambda: MistralConfig(**SIZES, sliding_window=5),  # windows shorter than the inputs
}


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {
        name: save_dense(root / name, make(), dtype=torch.bfloat16 if "bf16" in name else torch.float32)
        for name, make in DENSE.items()
    }


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def fused_state(path: Path) -> dict[str, torch.Tensor]:
    """The reloaded weights: transformers 5 fuses the experts on load (``experts.gate_up_proj`` (E, 2m, h),
    ``experts.down_proj`` (E, h, m)); on disk save_pretrained writes them per expert, Qwen1.5-MoE's layout."""
    return {k: v.detach() for k, v in load(path).state_dict().items()}


def inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(DENSE))
@pytest.mark.parametrize("experts", [2, 4])
def test_upcycle_reproduces_the_dense_logits_exactly(name, experts, dense_dirs, tmp_path):
    record = moefy(dense_dirs[name], tmp_path / "moe", num_experts=experts, mode="upcycle", gate="zeros")
    assert record["exact_at_init"] and record["gate_init"] == "zeros" and record["down_proj_scale"] == experts
    dense, moe = load(dense_dirs[name]), load(tmp_path / "moe")
    assert moe.config.model_type == "qwen2_moe" and moe.config.qkv_bias == (name == "qwen2")
    assert moe.dtype == dense.dtype == (torch.bfloat16 if "bf16" in name else torch.float32)
    with torch.no_grad():
        want, got = dense(inputs()).logits, moe(inputs(), output_router_logits=True)
    assert torch.equal(want, got.logits)
    assert len(got.router_logits) == SIZES["num_hidden_layers"]
    assert all(r.shape == (3 * 17, experts) and not r.any() for r in got.router_logits)  # zero gate: uniform


def test_upcycle_with_three_experts_is_equal_up_to_rounding(dense_dirs, tmp_path):
    """1/3 is not a float: the dense function holds to rounding (max |diff| ~6e-8 on these logits of size ~1)."""
    record = moefy(dense_dirs["llama"], tmp_path / "moe", num_experts=3, mode="upcycle", gate="zeros")
    assert not record["exact_at_init"]
    with torch.no_grad():
        want, got = load(dense_dirs["llama"])(inputs()).logits, load(tmp_path / "moe")(inputs()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_upcycle_by_default_starts_near_the_dense_function_with_a_random_gate(dense_dirs, tmp_path):
    """The default gate, normal(0, 0.02), breaks the zero gate's ties (every token on expert 0): tokens spread over
    the experts, and the logits stay near the dense model's (each expert's output is E * p * FFN, p ~ 1/E)."""
    record = moefy(dense_dirs["llama"], tmp_path / "moe", num_experts=4, mode="upcycle")
    assert record["gate_init"].startswith("normal") and not record["exact_at_init"]
    dense, moe = load(dense_dirs["llama"]), load(tmp_path / "moe")
    with torch.no_grad():
        want, got = dense(inputs()).logits, moe(inputs(), output_router_logits=True)
    chosen = torch.cat([r.argmax(-1) for r in got.router_logits])
    assert len(chosen.unique()) > 1
    assert not torch.equal(want, got.logits)
    assert float((got.logits - want).norm() / want.norm()) < 0.2


def test_sliding_window_layers_stay_sliding(dense_dirs, tmp_path):
    moefy(dense_dirs["mistral_sliding"], tmp_path / "moe", num_experts=2)
    config = load(tmp_path / "moe").config
    assert config.use_sliding_window and config.sliding_window == 5
    assert config.layer_types == ["sliding_attention"] * SIZES["num_hidden_layers"]


def expected_neurons(width: int, experts: int, m: int, s: int) -> list[list[int]]:
    """The documented rule, written out: common 0..s-1, then s + e + k E for k < m - s."""
    rows = [list(range(s)) + [s + e + k * experts for k in range(m - s)] for e in range(experts)]
    assert all(max(r) < width for r in rows)
    return rows


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize(("experts", "m", "fraction"), [(4, None, 2 / 3), (2, 20, 0.5), (3, 12, 0.0)])
def test_split_experts_are_the_documented_slices(name, experts, m, fraction, dense_dirs, tmp_path):
    record = moefy(dense_dirs[name], tmp_path / "moe", num_experts=experts, expert_size=m, shared_fraction=fraction)
    m, s = record["expert_size"], record["shared_neurons"]
    assert s == round(fraction * m) and record["neurons_per_expert"] == {"common": s, "own": m - s}
    if experts == 4:  # the default: the largest m with s + E (m - s) <= 48 at 2/3
        assert (m, s) == (24, 16)
    dense = load_file(dense_dirs[name] / "model.safetensors")
    moe = fused_state(tmp_path / "moe")
    rows = expected_neurons(48, experts, m, s)
    for i in range(SIZES["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        gate_up, down = moe[p + "experts.gate_up_proj"], moe[p + "experts.down_proj"]
        assert gate_up.shape == (experts, 2 * m, 32) and down.shape == (experts, 32, m)
        for e, r in enumerate(rows):
            assert torch.equal(gate_up[e, :m], dense[p + "gate_proj.weight"][r])  # gate first: chunk(2) -> gate, up
            assert torch.equal(gate_up[e, m:], dense[p + "up_proj.weight"][r])
            assert torch.equal(down[e], dense[p + "down_proj.weight"][:, r])
            assert torch.equal(gate_up[e, :s], gate_up[0, :s])  # the common block is the same in every expert
        router = moe[p + "gate.weight"]
        assert router.shape == (experts, 32) and 0.005 < router.std() < 0.05  # normal(0, 0.02)
        assert not moe[p + "shared_expert_gate.weight"].any()
        assert moe[p + "shared_expert.down_proj.weight"].shape == (32, SHARED_EXPERT_OFF)
    for key in dense:  # everything outside the MLPs is copied exactly
        if ".mlp." not in key:
            assert torch.equal(moe[key], dense[key]), key


def test_expert_outputs_follow_the_switch_routing(dense_dirs, tmp_path):
    """One layer by hand: the top-1 expert's output times its softmax probability, not renormalised."""
    moefy(dense_dirs["llama"], tmp_path / "moe", num_experts=4, seed=3)
    block = load(tmp_path / "moe").model.layers[0].mlp
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p, chosen = torch.softmax(x @ block.gate.weight.T, dim=-1).max(dim=-1)
        want = []
        for t, e in enumerate(chosen.tolist()):
            gate, up = (block.experts.gate_up_proj[e] @ x[t]).chunk(2)
            want.append(p[t] * (block.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)))
        assert p.min() > 0.2 and p.max() < 0.3  # a fresh normal gate: near-uniform, far from 1
        torch.testing.assert_close(block(x[None])[0], torch.stack(want), rtol=1e-5, atol=1e-6)


def test_reload_generate_and_router_logits(dense_dirs, tmp_path):
    moefy(dense_dirs["llama_tied"], tmp_path / "moe", num_experts=4, top_k=2)
    moe = load(tmp_path / "moe")
    assert moe.config.num_experts_per_tok == 2 and moe.config.tie_word_embeddings
    assert moe.get_output_embeddings().weight is moe.get_input_embeddings().weight
    out = moe.generate(inputs()[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    with torch.no_grad():
        logits = moe(inputs(), output_router_logits=True).router_logits
    assert len(logits) == 2 and logits[0].shape == (3 * 17, 4) and logits[0].abs().sum() > 0


def test_cli_end_to_end(tmp_path, capsys):
    src = save_dense(tmp_path / "src", DENSE["qwen2"]())
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = tmp_path / "moe"
    argv = ["--dense", str(src), "--out", str(out), "--experts", "2", "--shared-fraction", "1/2", "--seed", "7"]
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((out / "moefy.json").read_text())
    assert printed == record
    assert record["mode"] == "split" and record["num_experts"] == 2 and record["seed"] == 7
    assert (record["expert_size"], record["shared_neurons"]) == (32, 16)  # 16 + 2 * 16 = 48
    assert record["params"]["active"] < record["params"]["matrix"]
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["norm_topk_prob"] is False
    assert config["num_experts_per_tok"] == 1 and config["moe_intermediate_size"] == 32
    assert config["output_router_logits"] is False and config["mlp_only_layers"] == []
    # the same seed gives the same router; an existing --out needs --overwrite
    assert cli_main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    first = load_file(out / "model.safetensors")["model.layers.0.mlp.gate.weight"]
    assert cli_main([*argv, "--overwrite"]) == 0
    assert torch.equal(load_file(out / "model.safetensors")["model.layers.0.mlp.gate.weight"], first)


def test_calibration_puts_the_important_neurons_in_the_common_block(tiny_prepared_data, tmp_path):
    """Neurons silenced in the dense model (zero down_proj columns) have zero importance: never common."""
    config = LlamaConfig(**SIZES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    silenced = list(range(0, 16))  # the stored order would make exactly these the common block
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, silenced] = 0
    model.save_pretrained(tmp_path / "dense")
    record = moefy(
        tmp_path / "dense",
        tmp_path / "moe",
        num_experts=4,
        calib=tiny_prepared_data / "train",
        seq_len=16,
        calib_windows=4,
        batch_size=2,
    )
    assert record["neuron_order"] == "importance" and record["shared_neurons"] == 16
    moe = fused_state(tmp_path / "moe")
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    for i in range(SIZES["num_hidden_layers"]):
        common = moe[f"model.layers.{i}.mlp.experts.down_proj"][0, :, :16]
        assert (common.abs().sum(dim=0) > 0).all()  # no silenced neuron among the common 16
        gate_rows = moe[f"model.layers.{i}.mlp.experts.gate_up_proj"][:, :24].reshape(-1, 32)
        dense_gate = dense[f"model.layers.{i}.mlp.gate_proj.weight"]
        assert all((dense_gate == row).all(dim=1).any() for row in gate_rows)  # still dense neurons


def test_split_arithmetic():
    assert largest_expert_size(48, 4, 2 / 3) == 24
    # LLaMA-2-7B, 8 experts: m = 3301, s = 2201, 2201 + 8 * 1100 = 11001 <= 11008 (m = 3302 needs 11009)
    assert largest_expert_size(11008, 8, 2 / 3) == 3301
    assert split_neurons(10, 2, 4, 0.5) == (2, [[0, 1, 2, 4], [0, 1, 3, 5]])
    with pytest.raises(MoefyError, match=r"--expert-size 24 or less.*--shared-fraction 0\.8000 or more"):
        split_neurons(48, 4, 30, 2 / 3)


BAD_INPUT = {  # name -> (dense config, moefy kwargs, message)
    "one expert": (LlamaConfig(**SIZES), {"num_experts": 1}, "at least 2 experts"),
    "attention bias": (LlamaConfig(**SIZES, attention_bias=True), {"num_experts": 2}, "attention_bias: true"),
    "mlp bias": (LlamaConfig(**SIZES, mlp_bias=True), {"num_experts": 2}, "mlp_bias: true"),
    "not llama": (
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4),
        {"num_experts": 2},
        "model_type 'gpt2'",
    ),
    "too wide": (LlamaConfig(**SIZES), {"num_experts": 4, "expert_size": 40}, "--expert-size 24 or less"),
    "bad fraction": (LlamaConfig(**SIZES), {"num_experts": 2, "shared_fraction": 1.5}, r"not in \[0, 1\]"),
    "top-k": (LlamaConfig(**SIZES), {"num_experts": 2, "top_k": 3}, r"--top-k 3 is not in \[1, --experts 2\]"),
    "upcycle size": (
        LlamaConfig(**SIZES),
        {"num_experts": 2, "mode": "upcycle", "expert_size": 8},
        "drop --expert-size",
    ),
    "mode": (LlamaConfig(**SIZES), {"num_experts": 2, "mode": "merge"}, "--mode 'merge'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_error(case, tmp_path):
    config, kwargs, message = BAD_INPUT[case]
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    with pytest.raises(MoefyError, match=message):
        moefy(tmp_path / "dense", tmp_path / "moe", **kwargs)
    assert not (tmp_path / "moe").exists()


def test_missing_dense_and_occupied_output_through_the_cli(tmp_path, capsys):
    assert cli_main(["--dense", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--experts", "2"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("")
    assert cli_main(["--dense", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--experts", "2"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
