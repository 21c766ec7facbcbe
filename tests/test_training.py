"""train(): full-batch GD and mini-batch SGD, NaN stop, progress bar, and the paper's toy regression."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gsnr_diag.dynamics.monitor import Monitor
from gsnr_diag.dynamics.training import NonFiniteLossWarning, train
from gsnr_diag.errors import DataError, GsnrDiagError, ModelError


def _reg_data(n=200, seed=1):
    """Sec. 3.2: x ~ U[-1, 1]², y = x0·x1 + ε, ε ~ U[-0.01, 0.01]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    y = x[:, 0] * x[:, 1] + (torch.rand(n, generator=g) * 0.02 - 0.01)
    return x, y[:, None]


def _toy_mlp(init: str, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(2, 20), nn.ReLU(), nn.Linear(20, 1))
    if init == "small":  # weights N(0, 0.03²), zero biases
        with torch.no_grad():
            for layer in (m[0], m[2]):
                layer.weight.normal_(0, 0.03)
                layer.bias.zero_()
    return m


def test_full_batch_gd_is_plain_gradient_descent():
    x, y = _reg_data(50)
    a, b = _toy_mlp("default"), _toy_mlp("default")
    train(a, (x, y), nn.MSELoss(), epochs=5, lr=0.1, progress=False)
    for _ in range(5):
        b.zero_grad()
        nn.functional.mse_loss(b(x), y).backward()
        with torch.no_grad():
            for p in b.parameters():
                p -= 0.1 * p.grad
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_full_batch_gradient_over_chunks_is_exact():
    """A DataLoader of small batches gives the same full-batch step as one (X, Y) tensor pair."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _reg_data(60)
    a, b = _toy_mlp("default"), _toy_mlp("default")
    train(a, (x, y), nn.MSELoss(), epochs=3, lr=0.1, progress=False)
    train(b, DataLoader(TensorDataset(x, y), batch_size=7), nn.MSELoss(), epochs=3, lr=0.1, progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_minibatch_sgd_is_seeded_and_shuffled():
    x, y = _reg_data(64)

    def run(seed):
        m = _toy_mlp("default")
        mon = Monitor(m, (x, y), nn.MSELoss(), every=4)
        traj = train(m, (x, y), nn.MSELoss(), epochs=2, lr=0.1, batch_size=16, monitor=mon, seed=seed, progress=False)
        return m, traj

    (a, ta), (b, _), (c, _) = run(0), run(0), run(1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert ta.steps == [0, 4, 8]  # 4 steps per epoch, step 0 before training, last step included
    assert ta.snapshots[1].epoch == 1.0
    assert ta.metadata["settings"]["batch_size"] == 16 and ta.metadata["settings"]["algorithm"] == "mini-batch SGD"
    assert ta.metadata["seed"] == 0 and ta.metadata["n_train"] == 64


def test_nan_loss_stops_and_keeps_trajectory(tmp_path):
    x, y = _reg_data(50)
    m = _toy_mlp("default")
    mon = Monitor(m, (x, y), nn.MSELoss(), every=1, path=tmp_path / "r.jsonl")
    with pytest.warns(NonFiniteLossWarning, match="training stopped: the loss is"):
        traj = train(m, (x, y), nn.MSELoss(), epochs=200, lr=50.0, monitor=mon, progress=False)
    assert 1 <= len(traj) < 200
    assert "stopped" in traj.metadata
    from gsnr_diag.dynamics.trajectory import Trajectory

    on_disk = Trajectory.load(tmp_path / "r.jsonl")
    assert on_disk.steps == traj.steps and "stopped" in on_disk.metadata


def test_progress_bar_on_stderr(capsys):
    x, y = _reg_data(20)
    train(_toy_mlp("default"), (x, y), nn.MSELoss(), epochs=2, lr=0.1, progress=True)
    out = capsys.readouterr()
    assert "training" in out.err and out.out == ""


def test_modes_and_frozen_parameters_are_respected():
    x, y = _reg_data(30)
    m = _toy_mlp("default")
    m[0].requires_grad_(False)
    first = m[0].weight.detach().clone()
    m.eval()
    train(m, (x, y), nn.MSELoss(), epochs=3, lr=0.1, batch_size=8, progress=False)
    assert torch.equal(m[0].weight, first)
    assert not m.training


def test_bad_arguments():
    x, y = _reg_data(10)
    m = _toy_mlp("default")
    with pytest.raises(DataError, match="epochs"):
        train(m, (x, y), nn.MSELoss(), epochs=-1, lr=0.1)
    with pytest.raises(DataError, match="batch_size"):
        train(m, (x, y), nn.MSELoss(), epochs=1, lr=0.1, batch_size=0)
    with pytest.raises(DataError, match="lr"):
        train(m, (x, y), nn.MSELoss(), epochs=1, lr=float("nan"))
    with pytest.raises(ModelError, match="different model"):
        train(m, (x, y), nn.MSELoss(), epochs=1, lr=0.1, monitor=Monitor(_toy_mlp("default"), (x, y), nn.MSELoss()))
    m.requires_grad_(False)
    with pytest.raises(GsnrDiagError, match="no trainable"):
        train(m, (x, y), nn.MSELoss(), epochs=1, lr=0.1)


# The paper's toy regression (Sec. 3.2, Table 1). Settings chosen once and stated, never tuned to a target:
# n = 200, full-batch GD, lr = 0.2, 500 steps, GSNR recorded every 10 steps, seeds 0 (init) / 1 (data).
TOY_LR, TOY_STEPS, TOY_EVERY = 0.2, 500, 10


def _second_layer_gsnr(init: str, frozen: bool) -> list[float]:
    x, y = _reg_data(200, seed=1)
    m = _toy_mlp(init)
    if frozen:
        m[0].requires_grad_(False)
    mon = Monitor(m, (x, y), nn.MSELoss(), every=TOY_EVERY, signs=False)
    traj = train(m, (x, y), nn.MSELoss(), epochs=TOY_STEPS, lr=TOY_LR, monitor=mon, progress=False)
    _, values = traj.series("layer_gsnr", layer="2.weight")
    return values


def test_toy_regression_small_init_gsnr_rises_only_with_learned_features():
    trainable = _second_layer_gsnr("small", frozen=False)
    frozen = _second_layer_gsnr("small", frozen=True)
    # measured: trainable start 0.0269, peak 0.0696 (2.59x, step 100), end 0.0021;
    #           frozen start 0.0269, peak 0.0280 (1.04x, step 10), end 0.0269 (1.00x)
    assert max(trainable) > 1.5 * trainable[0]
    assert max(frozen) < 1.1 * frozen[0]
    assert trainable[-1] < trainable[0]  # it rises, then falls as the fit completes


def test_toy_regression_default_init_gsnr_decays_in_both_cases():
    # measured: start 0.0709 in both; trainable end 0.0034, frozen end 0.0028; the peak is step 0 in both
    for frozen in (False, True):
        values = _second_layer_gsnr("default", frozen)
        assert max(values) == values[0]
        assert values[-1] < 0.2 * values[0]
