"""nn.Linear: Σg² = (δ²)ᵀ(a²) and exact sign counts for rank-one per-sample gradients (eq. 1, 2)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.moments import ChunkMoments
from .blocks import _buffer, _combine, _count_mm, compute_dtype, sample_blocks, samples_moments, shared_buffer
from .registry import RuleContext, register_moment_rule


def _linear_weight_moments(
    W: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    signs: bool,
    budget: float,
    grad: torch.Tensor | None,
    scratch: dict | None,
) -> ChunkMoments:
    """Σg² = (δ²)ᵀ(a²) and sign counts of g_i = δ_i a_iᵀ over samples; the mean from ``grad`` when given."""
    B = int(a.shape[0])
    shape = (d.shape[1], a.shape[1])
    isz = a.element_size()
    total = None
    total_sq = _buffer(scratch, W, "sq", shape, a.dtype)
    s_cnt = n_cnt = None
    blocks = list(sample_blocks(B, (a.shape[1] + d.shape[1]) * (2 * isz + 2), budget))
    for j, (s, e) in enumerate(blocks):
        ab, db = a[s:e], d[s:e]
        if j == 0:
            torch.mm(db.square().t(), ab.square(), out=total_sq)
        else:
            total_sq.addmm_(db.square().t(), ab.square())
        if grad is None:
            t = db.t() @ ab
            total = t if total is None else total.add_(t)
        if signs:
            sd, sa = torch.sign(db), torch.sign(ab)
            if j == 0:
                s_cnt = _count_mm(sd, sa, out=_buffer(scratch, W, "s", shape, torch.int32))
                n_cnt = _count_mm(sd.abs_(), sa.abs_(), out=_buffer(scratch, W, "n", shape, torch.int32))
            else:
                s_cnt.add_(_count_mm(sd, sa))
                n_cnt.add_(_count_mm(sd.abs_(), sa.abs_()))
    mean = _buffer(scratch, W, "mean", shape, torch.float64)
    if grad is not None:
        mean.copy_(grad)
    else:
        mean.copy_(total).div_(B)
    m2 = _buffer(scratch, W, "m2", shape, torch.float64).copy_(total_sq)
    m2.addcmul_(mean, mean, value=-float(B)).clamp_(min=0.0)
    pos = neg = None
    if signs:
        pos = torch.add(n_cnt, s_cnt, out=_buffer(scratch, W, "pos", shape, torch.int32)).bitwise_right_shift_(1)
        neg = n_cnt.sub_(pos)  # (N − S)/2 = N − pos
    return ChunkMoments(B, mean, m2, pos, neg)


def _bias_moments(d: torch.Tensor, signs: bool) -> ChunkMoments:
    """Per-sample bias gradients d [B, ..., C] summed over the middle dimensions."""
    if d.ndim > 2:
        d = d.reshape(d.shape[0], -1, d.shape[-1]).sum(1)
    return samples_moments(d, signs)


# --- nn.Linear ------------------------------------------------------------------------------
@register_moment_rule(nn.Linear)
def linear_moments(layer: nn.Linear, ctx: RuleContext) -> dict | None:
    """nn.Linear: per-sample g_i = δ_i a_iᵀ (eq. 1) without forming it.

    2-D input [B, in] (or extra dimensions of size 1): per-sample g_i = δ_i a_iᵀ is rank one,
    so Σg² = (δ²)ᵀ(a²) and the sign counts come from two integer products of sign matrices
    (:func:`sign_counts_outer`); the mean Σg/B = δᵀa/B is the batch gradient (``grads``) when given.
    Products run in the parameter's dtype (float32 for a float32 model: relative error
    ~1e-7·(1 + GSNR) in ρ²; float64 for a float64 model) and are stored in float64.

    Input with extra dimensions [B, T..., in] (sequences): g_i = Σ_t δ_it a_itᵀ is not rank
    one; per-sample gradients are formed block by block over samples (batched products,
    at most ``budget`` bytes per block) and reduced at once.
    """
    a, d = ctx.activations[0], ctx.backprops
    signs, budget, grads, scratch = ctx.signs, ctx.budget, ctx.grads, ctx.scratch
    if not isinstance(a, torch.Tensor) or a.ndim < 2 or d.shape[:-1] != a.shape[:-1]:
        return None
    W, b = layer.weight, layer.bias
    dt = compute_dtype(W)
    B = int(a.shape[0])
    a = a.reshape(B, -1, a.shape[-1])
    d = d.reshape(B, -1, d.shape[-1])
    out: dict = {}
    if a.shape[1] == 1:
        a, d = a[:, 0].to(dt), d[:, 0].to(dt)
        if W.requires_grad:
            grad = None if grads is None else grads.get(W)
            out[W] = _linear_weight_moments(W, a, d, signs, budget, grad, scratch)
        if b is not None and b.requires_grad:
            out[b] = samples_moments(d, signs)
        return out
    if W.requires_grad:
        isz = torch.finfo(dt).bits // 8
        per_sample = W.numel() * (3 * isz + 2) + (a.shape[1] * (a.shape[2] + d.shape[2])) * isz
        acc = None
        for s, e in sample_blocks(B, per_sample, budget):
            buf = shared_buffer(scratch, "g", (e - s, *W.shape), dt, W.device)
            g = torch.bmm(d[s:e].to(dt).transpose(1, 2), a[s:e].to(dt), out=buf)
            acc = _combine(acc, samples_moments(g, signs, scratch))
            del g
        out[W] = acc
    if b is not None and b.requires_grad:
        out[b] = _bias_moments(d.to(dt), signs)
    return out
