"""A forward that mixes samples (not BatchNorm) is refused: per-sample gradients (eq. 1) are undefined."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gsnr_diag import gradient_stats
from gsnr_diag.errors import ModelError


class MeanMixing(nn.Module):
    def __init__(self, bare: bool = False):
        super().__init__()
        self.bare = bare
        self.inner = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(6, 3) * 0.3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        h = h + h.mean(0)  # every sample's output depends on the whole batch
        return h @ self.w if self.bare else self.head(h)


class LateMixing(nn.Module):
    """Mixing after the last layer with parameters: no hooked module sees mixed inputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        out = self.lin(x)
        return out - out.logsumexp(0, keepdim=True)


def _data(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("model", [MeanMixing(), MeanMixing(bare=True), LateMixing()], ids=["hooked", "bare", "late"])
def test_forward_mixing_samples_is_refused(model):
    with pytest.raises(ModelError, match=r"mixes samples: replacing sample 0 .* changed the output tensor\(12, 3\)"):
        gradient_stats(model, _data(), batch_size=12)


def test_mixing_found_when_probe_batch_is_a_smaller_chunk():
    with pytest.raises(ModelError, match="mixes samples"):
        gradient_stats(MeanMixing(), _data(30), batch_size=5)


def test_batchnorm_in_train_mode_keeps_its_documented_error():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    with pytest.raises(ModelError, match=r"mode='train'.*BatchNorm1d.*mode='eval'"):
        gradient_stats(model, _data(), mode="train")
    assert gradient_stats(model, _data()).n == 12  # eval mode (the default): running statistics, no mixing


def test_dropout_in_train_mode_is_not_mixing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    assert gradient_stats(model, _data(), mode="train").n == 12
