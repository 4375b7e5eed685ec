"""The loss against a naive per-token reference; zero for identical models; masking; padded vocabularies; sums."""

import pytest
import torch

from minima.data import IGNORE_INDEX
from minima.losses import distill_loss_sums


def naive(student, labels, teacher, ce_w, kd_w, T, v):
    """Per-token loop in float64: ce_w * CE + kd_w * T^2 * KL(p_t^T || p_s^T) over the first v logits."""
    total, ce_total, kd_total, n = 0.0, 0.0, 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            s = student[b, t].double()
            ce = -(s[y] - torch.logsumexp(s, 0))
            ps = torch.softmax(s[:v] / T, 0)
            pt = torch.softmax(teacher[b, t, :v].double() / T, 0)
            kd = T**2 * (pt * (pt.log() - ps.log())).sum()
            total += ce_w * ce + kd_w * kd
            ce_total += ce
            kd_total += kd
            n += 1
    return total, ce_total, kd_total, n


def make(B=2, T=5, Vs=11, Vt=11, seed=0, masked=((0, 1), (1, 4))):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, Vs, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, Vt, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, min(Vs, Vt), (B, T), generator=g)
    for b, t in masked:
        labels[b, t] = IGNORE_INDEX
    return student, labels, teacher


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.0), (0.2, 1.0)])
def test_matches_naive_reference(T, weights):
    student, labels, teacher = make()
    ce_w, kd_w = weights
    out = distill_loss_sums(student, labels, teacher, ce_weight=ce_w, kd_weight=kd_w, temperature=T)
    ref, ref_ce, ref_kd, n = naive(student, labels, teacher, ce_w, kd_w, T, 11)
    assert int(out.num_tokens) == n == 8
    torch.testing.assert_close(out.loss_sum.double(), torch.as_tensor(ref).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce_sum.double(), torch.as_tensor(ref_ce).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd_sum.double(), torch.as_tensor(ref_kd).double(), rtol=1e-5, atol=1e-5)


def test_gradient_matches_naive_reference():
    student, labels, teacher = make()
    s1 = student.clone().requires_grad_(True)
    distill_loss_sums(s1, labels, teacher, temperature=2.0).loss_sum.backward()
    s2 = student.clone().requires_grad_(True)
    ref, *_ = naive(s2, labels, teacher, 0.5, 0.5, 2.0, 11)
    ref.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_identical_distributions_give_zero_kd_and_full_agreement():
    student, labels, _ = make()
    out = distill_loss_sums(student, labels, student.clone(), temperature=1.7)
    assert abs(out.kd_sum.item()) < 1e-6
    assert int(out.top1_agree) == int(out.num_tokens)


def test_masked_positions_contribute_nothing():
    student, labels, teacher = make()
    out = distill_loss_sums(student, labels, teacher)
    s2, t2 = student.clone(), teacher.clone()
    s2[0, 1] += 100.0 * torch.randn(11, dtype=torch.float64)  # both masked positions changed wildly
    t2[1, 4] -= 50.0
    out2 = distill_loss_sums(s2, labels, t2)
    assert out.loss_sum.item() == pytest.approx(out2.loss_sum.item(), abs=1e-9)
    s3 = student.clone().requires_grad_(True)
    distill_loss_sums(s3, labels, teacher).loss_sum.backward()
    assert s3.grad[0, 1].abs().max() == 0 and s3.grad[1, 4].abs().max() == 0


def test_sums_add_over_micro_batches():
    """Sums, not means: two halves add up to the whole batch, whatever their padding."""
    student, labels, teacher = make(B=4, masked=((0, 0), (0, 1), (0, 2), (3, 3)))
    whole = distill_loss_sums(student, labels, teacher)
    a = distill_loss_sums(student[:1], labels[:1], teacher[:1])
    b = distill_loss_sums(student[1:], labels[1:], teacher[1:])
    assert whole.loss_sum.item() == pytest.approx(a.loss_sum.item() + b.loss_sum.item(), rel=1e-6)
    assert int(whole.num_tokens) == int(a.num_tokens) + int(b.num_tokens) == 16


def test_padded_teacher_vocab_never_leaks_into_the_target():
    """Teacher head 16 wide, tokenizer 11: the 5 padding logits (even huge ones) must not change the KD term."""
    student, labels, teacher = make(Vs=11, Vt=11)
    padded = torch.cat([teacher, torch.full((2, 5, 5), 30.0, dtype=torch.float64)], dim=-1)
    a = distill_loss_sums(student, labels, teacher, vocab_size=11)
    b = distill_loss_sums(student, labels, padded, vocab_size=11)
    assert a.loss_sum.item() == pytest.approx(b.loss_sum.item(), rel=1e-9)


def test_without_teacher_loss_is_cross_entropy():
    student, labels, _ = make()
    out = distill_loss_sums(student, labels, None, ce_weight=0.3, kd_weight=0.7)
    ref = torch.nn.functional.cross_entropy(student.view(-1, 11), labels.view(-1), reduction="sum")
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)
    assert out.kd_sum.item() == 0.0


def test_all_positions_masked_gives_zero_sums():
    student, labels, teacher = make()
    labels[:] = IGNORE_INDEX
    out = distill_loss_sums(student, labels, teacher)
    assert out.loss_sum.item() == 0.0 and int(out.num_tokens) == 0
