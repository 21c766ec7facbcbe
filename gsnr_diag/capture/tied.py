"""Tied weights (an embedding table shared with an LM head): per-sample gradients summed over the uses.

A tied weight's per-sample gradient is the sum of its uses' (eq. 1 summed over the layers sharing
it), so it cannot be split into per-layer moments; it is formed block by block over samples
(``max_memory_mb``). The embedding's part is sparse — sample i touches only the rows of its own
tokens — so our Embedding sampler returns :class:`SparseRows` (the (sample, row) pairs and their
vectors), added into the head's dense block in place: never a dense embedding gradient of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import register_grad_sampler


@dataclass
class SparseRows:
    """Per-sample gradients ``[b, V, D]`` given by the rows they touch: ``keys = i·V + row``, ``values [K, D]``."""

    batch: int
    shape: tuple
    keys: torch.Tensor
    values: torch.Tensor

    def dense(self) -> torch.Tensor:
        V, D = self.shape
        out = torch.zeros(self.batch * V, D, dtype=self.values.dtype, device=self.values.device)
        return out.index_add_(0, self.keys, self.values).view(self.batch, V, D)

    def add_into(self, dense: torch.Tensor) -> torch.Tensor:
        """``dense + self`` computed in ``dense`` (which must be a fresh tensor owned by the caller)."""
        dense = dense.contiguous()
        dense.view(-1, self.shape[1]).index_add_(0, self.keys, self.values.to(dense.dtype))
        return dense


def accumulate(block: dict, key: str, gs, borrowed: set[int] = frozenset()) -> None:
    """``block[key] += gs`` for dense tensors and :class:`SparseRows` alike.

    ``borrowed``: storage addresses of tensors a sampler may return as they are (its inputs); a
    dense entry in another storage is the sampler's own and is added into in place.
    """
    cur = block.get(key)
    if cur is None:
        block[key] = gs
        return
    if isinstance(cur, SparseRows) and not isinstance(gs, SparseRows):
        cur, gs = gs, cur
    if isinstance(gs, SparseRows):
        if isinstance(cur, SparseRows):
            cur = cur.dense()
        elif cur._base is not None or cur.untyped_storage().data_ptr() in borrowed:
            cur = cur.clone()
        block[key] = gs.add_into(cur)
    else:
        block[key] = cur + gs


def densify(gs) -> torch.Tensor:
    """A dense per-sample gradient tensor from a block entry."""
    return gs.dense() if isinstance(gs, SparseRows) else gs


@register_grad_sampler(nn.Embedding)
def embedding_grad_sample(layer: nn.Embedding, activations: list, backprops: torch.Tensor) -> dict:
    """nn.Embedding per-sample gradients as :class:`SparseRows`: row v of sample i gets Σ_{t: x_it = v} δ_it."""
    W = layer.weight
    if not W.requires_grad:
        return {}
    idx = activations[0]
    b = int(idx.shape[0])
    V, D = W.shape
    idx = idx.reshape(b, -1).long()
    keys = (torch.arange(b, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
    values = backprops.reshape(-1, D)
    if layer.padding_idx is not None:
        keep = idx.reshape(-1) != layer.padding_idx
        keys, values = keys[keep], values[keep]
    return {W: SparseRows(b, (V, D), keys, values)}
