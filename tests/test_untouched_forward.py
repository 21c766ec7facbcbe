"""The model is left exactly as it was also when its own forward changes it (parameters, buffers, slots)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_stats
from torch import nn
from untouched import assert_backward_reaches, assert_same_rng, assert_same_state, model_state, rng_state

from gsnr_diag import gradient_stats


class TwoNames(nn.Module):
    """One Linear reachable as ``a`` and ``b`` (functorch used to leave its wrapper tensors in it)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a
        self.scale = nn.Parameter(torch.randn(3))  # a bare parameter: the functorch fallback runs
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x) * self.scale)))


class Counter(nn.Module):
    """A custom buffer its forward increments (and uses)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * (1 + 0 * self.calls)


def _x(n=14):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(3))


CASES = {
    "two_names": (TwoNames, _x, "eval"),
    "embedding_max_norm": (
        lambda: nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(8, 2)),
        lambda: torch.randint(0, 10, (14, 2), generator=torch.Generator().manual_seed(3)),
        "eval",
    ),
    "spectral_norm": (
        lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)),
        _x,
        "train",
    ),
    "spectral_norm_parametrization": (
        lambda: nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)),
        _x,
        "train",
    ),
    "instance_norm_running_stats": (
        lambda: nn.Sequential(
            nn.Conv1d(1, 2, 3),
            nn.InstanceNorm1d(2, affine=True, track_running_stats=True),
            nn.Flatten(),
            nn.Linear(6, 2),
        ),
        lambda: torch.randn(14, 1, 5, generator=torch.Generator().manual_seed(3)),
        "train",
    ),
    "counter_buffer": (Counter, _x, "eval"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_that_changes_the_model_leaves_it_untouched(name):
    build, make_x, mode = CASES[name]
    torch.manual_seed(0)
    model = build()
    model.train()
    x = make_x()
    y = torch.randint(0, 2, (x.shape[0],), generator=torch.Generator().manual_seed(4))
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 0.5)  # a stale .grad the user has
    before = model_state(model)
    rng = rng_state()
    stats = gradient_stats(model, (x, y), batch_size=5, mode=mode)
    assert stats.n == x.shape[0]
    assert_same_state(before, model_state(model))
    assert_same_rng(rng)
    assert model.training
    assert_backward_reaches(model, x, lambda out: nn.functional.cross_entropy(out, y))


def test_module_under_two_names_measured_exactly_over_several_chunks():
    torch.manual_seed(0)
    model = TwoNames().double()
    x, y = _x().double(), torch.randint(0, 2, (14,), generator=torch.Generator().manual_seed(4))
    ref = reference_stats(model, x, y, nn.CrossEntropyLoss())
    got = gradient_stats(model, (x, y), batch_size=4)
    for k in ref["mean"]:
        np.testing.assert_allclose(got.mean[k].numpy(), ref["mean"][k], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.var[k].numpy(), ref["var"][k], rtol=1e-9, atol=1e-12)


def test_embedding_max_norm_measured_at_the_renormalized_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(8, 2)).double()
    x = torch.randint(0, 10, (14, 2), generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 2, (14,), generator=torch.Generator().manual_seed(4))
    ref = reference_stats(model, x, y, nn.CrossEntropyLoss())  # on a copy: it renormalizes too
    weight = model[0].weight.detach().clone()
    got = gradient_stats(model, (x, y), batch_size=4)
    assert torch.equal(model[0].weight, weight)
    for k in ref["mean"]:
        np.testing.assert_allclose(got.mean[k].numpy(), ref["mean"][k], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.var[k].numpy(), ref["var"][k], rtol=1e-9, atol=1e-12)
