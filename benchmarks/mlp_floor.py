"""How low the MLP ratio can go with the Linear rule's three products and nothing else (not part of the suite).

The exact 2-D Linear rule needs three weight-sized matrix products per chunk on top of the plain pass:
(δ²)ᵀ(v²) and (δ∘u)ᵀv for the centred second moment, and one for the sign counts. This script replaces the
rule by those three products alone (into kept buffers, on uncentred δ and a: same shapes, same cost) and skips
the float64 merge of every chunk, so everything else — centring, forming M2, decoding the counts, merging —
costs nothing. Its numbers are meaningless (the call ends in a DataError, caught: nothing was merged); only its
time counts. Ratio as in ``e2e.py``: CPU time, 1 thread, interleaved with a plain forward+backward.

    python benchmarks/mlp_floor.py          # the floor, then the real call, in one process each
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch


def _three_products_only(W, a, d, signs, budget, grad, scratch):
    from gsnr_diag.capture.blocks import _buffer
    from gsnr_diag.core.moments import ChunkMoments

    shape = (d.shape[1], a.shape[1])
    outs = [_buffer(scratch, W, name, shape, a.dtype) for name in ("sq", "cross", "signs")]
    for out in outs:
        torch.mm(d.t(), a, out=out)
    m = _buffer(scratch, W, "m64", shape, torch.float64)
    return ChunkMoments(int(a.shape[0]), m, m, m, m)


def measure(floor: bool, repeats: int = 7) -> float:
    sys.path.insert(0, "benchmarks")
    import e2e

    from gsnr_diag import gradient_stats
    from gsnr_diag.errors import GsnrDiagError

    torch.set_num_threads(1)
    if floor:
        import gsnr_diag.capture.linear as linear
        import gsnr_diag.core.moments as moments

        linear._linear_weight_moments = _three_products_only
        moments.Moments.add = lambda self, name, chunk, **kw: None
    model, X, Y, loss = e2e.build("mlp")
    plain = e2e.method_plain(model, X, Y, loss)

    def call():
        try:
            gradient_stats(model, (X, Y), loss, batch_size=e2e.CHUNK)
        except GsnrDiagError:
            pass  # the floor merges nothing: no usable samples at the end

    for _ in range(2):
        plain(), call()
    ratios = []
    for _ in range(repeats):
        t0 = time.process_time()
        plain()
        t1 = time.process_time()
        call()
        t2 = time.process_time()
        plain()
        t3 = time.process_time()
        ratios.append((t2 - t1) / ((t1 - t0 + t3 - t2) / 2))
    return statistics.median(ratios)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(f"{measure(sys.argv[1] == 'floor'):.2f}")
    else:
        for label, arg in (("three products only (floor)", "floor"), ("gradient_stats as it is", "real")):
            out = subprocess.run([sys.executable, __file__, arg], capture_output=True, text=True, check=True)
            print(f"MLP 784-512-512-10, {label}: {out.stdout.strip()}x a plain forward+backward")
