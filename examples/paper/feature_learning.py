"""Sec. 3.2, Fig. 6 and Table 1 of Liu et al. (ICLR 2020): feature learning raises GSNR.

Toy regression y = x0·x1 + ε, x ~ U[−1, 1]², ε ~ U[−0.01, 0.01], n = 200 training and 10,000 test
samples, a 2-20-1 ReLU MLP trained by full-batch gradient descent. The mean GSNR of the SECOND
layer (its 20 weights and its bias) is followed with the first layer trainable (the network learns
its features) and frozen (a linear model on fixed random features), over several seeds, for two
initializations:

* ``default`` — PyTorch's default (Kaiming-uniform) initialization;
* ``small``   — weights N(0, 0.03²), zero biases.

The paper's rise of the trainable case shows only with the small initialization (see
docs/REPRODUCTION.md); both are run and reported. Also: the loss curves (Fig. 6b), the Pearson
correlation of each hidden feature with y at initialization and at that feature's GSNR peak
(Table 1), and Appendix A.3's grid (n, noise level, width) of the OSGR experiment, LHS (eq. 23)
against RHS (eq. 19/24).

    python examples/paper/feature_learning.py --quick --out /tmp/fl   # < 2 min on 2 cores
    python examples/paper/feature_learning.py --report                 # full run + HTML report
"""

from __future__ import annotations

import math
import time

import common
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gsnr_diag import Monitor, gradient_stats

INITS = ("default", "small")
SMALL_STD = 0.03


def make_data(n: int, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ U[−1, 1]², y = x0·x1 + ε with ε ~ U[−noise, noise]; float64, y of shape [n, 1]."""
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 2 - 1
    eps = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * noise
    return x, (x[:, 0] * x[:, 1] + eps).unsqueeze(1)


def build(width: int = 20, init: str = "default") -> nn.Sequential:
    """The 2-width-1 ReLU MLP in float64 (loss differences of eq. 23 are tiny at small lr)."""
    model = nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 1)).double()
    if init == "small":
        for layer in (model[0], model[2]):
            nn.init.normal_(layer.weight, 0.0, SMALL_STD)
            nn.init.zeros_(layer.bias)
    elif init != "default":
        raise ValueError(init)
    return model


def second_layer_gsnr(stats) -> float:
    """Mean GSNR over the second layer's elements (weights and bias) with ρ² > 0."""
    r = torch.cat([stats.gsnr["2.weight"].flatten(), stats.gsnr["2.bias"].flatten()])
    r = r[~torch.isnan(r)]
    return float(r.mean()) if r.numel() else float("nan")


def feature_corr(model: nn.Sequential, X: torch.Tensor, y: torch.Tensor) -> list[float | None]:
    """Pearson correlation of each hidden feature relu(W1 x + b1) with the target (None: dead feature)."""
    with torch.no_grad():
        h = model[1](model[0](X)).numpy()
    t = y.flatten().numpy()
    return [common.pearson(h[:, k], t) for k in range(h.shape[1])]


def run_config(init: str, frozen: bool, seed: int, data, test, *, steps: int, lr: float, every: int) -> dict:
    """Full-batch GD with a Monitor recording every ``every`` steps (a user's own loop)."""
    torch.manual_seed(seed)
    model = build(20, init)
    if frozen:
        model[0].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    label = f"{init} init, first layer {'frozen' if frozen else 'trainable'}, seed {seed}"
    monitor = Monitor(
        model,
        data,
        F.mse_loss,
        test_data=test,
        every=every,
        task="regression",
        metadata={
            "label": label,
            "seed": seed,
            "settings": {
                "epochs": steps,
                "lr": lr,
                "batch_size": None,
                "algorithm": "full-batch GD",
                "init": init,
                "frozen": frozen,
            },
        },
    )
    X, Y = data
    steps_out, g2, per_feature, corr = [], [], [], []
    for step in range(steps + 1):
        if monitor.should_record(step) or step == steps:
            monitor.record(step, epoch=float(step))
            stats = getattr(monitor, "last_stats", None)
            if stats is None:  # not every Monitor keeps its last GradientStats: measure again
                stats = gradient_stats(model, data, F.mse_loss)
            steps_out.append(step)
            g2.append(second_layer_gsnr(stats))
            per_feature.append([None if math.isnan(v) else v for v in stats.gsnr["2.weight"].flatten().tolist()])
            corr.append(feature_corr(model, test[0], test[1]))
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(X), Y).backward()
        opt.step()
    traj = monitor.trajectory
    _, train_loss = traj.series("train_loss")
    _, test_loss = traj.series("test_loss")
    start = g2[0]
    later = [v for s, v in zip(steps_out, g2) if s > 0 and math.isfinite(v)]
    return {
        "init": init,
        "frozen": frozen,
        "seed": seed,
        "steps": steps_out,
        "gsnr_layer2": g2,
        "gsnr_layer2_per_weight": per_feature,
        "feature_corr": corr,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "start": start,
        "peak": max(later),
        "peak_step": steps_out[1 + int(np.argmax(later))] if later else None,
        "end": g2[-1],
        "peak_ratio": max(later) / start,
        "end_ratio": g2[-1] / start,
        "final_train_loss": train_loss[-1],
        "final_test_loss": test_loss[-1],
        "trajectory": traj,
    }


