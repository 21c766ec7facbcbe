"""Layers of Hugging Face ``transformers`` (registered by name: nothing is imported until such a layer is seen).

``Conv1D`` (GPT-2, GPT, ...) is a Linear layer with a transposed weight ``W [in, out]``, computed as
``addmm(b, x, W)``: per-sample g_i = Σ_t x_it δ_itᵀ, the transpose of nn.Linear's δ_i a_iᵀ (eq. 1).
"""

from __future__ import annotations

import torch

from .blocks import _combine, compute_dtype, sample_blocks, samples_moments, shared_buffer
from .linear import _bias_moments, _linear_weight_moments
from .registry import RuleContext, register_grad_sampler, register_moment_rule

CONV1D = "transformers.pytorch_utils.Conv1D"


def _flat(layer, a: torch.Tensor, d: torch.Tensor):
    """``(a [B, T, in], d [B, T, out])`` or ``None`` when the shapes are not a Conv1D call's."""
    if not isinstance(a, torch.Tensor) or a.ndim < 2 or d.shape[:-1] != a.shape[:-1]:
        return None
    if a.shape[-1] != layer.weight.shape[0] or d.shape[-1] != layer.weight.shape[1]:
        return None
    B = int(a.shape[0])
    return a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])


@register_moment_rule(CONV1D)
def conv1d_moments(layer, ctx: RuleContext) -> dict | None:
    """transformers' Conv1D: nn.Linear's rule with the roles of input and backprop swapped (W is ``[in, out]``).

    One token per sample: g_i = x_i δ_iᵀ is rank one, Σg² = (x²)ᵀ(δ²) and exact sign counts by
    integer products; several tokens: per-sample gradients x_iᵀ δ_i by batched products, block by block.
    """
    flat = _flat(layer, ctx.activations[0] if ctx.activations else None, ctx.backprops)
    if flat is None:
        return None
    a, d = flat
    W, b = layer.weight, layer.bias
    dt = compute_dtype(W)
    B = int(a.shape[0])
    out: dict = {}
    if a.shape[1] == 1:
        a, d = a[:, 0].to(dt), d[:, 0].to(dt)
        if W.requires_grad:
            grad = None if ctx.grads is None else ctx.grads.get(W)
            # _linear_weight_moments forms [d.shape[1], a.shape[1]]: pass x as "d" and δ as "a".
            out[W] = _linear_weight_moments(W, d, a, ctx.signs, ctx.budget, grad, ctx.scratch)
        if b is not None and b.requires_grad:
            out[b] = samples_moments(d, ctx.signs)
        return out
    if W.requires_grad:
        isz = torch.finfo(dt).bits // 8
        per_sample = W.numel() * (3 * isz + 2) + (a.shape[1] * (a.shape[2] + d.shape[2])) * isz
        acc = None
        for s, e in sample_blocks(B, per_sample, ctx.budget):
            buf = shared_buffer(ctx.scratch, "g", (e - s, *W.shape), dt, W.device)
            g = torch.bmm(a[s:e].to(dt).transpose(1, 2), d[s:e].to(dt), out=buf)
            acc = _combine(acc, samples_moments(g, ctx.signs, ctx.scratch))
            del g
        out[W] = acc
    if b is not None and b.requires_grad:
        out[b] = _bias_moments(d.to(dt), ctx.signs, d.dtype)
    return out


@register_grad_sampler(CONV1D)
def conv1d_grad_sample(layer, activations: list, backprops: torch.Tensor) -> dict:
    """transformers' Conv1D per-sample gradients: ∂/∂W = Σ_t x_t δ_tᵀ ``[B, in, out]``, ∂/∂b = Σ_t δ_t."""
    flat = _flat(layer, activations[0] if activations else None, backprops)
    if flat is None:
        raise RuntimeError("Conv1D: input and backprops do not have the layer's feature sizes")
    a, d = flat
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.bmm(a.transpose(1, 2), d)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = d.sum(1)
    return out
