"""Per-layer-type ways to get a chunk's gradient moments, in registries like Opacus' grad samplers.

Two registries, looked up by exact module type (as Opacus does):

* ``MOMENT_RULES[cls](layer, activations, backprops, signs, *, budget, grads, scratch) -> {param: ChunkMoments}``
  computes Σg, Σg² and sign counts of one chunk *without* keeping the per-sample gradients
  of the whole chunk (issue 7): by algebra where it allows (nn.Linear on 2-D input,
  Embedding), otherwise block by block over samples so that no materialized block exceeds
  ``budget`` bytes. ``grads`` maps a parameter to the batch gradient ∂L/∂θ = Σ_i g_i / B
  (autograd already computed it), which a rule may use for the mean instead of recomputing
  it. ``scratch`` is a dict the caller keeps across chunks: a rule may keep work buffers
  there (re-used, so large ones are not allocated and page-faulted every chunk); the
  ChunkMoments it returns may then live in those buffers, valid until the next chunk. A rule returns
  ``None`` to decline (e.g. an input shape it does not handle). Used when a layer is called
  once and its parameters are not shared.
* ``GRAD_SAMPLERS[cls](layer, activations, backprops) -> {param: grad_sample [B, *shape]}``
  adds samplers for layers Opacus has none for (BatchNorm in eval mode); Opacus' own
  samplers are used for the rest.

``backprops`` are already rescaled so that they are the gradient of each sample's own
loss (Opacus' ``loss_reduction="mean"`` convention).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .moments import ChunkMoments

MomentRule = Callable[..., "dict | None"]
GradSampler = Callable[[nn.Module, list, torch.Tensor], dict]

MOMENT_RULES: dict[type, MomentRule] = {}
GRAD_SAMPLERS: dict[type, GradSampler] = {}

#: Default bound on the bytes of one materialized block (``gradient_stats(max_memory_mb=512)``).
DEFAULT_MAX_MEMORY_MB = 512
DEFAULT_BUDGET = DEFAULT_MAX_MEMORY_MB * 2**20


def register_moment_rule(*classes: type) -> Callable[[MomentRule], MomentRule]:
    """Decorator: register ``f(layer, activations, backprops, signs, *, budget, sums)`` for ``classes``."""

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


# --- helpers --------------------------------------------------------------------------------
def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the rules compute in: the parameter's own for float32/float64, float32 below that."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def sample_blocks(batch: int, per_sample_bytes: float, budget: float):
    """``(start, stop)`` ranges over the samples so that one block holds at most ``budget`` bytes."""
    step = max(1, int(budget // max(per_sample_bytes, 1.0)))
    for s in range(0, batch, step):
        yield s, min(batch, s + step)


def samples_moments(g: torch.Tensor, signs: bool) -> ChunkMoments:
    """Moments of materialized per-sample gradients ``g`` [b, *shape] (two-pass, no Σg² − nḡ²).

    float64 input: :meth:`ChunkMoments.from_samples`. float32 input: the two passes run in
    float32 (the per-sample gradients themselves carry float32 rounding; a two-pass M2 adds
    only ~1e-7 relative error on top) and the results are stored in float64.
    """
    if g.dtype == torch.float64:
        return ChunkMoments.from_samples(g, signs)
    g = g.to(torch.float32)
    mean = g.mean(0)
    m2 = (g - mean).square_().sum(0)
    pos = neg = None
    if signs and g.shape[0] < 2**24:
        # S = Σ sign(g), N = Σ |sign(g)| (exact integers in float32); #pos = (N + S)/2, #neg = N − #pos
        sg = torch.sign(g)
        s_cnt = sg.sum(0)
        n_cnt = sg.abs_().sum(0)
        pos = s_cnt.add_(n_cnt).mul_(0.5)
        neg = n_cnt.sub_(pos)
    elif signs:
        pos = (g > 0).sum(0, dtype=torch.float64)
        neg = (g < 0).sum(0, dtype=torch.float64)
    return ChunkMoments(int(g.shape[0]), mean.to(torch.float64), m2.to(torch.float64), pos, neg)


def _combine(acc: ChunkMoments | None, c: ChunkMoments) -> ChunkMoments:
    return c if acc is None else acc.combine(c)


_INT8_MM_OK: dict[str, bool] = {}


def _count_mm(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """xᵀy for matrices with entries in {-1, 0, 1}, exactly, as an integer tensor.

    int8 × int8 → int32 products (``torch._int_mm``, 4–5× faster than float32 on CPUs with
    VNNI) where the device supports them; otherwise float32, exact for up to 2²⁴ samples
    (every partial sum is an integer of magnitude ≤ the number of samples), float64 above.
    """
    dev = x.device.type
    if _INT8_MM_OK.get(dev, True) and hasattr(torch, "_int_mm") and x.shape[0] < 2**31:
        try:
            if out is not None:
                return torch._int_mm(x.to(torch.int8).t(), y.to(torch.int8), out=out)
            r = torch._int_mm(x.to(torch.int8).t(), y.to(torch.int8))
            _INT8_MM_OK[dev] = True
            return r
        except (RuntimeError, NotImplementedError):
            _INT8_MM_OK[dev] = False
    dt = torch.float32 if x.shape[0] < 2**24 else torch.float64
    r = (x.to(dt).t() @ y.to(dt)).to(torch.int32)
    return r if out is None else out.copy_(r)


def sign_counts_outer(d: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of positive and negative entries of g_i = d_i a_iᵀ over samples i, per (out, in) element.

    sign(d·a) = sign(d)·sign(a), so with S = sign(d)ᵀsign(a) and N = |sign(d)|ᵀ|sign(a)|
    (the number of samples where g ≠ 0): #pos = (N + S)/2 and #neg = (N − S)/2 — two exact
    integer matrix products (issue 7, req. 1).
    """
    sd, sa = torch.sign(d), torch.sign(a)
    s = _count_mm(sd, sa)
    n = _count_mm(sd.abs(), sa.abs())
    pos = torch.add(n, s).bitwise_right_shift_(1)  # (N + S)/2, exact in integers
    neg = n.sub_(pos)  # N − pos
    return pos, neg


