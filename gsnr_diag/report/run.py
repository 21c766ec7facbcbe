"""The saved run ("run JSON"): everything a report is rendered from, and nothing else.

Format (docs/CONTRACT.md)::

    {"schema_version": 1, "kind": "gsnr-diag-run",
     "trajectory": Trajectory.to_dict(),
     "control": ControlResult.to_dict() | None,
     "osgr": [OSGRResult.to_dict(), ...] | None,
     "final_stats": GradientStats.aggregates() | None,
     "metadata": {...},
     "verdict": {"level", "headline", "indicators": [{"name", "value", "interval", "status", "threshold"}]}}

Every snapshot of the trajectory carries ``predicted_test_loss`` (with ``predicted_test_loss_band``
and ``predicted_gap``); ``verdict`` is recomputed from the rest whenever a run is assembled.

The report reads these plain dicts only, so a saved run re-renders without torch
objects, and a run that crashed half-way (saved as it went) still renders what it has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._io import check_schema_version, clean_float, to_plain, write_json
from ..errors import TrajectoryFormatError
from .schema import check_run

__all__ = [
    "RUN_SCHEMA_VERSION",
    "RUN_KIND",
    "new_run",
    "save_run",
    "load_run",
    "parse_json",
    "validate_run",
    "to_plain",
    "run_metadata",
    "snapshots",
    "snapshot_series",
]

RUN_SCHEMA_VERSION = 1
RUN_KIND = "gsnr-diag-run"


def new_run(
    trajectory: Any = None,
    *,
    control: Any = None,
    osgr: Any = None,
    final_stats: Any = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a run dict from library objects or their dicts (any part may be ``None``)."""
    if final_stats is not None and hasattr(final_stats, "aggregates"):
        final_stats = final_stats.aggregates()
    if osgr is not None and not isinstance(osgr, (list, tuple)):
        osgr = [osgr]
    run = {
        "schema_version": RUN_SCHEMA_VERSION,
        "kind": RUN_KIND,
        "trajectory": to_plain(trajectory),
        "control": to_plain(control),
        "osgr": to_plain(list(osgr)) if osgr is not None else None,
        "final_stats": to_plain(final_stats),
        "metadata": to_plain(dict(metadata or {})),
    }
    from .verdicts import verdict_object  # verdicts reads run dicts through this module

    run["verdict"] = verdict_object(run)
    return run


def save_run(run: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the run JSON atomically (temp file + rename), so a crash never leaves half a file."""
    return write_json(path, run)


def validate_run(run: Any, source: str = "run") -> dict[str, Any]:
    """Check the shape of a run dict; raise :class:`TrajectoryFormatError` naming what is wrong."""
    if not isinstance(run, dict):
        raise TrajectoryFormatError(f"{source}: expected a JSON object, got {type(run).__name__}")
    if run.get("kind") != RUN_KIND:
        raise TrajectoryFormatError(
            f'{source}: not a gsnr-diag run ("kind" is {run.get("kind")!r}, expected {RUN_KIND!r}); '
            "make one with `gsnr-diag report MODEL_FILE --run-json run.json`"
        )
    check_schema_version(run, RUN_SCHEMA_VERSION, source)
    check_run(run, source)
    return run


def load_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a run JSON written by :func:`save_run`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrajectoryFormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return validate_run(parse_json(data, path), str(path))


def parse_json(data: bytes, path: str | os.PathLike[str]) -> Any:
    """``data`` (UTF-8 JSON text) parsed; :class:`TrajectoryFormatError` naming ``path`` if it is not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrajectoryFormatError(
            f"{path}: not a text file in UTF-8 (byte {exc.start} is 0x{data[exc.start]:02x}); "
            "a run JSON is what `gsnr-diag report --run-json` writes"
        ) from None
    if not text.strip():
        raise TrajectoryFormatError(f"{path}: the file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrajectoryFormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise TrajectoryFormatError(f"{path}: the JSON is nested too deeply to be a gsnr-diag run") from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise TrajectoryFormatError(f"{path}: not valid JSON ({exc})") from None


# ----------------------------------------------------------------------------- reading a run dict
def run_metadata(run: dict[str, Any]) -> dict[str, Any]:
    """The trajectory's metadata overlaid with the run's own (the run's wins)."""
    meta = dict((run.get("trajectory") or {}).get("metadata") or {})
    meta.update(run.get("metadata") or {})
    return meta


def snapshots(trajectory: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The snapshot dicts of a trajectory dict, in step order (``[]`` for none)."""
    if not trajectory:
        return []
    snaps = [s for s in trajectory.get("snapshots", []) if isinstance(s, dict)]
    return sorted(snaps, key=lambda s: s.get("step", 0))


def snapshot_series(snaps: list[dict[str, Any]], key: str) -> tuple[list[int], list[float | None]]:
    """(steps, values) of one snapshot field; non-finite or absent values are ``None``."""
    return [int(s.get("step", 0)) for s in snaps], [clean_float(s.get(key)) for s in snaps]
