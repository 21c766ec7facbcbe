"""How close online GSNR (the training mini-batches, pooled over a window) is to the exact full-data snapshot.

Two models (an MLP and a small CNN) on scikit-learn's handwritten digits (1,437 training images, shipped
with scikit-learn), mini-batch SGD (batch 32) at two learning rates. OnlineGSNR(window=10) is attached
for the whole run; at the recorded steps its statistics (the last 10 mini-batches, 320 samples, each at
its own step's weights) are compared with gradient_stats on the whole training set at the current
weights: relative difference of the mean GSNR, of B_simple = Σρ²/Σḡ², and the Spearman correlation of
the per-layer GSNR over parameter tensors.

    python benchmarks/online_agreement.py [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gsnr_diag import gradient_stats
from gsnr_diag.dynamics.online import OnlineGSNR


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    Y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(Y), generator=g)
    return X[perm[:1437]], Y[perm[:1437]]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def b_simple(stats) -> float:
    return sum(float(v.sum()) for v in stats.var.values()) / sum(float(m.square().sum()) for m in stats.mean.values())


def run(name: str, lr: float, steps: int, record: list[int], window: int, batch: int) -> list[dict]:
    X, Y = digits()
    model = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    rows = []
    step = 0
    with OnlineGSNR(model, window=window) as online:
        while step < steps:
            for idx in torch.randperm(len(Y), generator=g).split(batch):
                if len(idx) < batch:
                    continue
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), Y[idx]).backward()
                opt.step()
                step += 1
                if step in record:
                    on = online.stats()
                    exact = gradient_stats(model, (X, Y), signs=False)
                    layers = [k for k in exact.layer_gsnr if on.layer_gsnr.get(k) is not None]
                    rows.append(
                        {
                            "model": name,
                            "lr": lr,
                            "step": step,
                            "online_mean_gsnr": on.mean_gsnr,
                            "exact_mean_gsnr": exact.mean_gsnr,
                            "rel_mean_gsnr": on.mean_gsnr / exact.mean_gsnr - 1,
                            "rel_b_simple": b_simple(on) / b_simple(exact) - 1,
                            "spearman_layers": spearman(
                                [on.layer_gsnr[k] for k in layers], [exact.layer_gsnr[k] for k in layers]
                            ),
                            "layers": len(layers),
                            "online_n": on.n,
                        }
                    )
                if step >= steps:
                    break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    record = [s for s in (10, 25, 50, 100, 200, 300, 500, 1000) if s <= args.steps]
    rows = []
    for name in ("mlp", "cnn"):
        for lr in (0.02, 0.2):
            rows += run(name, lr, args.steps, record, args.window, args.batch)
    print(
        "| model | lr | step | online mean GSNR | exact mean GSNR | rel. diff | B_simple rel. diff "
        "| Spearman (layers) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['lr']} | {r['step']} | {r['online_mean_gsnr']:.4g} | {r['exact_mean_gsnr']:.4g} "
            f"| {r['rel_mean_gsnr']:+.2f} | {r['rel_b_simple']:+.2f} | {r['spearman_layers']:.2f} ({r['layers']}) |"
        )
    for name in ("mlp", "cnn"):
        for lr in (0.02, 0.2):
            sel = [r for r in rows if r["model"] == name and r["lr"] == lr]
            print(
                f"summary {name} lr={lr}: median |rel. diff| mean GSNR "
                f"{np.median([abs(r['rel_mean_gsnr']) for r in sel]):.2f}, median Spearman "
                f"{np.median([r['spearman_layers'] for r in sel]):.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
