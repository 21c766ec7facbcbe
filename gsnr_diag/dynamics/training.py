"""train(): a small, honest training loop for experiments and the CLI.

* ``batch_size=None``: full-batch gradient descent, the paper's setting (Sec. 2.4, 3.2): one
  optimizer step per epoch on the gradient of the mean loss over the whole training set
  (accumulated over memory-sized chunks, weighted by chunk size, so it is exact).
* ``batch_size=k``: mini-batch SGD over a fresh random permutation each epoch, drawn from a
  ``torch.Generator`` seeded with ``seed`` (the global RNG is not touched by the shuffling, so
  two runs with the same seed see the same batch order).

The monitor records at step 0 (before any update), whenever its schedule says so, and at the
last step. A diverging run — a NaN/inf loss, or NaN/inf per-sample gradients at a snapshot after
step 0 — stops training with a :class:`NonFiniteLossWarning`, and the trajectory recorded so far is
kept (``metadata["stopped"]`` says why).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import torch
from torch import nn

from ..data import Inputs, call_model, check_reiterable, count_samples, iter_batches, tree_map
from ..errors import DataError, ModelError, NonFiniteGradientError
from ..measure import model_device
from ..validate import check_loss_fn, check_model, check_optimizer
from .monitor import Monitor
from .trajectory import Trajectory

__all__ = ["train", "NonFiniteLossWarning", "materialize", "Progress", "StderrProgress"]

FULL_BATCH_CHUNK = 4096

#: ``progress(done, total)``: called with 0 before the first update and after every optimizer update.
Progress = Callable[[int, int], None]


class NonFiniteLossWarning(RuntimeWarning):
    """Training stopped because the loss became NaN or infinite."""


class StderrProgress:
    """``train(progress=True)``: a text progress bar on stderr, redrawn in place on a terminal.

    Elsewhere (a log file, CI) it writes its label once, as click's progress bar does.
    """

    def __init__(self, label: str = "training", stream: TextIO | None = None, width: int = 30):
        self.label = label
        self.stream = stream
        self.width = width
        self._open = False
        self._drawn = 0.0

    def __call__(self, done: int, total: int) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        tty = bool(getattr(stream, "isatty", lambda: False)())
        if not self._open:
            self._open = True
            if not tty:
                stream.write(self.label + "\n")
                stream.flush()
        if not tty:
            return
        now = time.monotonic()
        if done < total and now - self._drawn < 0.1:
            return
        self._drawn = now
        filled = self.width * done // total if total else self.width
        stream.write(f"\r{self.label}  [{'#' * filled}{'-' * (self.width - filled)}]  {done}/{total}")
        stream.flush()

    def close(self) -> None:
        """End the bar's line (on a terminal)."""
        stream = self.stream if self.stream is not None else sys.stderr
        if self._open and getattr(stream, "isatty", lambda: False)():
            stream.write("\n")
            stream.flush()
        self._open = False


def _progress(progress: bool | Progress | None) -> Progress | None:
    if progress is None or progress is False:
        return None
    if progress is True:
        return StderrProgress()
    if callable(progress):
        return progress
    raise DataError(f"progress: expected a bool or a callable progress(done, total), got {type(progress).__name__}")


def _cat_inputs(parts: list[Inputs]) -> Inputs:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: _cat_inputs([p[k] for p in parts]) for k in first}
    return type(first)(_cat_inputs([p[i] for p in parts]) for i in range(len(first)))


def materialize(data: Any) -> tuple[Inputs, torch.Tensor]:
    """Gather any supported data form into one ``(X, Y)`` pair of in-memory tensors."""
    xs, ys = [], []
    with torch.random.fork_rng(devices=[]):  # a shuffling DataLoader would draw from the global RNG
        for x, y in iter_batches(data, None, None):
            xs.append(x)
            ys.append(y)
    if not ys:
        raise DataError("data: it yielded no samples")
    return _cat_inputs(xs), torch.cat(ys)


def _index(x: Inputs, idx: torch.Tensor) -> Inputs:
    return tree_map(lambda t: t[idx], x)


