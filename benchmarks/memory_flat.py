"""Peak memory of gradient_stats() does not grow with the amount of data (issue 2, req. 6).

    python benchmarks/memory_flat.py            # prints a table
    python benchmarks/memory_flat.py --json     # the same as JSON (used by benchmarks/run.py)

Each size runs in its own subprocess: the paper's MNIST CNN and the 784-512-512-10 MLP, data
streamed as an iterable of batches of 256 synthetic samples (generated on the fly, so the data
itself takes no memory), 1× = 10 batches (2,560 samples) and 10× = 100 batches (25,600 samples).
Reported: the process's peak RSS (VmHWM) and its growth over the RSS just before the call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 256


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(model_name: str, n_batches: int) -> dict:
    import torch

    sys.path.insert(0, HERE)
    from common import make

    from gsnr_diag import gradient_stats

    torch.set_num_threads(1)
    model, _, _ = make(model_name, 2)

    def batches():
        for i in range(n_batches):
            _, X, Y = make(model_name, BATCH, seed=1000 + i)
            yield X, Y

    # warm up torch's kernels on a tiny call so that one-time initialization is not counted
    gradient_stats(model, batches_of(model_name, 2), batch_size=BATCH)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    stats = gradient_stats(model, batches(), batch_size=BATCH)
    peak = _status_kb("VmHWM")
    return {
        "model": model_name,
        "batches": n_batches,
        "n": stats.n,
        "peak_rss_mb": peak / 1024,
        "extra_mb": (peak - before) / 1024,
    }


def batches_of(model_name: str, n: int):
    sys.path.insert(0, HERE)
    from common import make

    return [make(model_name, BATCH, seed=2000 + i)[1:] for i in range(n)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
        return
    rows = []
    for model_name in ("cnn", "mlp"):
        for n_batches in (10, 100):
            r = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", model_name, str(n_batches)],
                capture_output=True,
                text=True,
                env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"),
            )
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    lines = ["| model | data | samples | peak RSS (MB) | growth during the call (MB) |", "|---|---|---|---|---|"]
    for row in rows:
        size = "1×" if row["batches"] == 10 else "10×"
        lines.append(
            f"| {row['model']} | {size} ({row['batches']} batches of {BATCH}) | {row['n']} | "
            f"{row['peak_rss_mb']:.1f} | {row['extra_mb']:.1f} |"
        )
    table = "\n".join(lines)
    if "--json" in sys.argv:
        print(json.dumps({"rows": rows, "table": table}))
    else:
        print(table)


if __name__ == "__main__":
    main()
