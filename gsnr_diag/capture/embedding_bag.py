"""nn.EmbeddingBag (sum, mean, max; 2-D input or 1-D input with offsets; per_sample_weights): a segment-sum."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import compute_dtype
from .embedding import segment_moments
from .registry import OUTPUT_BATCHED, RuleContext, register_moment_rule

OUTPUT_BATCHED.add(nn.EmbeddingBag)


def _argument(ctx: RuleContext, position: int, name: str):
    if len(ctx.activations) > position:
        return ctx.activations[position]
    return ctx.kwargs.get(name)


def _bags(layer: nn.EmbeddingBag, idx: torch.Tensor, offsets: torch.Tensor | None):
    """(flat indices, bag of each index, number of bags, kept positions) of one call, or ``None``."""
    if idx.ndim == 2 and offsets is None:
        B, L = idx.shape
        bag = torch.arange(B, device=idx.device).repeat_interleave(L)
        return idx.reshape(-1), bag, B, None
    if idx.ndim != 1 or not isinstance(offsets, torch.Tensor) or offsets.ndim != 1:
        return None
    n_bags = offsets.shape[0] - (1 if layer.include_last_offset else 0)
    starts = offsets[:n_bags].long()
    pos = torch.arange(idx.shape[0], device=idx.device)
    bag = torch.searchsorted(starts, pos, right=True) - 1
    keep = bag >= 0
    if layer.include_last_offset:
        keep &= pos < offsets[-1]
    return idx, bag, n_bags, keep


@register_moment_rule(nn.EmbeddingBag)
def embedding_bag_moments(layer: nn.EmbeddingBag, ctx: RuleContext) -> dict | None:
    """nn.EmbeddingBag: each bag is one sample; its gradient touches only the rows of its indices (eq. 1).

    Bag i's output is o_i = Σ_t c_it·W[x_it] (``sum``: c = per_sample_weights or 1; ``mean``: c = 1/|bag|
    over the non-padding indices) or, per dimension d, the largest W[x_it, d] (``max``: the first index
    attaining it, as PyTorch's kernel, gets all of δ_id). So row x_it of bag i's gradient gets c_it ∘ δ_i,
    and the moments are a segment-sum over (bag, row) pairs (:func:`segment_moments`); indices equal to
    ``padding_idx`` contribute nothing. Declines ``scale_grad_by_freq`` (its batch gradient mixes samples).
    """
    W = layer.weight
    if not W.requires_grad:
        return {}
    idx, d = ctx.activations[0], ctx.backprops
    offsets = _argument(ctx, 1, "offsets")
    psw = _argument(ctx, 2, "per_sample_weights")
    if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or layer.scale_grad_by_freq:
        return None
    bags = _bags(layer, idx, offsets)
    if bags is None or bags[2] != d.shape[0] or d.ndim != 2:
        return None
    flat, bag, n_bags, keep = bags
    dt = compute_dtype(W)
    coef = None if psw is None else psw.reshape(-1).to(dt)
    if layer.padding_idx is not None:
        pad = flat != layer.padding_idx
        keep = pad if keep is None else keep & pad
    if keep is not None:
        flat, bag = flat[keep], bag[keep]
        coef = None if coef is None else coef[keep]
    delta = d.to(dt)[bag]  # [N, D]: the backprop of each index's bag
    if layer.mode == "mean":
        size = torch.zeros(n_bags, dtype=dt, device=d.device).index_add_(0, bag, torch.ones_like(bag, dtype=dt))
        coef = 1.0 / size[bag]
    elif layer.mode == "max":
        value = W.detach()[flat].to(dt)  # [N, D]
        D = W.shape[1]
        top = torch.full((n_bags, D), -torch.inf, dtype=dt, device=d.device)
        top = top.scatter_reduce(0, bag.unsqueeze(1).expand(-1, D), value, "amax", include_self=True)
        at = torch.arange(flat.shape[0], device=d.device).unsqueeze(1).expand(-1, D)
        cand = torch.where(value == top[bag], at, torch.full_like(at, flat.shape[0]))
        first = torch.full((n_bags, D), flat.shape[0], dtype=at.dtype, device=d.device)
        first = first.scatter_reduce(0, bag.unsqueeze(1).expand(-1, D), cand, "amin", include_self=True)
        delta = delta * (at == first[bag]).to(dt)
    elif layer.mode != "sum":
        return None
    vec = delta if coef is None else delta * coef.unsqueeze(1)
    return {W: segment_moments(W, int(n_bags), bag, flat, vec, ctx.signs)}
