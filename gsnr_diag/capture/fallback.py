"""Per-sample gradients of the whole model where no rule or sampler applies: torch.func vmap, then a loop.

Also the graph inspection the hook path relies on (how many autograd edges reach each parameter).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..data import Inputs, model_arguments, tree_map
from .state import kept_slots


def per_sample_functorch(
    model: nn.Module, loss_fn: Callable, x: Inputs, y: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """Per-sample gradients g_i (eq. 1) of parameters ``names`` with ``vmap(grad(loss of one sample))``."""
    from torch.func import functional_call, grad, vmap

    fixed = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    free = {k: fixed[k] for k in names}

    both = _ModelAndLoss(model, loss_fn)  # the loss inside the call: a loss_fn may use the model's parameters
    prefix = lambda d: {"model." + k: v for k, v in d.items()}

    def loss_one(free_params, xi, yi):
        xb = tree_map(lambda t: t.unsqueeze(0), xi)
        params = prefix({**fixed, **free_params})
        return functional_call(both, (params, prefix(buffers)), (xb, yi.unsqueeze(0))).reshape(())

    with warnings.catch_warnings(), kept_slots(model):  # functional_call can leave wrappers in a twice-named module
        # vmap falls back to a slow loop for ops without a batching rule (e.g. CPU flash
        # attention) and says so once per op; the result is exact, so keep the user's log clean.
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        # randomness="different": dropout in train mode draws its own mask per sample, as the batch-of-one loop does.
        return vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")(free, x, y)


class _ModelAndLoss(nn.Module):
    """``loss_fn(model(x), y)`` as one module, so that functional_call swaps the parameters for both: a loss
    that uses parameters of the model (``nn.LinearCrossEntropyLoss`` held by the model) sees them too."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.__dict__["loss_fn"] = loss_fn  # not a submodule: only the model's tensors are swapped

    def forward(self, xb: Inputs, yb: torch.Tensor) -> torch.Tensor:
        args, kwargs = model_arguments(xb)
        return self.loss_fn(self.model(*args, **kwargs), yb)


def per_sample_loop(
    forward_loss: Callable[[Inputs, torch.Tensor], torch.Tensor],
    params: list[torch.Tensor],
    names: list[str],
    x: Inputs,
    y: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Batch-of-one loop: obviously correct, slow; the last resort."""
    rows: list[list[torch.Tensor]] = []
    for i in range(int(y.shape[0])):
        xi = tree_map(lambda t: t[i : i + 1], x)
        loss = forward_loss(xi, y[i : i + 1])
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        gs = [g.to_dense() if g is not None and g.is_sparse else g for g in gs]  # Embedding(sparse=True)
        rows.append([torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, gs)])
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}


def parameter_uses(loss: torch.Tensor) -> dict[int, int]:
    """{id(parameter): number of autograd edges into it} in the graph of ``loss``.

    Each call of a layer with a moment rule reaches each of its parameters through exactly one
    edge, so a count above one means the parameter is also used outside that call.
    """
    uses: dict[int, int] = {}
    root = loss.grad_fn
    if root is None:
        return uses
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                uses[id(var)] = uses.get(id(var), 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return uses


def describe(obj: Any) -> str:
    """A short description of a tensor tree for error messages: ``tensor(8, 3) float32``."""
    if isinstance(obj, torch.Tensor):
        return f"tensor{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in obj) + ")"
    return type(obj).__name__


def vmap_failure(exc: BaseException) -> str:
    """Names the op that stopped ``torch.func.vmap``: ``aten::…`` from the message, else the call on the
    innermost source line of the traceback (``_VF.lstm``), with the first line of the message."""
    import os
    import re
    import traceback

    text = str(exc)
    first = (text.strip().splitlines() or [""])[0][:200]
    op = re.search(r"aten::[A-Za-z0-9_.]+", text)
    where = f"`{op.group(0)}`" if op else "an operation"
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if not op and frames:
        last = frames[-1]
        call = re.search(r"([A-Za-z_][\w.]*)\s*\(", last.line or "")
        name = call.group(1) if call else last.name
        where = f"`{name}` ({os.path.basename(last.filename)}:{last.lineno})"
    return f"{where} ({type(exc).__name__}: {first})"
