"""The run JSON of ``gsnr-diag report``, re-saved as parts arrive — and never made less complete.

A rerun that fails early would otherwise replace a previous complete ``report.run.json`` with an empty
one. :class:`RunFile` compares: a save goes to the run JSON only when it is at least as complete as
what the file already holds (a finished run always is; a partial one when it has at least as many
snapshots as a partial file). Until then this run's progress goes to :func:`incomplete_path` beside it
(``report.run.incomplete.json``), so nothing measured is lost either way. Every write is atomic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..report.run import new_run, save_run

__all__ = ["RunFile", "completeness", "incomplete_path"]


def incomplete_path(path: Path) -> Path:
    """Where a run less complete than the existing ``path`` is kept: ``x.run.json`` → ``x.run.incomplete.json``."""
    return path.with_name(path.stem + ".incomplete" + (path.suffix or ".json"))


def _count(trajectory: Any) -> int:
    if not isinstance(trajectory, dict) or not isinstance(trajectory.get("snapshots"), list):
        return 0
    return len(trajectory["snapshots"])


def completeness(run: Any) -> tuple[bool, int]:
    """``(finished, snapshots)`` of a run dict: finished = not partial and holding at least one snapshot."""
    if not isinstance(run, dict):
        return False, 0
    control = run.get("control") if isinstance(run.get("control"), dict) else {}
    count = _count(run.get("trajectory")) + _count(control.get("shuffled")) + len(run.get("osgr") or [])
    meta = run.get("metadata") if isinstance(run.get("metadata"), dict) else {}
    return (not meta.get("partial") and count > 0), count


def _existing(path: Path) -> tuple[bool, int] | None:
    try:
        run = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(run, dict) or run.get("kind") != "gsnr-diag-run":
        return None
    return completeness(run)


class RunFile:
    """The run being measured and its JSON file (see the module docstring)."""

    def __init__(self, path: Path, metadata: dict[str, Any]):
        self.path = path
        self.metadata = metadata
        self.trajectory: Any = None
        self.control: Any = None
        self.osgr: list[Any] | None = None
        self.final_stats: dict[str, Any] | None = None
        self.previous = _existing(path)
        self.saved_to: Path | None = None

    def _replaces_previous(self, run: dict[str, Any]) -> bool:
        if self.previous is None:
            return True
        finished, count = completeness(run)
        old_finished, old_count = self.previous
        return finished or (not old_finished and count >= old_count)

    def save(self, partial: bool = True, stopped: str | None = None) -> dict[str, Any]:
        """Assemble the run dict and write it where it loses nothing (see the module docstring)."""
        meta = dict(self.metadata)
        if partial:
            meta["partial"] = True
        if stopped:
            meta["stopped"] = stopped
        run = new_run(
            self.trajectory, control=self.control, osgr=self.osgr, final_stats=self.final_stats, metadata=meta
        )
        if self._replaces_previous(run):
            save_run(run, self.path)
            if self.saved_to is not None and self.saved_to != self.path:
                self.saved_to.unlink(missing_ok=True)
            self.saved_to = self.path
            self.previous = None
        else:
            self.saved_to = save_run(run, incomplete_path(self.path))
        return run
