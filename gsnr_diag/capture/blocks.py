"""Shared pieces of the moment rules: sample blocks within a memory budget, exact sign counts, buffers."""

from __future__ import annotations

import math
import time

import torch

from ..core.moments import ChunkMoments
from ..core.roundoff import sum_floor


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the rules compute in: the parameter's own for float32/float64, float32 below that."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def sample_blocks(batch: int, per_sample_bytes: float, budget: float):
    """``(start, stop)`` ranges over the samples so that one block holds at most ``budget`` bytes."""
    step = max(1, int(budget // max(per_sample_bytes, 1.0)))
    for s in range(0, batch, step):
        yield s, min(batch, s + step)


def shared_buffer(scratch: dict | None, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor | None:
    """A work buffer of ``shape`` shared by every layer (layers are reduced one after another), grown as needed.

    Reusing it across layers and chunks spares the page faults of a fresh block each time; its size
    stays within one block of the largest layer (``max_memory_mb``). ``None`` without ``scratch``.
    """
    if scratch is None:
        return None
    n = 1
    for s in shape:
        n *= int(s)
    key = ("shared", name, dtype, str(device))
    t = scratch.get(key)
    if t is None or t.numel() < n:
        t = scratch[key] = torch.empty(n, dtype=dtype, device=device)
    return t[:n].view(tuple(shape))


def samples_moments(g: torch.Tensor, signs: bool, scratch: dict | None = None) -> ChunkMoments:
    """Moments of materialized per-sample gradients ``g`` [b, *shape] (two-pass, no Σg² − nḡ²).

    float64 input: :meth:`ChunkMoments.from_samples`. float32 input: the two passes run in
    float32 (the per-sample gradients themselves carry float32 rounding; a two-pass M2 adds
    only ~1e-7 relative error on top) and the results are stored in float64. ``scratch``: the
    rules' work-buffer dict (the deviations go into a shared buffer; ``g`` must not be that buffer).
    """
    if g.dtype == torch.float64:
        return ChunkMoments.from_samples(g, signs)
    g = g.to(torch.float32)
    b = int(g.shape[0])
    shape = g.shape[1:]
    flat = g.reshape(b, -1)
    N = int(flat.shape[1])
    if signs and b >= 2**24:
        return _moments_64_counts(g)
    # Sums over the samples as products with a row of ones (a GEMV, ~3× faster than .sum(0) on
    # [b, N], the same float32 accumulation), over column blocks of ~1 MB so that the passes
    # (mean, deviations, squares, signs) run in cache (1-2 MB measured 1.5-2x faster than 256 KB on an
    # AVX2 EPYC: fewer op calls per element); one work buffer serves every block.
    ones = torch.ones(1, b, dtype=torch.float32, device=g.device)
    cw = N if g.device.type != "cpu" else max(64, min(N, (1 << 20) // (4 * b)))
    buf = shared_buffer(scratch, "work", (b * cw,), torch.float32, g.device)
    work = torch.empty(b * cw, dtype=torch.float32, device=g.device) if buf is None else buf
    out = torch.empty(4 if signs else 2, N, dtype=torch.float32, device=g.device)
    m2 = out[1:2]
    # the mean from float64 sums (identical samples give M2 = 0), block by block: the block converted in
    # cache and summed by a float64 GEMV is 3-4x faster than flat.sum(0, dtype=float64) on CPU
    on_cpu = g.device.type == "cpu"
    if on_cpu:
        ones64 = torch.ones(1, b, dtype=torch.float64, device=g.device)
        work64 = torch.empty(b * cw, dtype=torch.float64, device=g.device)
        mean64 = torch.empty(1, N, dtype=torch.float64, device=g.device)
        mean32 = torch.empty(1, N, dtype=torch.float32, device=g.device)
    else:
        mean64 = flat.sum(0, dtype=torch.float64, keepdim=True).div_(b)
        mean32 = mean64.to(torch.float32)
    for c0 in range(0, N, cw):
        c1 = min(N, c0 + cw)
        blk, w = flat[:, c0:c1], work[: b * (c1 - c0)].view(b, c1 - c0)
        if on_cpu:
            w64 = work64[: b * (c1 - c0)].view(b, c1 - c0)
            torch.mm(ones64, w64.copy_(blk), out=mean64[:, c0:c1])
            mean32[:, c0:c1].copy_(mean64[:, c0:c1].div_(b))
        mc = mean32[:, c0:c1]
        torch.mm(ones, torch.sub(blk, mc, out=w).square_(), out=m2[:, c0:c1])
        if signs:
            # S = Σ sign(g), N = Σ |sign(g)| (exact integers in float32); #pos = (N + S)/2, #neg = N − #pos
            torch.mm(ones, torch.sign(blk, out=w), out=out[2:3, c0:c1])
            torch.mm(ones, w.abs_(), out=out[3:4, c0:c1])
    pos = neg = None
    if signs:
        s_cnt, n_cnt = out[2], out[3]
        pos = s_cnt.add_(n_cnt).mul_(0.5).reshape(shape)
        neg = n_cnt.sub_(out[2]).reshape(shape)
    return ChunkMoments(b, mean64.reshape(shape), m2.reshape(shape).to(torch.float64), pos, neg)


def _moments_64_counts(g: torch.Tensor) -> ChunkMoments:
    """Two-pass moments with float64 sign counts (2²⁴ samples or more: float32 counts would not be exact)."""
    mean = g.mean(0)
    m2 = (g - mean).square_().sum(0)
    pos = (g > 0).sum(0, dtype=torch.float64)
    neg = (g < 0).sum(0, dtype=torch.float64)
    return ChunkMoments(int(g.shape[0]), mean.to(torch.float64), m2.to(torch.float64), pos, neg)


def sum_moments(t: torch.Tensor, dims: tuple[int, ...], signs: bool, eps_dtype: torch.dtype) -> ChunkMoments:
    """Moments of per-sample gradients g_i = Σ_p t_ip (``t`` summed over ``dims``), with round-off evidence.

    Besides :func:`samples_moments` of g, records each element's round-off bound
    (:func:`~gsnr_diag.core.roundoff.sum_floor` of Σ_p |t_ip|, with ε of ``eps_dtype``, the dtype the terms
    were computed in) and how many samples exceed it, so that a sum that is zero in exact arithmetic
    (a bias before a normalization) is recognized as rounding noise.
    """
    g = t.sum(dims)
    terms = math.prod(t.shape[d] for d in dims)
    floor = sum_floor(t.abs().sum(dims), terms, eps_dtype)
    c = samples_moments(g, signs)
    c.floor = floor.amax(0).to(torch.float64)
    c.resolved = (g.abs() > floor).sum(0, dtype=torch.float64)
    return c


def _combine(acc: ChunkMoments | None, c: ChunkMoments) -> ChunkMoments:
    return c if acc is None else acc.combine(c)


_INT8_MM_OK: dict[str, bool] = {}
_INT8_MM_FASTER: dict[str, bool] = {}  # device type → the int8 kernel beat float32 in a one-time timing
_INT8_MIN_SIZE = 2**16  # below this many result entries float32 is as fast as the checked int8 product


def _int8_faster(device: torch.device) -> bool:
    """Whether ``torch._int_mm`` is faster than a float32 product on this device type, timed once per process.

    On CPUs with VNNI (or AMX) the int8 product is 4–5× faster than float32; on others (e.g. AVX2-only
    AMD EPYC) PyTorch's int8 path is a reference loop, measured 40× *slower*. So it is timed once, on a
    128 × 256 · 256 × 256 product of sign matrices (≈ 1–5 ms), and kept only if it wins by 1.5×.
    """
    dev = device.type
    known = _INT8_MM_FASTER.get(dev)
    if known is not None:
        return known
    faster = False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(-1, 2, (256, 128), generator=g).to(device)
        y = torch.randint(-1, 2, (256, 256), generator=g).to(device)
        xi, yi, xf, yf = x.to(torch.int8).t(), y.to(torch.int8), x.float().t(), y.float()

        def best(f) -> float:
            times = []
            for _ in range(3):
                if dev == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                f()
                if dev == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t)
            return min(times)

        faster = best(lambda: torch._int_mm(xi, yi)) * 1.5 < best(lambda: xf @ yf)
    except (RuntimeError, NotImplementedError, AttributeError):
        faster = False
    _INT8_MM_FASTER[dev] = faster
    return faster


def _int8_used(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether xᵀy goes to the checked int8 kernel: trusted and faster on this device, a result large enough."""
    dev = x.device.type
    m, n = x.shape[1], y.shape[1]
    return (
        _INT8_MM_OK.get(dev, True)
        and hasattr(torch, "_int_mm")
        and min(m, n) >= 2
        and m * n >= _INT8_MIN_SIZE
        and _int8_faster(x.device)
    )


def _int8_mm_checked(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
    """xᵀy by ``torch._int_mm`` (int8 × int8 → int32), verified; ``None`` where it cannot be trusted.

    ``torch._int_mm`` is a private kernel: on some CPU builds it returns uninitialized memory,
    without an error, when the left operand has one row. It is used only for results of at least
    2 × 2 entries that are large enough to gain from it, and every result is checked exactly
    (Freivalds' test with a fixed integer vector r: (xᵀy)r = xᵀ(yr), in integers). A device
    whose kernel fails the check or raises is not asked again, nor is one where it is slower than
    float32 (:func:`_int8_faster`).
    """
    dev = x.device.type
    if not _int8_used(x, y):
        return None
    bound = 7 * x.shape[0] * y.shape[1]  # |(xᵀy)r| ≤ 7·k·n for r in {1..7}ⁿ and entries in {-1, 0, 1}
    if bound >= 2**31:
        return None
    try:
        xi, yi = x.to(torch.int8).t(), y.to(torch.int8)
        r = torch._int_mm(xi, yi) if out is None else torch._int_mm(xi, yi, out=out)
        v = torch.arange(y.shape[1], device=y.device, dtype=torch.int32).remainder_(7).add_(1)
        got = torch.mv(r, v)
    except (RuntimeError, NotImplementedError):
        _INT8_MM_OK[dev] = False
        return None
    ft = torch.float32 if bound < 2**24 else torch.float64  # integers below 2²⁴ (2⁵³) are exact
    if not torch.equal(got.to(ft), x.to(ft).t() @ (y.to(ft) @ v.to(ft))):
        _INT8_MM_OK[dev] = False
        return None
    _INT8_MM_OK[dev] = True
    return r


def _count_mm(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """xᵀy for matrices with entries in {-1, 0, 1}, exactly, as an int32 tensor.

    int8 × int8 → int32 products (``torch._int_mm``, 4–5× faster than float32 on CPUs with
    VNNI) where they are faster and pass :func:`_int8_mm_checked`; otherwise float32, exact for up to 2²⁴
    samples (every partial sum is an integer of magnitude ≤ the number of samples), float64 above.
    """
    r = _int8_mm_checked(x, y, out)
    if r is not None:
        return r
    dt = torch.float32 if x.shape[0] < 2**24 else torch.float64
    r = (x.to(dt).t() @ y.to(dt)).to(torch.int32)
    return r if out is None else out.copy_(r)


_ENCODED_MAX_NONNEG = 4095  # b·(b+1) < 2²⁴: the samples of one encoded product (a ≥ 0)


def _encoded_counts(d: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """#pos and #neg of g_i = d_i a_iᵀ over the rows of ``d``, for ``a`` ≥ 0, by one float32 product.

    With p = [d > 0], q = [d < 0], P = [a > 0] (0/1 matrices) and K = 2¹² > b for b ≤ 4095 samples,
    (p + Kq)ᵀP = #pos + K·#neg, both digits ≤ b. Every partial sum of the product is an integer
    below b·(K + 1) < 2²⁴, so float32 holds it exactly in any summation order; the digits come out
    exactly by power-of-two scaling and ``floor``. One product instead of two (:func:`sign_counts_outer`).
    """
    K = 4096.0
    x = (d > 0).to(torch.float32).add_((d < 0).to(torch.float32), alpha=K)
    r = x.t() @ (a > 0).to(torch.float32)
    neg = torch.mul(r, 1.0 / K).floor_()
    return r.add_(neg, alpha=-K), neg


def _sign_product_counts(d: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """#pos and #neg of g_i = d_i a_iᵀ over the rows (fewer than 2²⁴) of ``d``, ``a`` by one float32 product.

    S = sign(d)ᵀsign(a) = #pos − #neg, and N = #pos + #neg = |sign(d)|ᵀ|sign(a)| counts the samples
    where both factors are non-zero: for a column of ``a`` without zeros that is the number of
    non-zero entries of each column of ``d`` (a vector, no product). Only the columns of ``a`` that hold a
    zero need their own product (all of them when that is most). #pos = (N + S)/2, #neg = N − #pos.
    Every partial sum is an integer of magnitude below 2²⁴, exact in float32 in any summation order and
    at any ``float32_matmul_precision`` (the factors are 0 and ±1).
    """
    sd, sa = torch.sign(d).to(torch.float32), torch.sign(a).to(torch.float32)
    ones = torch.ones(1, d.shape[0], dtype=torch.float32, device=d.device)
    s = sd.t() @ sa
    n = (ones @ sd.abs()).t()  # [out, 1]: non-zero δ per output
    zeros = sa == 0
    if bool(zeros.any()):
        cols = zeros.any(0).nonzero()[:, 0]
        if 2 * cols.numel() > a.shape[1]:
            n = sd.abs_().t() @ sa.abs()
        else:
            n = n.expand_as(s).clone()
            n[:, cols] = sd.abs_().t() @ sa[:, cols].abs_()
    pos = s.add_(n).mul_(0.5)
    return pos, torch.sub(n, pos)


def sign_counts_outer(d: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of positive and negative entries of g_i = d_i a_iᵀ over samples i, per (out, in) element.

    Exact integers, as int32 or float32 (or float64 from 2²⁴ samples on). sign(d·a) = sign(d)·sign(a).
    Where int8 products are fast (:func:`_int8_faster`): with S = sign(d)ᵀsign(a) and
    N = |sign(d)|ᵀ|sign(a)| (the number of samples where g ≠ 0), #pos = (N + S)/2 and
    #neg = (N − S)/2 — two exact integer products. Elsewhere one float32 product: for ``a`` ≥ 0
    (after a ReLU) of base-K encoded indicator matrices (:func:`_encoded_counts`), over blocks of
    samples small enough to stay exact, where float32 products are full float32
    (``torch.get_float32_matmul_precision() == "highest"``); for ``a`` of both signs S alone, N from
    the zeros (:func:`_sign_product_counts`).
    """
    B = int(d.shape[0])
    if not _int8_used(d, a) and B < 2**24:
        if torch.get_float32_matmul_precision() != "highest" or bool((a < 0).any()):
            return _sign_product_counts(d, a)
        parts = -(-B // _ENCODED_MAX_NONNEG)
        bounds = [round(i * B / parts) for i in range(parts + 1)]
        pos = neg = None
        for lo, hi in zip(bounds, bounds[1:]):
            bp, bn = _encoded_counts(d[lo:hi], a[lo:hi])
            pos, neg = (bp, bn) if pos is None else (pos.add_(bp), neg.add_(bn))
        if pos is None:
            z = torch.zeros((d.shape[1], a.shape[1]), dtype=torch.float32, device=d.device)
            return z, z.clone()
        return pos, neg
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
