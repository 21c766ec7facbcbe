"""Snapshot and Trajectory: GSNR statistics along training, versioned and JSON-persistent.

A :class:`Snapshot` holds the scalar results of one measurement (no per-element tensors):
mean GSNR (eq. 2, averaged as in Fig. 5), its quantiles, per-layer GSNR, the single-set OSGR
(eq. 19), sign statistics (Sec. 3.1, Sec. 3.3 / Fig. 7), losses and accuracies. A
:class:`Trajectory` is the list of snapshots plus metadata.

Two file formats, both read by :meth:`Trajectory.load`:

* ``.json`` — ``{"schema_version", "kind": "gsnr-diag-trajectory", "metadata", "snapshots"}``
  written by :meth:`Trajectory.save`. A saved run (``"kind": "gsnr-diag-run"``) is accepted
  too: its ``"trajectory"`` is loaded.
* ``.jsonl`` — what a :class:`~gsnr_diag.monitor.Monitor` appends while training runs: a header
  line ``{"schema_version", "kind": "gsnr-diag-trajectory-header", "metadata"}``, then one
  ``{"snapshot": {...}}`` line per record and optional ``{"metadata": {...}}`` update lines
  (merged in order). A truncated last line — what a killed process leaves — is skipped with a
  warning; any other malformed line is a :class:`~gsnr_diag.errors.TrajectoryFormatError`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._fields import SNAPSHOT_NUMBER_FIELDS
from .._io import check_schema_version, clean_float, to_plain, write_json
from ..errors import GsnrDiagError, TrajectoryFormatError
from .generalization import PredictedTestLoss, predict_test_loss

__all__ = [
    "SCHEMA_VERSION",
    "Snapshot",
    "Trajectory",
    "UnknownSeriesError",
    "TruncatedTrajectoryWarning",
    "clean_float",
]

SCHEMA_VERSION = 1
KIND = "gsnr-diag-trajectory"
HEADER_KIND = "gsnr-diag-trajectory-header"


class UnknownSeriesError(GsnrDiagError, KeyError):
    """:meth:`Trajectory.series` was asked for a quantity (or layer) that the snapshots do not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TruncatedTrajectoryWarning(UserWarning):
    """The last line of a JSONL trajectory was cut off (a run killed while writing); it was skipped."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v: Any, name: str) -> int:
    """A non-negative JSON integer (a step, a count); anything else is a TypeError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError(f"{name} = {v!r} is not a non-negative integer")
    return v


def _clean_map(d: dict[str, Any] | None) -> dict[str, float | None]:
    return {str(k): clean_float(v) for k, v in (d or {}).items()}


