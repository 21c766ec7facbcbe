"""Operands broadcast over the batch: per-sample gradients from the backprop of the broadcast result.

A tensor ``s`` with no batch dimension (an ``nn.Parameter`` such as a position embedding or a CLS
token, or the ``[1, T, D]`` output of a layer called on ``[1, T]`` position ids) enters the loss of
every sample through a broadcasting op ``r = x + s`` (``x − s``, ``x · s``, ``s.expand(B, ...)``) whose
result ``r`` is ``[B, ...]`` with sample i in row i. Sample i's gradient of ``s`` is then the backprop
of row i of ``r``, summed over the dimensions along which ``s`` was broadcast (times the other
factor for a product) — eq. 1 for one sample, without a per-sample forward pass.

:class:`BroadcastTracker` is a ``TorchFunctionMode`` active during the hooked forward pass: it sees
every torch call that takes a watched tensor, follows it through value-preserving calls (``.to``,
``.contiguous``), catches the backprop of every broadcast result, and marks the tensor as a problem
when anything else uses it (then its parameters go to the fallback). A watched weight or bias of
``F.linear(x, W, b)`` (a custom module calling it on its own parameters) is recorded with its input
and output backprop and measured by the nn.Linear moment rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
_ADD = {_T.__add__, _T.__radd__, _T.add, torch.add, _T.__iadd__}
_SUB = {_T.__sub__, _T.sub, torch.sub}
_RSUB = {_T.__rsub__, torch.rsub}
_MUL = {_T.__mul__, _T.__rmul__, _T.mul, torch.mul}
_EXPAND = {_T.expand, _T.expand_as, _T.broadcast_to, torch.broadcast_to}
_ALIAS = {_T.to, _T.contiguous, _T.type_as, _T.float, _T.double, _T.half, _T.bfloat16}
_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear}


@dataclass
class LinearUse:
    """One ``F.linear(x, weight, bias)`` call on watched tensors: x ``[B, ..., in]`` and the output's backprop."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    backprops: torch.Tensor | None = None


@dataclass
class Source:
    """A watched tensor of shape ``shape`` (no batch dimension, or a leading 1 when ``drop_leading``).

    ``parts``: per-sample gradients ``[B, *shape]`` (``[B, *shape[1:]]`` with ``drop_leading``), one per
    broadcast use; ``problem``: why the per-sample gradient cannot be formed this way.
    """

    shape: tuple
    drop_leading: bool = False
    parts: list = field(default_factory=list)
    problem: str | None = None
    uses: int = 0
    others: list = field(default_factory=list)  # the probe's record of the other operand of each use
    linear: list = field(default_factory=list)  # LinearUse of each F.linear call that takes it as weight or bias

    def total(self) -> torch.Tensor | None:
        """Σ over uses of the per-sample gradients (``None`` when no broadcast use was seen)."""
        if not self.parts:
            return None
        out = self.parts[0]
        for p in self.parts[1:]:
            out = out + p
        return out


def aligned(shape: tuple, full: tuple) -> bool:
    """Whether ``shape`` broadcasts to ``full`` with dimension 0 (the samples) broadcast."""
    if len(shape) > len(full) or len(full) == 0:
        return False
    padded = (1,) * (len(full) - len(shape)) + tuple(shape)
    return padded[0] == 1 and all(s in (1, f) for s, f in zip(padded[1:], full[1:]))


def reduce_broadcast(grad: torch.Tensor, shape: tuple, drop_leading: bool) -> torch.Tensor | None:
    """Per-sample backprop of a tensor of ``shape`` broadcast to ``grad``'s ``[B, ...]``; ``None`` if not so."""
    full = tuple(grad.shape)
    if not aligned(shape, full):
        return None
    padded = (1,) * (len(full) - len(shape)) + tuple(shape)
    dims = [j for j in range(1, len(full)) if padded[j] == 1 and full[j] != 1]
    g = grad.sum(dims, keepdim=True) if dims else grad
    B = int(full[0])
    return g.reshape(B, *shape[1:]) if drop_leading else g.reshape(B, *shape)