def _buffer(scratch: dict | None, owner: torch.Tensor, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """A work buffer kept in ``scratch`` (keyed by the parameter and a name), or a new one."""
    shape = tuple(shape)
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=owner.device)
    key = (id(owner), name)
    t = scratch.get(key)
    if t is None or tuple(t.shape) != shape or t.dtype != dtype:
        t = scratch[key] = torch.empty(shape, dtype=dtype, device=owner.device)
    return t


def _linear_weight_moments(W: torch.Tensor, a: torch.Tensor, d: torch.Tensor, signs: bool, budget: float,
                           grad: torch.Tensor | None, scratch: dict | None) -> ChunkMoments:
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
def linear_moments(layer: nn.Linear, activations: list, backprops: torch.Tensor, signs: bool, *,
                   budget: float = DEFAULT_BUDGET, grads: dict | None = None,
                 scratch: dict | None = None) -> dict | None:
    """nn.Linear (issue 7, req. 1).

    2-D input [B, in] (or extra dimensions of size 1): per-sample g_i = δ_i a_iᵀ is rank one,
    so Σg² = (δ²)ᵀ(a²) and the sign counts come from two integer products of sign matrices
    (:func:`sign_counts_outer`); the mean Σg/B = δᵀa/B is the batch gradient (``grads``) when given.
    Products run in the parameter's dtype (float32 for a float32 model: relative error
    ~1e-7·(1 + GSNR) in ρ²; float64 for a float64 model) and are stored in float64.

    Input with extra dimensions [B, T..., in] (sequences): g_i = Σ_t δ_it a_itᵀ is not rank
    one; per-sample gradients are formed block by block over samples (batched products,
    at most ``budget`` bytes per block) and reduced at once.
    """
    a, d = activations[0], backprops
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
            g = torch.bmm(d[s:e].to(dt).transpose(1, 2), a[s:e].to(dt))
            acc = _combine(acc, samples_moments(g, signs))
            del g
        out[W] = acc
    if b is not None and b.requires_grad:
        out[b] = _bias_moments(d.to(dt), signs)
    return out


