"""GradientStats: GSNR, OSGR and sign statistics from finished moments — pure math, no I/O.

Definitions follow shared/SCIENCE.md and Liu et al. (ICLR 2020):

* ``mean`` ḡ_j = (1/n) Σ_i g_ij                          (eq. 5)
* ``var``  ρ²_j = Σ_i (g_ij − ḡ_j)² / (n − 1)             (eq. 2, 8)
* ``gsnr`` r_j = ḡ_j² / ρ²_j                              (eq. 2, estimated as eq. 25)
* ``same_sign``: among samples with g_ij ≠ 0, the share whose sign equals sign(ḡ_j)  (Sec. 3.1)
* ``osgr`` R = 1 − Σ_j ρ²_j / (n · Σ_j ḡ_j²)              (single-set estimate of eq. 19 / eq. 22)
* ``opposite_sign``: over weight tensors (ndim ≥ 2), share of elements with W_j·ḡ_j < 0   (Sec. 3.3, Fig. 7b)
* ``noise_scale`` B_simple = Σ_j ρ²_j / Σ_j ḡ²_j and ``m_coherence`` (core/noise.py)

Undefined elements (ρ² = 0, or every per-sample gradient at round-off level (core/roundoff.py);
for same-sign also ḡ = 0 or no non-zero sample) are NaN in the per-element tensors, excluded from
every average and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._format import number, text_table
from .._io import check_schema_version, clean_float
from .derived import PENDING as _PENDING
from .derived import Derived as _Derived
from .moments import Moments
from .noise import layer_noise_statistics, m_coherence, noise_scale
from .roundoff import roundoff_mask

__all__ = [
    "GradientStats",
    "gsnr_from_moments",
    "same_sign_fraction",
    "osgr_single_set",
    "opposite_sign_fraction",
    "stats_from_moments",
]

SCHEMA_VERSION = 1


def gsnr_from_moments(mean: torch.Tensor, var: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """r_j = ḡ_j² / (ρ²_j + ε) (eq. 2); NaN where the denominator is 0."""
    denom = var + epsilon if epsilon else var
    r = mean.square().div_(denom)
    return r.masked_fill_(~(denom > 0), math.nan)


def same_sign_fraction(mean: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """pos/(pos+neg) where ḡ > 0, neg/(pos+neg) where ḡ < 0; NaN where ḡ = 0 or pos+neg = 0 (Sec. 3.1)."""
    total = pos + neg
    frac = torch.where(mean > 0, pos, neg).to(torch.float64).div_(total)  # 0/0 = NaN where no sample is non-zero
    return frac.masked_fill_(mean == 0, math.nan)


def osgr_single_set(means: list[torch.Tensor], variances: list[torch.Tensor], n: int) -> float | None:
    """R = 1 − Σ_j ρ²_j / (n · Σ_j ḡ_j²), the single-training-set estimate of eq. 19.

    ḡ_j² is an unbiased estimate of E_D[g²_D,j] at fixed θ (SCIENCE.md); equivalent to eq. 22.
    ``None`` when every mean gradient is zero.
    """
    signal = sum(float(m.square().sum()) for m in means)
    noise = sum(float(v.sum()) for v in variances)
    if signal <= 0:
        return None
    return 1.0 - noise / (n * signal)


def opposite_sign_fraction(
    weights: dict[str, torch.Tensor], means: dict[str, torch.Tensor], top_fraction: float | None = None
) -> float | None:
    """Share of weight elements (tensors with ndim ≥ 2) with W_j · ḡ_j < 0 (Sec. 3.3, Fig. 7b).

    With ``top_fraction`` (0.1 for the paper's top 10%) only the elements with the largest
    |W| of each tensor count, pooled over tensors.
    """
    opposite = total = 0
    for name, w in weights.items():
        if w.ndim < 2 or name not in means:
            continue
        wf = w.detach().flatten().cpu().numpy()
        against = (wf * means[name].flatten().cpu().numpy()) < 0
        if top_fraction is not None:
            # the k largest |W| (ties: lower index first, as a stable sort), by one selection, no sort
            k = max(1, math.ceil(top_fraction * wf.size))
            a = np.abs(wf)
            thr = np.partition(a, wf.size - k)[wf.size - k]
            above = a > thr
            ties = np.flatnonzero(a == thr)[: k - int(above.sum())]
            opposite += int(against[above].sum()) + int(against[ties].sum())
            total += k
        else:
            opposite += int(against.sum())
            total += wf.size
    return opposite / total if total else None


def _nanmean(t: torch.Tensor) -> float | None:
    """Mean over the defined (non-NaN) elements; ``None`` when there are none."""
    count = t.numel() - int(torch.isnan(t).sum())
    if count == 0:
        return None
    return float(torch.nansum(t)) / count


def _quantiles(flat: torch.Tensor, qs=(0.5, 0.9)) -> tuple[list[float] | None, int, float | None]:
    """``(quantiles of the defined elements (numpy's linear rule), #NaN, mean of the defined)`` by one selection."""
    a = flat.numpy()
    nan = np.isnan(a)
    undefined = int(nan.sum())
    d = a[~nan] if undefined else a.copy()
    if not d.size:
        return None, undefined, None
    mean = float(d.sum()) / d.size
    pos = [q * (d.size - 1) for q in qs]
    idx = sorted({int(math.floor(p)) for p in pos} | {min(d.size - 1, int(math.floor(p)) + 1) for p in pos})
    d.partition(idx)
    out = []
    for p in pos:
        lo = int(math.floor(p))
        hi = min(d.size - 1, lo + 1)
        out.append(float(d[lo] + (d[hi] - d[lo]) * (p - lo)))
    return out, undefined, mean


@dataclass
class GradientStats:
    """Per-parameter gradient statistics of a model on a data set at fixed θ.

    Per-element tensors (float64, CPU, shaped like each parameter) are keyed by the names
    in ``model.named_parameters()``; undefined elements are NaN. Aggregates are plain
    floats (``None`` when undefined). Everything but ``n``, ``mean`` and ``var`` is derived
    on first read (and cached), so a call that needs only the moments does not pay for the rest.
    """

    n: int
    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    gsnr: dict[str, torch.Tensor] = _Derived()
    same_sign: dict[str, torch.Tensor] | None = _Derived()
    mean_gsnr: float | None = _Derived()
    gsnr_quantiles: dict[str, float | None] = _Derived()
    layer_gsnr: dict[str, float | None] = _Derived()
    layer_same_sign: dict[str, float | None] = _Derived()
    mean_same_sign: float | None = _Derived()
    osgr: float | None = _Derived()
    opposite_sign: float | None = _Derived()
    opposite_sign_top10: float | None = _Derived()
    undefined: int = _Derived()
    same_sign_undefined: int = _Derived()
    capture_paths: dict[str, str] = field(default_factory=dict)
    mode: str = "eval"
    epsilon: float = 0.0
    skipped_nonfinite: int = 0
    # gradient noise scale B_simple and m-coherence (core/noise.py), overall and per parameter tensor
    noise_scale: float | None = _Derived()
    layer_noise_scale: dict[str, float | None] = _Derived()
    m_coherence: float | None = _Derived()
    layer_m_coherence: dict[str, float | None] = _Derived()
    # delete-a-group jackknife standard errors (core/uncertainty.py), keyed "mean_gsnr", "layer_gsnr/<param>", ...
    standard_errors: dict[str, float | None] = field(default_factory=dict)
    jackknife_groups: int = 0
    # of ``undefined``: elements whose per-sample gradients are all rounding noise (core/roundoff.py)
    roundoff: int = _Derived()
    layer_undefined: dict[str, int] = _Derived()
    layer_roundoff: dict[str, int] = _Derived()

    def _derive(self) -> None:
        """Compute every derived field still pending, from the inputs kept by :func:`stats_from_moments`."""
        inputs = self.__dict__.pop("_inputs", None)
        if inputs is None:
            pending = [f for f in _DERIVED if self.__dict__.get("_" + f, _PENDING) is _PENDING]
            raise TypeError(f"GradientStats: no value for {', '.join(pending)} (pass them to the constructor)")
        derived = _derive(self.n, self.mean, self.var, *inputs, epsilon=self.epsilon)
        for name, value in derived.items():
            if self.__dict__.get("_" + name, _PENDING) is _PENDING:
                self.__dict__["_" + name] = value

    def __getstate__(self) -> dict:
        if "_inputs" in self.__dict__:
            self._derive()
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def num_elements(self) -> int:
        """Total number of measured parameter elements."""
        return sum(t.numel() for t in self.mean.values())

    def summary(self) -> str:
        """A per-parameter text table: shape, elements, mean and median GSNR, same-sign, undefined elements
        (of which at round-off level), capture path."""
        head = ["parameter", "shape", "elements", "mean GSNR", "median GSNR", "same-sign", "undef", "round-off", "path"]
        rows = []
        for name, r in self.gsnr.items():
            defined = r[~torch.isnan(r)]
            med = float(defined.median()) if defined.numel() else None
            ss = self.layer_same_sign.get(name)
            module = name.rpartition(".")[0]
            rows.append(
                [
                    name,
                    "×".join(str(s) for s in r.shape) or "scalar",
                    str(r.numel()),
                    number(self.layer_gsnr.get(name)),
                    number(med),
                    "-" if ss is None else f"{ss:.3f}",
                    str(int(torch.isnan(r).sum())),
                    str(self.layer_roundoff.get(name, 0)),
                    self.capture_paths.get(module, self.capture_paths.get(name, "?")),
                ]
            )
        out = text_table(head, rows, indent="", left=(0, 1, 8))
        q = self.gsnr_quantiles
        out.append("")
        out.append(
            f"n = {self.n} samples, {self.num_elements} elements ({self.undefined} undefined excluded: "
            f"{self.undefined - self.roundoff} with zero variance, {self.roundoff} at round-off level), "
            f"measured in {self.mode} mode"
        )
        out.append(
            f"mean GSNR {number(self.mean_gsnr)}   median {number(q.get('median'))}   p90 {number(q.get('p90'))}   "
            f"OSGR (eq. 19) {number(self.osgr)}"
        )
        out.append(f"noise scale B_simple {number(self.noise_scale)}   m-coherence {number(self.m_coherence)}")
        out.append(
            f"same-sign {number(self.mean_same_sign)}   opposite-sign {number(self.opposite_sign)}   "
            f"opposite-sign top-10% |W| {number(self.opposite_sign_top10)}"
        )
        return "\n".join(out)

    def aggregates(self) -> dict[str, Any]:
        """The scalar results as a JSON-ready dict (no per-element tensors)."""
        return {
            "n": self.n,
            "mean_gsnr": self.mean_gsnr,
            "gsnr_quantiles": dict(self.gsnr_quantiles),
            "layer_gsnr": dict(self.layer_gsnr),
            "layer_same_sign": dict(self.layer_same_sign),
            "mean_same_sign": self.mean_same_sign,
            "osgr": self.osgr,
            "opposite_sign": self.opposite_sign,
            "opposite_sign_top10": self.opposite_sign_top10,
            "undefined": self.undefined,
            "same_sign_undefined": self.same_sign_undefined,
            "capture_paths": dict(self.capture_paths),
            "mode": self.mode,
            "epsilon": self.epsilon,
            "skipped_nonfinite": self.skipped_nonfinite,
            "noise_scale": self.noise_scale,
            "layer_noise_scale": dict(self.layer_noise_scale),
            "m_coherence": self.m_coherence,
            "layer_m_coherence": dict(self.layer_m_coherence),
            "standard_errors": dict(self.standard_errors),
            "jackknife_groups": self.jackknife_groups,
            "roundoff": self.roundoff,
            "layer_undefined": dict(self.layer_undefined),
            "layer_roundoff": dict(self.layer_roundoff),
        }

    def to_dict(self, tensors: bool = True) -> dict[str, Any]:
        """JSON-ready dict; per-element tensors as ``{"shape", "data"}`` with NaN → null."""
        d = {"schema_version": SCHEMA_VERSION, **self.aggregates()}
        if tensors:
            d["mean"] = {k: _tensor_to_json(v) for k, v in self.mean.items()}
            d["var"] = {k: _tensor_to_json(v) for k, v in self.var.items()}
            d["gsnr"] = {k: _tensor_to_json(v) for k, v in self.gsnr.items()}
            d["same_sign"] = (
                None if self.same_sign is None else {k: _tensor_to_json(v) for k, v in self.same_sign.items()}
            )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GradientStats:
        """Inverse of :meth:`to_dict` (tensors come back as float64 CPU tensors)."""
        from ..errors import TrajectoryFormatError

        check_schema_version({"schema_version": SCHEMA_VERSION, **d}, SCHEMA_VERSION, "GradientStats")
        try:
            tensors = lambda key: {k: _tensor_from_json(v) for k, v in (d.get(key) or {}).items()}
            return cls(
                n=int(d["n"]),
                mean=tensors("mean"),
                var=tensors("var"),
                gsnr=tensors("gsnr"),
                same_sign=None if d.get("same_sign") is None else tensors("same_sign"),
                mean_gsnr=d["mean_gsnr"],
                gsnr_quantiles=dict(d["gsnr_quantiles"]),
                layer_gsnr=dict(d["layer_gsnr"]),
                layer_same_sign=dict(d.get("layer_same_sign") or {}),
                mean_same_sign=d["mean_same_sign"],
                osgr=d["osgr"],
                opposite_sign=d["opposite_sign"],
                opposite_sign_top10=d["opposite_sign_top10"],
                undefined=int(d["undefined"]),
                same_sign_undefined=int(d.get("same_sign_undefined", 0)),
                capture_paths=dict(d.get("capture_paths") or {}),
                mode=d.get("mode", "eval"),
                epsilon=float(d.get("epsilon", 0.0)),
                skipped_nonfinite=int(d.get("skipped_nonfinite", 0)),
                noise_scale=d.get("noise_scale"),
                layer_noise_scale=dict(d.get("layer_noise_scale") or {}),
                m_coherence=d.get("m_coherence"),
                layer_m_coherence=dict(d.get("layer_m_coherence") or {}),
                standard_errors=dict(d.get("standard_errors") or {}),
                jackknife_groups=int(d.get("jackknife_groups") or 0),
                roundoff=int(d.get("roundoff", 0)),
                layer_undefined={k: int(v) for k, v in (d.get("layer_undefined") or {}).items()},
                layer_roundoff={k: int(v) for k, v in (d.get("layer_roundoff") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TrajectoryFormatError(f"not a GradientStats dict: {exc!r}") from exc


def _tensor_to_json(t: torch.Tensor) -> dict[str, Any]:
    flat = t.detach().to(torch.float64).flatten().tolist()
    return {"shape": list(t.shape), "data": [None if not math.isfinite(v) else v for v in flat]}


def _tensor_from_json(d: dict[str, Any]) -> torch.Tensor:
    data = [math.nan if v is None else v for v in d["data"]]
    return torch.tensor(data, dtype=torch.float64).reshape(d["shape"])


def stats_from_moments(
    moments: Moments,
    weights: dict[str, torch.Tensor],
    *,
    capture_paths: dict[str, str] | None = None,
    epsilon: float = 0.0,
    mode: str = "eval",
    skipped_nonfinite: int = 0,
) -> GradientStats:
    """Finish streaming moments into :class:`GradientStats` (all aggregates of SCIENCE.md).

    ḡ and ρ² are formed now; every other field on first read (:class:`_Derived`), from the sign counts,
    the round-off evidence and a copy of the weights taken now (so later training cannot change them).
    """
    n = moments.n
    names = [k for k in weights if k in moments.count]
    mean = {k: moments.mean[k].detach().to("cpu", torch.float64) for k in names}
    var = {k: (moments.m2[k].detach().to("cpu", torch.float64) / (n - 1)) for k in names}
    ev = lambda store, k: store[k].detach().cpu() if k in store else None
    evidence = {k: (ev(moments.floor, k), ev(moments.resolved, k)) for k in names}
    signs = None
    if moments.signs:
        signs = {k: (moments.pos[k].detach().cpu(), moments.neg[k].detach().cpu()) for k in names}
    # the weights as they are now: a tensor of ndim ≥ 2 for the opposite-sign fraction, the dtype for the rest
    kept = {k: weights[k].detach().clone() if weights[k].ndim >= 2 else weights[k].dtype for k in names}
    stats = GradientStats(
        n=n,
        mean=mean,
        var=var,
        capture_paths=dict(capture_paths or {}),
        mode=mode,
        epsilon=epsilon,
        skipped_nonfinite=skipped_nonfinite,
    )
    stats.__dict__["_inputs"] = (kept, evidence, signs)
    return stats


_DERIVED = [
    "gsnr", "same_sign", "mean_gsnr", "gsnr_quantiles", "layer_gsnr", "layer_same_sign", "mean_same_sign", "osgr",
    "opposite_sign", "opposite_sign_top10", "undefined", "same_sign_undefined", "noise_scale", "layer_noise_scale",
    "m_coherence", "layer_m_coherence", "roundoff", "layer_undefined", "layer_roundoff",
]  # fmt: skip


def _derive(
    n: int,
    mean: dict[str, torch.Tensor],
    var: dict[str, torch.Tensor],
    kept: dict[str, Any],
    evidence: dict[str, tuple],
    signs: dict[str, tuple] | None,
    *,
    epsilon: float,
) -> dict[str, Any]:
    """Every derived field of :class:`GradientStats` from ḡ, ρ², the weights, round-off evidence and sign counts."""
    names = list(mean)
    dtype = lambda k: kept[k] if isinstance(kept[k], torch.dtype) else kept[k].dtype
    gsnr = {k: gsnr_from_moments(mean[k], var[k], epsilon) for k in names}
    roundoff = {k: roundoff_mask(mean[k], var[k], n, dtype(k), *evidence[k]) for k in names}
    gsnr = {k: gsnr[k].masked_fill_(roundoff[k], math.nan) for k in names}
    same_sign = None
    if signs is not None:
        same_sign = {k: same_sign_fraction(mean[k], *signs[k]).masked_fill_(roundoff[k], math.nan) for k in names}

    flat_r = torch.cat([gsnr[k].flatten() for k in names]) if names else torch.empty(0, dtype=torch.float64)
    q, undefined, mean_gsnr = _quantiles(flat_r)
    quantiles = {"median": None, "p90": None} if q is None else {"median": q[0], "p90": q[1]}

    layer_same_sign: dict[str, float | None] = {}
    mean_same_sign = None
    same_sign_undefined = 0
    if same_sign is not None:
        layer_same_sign = {k: _nanmean(same_sign[k]) for k in names}
        flat_s = torch.cat([same_sign[k].flatten() for k in names])
        same_sign_undefined = int(torch.isnan(flat_s).sum())
        mean_same_sign = _nanmean(flat_s)

    w = {k: t for k, t in kept.items() if isinstance(t, torch.Tensor)}
    layer_scale, layer_coherence = layer_noise_statistics(mean, var, n)
    means, variances = list(mean.values()), list(var.values())
    return {
        "gsnr": gsnr,
        "same_sign": same_sign,
        "mean_gsnr": clean_float(mean_gsnr),
        "gsnr_quantiles": quantiles,
        "layer_gsnr": {k: clean_float(_nanmean(gsnr[k])) for k in names},
        "layer_same_sign": layer_same_sign,
        "mean_same_sign": mean_same_sign,
        "osgr": clean_float(osgr_single_set(means, variances, n)),
        "opposite_sign": opposite_sign_fraction(w, mean),
        "opposite_sign_top10": opposite_sign_fraction(w, mean, top_fraction=0.1),
        "undefined": undefined,
        "same_sign_undefined": same_sign_undefined,
        "noise_scale": clean_float(noise_scale(means, variances)),
        "layer_noise_scale": {k: clean_float(v) for k, v in layer_scale.items()},
        "m_coherence": clean_float(m_coherence(means, variances, n)),
        "layer_m_coherence": {k: clean_float(v) for k, v in layer_coherence.items()},
        "roundoff": sum(int(m.sum()) for m in roundoff.values()),
        "layer_undefined": {k: int(torch.isnan(gsnr[k]).sum()) for k in names},
        "layer_roundoff": {k: int(roundoff[k].sum()) for k in names},
    }
