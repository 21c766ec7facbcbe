"""The forward hook of every measured module: keeps its inputs and catches the backprop of its output.

A module called on a batch of one (``[1, T]`` position ids) while the chunk holds B samples has its
output broadcast over the batch downstream: its output is watched by the
:class:`~gsnr_diag.capture.broadcast.BroadcastTracker`, which supplies the per-sample backprops
``[B, ...]``, and its inputs are expanded to ``[B, ...]`` (every sample sees the same input).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .broadcast import Source
from .registry import OUTPUT_BATCHED


@dataclass
class _Call:
    activations: list
    backprops: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)
    source: Source | None = None  # set when the output is broadcast over the batch
    output: torch.Tensor | None = None  # kept when the module's batch weight gradient is not asked for
    inner: object = None  # what the rule's ``inner`` hook caught inside the module's forward (attention)


@dataclass
class _ModuleInfo:
    name: str
    module: nn.Module
    params: list[str]  # trainable parameter names owned directly by this module
    calls: list[_Call] = field(default_factory=list)
    problem: str | None = None
    probe: list = field(default_factory=list)  # first inputs seen during the layout probe
    first_output: bool = False  # the module returns a tuple whose first element is measured (attention)
    broadcast: bool = False  # the layout probe saw it run on a batch of one (its output is broadcast)
    to_batch_first: Callable | None = None  # (module, args) → (args as [B, ...], backprop transform or None)
    inner: Callable | None = None  # (module, args, output) → what it catches inside the forward, for the rule


def _detach_all(args, seen: dict) -> list:
    """Detached inputs; the same tensor passed twice (self-attention) stays one tensor."""
    return [seen.setdefault(id(a), a.detach()) if isinstance(a, torch.Tensor) else a for a in args]


def _batch_of_one(t) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == 1


def make_hook(cap, info: _ModuleInfo):
    """``hook(module, args, kwargs, output)`` for ``register_forward_hook(..., with_kwargs=True)``.

    ``cap`` is the :class:`~gsnr_diag.capture.capture.GradientCapture` (its ``_probing``,
    ``_enabled``, ``_batch`` and ``_tracker`` flags say what the current forward pass is for).
    """

    def hook(module, args, kwargs, output):
        out = output
        if info.first_output and isinstance(output, (tuple, list)) and output:
            out = output[0]
        post = None
        if info.to_batch_first is not None:
            args, post = info.to_batch_first(module, args)
        if cap._probing:  # the rows that hold the samples: the input's, or the output's
            a0 = out if type(module) in OUTPUT_BATCHED else (args[0] if args else None)
            info.probe.append(a0.detach().clone() if isinstance(a0, torch.Tensor) else None)
            return
        tracker = cap._tracker
        if not cap._enabled:
            if tracker is not None and cap._batch > 1 and _batch_of_one(out) and args and _batch_of_one(args[0]):
                tracker.watch(out, cap._probe_source(info.name, tuple(out.shape)))
            return
        if not isinstance(out, torch.Tensor):
            info.problem = f"returns a {type(output).__name__}, not a tensor"
            return
        if not out.requires_grad:
            return
        seen: dict = {}
        call = _Call(_detach_all(args, seen), kwargs=dict(zip(kwargs, _detach_all(kwargs.values(), seen))))
        info.calls.append(call)
        batch = cap._batch
        if batch > 1 and _batch_of_one(out) and args and _batch_of_one(args[0]):
            if tracker is None:
                info.problem = "it runs on a batch of one whose output is broadcast over the samples"
                return
            call.source = Source(tuple(out.shape), drop_leading=True)
            call.activations = [a.expand(batch, *a.shape[1:]) if _batch_of_one(a) else a for a in call.activations]
            tracker.watch(out, call.source)
            return

        def catch(grad, call=call):
            call.backprops = grad.detach() if post is None else post(grad.detach())

        out.register_hook(catch)
        if info.inner is not None:
            call.inner = info.inner(module, args, out)
        if info.name in cap._skip_batch_grad:
            call.output = out  # autograd is asked for this output's gradient instead of the weights'

    return hook


def resolve_broadcast_calls(infos) -> None:
    """After the backward pass: the backprops of broadcast calls from their tracked uses (or a problem)."""
    for info in infos:
        for c in info.calls:
            if c.source is None:
                continue
            if c.source.problem:
                info.problem = c.source.problem
            else:
                c.backprops = c.source.total()


def release_outputs(infos) -> None:
    """Drop the calls' references to their outputs once autograd has been asked about them.

    output → its backprop hook → call → output is a cycle that Python's collector does not break through a
    tensor: it would keep the chunk's whole autograd graph (every saved activation) alive after the chunk.
    """
    for info in infos:
        for c in info.calls:
            c.output = None
