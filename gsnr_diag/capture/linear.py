"""nn.Linear: centred moments and exact sign counts of rank-one per-sample gradients (eq. 1, 2)."""

from __future__ import annotations

import torch
from torch import nn

from ..core.moments import ChunkMoments
from .blocks import (
    _buffer,
    _combine,
    compute_dtype,
    sample_blocks,
    samples_moments,
    shared_buffer,
    sign_counts_outer,
    sum_moments,
)
from .registry import RuleContext, register_moment_rule


def _centre(x: torch.Tensor) -> torch.Tensor:
    """x̄ over samples as x_0 + Σ(x_i − x_0)/B: exactly x_0 when every sample equals it."""
    x0 = x[0]
    return (x - x0).sum(0).div_(x.shape[0]).add_(x0)


def _linear_weight_moments(
    W: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    signs: bool,
    budget: float,
    grad: torch.Tensor | None,
    scratch: dict | None,
) -> ChunkMoments:
    """Moments of the rank-one per-sample gradients g_i = δ_i a_iᵀ (eq. 1), centred, without forming them.

    Σg² − B·ḡ² cancels catastrophically when ρ² ≪ ḡ² (float32 at GSNR 10⁵ loses every digit), so the
    moments are formed around K = δ̄āᵀ, with u_i = δ_i − δ̄ and v_i = a_i − ā (the means shifted by
    sample 0, so identical samples give u = v = 0, M2 = 0 and ḡ = K exactly):
    h_i = g_i − K = δ_i v_iᵀ + u_i āᵀ,

        Σh² = (δ²)ᵀ(v²) + 2·ā ∘ ((δ∘u)ᵀv) + (Σu²)(ā²)ᵀ,   Σh = B(ḡ − K),   M2 = Σh² − (Σh)²/B,

    where every term is of the size of the spread, not of ḡ, so ρ² keeps the compute dtype's
    resolution at any GSNR. ḡ is the batch gradient ``grad`` when given (its rounding, ~ε·|ḡ|,
    changes M2 by at most ~2ε relative: (ḡ − K) is a covariance, small where ḡ/ρ is large), else
    K + (δᵀv + (Σu)āᵀ)/B. Two matrix products per block of samples (three without ``grad``); the
    sign counts are exact integer products of sign matrices (sign(δa) = sign(δ)·sign(a)), one or two
    (:func:`~gsnr_diag.capture.blocks.sign_counts_outer`).
    """
    B = int(a.shape[0])
    dt = a.dtype
    n_out, n_in = d.shape[1], a.shape[1]
    shape = (n_out, n_in)
    dbar, abar = _centre(d), _centre(a)
    rows = 2 * n_out if grad is None else n_out
    sq = _buffer(scratch, W, "sq", shape, dt)
    cross = _buffer(scratch, W, "cross", (rows, n_in), dt)  # (δ∘u)ᵀv [; δᵀv]
    su = torch.zeros(n_out, dtype=dt, device=d.device)
    su2 = torch.zeros(n_out, dtype=dt, device=d.device)
    sv2 = torch.zeros(n_in, dtype=dt, device=d.device)
    pos_cnt = neg_cnt = None
    blocks = list(sample_blocks(B, (n_in + 3 * n_out) * (3 * a.element_size() + 2), budget))
    for j, (s, e) in enumerate(blocks):
        ab, db = a[s:e], d[s:e]
        v = ab - abar
        u = db - dbar
        left = db * u if grad is not None else torch.cat([db * u, db], 1)
        v2 = v.square()
        if j == 0:
            torch.mm(db.square().t(), v2, out=sq)
            torch.mm(left.t(), v, out=cross)
        else:
            sq.addmm_(db.square().t(), v2)
            cross.addmm_(left.t(), v)
        su.add_(u.sum(0))
        su2.add_(u.square_().sum(0))
        sv2.add_(v2.sum(0))
        del left, u, v, v2
        if signs:
            bp, bn = sign_counts_outer(db, ab)
            pos_cnt, neg_cnt = (bp, bn) if j == 0 else (pos_cnt.add_(bp), neg_cnt.add_(bn))
    # Every term below is of the size of the spread, so it is combined in the compute dtype.
    if grad is not None:
        diff = torch.addr(grad.to(dt), dbar, abar, alpha=-1, out=_buffer(scratch, W, "diff", shape, dt))  # ḡ − K = Σh/B
    else:
        diff = cross[n_out:].addr(su, abar).div_(B)
    m2 = sq.addcmul_(cross[:n_out], abar * 2).addr_(su2, abar.square())  # Σh², in sq's buffer
    m2.addcmul_(diff, diff, value=-B).clamp_(min=0.0)  # − (Σh)²/B
    m2 = _buffer(scratch, W, "m2", shape, torch.float64).copy_(m2)
    mean = _buffer(scratch, W, "mean", shape, torch.float64)
    dbar64, abar64 = dbar.to(torch.float64), abar.to(torch.float64)
    if grad is not None:
        mean.copy_(grad)
    else:
        mean.copy_(diff).addr_(dbar64, abar64)
    fixed_rows, fixed_cols = su2 == 0, sv2 == 0
    if bool(fixed_rows.any()) and bool(fixed_cols.any()):  # g_i = K exactly for every i: ḡ = K, in every chunk
        same = torch.outer(fixed_rows, fixed_cols)
        mean.copy_(torch.where(same, torch.outer(dbar64, abar64), mean))
    pos = neg = None
    if signs:
        pos, neg = pos_cnt, neg_cnt
    return ChunkMoments(B, mean, m2, pos, neg)


def _bias_moments(d: torch.Tensor, signs: bool, eps_dtype: torch.dtype) -> ChunkMoments:
    """Per-sample bias gradients d [B, ..., C] summed over the middle dimensions (with round-off evidence)."""
    if d.ndim > 2:
        return sum_moments(d.reshape(d.shape[0], -1, d.shape[-1]), (1,), signs, eps_dtype)
    return samples_moments(d, signs)


# --- nn.Linear ------------------------------------------------------------------------------
@register_moment_rule(nn.Linear)
def linear_moments(layer: nn.Linear, ctx: RuleContext) -> dict | None:
    """nn.Linear: per-sample g_i = δ_i a_iᵀ (eq. 1) without forming it.

    2-D input [B, in] (or extra dimensions of size 1): per-sample g_i = δ_i a_iᵀ is rank one,
    so the moments come from two matrix products of centred δ and a (:func:`_linear_weight_moments`,
    no Σg² − nḡ² cancellation: ρ² to the compute dtype's resolution at any GSNR) and the sign
    counts from exact integer products of sign matrices (:func:`sign_counts_outer`).
    Products run in the parameter's dtype (float32 for a float32 model, float64 for a float64
    model) and are stored in float64.

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
        out[b] = _bias_moments(d.to(dt), signs, d.dtype)
    return out
