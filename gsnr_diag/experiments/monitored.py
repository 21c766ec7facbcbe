"""One monitored training run: a :class:`~gsnr_diag.dynamics.monitor.Monitor` on a model trained by
:func:`~gsnr_diag.dynamics.training.train`, with an optimizer factory and a per-snapshot callback.

The building block of the shuffled-label control (one run per label set) and of ``gsnr-diag report``
without a control; the callback lets a caller persist progress as it goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..dynamics.monitor import Monitor
from ..dynamics.training import train
from ..dynamics.trajectory import Snapshot
from ..validate import check_optimizer

__all__ = ["MONITOR_KEYS", "OnSnapshot", "MakeOptimizer", "monitored_run"]

#: Keywords that configure the Monitor (``monitor_batch_size`` is its measurement chunk ``batch_size``).
MONITOR_KEYS = ("every", "signs", "monitor_batch_size", "mode")

#: ``on_snapshot(label, snapshot, monitor)``: called after every snapshot with the run's label, the
#: Snapshot just recorded and the Monitor (``monitor.trajectory``, ``monitor.last_stats`` — the full
#: GradientStats of that snapshot — and ``monitor.model``).
OnSnapshot = Callable[[str, Snapshot, Monitor], None]

#: ``make_optimizer(params)``: an optimizer over the list of trainable parameters.
MakeOptimizer = Callable[[list[nn.Parameter]], Any]


class _NotifyingMonitor(Monitor):
    """A Monitor that hands every snapshot to ``on_snapshot``."""

    def __init__(self, *args: Any, label: str, on_snapshot: OnSnapshot, **kw: Any):
        super().__init__(*args, **kw)
        self._label = label
        self._on_snapshot = on_snapshot

    def record(self, step: int, **kw: Any) -> Snapshot:  # type: ignore[override]
        snapshot = super().record(step, **kw)
        self._on_snapshot(self._label, snapshot, self)
        return snapshot


def monitored_run(
    model: nn.Module,
    data: Any,
    loss_fn: Callable | None,
    *,
    label: str,
    epochs: int,
    lr: float,
    seed: int = 0,
    test_data: Any = None,
    task: str | None = None,
    metadata: dict[str, Any] | None = None,
    make_optimizer: MakeOptimizer | None = None,
    on_snapshot: OnSnapshot | None = None,
    monitor_kw: dict[str, Any] | None = None,
    **train_kw: Any,
) -> Monitor:
    """Train ``model`` in place with a Monitor recording on its schedule; return the Monitor.

    Args:
        label: stored as ``metadata["label"]`` and passed to ``on_snapshot``.
        make_optimizer: called once with the trainable parameters; default plain SGD at ``lr``.
        monitor_kw: ``every``, ``signs``, ``mode``, ``monitor_batch_size`` for the Monitor.
        train_kw: ``batch_size`` and ``progress`` for :func:`~gsnr_diag.dynamics.training.train`.
    """
    kw = dict(monitor_kw or {})
    if "monitor_batch_size" in kw:
        kw["batch_size"] = kw.pop("monitor_batch_size")
    meta = {"label": label, **(metadata or {})}
    if on_snapshot is None:
        monitor = Monitor(model, data, loss_fn, test_data=test_data, task=task, metadata=meta, **kw)
    else:
        monitor = _NotifyingMonitor(
            model,
            data,
            loss_fn,
            test_data=test_data,
            task=task,
            metadata=meta,
            label=label,
            on_snapshot=on_snapshot,
            **kw,
        )
    optimizer = None
    if make_optimizer is not None:
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        check_optimizer(optimizer, model, "make_optimizer(params)")
    train(model, data, loss_fn, epochs=epochs, lr=lr, optimizer=optimizer, monitor=monitor, seed=seed, **train_kw)
    return monitor
