"""Architectures (``minima.arch``): exact parameter counts against transformers models built on the meta device,
loading model specs, and the students derived from a teacher."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minima.arch import (
    DERIVATIONS,
    FFN_MULTIPLE,
    HIDDEN_MULTIPLE,
    Arch,
    ArchError,
    arch_from_hf_config,
    load_arch,
    moe_student,
    parse_count,
    preset_names,
    student_candidates,
)
from minima.law import PUBLISHED_LAW
from minima.moe import SHARED_EXPERT_OFF

# Total parameters of the public checkpoints the presets copy (sum of numel of the released weights).
PUBLISHED_COUNTS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "mistral-7b": 7_241_732_096,
    "llama3-8b": 8_030_261_248,
    "qwen2.5-7b": 7_615_616_512,
}

# The demo's teacher: ~3.4M parameters, below the affine form's domain.
TINY_TEACHER = {
    "model_type": "llama",
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "vocab_size": 2048,
    "tie_word_embeddings": False,
    "max_position_embeddings": 256,
}

# Families and options the presets do not cover.
FAMILY_CASES = {
    # Qwen2.5-3B's shape: tied embeddings, GQA 16/2, hard-wired q/k/v biases
    "qwen2-tied-gqa": {
        "model_type": "qwen2",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    # Qwen3-4B's shape: per-head q/k norms, head_dim 128 with 32 heads in a 2560 hidden (attention width != hidden)
    "qwen3-qk-norm-tied": {
        "model_type": "qwen3",
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    # llama with every bias switched on, GQA 12/4 and head_dim 128 in a 768 hidden
    "llama-biases-gqa": {
        "model_type": "llama",
        "hidden_size": 768,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "attention_bias": True,
        "mlp_bias": True,
        "vocab_size": 1000,
        "tie_word_embeddings": False,
    },
    "mistral-tied-gqa": {
        "model_type": "mistral",
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    },
}
PUBLISHED_FAMILY_COUNTS = {"qwen2-tied-gqa": 3_085_938_688, "qwen3-qk-norm-tied": 4_022_468_096}

# Mixtures of experts: tiny configs of each option the counts know.
MOE_CASES = {
    # a shared expert, top-2, one dense layer (mlp_only_layers) of a different FFN width, qwen2_moe's q/k/v biases
    "qwen2_moe-shared-dense-layer": {
        "model_type": "qwen2_moe",
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "tie_word_embeddings": False,
    },
    # minima's LLaMA-equivalent MoE but tied and every second layer sparse; the shared expert at width 0 still has
    # its gate
    "qwen2_moe-no-shared-step-2": {
        "model_type": "qwen2_moe",
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 0,
        "num_experts": 8,
        "num_experts_per_tok": 1,
        "norm_topk_prob": False,
        "qkv_bias": False,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [],
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 100,
        "tie_word_embeddings": True,
    },
    "mixtral-gqa": {
        "model_type": "mixtral",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "tie_word_embeddings": False,
    },
}


def hf_counts(config) -> tuple[int, int]:
    """(total, embedding) parameters of the transformers model of ``config``, built on the meta device (no memory).

    ``named_parameters`` lists a tied output head once, under the input embedding."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    named = dict(model.named_parameters())
    embedding = sum(p.numel() for n, p in named.items() if "embed_tokens" in n or n.startswith("lm_head"))
    return sum(p.numel() for p in named.values()), embedding


def config_of(fields: dict):
    """The transformers config of a config.json's fields."""
    return AutoConfig.for_model(fields["model_type"], **{k: v for k, v in fields.items() if k != "model_type"})


def arch_of(fields: dict) -> Arch:
    return arch_from_hf_config(config_of(fields))


def write_config(directory: Path, fields: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(fields))
    return path


def assert_counts_match(arch: Arch) -> None:
    total, embedding = hf_counts(arch.to_hf_config())
    assert arch.total_params() == total, arch.name
    assert arch.embedding_params() == embedding, arch.name
    assert arch.non_embedding_params() == total - embedding, arch.name


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Arch:
    return load_arch(write_config(tmp_path_factory.mktemp("tiny_teacher"), TINY_TEACHER))


# ---------------------------------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize("name", preset_names())
def test_preset_counts_equal_the_transformers_model_and_the_public_checkpoint(name):
    arch = load_arch(name)
    assert arch.total_params() == PUBLISHED_COUNTS[name]
    assert_counts_match(arch)


