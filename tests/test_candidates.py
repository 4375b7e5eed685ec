"""MiniDisc's candidate teacher assistants (minima.candidates) on tiny teachers built from configs.

The masked teacher must be the model that slicing the candidate out gives: the test compares logits of the masked
full model with those of the sliced directory loaded by ``from_pretrained``, on teachers with random norm weights and
biases (so that the RMSNorm rescaling and the q/k/v biases are exercised) and a random importance ranking (so that
the kept units are scattered, not a prefix).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from minima.candidates import (
    DEFAULT_SPARSITIES,
    CandidateError,
    CandidateMasks,
    attach_candidates,
    candidate_plans,
    plan_shape,
    sandwich,
    score_candidates,
    score_sums,
    scores_from_sums,
    shape_at,
    slice_candidate,
    tradeoff_select,
)
from minima.data import Batch
from minima.importance import Importance, Shape
from minima.models import last_hidden
from minima.prune import student_config
from minima.shards import IGNORE_INDEX
from tests.test_prune import GQA, MHA, VOCAB, llama


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and two threads fighting other work for 2 cores run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QWEN2 = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 8}
QWEN2 |= {"num_key_value_heads": 4, "max_position_embeddings": 128, "tie_word_embeddings": False}
CONFIGS = {
    "mha": lambda: llama(**MHA, initializer_range=0.1),
    "gqa": lambda: llama(**GQA, initializer_range=0.1),  # tied embeddings
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, initializer_range=0.1, **QWEN2),  # q/k/v biases
}


def tiny_teacher(kind: str, seed: int = 0) -> torch.nn.Module:
    """A seeded fp32 teacher whose norm weights and biases are random too (transformers starts them at 1 and 0)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


def random_importance(shape: Shape, seed: int = 0) -> Importance:
    g = torch.Generator().manual_seed(seed)
    return Importance(
        heads=torch.rand(shape.layers, shape.heads, generator=g, dtype=torch.float64),
        neurons=torch.rand(shape.layers, shape.ffn, generator=g, dtype=torch.float64),
        hidden=torch.rand(shape.hidden, generator=g, dtype=torch.float64),
        cos_sum=torch.zeros(shape.layers, dtype=torch.float64),
        tokens=1,
    )


def candidates(model, sparsities) -> tuple[Shape, list, CandidateMasks]:
    shape = Shape.of(model.config)
    plans = candidate_plans(random_importance(shape), shape, sparsities)
    return shape, plans, CandidateMasks.from_plans(plans, shape, sparsities)


