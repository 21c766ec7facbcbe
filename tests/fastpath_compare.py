"""Element-wise comparison of gradient_stats with the float64 batch-of-one reference (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
from reference import reference_stats

from gsnr_diag import gradient_stats

RTOL = 1e-5


def close(actual, expected, rtol=RTOL, what="", floor=0.0):
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, what
    if not a.size:
        return
    scale = max(float(np.nanmax(np.abs(b))), floor, 1e-300)
    err = float(np.nanmax(np.abs(a - b)))
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol} x {scale:.3e}"


def compare(model, x, y, loss_fn, *, fast=True, rtol=RTOL, **kw):
    """gradient_stats vs the reference; ``fast``: no module on the functorch or loop path."""
    ref = reference_stats(model, x, y, loss_fn)
    got = gradient_stats(model, (x, y), loss_fn, **kw)
    if fast:
        slow = {m: p for m, p in got.capture_paths.items() if p in ("functorch", "loop")}
        assert not slow, slow
    layer = {}
    for k in ref["mean"]:
        lm, lv = layer.get(k.rsplit(".", 1)[0], (0.0, 0.0))
        layer[k.rsplit(".", 1)[0]] = (max(lm, np.abs(ref["mean"][k]).max()), max(lv, ref["var"][k].max()))
    for k in ref["mean"]:
        # A gradient that vanishes in exact arithmetic (an attention key bias: softmax ignores it) is
        # rounding noise of its layer's scale on both sides: compared at that scale, not its own.
        lm, lv = layer[k.rsplit(".", 1)[0]]
        close(got.mean[k], ref["mean"][k], rtol, f"mean[{k}]", floor=1e-6 * lm)
        close(got.var[k], ref["var"][k], rtol, f"var[{k}]", floor=1e-9 * lv)
        if np.abs(ref["mean"][k]).max() < 1e-9 * lm and ref["var"][k].max() < 1e-15 * lv:
            continue
        v = ref["var"][k]
        defined = v > 1e-20 * max(1e-300, float(np.nanmax(v)))
        close(got.gsnr[k].numpy()[defined], ref["gsnr"][k][defined], 10 * rtol, f"gsnr[{k}]")
        m = np.abs(ref["mean"][k])
        trusted = defined & (m > 1e-9 * max(1e-300, m.max()))
        close(got.same_sign[k].numpy()[trusted], ref["same_sign"][k][trusted], rtol, f"same_sign[{k}]")
    assert got.osgr == pytest.approx(ref["osgr"], rel=1e-4)
    return got
