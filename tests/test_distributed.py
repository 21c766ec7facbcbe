"""gradient_stats(distributed=True) on shards equals one process on all the data (2 gloo ranks)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from gsnr_diag import gradient_stats


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    X = torch.randn(31, 5, dtype=torch.float64)
    Y = torch.randint(0, 3, (31,))
    return model, X, Y


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, X, Y = _problem()
        shard = slice(0, 13) if rank == 0 else slice(13, 31)  # unequal shards
        s = gradient_stats(model, (X[shard], Y[shard]), batch_size=4, distributed=True)
        torch.save(
            {"n": s.n, "mean": s.mean, "var": s.var, "same_sign": s.same_sign, "agg": s.aggregates()}, f"{out}.{rank}"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file store")
def test_two_gloo_ranks_equal_one_process(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(2, init, out), nprocs=2, join=True, start_method="spawn")
    model, X, Y = _problem()
    whole = gradient_stats(model, (X, Y))
    for rank in range(2):
        r = torch.load(f"{out}.{rank}", weights_only=False)
        assert r["n"] == 31
        for k in whole.var:
            torch.testing.assert_close(r["mean"][k], whole.mean[k], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(r["var"][k], whole.var[k], rtol=1e-10, atol=1e-15)
            torch.testing.assert_close(r["same_sign"][k], whole.same_sign[k], equal_nan=True)
        assert r["agg"]["mean_gsnr"] == pytest.approx(whole.mean_gsnr, rel=1e-10)