def token_ids(rows: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ----------------------------------------------------------------------------------------------------------------------
# Shapes.


LLAMA2_7B = Shape(layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008, head_dim=128)
LLAMA3_8B = Shape(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, head_dim=128)


@pytest.mark.parametrize(
    ("teacher", "sparsity", "expected"),
    [
        (Shape(4, 32, 4, 4, 64, 8), 0.0, Shape(4, 32, 4, 4, 64, 8)),
        (Shape(4, 32, 4, 4, 64, 8), 0.75, Shape(4, 16, 2, 2, 32, 8)),  # k = 1/2 on every width axis
        (Shape(4, 64, 8, 2, 64, 8), 0.75, Shape(4, 32, 4, 1, 32, 8)),  # whole groups of 4 query heads
        (Shape(3, 64, 8, 4, 64, 8), 0.5, Shape(3, 48, 6, 3, 45, 8)),  # 45.25 -> 45 -> halfway 42/48 -> 48
        (Shape(2, 40, 10, 5, 64, 4), 0.75, Shape(2, 18, 6, 3, 32, 4)),  # 2.5 kv heads -> 3 (halves up); 20 -> 18
        (Shape(2, 60, 8, 4, 64, 8), 0.75, Shape(2, 30, 4, 2, 32, 8)),  # teacher hidden % heads != 0: not moved
        (LLAMA2_7B, 0.5, Shape(32, 2898, 23, 23, 7784, 128)),  # 2896 moved to 23 * 126
        (LLAMA3_8B, 0.5, Shape(32, 2904, 24, 6, 10137, 128)),  # 5.66 -> 6 kv heads; 2896 moved to 24 * 121
        (LLAMA2_7B, 0.95, Shape(32, 917, 7, 7, 2461, 128)),
    ],
)
def test_shape_at_by_hand(teacher, sparsity, expected):
    assert shape_at(teacher, sparsity) == expected


@pytest.mark.parametrize(
    "teacher",
    [LLAMA2_7B, LLAMA3_8B, Shape.of(CONFIGS["gqa"]()), Shape.of(CONFIGS["qwen2"]())],
    ids=["llama2_7b", "llama3_8b", "tiny_gqa", "tiny_qwen2"],
)
def test_shape_at_keeps_sqrt_of_every_axis_and_transformers_accepts_it(teacher):
    config = LlamaConfig(
        hidden_size=teacher.hidden,
        num_attention_heads=teacher.heads,
        num_key_value_heads=teacher.kv_heads,
        intermediate_size=teacher.ffn,
        num_hidden_layers=teacher.layers,
        head_dim=teacher.head_dim,
    )
    group = teacher.heads // teacher.kv_heads
    for sparsity in (*DEFAULT_SPARSITIES, 0.1, 0.33, 0.99):
        k = math.sqrt(1 - sparsity)
        shape = shape_at(teacher, sparsity)
        assert shape.layers == teacher.layers and shape.head_dim == teacher.head_dim
        assert abs(shape.kv_heads - k * teacher.kv_heads) <= 0.5 or shape.kv_heads == 1
        assert shape.heads == shape.kv_heads * group
        assert abs(shape.ffn - k * teacher.ffn) <= 0.5
        assert shape.hidden % shape.heads == 0 and 0 < shape.hidden <= teacher.hidden
        assert abs(shape.hidden - k * teacher.hidden) <= 0.5 + shape.heads / 2  # moved to a multiple of heads'
        student_config(config, shape, list(range(shape.layers)))  # transformers accepts every candidate
    assert shape_at(teacher, 0) == teacher


# ----------------------------------------------------------------------------------------------------------------------
# The masked forward.


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_sparsity_zero_is_the_teacher_bit_for_bit(kind):
    model = tiny_teacher(kind)
    ids = token_ids()
    plain = logits(model, ids)
    shape, plans, masks = candidates(model, [0.0, 0.5])
    assert plan_shape(plans[0], shape) == shape == shape_at(shape, 0.0)
    assert plans[0].hidden == list(range(shape.hidden)) and all(h == list(range(shape.heads)) for h in plans[0].heads)
    with masks.install(model):
        masks.select(0)
        assert torch.equal(logits(model, ids), plain)
        masks.select(None)  # the full model: the hooks change nothing
        assert torch.equal(logits(model, ids), plain)
        masks.select(1)
        assert not torch.allclose(logits(model, ids), plain, atol=1e-3)
    assert torch.equal(logits(model, ids), plain)  # removed


@pytest.mark.parametrize("sparsity", [0.5, 0.85])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_masked_candidate_is_the_sliced_model(kind, sparsity, tmp_path):
    model = tiny_teacher(kind)
    ids = token_ids()
    plain = logits(model, ids)
    shape, plans, masks = candidates(model, [sparsity, 0.95])
    with masks.install(model):
        masks.select(0)
        masked = logits(model, ids)
        teacher_dir = tmp_path / "teacher"
        model.save_pretrained(teacher_dir)
        got = slice_candidate(
            model, plans[0], model.config, teacher_dir, tmp_path / "assistant", {"sparsity": sparsity}
        )
    assert got == shape_at(shape, sparsity)
    sliced = AutoModelForCausalLM.from_pretrained(tmp_path / "assistant").eval()
    cfg = sliced.config
    sizes = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert (*sizes, cfg.intermediate_size) == (got.layers, got.hidden, got.heads, got.kv_heads, got.ffn)
    assert sliced.dtype == torch.float32
    record = json.loads((tmp_path / "assistant" / "assistant.json").read_text())
    assert record["sparsity"] == sparsity and record["kept"]["hidden"] == plans[0].hidden
    assert plans[0].hidden != list(range(got.hidden))  # scattered units, not a prefix
    torch.testing.assert_close(masked, logits(sliced, ids), rtol=1e-5, atol=1e-5)
    assert (masked - plain).abs().max() > 1e-2  # the candidate is not the teacher


@pytest.mark.parametrize("kind", ["gqa", "qwen2"])
def test_masked_hidden_dims_of_the_residual_stream_stay_zero(kind):
    model = tiny_teacher(kind)
    _, _, masks = candidates(model, [0.6, 0.9])
    decoder = model.get_decoder()
    seen: list[torch.Tensor] = []
    with masks.install(model):  # registered after the masks' hooks: sees what they return
        modules = [decoder.embed_tokens, *decoder.layers, decoder.norm]
        modules += [m for layer in decoder.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        capture = [m.register_forward_hook(lambda m, a, out: seen.append(out.detach())) for m in modules]
        for c in range(len(masks)):
            masks.select(c)
            seen.clear()
            with torch.no_grad():
                last = last_hidden(model, token_ids())
            off = masks.hidden[c] == 0
            assert len(seen) == len(modules)
            for out in [*seen, last]:
                assert (out[..., off] == 0).all()
                assert (out[..., ~off] != 0).any()
        for handle in capture:
            handle.remove()


def test_selection_stays_until_the_next_select():
    model = tiny_teacher("mha")
    ids = token_ids()
    _, _, masks = candidates(model, [0.5, 0.75])
    with masks.install(model):
        masks.select(1)
        first = logits(model, ids)
        assert masks.active == 1 and torch.equal(logits(model, ids), first)
        masks.select(0)
        assert not torch.equal(logits(model, ids), first)


# ----------------------------------------------------------------------------------------------------------------------
# Scores.


def dev_batches() -> list[Batch]:
    """Two batches with a third of the labels ignored, and an all-ignored row."""
    batches = []
    for seed in (1, 2):
        ids = token_ids(3, 16, seed)
        labels = token_ids(3, 16, seed + 10)
        labels[torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed)) < 0.33] = IGNORE_INDEX
        labels[2] = IGNORE_INDEX
        batches.append(Batch(ids, labels))
    return batches


