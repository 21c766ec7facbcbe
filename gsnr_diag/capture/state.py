"""Every parameter and buffer slot of a model, put back exactly as it was.

A measurement must leave the user's model untouched, also when the model's own forward changes it:
``Embedding(max_norm=...)`` renormalizes rows of its weight in place, spectral norm advances its power
iteration (``weight_u``/``_u``, ``_v`` buffers) in train mode, ``InstanceNorm(track_running_stats=True)``
updates running statistics in train mode, custom modules count calls in a buffer. And
``torch.func.functional_call`` can leave its wrapper tensors in a module reachable under two attribute
names (``self.b = self.a``): it swaps the same slot twice and restores it in the wrong order.

:class:`ModelState` records, for every module, which tensor object sits in each ``_parameters`` and
``_buffers`` slot, a copy of its value and its version counter; :meth:`ModelState.restore` puts the
original objects back in their slots and copies back every value that changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class ModelState:
    """Identity (and optionally value) of every parameter and buffer slot of ``model``."""

    def __init__(self, model: nn.Module, *, values: bool = True, parameter_values: bool = True):
        # (slot dict owner, kind, name, tensor, version, saved value)
        self._slots: list[tuple[nn.Module, str, str, torch.Tensor | None, int, torch.Tensor | None]] = []
        for module in model.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    keep = values and t is not None and (parameter_values or kind == "_buffers")
                    saved = t.detach().clone() if keep else None
                    version = t._version if t is not None else 0
                    self._slots.append((module, kind, name, t, version, saved))

    def restore(self, *, compare: bool = False) -> list[str]:
        """Put every slot's original tensor back and undo in-place changes; returns what was changed.

        Changes are found by the tensor's version counter; with ``compare`` also by value (an edit through
        ``.data`` does not bump the version counter), which costs one pass over the model's tensors.
        """
        changed: list[str] = []
        slots_after = []
        with torch.no_grad():
            for module, kind, name, t, version, saved in self._slots:
                slots = getattr(module, kind)
                if slots.get(name) is not t:
                    slots[name] = t
                    changed.append(f"{type(module).__name__}.{name} (replaced)")
                if t is not None and saved is not None:
                    if t._version != version or (compare and not _same(t, saved)):
                        t.copy_(saved)
                        changed.append(f"{type(module).__name__}.{name}")
                    version = t._version  # our own copy_ moved the counter: the new reference point
                slots_after.append((module, kind, name, t, version, saved))
        self._slots = slots_after
        return changed


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.equal(a, b):
        return True
    return (a.is_floating_point() or a.is_complex()) and bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))


@contextlib.contextmanager
def kept_slots(model: nn.Module) -> Iterator[None]:
    """Inside: anything goes; after: every parameter/buffer slot holds its original tensor object again."""
    state = ModelState(model, values=False)
    try:
        yield
    finally:
        state.restore()