@dataclass
class Snapshot:
    """Scalar GSNR statistics of the model at one training step (all optional floats may be ``None``).

    Fields follow shared/SCIENCE.md: ``mean_gsnr`` (eq. 2 averaged over elements with ρ² > 0),
    ``gsnr_median``/``gsnr_p90``, ``layer_gsnr`` and ``layer_same_sign`` per parameter tensor,
    ``osgr`` (single-set eq. 19), ``mean_same_sign`` (Sec. 3.1), ``opposite_sign`` and
    ``opposite_sign_top10`` (Sec. 3.3, Fig. 7b), ``delta_g_weight_corr`` (Pearson over weight
    elements between Δḡ since the previous snapshot and W; eq. 28, Fig. 7a; ``None`` on the first),
    losses measured at the current weights, ``generalization_gap`` = test − train loss,
    accuracies (``None`` for regression), ``elapsed`` seconds since the monitor started,
    ``undefined`` elements (ρ² = 0) and the caller's ``extra`` numbers; ``noise_scale`` (B_simple) and
    ``m_coherence``, overall and per layer (``layer_noise_scale``, ``layer_m_coherence``; core/noise.py).

    ``osgr_se`` is the jackknife standard error of ``osgr`` over folds of the training set
    (:func:`~gsnr_diag.measure.gradient_stats_with_se`); ``predicted_test_loss`` (with its 95%
    ``predicted_test_loss_band`` [low, high]) and ``predicted_gap`` are the test loss and gap predicted
    from the training data only, L_train(0) − Σ R̄·ΔL up to this snapshot
    (:mod:`gsnr_diag.dynamics.generalization`), filled in by the :class:`Trajectory`.
    """

    step: int
    epoch: float | None = None
    mean_gsnr: float | None = None
    gsnr_median: float | None = None
    gsnr_p90: float | None = None
    layer_gsnr: dict[str, float | None] = field(default_factory=dict)
    layer_same_sign: dict[str, float | None] = field(default_factory=dict)
    osgr: float | None = None
    mean_same_sign: float | None = None
    opposite_sign: float | None = None
    opposite_sign_top10: float | None = None
    delta_g_weight_corr: float | None = None
    train_loss: float | None = None
    test_loss: float | None = None
    generalization_gap: float | None = None
    train_accuracy: float | None = None
    test_accuracy: float | None = None
    elapsed: float = 0.0
    undefined: int = 0
    extra: dict[str, float | None] = field(default_factory=dict)
    # gradient noise scale B_simple (McCandlish et al. 2018) and m-coherence (Chatterjee & Zielinski 2020)
    noise_scale: float | None = None
    layer_noise_scale: dict[str, float | None] = field(default_factory=dict)
    m_coherence: float | None = None
    layer_m_coherence: dict[str, float | None] = field(default_factory=dict)
    # delete-a-group jackknife standard errors ("mean_gsnr", "layer_gsnr/<param>", ...; core/uncertainty.py)
    standard_errors: dict[str, float | None] = field(default_factory=dict)
    # per layer: histogram of log10 of the per-element GSNR (core/histogram.py), for TensorBoard/W&B
    layer_log10_gsnr_hist: dict[str, dict[str, Any]] = field(default_factory=dict)
    osgr_se: float | None = None
    predicted_test_loss: float | None = None
    predicted_test_loss_band: list[float] | None = None
    predicted_gap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite numbers become ``None``."""
        d = asdict(self)
        for f in _FLOAT_FIELDS:
            d[f] = clean_float(d[f])
        for f in _MAP_FIELDS:
            d[f] = _clean_map(d[f])
        d["elapsed"] = clean_float(self.elapsed) or 0.0
        d["predicted_test_loss_band"] = _band(self.predicted_test_loss_band)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Snapshot:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (forward-compatible within a schema version)."""
        if not isinstance(d, dict):
            raise TrajectoryFormatError(f"snapshot: expected an object, got {type(d).__name__}")
        if "step" not in d:
            raise TrajectoryFormatError(f"snapshot: missing 'step' (keys: {sorted(d)[:8]})")
        try:
            kw: dict[str, Any] = {"step": _count(d["step"], "step")}
            for f in (*_FLOAT_FIELDS, "elapsed"):
                if d.get(f) is not None and (isinstance(d[f], bool) or not isinstance(d[f], (int, float))):
                    raise TypeError(f"{f} = {d[f]!r} is not a number")
                if f in d:
                    kw[f] = clean_float(d[f])
            kw["elapsed"] = kw.get("elapsed") or 0.0
            for f in _MAP_FIELDS:
                if d.get(f) is not None:
                    if not isinstance(d[f], dict):
                        raise TypeError(f"{f} is a {type(d[f]).__name__}, expected an object")
                    bad = [k for k, v in d[f].items() if v is not None and not _is_number(v)]
                    if bad:
                        raise TypeError(f"{f}[{bad[0]!r}] = {d[f][bad[0]]!r} is not a number")
                    kw[f] = _clean_map(d[f])
            hist = d.get("layer_log10_gsnr_hist")
            if isinstance(hist, dict):
                kw["layer_log10_gsnr_hist"] = {str(k): v for k, v in hist.items() if isinstance(v, dict)}
            kw["predicted_test_loss_band"] = _band(d.get("predicted_test_loss_band"))
            kw["undefined"] = _count(d.get("undefined") or 0, "undefined")
        except (TypeError, ValueError, OverflowError) as exc:
            raise TrajectoryFormatError(f"snapshot at step {d.get('step')!r}: {exc}") from exc
        return cls(**kw)


def _band(b: Any) -> list[float] | None:
    """A [low, high] pair of finite numbers, else ``None``."""
    if not isinstance(b, (list, tuple)) or len(b) != 2:
        return None
    lo, hi = clean_float(b[0]), clean_float(b[1])
    return None if lo is None or hi is None else [lo, hi]


_FLOAT_FIELDS = SNAPSHOT_NUMBER_FIELDS
_MAP_FIELDS = ("layer_gsnr", "layer_same_sign", "extra", "layer_noise_scale", "layer_m_coherence", "standard_errors")
_LAYER_SERIES = ("layer_gsnr", "layer_same_sign", "layer_noise_scale", "layer_m_coherence")
_SCALAR_SERIES = set(_FLOAT_FIELDS) | {"elapsed", "undefined"}