def table1(cfg: dict) -> dict:
    """Table 1: each hidden feature's correlation with y at initialization and at its GSNR peak."""
    per = np.array([[np.nan if v is None else v for v in row] for row in cfg["gsnr_layer2_per_weight"]])
    corr = np.array([[np.nan if v is None else v for v in row] for row in cfg["feature_corr"]])
    rows = []
    for k in range(per.shape[1]):
        col = per[1:, k]
        if np.all(np.isnan(col)) or np.isnan(corr[0, k]):
            rows.append(
                {
                    "feature": k,
                    "corr_init": None,
                    "corr_at_peak": None,
                    "peak_step": None,
                    "gsnr_init": None,
                    "gsnr_peak": None,
                }
            )
            continue
        i = 1 + int(np.nanargmax(col))
        rows.append(
            {
                "feature": k,
                "corr_init": float(corr[0, k]),
                "corr_at_peak": None if np.isnan(corr[i, k]) else float(corr[i, k]),
                "peak_step": cfg["steps"][i],
                "gsnr_init": None if np.isnan(per[0, k]) else float(per[0, k]),
                "gsnr_peak": float(per[i, k]),
            }
        )
    ok = [r for r in rows if r["corr_init"] is not None and r["corr_at_peak"] is not None]
    return {
        "rows": rows,
        "n_features": len(ok),
        "mean_abs_corr_init": float(np.mean([abs(r["corr_init"]) for r in ok])) if ok else None,
        "mean_abs_corr_at_peak": float(np.mean([abs(r["corr_at_peak"]) for r in ok])) if ok else None,
        "n_abs_corr_increased": sum(abs(r["corr_at_peak"]) > abs(r["corr_init"]) for r in ok),
    }


def osgr_grid(run: common.Run, quick: bool, seed: int) -> dict:
    """Appendix A.3: the OSGR experiment on the toy regression over (n, noise level, width)."""
    from gsnr_diag import osgr_experiment

    if quick:
        grid = [(n, noise, w) for n in (50, 200) for noise in (0.01, 0.5) for w in (20,)]
        M, test_size, epochs, record_at = 5, 2000, 60, [0, 5, 20, 59]
    else:
        grid = [(n, noise, w) for n in (50, 100, 200) for noise in (0.01, 0.2, 0.5) for w in (20, 100)]
        M, test_size, epochs, record_at = 10, 4000, 200, [0, 5, 20, 50, 100, 199]
    lr = 0.02
    results, labels = [], []
    for i, (n, noise, w) in enumerate(grid):
        gen = torch.Generator().manual_seed(1000 + i)
        data = make_data(M * n + test_size, noise, gen)
        res = osgr_experiment(
            lambda w=w: build(w, "default"),
            data,
            F.mse_loss,
            n=n,
            M=M,
            test_size=test_size,
            lr=lr,
            epochs=epochs,
            record_at=record_at,
            seed=seed,
        )
        results.append(res)
        labels.append(f"n={n}, noise={noise}, width={w}")
        common.log(
            f"  osgr {labels[-1]}: "
            + ", ".join(
                f"e{e}: {lhs:.3f}/{rhs:.3f}" if lhs is not None and rhs is not None else f"e{e}: -"
                for e, lhs, rhs in zip(*common.osgr_pairs(res))
            )
        )
    per_epoch = common.per_epoch_pearson(results)
    figs = common.osgr_scatter(
        run, results, labels, "fl_osgr_lhs_rhs", "Toy regression (A.3): OSGR LHS (eq. 23) vs RHS (eq. 19)"
    )
    try:
        pooled = common.pool(results)
    except Exception as exc:
        pooled = {"error": repr(exc)}
    return {
        "settings": {
            "grid": grid,
            "M": M,
            "test_size": test_size,
            "epochs": epochs,
            "record_at": record_at,
            "lr": lr,
            "init": "default",
            "algorithm": "full-batch GD",
        },
        "labels": labels,
        "results": [r.to_dict() for r in results],
        "per_epoch": per_epoch,
        "pooled": pooled,
        "figures": figs,
    }


