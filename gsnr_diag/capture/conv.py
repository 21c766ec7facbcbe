"""Conv1d/2d/3d: per-sample weight gradients as a grouped weight gradient (groups = 1) or im2col, in blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.moments import ChunkMoments
from .blocks import _combine, compute_dtype, sample_blocks, samples_moments, sum_moments
from .registry import RuleContext, register_moment_rule


def _explicit_padding(layer: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple | str]:
    """``(x, padding)`` with string padding or a non-zero padding mode applied to ``x`` (padding then 0)."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), (0,) * (x.ndim - 2)
    return x, layer.padding


def _unfold(layer: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """im2col: [b, C_in, *spatial] → [b, C_in·∏k, L] with the layer's padding, stride and dilation."""
    nd = x.ndim - 2
    x, padding = _explicit_padding(layer, x)
    if nd == 1:
        return F.unfold(
            x.unsqueeze(2),
            kernel_size=(1, layer.kernel_size[0]),
            dilation=(1, layer.dilation[0]),
            padding=(0, padding[0]),
            stride=(1, layer.stride[0]),
        )
    if nd == 2:
        return F.unfold(x, kernel_size=layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
    from opacus.utils.tensor_utils import unfold3d

    return unfold3d(
        x, kernel_size=layer.kernel_size, padding=tuple(padding), stride=layer.stride, dilation=layer.dilation
    )


def _conv_weight_moments_grouped(
    layer, x: torch.Tensor, d: torch.Tensor, dt: torch.dtype, signs: bool, budget: float
) -> ChunkMoments:
    """Per-sample weight gradients of a groups=1 convolution as one grouped weight gradient per block of b samples.

    The b samples become the b groups of one convolution (input [1, b·C_in, ...], output gradient
    [1, b·C_out, ...]), whose weight gradient [b·C_out, C_in, *k] holds g_i[o, c, k] =
    Σ_p δ_i[o, p] x_i[c, p·stride + k·dilation − pad] of every sample i — the backend's optimized
    weight-gradient kernel (as torch.func's batching rule for convolutions does), measured 4× faster
    than a forward convolution with samples and channels swapped. Only the weight's shape is used.
    """
    x, padding = _explicit_padding(layer, x)
    W = layer.weight
    cout, cin = layer.out_channels, layer.in_channels
    isz = torch.finfo(dt).bits // 8
    B = int(x.shape[0])
    per_sample = 2 * (x[0].numel() + d[0].numel() + 4 * W.numel()) * isz
    acc = None
    for s, e in sample_blocks(B, per_sample, budget):
        n = e - s
        xb = x[s:e].to(dt).reshape(1, n * cin, *x.shape[2:])
        db = d[s:e].to(dt).reshape(1, n * cout, *d.shape[2:])
        shape = (n * cout, cin, *layer.kernel_size)
        _, g, _ = torch.ops.aten.convolution_backward(
            db,
            xb,
            torch.zeros((), dtype=dt, device=W.device).expand(shape),
            None,
            list(layer.stride),
            list(padding),
            list(layer.dilation),
            False,
            [0] * (x.ndim - 2),
            n,
            [False, True, False],
        )
        acc = _combine(acc, samples_moments(g.reshape(n, cout, cin, *layer.kernel_size), signs))
        del g
    return acc


@register_moment_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_moments(layer: nn.modules.conv._ConvNd, ctx: RuleContext) -> dict | None:
    """Conv1d/2d/3d, block by block over samples (≤ ``budget`` bytes per block).

    groups = 1: per-sample weight gradients as one grouped convolution per block
    (:func:`_conv_weight_moments_grouped`). groups > 1: unfold (im2col) + batched products;
    per sample and group, g = δ Uᵀ with δ [C_out/G, L] and U [C_in/G·∏k, L], so only
    [b, C_out, C_in/G, *k] per-sample gradients and the [b, C_in·∏k, L] unfolded input of
    one block of b samples exist at a time (≤ ``budget`` bytes); groups never form the
    cross-group products.
    """
    x, d = ctx.activations[0], ctx.backprops
    signs, budget = ctx.signs, ctx.budget
    nd = len(layer.kernel_size)
    if not isinstance(x, torch.Tensor) or x.ndim != nd + 2 or d.ndim != nd + 2:
        return None  # unbatched input
    W, bias = layer.weight, layer.bias
    dt = compute_dtype(W)
    isz = torch.finfo(dt).bits // 8
    B, G = int(x.shape[0]), layer.groups
    cout, cin = layer.out_channels, layer.in_channels
    K = math.prod(layer.kernel_size)
    L = math.prod(d.shape[2:])
    out: dict = {}
    if W.requires_grad and G == 1:
        out[W] = _conv_weight_moments_grouped(layer, x, d, dt, signs, budget)
    elif W.requires_grad:
        per_sample = (cin * K * L + x[0].numel() + cout * L + W.numel() * 3) * isz + W.numel() * 2
        acc = None
        for s, e in sample_blocks(B, per_sample, budget):
            u = _unfold(layer, x[s:e].to(dt))
            if u.shape[-1] != L:
                return None
            n = e - s
            u = u.view(n, G, (cin // G) * K, L)
            db = d[s:e].to(dt).reshape(n, G, cout // G, L)
            g = torch.matmul(db, u.transpose(-1, -2)).reshape(n, *W.shape)
            del u
            acc = _combine(acc, samples_moments(g, signs))
            del g
        out[W] = acc
    if bias is not None and bias.requires_grad:
        out[bias] = sum_moments(d.to(dt).reshape(B, cout, -1), (2,), signs, d.dtype)
    return out
