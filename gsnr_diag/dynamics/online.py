"""OnlineGSNR: GSNR from the training mini-batches themselves, pooled over a window of recent steps.

::

    with OnlineGSNR(model, window=20) as online:
        for step, (x, y) in enumerate(loader):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()   # the moments are taken here
            opt.step()
            if step % 100 == 99:
                print(online.stats().mean_gsnr)

**A different estimator from** :func:`~gsnr_diag.gradient_stats`. The full-data statistics are taken
over all n samples at one fixed θ (eq. 2, 5). The online ones pool the per-sample gradients of the
last ``window`` mini-batches, each taken at the weights of its own step, so within the window θ
moves: the pooled variance also contains the drift of the mean gradient over the window (it grows
with the learning rate and the window), and the samples are those the training happened to draw
(with dropout active if the model trains with it). It costs no extra forward or backward pass, which
is what makes watching every step affordable; use the full-data snapshot for the paper's numbers.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from torch import nn

from ..capture.online import LinearSums, OnlineCapture, StepMoments
from ..core.moments import Moments, all_reduce_moments
from ..core.stats import GradientStats, stats_from_moments
from ..errors import DataError, MonitorError
from .trajectory import Snapshot

__all__ = ["OnlineGSNR"]


class OnlineGSNR:
    """Per-sample gradient moments of every training mini-batch, pooled over the last ``window`` steps.

    A step is one backward pass through ``model`` (one mini-batch). Use it as a context manager or
    call :meth:`attach` / :meth:`detach`; after ``detach`` the model has no hook of ours left, and
    during training ``.grad``, the parameters and autograd are untouched (the hooks only read).

    Args:
        model: the model being trained.
        window: number of recent mini-batches pooled (n = the sum of their batch sizes).
        signs: count gradient signs too (same-sign fraction); costs a little per step.
        every: capture one mini-batch in every ``every`` (the window then pools the last ``window``
            captured ones): a k-fold smaller cost per training step.
        loss_reduction: ``"mean"`` (the training loss is the batch mean of per-sample losses,
            PyTorch's default) or ``"sum"``.
        epsilon: added to ρ² in the GSNR denominator, as in :func:`~gsnr_diag.gradient_stats`.

    Memory: the per-step moments of the window are kept (2 numbers per parameter element and step:
    float32 raw sums for the ``nn.Linear`` weights of a float32 model, float64 otherwise; 4 with
    ``signs``); they are merged (Chan's formula, float64) only when :meth:`stats` is asked.
    """

    def __init__(
        self,
        model: nn.Module,
        window: int = 10,
        *,
        signs: bool = False,
        every: int = 1,
        loss_reduction: str = "mean",
        epsilon: float = 0.0,
    ):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise MonitorError(f"window: expected a positive int (mini-batches pooled), got {window!r}")
        if epsilon < 0:
            raise MonitorError(f"epsilon: expected a non-negative number, got {epsilon!r}")
        self.model = model
        self.window = window
        self.signs = signs
        self.epsilon = epsilon
        self.steps = 0
        self._recent: deque[StepMoments] = deque(maxlen=window)
        self.capture = OnlineCapture(
            model, self._on_step, signs=signs, loss_reduction=loss_reduction, every=every, slots=window + 1
        )
        self._start = time.perf_counter()

    def _on_step(self, step: StepMoments) -> None:
        self.steps += 1
        self._recent.append(step)

    @property
    def unmeasured(self) -> dict[str, str]:
        """Parameters left out, each with the reason (see :mod:`gsnr_diag.capture.online`)."""
        return dict(self.capture.unmeasured)

    # --- lifecycle -----------------------------------------------------------------------
    def attach(self) -> OnlineGSNR:
        self.capture.attach()
        return self

    def detach(self) -> None:
        self.capture.detach()

    def __enter__(self) -> OnlineGSNR:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget the pooled mini-batches (e.g. after a learning-rate change)."""
        self._recent.clear()

    # --- results -------------------------------------------------------------------------
    def stats(self, *, distributed: bool = False, process_group: Any = None) -> GradientStats:
        """:class:`~gsnr_diag.GradientStats` of the per-sample gradients of the last ``window`` mini-batches.

        ``n`` is their number of samples; ``opposite_sign`` uses the current weights; ``mode`` is
        ``"online"``. Raises ``DataError`` before two samples have been seen. Under
        ``torch.distributed`` each rank sees its own mini-batches; ``distributed=True`` all-reduces
        the pooled moments (a collective: call it on every rank), giving every rank the statistics
        of the union of all ranks' windows.
        """
        self.capture.flush()
        steps = list(self._recent)
        measured = [k for k in self.capture.measured if all(k in s.moments for s in steps)]
        moments = Moments(signs=self.signs)
        for s in steps:
            for k in measured:
                c = s.moments[k]
                moments.add(k, c.moments() if isinstance(c, LinearSums) else c)
        if distributed:
            all_reduce_moments(moments, group=process_group)
        if moments.n < 2:
            raise DataError(
                f"online GSNR: {moments.n} sample(s) seen in the window so far; run at least one training "
                "step (a backward pass through the model) with 2 or more samples"
            )
        weights = {k: self.capture.params[k].detach() for k in measured}
        return stats_from_moments(
            moments,
            weights,
            capture_paths=dict(self.capture.paths),
            epsilon=self.epsilon,
            mode="online",
        )

    def snapshot(
        self,
        step: int | None = None,
        *,
        stats: GradientStats | None = None,
        distributed: bool = False,
        process_group: Any = None,
        **extra: float,
    ) -> Snapshot:
        """A :class:`~gsnr_diag.dynamics.trajectory.Snapshot` of :meth:`stats` (losses are not measured).

        ``step`` defaults to the number of mini-batches captured; ``stats``: a result of :meth:`stats`
        to reuse; ``extra`` holds ``online_window`` and ``online_samples`` plus the caller's numbers.
        """
        if stats is None:
            stats = self.stats(distributed=distributed, process_group=process_group)
        # the statistics the moments give for free, where this version's Snapshot has them
        free = ("noise_scale", "m_coherence", "layer_noise_scale", "layer_m_coherence")
        more = {f: getattr(stats, f) for f in free if f in Snapshot.__dataclass_fields__ and hasattr(stats, f)}
        return Snapshot(
            step=int(self.steps if step is None else step),
            mean_gsnr=stats.mean_gsnr,
            gsnr_median=stats.gsnr_quantiles.get("median"),
            gsnr_p90=stats.gsnr_quantiles.get("p90"),
            layer_gsnr=dict(stats.layer_gsnr),
            layer_same_sign=dict(stats.layer_same_sign),
            osgr=stats.osgr,
            mean_same_sign=stats.mean_same_sign,
            opposite_sign=stats.opposite_sign,
            opposite_sign_top10=stats.opposite_sign_top10,
            elapsed=time.perf_counter() - self._start,
            undefined=stats.undefined,
            extra={"online_window": float(len(self._recent)), "online_samples": float(stats.n), **extra},
            **more,
        )