def plots(run: common.Run, configs: list[dict]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, init in zip(axes, INITS):
        for cfg in configs:
            if cfg["init"] != init:
                continue
            style = dict(color="C1", ls="--") if cfg["frozen"] else dict(color="C0", ls="-")
            lab = (
                ("frozen first layer" if cfg["frozen"] else "trainable first layer")
                if cfg["seed"] == configs[0]["seed"]
                else None
            )
            ax.plot(cfg["steps"], cfg["gsnr_layer2"], lw=1.2, alpha=0.8, label=lab, **style)
        ax.set_yscale("log")
        ax.set_xlabel("gradient-descent step")
        ax.set_ylabel("mean GSNR, second layer")
        ax.set_title(
            f"{init} initialization" + (" (N(0, 0.03²), zero bias)" if init == "small" else " (PyTorch)"), fontsize=9
        )
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 6a: second-layer GSNR, first layer trainable vs frozen (one line per seed)", fontsize=10)
    fig.tight_layout()
    figs["gsnr"] = run.save_fig(fig, "fl_gsnr_layer2")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, init in zip(axes, INITS):
        for cfg in configs:
            if cfg["init"] != init or cfg["seed"] != configs[0]["seed"]:
                continue
            c = "C1" if cfg["frozen"] else "C0"
            name = "frozen" if cfg["frozen"] else "trainable"
            ax.plot(cfg["steps"], cfg["train_loss"], color=c, ls="-", lw=1.2, label=f"{name}: train")
            ax.plot(cfg["steps"], cfg["test_loss"], color=c, ls=":", lw=1.5, label=f"{name}: test")
        ax.set_yscale("log")
        ax.set_xlabel("gradient-descent step")
        ax.set_ylabel("MSE")
        ax.set_title(f"{init} initialization (seed {configs[0]['seed']})", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 6b: training and test loss", fontsize=10)
    fig.tight_layout()
    figs["loss"] = run.save_fig(fig, "fl_loss")
    return figs


def main() -> None:
    p = common.parser(__doc__, "out/paper/feature_learning")
    p.add_argument("--no-osgr", action="store_true", help="skip the A.3 OSGR grid")
    args = p.parse_args()
    run = common.Run(args, "feature_learning.py")
    if args.quick:
        seeds, steps, every = [args.seed + i for i in range(2)], 600, 10
    else:
        seeds, steps, every = [args.seed + i for i in range(5)], 3000, 10
    lr = 0.1
    gen = torch.Generator().manual_seed(12345)
    data = make_data(200, 0.01, gen)
    test = make_data(10_000, 0.01, gen)

    t = time.perf_counter()
    configs = []
    for init in INITS:
        for seed in seeds:
            for frozen in (False, True):
                cfg = run_config(init, frozen, seed, data, test, steps=steps, lr=lr, every=every)
                common.log(
                    f"{init:7s} seed {seed} {'frozen   ' if frozen else 'trainable'}: second-layer GSNR "
                    f"start {cfg['start']:.4f} peak {cfg['peak']:.4f} (x{cfg['peak_ratio']:.2f} at step "
                    f"{cfg['peak_step']}) end {cfg['end']:.4f} (x{cfg['end_ratio']:.2f}); "
                    f"test MSE {cfg['final_test_loss']:.4g}"
                )
                configs.append(cfg)
    run.lap("gsnr_runs", t)

    summary = {}
    for init in INITS:
        for frozen in (False, True):
            sel = [c for c in configs if c["init"] == init and c["frozen"] == frozen]
            key = f"{init}_{'frozen' if frozen else 'trainable'}"
            summary[key] = {
                "peak_ratio": [c["peak_ratio"] for c in sel],
                "end_ratio": [c["end_ratio"] for c in sel],
                "peak_step": [c["peak_step"] for c in sel],
                "start": [c["start"] for c in sel],
                "final_train_loss": [c["final_train_loss"] for c in sel],
                "final_test_loss": [c["final_test_loss"] for c in sel],
            }
    tables = {f"{c['init']}_seed{c['seed']}": table1(c) for c in configs if not c["frozen"]}
    figs = plots(run, configs)

    osgr = None
    if not args.no_osgr:
        t = time.perf_counter()
        osgr = osgr_grid(run, args.quick, args.seed)
        run.lap("osgr_grid", t)

    findings = {
        # the paper's claim, per initialization: trainable rises above its start, frozen does not
        init: {
            "trainable_peak_ratio_min": min(summary[f"{init}_trainable"]["peak_ratio"]),
            "trainable_peak_ratio_max": max(summary[f"{init}_trainable"]["peak_ratio"]),
            "frozen_peak_ratio_max": max(summary[f"{init}_frozen"]["peak_ratio"]),
            "frozen_end_ratio_max": max(summary[f"{init}_frozen"]["end_ratio"]),
            "trainable_end_ratio_max": max(summary[f"{init}_trainable"]["end_ratio"]),
            "test_loss_trainable_below_frozen": all(
                a < b
                for a, b in zip(
                    summary[f"{init}_trainable"]["final_test_loss"], summary[f"{init}_frozen"]["final_test_loss"]
                )
            ),
            "table1_mean_abs_corr_init": float(
                np.mean([tables[f"{init}_seed{s}"]["mean_abs_corr_init"] for s in seeds])
            ),
            "table1_mean_abs_corr_at_peak": float(
                np.mean([tables[f"{init}_seed{s}"]["mean_abs_corr_at_peak"] for s in seeds])
            ),
        }
        for init in INITS
    }
    if osgr is not None:
        first = min(osgr["per_epoch"]) if osgr["per_epoch"] else None
        findings["osgr_first_epoch"] = first
        findings["osgr_first_epoch_pearson_c"] = osgr["per_epoch"][first]["pearson_c"] if first is not None else None
        findings["osgr_first_epoch_mean_abs_diff"] = (
            osgr["per_epoch"][first]["mean_abs_lhs_minus_rhs"] if first is not None else None
        )
        last = max(osgr["per_epoch"]) if osgr["per_epoch"] else None
        findings["osgr_last_epoch"] = last
        findings["osgr_last_epoch_pearson_c"] = osgr["per_epoch"][last]["pearson_c"] if last is not None else None
        findings["osgr_last_epoch_mean_abs_diff"] = (
            osgr["per_epoch"][last]["mean_abs_lhs_minus_rhs"] if last is not None else None
        )

    settings = {
        "n_train": 200,
        "n_test": 10_000,
        "noise": 0.01,
        "width": 20,
        "lr": lr,
        "steps": steps,
        "record_every": every,
        "seeds": seeds,
        "algorithm": "full-batch GD (torch.optim.SGD, no momentum)",
        "inits": {
            "default": "PyTorch default (Kaiming-uniform weights and biases)",
            "small": f"weights N(0, {SMALL_STD}²), zero biases",
        },
        "dtype": "float64",
        "data_seed": 12345,
    }
    results = {
        "experiment": "feature learning (Sec. 3.2, Fig. 6, Table 1) and A.3 OSGR grid",
        "settings": settings,
        "summary": summary,
        "findings": findings,
        "table1": tables,
        # per-weight GSNR and per-feature correlations over time are summarized in "table1" (they are large)
        "configs": [
            {k: v for k, v in c.items() if k not in ("trajectory", "gsnr_layer2_per_weight", "feature_corr")}
            for c in configs
        ],
        "osgr": osgr,
        "figures": figs,
    }
    run.write_results(results)
    main_cfg = next(c for c in configs if c["init"] == "small" and not c["frozen"])
    run.write_run(
        main_cfg["trajectory"],
        osgr=osgr["results"] if osgr else None,
        metadata={
            "experiment": "feature learning, small init, first layer trainable, seed "
            f"{main_cfg['seed']} (Sec. 3.2); OSGR grid of A.3",
            "findings": findings,
        },
    )
    print(f"findings: {common.plain(findings)}")


if __name__ == "__main__":
    main()