class BroadcastTracker(TorchFunctionMode):
    """Follows watched tensors through one forward pass (see the module docstring)."""

    def __init__(self, batch: int, record_others: bool = False, functional_linear: bool = True):
        super().__init__()
        self.batch = batch
        self.record_others = record_others
        self.functional_linear = functional_linear  # F.linear on watched tensors measured by the Linear rule
        self._watched: dict[int, tuple[torch.Tensor, Source]] = {}

    def watch(self, t: torch.Tensor, source: Source) -> None:
        self._watched[id(t)] = (t, source)

    def _source_of(self, a) -> Source | None:
        if isinstance(a, torch.Tensor):
            hit = self._watched.get(id(a))
            if hit is not None and hit[0] is a:
                return hit[1]
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._watched:
            return out
        flat = list(args) + list(kwargs.values())
        for a in list(flat):
            if isinstance(a, (list, tuple)):
                flat.extend(a)
        hits = [(i, a, s) for i, a in enumerate(flat) if (s := self._source_of(a)) is not None]
        if not hits or not isinstance(out, torch.Tensor) or not out.requires_grad:
            return out  # metadata (shape, device, ...) or a non-differentiable use
        if func in _LINEAR and self.functional_linear:
            self._linear(args, kwargs, hits, out)
            return out
        for i, a, src in hits:
            self._follow(func, args, kwargs, i, a, src, out)
        return out

    def _linear(self, args, kwargs, hits, out) -> None:
        """``F.linear(x, W, b)`` with W and/or b watched: a Linear layer in all but name (its rule measures it)."""
        call = list(args) + [kwargs[k] for k in ("input", "weight", "bias") if k in kwargs]
        x, w, b = (call + [None, None, None])[:3]
        roles = {i for i, _, _ in hits}
        ok = (
            isinstance(x, torch.Tensor)
            and 0 not in roles
            and x.ndim >= 2
            and int(x.shape[0]) == self.batch
            and int(out.shape[0]) == self.batch
            and len(call) <= 3
        )
        for _, _, src in hits:
            if not ok:
                src.problem = "`F.linear` does not take it with the samples of its input in dimension 0"
                continue
            src.uses += 1
            if self.record_others:
                src.others.append(x.detach().clone())
        if not ok or self.record_others:
            return
        use = LinearUse(x.detach(), w, b)
        for _, _, src in hits:
            src.linear.append(use)

        def catch(grad, use=use):
            use.backprops = grad.detach()

        out.register_hook(catch)

    def _follow(self, func, args, kwargs, i, a, src: Source, out) -> None:
        name = getattr(func, "__name__", str(func))
        if func in _ALIAS and out.shape == a.shape:
            self.watch(out, src)
            return
        binary = func in _ADD or func in _SUB or func in _RSUB or func in _MUL
        if not (binary or func in _EXPAND) or len(args) < 1 or i > 1 or (binary and len(args) != 2):
            src.problem = f"it is used by `{name}`, not only broadcast over the batch"
            return
        if (
            kwargs.get("alpha", 1) != 1
            or int(out.shape[0] if out.ndim else -1) != self.batch
            or not aligned(src.shape, tuple(out.shape))
        ):
            src.problem = f"`{name}` does not broadcast it over the samples in dimension 0"
            return
        other = args[1 - i] if binary else None
        sign = -1.0 if (func in _SUB and i == 1) or (func in _RSUB and i == 0) else 1.0
        factor = other.detach() if func in _MUL and isinstance(other, torch.Tensor) else None
        if func in _MUL and factor is None:
            factor = other
        src.uses += 1
        if self.record_others:
            src.others.append(other.detach().clone() if isinstance(other, torch.Tensor) else None)
            return
        shape, drop = src.shape, src.drop_leading

        def catch(grad, shape=shape, drop=drop, sign=sign, factor=factor, src=src):
            g = grad.detach()
            if factor is not None:
                g = g * factor
            r = reduce_broadcast(g, shape, drop)
            if r is None:
                src.problem = "its broadcast result is not [B, ...] over its shape"
                return
            src.parts.append(r if sign == 1.0 else -r)

        out.register_hook(catch)


def mixed_layout(a: list, b: list, n: int) -> str | None:
    """Compare the other operands of each broadcast use across the two probe passes (sample 0 swapped)."""
    if len(a) != len(b):
        return "it is used a different number of times for different inputs"
    for x, y in zip(a, b):
        if x is None or y is None or x.ndim == 0:
            continue
        if x.shape[0] != n or x.shape != y.shape:
            return "it is broadcast against a tensor without the samples in dimension 0"
        if x.is_floating_point():
            finite = x[torch.isfinite(x)]
            scale = float(finite.abs().max()) if finite.numel() else 0.0
            same = torch.allclose(x[1:], y[1:], rtol=1e-5, atol=1e-6 * scale + 1e-30, equal_nan=True)
        else:
            same = torch.equal(x[1:], y[1:])
        if not same:
            return "it is broadcast against a tensor that mixes samples or holds them outside dimension 0"
    return None
