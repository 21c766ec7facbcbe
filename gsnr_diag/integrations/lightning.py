"""PyTorch Lightning: ``GSNRCallback`` records GSNR snapshots on a schedule of optimizer steps.

::

    from gsnr_diag.integrations.lightning import GSNRCallback

    trainer = L.Trainer(max_steps=200, callbacks=[GSNRCallback((X, Y), every=20, path="gsnr.jsonl")])

Lightning is optional (``pip install 'gsnr-diag[lightning]'``) and imported only when the callback
class is first used. The class derives from ``lightning.pytorch.Callback`` when the ``lightning``
package is installed, else from ``pytorch_lightning.Callback``; either Trainer runs it (Lightning
calls callback hooks by name).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..dynamics.monitor import Monitor
from ..dynamics.online import OnlineGSNR
from ..dynamics.schedules import Schedule, _as_schedule
from ..dynamics.trajectory import Snapshot, Trajectory
from ..errors import MonitorError
from ._common import RankShard, check_shardable, distributed_world, snapshot_metrics

__all__ = ["GSNRCallback", "callback_base"]  # noqa: F822 - GSNRCallback is built on first access (__getattr__)

INSTALL_HINT = "pip install 'gsnr-diag[lightning]'"


def callback_base(framework: str | None = None) -> type:
    """The ``Callback`` class of ``framework`` (``"lightning"`` or ``"pytorch_lightning"``; default: the
    first one installed). Raises ``ImportError`` naming the extra to install when neither is."""
    names = [framework] if framework else ["lightning", "pytorch_lightning"]
    for name in names:
        try:
            if name == "lightning":
                from lightning.pytorch import Callback
            elif name == "pytorch_lightning":
                from pytorch_lightning import Callback
            else:
                raise ValueError(f"framework: expected 'lightning' or 'pytorch_lightning', got {framework!r}")
        except ImportError:
            continue
        return Callback
    raise ImportError(f"gsnr_diag.integrations.lightning needs PyTorch Lightning: {INSTALL_HINT}")


class _GSNRCallbackMixin:
    """The callback's logic; :func:`_make_class` puts it on the installed framework's ``Callback``."""

    def __init__(
        self,
        data: Any,
        loss_fn: Callable | None = None,
        *,
        every: int | Schedule = 50,
        test_data: Any = None,
        path: str | os.PathLike[str] | None = None,
        batch_size: int | None = None,
        signs: bool = True,
        mode: str = "eval",
        task: str | None = None,
        log_layers: bool = True,
        prefix: str = "gsnr/",
        online: int | None = None,
        online_every: int = 1,
    ):
        super().__init__()
        if data is None and online is None:
            raise MonitorError("data: expected the data to measure on (or data=None with online=<window>), got None")
        self.data = data
        self.loss_fn = loss_fn
        self.every = every
        self.test_data = test_data
        self.path = path
        self.batch_size = batch_size
        self.signs = signs
        self.mode = mode
        self.task = task
        self.log_layers = log_layers
        self.prefix = prefix
        self.monitor: Monitor | None = None
        self.online_window, self.online_every = online, online_every
        self.online: OnlineGSNR | None = None
        self.online_trajectory = Trajectory(metadata={"estimator": "online", "window": online, "every": online_every})
        self._last_step: int | None = None

    @property
    def trajectory(self) -> Trajectory:
        """The snapshots recorded so far (the same on every rank under DDP)."""
        if self.monitor is None:
            return Trajectory()
        return self.monitor.trajectory

    def _make_monitor(self, pl_module: Any) -> Monitor:
        rank, world = distributed_world()
        data, test_data = self.data, self.test_data
        if world > 1:  # each rank measures its share; Monitor all-reduces the moments and losses
            check_shardable(data, world, self.batch_size, "data")
            data = RankShard(data, rank, world, self.batch_size)
            test_data = None if test_data is None else RankShard(test_data, rank, world, self.batch_size)
        return Monitor(
            pl_module,
            data,
            self.loss_fn,
            test_data=test_data,
            every=self.every,
            batch_size=self.batch_size,
            path=self.path if rank == 0 else None,
            signs=self.signs,
            task=self.task,
            mode=self.mode,
            metadata={"integration": "lightning", "world_size": world},
            distributed=world > 1,
        )

    def _record(self, trainer: Any, pl_module: Any, step: int) -> Snapshot | None:
        if self.monitor is None and self.data is not None:
            self.monitor = self._make_monitor(pl_module)
        schedule = self.monitor.schedule if self.monitor is not None else _as_schedule(self.every)
        if step == self._last_step or not schedule(step):
            return None
        self._last_step = step
        metrics: dict[str, float] = {}
        snap = None
        if self.monitor is not None:
            snap = self.monitor.record(step, epoch=float(trainer.current_epoch))
            metrics.update(snapshot_metrics(snap, self.monitor.last_stats, layers=self.log_layers, prefix=self.prefix))
        if self.online is not None and self.online.steps > 0:  # the same steps on every rank: a collective
            _, world = distributed_world()
            stats = self.online.stats(distributed=world > 1)
            online_snap = self.online.snapshot(step, stats=stats)
            self.online_trajectory.snapshots.append(online_snap)
            prefix = self.prefix.rstrip("/") + "_online/"
            metrics.update(snapshot_metrics(online_snap, stats, layers=self.log_layers, prefix=prefix))
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        return snap

    # --- Lightning hooks ----------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.online_window is not None and self.online is None:
            self.online = OnlineGSNR(pl_module, window=self.online_window, every=self.online_every).attach()
        self._record(trainer, pl_module, int(trainer.global_step))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.online is not None:
            self.online.detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps; with gradient accumulation it stays put between updates.
        self._record(trainer, pl_module, int(trainer.global_step))


_CLASSES: dict[type, type] = {}


def _make_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(
            "GSNRCallback",
            (_GSNRCallbackMixin, base),
            {
                "__module__": __name__,
                "__doc__": _DOC,
                "__qualname__": "GSNRCallback",
            },
        )
    return _CLASSES[base]


_DOC = """Record GSNR snapshots of the LightningModule on a schedule of optimizer steps.

    Args:
        data: the data the statistics are measured on (any form :func:`~gsnr_diag.gradient_stats`
            accepts), usually the training set or a fixed subset of it.
        loss_fn: ``loss_fn(module(x), y)`` returning the batch mean; default cross-entropy.
        every: record every k optimizer steps (``trainer.global_step``) or a schedule ``step -> bool``
            (``linear``, ``logarithmic``); step 0 is recorded at the start of training when it is due.
        test_data: optional held-out data: test loss, accuracy and the generalization gap.
        path: append each snapshot as a JSONL line there (rank 0 only).
        batch_size: chunk size of the measurement (its memory bound).
        signs, mode, task: as for :class:`~gsnr_diag.Monitor`.
        log_layers: also log ``gsnr/layer/<parameter>`` for every parameter tensor.
        prefix: the metric-name prefix.
        online: also run :class:`~gsnr_diag.dynamics.online.OnlineGSNR` with this window on the training
            mini-batches and log its statistics on the same schedule as ``gsnr_online/*``
            (``callback.online_trajectory``); ``data=None`` with ``online`` logs only those (no
            full-data pass). A different, cheaper estimator: see the online mode in the README.
        online_every: capture one training mini-batch in this many.

    Logs ``gsnr/mean_gsnr``, ``gsnr/osgr``, ``gsnr/same_sign``, ``gsnr/noise_scale`` (B_simple),
    ``gsnr/gsnr_median``, losses and per-layer values to every logger of the Trainer at the step
    measured; ``callback.trajectory`` holds the snapshots. Under DDP every rank measures its share
    of ``data`` (batch i on rank i mod world size; pass the same, unshuffled data on every rank)
    and the moments are all-reduced (a collective), so each rank holds the statistics of all of
    ``data``; only rank 0 logs and writes ``path``. The measurement runs on the unwrapped module in
    eval mode and leaves the weights, ``.grad``, modes and RNG streams as they were.
    """


def __getattr__(name: str) -> Any:
    if name == "GSNRCallback":
        return _make_class(callback_base())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
