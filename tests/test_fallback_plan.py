"""The whole-model fallback: one vmap pass for every parameter (or the split, if faster), the loop's warning."""

from __future__ import annotations

import warnings

import torch
from fastpath_compare import compare
from torch import nn

from gsnr_diag import gradient_stats
from gsnr_diag.capture.plan import PassPlan
from gsnr_diag.errors import SlowPathWarning

N, D, C = 12, 5, 3


class MatmulParam(nn.Module):
    """A bare parameter used in a matrix product (no rule can take it) next to ordinary layers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.w = nn.Parameter(torch.randn(D, D) * 0.5)
        self.out = nn.Linear(D, C)

    def forward(self, x):
        return self.out(torch.tanh(torch.tanh(self.inp(x)) @ self.w))


def test_plan_times_one_pass_first_then_the_split_then_keeps_the_faster():
    plan = PassPlan()
    assert plan.one_pass()
    plan.seconds[True] = 2.0
    assert not plan.one_pass()
    plan.seconds[False] = 1.0
    assert not plan.one_pass()
    plan.seconds[True] = 0.5
    assert plan.one_pass()


def test_one_vmap_pass_for_every_parameter_then_split_chunks_stay_exact():
    torch.manual_seed(0)
    model = MatmulParam().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    got = compare(model, x, y, nn.CrossEntropyLoss(), fast=False, batch_size=4)  # 3 chunks: both plans run
    assert got.capture_paths[""] == "functorch"
    one = gradient_stats(model, (x, y), nn.CrossEntropyLoss(), batch_size=N)  # one chunk: the one-pass plan
    assert set(one.capture_paths.values()) == {"functorch"}


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(D, 4, batch_first=True)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_loop_only_where_vmap_cannot_run_and_the_warning_names_the_op():
    torch.manual_seed(0)
    model = Recurrent().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (8,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = compare(model, x, y, nn.CrossEntropyLoss(), fast=False, batch_size=4)
    slow = [w for w in caught if issubclass(w.category, SlowPathWarning)]
    assert len(slow) == 1, [str(w.message) for w in caught]
    assert "lstm" in str(slow[0].message)
    assert s.capture_paths["rnn"] == "loop" and s.capture_paths["head"] == "moment-rule"
