"""GSNRCallback in a Lightning Trainer: schedule, logged metrics, JSONL, exactness, untouched training, DDP."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from gsnr_diag import Trajectory, gradient_stats  # noqa: E402
from gsnr_diag.integrations.lightning import GSNRCallback  # noqa: E402


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Capture(L.loggers.Logger):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def _trainer(callbacks, logger, max_steps=6, **kw):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )


def _loader(X, Y):
    ds = torch.utils.data.TensorDataset(X, Y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)


def _fit(trainer, module, X, Y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's "num_workers" advice
        trainer.fit(module, _loader(X, Y))


def test_records_on_the_optimizer_step_schedule_and_logs(tmp_path):
    X, Y = _data()
    logger = Capture()
    cb = GSNRCallback((X, Y), every=2, test_data=_data(40, seed=1), path=tmp_path / "g.jsonl", batch_size=32)
    module = Tiny()
    _fit(_trainer([cb], logger), module, X, Y)
    assert [s.step for s in cb.trajectory.snapshots] == [0, 2, 4, 6]
    gsnr_rows = [(step, m) for step, m in logger.rows if "gsnr/mean_gsnr" in m]
    assert [step for step, _ in gsnr_rows] == [0, 2, 4, 6]
    for key in ("gsnr/mean_gsnr", "gsnr/osgr", "gsnr/same_sign", "gsnr/noise_scale", "gsnr/layer/net.0.weight"):
        assert key in gsnr_rows[-1][1]
    assert gsnr_rows[-1][1]["gsnr/test_loss"] > 0
    # the JSONL file holds the same trajectory
    loaded = Trajectory.load(tmp_path / "g.jsonl")
    assert [s.mean_gsnr for s in loaded.snapshots] == pytest.approx([s.mean_gsnr for s in cb.trajectory.snapshots])
    # the last snapshot is the exact statistic at the final weights; B_simple = Σρ² / Σḡ²
    stats = gradient_stats(module, (X, Y), batch_size=32)
    assert cb.trajectory.snapshots[-1].mean_gsnr == pytest.approx(stats.mean_gsnr, rel=1e-6)
    noise = sum(float(v.sum()) for v in stats.var.values())
    b_simple = noise / sum(float(m.square().sum()) for m in stats.mean.values())
    assert gsnr_rows[-1][1]["gsnr/noise_scale"] == pytest.approx(b_simple, rel=1e-6)
    assert gsnr_rows[-1][1]["gsnr/osgr"] == pytest.approx(1 - b_simple / len(Y), rel=1e-6)


def test_training_is_untouched():
    X, Y = _data()
    a, b = Tiny(), Tiny()
    L.seed_everything(0, verbose=False)
    _fit(_trainer([], Capture()), a, X, Y)
    L.seed_everything(0, verbose=False)
    _fit(_trainer([GSNRCallback((X, Y), every=1)], Capture()), b, X, Y)
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), k


def test_gradient_accumulation_counts_optimizer_steps():
    X, Y = _data()
    cb = GSNRCallback((X, Y), every=1)
    _fit(_trainer([cb], Capture(), max_steps=2, accumulate_grad_batches=2), Tiny(), X, Y)
    assert [s.step for s in cb.trajectory.snapshots] == [0, 1, 2]


def test_pytorch_lightning_trainer_runs_it():
    pl = pytest.importorskip("pytorch_lightning")
    X, Y = _data()

    class PLTiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 3)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    from gsnr_diag.integrations.lightning import _make_class, callback_base

    cb = _make_class(callback_base("pytorch_lightning"))((X, Y), every=3)
    assert isinstance(cb, pl.Callback)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(PLTiny(), _loader(X, Y))
    assert [s.step for s in cb.trajectory.snapshots] == [0, 3]


# ----------------------------------------------------------------------------- DDP, 2 gloo processes
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    # as a launcher (torchrun) would set them: Lightning then joins instead of spawning
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    X, Y = _data()
    cb = GSNRCallback((X, Y), every=2, path=f"{out}.jsonl", batch_size=16, online=2)
    logger = Capture()
    module = Tiny()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=world,
        num_nodes=1,
        strategy=L.strategies.DDPStrategy(process_group_backend="gloo"),
        logger=logger,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader(X, Y))
    rows = [m for _, m in logger.rows if "gsnr/mean_gsnr" in m]
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    online = [s.to_dict() for s in cb.online_trajectory.snapshots]
    torch.save(
        {"snaps": [s.to_dict() for s in cb.trajectory.snapshots], "rows": rows, "state": state, "online": online},
        f"{out}.{rank}",
    )


@pytest.mark.skipif(sys.platform == "win32", reason="gloo")
def test_ddp_two_ranks_measure_all_data_rank0_logs(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "r")
    mp.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=False) for r in range(2))
    assert [s["step"] for s in r0["snaps"]] == [0, 2]
    assert [s["mean_gsnr"] for s in r0["snaps"]] == pytest.approx([s["mean_gsnr"] for s in r1["snaps"]], rel=1e-12)
    assert len(r0["rows"]) == 2 and r1["rows"] == []  # only rank 0 logs
    # online: each rank's two mini-batches of 16 (DistributedSampler), all-reduced: 64 samples on both ranks
    assert (
        [s["extra"]["online_samples"] for s in r0["online"]]
        == [64]
        == [s["extra"]["online_samples"] for s in r1["online"]]
    )
    assert r0["online"][0]["mean_gsnr"] == pytest.approx(r1["online"][0]["mean_gsnr"], rel=1e-12)
    assert Trajectory.load(f"{out}.jsonl").snapshots[-1].step == 2  # only rank 0 wrote (one header)
    # the all-reduced statistics are those of the whole data at the final weights
    module = Tiny()
    module.load_state_dict(r0["state"])
    X, Y = _data()
    whole = gradient_stats(module, (X, Y), batch_size=16)
    assert r0["snaps"][-1]["mean_gsnr"] == pytest.approx(whole.mean_gsnr, rel=1e-9)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(module(X), Y))
    assert r0["snaps"][-1]["train_loss"] == pytest.approx(loss, rel=1e-5)


def test_metrics_reach_a_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    X, Y = _data()
    cb = GSNRCallback((X, Y), every=3)
    _fit(_trainer([cb], L.loggers.TensorBoardLogger(str(tmp_path)), max_steps=6), Tiny(), X, Y)
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("gsnr/mean_gsnr")] == [0, 3, 6]
    assert "gsnr/noise_scale" in acc.Tags()["scalars"]


def test_online_mode_logs_on_the_schedule_and_leaves_training_untouched():
    X, Y = _data()
    a, b = Tiny(), Tiny()
    L.seed_everything(0, verbose=False)
    _fit(_trainer([], Capture()), a, X, Y)
    logger = Capture()
    cb = GSNRCallback(None, every=2, online=3)
    L.seed_everything(0, verbose=False)
    _fit(_trainer([cb], logger), b, X, Y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert [s.step for s in cb.online_trajectory.snapshots] == [2, 4, 6]
    assert [s.extra["online_samples"] for s in cb.online_trajectory.snapshots] == [32, 48, 48]
    rows = [(step, m) for step, m in logger.rows if "gsnr_online/mean_gsnr" in m]
    assert [step for step, _ in rows] == [2, 4, 6] and "gsnr_online/noise_scale" in rows[-1][1]
    assert cb.trajectory.snapshots == [] and not any(m._forward_hooks for m in b.modules())  # detached at the end
    with pytest.raises(Exception, match="data"):
        GSNRCallback(None)
