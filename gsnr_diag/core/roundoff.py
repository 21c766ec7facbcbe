"""Round-off is not signal: elements whose per-sample gradients are all at rounding level (SCIENCE.md).

Some gradients are zero in exact arithmetic but come out of floating point as rounding noise: the key
bias of attention (softmax is invariant to adding a constant to every key), a bias right before a
normalization that subtracts the mean (a conv bias before InstanceNorm). Their ḡ²/ρ² is the GSNR of
noise. An element j of a parameter tensor is marked *round-off* (undefined, like ρ² = 0) when

* **sum rule** — where a moment rule forms each per-sample gradient as a sum of P known terms
  (g_ij = Σ_p t_ipj: biases of Linear on sequences, Conv, and normalization β), every sample is at
  rounding level: |g_ij| ≤ C_SUM · √P · ε · Σ_p |t_ipj| for every i (the probabilistic rounding
  bound of a P-term sum, Higham & Mary 2019, with margin C_SUM); or
* **tensor rule** — everywhere: the element's root-mean-square per-sample gradient
  (√(ḡ_j² + (n−1)/n·ρ²_j), from the moments) is ≤ C_TENSOR · ε · the largest one in the same tensor;

with ε the machine epsilon of the parameter's dtype. Elements that are exactly zero for every sample
are not round-off: they have ρ² = 0 and are undefined already. Both rules only see the last step:
rounding noise amplified by a cancellation earlier in the backward pass (a saturated softmax over two
tokens) can exceed the bounds, and such an element stays defined.
"""

from __future__ import annotations

import torch

__all__ = ["C_SUM", "C_TENSOR", "roundoff_mask", "sum_floor"]

#: Margin of the sum rule. Measured |Σ_p t_p| / (√P·ε·Σ_p|t_p|) of sums that are zero in exact arithmetic:
#: ≤ 1.3 for a conv bias before InstanceNorm (P up to 64²), ≤ 48 for an attention key bias (P ≥ 6 tokens).
#: A genuine sum is flagged only if it cancels this far in *every* sample (for random signs each sample
#: does with probability ≈ C_SUM·P·ε, so all of n samples practically never).
C_SUM = 64.0
#: Margin of the tensor rule (measured RMS ratio for the key third of nn.MultiheadAttention.in_proj_bias:
#: ≤ 0.22·ε, and ≤ 4.4·ε with a saturated softmax (inputs ×5)).
C_TENSOR = 16.0


def sum_floor(abs_sum: torch.Tensor, terms: int, dtype: torch.dtype) -> torch.Tensor:
    """The round-off bound C_SUM·√P·ε·Σ_p|t_p| of per-sample sums of P terms with Σ_p|t_p| = ``abs_sum``."""
    return abs_sum * (C_SUM * max(terms, 1) ** 0.5 * torch.finfo(dtype).eps)


def roundoff_mask(
    mean: torch.Tensor,
    var: torch.Tensor,
    n: int,
    dtype: torch.dtype,
    floor: torch.Tensor | None = None,
    resolved: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean tensor: elements with ρ² > 0 whose per-sample gradients are all at round-off level."""
    mask = torch.zeros(var.shape, dtype=torch.bool, device=var.device)
    if not (dtype.is_floating_point and var.numel()):
        return mask
    eps = torch.finfo(dtype).eps
    rms = (mean.square() + var * ((n - 1) / n)).sqrt_()
    scale = float(rms.max())
    if scale > 0:
        mask |= rms <= C_TENSOR * eps * scale
    if floor is not None and resolved is not None:
        mask |= (resolved.to(var.device) == 0) & (floor.to(var.device) > 0)
    return mask & (var > 0)
