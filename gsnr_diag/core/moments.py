"""Streaming float64 moments of per-sample gradients (SCIENCE.md, implementation notes).

For every parameter tensor we keep, element-wise, the sample count, the running mean
ḡ (eq. 5), the sum of squared deviations M2 (so ρ² = M2 / (n − 1), eq. 2) and, for the
same-sign fraction, the number of strictly positive and strictly negative per-sample
gradients. Chunks are combined with Chan et al.'s parallel formula, never with
Σg² − n·ḡ², which loses precision when ρ² ≪ ḡ². The same merge combines shards across
``torch.distributed`` ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ChunkMoments", "Moments", "all_reduce_moments"]


@dataclass
class ChunkMoments:
    """Moments of one parameter over one chunk of samples (float64, on any device).

    ``pos``/``neg`` (counts) may be of an integer dtype; :class:`Moments` stores them as float64.
    Round-off evidence (:mod:`.roundoff`) of rules that form g_ij as a sum of known terms, optional:
    ``floor`` = max_i of a sample's round-off bound, ``resolved`` = the number of samples with
    |g_ij| above their bound.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    pos: torch.Tensor | None = None
    neg: torch.Tensor | None = None
    floor: torch.Tensor | None = None
    resolved: torch.Tensor | None = None

    @classmethod
    def from_samples(cls, grad_sample: torch.Tensor, signs: bool = True) -> ChunkMoments:
        """Two-pass moments of per-sample gradients ``grad_sample`` of shape ``[B, *param.shape]``."""
        g = grad_sample.detach().to(torch.float64)
        mean = g.mean(0)
        m2 = (g - mean).square_().sum(0)
        same = (g == g[0]).all(0)  # bitwise-identical samples: ρ² = 0 exactly (the float mean may round)
        if bool(same.any()):
            mean = torch.where(same, g[0], mean)
            m2 = m2.masked_fill_(same, 0.0)
        pos = neg = None
        if signs:
            pos = (grad_sample > 0).sum(0, dtype=torch.float64)
            neg = (grad_sample < 0).sum(0, dtype=torch.float64)
        return cls(int(g.shape[0]), mean, m2, pos, neg)

    @classmethod
    def from_sums(
        cls,
        count: int,
        total: torch.Tensor,
        total_sq: torch.Tensor,
        pos: torch.Tensor | None = None,
        neg: torch.Tensor | None = None,
    ) -> ChunkMoments:
        """Moments of one chunk from Σg and Σg² (float64) — used by the moment rules.

        Within one chunk M2 = Σg² − (Σg)²/B; the float64 sums keep this exact to far
        below float32 resolution, and chunks are then merged with Chan's formula.
        """
        # ḡ = Σg / B and M2 = Σg² − B·ḡ², each formed in one new float64 tensor.
        mean = total.to(torch.float64, copy=True).div_(count)
        m2 = total_sq.to(torch.float64, copy=True).addcmul_(mean, mean, value=-float(count)).clamp_(min=0.0)
        return cls(int(count), mean, m2, pos, neg)

    def combine(self, other: ChunkMoments) -> ChunkMoments:
        """Moments of the union of two chunks of samples of the same parameter (Chan's merge)."""
        n, mean, m2 = _chan(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        pos = neg = None
        if self.pos is not None and other.pos is not None:
            pos, neg = self.pos + other.pos, self.neg + other.neg
        both = lambda a, b, f: None if a is None or b is None else f(a, b)
        return ChunkMoments(
            n,
            mean,
            m2,
            pos,
            neg,
            both(self.floor, other.floor, torch.maximum),
            both(self.resolved, other.resolved, torch.add),
        )


def _chan(count_a: int, mean_a, m2_a, count_b: int, mean_b, m2_b):
    n = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / n)
    m2 = m2_a + m2_b + delta.square() * (count_a * count_b / n)
    return n, mean, m2