def test_score_candidates_against_full_logits():
    model = tiny_teacher("gqa")
    _, _, masks = candidates(model, [0.5, 0.85])
    # The model's own prediction as labels where not ignored would give accuracy 1; random labels give ~0. Mix them.
    batches = dev_batches()
    with masks.install(model):
        masks.select(0)
        first = batches[0]
        predicted = logits(model, first.input_ids).argmax(-1)
        first.labels[:, ::2] = torch.where(first.labels[:, ::2] == IGNORE_INDEX, IGNORE_INDEX, predicted[:, ::2])
        masks.select(1)
        rows = score_candidates(model, masks, batches, torch.device("cpu"), chunk_tokens=5)
        assert masks.active == 1  # restored
        for c, row in enumerate(rows):
            masks.select(c)
            full = torch.cat([logits(model, b.input_ids) for b in batches])  # (B, T, V), fine at this size
            labels = torch.cat([b.labels for b in batches])
            valid = labels != IGNORE_INDEX
            correct = int((full.argmax(-1) == labels)[valid].sum())
            assert row["sparsity"] == masks.sparsities[c]
            assert (row["correct"], row["tokens"]) == (correct, int(valid.sum()))
            assert row["accuracy"] == correct / int(valid.sum())
            ce = F.cross_entropy(full.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            assert row["ce"] == pytest.approx(float(ce), rel=1e-5)
        assert 0 < rows[0]["accuracy"] < 1
        # Two "ranks" with one batch each: their summed raw values give the single process's scores.
        halves = [score_sums(score_candidates(model, masks, [b], torch.device("cpu"))) for b in batches]
        merged = scores_from_sums(halves[0] + halves[1], masks.sparsities)
    for one, two in zip(rows, merged, strict=True):
        assert (one["correct"], one["tokens"]) == (two["correct"], two["tokens"])
        assert one["ce"] == pytest.approx(two["ce"], rel=1e-6)
    assert math.isnan(scores_from_sums(torch.zeros(1, 3), [0.5])[0]["accuracy"])  # nothing scored


# ----------------------------------------------------------------------------------------------------------------------
# The tradeoff.


SCORES = {0.5: 0.60, 0.6: 0.58, 0.7: 0.53, 0.8: 0.45, 0.85: 0.41, 0.9: 0.36}


def test_tradeoff_select_by_hand():
    # lam 0.35: values 0.775, 0.79, 0.775, 0.73, 0.7075, 0.675 -> 0.6 (0.6 + 0.35 * 0.6 = 0.79)
    chosen, rows = tradeoff_select(SCORES, 0.35)
    assert chosen == 0.6
    assert [r["value"] for r in rows] == pytest.approx([0.775, 0.79, 0.775, 0.73, 0.7075, 0.675])
    assert [r["scale"] for r in rows] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.15, 0.1])
    assert [r["chosen"] for r in rows] == [False, True, False, False, False, False]
    # lam 0: the best score; lam 2: the sparsest (0.36 + 1.8 = 2.16 beats 0.41 + 1.7 = 2.11)
    assert tradeoff_select(SCORES, 0.0)[0] == 0.5
    assert tradeoff_select(SCORES, 2.0)[0] == 0.9
    # The current teacher is at 0.7: 0.5 and 0.6 are not eligible; 0.775 (0.7) vs 0.73, 0.7075, 0.675 -> 0.7
    chosen, rows = tradeoff_select(SCORES, 0.35, min_sparsity=0.7)
    assert chosen == 0.7 and [r["eligible"] for r in rows] == [False, False, True, True, True, True]
    # The student is at 0.85 with lam 2: 0.9 is not eligible, 0.85 (no assistant) wins 2.11 over 0.45 + 1.6 = 2.05
    assert tradeoff_select(SCORES, 2.0, max_sparsity=0.85)[0] == 0.85
    # Ties go to the smaller sparsity, also when float sums differ in the last bit: with lam 0.35 and 0.6 removed,
    # 0.6 + 0.35 * 0.5 and 0.53 + 0.35 * 0.7 are both 0.775.
    tied = {s: v for s, v in SCORES.items() if s != 0.6}
    assert 0.6 + 0.35 * 0.5 != 0.53 + 0.35 * 0.7
    assert tradeoff_select(tied, 0.35)[0] == 0.5
    assert tradeoff_select({0.8: 0.5, 0.7: 0.5}, 0.0)[0] == 0.7
    # Rows from score_candidates (accuracy is the default score)
    rows = [{"sparsity": s, "accuracy": v, "ce": 1.0} for s, v in SCORES.items()]
    assert tradeoff_select(rows, 0.35)[0] == 0.6


