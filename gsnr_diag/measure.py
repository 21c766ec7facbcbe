"""gradient_stats(): data → capture → moments → GradientStats, leaving the model as it was."""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .capture import GradientCapture
from .core.moments import Moments, all_reduce_moments
from .core.stats import GradientStats, stats_from_moments
from .core.uncertainty import jackknife_osgr
from .data import count_samples, iter_batches
from .errors import DataError, ModelError

__all__ = ["gradient_stats", "gradient_stats_with_se", "preserved_state", "model_device"]

MODES = ("eval", "train")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag and the global RNG states (torch, CUDA, numpy, random)."""
    modes = [(m, m.training) for m in model.modules()]
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            yield
        finally:
            for m, flag in modes:
                m.training = flag
            random.setstate(py_state)
            np.random.set_state(np_state)


def _check_train_mode(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ModelError(
                f"mode='train': module {name or type(m).__name__!r} ({type(m).__name__}) normalizes with "
                "batch statistics in train mode, which mixes samples, so per-sample gradients are undefined. "
                "Measure with mode='eval' (running statistics, the paper's setting) instead"
            )


def gradient_stats(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    mode: str = "eval",
    signs: bool = True,
    epsilon: float = 0.0,
    skip_nonfinite: bool = False,
    distributed: bool = False,
    process_group: Any = None,
    max_memory_mb: float | None = None,
) -> GradientStats:
    """Measure per-parameter gradient statistics of ``model`` on ``data`` at the current weights.

    Computes ḡ (eq. 5), ρ² (eq. 2), GSNR r = ḡ²/ρ² (eq. 2/25), the same-sign fraction
    (Sec. 3.1), the single-set OSGR (eq. 19/22) and the opposite-sign fractions (Sec. 3.3)
    in one streaming pass over ``data``; see shared/SCIENCE.md for every definition.

    Args:
        model: any ``nn.Module``; only parameters with ``requires_grad`` are measured, keyed
            by their names in ``model.named_parameters()``. It is left exactly as it was.
        data: a DataLoader, a Dataset of ``(x, y)`` pairs, a tuple ``(X, Y)`` of tensors or an
            iterable of ``(x, y)`` batches; ``x`` may be a tensor, a tuple or a dict of tensors.
        loss_fn: ``loss_fn(output, target)`` returning the batch *mean* of per-sample losses;
            default ``nn.CrossEntropyLoss()``.
        batch_size: samples captured at once (the memory bound); the data is re-chunked to it.
        device: measure on this device (a copy of the model is moved there); default the
            model's device.
        mode: ``"eval"`` (default: running BatchNorm statistics, no dropout) or ``"train"``.
        signs: also count per-element signs for ``same_sign`` (a little slower).
        epsilon: added to ρ² in the GSNR denominator; 0 (none) by default.
        skip_nonfinite: skip samples with NaN/inf gradients (counted in ``skipped_nonfinite``)
            instead of raising :class:`~gsnr_diag.errors.NonFiniteGradientError`.
        distributed: all-reduce the moments over ``torch.distributed`` ranks, so every rank
            gets the statistics of the union of the shards.
        max_memory_mb: bound on the extra memory of the blocks materialized while reducing a
            chunk (per-sample gradients, unfolded convolution inputs): each layer is processed
            in blocks of samples sized to fit. Default 512 MB. It does not bound the forward and
            backward pass of a chunk itself (set ``batch_size`` for that).
    """
    return _measure(
        model,
        data,
        loss_fn,
        batch_size=batch_size,
        device=device,
        mode=mode,
        signs=signs,
        epsilon=epsilon,
        skip_nonfinite=skip_nonfinite,
        distributed=distributed,
        process_group=process_group,
        max_memory_mb=max_memory_mb,
    )[0]


def gradient_stats_with_se(
    model: nn.Module, data: Any, loss_fn: Callable | None = None, *, folds: int = 8, **kw: Any
) -> tuple[GradientStats, float | None]:
    """:func:`gradient_stats` plus the jackknife standard error of its OSGR over ``folds`` folds.

    The chunks of samples are assigned round-robin to ``folds`` accumulators (chunks at most
    ⌈n/folds⌉ samples, so every fold gets some), merged for the statistics — identical to
    :func:`gradient_stats` up to float rounding — and kept apart for the delete-one-fold jackknife
    of :func:`gsnr_diag.core.uncertainty.jackknife_osgr`. The SE is ``None`` with fewer than 3 folds.
    """
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 1:
        raise ModelError(f"folds: expected a positive int, got {folds!r}")
    if kw.get("distributed"):
        raise ModelError("gradient_stats_with_se: distributed=True is not supported; use gradient_stats")
    stats, parts = _measure(model, data, loss_fn, folds=folds, **kw)
    return stats, jackknife_osgr(parts)[1] if len(parts) >= 3 else None


def _measure(
    model: nn.Module,
    data: Any,
    loss_fn: Callable | None = None,
    *,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    mode: str = "eval",
    signs: bool = True,
    epsilon: float = 0.0,
    skip_nonfinite: bool = False,
    distributed: bool = False,
    process_group: Any = None,
    max_memory_mb: float | None = None,
    folds: int = 1,
) -> tuple[GradientStats, list[Moments]]:
    if not isinstance(model, nn.Module):
        raise ModelError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ModelError(f"mode: expected 'eval' or 'train', got {mode!r}")
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss()
    if not callable(loss_fn):
        raise ModelError(f"loss_fn: expected a callable loss_fn(output, target), got {type(loss_fn).__name__}")
    if max_memory_mb is not None and not (isinstance(max_memory_mb, (int, float)) and max_memory_mb > 0):
        raise ModelError(f"max_memory_mb: expected a positive number of megabytes, got {max_memory_mb!r}")
    if epsilon < 0:
        raise ModelError(f"epsilon: expected a non-negative number, got {epsilon!r}")

    home = model_device(model)
    target = torch.device(device) if device is not None else home
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    work = model
    if target != home:
        work = copy.deepcopy(model).to(target)

    with preserved_state(model):
        work.train(mode == "train")
        if mode == "train":
            _check_train_mode(work)
        moments = Moments(signs=signs)
        parts = [Moments(signs=signs) for _ in range(folds)] if folds > 1 else [moments]
        chunk = batch_size
        total = count_samples(data) if folds > 1 else None
        if total:
            chunk = min(batch_size or total, max(1, -(-total // folds)))
        with (
            torch.enable_grad(),
            GradientCapture(
                work, loss_fn, signs=signs, skip_nonfinite=skip_nonfinite, max_memory_mb=max_memory_mb
            ) as capture,
        ):
            for i, (x, y) in enumerate(iter_batches(data, chunk, target)):
                capture.measure_chunk(x, y, parts[i % len(parts)])
        if folds > 1:
            for part in parts:
                moments.merge(part)
            parts = [p for p in parts if p.n > 0]
        if distributed:
            all_reduce_moments(moments, group=process_group)
        n = moments.n
        if n < 2:
            raise DataError(
                f"data: {n} usable sample(s); the per-sample variance ρ² needs at least 2"
                + (f" ({capture.skipped} skipped for non-finite gradients)" if capture.skipped else "")
            )
        weights = {k: p.detach() for k, p in capture.params.items()}
        stats = stats_from_moments(
            moments,
            weights,
            capture_paths=dict(capture.paths),
            epsilon=epsilon,
            mode=mode,
            skipped_nonfinite=capture.skipped,
        )
        return stats, parts
