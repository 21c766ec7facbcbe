"""_io.to_plain: JSON-ready copies of numbers, arrays and tensors (NaN/inf become None)."""

import json

import numpy as np
import torch

from gsnr_diag._io import to_plain


def test_arrays_and_tensors_become_lists():
    assert to_plain(np.array([1.0, np.nan, np.inf])) == [1.0, None, None]
    assert to_plain(torch.ones(2, 2)) == [[1.0, 1.0], [1.0, 1.0]]
    assert to_plain({"a": (np.float32(2.5), torch.tensor(3), np.int64(4))}) == {"a": [2.5, 3, 4]}
    json.dumps(to_plain({"x": np.zeros(3), "y": torch.zeros(())}), allow_nan=False)
