"""Parameters broadcast over the batch and tied weights, against the float64 batch-of-one loop."""

from __future__ import annotations

import pytest
import torch
from fastpath_compare import compare
from torch import nn

N, T, D, C, V = 7, 5, 6, 3, 11


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _y(seed=2):
    return torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(seed))


class BareParams(nn.Module):
    """x [B, T, D] + pos [1, T, D], − bias [D], · scale [D] (a layer scale), a CLS token expanded and concatenated."""

    def __init__(self, op="add"):
        super().__init__()
        self.op = op
        self.pos = nn.Parameter(torch.randn(1, T, D))
        self.shift = nn.Parameter(torch.randn(D))
        self.scale = nn.Parameter(torch.rand(D) + 0.5)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.mix = nn.Linear(D, D)
        self.out = nn.Linear(D, C)

    def forward(self, x):
        h = x + self.pos if self.op == "add" else self.pos + x
        h = torch.tanh(self.mix(h - self.shift)) * self.scale
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1)
        return self.out(torch.tanh(h).mean(1) + h[:, 0])


@pytest.mark.parametrize("op", ["add", "radd"])
def test_bare_parameters_broadcast_over_the_batch(op):
    torch.manual_seed(0)
    got = compare(BareParams(op).double(), _x(N, T, D), _y(), nn.CrossEntropyLoss())
    assert got.capture_paths[""] == "grad-sampler"


class PositionEmbedding(nn.Module):
    """Token + position embeddings from ids of shape [1, T] (as GPT-2 and BERT), then a tied LM-style head."""

    def __init__(self, tied=True):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.posemb = nn.Embedding(T, D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        self.out = nn.Linear(V, C)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.tok(ids) + self.posemb(pos).to(torch.float64)
        return self.out(torch.tanh(self.head(torch.tanh(h))).mean(1))


@pytest.mark.parametrize("tied", [True, False])
def test_position_embedding_from_one_row_of_ids_and_tied_head(tied):
    torch.manual_seed(0)
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(5))
    got = compare(PositionEmbedding(tied).double(), ids, _y(), nn.CrossEntropyLoss())
    assert got.capture_paths["posemb"] == "moment-rule"
    assert got.capture_paths["head"] == ("grad-sampler" if tied else "moment-rule")


def test_tied_weight_blocks_within_max_memory():
    torch.manual_seed(0)
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(5))
    compare(PositionEmbedding(True).double(), ids, _y(), nn.CrossEntropyLoss(), max_memory_mb=V * D * 8 * 3 / 2**20)


class OtherUse(nn.Module):
    """A bare parameter broadcast and also used in a matrix product: not broadcast-only, so the fallback."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, T, D))
        self.out = nn.Linear(D, C)

    def forward(self, x):
        return self.out(torch.tanh((x + self.pos) @ self.pos[0].t() @ self.pos[0]).mean(1))


def test_parameter_with_other_uses_goes_to_the_fallback_exactly():
    torch.manual_seed(0)
    got = compare(OtherUse().double(), _x(N, T, D), _y(), nn.CrossEntropyLoss(), fast=False)
    assert got.capture_paths[""] == "functorch"


class SequenceFirst(nn.Module):
    """x [T, B, D] + bias [D] with T = B: dimension 0 is time, not the samples."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(D))
        self.out = nn.Linear(D, C)

    def forward(self, x):
        h = torch.tanh(x.transpose(0, 1) + self.shift)  # [T, B, D]
        return self.out(h.cumsum(0).transpose(0, 1).mean(1))


def test_broadcast_against_a_sequence_first_tensor_goes_to_the_fallback():
    torch.manual_seed(0)
    got = compare(SequenceFirst().double(), _x(N, N, D), _y(), nn.CrossEntropyLoss(), fast=False)
    assert got.capture_paths[""] == "functorch"


def test_broadcast_paths_exact_over_chunks_with_a_last_chunk_of_one():
    torch.manual_seed(0)
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(5))
    compare(PositionEmbedding(True).double(), ids, _y(), nn.CrossEntropyLoss(), batch_size=3)  # chunks 3, 3, 1
    compare(BareParams().double(), _x(N, T, D), _y(), nn.CrossEntropyLoss(), batch_size=3)


def test_sparse_rows_add_into_a_borrowed_block_copies_it():
    from gsnr_diag.capture.tied import SparseRows, accumulate

    dense = torch.zeros(2, 3, 2)
    rows = SparseRows(2, (3, 2), torch.tensor([1, 4]), torch.ones(2, 2))
    block = {"w": dense}
    accumulate(block, "w", rows, borrowed={dense.untyped_storage().data_ptr()})
    assert float(dense.abs().sum()) == 0.0  # the sampler's input is left alone
    assert block["w"][0, 1].tolist() == [1.0, 1.0] and block["w"][1, 1].tolist() == [1.0, 1.0]
