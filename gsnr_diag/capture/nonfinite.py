"""Chunks whose per-sample gradients are not all finite: find the samples, then raise or skip them."""

from __future__ import annotations

import torch

from ..core.moments import ChunkMoments, Moments
from ..data import Inputs
from ..errors import NonFiniteGradientError


class NonFiniteSamples:
    """Mixin of :class:`~gsnr_diag.capture.capture.GradientCapture` (uses ``params``, ``signs``,
    ``skip_nonfinite``, ``skipped`` and ``_per_sample_loop``)."""

    # --- non-finite gradients ------------------------------------------------------------
    def _handle_nonfinite(self, x: Inputs, y: torch.Tensor, batch: int, moments: Moments) -> None:
        names = list(self.params)
        per_sample = self._per_sample_loop(x, y, names)
        bad_sample = torch.zeros(batch, dtype=torch.bool, device=y.device)
        bad_params = []
        for k, g in per_sample.items():
            nonfinite = ~torch.isfinite(g.reshape(batch, -1)).all(1)
            if bool(nonfinite.any()):
                bad_params.append(k)
                bad_sample |= nonfinite.to(bad_sample.device)
        n_bad = int(bad_sample.sum())
        if n_bad == 0:  # the batch path overflowed but no single sample did; use the loop result
            for k, g in per_sample.items():
                moments.add(k, ChunkMoments.from_samples(g, self.signs))
            return
        if not self.skip_nonfinite:
            shown = ", ".join(bad_params[:8]) + (" ..." if len(bad_params) > 8 else "")
            raise NonFiniteGradientError(
                f"per-sample gradients are NaN/inf for {n_bad} of {batch} samples in a chunk, in parameters: "
                f"{shown}. Check the inputs and the loss (log of 0? division by 0?), or pass "
                "skip_nonfinite=True to skip such samples and count them"
            )
        self.skipped += n_bad
        keep = (~bad_sample).nonzero().flatten()
        if keep.numel():
            for k, g in per_sample.items():
                moments.add(k, ChunkMoments.from_samples(g[keep.to(g.device)], self.signs))