# ----------------------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan"), True, "0.5"])
def test_bad_sparsity_is_a_clear_error(sparsity):
    with pytest.raises(CandidateError, match=r"sparsity .* is not a number in \[0, 1\)"):
        shape_at(LLAMA2_7B, sparsity)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(CandidateError, match=r"repeat a value"):
        candidate_plans(random_importance(LLAMA2_7B), LLAMA2_7B, [0.5, 0.6, 0.5])
    with pytest.raises(CandidateError, match=r"importance heads has shape \(4, 4\)"):
        candidate_plans(random_importance(Shape(4, 32, 4, 4, 64, 8)), LLAMA2_7B, [0.5])
    with pytest.raises(CandidateError, match=r"lam -0.1 must be a finite number >= 0"):
        tradeoff_select(SCORES, -0.1)
    with pytest.raises(CandidateError, match=r"score nan"):
        tradeoff_select({0.5: float("nan")}, 0.1)
    with pytest.raises(CandidateError, match=r"no candidate sparsity in \[0.95, None\]"):
        tradeoff_select(SCORES, 0.1, min_sparsity=0.95)
    with pytest.raises(CandidateError, match=r"max_sparsity 0.6 \(the student's\) is below min_sparsity 0.7"):
        tradeoff_select(SCORES, 0.1, min_sparsity=0.7, max_sparsity=0.6)
    with pytest.raises(CandidateError, match=r"need 'sparsity' and 'accuracy'"):
        tradeoff_select([{"sparsity": 0.5, "ce": 1.0}], 0.1)

    model = tiny_teacher("mha")
    _, plans, masks = candidates(model, [0.5])
    with pytest.raises(CandidateError, match=r"candidate index 1 is not None or an int in \[0, 1\)"):
        masks.select(1)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(CandidateError, match=r"LLaMA-family .* got 'gpt2'"):
        masks.install(gpt2)
    with pytest.raises(CandidateError, match=r"the model has .* \(4, 64, 64, 64\) but the candidate masks are for"):
        masks.install(tiny_teacher("gqa"))
    with masks.install(model), pytest.raises(CandidateError, match=r"installed already"):
        masks.install(model)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CandidateError, match=r"holds no assistant.json"):
        slice_candidate(model, plans[0], model.config, tmp_path, tmp_path / "out", {})
    assert (tmp_path / "out" / "keep.txt").is_file()


