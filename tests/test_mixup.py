"""MixKD (minima.mixup): the draws, the weighted targets, and the step against a full-logits reference."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from minima.config import KDConfig, MixupConfig
from minima.data import Batch
from minima.dist import World
from minima.distill import train_step
from minima.losses import Targets, kd_loss_from_hidden, kd_loss_from_logits, row_tokens
from minima.mixup import Mix, draw_mixes, mixed_targets
from minima.models import HiddenStates
from minima.shards import IGNORE_INDEX

VOCAB, SEQ = 40, 10
WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def batch(rows: int = 4, seed: int = 0, packed: bool = False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, 6:] = IGNORE_INDEX  # uneven valid tokens, and masked positions inside a row
    labels[1, :3] = IGNORE_INDEX
    positions = None
    if packed:  # two packed sequences per row, restarting at different places
        positions = torch.stack([torch.cat([torch.arange(3 + r), torch.arange(SEQ - 3 - r)]) for r in range(rows)])
    return Batch(input_ids=ids[:, :-1], labels=labels, position_ids=positions)


def test_draws_are_cyclic_derangements_reproducible_by_key():
    cfg = MixupConfig(enabled=True, prob=1.0, alpha=0.4)
    mbs = [batch(rows=5, seed=i) for i in range(3)]
    first, again = draw_mixes(mbs, cfg, key=(1, 7, 0)), draw_mixes(mbs, cfg, key=(1, 7, 0))
    other = draw_mixes(mbs, cfg, key=(1, 8, 0))
    for mb, mb2 in zip(first, again, strict=True):
        assert torch.equal(mb.mix.partner, mb2.mix.partner) and mb.mix.lam == mb2.mix.lam
        partner = mb.mix.partner
        assert sorted(partner.tolist()) == list(range(5))  # a permutation: every row mixed once as the second
        assert all(partner[i] != i for i in range(5))  # never with itself
        row, seen = 0, set()  # one cycle through every row
        while row not in seen:
            seen.add(row)
            row = int(partner[row])
        assert len(seen) == 5
        assert 0.0 < mb.mix.lam < 1.0
    assert [m.mix.lam for m in first] != [m.mix.lam for m in other]
    assert draw_mixes(mbs, MixupConfig(enabled=False), key=(1, 7, 0)) is mbs
    assert all(m.mix is None for m in draw_mixes(mbs, MixupConfig(enabled=True, prob=0.0), key=(1, 7, 0)))
    half = [
        m.mix is not None
        for k in range(200)
        for m in draw_mixes(mbs[:1], MixupConfig(enabled=True, prob=0.5), (0, k, 0))
    ]
    assert 0.35 < sum(half) / len(half) < 0.65


def test_mixed_targets_count_each_mixed_token_with_its_weight():
    mb = batch()
    mix = Mix(partner=torch.tensor([1, 2, 3, 0]), lam=0.3)
    targets = mixed_targets(mb.labels, mix, weight=0.5)
    n = (mb.labels != IGNORE_INDEX).sum(1).double()
    expected = torch.cat([n, 0.5 * (0.3 * n + 0.7 * n[mix.partner])])
    assert torch.allclose(row_tokens(targets), expected)
    assert float(row_tokens(targets).sum()) == pytest.approx(1.5 * float(n.sum()))  # pairs: a permutation
    assert mixed_targets(mb.labels, None, 0.5) is mb.labels


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_weighted_targets_equal_full_logits_reference(divergence):
    """Two label sets with row weights through the chunked loss (closed form and autograd paths): values and
    gradients equal the weighted sum of full-logits losses, masked positions excluded."""
    torch.manual_seed(0)
    rows, hid, vocab = 6, 8, 24
    h = torch.randn(rows, SEQ, hid, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hid, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(rows, SEQ, 5, dtype=torch.float64), torch.randn(vocab + 4, 5, dtype=torch.float64)
    a, b = torch.randint(0, vocab, (rows, SEQ)), torch.randint(0, vocab, (rows, SEQ))
    a[0, 4:], b[2, :7], b[:2] = IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX
    wa, wb = torch.tensor([1, 1, 0.2, 0.2, 0.2, 0.0]), torch.tensor([0, 0, 0.8, 0.8, 0.8, 0.8])
    kw = {"ce_weight": 0.3, "kd_weight": 0.7, "divergence": divergence, "temperature": 2.0, "vocab_size": vocab}
    out = kd_loss_from_hidden(h, w, Targets(((a, wa), (b, wb))), th, tw, chunk_tokens=7, **kw)
    out.loss_sum.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = 0.0
    for labels, weights in ((a, wa), (b, wb)):
        for r in range(rows):
            one = kd_loss_from_logits(h[r] @ w.t(), th[r] @ tw.t(), labels[r], **kw)
            ref = ref + float(weights[r]) * one.loss_sum
    ref.backward()
    assert float(out.loss_sum.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    assert torch.allclose(grads[0], h.grad, atol=1e-10) and torch.allclose(grads[1], w.grad, atol=1e-10)
    assert float(out.num_tokens) == pytest.approx(float(row_tokens(Targets(((a, wa), (b, wb)))).sum()))


class Engine(torch.nn.Module):
    """What train_step needs of a DeepSpeed engine, for one process without ZeRO: forward, backward, step."""

    def __init__(self, lm, frozen: bool = False):
        super().__init__()
        self.module = HiddenStates(lm)
        if frozen:
            self.module.eval().requires_grad_(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        pass


def tiny(hidden: int, vocab: int, seed: int, tie: bool = False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(cfg).double()


def step_grads(student, teacher, mbs, kd) -> dict[str, torch.Tensor]:
    student.module.lm.zero_grad()
    train_step(student, teacher, mbs, kd, vocab_size=VOCAB, world=WORLD, compiled=False)
    return {n: p.grad.clone() for n, p in student.module.lm.named_parameters()}


KD = KDConfig(ce_weight=0.3, kd_weight=0.7, temperature=2.0, chunk_tokens=7)


@pytest.mark.parametrize(("tie", "weight", "rtol"), [(False, 1.0, 1e-12), (True, 1.0, 1e-12), (False, 0.7, 1e-6)])
def test_lambda_one_gives_exactly_the_plain_step(tie, weight, rtol):
    """lam = 1: the mixed rows are the originals, and the step is the plain one. At weight 1 the mixed rows' gradients
    are the originals' exactly, so the step agrees to fp64 rounding; at another weight only to fp32 rounding, which
    LLaMA's RMSNorm computes in even for an fp64 model."""
    student, teacher = Engine(tiny(16, VOCAB, 1, tie)), Engine(tiny(24, VOCAB + 8, 2), frozen=True)
    mbs = [batch(seed=0), batch(seed=1)]
    kd = dataclasses.replace(KD, mixup=MixupConfig(enabled=True, weight=weight))
    plain = step_grads(student, teacher, mbs, kd)
    ones = [dataclasses.replace(mb, mix=Mix(torch.tensor([1, 2, 3, 0]), 1.0)) for mb in mbs]
    mixed = step_grads(student, teacher, ones, kd)
    for name, g in plain.items():
        assert torch.allclose(mixed[name], g, rtol=rtol, atol=rtol * float(g.abs().max())), name


