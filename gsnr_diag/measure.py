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
from .capture.losses import LossPlan
from .capture.online import paused as online_paused
from .capture.state import ModelState
from .core.moments import Moments, all_reduce_moments
from .core.stats import GradientStats, stats_from_moments
from .core.uncertainty import jackknife_standard_errors
from .data import count_samples, iter_batches, tree_map
from .errors import ArgumentError, DataError, ModelError
from .validate import check_device, check_distributed, check_epsilon, check_loss_fn, check_max_memory_mb, check_model

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
    jackknife_groups: int = 0,
    jackknife_by_chunk: bool = False,
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
        jackknife_groups: G ≥ 2 deals the samples of every chunk into G groups (contiguous slices) with
            moments of their own and fills ``standard_errors`` with delete-a-group jackknife standard
            errors (core/uncertainty.py); costs G more accumulators and G smaller captures per chunk.
            0 (default): off.
        jackknife_by_chunk: deal whole chunks round-robin to the G groups instead of slicing every chunk
            (cheaper: no smaller captures; needs at least G chunks, see :func:`gradient_stats_with_se`).
    """
    check_model(model)
    if mode not in MODES:
        raise ModelError(f"mode: expected 'eval' or 'train', got {mode!r}")
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss()
    check_loss_fn(loss_fn)
    check_max_memory_mb(max_memory_mb)
    check_epsilon(epsilon)
    check_distributed(distributed, process_group)
    checked = check_device(device)
    _check_jackknife_groups(jackknife_groups)

    home = model_device(model)
    target = checked if checked is not None else home
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    work = model
    if target != home:
        work = copy.deepcopy(model).to(target)

    # Every parameter and buffer as it is now: a forward may change them (Embedding max_norm, spectral norm,
    # running statistics, counters); they are put back after every chunk, so each chunk sees the same model.
    state = ModelState(work)
    with preserved_state(model):
        try:
            work.train(mode == "train")
            if mode == "train":
                _check_train_mode(work)
            moments = Moments(signs=signs)
            groups = [Moments(signs=signs) for _ in range(jackknife_groups)]  # jackknife_groups: G accumulators
            plan = LossPlan(loss_fn)  # per-sample losses of weighted, ignore_index and sum losses
            with (
                torch.enable_grad(),
                online_paused(),
                GradientCapture(
                    work, plan, signs=signs, skip_nonfinite=skip_nonfinite, max_memory_mb=max_memory_mb
                ) as capture,
            ):
                for i, (x, y) in enumerate(iter_batches(data, batch_size, target)):
                    x, y = plan.select(x, y)
                    if y.shape[0]:
                        whole = i if jackknife_by_chunk else None
                        _measure_chunk(capture, x, y, moments, groups, state.restore, whole)
                for g in groups:  # jackknife_groups: the totals are the merge of the groups
                    moments.merge(g)
        finally:
            state.restore(compare=True)
        if distributed:
            all_reduce_moments(moments, group=process_group)
            for g in groups:
                all_reduce_moments(g, group=process_group)
        n = moments.n
        if n < 2:
            raise DataError(
                f"data: {n} usable sample(s); the per-sample variance ρ² needs at least 2"
                + (f" ({capture.skipped} skipped for non-finite gradients)" if capture.skipped else "")
                + (f" ({plan.excluded} excluded: every target ignored)" if plan.excluded else "")
            )
        plan.finish(moments, skipped=capture.skipped, distributed=distributed, group=process_group)
        weights = {k: p.detach() for k, p in capture.params.items()}
        stats = stats_from_moments(
            moments,
            weights,
            capture_paths=dict(capture.paths),
            epsilon=epsilon,
            mode=mode,
            skipped_nonfinite=capture.skipped,
        )
        if groups:
            stats.standard_errors = jackknife_standard_errors(groups, weights, epsilon=epsilon, mode=mode)
            stats.jackknife_groups = len(groups)
        return stats


# ----------------------------------------------------------------------------- jackknife groups
def _check_jackknife_groups(groups: Any) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0 or groups == 1:
        raise ArgumentError(f"jackknife_groups: expected 0 (off) or an int ≥ 2, got {groups!r}")


def _measure_chunk(
    capture: GradientCapture,
    x: Any,
    y: torch.Tensor,
    moments: Moments,
    groups: list[Moments],
    after: Callable[[], Any] | None = None,
    whole: int | None = None,
) -> None:
    """Moments of one chunk into ``moments``, or, with jackknife groups, its G contiguous slices into the groups.

    ``after`` is called after each capture (e.g. to restore a model state a forward changed). Every
    statistic that gets a standard error (GSNR, same-sign, OSGR, noise scale, m-coherence) is invariant
    to a common scale of the gradients, so groups need no loss-weight rescaling of their own.
    """
    if not groups or whole is not None:  # no groups, or whole chunks dealt round-robin to the groups
        capture.measure_chunk(x, y, groups[whole % len(groups)] if groups else moments)
        if after is not None:
            after()
        return
    batch = int(y.shape[0])
    bounds = [round(i * batch / len(groups)) for i in range(len(groups) + 1)]
    for g, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if hi > lo:
            capture.measure_chunk(tree_map(lambda t: t[lo:hi], x), y[lo:hi], groups[g])
            if after is not None:
                after()


def gradient_stats_with_se(
    model: nn.Module, data: Any, loss_fn: Callable | None = None, *, folds: int = 8, **kw: Any
) -> tuple[GradientStats, float | None]:
    """:func:`gradient_stats` plus the delete-one-fold jackknife standard error of its OSGR (eq. 19).

    Chunks of at most ⌈n/folds⌉ samples are dealt round-robin to ``folds`` groups (so every fold gets
    some) whose moments are kept apart and merged for the statistics; the SE is that of
    ``standard_errors["osgr"]`` (core/uncertainty.py). ``None`` with fewer than 3 folds.
    """
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 1:
        raise ArgumentError(f"folds: expected a positive int, got {folds!r}")
    if kw.get("distributed"):
        raise ArgumentError("gradient_stats_with_se: distributed=True is not supported; use gradient_stats")
    if folds < 2:
        return gradient_stats(model, data, loss_fn, **kw), None
    total = count_samples(data)
    batch_size = kw.pop("batch_size", None)
    chunk = max(1, -(-total // folds)) if total else batch_size
    if batch_size is not None and chunk is not None:
        chunk = min(batch_size, chunk)
    stats = gradient_stats(
        model, data, loss_fn, batch_size=chunk, jackknife_groups=folds, jackknife_by_chunk=True, **kw
    )
    return stats, (stats.standard_errors.get("osgr") if folds >= 3 else None)
