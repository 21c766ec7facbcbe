"""The experiments' results as plain, versioned dataclasses, and the pure summaries built on them.

Torch-free (the report and the pytest plugin read these without importing torch):

* :class:`ControlResult` — the shuffled-label control (Sec. 3.1, Fig. 5), with :func:`gsnr_ratio`
  and :func:`control_verdict`, whose thresholds are ``VERDICT_THRESHOLDS["control_ratio"]``;
* :class:`OSGRResult` — LHS (eq. 23) and RHS (eq. 19/24) of one OSGR setting (Sec. 2.4);
* :class:`OSGRPool` — several settings pooled (Fig. 4), made by :func:`pool_osgr`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .._format import number
from .._io import check_schema_version, clean_float
from .._thresholds import grade
from ..core.correlation import pearson
from ..dynamics.trajectory import Trajectory
from ..errors import TrajectoryFormatError

__all__ = [
    "RESULTS_SCHEMA_VERSION",
    "ControlResult",
    "OSGRPool",
    "OSGRResult",
    "control_verdict",
    "gsnr_ratio",
    "pool_osgr",
]

RESULTS_SCHEMA_VERSION = 1

#: The control's verdict levels, one per grade of the peak ratio against ``VERDICT_THRESHOLDS["control_ratio"]``.
CONTROL_VERDICTS = {
    "good": "real labels carry a learnable signal: {summary}",
    "watch": "weak separation: {summary}",
    "bad": "no separation: {summary}; GSNR does not distinguish real from shuffled labels",
}
#: Mean GSNR must exceed its step-0 value by this factor to count as the early rise (Fig. 5a).
EARLY_RISE_FACTOR = 1.05


def _floats(xs: Iterable[Any] | None) -> list[float | None]:
    return [clean_float(x) for x in (xs or [])]


def _check_version(d: dict[str, Any], what: str) -> None:
    """``schema_version`` (1 when absent) must be one this gsnr-diag reads."""
    if not isinstance(d, dict):
        raise TrajectoryFormatError(f"{what}: expected a dict, got {type(d).__name__}")
    check_schema_version({"schema_version": RESULTS_SCHEMA_VERSION, **d}, RESULTS_SCHEMA_VERSION, what)


# ----------------------------------------------------------------------------- the shuffled-label control
def gsnr_ratio(real: Trajectory, shuffled: Trajectory) -> tuple[list[int], list[float | None]]:
    """Steps both trajectories recorded and mean GSNR real/shuffled at each (``None`` if undefined)."""
    other = {s.step: s.mean_gsnr for s in shuffled.snapshots}
    steps, ratio = [], []
    for s in real.snapshots:
        if s.step not in other:
            continue
        a, b = s.mean_gsnr, other[s.step]
        steps.append(s.step)
        ratio.append(clean_float(a / b) if a is not None and b is not None and b > 0 else None)
    return steps, ratio


def control_verdict(
    steps: list[int], ratio: list[float | None], real: Trajectory | None = None
) -> tuple[float | None, float | None, str]:
    """(final_ratio, peak_ratio, verdict); the peak is over snapshots after step 0.

    The level is ``grade("control_ratio", peak)``. With ``real``, the verdict also says whether the
    real-label mean GSNR rose above its step-0 value (the paper's early rise, Fig. 5a) — a large
    ratio alone can come from a signal already present at initialization.
    """
    later = [r for s, r in zip(steps, ratio) if s > 0 and r is not None]
    final = next((r for r in reversed(ratio) if r is not None), None)
    peak = max(later) if later else None
    if peak is None:
        return final, peak, "undetermined: no snapshot after step 0 with a defined ratio"
    summary = f"peak real/shuffled mean-GSNR ratio {number(peak, 3)}, final {number(final, 3)}"
    if real is not None and real.snapshots:
        _, values = real.series("mean_gsnr")
        start = values[0]
        top = max((v for v in values if v is not None), default=None)
        if start and top is not None:
            summary += f"; real-label mean GSNR peak/start {number(top / start, 3)}" + (
                " (rises early)" if top > start * EARLY_RISE_FACTOR else " (no early rise)"
            )
    return final, peak, CONTROL_VERDICTS[grade("control_ratio", peak)].format(summary=summary)


@dataclass
class ControlResult:
    """Outcome of :func:`~gsnr_diag.experiments.control.shuffled_label_control`.

    ``ratio[i]`` is mean GSNR real/shuffled at ``steps[i]``; ``verdict`` reads the peak ratio against
    ``VERDICT_THRESHOLDS["control_ratio"]``.
    """

    real: Trajectory
    shuffled: Trajectory
    steps: list[int]
    ratio: list[float | None]
    final_ratio: float | None
    peak_ratio: float | None
    verdict: str
    label_noise: float

    @classmethod
    def from_runs(cls, real: Trajectory, shuffled: Trajectory, label_noise: float) -> ControlResult:
        """The ratio series and verdict of two finished runs."""
        steps, ratio = gsnr_ratio(real, shuffled)
        final, peak, verdict = control_verdict(steps, ratio, real)
        return cls(real, shuffled, steps, ratio, final, peak, verdict, float(label_noise))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "kind": "gsnr-diag-control",
            "real": self.real.to_dict(),
            "shuffled": self.shuffled.to_dict(),
            "steps": list(self.steps),
            "ratio": _floats(self.ratio),
            "final_ratio": clean_float(self.final_ratio),
            "peak_ratio": clean_float(self.peak_ratio),
            "verdict": self.verdict,
            "label_noise": self.label_noise,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlResult:
        _check_version(d, "control")
        try:
            return cls(
                real=Trajectory.from_dict(d["real"]),
                shuffled=Trajectory.from_dict(d["shuffled"]),
                steps=[int(s) for s in d["steps"]],
                ratio=_floats(d["ratio"]),
                final_ratio=clean_float(d.get("final_ratio")),
                peak_ratio=clean_float(d.get("peak_ratio")),
                verdict=str(d.get("verdict", "")),
                label_noise=float(d["label_noise"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TrajectoryFormatError(f"not a ControlResult dict: {exc!r}") from exc


# ----------------------------------------------------------------------------- the OSGR experiment
@dataclass
class OSGRResult:
    """LHS (eq. 23) and RHS (eq. 19/24) at each recorded step of one setting.

    ``train_loss``/``test_loss`` are the means over the M models at θ_t; ``rhs_single`` is the
    mean over models of the single-set estimate (GradientStats.osgr) for comparison.
    """

    epochs: list[int]
    lhs: list[float | None]
    rhs: list[float | None]
    settings: dict[str, Any]
    train_loss: list[float | None] = field(default_factory=list)
    test_loss: list[float | None] = field(default_factory=list)
    rhs_single: list[float | None] = field(default_factory=list)

    def pairs(self) -> list[tuple[int, float | None, float | None]]:
        return list(zip(self.epochs, self.lhs, self.rhs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "kind": "gsnr-diag-osgr",
            "epochs": list(self.epochs),
            "lhs": _floats(self.lhs),
            "rhs": _floats(self.rhs),
            "settings": dict(self.settings),
            "train_loss": _floats(self.train_loss),
            "test_loss": _floats(self.test_loss),
            "rhs_single": _floats(self.rhs_single),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OSGRResult:
        _check_version(d, "osgr")
        try:
            r = cls(
                epochs=[int(e) for e in d["epochs"]],
                lhs=_floats(d["lhs"]),
                rhs=_floats(d["rhs"]),
                settings=dict(d.get("settings") or {}),
                train_loss=_floats(d.get("train_loss")),
                test_loss=_floats(d.get("test_loss")),
                rhs_single=_floats(d.get("rhs_single")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TrajectoryFormatError(f"not an OSGRResult dict: {exc!r}") from exc
        if not (len(r.epochs) == len(r.lhs) == len(r.rhs)):
            raise TrajectoryFormatError("OSGRResult: epochs, lhs and rhs differ in length")
        return r


@dataclass
class OSGRPool:
    """Several settings pooled (Fig. 4): per recorded epoch the Pearson c of LHS vs RHS."""

    epochs: list[int]
    pearson: list[float | None]
    n_points: list[int]
    pearson_all: float | None
    points: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": list(self.epochs),
            "pearson": _floats(self.pearson),
            "n_points": list(self.n_points),
            "pearson_all": clean_float(self.pearson_all),
            "points": [dict(p) for p in self.points],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OSGRPool:
        return cls(
            [int(e) for e in d["epochs"]],
            _floats(d["pearson"]),
            [int(k) for k in d["n_points"]],
            clean_float(d.get("pearson_all")),
            [dict(p) for p in d.get("points", [])],
        )


def pool_osgr(results: Iterable[OSGRResult]) -> OSGRPool:
    """Pool results of several settings (n, label noise, width): Pearson c of LHS vs RHS per epoch
    (over the settings that recorded it, ``None`` with fewer than 3 points) and over all points."""
    points: list[dict[str, Any]] = []
    for i, r in enumerate(results):
        for e, lhs, rhs in r.pairs():
            if lhs is not None and rhs is not None:
                points.append({"epoch": e, "lhs": lhs, "rhs": rhs, "result": i, "settings": dict(r.settings)})
    epochs = sorted({p["epoch"] for p in points})
    cs, ks = [], []
    for e in epochs:
        sel = [p for p in points if p["epoch"] == e]
        ks.append(len(sel))
        cs.append(_pearson_points(sel))
    return OSGRPool(epochs, cs, ks, _pearson_points(points), points)


def _pearson_points(points: list[dict[str, Any]]) -> float | None:
    return pearson([p["lhs"] for p in points], [p["rhs"] for p in points])