@pytest.mark.parametrize("name", preset_names())
def test_every_candidate_config_of_a_preset_counts_exactly(name):
    teacher = load_arch(name)
    candidates = student_candidates(teacher, PUBLISHED_LAW.optimal_student(teacher.total_params()).params)
    assert {c.derivation for c in candidates} == set(DERIVATIONS)
    for c in candidates:
        assert_counts_match(c.arch)


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_family_options_count_exactly_for_the_config_and_its_candidates(case, tmp_path):
    arch = load_arch(write_config(tmp_path, FAMILY_CASES[case]))
    if case in PUBLISHED_FAMILY_COUNTS:
        assert arch.total_params() == PUBLISHED_FAMILY_COUNTS[case]
    assert_counts_match(arch)
    for c in student_candidates(arch, PUBLISHED_LAW.optimal_student(arch.total_params()).params):
        assert c.arch.tie_word_embeddings == arch.tie_word_embeddings
        assert (c.arch.qkv_bias, c.arch.o_bias, c.arch.mlp_bias, c.arch.qk_norm) == (
            arch.qkv_bias,
            arch.o_bias,
            arch.mlp_bias,
            arch.qk_norm,
        )
        assert_counts_match(c.arch)


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_configs_count_exactly_for_the_config_and_its_candidates(case, tmp_path):
    fields = MOE_CASES[case]
    arch = load_arch(write_config(tmp_path, fields))
    assert arch.total_params() == hf_counts(config_of(fields))[0]
    assert_counts_match(arch)  # and written back as a config
    assert arch.active_params() < arch.total_params() and arch.moe_layers() > 0
    target = PUBLISHED_LAW.optimal_student(arch.active_params()).params
    candidates = student_candidates(arch, target, count="active")
    assert candidates
    for c in candidates:  # an MoE teacher's students keep its experts and routing
        a = c.arch
        assert (a.model_type, a.num_experts, a.experts_per_token) == (
            arch.model_type,
            arch.num_experts,
            arch.experts_per_token,
        )
        assert a.active_params() < arch.active_params()
        assert_counts_match(a)


def test_moe_active_params_by_hand():
    h, v, e, m, s, w = 64, 100, 4, 32, 48, 96  # hidden, vocab, experts, expert FFN, shared FFN, dense FFN
    arch = arch_of(MOE_CASES["qwen2_moe-shared-dense-layer"])
    attention = 2 * h * 64 + 2 * h * 32 + (64 + 2 * 32)  # q, o; k, v (2 kv heads of 16); q/k/v biases
    norms = 2 * h
    moe_mlp = e * 3 * h * m + e * h + 3 * h * s + h  # experts, router, shared expert, its gate
    dense_mlp = 3 * h * w
    total = 2 * v * h + 4 * (attention + norms) + 3 * moe_mlp + dense_mlp + h
    assert arch.moe_layers() == 3 and arch.total_params() == total == 183_808
    active = total - 3 * (e - 2) * 3 * h * m  # top-2 of 4: two experts skipped in each of the 3 MoE layers
    assert arch.active_params() == active == 146_944
    matmul = 4 * (2 * h * 64 + 2 * h * 32) + 3 * (2 * 3 * h * m + e * h + 3 * h * s + h) + dense_mlp + v * h
    assert arch.matmul_params() == matmul
    assert arch.train_flops_per_token(16) == 6.0 * matmul + 12 * 4 * 4 * 16 * 16
    mixtral = arch_of(MOE_CASES["mixtral-gqa"])
    assert mixtral.active_params() == mixtral.total_params() - 2 * 2 * 3 * h * w


def test_moe_student_of_minima_3b_counts_exactly():
    teacher = load_arch("llama2-7b")
    dense = next(c.arch for c in student_candidates(teacher, 2.7e9, "uniform") if c.factor == 0.75)
    assert dense.total_params() == dense.active_params() == 2_914_667_520  # MiniMA-3B
    moe = moe_student(dense, 4)
    assert (moe.model_type, moe.num_experts, moe.experts_per_token, moe.expert_size) == ("qwen2_moe", 4, 1, 8192)
    assert (moe.qkv_bias, moe.shared_expert_size, moe.moe_layers()) == (False, SHARED_EXPERT_OFF, 24)
    assert moe.total_params() == 8_351_075_328
    router_and_off_shared = 24 * (4 * 3072 + 3 * 3072 * SHARED_EXPERT_OFF + 3072)
    assert moe.active_params() == dense.total_params() + router_and_off_shared == 2_915_257_344
    assert moe.matmul_params() == dense.matmul_params() + router_and_off_shared
    assert_counts_match(moe)
    config = moe.to_hf_config()
    assert (config.norm_topk_prob, config.use_sliding_window, config.mlp_only_layers) == (False, False, [])
    assert config.rope_parameters == teacher.to_hf_config().rope_parameters
    qwen2 = student_candidates(load_arch("qwen2.5-7b"), 3e9)[0].arch
    assert moe_student(qwen2, 2).qkv_bias  # a qwen2 shape keeps its q/k/v biases


