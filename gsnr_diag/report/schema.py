"""The one schema of the run JSON: every field the report reads, with its type, checked before rendering.

A run JSON (``"kind": "gsnr-diag-run"``, see :mod:`gsnr_diag.report.run`) is validated field by field
against :data:`RUN`, a small declarative schema; the first mismatch raises
:class:`~gsnr_diag.errors.TrajectoryFormatError` naming the field by its path
(``trajectory.snapshots[3].layer_gsnr``), what it is and what was expected. Numbers must be finite
JSON numbers (``null`` stands for an undefined value); keys this version does not know are ignored
(forward-compatible within a schema version). Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .._fields import SNAPSHOT_NUMBER_FIELDS
from ..errors import TrajectoryFormatError

__all__ = ["RUN", "SNAPSHOT", "TRAJECTORY", "check_run"]

Check = Callable[[Any, str], None]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {text!r}"
    return {"dict": "an object", "list": "a list"}.get(type(value).__name__, type(value).__name__)


def _fail(where: str, value: Any, expected: str) -> TrajectoryFormatError:
    return TrajectoryFormatError(f"{where} is {_kind(value)}, expected {expected}")


def number(value: Any, where: str) -> None:
    """A finite JSON number or ``null``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, value, "a number or null")
    if not math.isfinite(value):
        raise _fail(where, value, "a finite number or null (JSON has no NaN/inf)")


def integer(minimum: int | None = None, nullable: bool = True) -> Check:
    def check(value: Any, where: str) -> None:
        if value is None and nullable:
            return
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise _fail(where, value, f"an integer{bound}" + (" or null" if nullable else ""))

    return check


def text(value: Any, where: str) -> None:
    if value is not None and not isinstance(value, str):
        raise _fail(where, value, "a string or null")


def boolean(value: Any, where: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise _fail(where, value, "true, false or null")


def anything(value: Any, where: str) -> None:
    return None


def list_of(item: Check, nullable: bool = True) -> Check:
    def check(value: Any, where: str) -> None:
        if value is None and nullable:
            return
        if not isinstance(value, list):
            raise _fail(where, value, "a list" + (" or null" if nullable else ""))
        for i, v in enumerate(value):
            item(v, f"{where}[{i}]")

    return check


def map_of(item: Check) -> Check:
    """An object whose values all pass ``item`` (``null`` allowed for the whole map)."""

    def check(value: Any, where: str) -> None:
        if value is None:
            return
        if not isinstance(value, dict):
            raise _fail(where, value, "an object (name -> value) or null")
        for k, v in value.items():
            item(v, f"{where}[{k!r}]")

    return check


def obj(fields: dict[str, Check], required: tuple[str, ...] = (), nullable: bool = True) -> Check:
    """An object with typed ``fields`` (others ignored); ``required`` keys must be present."""

    def check(value: Any, where: str) -> None:
        if value is None and nullable:
            return
        if not isinstance(value, dict):
            raise _fail(where, value, "an object" + (" or null" if nullable else ""))
        for key in required:
            if key not in value:
                raise TrajectoryFormatError(f"{where} has no {key!r} (keys: {sorted(value)[:8]})")
        for key, field_check in fields.items():
            if key in value:
                field_check(value[key], f"{where}.{key}")

    return check


NUMBERS = list_of(number)
NUMBER_MAP = map_of(number)

METADATA = obj(
    {
        "settings": map_of(anything),
        "param_counts": map_of(integer(0)),
        "n_train": integer(0),
        "n_test": integer(0),
        "versions": map_of(anything),
        "partial": boolean,
        "stopped": text,
        "label": text,
        "task": text,
        "seed": integer(),
    }
)

SNAPSHOT = obj(
    {
        "step": integer(0, nullable=False),
        **{f: number for f in (*SNAPSHOT_NUMBER_FIELDS, "elapsed")},
        "layer_gsnr": NUMBER_MAP,
        "layer_same_sign": NUMBER_MAP,
        "extra": NUMBER_MAP,
        "undefined": integer(0),
    },
    required=("step",),
    nullable=False,
)

TRAJECTORY = obj(
    {"schema_version": integer(), "kind": text, "metadata": METADATA, "snapshots": list_of(SNAPSHOT, False)},
    required=("snapshots",),
)

CONTROL = obj(
    {
        "schema_version": integer(),
        "real": TRAJECTORY,
        "shuffled": TRAJECTORY,
        "steps": list_of(integer(0, nullable=False)),
        "ratio": NUMBERS,
        "final_ratio": number,
        "peak_ratio": number,
        "verdict": text,
        "label_noise": number,
        "partial": boolean,
    },
    required=("real", "shuffled"),
)


def _osgr_item(value: Any, where: str) -> None:
    obj(
        {
            "schema_version": integer(),
            "epochs": list_of(integer(0, nullable=False), False),
            "lhs": list_of(number, False),
            "rhs": list_of(number, False),
            "settings": map_of(anything),
            "train_loss": NUMBERS,
            "test_loss": NUMBERS,
            "rhs_single": NUMBERS,
        },
        required=("epochs", "lhs", "rhs"),
        nullable=False,
    )(value, where)
    if not len(value["epochs"]) == len(value["lhs"]) == len(value["rhs"]):
        raise TrajectoryFormatError(f"{where}: epochs, lhs and rhs differ in length")


FINAL_STATS = obj(
    {
        "n": integer(0),
        "undefined": integer(0),
        "same_sign_undefined": integer(0),
        "skipped_nonfinite": integer(0),
        **{
            f: number
            for f in ("mean_gsnr", "mean_same_sign", "osgr", "opposite_sign", "opposite_sign_top10", "epsilon")
        },
        **{
            f: NUMBER_MAP
            for f in ("gsnr_quantiles", "layer_gsnr", "layer_same_sign", "layer_gsnr_median", "layer_opposite_sign")
        },
        "capture_paths": map_of(text),
        "mode": text,
    }
)

#: The run JSON: ``schema_version`` and ``kind`` are checked by :func:`gsnr_diag.report.run.validate_run`.
RUN = obj(
    {
        "trajectory": TRAJECTORY,
        "control": CONTROL,
        "osgr": list_of(_osgr_item),
        "final_stats": FINAL_STATS,
        "metadata": METADATA,
    },
    nullable=False,
)


def check_run(run: Any, source: str = "run") -> None:
    """Validate a run dict against :data:`RUN`; the error message starts with ``source``."""
    try:
        RUN(run, "run")
    except TrajectoryFormatError as exc:
        raise TrajectoryFormatError(f"{source}: {exc}") from None
    except RecursionError:
        raise TrajectoryFormatError(f"{source}: nested too deeply to be a gsnr-diag run") from None
