"""Schedules ``step -> bool`` for when to record a snapshot (Cockpit-style: dense early, sparse later)."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import MonitorError

__all__ = ["Schedule", "as_schedule", "linear", "logarithmic", "report_schedule"]

Schedule = Callable[[int], bool]


class linear:  # noqa: N801 - used like a function: every=linear(10)
    """Schedule ``step -> bool``: true every ``k`` steps from ``start`` (step 0, k, 2k, ... by default)."""

    def __init__(self, k: int, start: int = 0):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise MonitorError(f"linear(k): expected a positive int, got {k!r}")
        if not isinstance(start, int) or start < 0:
            raise MonitorError(f"linear(start=...): expected a non-negative int, got {start!r}")
        self.k, self.start = k, start

    def __call__(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.k == 0

    def __repr__(self) -> str:
        return f"linear({self.k}, start={self.start})"


class logarithmic:  # noqa: N801
    """Schedule ``step -> bool``: step 0 and ``per_decade`` log-spaced steps per factor of 10.

    The steps are the distinct values of ``round(start · 10^(i / per_decade))`` for i = 0, 1, ...,
    up to ``end`` when given (Cockpit-style dense-early recording: GSNR moves fastest at the
    start of training).
    """

    def __init__(self, per_decade: int = 10, start: int = 1, end: int | None = None):
        if not isinstance(per_decade, int) or per_decade < 1:
            raise MonitorError(f"logarithmic(per_decade): expected a positive int, got {per_decade!r}")
        if not isinstance(start, int) or start < 1:
            raise MonitorError(f"logarithmic(start=...): expected an int >= 1, got {start!r}")
        if end is not None and (not isinstance(end, int) or end < start):
            raise MonitorError(f"logarithmic(end=...): expected an int >= start, got {end!r}")
        self.per_decade, self.start, self.end = per_decade, start, end
        self._steps: set[int] = {0}
        self._i = 0
        self._upto = -1

    def _extend(self, step: int) -> None:
        while self._upto < step:
            v = int(round(self.start * 10 ** (self._i / self.per_decade)))
            self._i += 1
            self._upto = v
            if self.end is None or v <= self.end:
                self._steps.add(v)
            else:
                self._upto = math.inf  # type: ignore[assignment]

    def __call__(self, step: int) -> bool:
        self._extend(step)
        return step in self._steps

    def __repr__(self) -> str:
        return f"logarithmic(per_decade={self.per_decade}, start={self.start}, end={self.end})"


class report_schedule:  # noqa: N801
    """The report's default schedule for a run of ``total_steps`` optimizer steps.

    About ``target`` evenly spaced snapshots (every k = ⌈total/target⌉ steps) plus ``per_decade``
    log-spaced ones over the *whole* run (steps 1, 2, 3, 5, 7, 10, ...), so the early phase — where
    GSNR rises and the training loss falls fastest — is resolved whatever the run's length, and the
    log-spaced steps are the same for every run (runs of different lengths share them).
    """

    def __init__(self, total_steps: int, target: int = 30, per_decade: int = 6):
        if not isinstance(total_steps, int) or total_steps < 0:
            raise MonitorError(f"report_schedule(total_steps): expected a non-negative int, got {total_steps!r}")
        self.total_steps, self.target, self.per_decade = total_steps, target, per_decade
        self.k = max(1, math.ceil(total_steps / target))
        self._lin = linear(self.k)
        self._log = logarithmic(per_decade=per_decade, start=1)

    def __call__(self, step: int) -> bool:
        return self._lin(step) or self._log(step)

    def __repr__(self) -> str:
        return f"auto: every {self.k} steps plus {self.per_decade} log-spaced per decade from step 1"


def as_schedule(every: int | Schedule) -> Schedule:
    if isinstance(every, int) and not isinstance(every, bool):
        return linear(every)
    if callable(every):
        return every
    raise MonitorError(f"every: expected a positive int or a schedule step -> bool, got {every!r}")


_as_schedule = as_schedule