def test_moe_student_refuses_what_qwen2_moe_cannot_hold(tmp_path):
    moe = load_arch(write_config(tmp_path / "moe", MOE_CASES["mixtral-gqa"]))
    with pytest.raises(ArchError, match=r"already an MoE \(4 experts\).*drop --moe"):
        moe_student(moe, 4)
    llama = load_arch(write_config(tmp_path / "llama", FAMILY_CASES["llama-biases-gqa"]))
    with pytest.raises(ArchError, match=r"biases or q/k norms.*bias-free"):
        student_candidates(llama, 1e7, experts=4)
    dense = load_arch(write_config(tmp_path / "tiny", TINY_TEACHER))
    with pytest.raises(ArchError, match="--moe 1: an MoE needs at least 2 experts"):
        moe_student(dense, 1)
    with pytest.raises(ArchError, match=r"--moe-top-k 5: must be between 1 and the number of experts \(4\)"):
        moe_student(dense, 4, 5)


def test_moe_candidates_meet_the_target_in_active_params():
    teacher = load_arch("llama2-7b")
    target = PUBLISHED_LAW.optimal_student(teacher.total_params()).params
    dense = student_candidates(teacher, target, count="active")  # dense: active = total
    moe = student_candidates(teacher, target, count="active", experts=4)
    assert abs(moe[0].arch.active_params() / target - 1) < 0.03
    assert moe[0].arch.total_params() > 2.5 * moe[0].arch.active_params()
    for c in moe:
        assert c.arch.model_type == "qwen2_moe" and c.arch.num_experts == 4
        assert_counts_match(c.arch)
    # the same dense shapes, each with its FFN as 4 experts: active = dense + router + the switched-off shared expert
    for c in moe:
        a = c.arch
        base = replace(teacher, hidden_size=a.hidden_size, intermediate_size=a.expert_size, num_layers=a.num_layers)
        base = replace(base, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads)
        extra = a.num_layers * (4 * a.hidden_size + 4 * a.hidden_size * SHARED_EXPERT_OFF)
        assert a.active_params() == base.total_params() + extra
    assert {(c.arch.num_layers, c.arch.hidden_size) for c in moe} & {
        (c.arch.num_layers, c.arch.hidden_size) for c in dense
    }
    by_total = student_candidates(teacher, target, count="total", experts=4)
    assert abs(by_total[0].arch.total_params() / target - 1) < 0.03  # --count total: the experts together meet S*


def test_family_flags_are_read_from_the_config(tmp_path):
    qwen2 = load_arch(write_config(tmp_path / "qwen2", FAMILY_CASES["qwen2-tied-gqa"]))
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.mlp_bias, qwen2.num_kv_heads) == (True, False, False, 2)
    assert qwen2.embedding_params() == 151936 * 2048  # tied: the head shares the input embedding
    llama = load_arch(write_config(tmp_path / "llama", FAMILY_CASES["llama-biases-gqa"]))
    assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.head_dim) == (True, True, True, 128)
    assert load_arch(write_config(tmp_path / "qwen3", FAMILY_CASES["qwen3-qk-norm-tied"])).qk_norm


def test_load_arch_takes_a_directory_or_a_config_file(tmp_path):
    path = write_config(tmp_path, TINY_TEACHER)
    assert load_arch(tmp_path) == replace(load_arch(path), name=str(tmp_path))  # the name records the spec
    assert load_arch(path).total_params() == 3_443_136


