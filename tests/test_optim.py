"""Warmup + cosine schedule and AdamW parameter groups."""

import pytest
import torch

from minima.optim import lr_lambda, param_groups


def test_warmup_then_cosine_to_min_ratio():
    fn = lr_lambda(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)  # the first update already moves
    assert all(fn(s) < fn(s + 1) for s in range(9))
    assert fn(10) == pytest.approx(1.0)
    assert all(fn(s) >= fn(s + 1) for s in range(10, 120))
    assert fn(60) == pytest.approx(0.55)  # half-way through the cosine: midpoint of 1 and 0.1
    assert fn(110) == pytest.approx(0.1) and fn(500) == pytest.approx(0.1)


def test_no_warmup_starts_at_peak():
    fn = lr_lambda(warmup_steps=0, total_steps=5, min_lr_ratio=0.0)
    assert fn(0) == 1.0 and fn(5) == pytest.approx(0.0)


def test_param_groups_decay_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[2].weight.requires_grad_(False)
    decay, no_decay = param_groups(model.named_parameters(), weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].bias), id(model[2].bias)}  # frozen weight left out


def test_param_groups_read_the_full_shape_of_zero3_shards():
    p = torch.nn.Parameter(torch.empty(0))  # a ZeRO-3 parameter's local tensor is an empty/flat shard
    p.ds_shape = torch.Size([8, 8])
    decay, no_decay = param_groups([("w", p)], weight_decay=0.1)
    assert decay["params"] == [p] and no_decay["params"] == []