def test_training_through_the_masks_with_activation_checkpointing():
    """The candidate's loss gives masked units no gradient, and the same gradients when the layers are recomputed in
    backward (activation checkpointing), as long as the selection stays until backward; a select in between would
    change them (so the recomputation does read the selection)."""
    ids = token_ids()

    def gradients(checkpointing: bool, select_before_backward: int = 0) -> tuple[dict, CandidateMasks]:
        model = tiny_teacher("qwen2").train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        _, _, masks = candidates(model, [0.6, 0.9])
        with masks.install(model):
            masks.select(0)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            masks.select(select_before_backward)
            loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, masks

    plain, masks = gradients(False)
    recomputed, _ = gradients(True)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    off = masks.hidden[0] == 0
    assert (plain["model.embed_tokens.weight"][:, off] == 0).all()
    assert (plain["model.embed_tokens.weight"][:, ~off] != 0).any()
    dropped = masks.neurons[0, 0] == 0
    assert (plain["model.layers.0.mlp.up_proj.weight"][dropped] == 0).all()
    switched, _ = gradients(True, select_before_backward=1)
    assert not torch.allclose(switched["model.layers.0.mlp.up_proj.weight"], plain["model.layers.0.mlp.up_proj.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# The sandwich step through minima.distill.train_step.


def test_sandwich_step_gradient_is_the_mean_of_the_candidates_gradients():
    """One step over every candidate (each micro-batch once per candidate, one teacher forward) has the gradient
    of the mean of the candidates' separate steps; the masks make the candidates' gradients differ."""
    from minima.config import KDConfig
    from minima.dist import World
    from minima.distill import train_step
    from tests.test_mixup import Engine, batch

    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    kd = KDConfig(ce_weight=0.3, kd_weight=0.7, temperature=2.0, chunk_tokens=7)
    student = Engine(tiny_teacher("mha", seed=1).double())
    teacher = Engine(tiny_teacher("gqa", seed=2).double(), frozen=True)
    student.module.lm.train()
    _, _, masks = candidates(student.module.lm, (0.0, 0.5, 0.85))
    attach_candidates(student, masks)
    mbs = [batch(rows=3, seed=0), batch(rows=3, seed=1)]
    for mb in mbs:
        mb.input_ids.remainder_(VOCAB)
        mb.labels.masked_fill_(mb.labels >= VOCAB, IGNORE_INDEX)

    def grads(micro_batches):
        student.module.lm.zero_grad()
        train_step(student, teacher, micro_batches, kd, vocab_size=VOCAB, world=world, compiled=False)
        return {n: p.grad.clone() for n, p in student.module.lm.named_parameters()}

    together = grads(sandwich(mbs, masks))
    apart = [grads([dataclasses.replace(mb, candidate=c) for mb in mbs]) for c in range(len(masks))]
    for name, g in together.items():
        mean = sum(a[name] for a in apart) / len(apart)
        assert torch.allclose(g, mean, rtol=1e-6, atol=1e-6 * float(mean.abs().max())), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(apart[0][q], apart[2][q])  # the candidates really differ