@dataclass
class Trajectory:
    """Snapshots in recording order plus run metadata.

    ``metadata`` keys (docs/CONTRACT.md): ``model``, ``param_counts``, ``n_train``, ``n_test``,
    ``task``, ``settings``, ``seed``, ``device``, ``versions``, ``command``, ``label``.
    """

    snapshots: list[Snapshot] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.snapshots)

    @property
    def steps(self) -> list[int]:
        return [s.step for s in self.snapshots]

    def layers(self) -> list[str]:
        """Parameter names that have a per-layer GSNR in some snapshot, in first-seen order."""
        seen: dict[str, None] = {}
        for s in self.snapshots:
            seen.update(dict.fromkeys(s.layer_gsnr))
        return list(seen)

    def series(self, name: str, layer: str | None = None) -> tuple[list[int], list[float | None]]:
        """``(steps, values)`` of one quantity over the snapshots.

        ``name`` is a :class:`Snapshot` field (``"mean_gsnr"``, ``"osgr"``, ``"test_loss"``...),
        ``"layer_gsnr"``/``"layer_same_sign"`` with ``layer`` (a parameter name such as
        ``"0.weight"``), or a key of the snapshots' ``extra``. Missing values are ``None``.
        """
        steps = self.steps
        if name in _LAYER_SERIES:
            if layer is None:
                raise UnknownSeriesError(f"series({name!r}) needs layer=..., one of {self.layers()}")
            if not any(layer in getattr(s, name) for s in self.snapshots):
                raise UnknownSeriesError(f"series({name!r}): no layer {layer!r}; layers are {self.layers()}")
            return steps, [getattr(s, name).get(layer) for s in self.snapshots]
        if layer is not None:
            raise UnknownSeriesError(f"series({name!r}): layer= applies only to {', '.join(_LAYER_SERIES)}")
        if name in _SCALAR_SERIES:
            return steps, [getattr(s, name) for s in self.snapshots]
        if any(name in s.extra for s in self.snapshots):
            return steps, [s.extra.get(name) for s in self.snapshots]
        known = sorted(_SCALAR_SERIES | set(_LAYER_SERIES))
        extras = sorted({k for s in self.snapshots for k in s.extra})
        raise UnknownSeriesError(
            f"series: unknown quantity {name!r}; known: {known}" + (f", extra: {extras}" if extras else "")
        )

    def predicted_test_loss(self, rule: str = "trapezoid") -> PredictedTestLoss:
        """The test loss predicted from the training data alone at every snapshot, beside the measured one.

        L̂'_t = L_train(0) − Σ_{s<t} R̄_s·ΔL_s (eq. 19 integrated over the run; see
        :mod:`gsnr_diag.dynamics.generalization`), with a 95% band from the jackknife SE of each R_s
        and the change of R within each interval. ``rule="left"`` uses R at the start of each interval.
        """
        snaps = self.snapshots
        preds = predict_test_loss(
            [s.train_loss for s in snaps], [s.osgr for s in snaps], [s.osgr_se for s in snaps], rule=rule
        )
        return PredictedTestLoss(
            steps=self.steps,
            value=[p.value if p else None for p in preds],
            low=[p.low if p else None for p in preds],
            high=[p.high if p else None for p in preds],
            gap=[p.gap if p else None for p in preds],
            measured=[s.test_loss for s in snaps],
            measured_gap=[s.generalization_gap for s in snaps],
            rule=rule,
        )

    def fill_predictions(self) -> None:
        """Store :meth:`predicted_test_loss` (trapezoid rule) in every snapshot, in step order."""
        order = sorted(range(len(self.snapshots)), key=lambda i: self.snapshots[i].step)
        snaps = [self.snapshots[i] for i in order]
        preds = predict_test_loss([s.train_loss for s in snaps], [s.osgr for s in snaps], [s.osgr_se for s in snaps])
        for s, p in zip(snaps, preds):
            s.predicted_test_loss = p.value if p else None
            s.predicted_test_loss_band = [p.low, p.high] if p else None
            s.predicted_gap = p.gap if p else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``schema_version``; every snapshot carries its ``predicted_test_loss``."""
        self.fill_predictions()
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "metadata": _jsonable(self.metadata),
            "snapshots": [s.to_dict() for s in self.snapshots],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        """Inverse of :meth:`to_dict`; also accepts a saved run dict (takes its ``"trajectory"``)."""
        if not isinstance(d, dict):
            raise TrajectoryFormatError(f"trajectory: expected a JSON object, got {type(d).__name__}")
        _check_version(d, "trajectory")
        if "snapshots" not in d and "trajectory" in d:  # a container of one (a saved run)
            if not isinstance(d.get("trajectory"), dict):
                raise TrajectoryFormatError(f"{d.get('kind') or 'file'}: it holds no 'trajectory' object")
            return cls.from_dict(d["trajectory"])
        if "snapshots" not in d or not isinstance(d["snapshots"], list):
            raise TrajectoryFormatError(
                f"trajectory: expected a 'snapshots' list (found keys {sorted(d)[:8]}); is this a gsnr-diag file?"
            )
        meta = d.get("metadata") or {}
        if not isinstance(meta, dict):
            raise TrajectoryFormatError(f"trajectory: 'metadata' is a {type(meta).__name__}, expected an object")
        return cls([Snapshot.from_dict(s) for s in d["snapshots"]], dict(meta))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the trajectory as one JSON file (atomically: a temporary file, then rename)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Trajectory:
        """Read a trajectory saved by :meth:`save` (``.json``), a saved run, or a monitor's JSONL.

        A truncated last JSONL line is skipped with a :class:`TruncatedTrajectoryWarning`;
        anything else malformed, or a newer ``schema_version``, raises
        :class:`~gsnr_diag.errors.TrajectoryFormatError`.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise TrajectoryFormatError(f"{path}: no such file") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise TrajectoryFormatError(f"{path}: cannot read: {exc}") from exc
        stripped = text.lstrip()
        if not stripped:
            raise TrajectoryFormatError(f"{path}: the file is empty")
        if path.suffix == ".jsonl" or _looks_like_jsonl(stripped):
            try:
                return _load_jsonl(path, text)
            except RecursionError:
                raise TrajectoryFormatError(f"{path}: a line is nested too deeply to be a trajectory") from None
        try:
            d = json.loads(text)
            return cls.from_dict(d)
        except json.JSONDecodeError as exc:
            raise TrajectoryFormatError(f"{path}: not valid JSON ({exc})") from exc
        except TrajectoryFormatError as exc:
            raise TrajectoryFormatError(f"{path}: {exc}") from exc
        except RecursionError:
            raise TrajectoryFormatError(f"{path}: the JSON is nested too deeply to be a trajectory") from None