# --- convolutions ---------------------------------------------------------------------------
def _unfold(layer: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """im2col: [b, C_in, *spatial] → [b, C_in·∏k, L] with the layer's padding, stride and dilation."""
    nd = x.ndim - 2
    padding = layer.padding
    if isinstance(padding, str) or layer.padding_mode != "zeros":
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * nd
    if nd == 1:
        return F.unfold(x.unsqueeze(2), kernel_size=(1, layer.kernel_size[0]), dilation=(1, layer.dilation[0]),
                        padding=(0, padding[0]), stride=(1, layer.stride[0]))
    if nd == 2:
        return F.unfold(x, kernel_size=layer.kernel_size, dilation=layer.dilation, padding=padding,
                        stride=layer.stride)
    from opacus.utils.tensor_utils import unfold3d

    return unfold3d(x, kernel_size=layer.kernel_size, padding=tuple(padding), stride=layer.stride,
                    dilation=layer.dilation)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_weight_moments_grouped(layer, x: torch.Tensor, d: torch.Tensor, dt: torch.dtype, signs: bool,
                                 budget: float) -> ChunkMoments:
    """Per-sample weight gradients of a groups=1 convolution as one convolution per block of b samples.

    g_i[o, c, k] = Σ_p δ_i[o, p] x_i[c, p·stride + k·dilation − pad] is itself a convolution of
    the input (samples as channels, channels as batch) with δ as a kernel (groups = b, stride
    and dilation swapped) — the optimized convolution kernels instead of im2col (as in
    torch's expanded weights).
    """
    nd = x.ndim - 2
    padding = layer.padding
    if isinstance(padding, str) or layer.padding_mode != "zeros":
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * nd
    W = layer.weight
    cout, cin = layer.out_channels, layer.in_channels
    isz = torch.finfo(dt).bits // 8
    B = int(x.shape[0])
    per_sample = 2 * (x[0].numel() + d[0].numel() + 4 * W.numel()) * isz
    acc = None
    for s, e in sample_blocks(B, per_sample, budget):
        n = e - s
        xb, db = x[s:e].to(dt), d[s:e].to(dt)
        g = _CONV[nd](xb.transpose(0, 1), db.reshape(n * cout, 1, *db.shape[2:]), None, stride=layer.dilation,
                      padding=padding, dilation=layer.stride, groups=n)
        for i in range(nd):
            g = g.narrow(2 + i, 0, layer.kernel_size[i])
        g = g.reshape(cin, n, cout, *layer.kernel_size).movedim(0, 2)
        acc = _combine(acc, samples_moments(g, signs))
        del g
    return acc


@register_moment_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_moments(layer: nn.modules.conv._ConvNd, activations: list, backprops: torch.Tensor, signs: bool, *,
                 budget: float = DEFAULT_BUDGET, grads: dict | None = None,
                 scratch: dict | None = None) -> dict | None:
    """Conv1d/2d/3d, block by block over samples (≤ ``budget`` bytes per block).

    groups = 1: per-sample weight gradients as one grouped convolution per block
    (:func:`_conv_weight_moments_grouped`). groups > 1: unfold (im2col) + batched products;
    per sample and group, g = δ Uᵀ with δ [C_out/G, L] and U [C_in/G·∏k, L], so only
    [b, C_out, C_in/G, *k] per-sample gradients and the [b, C_in·∏k, L] unfolded input of
    one block of b samples exist at a time (≤ ``budget`` bytes); groups never form the
    cross-group products.
    """
    x, d = activations[0], backprops
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
        out[bias] = samples_moments(d.to(dt).reshape(B, cout, -1).sum(-1), signs)
    return out


# --- nn.Embedding ---------------------------------------------------------------------------
@register_moment_rule(nn.Embedding)
def embedding_moments(layer: nn.Embedding, activations: list, backprops: torch.Tensor, signs: bool, *,
                      budget: float = DEFAULT_BUDGET, grads: dict | None = None,
                 scratch: dict | None = None) -> dict | None:
    """nn.Embedding: a segment-sum over the rows each sample touches (never a dense B×V×D tensor).

    Sample i's gradient is non-zero only in the rows of the tokens it contains: row v gets
    Σ_{t: x_it = v} δ_it (repeated tokens add up; ``padding_idx`` gets none). The (sample,
    row) pairs are found with one ``unique``, their vectors with one ``index_add_``, and
    Σg, Σg² and sign counts by scattering those vectors into their rows. Samples that do
    not touch a row contribute exact zeros, which add nothing to any of the sums.
    Declines ``scale_grad_by_freq`` (its batch gradient mixes samples) and sparse gradients.
    """
    idx, d = activations[0], backprops
    W = layer.weight
    if not W.requires_grad:
        return {}
    if (not isinstance(idx, torch.Tensor) or idx.ndim < 1 or layer.scale_grad_by_freq or layer.sparse
            or idx.is_floating_point()):
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


# --- normalization layers -------------------------------------------------------------------
def _affine_norm_moments(layer: nn.Module, x: torch.Tensor, d: torch.Tensor, xhat_fn, reduce_dims, signs: bool,
                         budget: float) -> dict:
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
            g = (d[s:e].to(dt) * xhat_fn(xb))
            g = g.sum(reduce_dims) if reduce_dims else g
            acc = _combine(acc, samples_moments(g.reshape(e - s, *W.shape), signs))
        out[W] = acc
    if b is not None and b.requires_grad:
        g = d.to(dt)
        g = g.sum(reduce_dims) if reduce_dims else g
        out[b] = samples_moments(g.reshape(B, *b.shape), signs)
    return out


@register_moment_rule(nn.LayerNorm)
def layer_norm_moments(layer: nn.LayerNorm, activations: list, backprops: torch.Tensor, signs: bool, *,
                       budget: float = DEFAULT_BUDGET, grads: dict | None = None,
                 scratch: dict | None = None) -> dict | None:
    """nn.LayerNorm (with or without bias): x̂ over ``normalized_shape``, summed over the other dims."""
    x = activations[0]
    k = len(layer.normalized_shape)
    if not isinstance(x, torch.Tensor) or x.ndim < k + 1 or (layer.weight is None and layer.bias is None):
        return None
    reduce_dims = tuple(range(1, x.ndim - k))
    fn = lambda xb: F.layer_norm(xb, layer.normalized_shape, eps=layer.eps)  # noqa: E731
    return _affine_norm_moments(layer, x, backprops, fn, reduce_dims, signs, budget)


@register_moment_rule(nn.GroupNorm)
def group_norm_moments(layer: nn.GroupNorm, activations: list, backprops: torch.Tensor, signs: bool, *,
                       budget: float = DEFAULT_BUDGET, grads: dict | None = None,
                 scratch: dict | None = None) -> dict | None:
    """nn.GroupNorm: x̂ per (sample, group), per-channel γ/β summed over the spatial dims."""
    x = activations[0]
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or layer.weight is None:
        return None
    reduce_dims = tuple(range(2, x.ndim))
    fn = lambda xb: F.group_norm(xb, layer.num_groups, eps=layer.eps)  # noqa: E731
    return _affine_norm_moments(layer, x, backprops, fn, reduce_dims, signs, budget)


if hasattr(nn, "RMSNorm"):

    @register_moment_rule(nn.RMSNorm)
    def rms_norm_moments(layer: nn.Module, activations: list, backprops: torch.Tensor, signs: bool, *,
                         budget: float = DEFAULT_BUDGET, grads: dict | None = None,
                 scratch: dict | None = None) -> dict | None:
        """nn.RMSNorm: x̂ = x / rms(x) over ``normalized_shape``; γ summed over the other dims."""
        x = activations[0]
        k = len(layer.normalized_shape)
        if not isinstance(x, torch.Tensor) or x.ndim < k + 1 or layer.weight is None:
            return None
        reduce_dims = tuple(range(1, x.ndim - k))
        fn = lambda xb: F.rms_norm(xb, layer.normalized_shape, eps=layer.eps)  # noqa: E731
        return _affine_norm_moments(layer, x, backprops, fn, reduce_dims, signs, budget)


def _batchnorm_xhat(layer: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean = layer.running_mean.view(shape).to(x.dtype)
    var = layer.running_var.view(shape).to(x.dtype)
    return (x - mean) / torch.sqrt(var + layer.eps)


@register_moment_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batchnorm_eval_moments(layer: nn.modules.batchnorm._BatchNorm, activations: list, backprops: torch.Tensor,
                           signs: bool, *, budget: float = DEFAULT_BUDGET, grads: dict | None = None,
                 scratch: dict | None = None) -> dict | None:
    """BatchNorm with running statistics (eval mode only; in train mode it mixes samples)."""
    x = activations[0]
    if layer.training or layer.running_mean is None or not isinstance(x, torch.Tensor) or x.ndim < 2:
        return None
    reduce_dims = tuple(range(2, x.ndim))
    return _affine_norm_moments(layer, x, backprops, lambda xb: _batchnorm_xhat(layer, xb), reduce_dims, signs,
                                budget)


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
