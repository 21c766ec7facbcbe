"""Custom modules that call ``F.linear`` on their own parameters take the nn.Linear moment rule.

The broadcast tracker (a TorchFunctionMode) sees the call, keeps its input and the backprop of its
output; anything it cannot vouch for (two calls, another use, an input that mixes samples) goes to the
whole-model fallback. Every case is compared with the float64 per-sample loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastpath_compare import compare
from torch import nn


class MyLinear(nn.Module):
    def __init__(self, i, o, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o) * 0.1) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Net(nn.Module):
    """Two 2-D calls (with and without bias) and one over a sequence."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.seq = MyLinear(5, 7), MyLinear(7, 3, bias=False), MyLinear(5, 3)

    def forward(self, x):
        steps = x.unsqueeze(1) * torch.arange(1.0, 4.0, dtype=x.dtype).view(1, 3, 1)
        return self.b(self.a(x).tanh()) + self.seq(steps).mean(1)


class Twice(MyLinear):
    def forward(self, x):
        return F.linear(F.linear(x, self.weight, self.bias).tanh(), self.weight)


class AlsoAdded(MyLinear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.bias


class Mixing(MyLinear):
    def forward(self, x):
        return F.linear(x - x.mean(0, keepdim=True), self.weight, self.bias)


def _data(n=23, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_f_linear_calls_take_the_linear_rule_exactly():
    torch.manual_seed(0)
    x, y = _data()
    got = compare(Net().double(), x, y, nn.CrossEntropyLoss(), batch_size=6)
    assert got.capture_paths == {"a": "moment-rule", "b": "moment-rule", "seq": "moment-rule"}


def test_float32_f_linear_is_close_to_the_float64_loop():
    torch.manual_seed(0)
    x, y = _data()
    compare(Net(), x.float(), y, nn.CrossEntropyLoss(), batch_size=8, rtol=2e-4)


def test_what_it_cannot_vouch_for_goes_to_the_fallback_and_stays_exact():
    for cls in (Twice, AlsoAdded):
        torch.manual_seed(0)
        x, y = _data(d=3)
        got = compare(cls(3, 3).double(), x, y, nn.CrossEntropyLoss(), batch_size=6, fast=False)
        assert got.capture_paths[""] in ("functorch", "loop"), (cls.__name__, got.capture_paths)


def test_an_input_that_mixes_samples_is_refused():
    import pytest

    from gsnr_diag import gradient_stats
    from gsnr_diag.errors import ModelError

    torch.manual_seed(0)
    x, y = _data(d=3)
    with pytest.raises(ModelError, match="mixes samples"):
        gradient_stats(Mixing(3, 3).double(), (x, y), nn.CrossEntropyLoss(), batch_size=6)
