"""Per-layer-type ways to get a chunk's gradient moments, in registries like Opacus' grad samplers.

Two registries, looked up by exact module type (as Opacus does):

* ``MOMENT_RULES[cls](layer, activations, backprops, signs) -> {param: ChunkMoments}`` computes
  Σg, Σg² and sign counts of one chunk *without* materializing per-sample gradients, where
  the algebra allows it (issue 7). Used when a layer is called once and its parameters
  are not shared.
* ``GRAD_SAMPLERS[cls](layer, activations, backprops) -> {param: grad_sample [B, *shape]}``
  adds samplers for layers Opacus has none for (BatchNorm in eval mode); Opacus' own
  samplers are used for the rest.

``backprops`` are already rescaled so that they are the gradient of each sample's own
loss (Opacus' ``loss_reduction="mean"`` convention).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .moments import ChunkMoments

MomentRule = Callable[[nn.Module, list, torch.Tensor, bool], dict]
GradSampler = Callable[[nn.Module, list, torch.Tensor], dict]

MOMENT_RULES: dict[type, MomentRule] = {}
GRAD_SAMPLERS: dict[type, GradSampler] = {}


def register_moment_rule(*classes: type) -> Callable[[MomentRule], MomentRule]:
    """Decorator: register ``f(layer, activations, backprops, signs)`` as the moment rule of ``classes``."""

    def decorator(f: MomentRule) -> MomentRule:
        for cls in classes:
            MOMENT_RULES[cls] = f
        return f

    return decorator


def register_grad_sampler(*classes: type) -> Callable[[GradSampler], GradSampler]:
    """Decorator: register ``f(layer, activations, backprops)`` as a per-sample gradient sampler."""

    def decorator(f: GradSampler) -> GradSampler:
        for cls in classes:
            GRAD_SAMPLERS[cls] = f
        return f

    return decorator


def find_grad_sampler(layer: nn.Module) -> GradSampler | None:
    """Our sampler for ``type(layer)``, else Opacus', else ``None``."""
    cls = type(layer)
    if cls in GRAD_SAMPLERS:
        return GRAD_SAMPLERS[cls]
    from opacus.grad_sample import GradSampleModule

    return GradSampleModule.GRAD_SAMPLERS.get(cls)


def find_moment_rule(layer: nn.Module) -> MomentRule | None:
    """The moment rule for this layer instance, or ``None`` (rules may decline by input shape)."""
    return MOMENT_RULES.get(type(layer))


def sign_counts_outer(d: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of positive and negative entries of g_i = d_i a_iᵀ over samples i, per (out, in) element.

    sign(d·a) = sign(d)·sign(a), so #pos = [d>0]ᵀ[a>0] + [d<0]ᵀ[a<0] and #neg = [d>0]ᵀ[a<0] + [d<0]ᵀ[a>0].
    Products of 0/1 matrices are exact in float32 up to 2²⁴ samples per chunk.
    """
    dt = torch.float32 if d.dtype in (torch.float16, torch.bfloat16) else d.dtype
    dp, dn = (d > 0).to(dt), (d < 0).to(dt)
    ap, an = (a > 0).to(dt), (a < 0).to(dt)
    pos = dp.t() @ ap + dn.t() @ an
    neg = dp.t() @ an + dn.t() @ ap
    return pos, neg


def _vector_moments(g: torch.Tensor, signs: bool) -> ChunkMoments:
    """Moments of per-sample vectors g [B, k] (already materialized, e.g. bias gradients)."""
    return ChunkMoments.from_samples(g, signs)


@register_moment_rule(nn.Linear)
def linear_moments(layer: nn.Linear, activations: list, backprops: torch.Tensor, signs: bool) -> dict | None:
    """nn.Linear: Σg = δᵀa, Σg² = (δ²)ᵀ(a²), sign counts from indicator products (issue 7, req. 1).

    Only for 2-D input ([B, in]); inputs with extra dimensions return ``None`` and fall back
    to the per-sample sampler.
    """
    a = activations[0]
    d = backprops
    if a.ndim != 2:
        return None
    count = a.shape[0]
    out: dict = {}
    if layer.weight.requires_grad:
        a64, d64 = a.to(torch.float64), d.to(torch.float64)
        total = d64.t() @ a64
        total_sq = d64.square().t() @ a64.square()
        pos = neg = None
        if signs:
            pos, neg = sign_counts_outer(d, a)
        out[layer.weight] = ChunkMoments.from_sums(count, total, total_sq, pos, neg)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = _vector_moments(d, signs)
    return out


@register_grad_sampler(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batchnorm_eval_grad_sample(layer: nn.modules.batchnorm._BatchNorm, activations: list, backprops: torch.Tensor):
    """BatchNorm with running statistics (eval mode): y = γ·x̂ + β per channel, x̂ = (x − μ)/√(σ² + ε).

    Per-sample gradients: ∂/∂γ = Σ_spatial δ·x̂, ∂/∂β = Σ_spatial δ. Only valid in eval mode
    (in train mode BatchNorm mixes samples and per-sample gradients are undefined).
    """
    if layer.training or layer.running_mean is None:
        raise RuntimeError("per-sample gradients of BatchNorm are only defined in eval mode")
    x = activations[0]
    shape = [1, -1] + [1] * (x.ndim - 2)
    xhat = (x - layer.running_mean.view(shape)) / torch.sqrt(layer.running_var.view(shape) + layer.eps)
    dims = [0] if x.ndim == 2 else None
    out = {}
    reduce_dims = tuple(range(2, x.ndim))
    if layer.weight is not None and layer.weight.requires_grad:
        gw = backprops * xhat
        out[layer.weight] = gw.sum(reduce_dims) if reduce_dims else gw
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(reduce_dims) if reduce_dims else backprops
    del dims
    return out
