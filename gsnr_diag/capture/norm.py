"""Normalization layers y = γ·x̂ + β (LayerNorm, GroupNorm, RMSNorm, BatchNorm in eval mode): rules and samplers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import _combine, compute_dtype, sample_blocks, samples_moments, sum_moments
from .registry import RuleContext, register_grad_sampler, register_moment_rule


def _affine_norm_moments(
    layer: nn.Module, x: torch.Tensor, d: torch.Tensor, xhat_fn, reduce_dims, signs: bool, budget: float
) -> dict:
    """γ, β of a normalization layer y = γ·x̂ + β: per-sample ∂/∂γ = Σ δ·x̂, ∂/∂β = Σ δ over ``reduce_dims``.

    The per-sample gradients are parameter-sized, so they are formed block by block over
    samples (x̂ is recomputed from the layer's input, one block at a time).
    """
    W, b = getattr(layer, "weight", None), getattr(layer, "bias", None)
    ref = W if W is not None else b
    dt = compute_dtype(ref)
    isz = torch.finfo(dt).bits // 8
    B = int(x.shape[0])
    out: dict = {}
    if W is not None and W.requires_grad:
        per_sample = 3 * x[0].numel() * isz + 3 * W.numel() * isz
        acc = None
        for s, e in sample_blocks(B, per_sample, budget):
            xb = x[s:e].to(dt)
            g = d[s:e].to(dt) * xhat_fn(xb)
            g = g.sum(reduce_dims) if reduce_dims else g
            acc = _combine(acc, samples_moments(g.reshape(e - s, *W.shape), signs))
        out[W] = acc
    if b is not None and b.requires_grad:
        g = d.to(dt)
        rest = [n for i, n in enumerate(g.shape) if i and i not in reduce_dims]
        if reduce_dims and rest == list(b.shape):  # with round-off evidence: β before another norm sums to noise
            out[b] = sum_moments(g, tuple(reduce_dims), signs, d.dtype)
        else:
            g = g.sum(reduce_dims) if reduce_dims else g
            out[b] = samples_moments(g.reshape(B, *b.shape), signs)
    return out


@register_moment_rule(nn.LayerNorm)
def layer_norm_moments(layer: nn.LayerNorm, ctx: RuleContext) -> dict | None:
    """nn.LayerNorm (with or without bias): x̂ over ``normalized_shape``, summed over the other dims."""
    x = ctx.activations[0]
    k = len(layer.normalized_shape)
    if not isinstance(x, torch.Tensor) or x.ndim < k + 1 or (layer.weight is None and layer.bias is None):
        return None
    reduce_dims = tuple(range(1, x.ndim - k))
    fn = lambda xb: F.layer_norm(xb, layer.normalized_shape, eps=layer.eps)
    return _affine_norm_moments(layer, x, ctx.backprops, fn, reduce_dims, ctx.signs, ctx.budget)


@register_moment_rule(nn.GroupNorm)
def group_norm_moments(layer: nn.GroupNorm, ctx: RuleContext) -> dict | None:
    """nn.GroupNorm: x̂ per (sample, group), per-channel γ/β summed over the spatial dims."""
    x = ctx.activations[0]
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or layer.weight is None:
        return None
    reduce_dims = tuple(range(2, x.ndim))
    fn = lambda xb: F.group_norm(xb, layer.num_groups, eps=layer.eps)
    return _affine_norm_moments(layer, x, ctx.backprops, fn, reduce_dims, ctx.signs, ctx.budget)


if hasattr(nn, "RMSNorm"):

    @register_moment_rule(nn.RMSNorm)
    def rms_norm_moments(layer: nn.Module, ctx: RuleContext) -> dict | None:
        """nn.RMSNorm: x̂ = x / rms(x) over ``normalized_shape``; γ summed over the other dims."""
        x = ctx.activations[0]
        k = len(layer.normalized_shape)
        if not isinstance(x, torch.Tensor) or x.ndim < k + 1 or layer.weight is None:
            return None
        reduce_dims = tuple(range(1, x.ndim - k))
        fn = lambda xb: F.rms_norm(xb, layer.normalized_shape, eps=layer.eps)
        return _affine_norm_moments(layer, x, ctx.backprops, fn, reduce_dims, ctx.signs, ctx.budget)


def _batchnorm_xhat(layer: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean = layer.running_mean.view(shape).to(x.dtype)
    var = layer.running_var.view(shape).to(x.dtype)
    return (x - mean) / torch.sqrt(var + layer.eps)


@register_moment_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batchnorm_eval_moments(layer: nn.modules.batchnorm._BatchNorm, ctx: RuleContext) -> dict | None:
    """BatchNorm with running statistics (eval mode only; in train mode it mixes samples)."""
    x = ctx.activations[0]
    if layer.training or layer.running_mean is None or not isinstance(x, torch.Tensor) or x.ndim < 2:
        return None
    reduce_dims = tuple(range(2, x.ndim))
    return _affine_norm_moments(
        layer, x, ctx.backprops, lambda xb: _batchnorm_xhat(layer, xb), reduce_dims, ctx.signs, ctx.budget
    )


@register_grad_sampler(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batchnorm_eval_grad_sample(layer: nn.modules.batchnorm._BatchNorm, activations: list, backprops: torch.Tensor):
    """BatchNorm with running statistics (eval mode): y = γ·x̂ + β per channel, x̂ = (x − μ)/√(σ² + ε).

    Per-sample gradients: ∂/∂γ = Σ_spatial δ·x̂, ∂/∂β = Σ_spatial δ. Only valid in eval mode
    (in train mode BatchNorm mixes samples and per-sample gradients are undefined).
    """
    if layer.training or layer.running_mean is None:
        raise RuntimeError("per-sample gradients of BatchNorm are only defined in eval mode")
    x = activations[0]
    xhat = _batchnorm_xhat(layer, x)
    out = {}
    reduce_dims = tuple(range(2, x.ndim))
    if layer.weight is not None and layer.weight.requires_grad:
        gw = backprops * xhat
        out[layer.weight] = gw.sum(reduce_dims) if reduce_dims else gw
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(reduce_dims) if reduce_dims else backprops
    return out


@register_grad_sampler(nn.LayerNorm)
def layer_norm_grad_sample(layer: nn.LayerNorm, activations: list, backprops: torch.Tensor):
    """nn.LayerNorm per-sample gradients (Opacus' sampler assumes a bias; this one does not)."""
    x = activations[0]
    k = len(layer.normalized_shape)
    xhat = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    reduce_dims = tuple(range(1, x.ndim - k))
    out = {}
    if layer.weight is not None and layer.weight.requires_grad:
        g = backprops * xhat
        out[layer.weight] = g.sum(reduce_dims) if reduce_dims else g
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(reduce_dims) if reduce_dims else backprops
    return out