@pytest.mark.parametrize("packed", [False, True])
def test_mixed_step_equals_full_logits_reference(packed):
    """One mixed and one plain micro-batch: the step's gradients equal a plain-PyTorch reference built from full
    logits: originals' CE + KD, plus weight * (lam * terms against x_b's labels + (1 - lam) * against its partner's)
    on the mixed embeddings of each model, divided once by the weighted valid tokens."""
    student, teacher = Engine(tiny(16, VOCAB, 1)), Engine(tiny(24, VOCAB + 8, 2), frozen=True)
    weight, lam = 0.6, 0.35
    mix = Mix(torch.tensor([2, 0, 3, 1]), lam)
    mbs = [dataclasses.replace(batch(seed=0, packed=packed), mix=mix), batch(seed=1, packed=packed)]
    kd = dataclasses.replace(KD, mixup=MixupConfig(enabled=True, weight=weight))
    got = step_grads(student, teacher, mbs, kd)

    student.module.lm.zero_grad()
    kw = {**kd.loss_kwargs(), "vocab_size": VOCAB}
    total, count = 0.0, 0.0
    for mb in mbs:
        pos = mb.position_ids  # no cache: transformers then keeps attention within each packed sequence
        s_lm, t_lm = (
            functools.partial(student.module.lm, use_cache=False),
            functools.partial(teacher.module.lm, use_cache=False),
        )
        plain = kd_loss_from_logits(
            s_lm(input_ids=mb.input_ids, position_ids=pos).logits,
            t_lm(input_ids=mb.input_ids, position_ids=pos).logits.detach(),
            mb.labels,
            **kw,
        )
        total, count = total + plain.loss_sum, count + float(plain.num_tokens)
        if mb.mix is None:
            continue
        p = mb.mix.partner
        s_emb = student.module.lm.get_input_embeddings()(mb.input_ids)
        t_emb = teacher.module.lm.get_input_embeddings()(mb.input_ids)
        mixed_pos = None if pos is None else pos[p]  # lam < 0.5: the partner's positions
        s_logits = s_lm(inputs_embeds=lam * s_emb + (1 - lam) * s_emb[p], position_ids=mixed_pos).logits
        t_logits = t_lm(inputs_embeds=lam * t_emb + (1 - lam) * t_emb[p], position_ids=mixed_pos).logits.detach()
        for labels, share in ((mb.labels, lam), (mb.labels[p], 1 - lam)):
            terms = kd_loss_from_logits(s_logits, t_logits, labels, **kw)
            total = total + weight * share * terms.loss_sum
            count += weight * share * float(terms.num_tokens)
    (total / count).backward()
    for name, param in student.module.lm.named_parameters():
        assert torch.allclose(got[name], param.grad, rtol=1e-6, atol=1e-6 * float(param.grad.abs().max())), name