def _check_loss(loss: Any, step: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        from ..errors import LossError

        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise LossError(f"loss_fn: expected a scalar tensor (the batch mean), got {shape} at step {step}")
    return loss


def train(
    model: nn.Module,
    data: Any,
    loss_fn: Callable | None = None,
    *,
    epochs: int,
    lr: float,
    optimizer: torch.optim.Optimizer | None = None,
    batch_size: int | None = None,
    monitor: Monitor | None = None,
    test_data: Any = None,
    seed: int = 0,
    progress: bool | Progress = True,
    batch_sampler: Any = None,
) -> Trajectory | None:
    """Train ``model`` in place; return the monitor's trajectory (``None`` without a monitor).

    Args:
        model: any ``nn.Module``; bring your own initialization (e.g. the small N(0, 0.03²)
            init of the toy regression) and freeze parameters with ``requires_grad_(False)``.
        data: training data in any form :func:`~gsnr_diag.gradient_stats` accepts.
        loss_fn: ``loss_fn(output, target)`` → batch mean; default cross-entropy.
        epochs: passes over the data (with ``batch_size=None`` = gradient-descent steps).
        lr: learning rate of the default optimizer, plain ``torch.optim.SGD`` (no momentum).
        optimizer: your own optimizer over ``model``'s parameters (``lr`` is then only recorded).
        batch_size: ``None`` for full-batch gradient descent, else mini-batch SGD.
        monitor: a :class:`~gsnr_diag.monitor.Monitor` on ``model``; records at step 0, on its
            schedule (steps = optimizer updates) and after the last step. Scheduled snapshots
            carry ``extra["batch_loss"]``: the loss of the (mini-)batch of the update that led
            to this step, evaluated before that update.
        test_data: held-out data handed to the monitor when it has none.
        seed: seeds the batch shuffling (a private ``torch.Generator``).
        progress: ``True``: a text progress bar on stderr (:class:`StderrProgress`); ``False``: none;
            or a callable ``progress(done, total)`` (e.g. driving the CLI's click progress bar),
            called with 0 before the first update and after every optimizer update.
        batch_sampler: instead of ``batch_size``, an iterable of index lists into ``data``'s samples
            in dataset order — e.g. a ``DataLoader``'s ``batch_sampler``, so its batch size, sampler
            and ``drop_last`` are honoured. It is iterated afresh each epoch with torch's RNG seeded
            from ``seed`` and the epoch (restored afterwards), so two runs see the same batches.

    The model is left in the train/eval mode it came in.
    """
    check_model(model)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise DataError(f"epochs: expected a non-negative int, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise DataError(f"lr: expected a positive number, got {lr!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise DataError(f"batch_size: expected a positive int or None (full-batch GD), got {batch_size!r}")
    if monitor is not None and monitor.model is not model:
        raise ModelError("monitor: it watches a different model than the one being trained")
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    check_loss_fn(loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("model: it has no trainable parameters (every parameter has requires_grad=False)")
    if optimizer is None:
        optimizer = torch.optim.SGD(params, lr=lr)
    check_optimizer(optimizer, model)
    if batch_size is None:
        check_reiterable(data, "data", "full-batch training (batch_size=None) reads it at every step")
    if monitor is not None and monitor.test_data is None and test_data is not None:
        check_reiterable(test_data, "test_data", "the monitor evaluates it at every snapshot")
    device = model_device(model)

    if batch_sampler is not None and batch_size is not None:
        raise DataError("batch_sampler: pass either batch_size or batch_sampler, not both")
    full_batch = batch_size is None and batch_sampler is None
    epoch_batches = None
    if batch_sampler is not None:
        X, Y = materialize(data)
        X = tree_map(lambda t: t.to(device), X)
        Y = Y.to(device)
        n = int(Y.shape[0])
        epoch_batches = _sampled_batches(batch_sampler, seed, n, device)
        steps_per_epoch = len(epoch_batches(0))
    elif full_batch:
        n = count_samples(data)
        steps_per_epoch = 1
        X = Y = None
    else:
        X, Y = materialize(data)
        X = tree_map(lambda t: t.to(device), X)
        Y = Y.to(device)
        n = int(Y.shape[0])
        steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch

    if monitor is not None:
        if monitor.test_data is None and test_data is not None:
            monitor.test_data = test_data
            monitor.trajectory.metadata["n_test"] = count_samples(test_data)
        monitor.update_metadata(
            seed=seed,
            settings={
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size if batch_sampler is None else getattr(batch_sampler, "batch_size", None),
                "optimizer": type(optimizer).__name__,
                "algorithm": "full-batch GD"
                if full_batch
                else "mini-batch SGD" + (" (the DataLoader's batches)" if batch_sampler is not None else ""),
                "steps": total,
            },
        )
    generator = torch.Generator().manual_seed(seed)
    modes = [(m, m.training) for m in model.modules()]
    last_recorded = -1
    step = 0
    on_progress = _progress(progress)
    try:
        if monitor is not None:
            monitor.record(0, epoch=0.0)
            last_recorded = 0
        if on_progress is not None:
            on_progress(0, total)
        for epoch in range(epochs):
            if full_batch:
                batches = [None]
            elif epoch_batches is not None:
                batches = epoch_batches(epoch)
            else:
                perm = torch.randperm(n, generator=generator).to(device)
                batches = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
            for idx in batches:
                model.train()
                optimizer.zero_grad(set_to_none=True)
                if idx is None:
                    loss_value = _full_batch_backward(model, data, loss_fn, n, device, step)
                else:
                    loss = _check_loss(loss_fn(call_model(model, _index(X, idx)), Y[idx]), step)
                    loss_value = float(loss.detach())
                    if math.isfinite(loss_value):
                        loss.backward()
                if not math.isfinite(loss_value):
                    msg = (
                        f"training stopped: the loss is {loss_value} at step {step} (epoch {epoch}); "
                        f"lr={lr} may be too large. The trajectory recorded so far "
                        f"({len(monitor.trajectory) if monitor else 0} snapshot(s)) is kept."
                    )
                    warnings.warn(msg, NonFiniteLossWarning, stacklevel=2)
                    if monitor is not None:
                        monitor.update_metadata(stopped=msg)
                    return monitor.trajectory if monitor is not None else None
                optimizer.step()
                step += 1
                if on_progress is not None:
                    on_progress(step, total)
                if monitor is not None and monitor.should_record(step):
                    _restore_modes(modes)
                    if not _record_or_stop(monitor, step, lr, epoch=step / steps_per_epoch, batch_loss=loss_value):
                        return monitor.trajectory
                    last_recorded = step
        if monitor is not None and last_recorded != step:
            _restore_modes(modes)
            if not _record_or_stop(monitor, step, lr, epoch=step / steps_per_epoch):
                return monitor.trajectory
    finally:
        if isinstance(on_progress, StderrProgress):
            on_progress.close()
        _restore_modes(modes)
    return monitor.trajectory if monitor is not None else None


def _sampled_batches(batch_sampler: Any, seed: int, n: int, device: Any) -> Callable[[int], list[torch.Tensor]]:
    """``epoch -> index tensors`` drawn from ``batch_sampler`` under a seeded, restored torch RNG."""
    cache: dict[int, list[torch.Tensor]] = {}

    def draw(epoch: int) -> list[torch.Tensor]:
        if epoch not in cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + epoch)
                batches = [torch.as_tensor(list(b), dtype=torch.long) for b in batch_sampler]
            bad = [int(b.max()) for b in batches if b.numel() and (int(b.max()) >= n or int(b.min()) < 0)]
            if bad:
                raise DataError(f"batch_sampler: index {bad[0]} is outside the {n} training samples")
            if not batches:
                raise DataError("batch_sampler: it yielded no batches")
            cache.clear()
            cache[epoch] = [b.to(device) for b in batches]
        return cache[epoch]

    return draw


def _record_or_stop(monitor: Monitor, step: int, lr: float, **kw: Any) -> bool:
    """Record a snapshot; ``False`` (with a :class:`NonFiniteLossWarning`) when training has diverged.

    After step 0, per-sample gradients that are NaN/inf mean the run diverged (weights or activations
    overflowed, possibly while the loss was still finite): training stops as for a NaN/inf loss, keeping
    the trajectory recorded so far. At step 0 the same error is a problem of the data or the loss, raised.
    """
    try:
        monitor.record(step, **kw)
    except NonFiniteGradientError as exc:
        msg = (
            f"training stopped: the gradients at step {step} are NaN/inf, the run diverged; lr={lr} may be too "
            f"large. The trajectory recorded so far ({len(monitor.trajectory)} snapshot(s)) is kept. ({exc})"
        )
        warnings.warn(msg, NonFiniteLossWarning, stacklevel=3)
        monitor.update_metadata(stopped=msg)
        return False
    return True


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, flag in modes:
        m.training = flag


def _full_batch_backward(model: nn.Module, data: Any, loss_fn: Callable, n: int | None, device, step: int) -> float:
    """Accumulate ∇ of the mean loss over all of ``data`` into ``.grad``; return the mean loss.

    Chunks are weighted by their size so the result is the exact full-data gradient g_D (eq. 5).
    """
    if n is None:  # unknown size: count first (no gradient work)
        n = sum(int(y.shape[0]) for _, y in iter_batches(data, FULL_BATCH_CHUNK, None))
    if n == 0:
        raise DataError("data: it yielded no samples")
    total = 0.0
    for x, y in iter_batches(data, FULL_BATCH_CHUNK, device):
        b = int(y.shape[0])
        loss = _check_loss(loss_fn(call_model(model, x), y), step)
        value = float(loss.detach())
        total += value * b
        if not math.isfinite(value):
            return value
        (loss * (b / n)).backward()
    return total / n
