"""MoE students: the balancing loss and routing statistics against hand-written references, gradients to every
expert, router jitter, active parameter counts."""

import math

import pytest
import torch
from test_distill import tiny_moe_student

from minima.models import HiddenStates, count_params, output_head
from minima.moe import add_router_jitter, balance_loss, routing_counts, routing_scalars


def reference_balance(router_logits, batch_size: int, top_k: int) -> torch.Tensor:
    """Switch's loss written out with loops: per sequence, per layer, E * sum_e f_e * P_e; mean over layers."""
    out = torch.zeros(batch_size, dtype=torch.float64)
    for logits in router_logits:
        e = logits.shape[-1]
        per_seq = logits.double().view(batch_size, -1, e)
        for b in range(batch_size):
            probs = torch.softmax(per_seq[b], dim=-1)
            t = probs.shape[0]
            f = [0.0] * e
            for row in probs:
                for idx in torch.topk(row, top_k).indices.tolist():
                    f[idx] += 1.0 / t
            p = probs.mean(dim=0)
            out[b] += e * sum(f[i] * float(p[i]) for i in range(e)) / len(router_logits)
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_balance_loss_matches_hand_written_reference(top_k):
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(3 * 7, 4, generator=g) for _ in range(2))  # 2 layers, 3 sequences of 7, 4 experts
    ours = balance_loss(logits, batch_size=3, top_k=top_k)
    assert ours.shape == (3,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference_balance(logits, 3, top_k), rtol=1e-6, atol=1e-7)


