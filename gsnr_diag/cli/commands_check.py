"""``gsnr-diag check``: a saved run against thresholds, for CI (exit 1 naming each failed one)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from .._format import number
from ..errors import GsnrDiagError
from .common import EXIT_CODES_HELP, ThresholdFailed, fail_input

__all__ = ["check"]


_CHECKS = (
    ("min_mean_gsnr", "final_mean_gsnr", "--min-mean-gsnr", "final mean GSNR"),
    ("min_control_ratio", "control_ratio", "--min-control-ratio", "control ratio real/shuffled (final)"),
    ("min_osgr", "osgr", "--min-osgr", "OSGR over training (loss-weighted eq. 19)"),
    ("min_same_sign", "same_sign", "--min-same-sign", "mean same-sign fraction (final)"),
)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("run_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--min-mean-gsnr", type=float, default=None, metavar="X", help="Fail if the final mean GSNR < X.")
@click.option(
    "--min-control-ratio",
    type=float,
    default=None,
    metavar="Y",
    help="Fail if the final real/shuffled mean-GSNR ratio < Y (or no control was run).",
)
@click.option(
    "--min-osgr",
    type=float,
    default=None,
    metavar="Z",
    help="Fail if the OSGR over training (the report's: eq. 19 weighted by each step's training-loss decrease) < Z.",
)
@click.option(
    "--min-same-sign", type=float, default=None, metavar="W", help="Fail if the final mean same-sign fraction < W."
)
def check(run_json: Path, **thresholds: float | None) -> None:
    """Check a saved run against thresholds, for CI: exit 1 naming each failed one, 0 when all hold.

    A threshold on a quantity the run did not measure (e.g. --min-control-ratio without a
    control) fails: a CI gate should not pass on missing evidence.
    """
    from ..report import load_run, verdict_values

    try:
        run = load_run(run_json)
    except GsnrDiagError as exc:
        raise fail_input(exc) from exc
    values = verdict_values(run)
    failures = []
    lines = []
    for opt, key, flag, label in _CHECKS:
        limit = thresholds.get(opt)
        value = values.get(key)
        shown = "not measured" if value is None else number(value)
        if limit is None:
            lines.append(f"  {label}: {shown}")
            continue
        ok = value is not None and math.isfinite(value) and value >= limit
        lines.append(f"  {'ok  ' if ok else 'FAIL'} {label}: {shown} (required ≥ {limit:g}, {flag})")
        if not ok:
            failures.append(f"{flag} {limit:g}: {label} is {shown}")
    click.echo(f"{run_json}:")
    click.echo("\n".join(lines))
    if failures:
        raise ThresholdFailed(f"{len(failures)} threshold(s) failed:\n  " + "\n  ".join(failures))
    if any(thresholds.get(opt) is not None for opt, *_ in _CHECKS):
        click.echo("all thresholds hold")
