"""The test loss predicted from training data only: eq. 19 integrated over a run (pure Python, torch-free).

The one-step generalization ratio R_t (eq. 19, single-set estimate) is the share of a step's
training-loss decrease ΔL_t that also lowers the test loss (eq. 18, 23). Summed over the
intervals between snapshots, Σ R_t·ΔL_t is the predicted test-loss decrease, and since θ at
initialization does not depend on the training set, L_train(0) estimates L_test(0). Hence

    predicted test loss at snapshot t:  L̂'_t = L_0 − Σ_{s<t} R̄_s·ΔL_s,   ΔL_s = L_s − L_{s+1}
    predicted gap:                       L̂'_t − L_t = Σ_{s<t} (1 − R̄_s)·ΔL_s
    integrated OSGR:                     Σ_s R̄_s·ΔL_s / Σ_s ΔL_s

with R̄_s the trapezoid mean (R_s + R_{s+1})/2 of the interval's two ends (``rule="left"``: R_s
alone, what the snapshot at the start of the interval predicts). It describes the held-out loss
*of the training distribution*: with noisy training labels it predicts the loss on equally noisy
held-out labels, not on clean ones.

The band adds two parts, both stated in docs/SCIENCE.md:

* sampling: z·Σ_s |ΔL_s|·SE̅_s, SE_s the per-fold jackknife standard error of R_s
  (:func:`gsnr_diag.core.uncertainty.jackknife_osgr`), summed linearly — as if the errors of
  different snapshots were perfectly correlated (they share one training set), an upper bound;
* discretization: Σ_s |ΔL_s|·|R_{s+1} − R_s|/2, the difference between the trapezoid and the
  one-ended rules (how much R moved within the interval, which snapshots cannot see).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .._io import clean_float

__all__ = [
    "Z_95",
    "Prediction",
    "PredictedTestLoss",
    "RunRatio",
    "predict_test_loss",
    "integrated_osgr",
    "measured_ratio",
]

#: Two-sided 95% normal quantile, for the bands.
Z_95 = 1.959964

Number = float | int | None


@dataclass
class Prediction:
    """The prediction at one snapshot: value, 95% band, and the training-loss decrease it rests on."""

    value: float
    low: float
    high: float
    gap: float | None
    decrease: float  # L_0 − L_t, the training-loss decrease so far
    predicted_decrease: float  # Σ R̄ ΔL, the predicted test-loss decrease so far
    halfwidth_sampling: float
    halfwidth_discretization: float


@dataclass
class PredictedTestLoss:
    """:meth:`Trajectory.predicted_test_loss`: per snapshot, the predicted and the measured test loss."""

    steps: list[int]
    value: list[float | None]
    low: list[float | None]
    high: list[float | None]
    gap: list[float | None]
    measured: list[float | None] = field(default_factory=list)
    measured_gap: list[float | None] = field(default_factory=list)
    rule: str = "trapezoid"

    @property
    def final(self) -> float | None:
        return next((v for v in reversed(self.value) if v is not None), None)


def predict_test_loss(
    train_loss: Sequence[Number],
    osgr: Sequence[Number],
    osgr_se: Sequence[Number] | None = None,
    *,
    rule: str = "trapezoid",
    z: float = Z_95,
) -> list[Prediction | None]:
    """The prediction at every snapshot (``None`` where it is undefined: before a defined L_0, or after a gap).

    ``train_loss``, ``osgr`` and ``osgr_se`` are aligned per snapshot in step order. An interval
    whose two ends lack R or a training loss ends the prediction (what follows would rest on a
    guess); a missing SE counts as 0 in the sampling band.
    """
    if rule not in ("trapezoid", "left"):
        raise ValueError(f"rule: expected 'trapezoid' or 'left', got {rule!r}")
    L = [clean_float(x) for x in train_loss]
    R = [clean_float(x) for x in osgr]
    S = [clean_float(x) for x in (osgr_se or [None] * len(L))]
    out: list[Prediction | None] = [None] * len(L)
    if not L or L[0] is None:
        return out
    pred_drop = samp = disc = 0.0
    out[0] = Prediction(L[0], L[0], L[0], 0.0, 0.0, 0.0, 0.0, 0.0)
    for s in range(len(L) - 1):
        a, b = L[s], L[s + 1]
        ra, rb = R[s], R[s + 1]
        if a is None or b is None or (ra is None and rb is None):
            break
        if rule == "left" and ra is None:
            break
        d = a - b
        if rule == "left" or rb is None:
            r = ra if ra is not None else rb
            se = S[s] if ra is not None else S[s + 1]
        elif ra is None:
            r, se = rb, S[s + 1]
        else:
            r = 0.5 * (ra + rb)
            ses = [x for x in (S[s], S[s + 1]) if x is not None]
            se = sum(ses) / len(ses) if ses else None
        assert r is not None
        pred_drop += r * d
        samp += abs(d) * z * (se or 0.0)
        if ra is not None and rb is not None:
            disc += abs(d) * abs(rb - ra) / 2
        value = L[0] - pred_drop
        half = samp + disc
        out[s + 1] = Prediction(value, value - half, value + half, value - b, L[0] - b, pred_drop, samp, disc)
    return out


@dataclass
class RunRatio:
    """A ratio over the run with its 95% interval (``None`` bounds: no interval)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    decrease: float | None = None


def integrated_osgr(
    train_loss: Sequence[Number],
    osgr: Sequence[Number],
    osgr_se: Sequence[Number] | None = None,
    *,
    rule: str = "trapezoid",
    z: float = Z_95,
) -> RunRatio:
    """Σ R̄ ΔL / Σ ΔL over the snapshots with a defined prediction, with its band ÷ Σ ΔL.

    ``value`` is ``None`` when the training loss did not fall (Σ ΔL ≤ 0): nothing to share out.
    """
    preds = [p for p in predict_test_loss(train_loss, osgr, osgr_se, rule=rule, z=z) if p is not None]
    if len(preds) < 2 or preds[-1].decrease <= 0:
        return RunRatio(None, decrease=preds[-1].decrease if preds else None)
    last = preds[-1]
    v = last.predicted_decrease / last.decrease
    half = (last.halfwidth_sampling + last.halfwidth_discretization) / last.decrease
    return RunRatio(v, v - half, v + half, last.decrease)


def measured_ratio(train_loss: Sequence[Number], test_loss: Sequence[Number]) -> float | None:
    """(L'_0 − L'_T)/(L_0 − L_T) between the first and last snapshots with both losses (eq. 23 over the run)."""
    pairs = [(clean_float(a), clean_float(b)) for a, b in zip(train_loss, test_loss)]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if len(pairs) < 2 or pairs[0][0] - pairs[-1][0] <= 0:
        return None
    return (pairs[0][1] - pairs[-1][1]) / (pairs[0][0] - pairs[-1][0])
