"""Online mode's cost: CPU time of a training step with OnlineGSNR attached over a plain one (interleaved).

A step is zero_grad, forward, cross-entropy, backward, SGD step on one mini-batch. Two copies of the
model train side by side, one with OnlineGSNR attached; blocks of steps alternate between them so that
machine load hits both alike. The ratio is of median per-block CPU time (time.process_time).

    python benchmarks/online_overhead.py [--rounds 15] [--block 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make

from gsnr_diag import gradient_stats
from gsnr_diag.dynamics.online import OnlineGSNR


def _step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def measure(model_name: str, batch: int, signs: bool, rounds: int, block: int, every: int = 1) -> dict:
    model, X, Y = make(model_name, batch)
    model.train()
    plain, watched = model, copy.deepcopy(model)
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-3) for m in (plain, watched)}
    online = OnlineGSNR(watched, window=10, signs=signs, every=every).attach()
    times: dict[str, list[float]] = {"plain": [], "online": []}
    for r in range(rounds + 1):
        order = (("plain", plain), ("online", watched)) if r % 2 == 0 else (("online", watched), ("plain", plain))
        for name, m in order:
            t0 = time.process_time()
            for _ in range(block):
                _step(m, opts[id(m)], X, Y)
            if r > 0:  # round 0 warms up
                times[name].append((time.process_time() - t0) / block)
    stats = online.stats()
    online.detach()
    plain_s, online_s = statistics.median(times["plain"]), statistics.median(times["online"])
    # what one full-data snapshot of n = 10 batches costs, in plain training steps
    t0 = time.process_time()
    gradient_stats(plain, (X.repeat(10, *([1] * (X.ndim - 1))), Y.repeat(10)), batch_size=batch, signs=signs)
    snapshot_s = time.process_time() - t0
    return {
        "model": model_name,
        "batch": batch,
        "signs": signs,
        "every": every,
        "plain_step_ms": 1e3 * plain_s,
        "online_step_ms": 1e3 * online_s,
        "ratio": online_s / plain_s,
        "snapshot_10_batches_in_steps": snapshot_s / plain_s,
        "paths": sorted(set(stats.capture_paths.values())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--models", default="mlp:128,cnn:64,sequence:64,transformer:64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.models.split(","):
        model_name, batch = spec.split(":")[0], int(spec.split(":")[1])
        for signs, every in ((False, 1), (True, 1), (False, 2), (False, 4)):
            row = measure(model_name, batch, signs, args.rounds, args.block, every)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| model | batch | signs | every | plain step (ms) | online step (ms) | ratio | 10-batch snapshot (steps) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['signs']} | {r['every']} | {r['plain_step_ms']:.2f} "
            f"| {r['online_step_ms']:.2f} "
            f"| {r['ratio']:.2f}× | {r['snapshot_10_batches_in_steps']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
