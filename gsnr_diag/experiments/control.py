"""The shuffled-label control (Sec. 3.1, Fig. 5): real vs corrupted labels from one initialization.

Both runs start from the same weights, see the same batch order and are measured on their own
training set; only real labels should show the early rise of mean GSNR. The per-snapshot ratio
mean GSNR(real) / mean GSNR(shuffled) is the control's verdict, graded against
``VERDICT_THRESHOLDS["control_ratio"]`` (:func:`~gsnr_diag.experiments.results.control_verdict`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..dynamics.training import materialize
from ..errors import DataError, ModelError
from .monitored import MONITOR_KEYS, MakeOptimizer, OnSnapshot, monitored_run
from .results import ControlResult, control_verdict, gsnr_ratio

__all__ = [
    "ControlResult",
    "shuffled_label_control",
    "corrupt_labels",
    "gsnr_ratio",
    "control_verdict",
    "build_seeded",
    "partial_control",
    "check_classification",
]


def corrupt_labels(y: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The paper's p_random: ``fraction`` = 1 → a random permutation of all labels; otherwise a
    random ``round(fraction·n)`` of the labels are replaced by uniformly random classes."""
    if not (0 < fraction <= 1):
        raise DataError(f"label_noise: expected a fraction in (0, 1], got {fraction!r}")
    n = int(y.shape[0])
    if fraction == 1:
        return y[torch.randperm(n, generator=generator)].clone()
    k = int(round(fraction * n))
    idx = torch.randperm(n, generator=generator)[:k]
    classes = int(y.max()) + 1
    out = y.clone()
    out[idx] = torch.randint(0, classes, (k,), generator=generator, dtype=y.dtype)
    return out


def check_classification(y: torch.Tensor, what: str) -> None:
    """Raise :class:`~gsnr_diag.errors.DataError` unless ``y`` holds integer class labels (1-D)."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim != 1:
        raise DataError(
            f"{what} is for classification only: expected 1-D integer class labels, got a {y.dtype} target "
            f"of shape {tuple(y.shape)}. Shuffling regression targets is not a label-noise control."
        )


def build_seeded(build_model: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build_model()`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    if not callable(build_model):
        raise ModelError(f"build_model: expected a callable returning an nn.Module, got {type(build_model).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model()
    if not isinstance(model, nn.Module):
        raise ModelError(f"build_model() returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def partial_control(real: Any, shuffled: Any, label_noise: float) -> dict[str, Any]:
    """The control while (or after) its shuffled-label run was cut short, as a run-JSON dict.

    The ratio and verdict cover the steps both runs reached; ``"partial": True`` marks it, and the
    verdict says how far the shuffled run got, so a report never presents it as a finished control.
    """
    result = ControlResult.from_runs(real, shuffled, label_noise)
    reached = max(shuffled.steps, default=None)
    planned = max(real.steps, default=None)
    d = result.to_dict()
    d["partial"] = True
    d["verdict"] = f"partial control (the shuffled-label run reached step {reached} of {planned}): " + d["verdict"]
    return d


def shuffled_label_control(
    build_model: Callable[[], nn.Module] | nn.Module,
    data: Any,
    loss_fn: Callable | None = None,
    *,
    epochs: int,
    lr: float,
    label_noise: float = 1.0,
    seed: int = 0,
    test_data: Any = None,
    make_optimizer: MakeOptimizer | None = None,
    on_snapshot: OnSnapshot | None = None,
    **train_kw: Any,
) -> ControlResult:
    """Train the same initial weights on real and on corrupted labels and compare mean GSNR (Fig. 5).

    Args:
        build_model: ``() -> nn.Module``, called once under ``torch.manual_seed(seed)``; or an
            ``nn.Module``, trained in place on the real labels. The shuffled run trains a deep copy
            of the same initial weights.
        data: classification training data (integer labels), any supported form.
        label_noise: the paper's p_random; 1.0 = a random permutation of all labels.
        seed: seeds the initialization, the label corruption and the batch order (the same
            batch order for both runs).
        test_data: shared held-out data (real labels) for both monitors.
        make_optimizer: ``make_optimizer(params)`` → optimizer, called once per run with that run's
            trainable parameters; default plain SGD at ``lr``.
        on_snapshot: ``on_snapshot(label, snapshot, monitor)`` after every snapshot, ``label`` being
            ``"real"`` or ``"shuffled"`` (e.g. to save progress as it goes).
        train_kw: ``batch_size`` (or ``batch_sampler``) and ``progress`` go to
            :func:`~gsnr_diag.dynamics.training.train`; ``every``, ``signs``, ``mode`` and
            ``monitor_batch_size`` (the measurement chunk) to the :class:`~gsnr_diag.dynamics.monitor.Monitor`s.
    """
    X, Y = materialize(data)
    check_classification(Y, "shuffled_label_control")
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    if isinstance(loss_fn, (nn.MSELoss, nn.L1Loss)):
        raise DataError("shuffled_label_control is for classification only; got a regression loss")
    unknown = set(train_kw) - set(MONITOR_KEYS) - {"batch_size", "batch_sampler", "progress"}
    if unknown:
        raise ModelError(f"shuffled_label_control: unknown keyword(s) {sorted(unknown)}")
    monitor_kw = {k: train_kw.pop(k) for k in MONITOR_KEYS if k in train_kw}
    Y_bad = corrupt_labels(Y, label_noise, torch.Generator().manual_seed(seed + 1))

    model = build_model if isinstance(build_model, nn.Module) else build_seeded(build_model, seed)
    twin = copy.deepcopy(model)
    runs = {}
    for label, m, y in (("real", model, Y), ("shuffled", twin, Y_bad)):
        monitor = monitored_run(
            m,
            (X, y),
            loss_fn,
            label=label,
            epochs=epochs,
            lr=lr,
            seed=seed,
            test_data=test_data,
            task="classification",
            metadata={"settings": {"label_noise": label_noise if label != "real" else 0.0}},
            make_optimizer=make_optimizer,
            on_snapshot=on_snapshot,
            monitor_kw=monitor_kw,
            **train_kw,
        )
        runs[label] = monitor.trajectory
    return ControlResult.from_runs(runs["real"], runs["shuffled"], label_noise)
