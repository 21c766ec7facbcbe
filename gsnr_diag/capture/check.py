"""The consistency check of the hook path: every parameter's Σ_i g_i must equal the batch gradient."""

from __future__ import annotations

import math

import torch

from ..core.moments import ChunkMoments


def _scale(c: ChunkMoments, ref: torch.Tensor, batch: int) -> float:
    """Bound on |Σ_i g_i| from the sums of squares (Cauchy–Schwarz) and the batch gradient itself."""
    if not ref.numel():
        return 0.0
    scale = math.sqrt(batch * max(float((c.m2 + c.mean.square() * batch).max()), 0.0))
    return max(scale, float(ref.abs().max()))


def inconsistent(
    result: dict[str, ChunkMoments], batch_grad: dict, batch: int, skip: set[str], layers: list[list[str]]
) -> set[str]:
    """Parameters whose Σ_i g_i (B × the chunk mean) differs from B × the batch gradient beyond rounding.

    The tolerance is 1e-4 of the largest gradient scale of the parameter's layer (``layers``: the
    parameter names of each layer): a gradient that vanishes in exact arithmetic (an attention
    layer's key bias, which softmax ignores) holds only rounding noise of the layer's scale, on
    both sides, and must not count as a mismatch.
    """
    errs: dict[str, tuple[float, float]] = {}
    for k, c in result.items():
        if k in skip:
            continue
        g = batch_grad.get(k)
        total = c.mean * batch
        ref = torch.zeros_like(total) if g is None else g.to(torch.float64) * batch
        err = float((total - ref).abs().max()) if total.numel() else 0.0
        floor = 0.0 if getattr(c, "floor", None) is None or not c.floor.numel() else batch * float(c.floor.max())
        errs[k] = (max(err - floor, 0.0), _scale(c, ref, batch))  # floor: the rule's own rounding bound
    layer_scale = {}
    for names in layers:
        s = max((errs[k][1] for k in names if k in errs), default=0.0)
        for k in names:
            layer_scale[k] = max(layer_scale.get(k, 0.0), s)
    bad = set()
    for k, (err, scale) in errs.items():
        if not math.isfinite(err):
            continue  # non-finite gradients are reported separately
        if err > 1e-4 * max(scale, layer_scale.get(k, 0.0)) + 1e-30:
            bad.add(k)
    return bad