def test_mixed_step_of_an_moe_student_weighs_each_row_balancing_loss_by_its_tokens():
    """An MoE student's per-sequence balancing loss covers the 2B rows of a mixed micro-batch, each weighted by its
    weighted valid tokens, like the other sums."""
    from minima.moe import balance_loss
    from tests.test_distill import tiny_moe_student

    torch.manual_seed(0)
    student = Engine(tiny_moe_student(vocab=VOCAB))  # fp32: the grouped expert matmul has no fp64 kernel
    mb = dataclasses.replace(batch(seed=0), mix=Mix(torch.tensor([1, 2, 3, 0]), 0.3))
    kd = dataclasses.replace(KD, balance_weight=0.5, mixup=MixupConfig(enabled=True, weight=0.6))
    sums = train_step(student, None, [mb], kd, vocab_size=VOCAB, world=WORLD, compiled=False)
    with torch.no_grad():
        lm = student.module.lm
        embeds = lm.get_input_embeddings()(mb.input_ids)
        mixed = torch.cat([embeds, 0.3 * embeds + 0.7 * embeds[mb.mix.partner]])
        router = lm.model(inputs_embeds=mixed, output_router_logits=True, use_cache=False).router_logits
        per_row = balance_loss(router, mixed.shape[0], 1)
    weights = row_tokens(mixed_targets(mb.labels, mb.mix, 0.6))
    assert float(sums[5]) == pytest.approx(float((per_row.double() * weights).sum()), rel=1e-5)
    assert float(sums[4]) == pytest.approx(1.6 * float((mb.labels != IGNORE_INDEX).sum()))
