"""Every data form gives the same statistics; re-chunking is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gsnr_diag import gradient_stats
from gsnr_diag.data import iter_batches, rechunk


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    X = torch.randn(23, 4, dtype=torch.float64)
    Y = torch.randint(0, 3, (23,))
    return model, X, Y


def test_all_data_forms_agree(problem):
    model, X, Y = problem
    ds = TensorDataset(X, Y)
    forms = {
        "tuple": (X, Y),
        "dataset": ds,
        "loader": DataLoader(ds, batch_size=5),
        "list_of_batches": [(X[i : i + 4], Y[i : i + 4]) for i in range(0, 23, 4)],
        "generator": ((X[i : i + 9], Y[i : i + 9]) for i in range(0, 23, 9)),
        "list_of_pairs_dataset": [(X[i], Y[i]) for i in range(23)],
    }
    ref = gradient_stats(model, (X, Y), batch_size=23)
    for name, data in forms.items():
        if name == "list_of_pairs_dataset":
            data = DataLoader(data, batch_size=6)  # a plain list of samples goes through a DataLoader
        s = gradient_stats(model, data, batch_size=6)
        assert s.n == 23, name
        for k in ref.var:
            torch.testing.assert_close(s.var[k], ref.var[k], rtol=1e-10, atol=1e-14, msg=name)


def test_rechunk_exact_sizes():
    batches = [(torch.arange(n).float()[:, None], torch.arange(n)) for n in (3, 7, 1, 4)]
    sizes = [int(y.shape[0]) for _, y in rechunk(batches, 5)]
    assert sizes == [5, 5, 5]
    ys = torch.cat([y for _, y in rechunk(batches, 4)])
    assert torch.equal(ys, torch.cat([b[1] for b in batches]))


def test_rechunk_dict_and_tuple_inputs():
    batches = [({"a": torch.ones(3, 2), "b": torch.zeros(3)}, torch.arange(3)) for _ in range(3)]
    chunks = list(iter_batches(batches, batch_size=4))
    assert [int(y.shape[0]) for _, y in chunks] == [4, 4, 1]
    assert chunks[0][0]["a"].shape == (4, 2)
    tup = [((torch.ones(2, 1), torch.ones(2, 3)), torch.arange(2)) for _ in range(3)]
    chunks = list(iter_batches(tup, batch_size=5))
    assert chunks[0][0][1].shape == (5, 3)
