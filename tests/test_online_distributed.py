"""OnlineGSNR under DDP (2 gloo ranks): each rank's mini-batches, all-reduced, equal the pooled float64 reference."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from reference import per_sample_gradients
from torch import nn
from torch.nn import functional as F


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batches(rank, k=3, b=6):
    g = torch.Generator().manual_seed(10 + rank)
    return [(torch.randn(b, 5, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(k)]


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from gsnr_diag.dynamics.online import OnlineGSNR

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        with OnlineGSNR(model, window=3) as online:
            for x, y in _batches(rank):
                opt.zero_grad()
                F.cross_entropy(ddp(x), y).backward()
                opt.step()
            s = online.stats(distributed=True)
        torch.save({"n": s.n, "mean": s.mean, "var": s.var}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="gloo file store")
def test_online_under_ddp_all_reduces_the_windows(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    out = str(tmp_path / "r")
    mp.start_processes(_worker, args=(2, init, out), nprocs=2, join=True, start_method="spawn")
    # one process: the same weight path (DDP averages the two ranks' batch means), per-sample gradients pooled
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    per = []
    for (x0, y0), (x1, y1) in zip(_batches(0), _batches(1)):
        x, y = torch.cat([x0, x1]), torch.cat([y0, y1])
        per.append(per_sample_gradients(copy.deepcopy(model), x, y, nn.CrossEntropyLoss()))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for rank in range(2):
        r = torch.load(f"{out}.{rank}", weights_only=False)
        assert r["n"] == 36
        for k in r["mean"]:
            g = np.concatenate([p[k] for p in per])
            np.testing.assert_allclose(r["mean"][k].numpy(), g.mean(0), rtol=1e-4, atol=1e-6 * np.abs(g).max())
            np.testing.assert_allclose(
                r["var"][k].numpy(), g.var(0, ddof=1), rtol=1e-4, atol=1e-8 * np.abs(g).max() ** 2
            )
