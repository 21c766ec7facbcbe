"""Sampling uncertainty of the GSNR statistics, from per-fold moments (pure math, float64).

The training set is split into K disjoint folds (chunks assigned round-robin) whose moments are
kept apart before being merged with Chan's formula, so the full-data statistics are unchanged.
The delete-one-fold jackknife then gives a standard error of any smooth statistic of the moments
without assuming the parameter elements independent (their gradients are strongly correlated):

    SE² = (K − 1)/K · Σ_k (θ_(−k) − θ̄_(·))²,   θ_(−k) the statistic of every fold but k.

Used for the single-set OSGR R = 1 − Σ_j ρ²_j / (n Σ_j ḡ_j²) (eq. 19), whose interval the
run-level verdict integrates. Also here: GSNR's sampling floor and its bias-corrected estimate.
For an element whose true mean gradient is 0, E[ḡ²] = σ²/n, so r̂ = ḡ²/ρ² ≈ r + 1/n: the mean
GSNR cannot fall below about 1/n whatever the model does; (ḡ² − ρ²/n)/ρ² removes that bias.
"""

from __future__ import annotations

import math

import torch

from .moments import Moments

__all__ = ["gsnr_floor", "bias_corrected_gsnr", "fold_sums", "jackknife_osgr"]


def gsnr_floor(n: int) -> float:
    """1/n: the expected GSNR estimate of an element whose true mean gradient is 0 (E[ḡ²] = σ²/n)."""
    return 1.0 / n


def bias_corrected_gsnr(mean: torch.Tensor, var: torch.Tensor, n: int) -> torch.Tensor:
    """(ḡ² − ρ²/n)/ρ² per element: the GSNR with the sampling floor 1/n removed (may be negative); NaN where ρ² = 0."""
    r = (mean.square() - var / n) / var
    return torch.where(var > 0, r, torch.full_like(r, math.nan))


def fold_sums(folds: list[Moments]) -> list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Per fold: (n_k, {name: Σ_i g_ij}, {name: M2_kj}) from its moments (float64)."""
    out = []
    for m in folds:
        if m.n == 0:
            continue
        out.append((m.n, {k: m.mean[k] * m.count[k] for k in m.count}, {k: m.m2[k] for k in m.count}))
    return out


def _osgr_from(n: int, total: dict[str, torch.Tensor], m2: dict[str, torch.Tensor]) -> float | None:
    signal = sum(float((t / n).square().sum()) for t in total.values())
    noise = sum(float(v.sum()) for v in m2.values()) / (n - 1)
    return None if signal <= 0 else 1.0 - noise / (n * signal)


def jackknife_osgr(folds: list[Moments]) -> tuple[float | None, float | None]:
    """(R of all folds pooled, delete-one-fold jackknife standard error of R); SE ``None`` with < 3 folds.

    M2 of the pool without fold k comes from Chan's formula run backwards:
    M2_(−k) = M2 − M2_k − δ²·n_k·n_(−k)/n with δ the difference of the two means.
    """
    parts = fold_sums(folds)
    if not parts:
        return None, None
    n = sum(p[0] for p in parts)
    names = list(parts[0][1])
    total = {k: sum(p[1][k] for p in parts) for k in names}
    mean = {k: total[k] / n for k in names}
    m2 = {k: sum(p[2][k] for p in parts) for k in names}
    for nk, sk, _ in parts:  # between-fold part of the pooled M2
        for k in names:
            d = sk[k] / nk - mean[k]
            m2[k] = m2[k] + d.square() * nk
    r_full = _osgr_from(n, total, m2) if n >= 2 else None
    if len(parts) < 3 or r_full is None:
        return r_full, None
    loo = []
    for nk, sk, m2k in parts:
        rest = n - nk
        if rest < 2:
            return r_full, None
        t_rest = {k: total[k] - sk[k] for k in names}
        m2_rest = {}
        for k in names:
            delta = sk[k] / nk - t_rest[k] / rest
            m2_rest[k] = (m2[k] - m2k[k] - delta.square() * (nk * rest / n)).clamp(min=0.0)
        r = _osgr_from(rest, t_rest, m2_rest)
        if r is None:
            return r_full, None
        loo.append(r)
    K = len(loo)
    avg = sum(loo) / K
    se = math.sqrt((K - 1) / K * sum((r - avg) ** 2 for r in loo))
    return r_full, se
