"""Gradient noise scale and m-coherence from the finished per-sample moments — pure math, no I/O.

Both need only what :class:`~gsnr_diag.core.moments.Moments` already holds per element j:
the mean gradient ḡ_j (eq. 5 of Liu et al.) and the unbiased variance ρ²_j (eq. 2).

* **Simple noise scale** (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of
  Large-Batch Training"): their B_simple = tr(Σ) / |G|², here
  B_simple = Σ_j ρ²_j / Σ_j ḡ²_j with the plug-in |ḡ|² for |G|² (as the definition is stated in
  the project's docs). With one training set the single-set OSGR of eq. 19 is then exactly
  R = 1 − B_simple / n; with the population quantities eq. 19 reads R = 1 − B/(n + B) ≈ 1 − B/n
  for B ≪ n.

* **m-coherence** (Chatterjee & Zielinski 2020, "Making Coherence Out of Nothing At All:
  Measuring the Evolution of Gradient Alignment"): for a sample of m examples with per-example
  gradients g_z, α = E_{z,z'}[g_z · g_z'] / E_z[g_z · g_z] with z, z' drawn independently from the
  sample, and m-coherence = m·α. Over the sample E_{z,z'}[g_z·g_z'] = |ḡ|² and
  E_z[|g_z|²] = (1/m) Σ_i |g_i|² = Σ_j (ḡ²_j + (m − 1)/m · ρ²_j), because Σ_i |g_i|² = Σ_j Σ_i g²_ij
  = Σ_j (M2_j + m·ḡ²_j). The per-sample squared norms are therefore not needed one by one:
  their sum over samples is exactly what the element-wise moments give.
  m-coherence is 1 for mutually orthogonal per-sample gradients and m for identical ones.

Algebra tying them together (same n samples): m_coherence = n / (1 + (n − 1)/n · B_simple).
"""

from __future__ import annotations

import torch

__all__ = [
    "noise_scale",
    "m_coherence",
    "layer_noise_statistics",
]


def _sums(means: list[torch.Tensor], variances: list[torch.Tensor]) -> tuple[float, float]:
    signal = sum(float(m.to(torch.float64).square().sum()) for m in means)
    noise = sum(float(v.to(torch.float64).sum()) for v in variances)
    return signal, noise


def noise_scale(means: list[torch.Tensor], variances: list[torch.Tensor]) -> float | None:
    """B_simple = Σ_j ρ²_j / Σ_j ḡ²_j over the elements of the given tensors (McCandlish et al. 2018).

    ``None`` when every mean gradient is zero (the ratio is undefined).
    """
    signal, noise = _sums(means, variances)
    if signal <= 0:
        return None
    return noise / signal


def m_coherence(means: list[torch.Tensor], variances: list[torch.Tensor], n: int) -> float | None:
    """m-coherence = n·α, α = |ḡ|² / ((1/n) Σ_i |g_i|²) (Chatterjee & Zielinski 2020).

    (1/n) Σ_i |g_i|² = Σ_j (ḡ²_j + (n − 1)/n · ρ²_j), so ρ² = M2/(n − 1) gives it exactly.
    ``None`` when every per-sample gradient is zero (or n < 1).
    """
    if n < 1:
        return None
    signal, noise = _sums(means, variances)
    second_moment = signal + noise * (n - 1) / n
    if second_moment <= 0:
        return None
    return n * signal / second_moment


def layer_noise_statistics(
    mean: dict[str, torch.Tensor], var: dict[str, torch.Tensor], n: int
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Per parameter tensor: ``(layer_noise_scale, layer_m_coherence)`` keyed like ``mean``."""
    scale = {k: noise_scale([mean[k]], [var[k]]) for k in mean}
    coherence = {k: m_coherence([mean[k]], [var[k]], n) for k in mean}
    return scale, coherence
