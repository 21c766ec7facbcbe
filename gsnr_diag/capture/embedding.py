"""nn.Embedding: a segment-sum over the rows each sample touches (never a B × V × D tensor)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.moments import ChunkMoments
from .blocks import compute_dtype
from .registry import RuleContext, register_moment_rule


def segment_moments(
    W: torch.Tensor, batch: int, sample: torch.Tensor, rows: torch.Tensor, vec: torch.Tensor, signs: bool
) -> ChunkMoments:
    """Moments of per-sample gradients of a lookup table W [V, D] given as sparse contributions.

    Contribution t adds ``vec[t]`` (a D-vector) to row ``rows[t]`` of sample ``sample[t]``'s gradient
    (eq. 1). The (sample, row) pairs are found with one ``unique``, their summed vectors with one
    ``index_add_``, and Σg, Σg² and sign counts by scattering those vectors into their rows. Samples
    that do not touch a row contribute exact zeros, which add nothing to any of the sums.
    """
    V, D = W.shape
    keys = sample.long() * V + rows.long()
    uniq, inverse = torch.unique(keys, return_inverse=True)
    v = torch.zeros(uniq.shape[0], D, dtype=vec.dtype, device=vec.device).index_add_(0, inverse, vec)
    at = uniq % V
    f64 = dict(dtype=torch.float64, device=W.device)
    v64 = v.to(torch.float64)
    total = torch.zeros(V, D, **f64).index_add_(0, at, v64)
    total_sq = torch.zeros(V, D, **f64).index_add_(0, at, v64.square())
    pos = neg = None
    if signs:
        pos = torch.zeros(V, D, **f64).index_add_(0, at, (v > 0).to(torch.float64))
        neg = torch.zeros(V, D, **f64).index_add_(0, at, (v < 0).to(torch.float64))
    return ChunkMoments.from_sums(batch, total, total_sq, pos, neg)


@register_moment_rule(nn.Embedding)
def embedding_moments(layer: nn.Embedding, ctx: RuleContext) -> dict | None:
    """nn.Embedding: a segment-sum over the rows each sample touches (never a dense B×V×D tensor).

    Sample i's gradient is non-zero only in the rows of the tokens it contains: row v gets
    Σ_{t: x_it = v} δ_it (repeated tokens add up; ``padding_idx`` gets none); see
    :func:`segment_moments`. ``sparse=True`` changes only how autograd stores the batch gradient, not
    the per-sample gradients. Declines ``scale_grad_by_freq`` (its batch gradient mixes samples).
    """
    idx, d = ctx.activations[0], ctx.backprops
    W = layer.weight
    if not W.requires_grad:
        return {}
    if not isinstance(idx, torch.Tensor) or idx.ndim < 1 or layer.scale_grad_by_freq or idx.is_floating_point():
        return None
    B = int(idx.shape[0])
    D = W.shape[1]
    idx = idx.reshape(B, -1)
    sample = torch.arange(B, device=idx.device).unsqueeze(1).expand_as(idx).reshape(-1)
    vec = d.reshape(-1, D).to(compute_dtype(W))
    rows = idx.reshape(-1)
    if layer.padding_idx is not None:
        keep = rows != layer.padding_idx
        sample, rows, vec = sample[keep], rows[keep], vec[keep]
    return {W: segment_moments(W, B, sample, rows, vec, ctx.signs)}
