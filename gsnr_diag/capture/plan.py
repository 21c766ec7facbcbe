"""Whether a chunk that needs the whole-model vmap fallback should measure every parameter in that one pass.

The fallback's ``vmap(grad(...))`` runs the whole model per sample anyway; measuring the hooked
layers' parameters in the same pass saves the hooked forward and backward, but forms their
per-sample gradients too (the rules avoid that for 2-D Linear layers). Which is cheaper depends
on the model, so both are timed once (CPU time per sample, the one-pass plan first) and the faster
is kept; both give the same statistics (exactly, up to float rounding).
"""

from __future__ import annotations

import time

import torch


class PassPlan:
    """Seconds per sample of the two plans; ``one_pass()`` says which to run next.

    CPU time of the process on CPU; on a GPU, wall-clock time after synchronizing (kernels run
    asynchronously, so CPU time would only count their launches).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds: dict[bool, float] = {}
        self.device = device if device is not None and device.type == "cuda" else None

    def _now(self) -> float:
        if self.device is None:
            return time.process_time()
        torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def one_pass(self) -> bool:
        if True not in self.seconds:
            return True
        if False not in self.seconds:
            return False
        return self.seconds[True] <= self.seconds[False]

    def start(self) -> float:
        return self._now()

    def record(self, one: bool, started: float, samples: int) -> None:
        per_sample = (self._now() - started) / max(samples, 1)
        self.seconds[one] = min(self.seconds.get(one, per_sample), per_sample)
