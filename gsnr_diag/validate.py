"""Checks of the setting arguments shared by the entry points (gradient_stats, Monitor, train, the experiments).

Each check raises a :class:`~gsnr_diag.errors.GsnrDiagError` subclass whose message names the argument,
says what is wrong with the value and what to pass instead, before any work is done — instead of the
bare torch or Python error the value would cause deep inside a measurement (an ``AssertionError`` from
a CPU-only torch, ``NotImplementedError`` from meta tensors, a ``ValueError`` from a NaN block size, ...).
The checks of the ``data`` argument itself are in :mod:`gsnr_diag.data`, where the data forms are known.
"""

from __future__ import annotations

import math
import numbers
from itertools import chain
from typing import Any

import torch
from torch import nn

from .errors import ArgumentError, LossError, ModelError

__all__ = [
    "check_device",
    "check_distributed",
    "check_epsilon",
    "check_loss_fn",
    "check_max_memory_mb",
    "check_model",
    "check_optimizer",
]


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _hint(value: Any) -> str:
    if isinstance(value, str):
        return " (a str: pass a number, not its text)"
    if isinstance(value, torch.Tensor):
        return " (a tensor: pass a Python float, e.g. float(t))"
    return ""


def check_device(device: Any, what: str = "device") -> torch.device | None:
    """``device`` as a :class:`torch.device` this process can use (``None`` stays ``None``)."""
    if device is None:
        return None
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ArgumentError(
            f"{what}={device!r}: not a torch device ({exc}); pass e.g. 'cpu', 'cuda', 'cuda:1' or 'mps', "
            "or None for the model's own device"
        ) from None
    instead = "pass device='cpu', or None to measure on the model's own device"
    if target.type == "meta":
        raise ArgumentError(
            f"{what}={device!r}: meta tensors hold no values, so there is nothing to measure; {instead}"
        )
    if target.type == "cuda":
        if not torch.cuda.is_available():
            if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
                why = f"this PyTorch build ({torch.__version__}) has no CUDA support"
            else:
                why = "no CUDA GPU is visible (torch.cuda.is_available() is False; check the driver)"
            raise ArgumentError(f"{what}={device!r}: {why}; {instead}")
        count = torch.cuda.device_count()
        if target.index is not None and target.index >= count:
            raise ArgumentError(
                f"{what}={device!r}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1}); "
                "pass one of them"
            )
        return target
    if target.type == "mps":
        if not torch.backends.mps.is_available():
            raise ArgumentError(f"{what}={device!r}: the MPS backend (Apple GPU) is not available here; {instead}")
        return target
    if target.type != "cpu":
        try:
            torch.empty(0, device=target)
        except Exception as exc:  # any backend that cannot hold a tensor here
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ArgumentError(f"{what}={device!r}: this PyTorch cannot use it ({first}); {instead}") from None
    return target


def check_model(model: Any, what: str = "model", error: type[Exception] = ModelError) -> None:
    """An ``nn.Module`` whose parameters and buffers hold values (none on the meta device)."""
    if not isinstance(model, nn.Module):
        raise error(f"{what}: expected a torch.nn.Module, got {type(model).__name__}")
    named = chain(model.named_parameters(), model.named_buffers())
    meta = next((name for name, t in named if t.is_meta), None)
    if meta is not None:
        raise error(
            f"{what}: its tensors are on the meta device ({meta!r} and maybe more): shapes without values, as "
            "built under `with torch.device('meta')` or by an init_empty_weights helper, so there are no "
            "gradients to measure. Materialize it first, e.g. model.to_empty(device='cpu') and then "
            "model.load_state_dict(...) or your initialization"
        )


def check_loss_fn(loss_fn: Any, what: str = "loss_fn") -> None:
    """A callable ``loss_fn(output, target)``; the loss class itself (``nn.CrossEntropyLoss``) is refused."""
    if isinstance(loss_fn, type):
        name = loss_fn.__name__
        prefix = "nn." if loss_fn.__module__.startswith("torch.nn") else ""
        raise LossError(
            f"{what}: got the class {prefix}{name}, not a loss function; pass an instance: "
            f"{what}={prefix}{name}() (with its arguments, if any)"
        )
    if not callable(loss_fn):
        raise LossError(
            f"{what}: expected a callable loss_fn(output, target) returning the batch mean, "
            f"e.g. nn.CrossEntropyLoss(); got {type(loss_fn).__name__}"
        )


def check_max_memory_mb(value: Any, what: str = "max_memory_mb") -> None:
    """``None`` (the default bound) or a finite positive number of megabytes."""
    if value is None:
        return
    if not (_real(value) and math.isfinite(value) and value > 0):
        raise ArgumentError(
            f"{what}: expected a finite positive number of megabytes (e.g. 512), or None for the default; "
            f"got {value!r}{_hint(value)}"
        )


def check_epsilon(value: Any, what: str = "epsilon") -> None:
    """A finite number ≥ 0 (added to ρ² in the GSNR denominator)."""
    if not (_real(value) and math.isfinite(value) and value >= 0):
        raise ArgumentError(
            f"{what}: expected a finite number >= 0 added to the gradient variance rho^2 (0 = none, e.g. 1e-8); "
            f"got {value!r}{_hint(value)}"
        )


def check_distributed(distributed: Any, process_group: Any = None) -> None:
    """``distributed=True`` needs an initialized process group; a group without it is refused, not ignored."""
    if not isinstance(distributed, bool):
        raise ArgumentError(f"distributed: expected True or False, got {distributed!r}")
    if not distributed:
        if process_group is not None:
            raise ArgumentError(
                "process_group: given with distributed=False, so nothing would be reduced over it; "
                "pass distributed=True to all-reduce the moments over that group"
            )
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise ArgumentError(
            f"distributed=True: this PyTorch build ({torch.__version__}) has no torch.distributed; "
            "pass distributed=False to measure this process's data alone"
        )
    if not dist.is_initialized():
        raise ArgumentError(
            "distributed=True: no process group is initialized; call torch.distributed.init_process_group(...) "
            "in every rank first (e.g. run under torchrun), or pass distributed=False to measure this process's "
            "data alone"
        )


def check_optimizer(optimizer: Any, model: nn.Module, what: str = "optimizer") -> None:
    """A ``torch.optim.Optimizer`` that updates at least one of ``model``'s trainable parameters."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentError(
            f"{what}: expected a torch.optim.Optimizer over the model's parameters, e.g. "
            f"torch.optim.SGD(model.parameters(), lr=0.1); got {type(optimizer).__name__}"
        )
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable and not any(id(p) in owned for p in trainable):
        raise ArgumentError(
            f"{what}: it updates none of the model's {len(trainable)} trainable parameter tensor(s); its "
            f"{len(owned)} tensor(s) belong to another model (was the model built twice, once for the optimizer "
            "and once for training?). Build it over this model: torch.optim.SGD(model.parameters(), lr=...)"
        )
