"""Later chunks do not form the batch weight gradient of modules whose rule forms per-sample gradients itself.

The first chunk checks every module against the batch gradient; after it, a convolution or a Linear over a
sequence is measured from its output's gradient alone. The statistics stay those of the float64 loop.
"""

from __future__ import annotations

import gc
import weakref

import torch
from fastpath_compare import compare
from torch import nn

from gsnr_diag.capture import GradientCapture
from gsnr_diag.core.moments import Moments


class ConvSeq(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.tok = nn.Linear(4, 5)  # over a sequence: per-sample gradients formed by the rule
        self.head = nn.Linear(5, 3)  # 2-D: its rule takes the mean from the batch gradient

    def forward(self, x):
        h = self.tok(self.conv(x).relu().transpose(1, 2))
        return self.head(h.mean(1))


def _data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_exact_over_many_chunks_with_the_batch_weight_gradient_skipped():
    torch.manual_seed(0)
    model = ConvSeq().double()
    x, y = _data()
    compare(model, x, y, nn.CrossEntropyLoss(), batch_size=5)


def test_which_modules_skip_it_after_the_first_chunk():
    torch.manual_seed(0)
    model = ConvSeq().double()
    x, y = _data()
    moments = Moments()
    with torch.enable_grad(), GradientCapture(model, nn.CrossEntropyLoss()) as cap:
        cap.measure_chunk(x[:5], y[:5], moments)
        assert cap._skip_batch_grad == {"conv", "tok"}
        cap.measure_chunk(x[5:10], y[5:10], moments)
        assert cap._skip_batch_grad == {"conv", "tok"}
    assert model.conv.weight.grad is None


class _Watched(ConvSeq):
    """ConvSeq that keeps weak references to the activations of every forward pass."""

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def forward(self, x):
        h = self.conv(x)  # the output that the capture asks autograd about after the first chunk
        self.seen.append(weakref.ref(h))
        return self.head(self.tok(h.relu().transpose(1, 2)).mean(1))


def test_no_chunk_keeps_its_autograd_graph_alive():
    """Regression: output → backprop hook → call → output was a cycle the collector does not break, so every
    chunk after the first left its whole graph (each saved activation) alive: memory grew with the data."""
    torch.manual_seed(0)
    model = _Watched().double()
    x, y = _data(40)
    moments = Moments()
    with torch.enable_grad(), GradientCapture(model, nn.CrossEntropyLoss()) as cap:
        for s in range(0, 40, 5):
            cap.measure_chunk(x[s : s + 5], y[s : s + 5], moments)
            gc.collect()
            assert cap._skip_batch_grad and all(r() is None for r in model.seen), f"alive after chunk {s // 5}"
    from gsnr_diag import gradient_stats

    gradient_stats(model, (x, y), nn.CrossEntropyLoss(), batch_size=5)
    gc.collect()
    assert len(model.seen) > 10 and all(r() is None for r in model.seen)
