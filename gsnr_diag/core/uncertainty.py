"""Standard errors of the aggregate statistics by a delete-a-group jackknife over sample groups.

The n samples are dealt into G disjoint groups, each with its own streaming moments (the same
float64 (count, mean, M2, sign counts) as :class:`~gsnr_diag.core.moments.Moments`). For each g the
moments of all samples *but* group g are the Chan merge of the other groups, and every aggregate T
(mean GSNR, per-layer GSNR, same-sign fraction, OSGR, noise scale, m-coherence) is recomputed on
them, T_(−g). The delete-a-group jackknife standard error is

    SE(T) = sqrt( (G − 1)/G · Σ_g (T_(−g) − T̄)² ),   T̄ = (1/G) Σ_g T_(−g)

(Quenouille/Tukey jackknife; Kott 2001 for the delete-a-group form). It measures the sampling noise
of T over the training samples at fixed weights — not the seed-to-seed variation of training.
With G groups it costs G extra accumulators (memory G × the parameter count × 4 float64 tensors) and
G·(G − 2) merges when finishing.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .moments import Moments

__all__ = [
    "SCALAR_KEYS",
    "LAYER_KEYS",
    "leave_group_out",
    "jackknife_standard_errors",
    "flat_statistics",
    "gsnr_floor",
    "bias_corrected_gsnr",
    "fold_sums",
    "jackknife_osgr",
]

#: Aggregates of :class:`~gsnr_diag.core.stats.GradientStats` that get a standard error.
SCALAR_KEYS = ("mean_gsnr", "mean_same_sign", "osgr", "noise_scale", "m_coherence")
#: Per-layer maps that get one, keyed ``"<map>/<parameter name>"`` in the flat result.
LAYER_KEYS = ("layer_gsnr", "layer_same_sign", "layer_noise_scale", "layer_m_coherence")


def leave_group_out(groups: list[Moments], left_out: int) -> Moments:
    """Moments of every group but ``groups[left_out]``, merged with Chan's formula (exact in float64).

    Subtracting a group from the totals (Chan's formula backwards) would be cheaper but cancels: an
    element that is non-zero only in the left-out group would get a rounding-noise mean and variance
    instead of exact zeros (an undefined GSNR), so the other groups are merged afresh.
    """
    out = Moments(signs=groups[0].signs)
    for i, g in enumerate(groups):
        if i != left_out:
            out.merge(g)
    return out


def flat_statistics(stats: Any) -> dict[str, float | None]:
    """``{"mean_gsnr": ..., "layer_gsnr/<param>": ..., ...}`` of a GradientStats (the keys that get an SE)."""
    out: dict[str, float | None] = {k: getattr(stats, k, None) for k in SCALAR_KEYS}
    for key in LAYER_KEYS:
        for name, v in (getattr(stats, key, None) or {}).items():
            out[f"{key}/{name}"] = v
    return out


def jackknife_standard_errors(
    groups: list[Moments], weights: dict[str, torch.Tensor], *, epsilon: float = 0.0, mode: str = "eval"
) -> dict[str, float | None]:
    """Delete-a-group jackknife SE of every aggregate (keys of :func:`flat_statistics`).

    Groups with no samples are ignored; with fewer than 2 non-empty groups the result is ``{}``.
    A key whose value is undefined (``None``) in some leave-one-group-out set has SE ``None``.
    """
    from .stats import stats_from_moments  # stats imports nothing from here; keeps the module import-light

    used = [g for g in groups if g.n > 0]
    if len(used) < 2:
        return {}
    replicates = []
    for i in range(len(used)):
        rest = leave_group_out(used, i)
        if rest.n < 2:
            return {}
        replicates.append(flat_statistics(stats_from_moments(rest, weights, epsilon=epsilon, mode=mode)))
    G = len(replicates)
    keys = list(flat_statistics_keys(replicates))
    out: dict[str, float | None] = {}
    for key in keys:
        values = [r.get(key) for r in replicates]
        if any(v is None or not math.isfinite(v) for v in values):
            out[key] = None
            continue
        mean = sum(values) / G
        out[key] = math.sqrt((G - 1) / G * sum((v - mean) ** 2 for v in values))
    return out


def flat_statistics_keys(replicates: list[dict[str, float | None]]) -> dict[str, None]:
    seen: dict[str, None] = {}
    for r in replicates:
        seen.update(dict.fromkeys(r))
    return seen


# --- OSGR alone, from per-fold moments, and GSNR's sampling floor ---------------------------------
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
