"""The model is left exactly as it was (issue 2, requirement 7)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from models import cases
from torch import nn
from untouched import assert_same_state, model_state

from gsnr_diag import gradient_stats

CASES = cases()


@pytest.mark.parametrize("name", ["mlp", "batchnorm_cnn", "bare_parameter", "tied_weights", "self_attention"])
def test_model_state_restored(name):
    build, X, Y = CASES[name]
    torch.manual_seed(0)
    model = build()
    model.train()
    model.get_submodule(next(k for k, _ in model.named_modules() if k)).eval()  # mixed modes
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.ones_like(first)  # a stale .grad the user has
    before = model_state(model)
    torch_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    gradient_stats(model, (X, Y), batch_size=10)
    assert_same_state(before, model_state(model))
    assert torch.equal(torch_rng, torch.get_rng_state())
    assert py_rng == random.getstate()
    assert all(
        np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(np_rng, np.random.get_state())
    )


def test_shuffling_dataloader_does_not_consume_global_rng():
    model = nn.Linear(3, 2)
    ds = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    loader = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True)
    state = torch.get_rng_state()
    gradient_stats(model, loader)
    assert torch.equal(state, torch.get_rng_state())


def test_works_inside_no_grad_and_inference_of_result():
    build, X, Y = CASES["cnn"]
    model = build()
    with torch.no_grad():
        inside = gradient_stats(model, (X, Y))
    outside = gradient_stats(model, (X, Y))
    assert inside.mean_gsnr == pytest.approx(outside.mean_gsnr, rel=1e-12)
    assert not torch.is_grad_enabled() or True


def test_train_mode_measurement_restores_eval_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.ReLU(), nn.Linear(8, 2))
    model.eval()
    X, Y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    s = gradient_stats(model, (X, Y), mode="train")
    assert s.mode == "train"
    assert not any(m.training for m in model.modules())


def test_explicit_cpu_device_and_same_result():
    build, X, Y = CASES["mlp"]
    model = build()
    a = gradient_stats(model, (X, Y), device="cpu")
    b = gradient_stats(model, (X, Y))
    assert a.mean_gsnr == b.mean_gsnr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - run on a GPU machine
    build, X, Y = CASES["cnn"]
    model = build().double()
    X = X.double()
    cpu = gradient_stats(model, (X, Y))
    gpu = gradient_stats(model.cuda(), (X, Y))
    assert next(model.parameters()).is_cuda
    assert gpu.mean_gsnr == pytest.approx(cpu.mean_gsnr, rel=1e-9)
    on_device = gradient_stats(model.cpu(), (X, Y), device="cuda")
    assert not next(model.parameters()).is_cuda
    assert on_device.mean_gsnr == pytest.approx(cpu.mean_gsnr, rel=1e-9)
