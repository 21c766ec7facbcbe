"""Monitor: GSNR statistics on a schedule during training → Snapshot → Trajectory.

Usage in a user's own loop::

    monitor = Monitor(model, (X, Y), loss_fn, test_data=(Xt, Yt), every=linear(50), path="run.jsonl")
    for step in range(steps):
        if monitor.should_record(step):
            monitor.record(step, lr=scheduler.get_last_lr()[0])
        ...  # forward, backward, optimizer.step()

Recording never changes training: :func:`~gsnr_diag.measure.gradient_stats` restores modes,
RNG states and ``.grad``, and the losses are evaluated under ``torch.no_grad`` inside the
same :func:`~gsnr_diag.measure.preserved_state`, so a run with the monitor ends with bitwise
the same weights as one without.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.correlation import pearson
from ..core.histogram import layer_log10_gsnr_histograms
from ..core.stats import GradientStats
from ..data import call_model, check_reiterable, count_samples, iter_batches
from ..errors import MonitorError
from ..measure import gradient_stats, gradient_stats_with_se, model_device, preserved_state
from ..validate import check_loss_fn, check_model
from .jsonl_file import append_line, open_jsonl
from .schedules import Schedule, _as_schedule, linear, logarithmic
from .trajectory import Snapshot, Trajectory, clean_float, header_line, metadata_line, snapshot_line

__all__ = [
    "Monitor",
    "MonitorError",
    "Schedule",
    "linear",
    "logarithmic",
    "pearson",
    "delta_g_weight_corr",
    "library_versions",
    "infer_task",
]

TASKS = ("classification", "regression")
#: Folds of the training set whose moments are kept apart for the jackknife SE of OSGR (eq. 19).
UNCERTAINTY_FOLDS = 8


# ----------------------------------------------------------------------------- pure math
def delta_g_weight_corr(
    previous_mean: dict[str, torch.Tensor], mean: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]
) -> float | None:
    """Pearson correlation over weight elements (tensors with ndim ≥ 2) of Δḡ_j and W_j.

    Δḡ = ḡ(now) − ḡ(previous snapshot); negative early in training (eq. 28, Fig. 7a).
    """
    dg, w = [], []
    for name, m in mean.items():
        if name not in previous_mean or name not in weights or weights[name].ndim < 2:
            continue
        dg.append((m - previous_mean[name]).flatten().to(torch.float64))
        w.append(weights[name].detach().flatten().to("cpu", torch.float64))
    if not dg:
        return None
    return pearson(torch.cat(dg).cpu().numpy(), torch.cat(w).numpy())


# ----------------------------------------------------------------------------- helpers
def library_versions() -> dict[str, str]:
    """Versions of python, torch, opacus and gsnr_diag for trajectory metadata."""
    from .._version import __version__

    try:
        import opacus

        opacus_version = opacus.__version__
    except Exception:
        opacus_version = "unknown"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus_version,
        "gsnr_diag": __version__,
    }


def infer_task(loss_fn: Any, data: Any) -> str:
    """``"classification"`` or ``"regression"``: from the loss type, else from the first target's dtype.

    Cross-entropy/NLL → classification; MSE/L1/smooth-L1/Huber → regression; any other loss (or
    ``None``) → classification for integer targets, regression for float ones (or no data).
    """
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return "classification"
    if isinstance(loss_fn, (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)):
        return "regression"
    with torch.random.fork_rng(devices=[]):  # peeking a shuffling DataLoader draws from the RNG
        for _, y in iter_batches(data, None, None):
            is_int = not (y.is_floating_point() or y.is_complex())
            return "classification" if is_int else "regression"
    return "regression"


def evaluate(
    model: nn.Module,
    data: Any,
    loss_fn: Callable,
    *,
    batch_size: int | None,
    device: torch.device,
    accuracy: bool,
    distributed: bool = False,
    process_group: Any = None,
) -> tuple[float | None, float | None]:
    """(mean loss, accuracy) of ``model`` on ``data`` in eval mode under ``torch.no_grad``.

    The loss is the sample-weighted mean of ``loss_fn``'s batch means; the caller wraps this in
    :func:`~gsnr_diag.measure.preserved_state` so modes and RNG are restored. With
    ``distributed=True`` the sums are all-reduced over ``torch.distributed`` ranks (each rank
    passes its shard; a collective: every rank must call it).
    """
    model.eval()
    total = 0.0
    correct = 0
    count = 0
    with torch.no_grad():
        for x, y in iter_batches(data, batch_size, device):
            out = call_model(model, x)
            b = int(y.shape[0])
            total += float(loss_fn(out, y)) * b
            count += b
            if accuracy:
                logits = out if isinstance(out, torch.Tensor) else out[0]
                correct += int((logits.argmax(dim=-1) == y).sum())
    if distributed:
        import torch.distributed as dist

        sums = torch.tensor([total, float(correct), float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(sums, group=process_group)
        total, correct, count = float(sums[0]), int(round(float(sums[1]))), int(round(float(sums[2])))
    if count == 0:
        return None, None
    return total / count, (correct / count if accuracy else None)


# ----------------------------------------------------------------------------- Monitor
class Monitor:
    """Record GSNR statistics of ``model`` on ``data`` on a schedule (see the module docstring).

    Args:
        model: the model being trained; never modified.
        data: the training data the statistics are measured on (any form
            :func:`~gsnr_diag.gradient_stats` accepts).
        loss_fn: ``loss_fn(output, target)`` returning the batch mean; default cross-entropy.
        test_data: optional held-out data for test loss/accuracy and the generalization gap.
        every: an int k (record every k steps) or a schedule ``step -> bool`` (:func:`linear`,
            :func:`logarithmic`).
        batch_size: chunk size for the measurement (memory bound).
        path: if given, each snapshot is appended to this JSONL file at once, so a killed run keeps
            every finished snapshot. An existing file is never emptied: a gsnr-diag JSONL of the same
            run (same model class, parameter counts and training-set size) is resumed — its snapshots
            are loaded and new ones appended, at later steps only; any other file is refused with a
            :class:`~gsnr_diag.errors.MonitorError` naming it (``overwrite=True`` replaces it).
        signs: count gradient signs (same-sign fraction); a little slower.
        task: ``"classification"`` (accuracies recorded) or ``"regression"``; inferred from the
            loss function or the target dtype when ``None``.
        mode: measurement mode passed to :func:`~gsnr_diag.gradient_stats` (``"eval"`` default).
        metadata: extra metadata for the trajectory (e.g. ``{"label": "real"}``).
        distributed: each ``torch.distributed`` rank passes its own shard of ``data`` (and
            ``test_data``); the moments and losses are all-reduced, so every rank records the
            statistics of the union. ``record`` is then a collective: call it on every rank at the
            same steps (give ``path`` on one rank only).
        process_group: the ``torch.distributed`` group for ``distributed=True`` (default: the world).
        overwrite: replace an existing ``path`` instead of resuming or refusing it.
        on_snapshot: optional ``callable(snapshot)`` called after each recorded :class:`Snapshot` is
            appended (and written); send snapshots anywhere (a logger, TensorBoard, W&B). Its exceptions
            propagate.
        jackknife_groups: G ≥ 2 records delete-a-group jackknife standard errors in
            ``snapshot.standard_errors`` (see :func:`~gsnr_diag.gradient_stats`); 0 (default) off.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        loss_fn: Callable | None = None,
        *,
        test_data: Any = None,
        every: int | Schedule = 1,
        batch_size: int | None = None,
        path: str | os.PathLike[str] | None = None,
        signs: bool = True,
        task: str | None = None,
        mode: str = "eval",
        metadata: dict[str, Any] | None = None,
        distributed: bool = False,
        process_group: Any = None,
        overwrite: bool = False,
        on_snapshot: Callable[[Snapshot], Any] | None = None,
        jackknife_groups: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise MonitorError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if task is not None and task not in TASKS:
            raise MonitorError(f"task: expected 'classification', 'regression' or None, got {task!r}")
        check_model(model)
        check_loss_fn(loss_fn if loss_fn is not None else nn.CrossEntropyLoss())
        check_reiterable(data, "data", "the monitor measures it at every snapshot")
        check_reiterable(test_data, "test_data", "the monitor evaluates it at every snapshot")
        # --- on_snapshot (delimited: the argument check and the one call at the end of record) ---
        if on_snapshot is not None and not callable(on_snapshot):
            raise MonitorError(f"on_snapshot: expected a callable(snapshot) or None, got {type(on_snapshot).__name__}")
        self.on_snapshot = on_snapshot
        # --- end on_snapshot ---
        self.jackknife_groups = jackknife_groups
        self.model = model
        self.data = data
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.test_data = test_data
        self.every = every
        self.schedule = _as_schedule(every)
        self.batch_size = batch_size
        self.path = Path(path) if path is not None else None
        self.signs = signs
        self.mode = mode
        self.task = task
        self.distributed = distributed
        self.process_group = process_group
        self.last_stats: GradientStats | None = None
        self._previous_mean: dict[str, torch.Tensor] | None = None
        self._header_written = False
        self._start = time.perf_counter()
        self.trajectory = Trajectory(metadata=self._initial_metadata(metadata or {}))
        self._resumed_until: int | None = None
        self._resume_noted = False
        if self.path is not None:
            previous = open_jsonl(self.path, self.trajectory.metadata, overwrite=bool(overwrite))
            if previous is not None:
                self.trajectory.snapshots = list(previous.snapshots)
                self.trajectory.metadata = {**previous.metadata, **self.trajectory.metadata}
                self._header_written = True
                self._resumed_until = max(previous.steps, default=-1)

    def _initial_metadata(self, extra: dict[str, Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "model": type(self.model).__name__,
            "param_counts": {k: p.numel() for k, p in self.model.named_parameters() if p.requires_grad},
            "n_train": count_samples(self.data),
            "n_test": count_samples(self.test_data) if self.test_data is not None else None,
            "task": self.task,
            "settings": {
                "every": repr(self.every),
                "batch_size": self.batch_size,
                "signs": self.signs,
                "mode": self.mode,
            },
            "device": str(model_device(self.model)),
            "versions": library_versions(),
            "command": " ".join(sys.argv),
        }
        extra = dict(extra)  # never mutate the caller's dict
        settings = extra.pop("settings", None)
        meta.update(extra)
        if isinstance(settings, dict):
            meta["settings"].update(settings)
        return meta

    def should_record(self, step: int) -> bool:
        """Whether the schedule asks for a snapshot at ``step``."""
        return bool(self.schedule(int(step)))

    def update_metadata(self, **update: Any) -> None:
        """Merge ``update`` into the trajectory's metadata (``settings`` is merged key by key);
        appended to the JSONL file when one is being written."""
        settings = update.pop("settings", None)
        self.trajectory.metadata.update(update)
        if isinstance(settings, dict):
            self.trajectory.metadata.setdefault("settings", {}).update(settings)
            update["settings"] = dict(self.trajectory.metadata["settings"])
        if self.path is not None and self._header_written:
            self._append(metadata_line(update))

    def _append(self, line: str) -> None:
        assert self.path is not None
        append_line(self.path, line)

    def record(self, step: int, *, epoch: float | None = None, **extra: float) -> Snapshot:
        """Measure at the current weights, append a :class:`Snapshot` (and a JSONL line) and return it.

        ``extra`` numbers (learning rate, batch loss, ...) are stored in ``snapshot.extra``.
        """
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise MonitorError(f"step: expected a non-negative int, got {step!r}")
        _check_extra(extra)
        if self._resumed_until is not None and step <= self._resumed_until:
            raise MonitorError(
                f"record(step={step}): {self.path} already holds this run up to step {self._resumed_until}; "
                "a resumed run records later steps only (pass overwrite=True to start the file afresh)"
            )
        if self.task is None:
            self.task = infer_task(self.loss_fn, self.data)
            self.trajectory.metadata["task"] = self.task
        accuracy = self.task == "classification"
        dist = {"distributed": self.distributed, "process_group": self.process_group}
        common = {"batch_size": self.batch_size, "signs": self.signs, "mode": self.mode}
        if self.distributed or self.jackknife_groups:
            stats = gradient_stats(
                self.model,
                self.data,
                self.loss_fn,
                jackknife_groups=self.jackknife_groups,
                **common,
                **dist,
            )
            osgr_se = stats.standard_errors.get("osgr")
        else:  # OSGR's standard error from per-fold moments (jackknife over UNCERTAINTY_FOLDS folds of the data)
            stats, osgr_se = gradient_stats_with_se(
                self.model, self.data, self.loss_fn, folds=UNCERTAINTY_FOLDS, **common
            )
        device = model_device(self.model)
        with preserved_state(self.model):
            train_loss, train_acc = evaluate(
                self.model,
                self.data,
                self.loss_fn,
                batch_size=self.batch_size,
                device=device,
                accuracy=accuracy,
                **dist,
            )
            test_loss = test_acc = None
            if self.test_data is not None:
                test_loss, test_acc = evaluate(
                    self.model,
                    self.test_data,
                    self.loss_fn,
                    batch_size=self.batch_size,
                    device=device,
                    accuracy=accuracy,
                    **dist,
                )
        weights = {k: p.detach() for k, p in self.model.named_parameters() if k in stats.mean}
        corr = None
        if self._previous_mean is not None:
            corr = delta_g_weight_corr(self._previous_mean, stats.mean, weights)
        self._previous_mean = {k: v.clone() for k, v in stats.mean.items() if weights[k].ndim >= 2}
        self.last_stats = stats
        gap = None if test_loss is None or train_loss is None else test_loss - train_loss
        snap = Snapshot(
            step=int(step),
            epoch=clean_float(epoch),
            mean_gsnr=stats.mean_gsnr,
            gsnr_median=stats.gsnr_quantiles.get("median"),
            gsnr_p90=stats.gsnr_quantiles.get("p90"),
            layer_gsnr=dict(stats.layer_gsnr),
            layer_same_sign=dict(stats.layer_same_sign),
            osgr=stats.osgr,
            mean_same_sign=stats.mean_same_sign,
            opposite_sign=stats.opposite_sign,
            opposite_sign_top10=stats.opposite_sign_top10,
            delta_g_weight_corr=corr,
            train_loss=clean_float(train_loss),
            test_loss=clean_float(test_loss),
            generalization_gap=clean_float(gap),
            train_accuracy=train_acc,
            test_accuracy=test_acc,
            elapsed=time.perf_counter() - self._start,
            undefined=stats.undefined,
            extra={k: clean_float(float(v)) for k, v in extra.items()},
            noise_scale=stats.noise_scale,
            layer_noise_scale=dict(stats.layer_noise_scale),
            m_coherence=stats.m_coherence,
            layer_m_coherence=dict(stats.layer_m_coherence),
            standard_errors=dict(stats.standard_errors),
            layer_log10_gsnr_hist=layer_log10_gsnr_histograms(stats.gsnr),
            osgr_se=clean_float(osgr_se),
        )
        self.trajectory.snapshots.append(snap)
        self.trajectory.fill_predictions()  # the test loss predicted from training data up to this snapshot
        if self.path is not None:
            if not self._header_written:
                self._append(header_line(self.trajectory.metadata))
                self._header_written = True
            elif self._resumed_until is not None and not self._resume_noted:
                self._append(metadata_line({"resumed_at_step": int(step)}))
                self._resume_noted = True
            self._append(snapshot_line(snap))
        if self.on_snapshot is not None:  # on_snapshot: the one call after each snapshot
            self.on_snapshot(snap)
        return snap


def _check_extra(extra: dict[str, Any]) -> None:
    """``record(**extra)`` values must be single numbers (a Python/numpy number or a one-element tensor/array)."""
    for k, v in extra.items():
        if not isinstance(v, (int, float, np.number, np.ndarray, torch.Tensor)):
            raise MonitorError(f"record({k}=...): expected a number, got a {type(v).__name__} ({v!r:.60})")
        size = v.numel() if isinstance(v, torch.Tensor) else getattr(v, "size", 1)
        if size != 1:
            raise MonitorError(
                f"record({k}=...): expected a single number, got a {type(v).__name__} of shape {tuple(v.shape)}; "
                f"pass one value, e.g. {k}=float(value[0])"
            )
