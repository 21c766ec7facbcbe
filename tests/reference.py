"""An independent float64 batch-of-one reference for every statistic (SCIENCE.md definitions).

Obviously correct, slow: one forward and backward per sample on a float64 copy of the model,
then numpy. Shares no code with gsnr_diag.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch


def _index(x, i):
    if isinstance(x, torch.Tensor):
        return x[i : i + 1]
    if isinstance(x, dict):
        return {k: _index(v, i) for k, v in x.items()}
    return tuple(_index(v, i) for v in x)


def _to_double(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    return tuple(_to_double(v) for v in x)


def _call(model, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def per_sample_gradients(model, x, y, loss_fn, mode="eval"):
    """{name: float64 numpy array [n, *shape]} by a batch-of-one loop."""
    model = copy.deepcopy(model).double()
    model.train(mode == "train")
    x = _to_double(x)
    if y.is_floating_point():
        y = y.double()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = [p for k, p in model.named_parameters() if p.requires_grad]
    n = int(y.shape[0])
    rows = {k: [] for k in names}
    for i in range(n):
        loss = loss_fn(_call(model, _index(x, i)), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for k, p, g in zip(names, params, grads):
            g = g.to_dense() if g is not None and g.is_sparse else g  # nn.Embedding(sparse=True)
            rows[k].append(np.zeros(tuple(p.shape)) if g is None else g.detach().double().numpy())
    return {k: np.stack(v) for k, v in rows.items()}


def reference_stats(model, x, y, loss_fn, mode="eval"):
    return stats_of_gradients(per_sample_gradients(model, x, y, loss_fn, mode), model)


def stats_of_gradients(G, model):
    """Every statistic from per-sample gradients {name: [n, *shape]} (numpy float64)."""
    n = int(next(iter(G.values())).shape[0])
    out = {"mean": {}, "var": {}, "gsnr": {}, "same_sign": {}}
    weights = {k: p.detach().double().numpy() for k, p in model.named_parameters() if p.requires_grad}
    for k, g in G.items():
        mean = g.mean(0)
        var = ((g - mean) ** 2).sum(0) / (n - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            gsnr = np.where(var > 0, mean**2 / var, np.nan)
        pos = (g > 0).sum(0)
        neg = (g < 0).sum(0)
        agree = np.where(mean > 0, pos, neg)
        with np.errstate(divide="ignore", invalid="ignore"):
            same = np.where((mean != 0) & (pos + neg > 0), agree / (pos + neg), np.nan)
        out["mean"][k], out["var"][k], out["gsnr"][k], out["same_sign"][k] = mean, var, gsnr, same
    flat_r = np.concatenate([v.ravel() for v in out["gsnr"].values()])
    flat_s = np.concatenate([v.ravel() for v in out["same_sign"].values()])
    out["mean_gsnr"] = float(np.nanmean(flat_r))
    out["median"] = float(np.nanquantile(flat_r, 0.5))
    out["p90"] = float(np.nanquantile(flat_r, 0.9))
    out["undefined"] = int(np.isnan(flat_r).sum())
    out["mean_same_sign"] = float(np.nanmean(flat_s))
    signal = sum(float((m**2).sum()) for m in out["mean"].values())
    noise = sum(float(v.sum()) for v in out["var"].values())
    out["osgr"] = 1 - noise / (n * signal)
    opp = tot = opp10 = tot10 = 0
    for k, w in weights.items():
        if w.ndim < 2:
            continue
        g = out["mean"][k].ravel()
        wf = w.ravel()
        opp += int((wf * g < 0).sum())
        tot += wf.size
        kk = max(1, math.ceil(0.1 * wf.size))
        idx = np.argsort(-np.abs(wf), kind="stable")[:kk]
        opp10 += int((wf[idx] * g[idx] < 0).sum())
        tot10 += kk
    out["opposite_sign"] = opp / tot if tot else None
    out["opposite_sign_top10"] = opp10 / tot10 if tot10 else None
    out["layer_gsnr"] = {k: float(np.nanmean(v)) if np.isfinite(v).any() else None for k, v in out["gsnr"].items()}
    return out
