"""Print the reference zoo's worst errors per statistic (float32, float64) and each layer type's capture path.

    python benchmarks/zoo_report.py            # markdown tables on stdout (about a minute on one core)

The cases and the error definitions are those of the zoo tests (tests/zoo_cases.py, ``compare``): every
torch.nn layer type that owns parameters, each forced onto every capture path it can take, against the
float64 batch-of-one loop of tests/reference.py. Not part of the test suite.
"""

from __future__ import annotations

import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torch  # noqa: E402
from reference import reference_stats  # noqa: E402
from torch import nn  # noqa: E402
from zoo_cases import BATCH, CASES, build, compare, force_path, layer_path, layer_paths  # noqa: E402

from gsnr_diag import gradient_stats  # noqa: E402

STATS = ("mean", "var", "gsnr", "same_sign", "undefined", "roundoff")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _run(name: str, dtype: torch.dtype, path: str | None):
    model, x, y = build(name, dtype)
    try:
        ref = reference_stats(model, x, y, nn.CrossEntropyLoss())
        if path is None:
            got = gradient_stats(model, (x, y), nn.CrossEntropyLoss(), batch_size=BATCH)
        else:
            with force_path(path):
                got = gradient_stats(model, (x, y), nn.CrossEntropyLoss(), batch_size=BATCH)
    except Exception as exc:  # a case that fails (marked xfail in the tests) is reported, not hidden
        return None, f"{type(exc).__name__}: {str(exc)[:80]}"
    return compare(got, ref, dtype), ",".join(sorted(layer_path(got)))


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    worst = {d: {s: (0.0, "") for s in STATS} for d in DTYPES}
    rows, failures, known = [], [], []
    for name in CASES:
        natural = {}
        for dname, dtype in DTYPES.items():
            err, path = _run(name, dtype, None)
            natural[dname] = path
            for forced in [None, *layer_paths(name, build(name, torch.float64)[0])]:
                err, taken = (err, path) if forced is None else _run(name, dtype, forced)
                marks = CASES[name].xfail
                reason = marks.get(forced) or marks.get("*") if forced else next(iter(marks.values()), None)
                if err is None or reason:
                    shown = taken if err is None else ", ".join(f"{s} {err[s]:.3g}" for s in STATS)
                    (known if reason else failures).append(
                        f"| {name} | {forced or 'default'} | {dname} | {shown} | {reason or ''} |"
                    )
                    continue
                for s in STATS:
                    if err[s] > worst[dname][s][0]:
                        worst[dname][s] = (err[s], f"{name} ({taken})")
        rows.append(f"| {name} | {natural['float32']} | {natural['float64']} |")
    print("## Worst error per statistic over the zoo (every case and capture path not marked xfail)\n")
    print("| statistic | float32 | worst case (float32) | float64 | worst case (float64) |")
    print("|---|---|---|---|---|")
    for s in STATS:
        (a, ca), (b, cb) = worst["float32"][s], worst["float64"][s]
        fmt = (lambda v: f"{int(v)}") if s in ("undefined", "roundoff") else (lambda v: f"{v:.2e}")
        print(f"| {s} | {fmt(a)} | {ca} | {fmt(b)} | {cb} |")
    print("\n## Capture path of each layer type (default, no path forced)\n")
    print("| layer type | float32 | float64 |")
    print("|---|---|---|")
    print("\n".join(rows))
    for title, lines in (("Cases marked xfail (known)", known), ("Cases that fail", failures)):
        if lines:
            print(f"\n## {title}\n")
            print("| case | path | dtype | error or errors | reason |")
            print("|---|---|---|---|---|")
            print("\n".join(lines))


if __name__ == "__main__":
    main()
