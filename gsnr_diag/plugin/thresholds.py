"""The thresholds of ``gsnr.expect*``: their table, ini options and marker, and the order of precedence.

A threshold comes from the explicit argument of ``gsnr.expect*``, else ``@pytest.mark.gsnr(...)`` on the
test (the closest of test, class and module), else the project's ``gsnr_*`` ini option. Imported by every
pytest run of the environment, so it imports nothing heavy.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from .._format import number
from .._thresholds import VERDICT_THRESHOLDS

__all__ = [
    "MARKER_HELP",
    "SPECS",
    "SRC_CALL",
    "SRC_MARK",
    "THRESHOLDS",
    "Threshold",
    "ThresholdSpec",
    "check_value",
    "layer_thresholds",
    "marker_thresholds",
    "parse_ini_thresholds",
    "resolve_defaults",
    "threshold_text",
]


@dataclass(frozen=True)
class ThresholdSpec:
    """One threshold keyword: its ini option, the ``gsnr`` method that uses it, its help text."""

    key: str  # keyword of gsnr.expect* and of @pytest.mark.gsnr
    ini: str  # ini option holding the project-wide default
    method: str  # the gsnr method that uses it
    help: str
    layered: bool = False  # a number or a mapping {glob of parameter names: number}


def _graded(key: str) -> str:
    """How the report grades the same quantity, from the one verdict table."""
    good, watch = VERDICT_THRESHOLDS[key]
    return f" (the report grades >= {good:g} good, >= {watch:g} watch)"


THRESHOLDS: tuple[ThresholdSpec, ...] = (
    ThresholdSpec(
        "min_mean_gsnr",
        "gsnr_min_mean_gsnr",
        "expect",
        "default min_mean_gsnr of gsnr.expect: lower bound on the mean GSNR over all parameter elements",
    ),
    ThresholdSpec(
        "min_layer_gsnr",
        "gsnr_min_layer_gsnr",
        "expect",
        "default min_layer_gsnr of gsnr.expect: one number for every parameter tensor, or lines 'GLOB = NUMBER' "
        "(fnmatch globs of parameter names)",
        layered=True,
    ),
    ThresholdSpec(
        "min_same_sign",
        "gsnr_min_same_sign",
        "expect",
        "default min_same_sign of gsnr.expect: lower bound on the mean same-sign fraction (about 0.5 at "
        "initialization)",
    ),
    ThresholdSpec(
        "min_osgr",
        "gsnr_min_osgr",
        "expect",
        "default min_osgr of gsnr.expect: lower bound on the single-set one-step generalization ratio (eq. 19)",
    ),
    ThresholdSpec(
        "factor",
        "gsnr_rising_factor",
        "expect_rising",
        "default factor of gsnr.expect_rising: peak mean GSNR >= factor x its value at the first recorded step"
        + _graded("peak_rise"),
    ),
    ThresholdSpec(
        "min_ratio",
        "gsnr_min_control_ratio",
        "expect_control",
        "default min_ratio of gsnr.expect_control: real-label / shuffled-label mean-GSNR ratio"
        + _graded("control_ratio"),
    ),
)
SPECS = {s.key: s for s in THRESHOLDS}
MARKER_HELP = (
    "gsnr("
    + ", ".join(f"{s.key}=..." for s in THRESHOLDS)
    + "): default thresholds of the gsnr fixture's expect/expect_rising/expect_control for this test "
    "(explicit arguments override them; they override ini options)"
)

SRC_CALL = "argument"
SRC_MARK = "@pytest.mark.gsnr"


@dataclass(frozen=True)
class Threshold:
    """A resolved threshold: its value (a float, or a dict glob → float) and where it came from."""

    value: Any
    source: str


def _finite(value: Any, where: str, what: str = "a finite number") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: expected {what}, got {value!r}")
    return float(value)


def check_value(spec: ThresholdSpec, value: Any, where: str) -> Any:
    """Validate a threshold value given as an argument or a marker keyword."""
    if spec.layered and isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{where}: the mapping of parameter-name globs to thresholds is empty")
        out = {}
        for glob, v in value.items():
            if not isinstance(glob, str) or not glob:
                raise ValueError(
                    f"{where}: keys must be globs of parameter names such as '0.*' or '*.weight', got {glob!r}"
                )
            out[glob] = _finite(v, f"{where}[{glob!r}]")
        return out
    what = "a number or a mapping {glob of parameter names: number}" if spec.layered else "a finite number"
    return _finite(value, where, what)


def _parse_float(text: str, name: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"ini option {name}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"ini option {name}: {text!r} is not a finite number")
    return v


def _parse_layered(lines: list[str], ini: str) -> Any:
    if len(lines) == 1 and "=" not in lines[0]:
        return _parse_float(lines[0], ini)
    value = {}
    for ln in lines:
        glob, sep, num = ln.partition("=")
        if not sep or not glob.strip():
            raise ValueError(f"ini option {ini}: line {ln!r} is not 'GLOB = NUMBER'")
        value[glob.strip()] = _parse_float(num.strip(), f"{ini} ({glob.strip()})")
    return value


def parse_ini_thresholds(getini: Callable[[str], Any]) -> dict[str, Threshold]:
    """Read the ``gsnr_*`` ini options; raises :class:`pytest.UsageError` on a malformed value."""
    out: dict[str, Threshold] = {}
    for spec in THRESHOLDS:
        raw = getini(spec.ini)
        try:
            if spec.layered:
                lines = [ln.strip() for ln in (raw or []) if ln and ln.strip()]
                if not lines:
                    continue
                value: Any = _parse_layered(lines, spec.ini)
            else:
                text = (raw or "").strip() if isinstance(raw, str) else raw
                if text in ("", None):
                    continue
                value = _parse_float(str(text), spec.ini)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        out[spec.key] = Threshold(value, f"ini option {spec.ini}")
    return out


def marker_thresholds(node: Any) -> dict[str, Threshold]:
    """Thresholds from ``@pytest.mark.gsnr`` on the test, its class and module (closest wins)."""
    out: dict[str, Threshold] = {}
    for mark in reversed(list(node.iter_markers("gsnr"))):
        if mark.args:
            raise ValueError(
                f"@pytest.mark.gsnr takes keyword arguments only ({', '.join(SPECS)}), got positional {mark.args!r}"
            )
        for key, value in mark.kwargs.items():
            if key not in SPECS:
                raise ValueError(f"@pytest.mark.gsnr: unknown threshold {key!r}; known: {', '.join(SPECS)}")
            out[key] = Threshold(check_value(SPECS[key], value, f"@pytest.mark.gsnr({key}=...)"), SRC_MARK)
    return out


def resolve_defaults(node: Any, ini: Mapping[str, Threshold]) -> dict[str, Threshold]:
    """The test's default thresholds: marker over ini (explicit arguments are applied per call)."""
    merged = dict(ini)
    merged.update(marker_thresholds(node))
    return merged


def threshold_text(key: str, value: Any) -> str:
    """``key = value`` as the failure messages show it (``{glob: value}`` for per-layer thresholds)."""
    if isinstance(value, Mapping):
        return f"{key} = {{" + ", ".join(f"{g!r}: {number(v)}" for g, v in value.items()) + "}"
    return f"{key} = {number(value)}"


def layer_thresholds(value: Any, layers: list[str]) -> tuple[dict[str, float], list[str]]:
    """Per-layer minimum GSNR from a number or {glob: number}, and the globs that match no layer.

    Every matching glob applies to a layer; the strictest wins.
    """
    if not isinstance(value, Mapping):
        return {name: float(value) for name in layers}, []
    out: dict[str, float] = {}
    unmatched = []
    for glob, v in value.items():
        hit = [name for name in layers if fnmatch.fnmatchcase(name, glob)]
        if not hit:
            unmatched.append(glob)
        for name in hit:
            out[name] = max(out.get(name, -math.inf), float(v))
    return out, unmatched