def test_balance_loss_of_one_sequence_and_layer_is_transformers_switch_loss():
    """One sequence, one layer: exactly what transformers' load_balancing_loss_func computes over a forward."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    theirs = load_balancing_loss_func((logits,), num_experts=4, top_k=1)
    torch.testing.assert_close(balance_loss((logits,), 1, 1)[0], theirs.float(), rtol=1e-6, atol=1e-7)


def test_balance_loss_bounds():
    """Balanced routing gives top_k; every token certain of one expert gives E."""
    balanced = torch.eye(4).repeat(2, 1) * 50.0  # 8 tokens, two per expert, each near-certain
    assert float(balance_loss((balanced,), 1, 1)[0]) == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 2] = 50.0
    assert float(balance_loss((collapsed,), 1, 1)[0]) == pytest.approx(4.0, abs=1e-6)


def test_routing_statistics_by_hand():
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    counts = routing_counts((logits, logits.flip(1)), top_k=1)
    assert counts.shape == (2, 5)
    assert counts[0, :3].tolist() == [3.0, 1.0, 0.0]  # the uniform row's tie goes to expert 0
    assert counts[0, 4] == 4
    probs = torch.softmax(logits, dim=-1)
    entropy = float(-(probs * probs.log()).sum())
    assert float(counts[0, 3]) == pytest.approx(entropy, rel=1e-6)
    scalars = routing_scalars(counts + counts, top_k=1)  # two micro-batches summed
    assert scalars["moe/layer_0/load_expert_0"] == pytest.approx(0.75)
    assert scalars["moe/layer_0/max_share"] == pytest.approx(0.75)
    assert scalars["moe/layer_0/entropy"] == pytest.approx(entropy / 4, rel=1e-6)
    assert scalars["moe/entropy_uniform"] == pytest.approx(math.log(3))


def test_every_expert_and_the_gate_get_gradients_through_hidden_states():
    """The student path: HiddenStates returns hidden states, head and per-sequence balancing loss; a loss on them
    reaches every expert (the task loss through the gate probability too) and the router."""
    torch.manual_seed(0)
    lm = tiny_moe_student(experts=4, gate_std=0.02)
    model = HiddenStates(lm).train()
    ids = torch.randint(0, 40, (4, 16))
    hidden, head, balance = model(ids, output_head(model))
    assert balance.shape == (4,) and (balance >= 1.0 - 1e-6).all()
    logits = hidden @ head.t()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    ce.backward(retain_graph=True)
    for layer in lm.model.layers:
        per_expert = layer.mlp.experts.down_proj.grad.norm(dim=(1, 2))
        assert (per_expert > 0).all(), per_expert
        assert layer.mlp.gate.weight.grad.abs().sum() > 0  # the task loss alone trains the gate (no renormalising)
        assert all(float(p.grad.abs().sum()) == 0 for p in layer.mlp.shared_expert.parameters())
    lm.zero_grad()
    balance.sum().backward()
    assert all(layer.mlp.gate.weight.grad.abs().sum() > 0 for layer in lm.model.layers)
    routing = model.pop_routing()
    assert routing.shape == (2, 6) and routing[:, :4].sum(dim=1).tolist() == [64.0, 64.0]
    assert model.pop_routing() is None


def test_dense_student_returns_zero_balance_and_no_routing():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    model = HiddenStates(lm).train()
    _, _, balance = model(torch.randint(0, 40, (2, 5)), output_head(model))
    assert balance.tolist() == [0.0, 0.0] and model.pop_routing() is None
    assert count_params(lm, active=True) == count_params(lm)


def test_router_jitter_only_in_training():
    torch.manual_seed(0)
    lm = tiny_moe_student(experts=4)
    seen = []
    lm.model.layers[0].mlp.gate.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    add_router_jitter(lm, 0.1)
    ids = torch.randint(0, 40, (1, 8))
    lm.eval()
    with torch.no_grad():
        a, b = lm(ids).logits, lm(ids).logits
    assert torch.equal(a, b) and torch.equal(seen[0], seen[1])
    lm.train()
    with torch.no_grad():
        lm(ids)
    ratio = seen[2] / seen[0]
    assert not torch.allclose(ratio, torch.ones_like(ratio))
    assert float(ratio.min()) >= 0.9 - 1e-6 and float(ratio.max()) <= 1.1 + 1e-6


def test_active_params_count_top_k_of_the_experts():
    lm = tiny_moe_student(experts=8)
    experts = sum(p.numel() for n, p in lm.named_parameters() if ".experts." in n)
    assert count_params(lm) - count_params(lm, active=True) == experts - experts // 8


def test_moe_recipes_are_minimoe_shapes_with_the_dense_active_size():
    """llama2_7b_to_3b_moe: MiniMA-3B's shape with 4 FFN experts, top-1, gate-probability routing, the shared expert
    off; tiny_moe: tiny_cpu's student likewise. Each has the dense recipe's active size (+ routers) and over twice
    its parameters."""
    from transformers import AutoConfig

    from minima.arch import arch_from_hf_config
    from minima.config import load_config
    from minima.moe import SHARED_EXPERT_OFF

    paths = ["teacher.path=/models/llama-2-7b", "data.dir=/data"]
    for moe_recipe, dense_recipe, vocab in (
        ("llama2_7b_to_3b_moe", "llama2_7b_to_3b", 32000),
        ("tiny_moe", "tiny_cpu", 2048),
    ):
        archs = []
        for recipe in (moe_recipe, dense_recipe):
            fields = dict(load_config(recipe, paths if "7b" in recipe else []).student.arch)
            config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=vocab, **fields)
            archs.append((config, arch_from_hf_config(config, recipe)))
        (moe_config, moe), (_, dense) = archs
        assert moe_config.model_type == "qwen2_moe" and moe_config.num_experts == 4
        assert moe_config.num_experts_per_tok == 1 and moe_config.norm_topk_prob is False
        assert moe_config.shared_expert_intermediate_size == SHARED_EXPERT_OFF and not moe_config.qkv_bias
        assert moe_config.moe_intermediate_size == dense.intermediate_size
        assert dense.total_params() < moe.active_params() < 1.005 * dense.total_params()
        assert moe.total_params() > 2 * dense.total_params()