def _looks_like_jsonl(text: str) -> bool:
    first = text.split("\n", 1)[0]
    try:
        d = json.loads(first)
    except (json.JSONDecodeError, RecursionError):
        return False
    return isinstance(d, dict) and d.get("kind") == HEADER_KIND


def _check_version(d: dict[str, Any], what: str) -> None:
    check_schema_version(d, SCHEMA_VERSION, what)


def _load_jsonl(path: Path, text: str) -> Trajectory:
    lines = text.split("\n")
    complete = text.endswith("\n")
    # index of the last non-empty line
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    traj = Trajectory()
    header_seen = False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last and not complete:
                warnings.warn(
                    f"{path}: line {i + 1} is truncated (the run was probably killed while writing it); "
                    f"skipped, {len(traj.snapshots)} snapshot(s) loaded",
                    TruncatedTrajectoryWarning,
                    stacklevel=3,
                )
                break
            raise TrajectoryFormatError(f"{path}: line {i + 1} is not valid JSON ({exc})") from exc
        if not isinstance(d, dict):
            raise TrajectoryFormatError(f"{path}: line {i + 1} is a {type(d).__name__}, expected an object")
        if not header_seen:
            if d.get("kind") != HEADER_KIND:
                raise TrajectoryFormatError(
                    f"{path}: line 1 is not a gsnr-diag trajectory header (kind {d.get('kind')!r})"
                )
            _check_version(d, str(path))
            traj.metadata = dict(d.get("metadata") or {})
            header_seen = True
        elif "snapshot" in d:
            try:
                traj.snapshots.append(Snapshot.from_dict(d["snapshot"]))
            except TrajectoryFormatError as exc:
                raise TrajectoryFormatError(f"{path}: line {i + 1}: {exc}") from exc
        elif "metadata" in d and isinstance(d["metadata"], dict):
            traj.metadata.update(d["metadata"])
        else:
            raise TrajectoryFormatError(f"{path}: line {i + 1} is neither a snapshot nor a metadata update")
    if not header_seen:
        raise TrajectoryFormatError(f"{path}: no complete header line")
    return traj


_jsonable = to_plain


def header_line(metadata: dict[str, Any]) -> str:
    """The first line of a monitor's JSONL file."""
    return json.dumps(
        {"schema_version": SCHEMA_VERSION, "kind": HEADER_KIND, "metadata": _jsonable(metadata)}, allow_nan=False
    )


def snapshot_line(snapshot: Snapshot) -> str:
    """One JSONL line holding a snapshot."""
    return json.dumps({"snapshot": snapshot.to_dict()}, allow_nan=False)


def metadata_line(update: dict[str, Any]) -> str:
    """One JSONL line updating the metadata (merged into the header's on load)."""
    return json.dumps({"metadata": _jsonable(update)}, allow_nan=False)
