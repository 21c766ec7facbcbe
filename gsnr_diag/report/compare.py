"""Compare two measurements — a run against its baseline — quantity by quantity, with uncertainty. Torch-free.

The compared point of a run is its last snapshot (or, without a trajectory, its ``final_stats``); a
:class:`~gsnr_diag.GradientStats`, a :class:`~gsnr_diag.Snapshot` or a trajectory works too. Compared:
mean GSNR, mean same-sign fraction and the noise scale B_simple, overall and per parameter tensor
(``layer_gsnr/<param>``, ...). For each: Δ = current − baseline, the relative change Δ/|baseline|, and,
when both sides carry delete-a-group jackknife standard errors (``jackknife_groups=G`` when measuring;
core/uncertainty.py), SE(Δ) = sqrt(SE_a² + SE_b²) (independent samples) and z = Δ/SE(Δ).

A *regression* is a change in the harmful direction — GSNR or same-sign down, noise scale up — by more
than ``tolerance`` (relative) and, when SE(Δ) is known, by more than ``sigma`` standard errors, so that
sampling noise alone does not fail a check. ``two_sided=True`` flags large changes either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .._format import number, text_table
from ..errors import ComparisonError

__all__ = ["QUANTITIES", "Delta", "Comparison", "comparison_point", "compare_points"]

#: quantity → direction in which it gets worse (−1: lower is worse, +1: higher is worse).
QUANTITIES = {"mean_gsnr": -1, "mean_same_sign": -1, "noise_scale": +1}
#: per-layer map of each quantity.
LAYER_MAPS = {"mean_gsnr": "layer_gsnr", "mean_same_sign": "layer_same_sign", "noise_scale": "layer_noise_scale"}


@dataclass
class Delta:
    """One compared number: baseline, current, their difference, its standard error and the verdict."""

    quantity: str  # "mean_gsnr" | "mean_same_sign" | "noise_scale"
    layer: str | None  # a parameter name, or None for the whole model
    baseline: float | None
    current: float | None
    delta: float | None
    relative: float | None
    se: float | None  # SE of delta, None when either side has no standard error
    z: float | None
    regression: bool

    @property
    def key(self) -> str:
        return self.quantity if self.layer is None else f"{LAYER_MAPS[self.quantity]}/{self.layer}"


@dataclass
class Comparison:
    """Every :class:`Delta` of two measurements and the rule they were judged by."""

    deltas: list[Delta]
    tolerance: float
    sigma: float
    two_sided: bool
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Delta]:
        return [d for d in self.deltas if d.regression]

    @property
    def ok(self) -> bool:
        return not self.regressions

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "sigma": self.sigma,
            "two_sided": self.two_sided,
            "notes": list(self.notes),
            "deltas": [asdict(d) for d in self.deltas],
        }

    def table(self) -> str:
        """A text table: quantity, baseline, current, Δ, relative, ± SE, z, verdict."""
        head = ["quantity", "baseline", "current", "Δ", "Δ/|base|", "SE(Δ)", "z", ""]
        rows = [
            [
                d.key,
                number(d.baseline),
                number(d.current),
                number(d.delta),
                "-" if d.relative is None else f"{d.relative:+.1%}",
                number(d.se),
                "-" if d.z is None else f"{d.z:+.2f}",
                "REGRESSION" if d.regression else "",
            ]
            for d in self.deltas
        ]
        out = text_table(head, rows, indent="", left=(0,))
        rule = f"regression: worse by more than {self.tolerance:.0%}"
        rule += f" and by more than {self.sigma:g} SE(Δ) where known" if self.sigma > 0 else ""
        rule += " (either direction)" if self.two_sided else " (GSNR or same-sign down, noise scale up)"
        out += ["", rule] + self.notes
        return "\n".join(out)


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def comparison_point(source: Any, what: str = "run") -> dict[str, Any]:
    """``{"values": {key: float|None}, "se": {key: float|None}}`` of the point a run/result is compared at."""
    point = source
    if isinstance(point, Mapping) and point.get("kind") == "gsnr-diag-run":  # a saved run
        point = point.get("trajectory") or point.get("final_stats")
    elif _get(point, "real") is not None and _get(point, "shuffled") is not None:  # a control result
        point = _get(point, "real")
    snaps = _get(point, "snapshots") if point is not None else None
    if snaps is not None:  # a trajectory: its last snapshot
        snaps = list(snaps)
        if not snaps:
            raise ComparisonError(f"{what}: the trajectory holds no snapshot")
        point = snaps[-1]
    if point is None or (_get(point, "mean_gsnr") is None and not _get(point, "layer_gsnr")):
        raise ComparisonError(
            f"{what}: no GSNR measurement to compare (expected a run, trajectory, snapshot or GradientStats)"
        )
    values: dict[str, float | None] = {}
    for q, layer_map in LAYER_MAPS.items():
        values[q] = _num(_get(point, q))
        for layer, v in (_get(point, layer_map) or {}).items():
            values[f"{layer_map}/{layer}"] = _num(v)
    se = {str(k): _num(v) for k, v in (_get(point, "standard_errors") or {}).items()}
    return {"values": values, "se": se}


def compare_points(
    baseline: Any,
    current: Any,
    *,
    tolerance: float = 0.2,
    sigma: float = 2.0,
    two_sided: bool = False,
    layers: bool = True,
) -> Comparison:
    """Compare ``current`` against ``baseline`` (either: a run dict, trajectory, snapshot, GradientStats)."""
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not (tolerance >= 0):
        raise ComparisonError(f"tolerance: expected a relative change ≥ 0 (0.2 = 20%), got {tolerance!r}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not (sigma >= 0):
        raise ComparisonError(f"sigma: expected a number of standard errors ≥ 0, got {sigma!r}")
    a = comparison_point(baseline, "baseline")
    b = comparison_point(current, "current")
    notes = []
    keys = [k for k in a["values"] if k in b["values"] and (layers or "/" not in k)]
    only_a = sorted(set(a["values"]) - set(b["values"]))
    only_b = sorted(set(b["values"]) - set(a["values"]))
    if only_a or only_b:
        missing = [f"{k} (baseline)" for k in only_a] + [f"{k} (current)" for k in only_b]
        notes.append("not compared (in one run only): " + ", ".join(missing))
    if not any("/" in k for k in keys) and layers:
        notes.append("no parameter name in common: per-layer values not compared")
    if not a["se"] or not b["se"]:
        notes.append("no standard errors on both sides (measure with jackknife_groups=G): tolerance only")
    deltas = []
    for key in keys:
        quantity, _, layer = key.partition("/")
        quantity = next((q for q, m in LAYER_MAPS.items() if m == quantity), quantity)
        va, vb = a["values"][key], b["values"][key]
        delta = relative = se = z = None
        regression = False
        if va is not None and vb is not None:
            delta = vb - va
            relative = delta / abs(va) if va != 0 else None
            sa, sb = a["se"].get(key), b["se"].get(key)
            if sa is not None and sb is not None:
                se = math.hypot(sa, sb)
                z = delta / se if se > 0 else None
            worse = delta * QUANTITIES[quantity] if not two_sided else abs(delta)
            big = (abs(relative) if relative is not None else (math.inf if delta != 0 else 0.0)) > tolerance
            significant = se is None or worse > sigma * se
            regression = worse > 0 and big and significant
        elif va is not None and vb is None:
            regression = True  # a value that existed became undefined (e.g. every gradient vanished)
        deltas.append(Delta(quantity, layer or None, va, vb, delta, relative, se, z, regression))
    if not deltas:
        raise ComparisonError("the two measurements have no quantity in common")
    return Comparison(deltas, float(tolerance), float(sigma), bool(two_sided), notes)


def load_comparable(path: Any) -> dict[str, Any]:
    """A saved run (validated), or a trajectory JSON / monitor JSONL as a trajectory dict, from ``path``."""
    import json
    from pathlib import Path

    from ..dynamics.trajectory import Trajectory
    from .run import validate_run

    path = Path(path)
    if path.suffix != ".jsonl":
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ComparisonError(f"{path}: no such file") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ComparisonError(f"{path}: cannot read: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ComparisonError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if isinstance(d, dict) and d.get("kind") == "gsnr-diag-run":
            return validate_run(d, str(path))
    return Trajectory.load(path).to_dict()
