"""nn.Embedding: a segment-sum over the rows each sample touches (never a B × V × D tensor)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.moments import ChunkMoments
from .blocks import compute_dtype
from .registry import RuleContext, register_moment_rule


@register_moment_rule(nn.Embedding)
def embedding_moments(layer: nn.Embedding, ctx: RuleContext) -> dict | None:
    """nn.Embedding: a segment-sum over the rows each sample touches (never a dense B×V×D tensor).

    Sample i's gradient is non-zero only in the rows of the tokens it contains: row v gets
    Σ_{t: x_it = v} δ_it (repeated tokens add up; ``padding_idx`` gets none). The (sample,
    row) pairs are found with one ``unique``, their vectors with one ``index_add_``, and
    Σg, Σg² and sign counts by scattering those vectors into their rows. Samples that do
    not touch a row contribute exact zeros, which add nothing to any of the sums.
    Declines ``scale_grad_by_freq`` (its batch gradient mixes samples) and sparse gradients.
    """
    idx, d = ctx.activations[0], ctx.backprops
    signs = ctx.signs
    W = layer.weight
    if not W.requires_grad:
        return {}
    if (
        not isinstance(idx, torch.Tensor)
        or idx.ndim < 1
        or layer.scale_grad_by_freq
        or layer.sparse
        or idx.is_floating_point()
    ):
        return None
    B = int(idx.shape[0])
    V, D = W.shape
    dt = compute_dtype(W)
    idx = idx.reshape(B, -1).long()
    d = d.reshape(B, -1, D).to(dt)
    keys = (torch.arange(B, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
    vec = d.reshape(-1, D)
    if layer.padding_idx is not None:
        keep = idx.reshape(-1) != layer.padding_idx
        keys, vec = keys[keep], vec[keep]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    v = torch.zeros(uniq.shape[0], D, dtype=dt, device=d.device).index_add_(0, inverse, vec)
    rows = uniq % V
    f64 = dict(dtype=torch.float64, device=W.device)
    v64 = v.to(torch.float64)
    total = torch.zeros(V, D, **f64).index_add_(0, rows, v64)
    total_sq = torch.zeros(V, D, **f64).index_add_(0, rows, v64.square())
    pos = neg = None
    if signs:
        pos = torch.zeros(V, D, **f64).index_add_(0, rows, (v > 0).to(torch.float64))
        neg = torch.zeros(V, D, **f64).index_add_(0, rows, (v < 0).to(torch.float64))
    return {W: ChunkMoments.from_sums(B, total, total_sq, pos, neg)}