@dataclass
class Moments:
    """Per-parameter streaming accumulators; ``merge`` is associative and exact in float64."""

    signs: bool = True
    count: dict[str, int] = field(default_factory=dict)
    mean: dict[str, torch.Tensor] = field(default_factory=dict)
    m2: dict[str, torch.Tensor] = field(default_factory=dict)
    pos: dict[str, torch.Tensor] = field(default_factory=dict)
    neg: dict[str, torch.Tensor] = field(default_factory=dict)
    # round-off evidence (ChunkMoments); a parameter keeps an entry only while every chunk had it
    floor: dict[str, torch.Tensor] = field(default_factory=dict)
    resolved: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of samples seen (the same for every parameter)."""
        return next(iter(self.count.values()), 0)

    def add(self, name: str, chunk: ChunkMoments, *, copy: bool = True, consume: bool = False) -> None:
        """Merge one chunk's moments of parameter ``name`` (Chan's parallel formula).

        ``copy=False`` lets the accumulator take over the chunk's tensors on a parameter's
        first chunk; ``consume=True`` lets it overwrite them as scratch space when merging.
        Either way the caller must not use the chunk afterwards. Merging is done in place.
        """
        if chunk.count == 0:
            return
        if name not in self.count:
            own = lambda t: t.to(torch.float64, copy=copy)
            self.count[name] = chunk.count
            self.mean[name] = own(chunk.mean)
            self.m2[name] = own(chunk.m2)
            if self.signs:
                self.pos[name] = own(_present(chunk.pos, name))
                self.neg[name] = own(_present(chunk.neg, name))
            for store, t in self._evidence(chunk):
                if t is not None:
                    store[name] = own(t)
            return
        # Chan's formula, in place: δ = mean_b − mean_a; mean += δ·n_b/n; M2 += M2_b + δ²·n_a·n_b/n.
        count_a, count_b = self.count[name], chunk.count
        n = count_a + count_b
        mean_b = chunk.mean.to(torch.float64)
        delta = mean_b.sub_(self.mean[name]) if consume else mean_b - self.mean[name]
        self.mean[name].add_(delta, alpha=count_b / n)
        self.m2[name].add_(chunk.m2.to(torch.float64)).addcmul_(delta, delta, value=count_a * count_b / n)
        self.count[name] = n
        if self.signs:
            self.pos[name].add_(_present(chunk.pos, name))
            self.neg[name].add_(_present(chunk.neg, name))
        for store, t in self._evidence(chunk):
            if name in store and t is None:
                del store[name]
            elif name in store:
                acc = store[name]
                if store is self.resolved:
                    acc.add_(t.to(acc.dtype))
                else:
                    torch.maximum(acc, t.to(acc.dtype), out=acc)

    def _evidence(self, chunk: ChunkMoments):
        return ((self.floor, chunk.floor), (self.resolved, chunk.resolved))

    def merge(self, other: Moments) -> Moments:
        """Merge another accumulator into this one (in place) and return self."""
        for name in other.count:
            self.add(
                name,
                ChunkMoments(
                    other.count[name],
                    other.mean[name],
                    other.m2[name],
                    other.pos.get(name),
                    other.neg.get(name),
                    other.floor.get(name),
                    other.resolved.get(name),
                ),
            )
        return self

    def to(self, device: torch.device | str) -> Moments:
        """A copy with every tensor on ``device``."""
        move = lambda d: {k: v.to(device) for k, v in d.items()}
        return Moments(
            self.signs,
            dict(self.count),
            move(self.mean),
            move(self.m2),
            move(self.pos),
            move(self.neg),
            move(self.floor),
            move(self.resolved),
        )


def _present(t: torch.Tensor | None, name: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"moments of {name!r} carry no sign counts but signs=True")
    return t


def all_reduce_moments(moments: Moments, group=None) -> Moments:
    """Combine the moments of every ``torch.distributed`` rank into those of the union (in place).

    Two all-reduce rounds per tensor: first counts and Σ nᵣ·meanᵣ give the global mean,
    then Σ (M2ᵣ + nᵣ·(meanᵣ − mean)²) gives the global M2 — Chan's formula over ranks.
    Sign counts are summed; round-off evidence is combined by max (``floor``) and sum (``resolved``) —
    every rank must hold the same parameters' evidence.
    """
    import torch.distributed as dist

    names = sorted(moments.count)
    if not names:
        return moments
    device = moments.mean[names[0]].device
    counts = torch.tensor([float(moments.count[k]) for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(counts, group=group)
    for i, k in enumerate(names):
        n_local = float(moments.count[k])
        total = moments.mean[k] * n_local
        dist.all_reduce(total, group=group)
        n = counts[i].item()
        mean = total / n
        m2 = moments.m2[k] + (moments.mean[k] - mean).square() * n_local
        dist.all_reduce(m2, group=group)
        moments.count[k], moments.mean[k], moments.m2[k] = int(round(n)), mean, m2
        if moments.signs:
            dist.all_reduce(moments.pos[k], group=group)
            dist.all_reduce(moments.neg[k], group=group)
        if k in moments.floor:
            dist.all_reduce(moments.floor[k], op=dist.ReduceOp.MAX, group=group)
        if k in moments.resolved:
            dist.all_reduce(moments.resolved[k], group=group)
    return moments
