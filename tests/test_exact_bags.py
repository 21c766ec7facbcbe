"""nn.EmbeddingBag (every mode and input form), nn.Embedding(sparse=True) and two positional inputs,
each against the float64 batch-of-one loop (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_stats
from torch import nn

from gsnr_diag import gradient_stats

N, V, D, L, C = 24, 12, 4, 5, 3


def _close(got, ref, rtol):
    for key in ("mean", "var", "gsnr", "same_sign"):
        for k, want in ref[key].items():
            a = getattr(got, key)[k].numpy()
            assert np.array_equal(np.isnan(a), np.isnan(want)), f"{key} {k}: undefined elements differ"
            if np.all(np.isnan(want)):
                continue
            scale = np.nanmax(np.abs(want))
            err = np.nanmax(np.abs(a - want))
            assert err <= rtol * scale, f"{key} {k}: {err:.2e} > {rtol} x {scale:.2e}"
    assert got.undefined == ref["undefined"]


def _check(model, x, y, dtype, path="moment-rule"):
    model = model.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = reference_stats(model, x, y, nn.CrossEntropyLoss())
    xs = tuple(t.to(dtype) if t.is_floating_point() else t for t in x) if isinstance(x, tuple) else x
    got = gradient_stats(model, (xs, y), batch_size=10)
    _close(got, ref, 1e-5 if dtype == torch.float64 else 2e-4)
    assert path is None or got.capture_paths["e"] == path, got.capture_paths
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    return got


class Bag2d(nn.Module):
    """EmbeddingBag on a 2-D [B, L] input (bags of equal length)."""

    def __init__(self, **kw):
        super().__init__()
        self.e = nn.EmbeddingBag(V, D, **kw)
        self.o = nn.Linear(D, C)

    def forward(self, x, w=None):
        return self.o(torch.tanh(self.e(x, per_sample_weights=w)))


class BagOffsets(nn.Module):
    """Variable-length bags from a padded [B, L] input (−1 = none) as 1-D indices + offsets."""

    def __init__(self, keyword=False, last=False, **kw):
        super().__init__()
        self.e = nn.EmbeddingBag(V, D, include_last_offset=last, **kw)
        self.o = nn.Linear(D, C)
        self.keyword = keyword

    def forward(self, x, w=None):
        keep = x >= 0
        flat = x[keep]
        lengths = keep.sum(1)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        offsets = offsets if self.e.include_last_offset else offsets[:-1]
        psw = None if w is None else w[keep]
        h = self.e(flat, offsets=offsets, per_sample_weights=psw) if self.keyword else self.e(flat, offsets, psw)
        return self.o(torch.tanh(h))


def _data(seed=0, ragged=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (N, L), generator=g)
    x[0, 1] = x[0, 3]  # a repeated index within a bag
    if ragged:
        lengths = torch.randint(0, L + 1, (N,), generator=g)
        lengths[1] = 0  # an empty bag
        x[torch.arange(L).unsqueeze(0) >= lengths.unsqueeze(1)] = -1
    return x, torch.randint(0, C, (N,), generator=g), torch.rand(N, L, generator=g) + 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding", [None, 2])
def test_embedding_bag_2d_input(mode, padding, dtype):
    torch.manual_seed(0)
    x, y, _ = _data()
    _check(Bag2d(mode=mode, padding_idx=padding), x, y, dtype)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("keyword", [False, True])
@pytest.mark.parametrize("last", [False, True])
def test_embedding_bag_offsets(mode, keyword, last):
    torch.manual_seed(1)
    x, y, _ = _data(1, ragged=True)
    _check(BagOffsets(keyword, last, mode=mode), x, y, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("model", ["2d", "offsets"])
def test_embedding_bag_per_sample_weights(model, dtype):
    """per_sample_weights (mode='sum') as a second positional input: data ((X, weights), Y)."""
    torch.manual_seed(2)
    x, y, w = _data(2, ragged=model == "offsets")
    net = Bag2d(mode="sum") if model == "2d" else BagOffsets(True, mode="sum")
    _check(net, (x, w), y, dtype)


class SparseEmb(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(V, D, sparse=True, padding_idx=0)
        self.o = nn.Linear(D, C)

    def forward(self, x):
        return self.o(torch.tanh(self.e(x).mean(1)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_embedding(dtype):
    torch.manual_seed(3)
    x, y, _ = _data(3)
    _check(SparseEmb(), x, y, dtype)


def test_sparse_embedding_on_the_fallback():
    """The weight used again outside its module: the fallback, with sparse gradients densified."""

    class Reused(SparseEmb):
        def forward(self, x):
            return self.o(torch.tanh(self.e(x).mean(1) + self.e.weight[1]))

    torch.manual_seed(4)
    x, y, _ = _data(4)
    got = _check(Reused(), x, y, torch.float64, path=None)
    assert got.capture_paths["e"] in ("functorch", "loop")


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(3, 6), nn.Linear(2, 6), nn.Linear(6, C)

    def forward(self, x1, x2):
        return self.o(torch.tanh(self.a(x1) * self.b(x2)))


@pytest.mark.parametrize("batch_size", [None, 7])
def test_two_positional_inputs(batch_size):
    """Data ((X1, X2), Y): a tuple of input tensors is passed as positional arguments."""
    torch.manual_seed(5)
    model = TwoInputs().double()
    x1, x2, y = torch.randn(N, 3).double(), torch.randn(N, 2).double(), torch.randint(0, C, (N,))
    ref = reference_stats(model, (x1, x2), y, nn.CrossEntropyLoss())
    for data in [((x1, x2), y), ([x1, x2], y)]:
        got = gradient_stats(model, data, batch_size=batch_size)
        assert got.n == N
        _close(got, ref, 1e-5)
