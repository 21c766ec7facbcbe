"""Speed-up of the vectorized OSGR experiment (vmap over M models) against the sequential loop.

Issue 7, requirement 4. The paper's MNIST CNN (Table 2, p = 16 channels; 28×28 inputs):
conv 5×5 (p) → ReLU → max-pool 2 → conv 5×5 (2p) → ReLU → max-pool 2 → FC (10). M = 10 models,
each trained with full-batch gradient descent on its own n samples (synthetic 28×28 inputs —
timing does not depend on the pixels, and nothing is downloaded).

Two measurements, each interleaved (vectorized, sequential, vectorized, ...) so that machine
noise hits both alike, reported as medians and as the ratio sequential / vectorized:

1. one full-batch GD step of all M models (the part that is vectorized);
2. a whole ``osgr_experiment`` run (GD steps + the eq. 23 loss evaluations + the eq. 19/24
   per-model ``gradient_stats`` at the recorded steps, which are the same code in both).

Usage::

    python benchmarks/osgr_vectorized.py [--model cnn|mlp] [--threads 2] [--n 256] [--M 10] [--repeats 5]
                                         [--device cpu|cuda] [--skip-experiment]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from gsnr_diag.experiments.osgr import _Sequential, _Vectorized, osgr_experiment


def paper_cnn(p: int = 16, classes: int = 10) -> nn.Module:
    """Table 2 of Liu et al. (2020): conv 5×5 p, max-pool, conv 5×5 2p, max-pool, FC."""
    return nn.Sequential(
        nn.Conv2d(1, p, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 28 → 24 → 12
        nn.Conv2d(p, 2 * p, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 12 → 8 → 4
        nn.Flatten(),
        nn.Linear(2 * p * 4 * 4, classes),
    )


def mlp(hidden: int = 100, classes: int = 10) -> nn.Module:
    """A small MLP on the same 28×28 inputs, for comparison (no convolutions)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(runner, xs, ys, lr: float, steps: int, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        runner.step(xs, ys, lr)
    _sync(device)
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--M", type=int, default=10)
    ap.add_argument("--n", type=int, default=256, help="training samples per model")
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="GD steps per timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-experiment", action="store_true")
    ap.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    M, n = args.M, args.n
    xs = torch.randn(M, n, 1, 28, 28, device=device)
    ys = torch.randint(0, 10, (M, n), device=device)
    build = (lambda: paper_cnn(args.p)) if args.model == "cnn" else mlp
    model0 = build().to(device)
    loss_fn = nn.CrossEntropyLoss()
    lr = 1e-3

    vec = _Vectorized(model0, M, loss_fn)
    seq = _Sequential(model0, M, loss_fn)
    # correctness: after the same steps both give the same parameters
    for r in (vec, seq):
        r.step(xs, ys, lr)
    worst = max(
        float((vec.params[k][m] - dict(seq.models[m].named_parameters())[k]).detach().abs().max())
        for k in vec.names
        for m in range(M)
    )
    t_vec, t_seq = [], []
    for _ in range(args.repeats):
        t_vec.append(time_steps(vec, xs, ys, lr, args.steps, device))
        t_seq.append(time_steps(seq, xs, ys, lr, args.steps, device))
    step_vec, step_seq = statistics.median(t_vec), statistics.median(t_seq)
    out = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "device": str(device),
            "processor": platform.processor() or platform.machine(),
        },
        "setting": {
            "model": args.model,
            "M": M,
            "n": n,
            "p": args.p,
            "lr": lr,
            "steps_per_timing": args.steps,
            "repeats": args.repeats,
        },
        "max_abs_param_diff_after_1_step": worst,
        "gd_step_s": {"vectorized": step_vec, "sequential": step_seq, "speedup": step_seq / step_vec},
    }
    if not args.skip_experiment:
        pool_n = M * n + 512
        X = torch.randn(pool_n, 1, 28, 28)
        Y = torch.randint(0, 10, (pool_n,))
        kw = dict(n=n, M=M, test_size=512, lr=lr, epochs=20, record_at=[0, 10, 19])
        e_vec, e_seq, meas = [], [], []
        for _ in range(max(1, args.repeats // 2)):
            for vectorize, acc in ((True, e_vec), (False, e_seq)):
                t = time.perf_counter()
                r = osgr_experiment(build, (X, Y), vectorize=vectorize, **kw)
                acc.append(time.perf_counter() - t)
                meas.append(r.settings["measure_seconds"])
        ev, es = statistics.median(e_vec), statistics.median(e_seq)
        out["experiment_s"] = {
            "setting": {k: v for k, v in kw.items()},
            "vectorized": ev,
            "sequential": es,
            "speedup": es / ev,
            "gradient_stats_part_s_median": statistics.median(meas),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
