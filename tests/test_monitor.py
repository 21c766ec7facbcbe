"""Monitor: schedules, snapshot contents, bitwise non-interference, JSONL that survives a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gsnr_diag import gradient_stats
from gsnr_diag.core.correlation import pearson
from gsnr_diag.dynamics.monitor import Monitor, MonitorError, delta_g_weight_corr
from gsnr_diag.dynamics.schedules import linear, logarithmic
from gsnr_diag.dynamics.training import train
from gsnr_diag.dynamics.trajectory import Trajectory, TruncatedTrajectoryWarning


def _clf_data(n=64, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + torch.nn.functional.one_hot(y, d).float()
    return x, y


def _mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def test_linear_schedule():
    s = linear(3)
    assert [t for t in range(10) if s(t)] == [0, 3, 6, 9]
    assert [t for t in range(10) if linear(4, start=2)(t)] == [2, 6]
    with pytest.raises(MonitorError):
        linear(0)


def test_logarithmic_schedule():
    s = logarithmic(per_decade=2)
    steps = [t for t in range(1001) if s(t)]
    assert steps == [0, 1, 3, 10, 32, 100, 316, 1000]
    s = logarithmic(per_decade=10, end=20)
    steps = [t for t in range(100) if s(t)]
    assert steps[:4] == [0, 1, 2, 3] and steps[-1] <= 20 and len(steps) == len(set(steps))
    assert [t for t in range(5) if logarithmic()(t)] == [0, 1, 2, 3, 4]  # dense at the start
    with pytest.raises(MonitorError):
        logarithmic(per_decade=0)


def test_every_int_and_bad_every():
    m = Monitor(_mlp(), _clf_data(), every=5)
    assert [t for t in range(12) if m.should_record(t)] == [0, 5, 10]
    with pytest.raises(MonitorError, match="every"):
        Monitor(_mlp(), _clf_data(), every="often")
    with pytest.raises(MonitorError, match="task"):
        Monitor(_mlp(), _clf_data(), task="ranking")


def test_record_matches_gradient_stats_and_fills_snapshot():
    model = _mlp()
    data, test = _clf_data(), _clf_data(seed=1)
    mon = Monitor(model, data, test_data=test)
    s0 = mon.record(0, lr=0.1)
    ref = gradient_stats(model, data)
    # the monitor measures in folds (for OSGR's jackknife SE) merged with Chan's formula: equal up to rounding
    assert s0.mean_gsnr == pytest.approx(ref.mean_gsnr, rel=1e-6) and s0.osgr == pytest.approx(ref.osgr, rel=1e-6)
    assert s0.layer_gsnr == pytest.approx(ref.layer_gsnr, rel=1e-6)
    assert s0.mean_same_sign == ref.mean_same_sign and s0.opposite_sign_top10 == ref.opposite_sign_top10
    assert s0.osgr_se is not None and s0.osgr_se > 0
    assert s0.delta_g_weight_corr is None
    assert s0.extra == {"lr": 0.1}
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(data[0]), data[1]).item()
        acc = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    assert s0.train_loss == pytest.approx(loss, rel=1e-6)
    assert s0.test_accuracy == pytest.approx(acc)
    assert s0.generalization_gap == pytest.approx(s0.test_loss - s0.train_loss)
    train(model, data, epochs=3, lr=0.5, progress=False)
    s1 = mon.record(3)
    assert isinstance(s1.delta_g_weight_corr, float) and -1 <= s1.delta_g_weight_corr <= 1
    assert mon.trajectory.steps == [0, 3]
    assert mon.trajectory.metadata["task"] == "classification"
    assert mon.trajectory.metadata["param_counts"] == {"0.weight": 80, "0.bias": 16, "3.weight": 48, "3.bias": 3}
    with pytest.raises(MonitorError, match="expected a number"):
        mon.record(4, note="hello")


def test_regression_task_has_no_accuracy():
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    y = x.sum(1, keepdim=True)
    mon = Monitor(nn.Linear(3, 1), (x, y), nn.MSELoss())
    s = mon.record(0)
    assert mon.task == "regression" and s.train_accuracy is None and s.test_accuracy is None


def test_pearson_and_delta_g_weight_corr_against_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a.numpy(), b.numpy())[0, 1], rel=1e-12)
    assert pearson(a, torch.ones(50)) is None
    prev = {"w": torch.zeros(5, 10, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
    now = {"w": a.reshape(5, 10), "b": torch.ones(5, dtype=torch.float64)}
    w = {"w": b.reshape(5, 10).float(), "b": torch.ones(5)}
    # biases (ndim < 2) are excluded: the result is the correlation over the weight matrix alone
    assert delta_g_weight_corr(prev, now, w) == pytest.approx(np.corrcoef(a.numpy(), b.numpy())[0, 1], rel=1e-6)


def _user_loop(with_monitor: bool, tmp_path=None):
    """A user's own loop: shuffling DataLoader + dropout (both draw from the global RNG)."""
    torch.manual_seed(123)
    x, y = _clf_data(n=96)
    model = _mlp(seed=1, dropout=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    monitor = None
    if with_monitor:
        monitor = Monitor(
            model, loader, test_data=(x[:32], y[:32]), every=linear(2), path=tmp_path / "m.jsonl" if tmp_path else None
        )
    step = 0
    for _ in range(2):
        for xb, yb in loader:
            model.train()
            if monitor is not None and monitor.should_record(step):
                monitor.record(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            if monitor is not None and step % 3 == 1:
                monitor.record(step)  # between backward and step: .grad must survive
            opt.step()
            step += 1
    return model, monitor


def test_monitor_does_not_change_training_bitwise(tmp_path):
    plain, _ = _user_loop(False)
    watched, monitor = _user_loop(True, tmp_path)
    assert len(monitor.trajectory) > 5
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), k
    assert watched.training  # mode left as the user set it
    assert Trajectory.load(tmp_path / "m.jsonl").steps == monitor.trajectory.steps


def test_train_with_and_without_monitor_bitwise():
    x, y = _clf_data(n=80)

    def run(with_monitor):
        model = _mlp(seed=2, dropout=0.2)
        mon = Monitor(model, (x, y), test_data=(x, y), every=3) if with_monitor else None
        torch.manual_seed(7)
        train(model, (x, y), epochs=3, lr=0.2, batch_size=16, monitor=mon, progress=False)
        return model, torch.rand(1)  # the global RNG stream must also be where it would be

    (a, ra), (b, rb) = run(False), run(True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(ra, rb)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from gsnr_diag.dynamics.monitor import Monitor
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(32, 4); y = torch.randint(0, 2, (32,))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    mon = Monitor(model, (x, y), path=sys.argv[1])
    for step in range(10_000):
        mon.record(step)
        print(step, flush=True)
        time.sleep(0.02)
    """
)


def test_jsonl_survives_a_killed_process(tmp_path):
    path = tmp_path / "run.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        seen = -1
        deadline = time.monotonic() + 60
        while seen < 4 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen = int(line)
        assert seen >= 4, "the writer did not get going"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with open(path, "a") as f:  # what a kill inside write() would leave
        f.write('{"snapshot": {"step": 99999, "mean_gs')
    with pytest.warns(TruncatedTrajectoryWarning):
        traj = Trajectory.load(path)
    assert len(traj) >= seen + 1  # every snapshot announced before the kill is on disk
    assert traj.steps == list(range(len(traj)))
    assert traj.metadata["model"] == "Sequential"
    assert all(s.mean_gsnr is not None for s in traj.snapshots)