def test_load_arch_errors_name_the_input(tmp_path):
    with pytest.raises(ArchError, match=r"'llama2-7' is neither a preset \(.*llama2-7b.*\)"):
        load_arch("llama2-7")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{model_type: llama")
    with pytest.raises(ArchError, match=rf"{bad_json}: not valid JSON"):
        load_arch(bad_json)
    no_type = write_config(tmp_path / "no_type", {"hidden_size": 64})
    with pytest.raises(ArchError, match=rf"{no_type}: .*needs a 'model_type'"):
        load_arch(no_type)
    gpt2 = write_config(tmp_path / "gpt2", {"model_type": "gpt2"})
    with pytest.raises(ArchError, match=rf"{gpt2}: model_type 'gpt2' is not supported; .*'llama'"):
        load_arch(gpt2)
    uneven = write_config(tmp_path / "uneven", {**TINY_TEACHER, "num_attention_heads": 5})
    with pytest.raises(ArchError, match=rf"{uneven}: transformers rejects this llama config: .*heads"):
        load_arch(uneven)


def test_parse_count_reads_suffixes_exactly():
    assert parse_count("7B") == 7e9
    assert parse_count("350M") == parse_count("350m") == 3.5e8
    assert parse_count("125k") == 125e3
    assert parse_count("6_738_415_616") == 6738415616
    assert parse_count(" 6.7e9 ") == 6.7e9
    # the same size written two ways must be one number (fit_law groups runs by student size)
    assert all(parse_count(f"{i / 100}B") == float(f"{i / 100}e9") for i in range(1, 1000))
    for bad in ("seven", "", "B", "-3B", "0", "nan", "inf"):
        with pytest.raises(ArchError, match="parameter count"):
            parse_count(bad)


# ---------------------------------------------------------------------------------------------------------------------
# The students derived from a teacher


def test_llama2_7b_student_is_near_0_4x_and_the_table_holds_minima():
    teacher = load_arch("llama2-7b")
    est = PUBLISHED_LAW.optimal_student(teacher.total_params())
    assert est.form == "affine" and est.notes == ()
    assert est.params == pytest.approx((6738.415616 + 11.498) / 2.498 * 1e6)
    assert 0.39 < est.params / teacher.total_params() < 0.41

    candidates = student_candidates(teacher, est.params)
    top = candidates[0].arch
    assert abs(top.total_params() / est.params - 1) < 0.03
    assert top.head_dim == 128 and top.hidden_size % HIDDEN_MULTIPLE == 0 and top.intermediate_size % FFN_MULTIPLE == 0
    distances = [abs(math.log(c.arch.total_params() / est.params)) for c in candidates]
    assert distances == sorted(distances)

    minima = [c for c in candidates if (c.derivation, c.factor) == ("uniform", 0.75)]
    assert len(minima) == 1
    a = minima[0].arch
    assert (a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.intermediate_size) == (24, 3072, 24, 24, 8192)


def test_tiny_teacher_uses_the_proportional_form_and_still_gets_students(tiny_teacher):
    est = PUBLISHED_LAW.optimal_student(tiny_teacher.total_params())
    assert est.form == "proportional"
    assert est.params == pytest.approx(tiny_teacher.total_params() / PUBLISHED_LAW.slope)
    assert any("proportional form" in n for n in est.notes)
    candidates = student_candidates(tiny_teacher, est.params)
    assert candidates
    for c in candidates:
        a = c.arch
        assert a.total_params() < tiny_teacher.total_params()
        assert a.num_heads * a.head_dim == a.hidden_size and a.head_dim == 32
        assert a.num_heads % a.num_kv_heads == 0
        assert_counts_match(a)


@pytest.mark.parametrize("name", [*preset_names(), "tiny"])
def test_candidates_are_smaller_and_consistent(name, tiny_teacher):
    teacher = tiny_teacher if name == "tiny" else load_arch(name)
    target = PUBLISHED_LAW.optimal_student(teacher.total_params()).params
    group = teacher.num_heads // teacher.num_kv_heads
    for c in student_candidates(teacher, target):
        a = c.arch
        assert a.total_params() < teacher.total_params()
        assert a.num_layers <= teacher.num_layers and a.hidden_size <= teacher.hidden_size
        assert a.intermediate_size <= teacher.intermediate_size
        assert a.num_heads * a.head_dim == a.hidden_size and a.head_dim == teacher.head_dim
        assert a.num_heads % a.num_kv_heads == 0
        assert (a.model_type, a.vocab_size) == (teacher.model_type, teacher.vocab_size)
        if name != "tiny":  # the presets' widths allow whole kv groups
            assert a.num_heads // a.num_kv_heads == group, a.shape()


def test_derivation_restricts_the_candidates():
    teacher = load_arch("llama2-7b")
    target = PUBLISHED_LAW.optimal_student(teacher.total_params()).params
    every = student_candidates(teacher, target)
    restricted = {d: student_candidates(teacher, target, d) for d in DERIVATIONS}
    for derivation, rows in restricted.items():
        assert rows and {c.derivation for c in rows} == {derivation}
    assert sorted(every, key=lambda c: c.arch.name) == sorted(
        [c for rows in restricted.values() for c in rows], key=lambda c: c.arch.name
    )
    assert (3072, 24) in {(c.arch.hidden_size, c.arch.num_layers) for c in restricted["uniform"]}
    with pytest.raises(ArchError, match=r"derivation 'pruned' is not one of \['uniform', 'depth-only', 'width-only'\]"):
        student_candidates(teacher, target, "pruned")  # type: ignore[arg-type]


def test_written_student_config_loads_with_its_sizes(tmp_path):
    teacher = load_arch("qwen2.5-7b")
    student = student_candidates(teacher, 3e9, "uniform")[0].arch
    student.to_hf_config().save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "qwen2"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        student.num_layers,
        student.hidden_size,
        student.num_heads,
        student.num_kv_heads,
    )
    assert config.rope_parameters["rope_theta"] == 1e6  # inherited from the teacher
    assert hf_counts(config)[0] == student.total_params()
