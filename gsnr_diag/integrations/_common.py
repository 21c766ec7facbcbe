"""What the framework callbacks share: metric names, the noise scale, data shards under torch.distributed.

Nothing here imports a training framework.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..core.stats import GradientStats
from ..data import DEFAULT_BATCH_SIZE, count_samples, iter_batches
from ..dynamics.trajectory import Snapshot
from ..errors import MonitorError

__all__ = ["PREFIX", "RankShard", "check_shardable", "distributed_world", "noise_scale", "snapshot_metrics"]

PREFIX = "gsnr/"


def noise_scale(stats: GradientStats) -> float | None:
    """The simple gradient noise scale B_simple = Σ_j ρ²_j / Σ_j ḡ²_j (McCandlish et al. 2018, eq. 2.8).

    Read from the statistics when they carry it, else computed from their per-element ρ² and ḡ
    (elements with ρ² = 0 add nothing to either sum's noise; every element counts in the signal).
    ``None`` when every mean gradient is zero. The single-set OSGR of eq. 19 is 1 − B_simple / n.
    """
    value = getattr(stats, "noise_scale", None)
    if value is not None or hasattr(stats, "noise_scale"):
        return value
    signal = sum(float(m.square().sum()) for m in stats.mean.values())
    noise = sum(float(v.sum()) for v in stats.var.values())
    if signal <= 0:
        return None
    return noise / signal


def snapshot_metrics(
    snapshot: Snapshot, stats: GradientStats | None, *, layers: bool = True, prefix: str = PREFIX
) -> dict[str, float]:
    """Flat ``{name: value}`` for a tracker: ``gsnr/mean_gsnr``, ``gsnr/osgr``, ``gsnr/same_sign``,
    ``gsnr/noise_scale``, ``gsnr/m_coherence`` (when the statistics carry it), losses when measured,
    ``gsnr/layer/<parameter>`` (GSNR) and ``gsnr/noise_scale/<parameter>`` per parameter tensor.

    Values that are undefined (``None``, e.g. no same-sign counts) are left out: trackers take numbers only.
    """
    values: dict[str, Any] = {
        "mean_gsnr": snapshot.mean_gsnr,
        "osgr": snapshot.osgr,
        "same_sign": snapshot.mean_same_sign,
        "noise_scale": noise_scale(stats) if stats is not None else getattr(snapshot, "noise_scale", None),
        "m_coherence": getattr(stats if stats is not None else snapshot, "m_coherence", None),
        "gsnr_median": snapshot.gsnr_median,
        "opposite_sign_top10": snapshot.opposite_sign_top10,
        "train_loss": snapshot.train_loss,
        "test_loss": snapshot.test_loss,
        "generalization_gap": snapshot.generalization_gap,
    }
    if layers:
        values.update({f"layer/{k}": v for k, v in snapshot.layer_gsnr.items()})
        layer_noise = getattr(stats if stats is not None else snapshot, "layer_noise_scale", None) or {}
        values.update({f"noise_scale/{k}": v for k, v in layer_noise.items()})
    return {prefix + k: float(v) for k, v in values.items() if v is not None}


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default ``torch.distributed`` group, ``(0, 1)`` when it is not initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RankShard:
    """The batches of ``data`` with index ≡ ``rank`` (mod ``world``): each rank measures its share once.

    An iterable of ``(x, y)`` batches (any form :func:`~gsnr_diag.gradient_stats` accepts), chunked to
    ``batch_size`` first, so the union over ranks is every sample of ``data`` exactly once when every
    rank passes the same ``data`` in the same order.
    """

    def __init__(self, data: Any, rank: int, world: int, batch_size: int | None = None):
        self.data, self.rank, self.world, self.batch_size = data, rank, world, batch_size

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(iter_batches(self.data, self.batch_size, None)):
            if i % self.world == self.rank:
                yield batch


def check_shardable(data: Any, world: int, batch_size: int | None, argument: str) -> None:
    """Refuse data with fewer batches than ranks (a rank without samples could not join the all-reduce)."""
    n = count_samples(data)
    if n is None:
        return
    per_batch = batch_size or getattr(data, "batch_size", None) or DEFAULT_BATCH_SIZE
    batches = -(-n // per_batch)
    if batches < world:
        raise MonitorError(
            f"{argument}: {n} samples in {batches} batch(es) of {per_batch} cannot give each of the {world} "
            "ranks a batch to measure; pass a smaller batch_size or more data"
        )
