"""The Monitor's JSONL file: created, resumed or refused — never emptied behind the user's back.

:func:`open_jsonl` decides what ``Monitor(path=...)`` does with ``path``:

* no file (or an empty one): a new trajectory file is started (missing folders are created);
* a gsnr-diag JSONL of the *same run* (same model class, trainable parameter counts and training-set
  size): its snapshots are loaded and new ones are appended after them (resuming a run). A line cut
  off by a killed process is dropped first (it is unreadable), with a warning;
* anything else (another run's JSONL, a ``.json`` trajectory, ``precious.py``): a
  :class:`~gsnr_diag.errors.MonitorError` naming the file, which is left untouched — unless the caller
  passed ``overwrite=True``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from .._io import why_unwritable
from ..errors import MonitorError, TrajectoryFormatError
from .trajectory import HEADER_KIND, Trajectory, TruncatedTrajectoryWarning

__all__ = ["SAME_RUN_KEYS", "open_jsonl", "append_line"]

#: Header metadata that must agree for a JSONL file to be taken as the same run.
SAME_RUN_KEYS = ("model", "param_counts", "n_train")

_HINT = "pass overwrite=True to replace it, or choose another path"


def _refuse(path: Path, why: str) -> MonitorError:
    return MonitorError(f"Monitor(path={str(path)!r}): {why}; the file was left untouched ({_HINT})")


def _create(path: Path, truncate: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w" if truncate else "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise MonitorError(
            f"Monitor(path={str(path)!r}): cannot create the file ({why_unwritable(path, exc)}); choose a writable path"
        ) from exc


def open_jsonl(path: Path, metadata: dict[str, Any], *, overwrite: bool) -> Trajectory | None:
    """Prepare ``path`` for appending; return the trajectory already in it when resuming, else ``None``."""
    if path.is_dir():
        raise MonitorError(f"Monitor(path={str(path)!r}): is a directory; pass a file name such as run.jsonl")
    if overwrite or not path.exists():
        _create(path, truncate=overwrite)
        return None
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise MonitorError(f"Monitor(path={str(path)!r}): cannot read the existing file ({exc.strerror})") from exc
    if size == 0:
        _create(path, truncate=False)
        return None
    first = head.split(b"\n", 1)[0]
    if HEADER_KIND.encode() not in first:
        raise _refuse(path, "the file exists and is not a gsnr-diag JSONL trajectory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedTrajectoryWarning)
        try:
            previous = Trajectory.load(path)
        except TrajectoryFormatError as exc:
            raise _refuse(path, f"the file exists and cannot be resumed ({exc})") from exc
    for key in SAME_RUN_KEYS:
        old, new = previous.metadata.get(key), metadata.get(key)
        if old != new:
            raise _refuse(path, f"it holds a different run ({key} is {_short(old)} there, {_short(new)} here)")
    if any(issubclass(w.category, TruncatedTrajectoryWarning) for w in caught):
        _drop_cut_off_line(path)
    return previous


def _drop_cut_off_line(path: Path) -> None:
    """Remove the unreadable fragment a killed writer left after the last newline."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        warnings.warn(
            f"{path}: dropped a cut-off last line ({len(data) - keep} bytes, unreadable) before appending",
            TruncatedTrajectoryWarning,
            stacklevel=4,
        )
        with open(path, "r+b") as f:
            f.truncate(keep)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def append_line(path: Path, line: str) -> None:
    """Append one line and flush it to disk (a killed run keeps every finished snapshot)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise MonitorError(f"Monitor(path={str(path)!r}): cannot append a snapshot ({exc.strerror or exc})") from exc
