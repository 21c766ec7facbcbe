"""Bad input gets a GsnrDiagError subclass with an actionable message (issue 2, requirement 9)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gsnr_diag import (
    DataError,
    GsnrDiagError,
    LossError,
    ModelError,
    NonFiniteGradientError,
    gradient_stats,
)


def _data(n=10):
    return torch.randn(n, 4), torch.randint(0, 2, (n,))


def test_fewer_than_two_samples():
    with pytest.raises(DataError, match="at least 2"):
        gradient_stats(nn.Linear(4, 2), _data(1))


def test_empty_data():
    with pytest.raises(DataError, match="at least 2"):
        gradient_stats(nn.Linear(4, 2), [])


def test_no_trainable_parameters():
    model = nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters"):
        gradient_stats(model, _data())


def test_loss_not_scalar():
    with pytest.raises(LossError, match="scalar"):
        gradient_stats(nn.Linear(4, 2), _data(), nn.CrossEntropyLoss(reduction="none"))


def test_loss_not_differentiable():
    with pytest.raises(LossError, match="does not depend"):
        gradient_stats(nn.Linear(4, 2), _data(), lambda out, y: F.cross_entropy(out.detach(), y))


def test_loss_returns_non_tensor():
    with pytest.raises(LossError, match="float"):
        gradient_stats(nn.Linear(4, 2), _data(), lambda out, y: 1.0)


@pytest.mark.filterwarnings("ignore:Using a target size")  # F.mse_loss warns before it raises
def test_loss_shape_mismatch_is_explained():
    X, _ = _data()
    Y = torch.randn(10, 3)
    with pytest.raises(LossError, match=r"loss_fn: raised .* target tensor\(10, 3\)"):
        gradient_stats(nn.Linear(4, 2), (X, Y), F.mse_loss)


def test_forward_failure_names_input_shapes():
    X, Y = torch.randn(10, 5), torch.randint(0, 2, (10,))
    with pytest.raises(ModelError, match=r"forward pass failed .*tensor\(10, 5\)"):
        gradient_stats(nn.Linear(4, 2), (X, Y))


@pytest.mark.parametrize(
    "data, match",
    [
        (torch.randn(10, 4), "single tensor"),
        ("data.csv", "got a str"),
        (42, "got a int"),
        ([(torch.randn(3, 4),)], "expected a pair"),
        ([(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))], "first dimension"),
        ([(torch.randn(3, 4), torch.tensor(1))], "scalar"),
        ([("text", torch.zeros(3, dtype=torch.long))], "holding no tensors"),
    ],
)
def test_data_form_not_understood(data, match):
    with pytest.raises(DataError, match=match):
        gradient_stats(nn.Linear(4, 2), data)


def test_bad_arguments():
    with pytest.raises(ModelError, match="mode"):
        gradient_stats(nn.Linear(4, 2), _data(), mode="test")
    with pytest.raises(ModelError, match="nn.Module"):
        gradient_stats(lambda x: x, _data())
    with pytest.raises(DataError, match="batch_size"):
        gradient_stats(nn.Linear(4, 2), _data(), batch_size=0)


def test_batchnorm_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with pytest.raises(ModelError, match=r"BatchNorm1d.*mode='eval'"):
        gradient_stats(model, _data(), mode="train")
    assert model.training  # restored


class Sqrt(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(torch.sqrt(x))  # NaN for negative inputs of any sample


def test_nonfinite_gradients_name_parameters_and_count():
    X = torch.rand(12, 4)
    X[[2, 7]] = -1.0
    Y = torch.randint(0, 2, (12,))
    with pytest.raises(NonFiniteGradientError, match=r"2 of \d+ samples.*lin\.weight") as info:
        gradient_stats(Sqrt(), (X, Y), batch_size=12)
    assert "skip_nonfinite=True" in str(info.value)
    assert isinstance(info.value, GsnrDiagError)


def test_skip_nonfinite_skips_and_counts():
    X = torch.rand(12, 4)
    X[[2, 7]] = -1.0
    Y = torch.randint(0, 2, (12,))
    s = gradient_stats(Sqrt(), (X, Y), batch_size=6, skip_nonfinite=True)
    assert s.skipped_nonfinite == 2
    assert s.n == 10
    keep = [i for i in range(12) if i not in (2, 7)]
    clean = gradient_stats(Sqrt(), (X[keep], Y[keep]))
    model = Sqrt()
    torch.manual_seed(0)
    assert math.isfinite(s.mean_gsnr)
    del model, clean
