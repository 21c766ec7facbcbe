"""``gsnr-diag check``: a saved run against thresholds, for CI (exit 1 naming each failed one)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from .._format import number
from ..errors import GsnrDiagError
from .common import EXIT_CODES_HELP, ThresholdFailed, fail_input

__all__ = ["check"]

LEVEL_ORDER = ("bad", "watch", "good")

# (option, key in verdict_values, flag, label). The verdict's three graded indicators first: the
# value checked is the graded value the report shows; then the described end-of-run numbers.
_CHECKS = (
    ("min_integrated_osgr", "integrated_osgr", "--min-integrated-osgr", "integrated OSGR over the run (graded)"),
    ("min_osgr", "integrated_osgr", "--min-osgr", "integrated OSGR over the run (graded; alias)"),
    ("min_control_separation", "control_separation", "--min-control-separation", "control separation (graded)"),
    ("min_early_rise", "early_rise", "--min-early-rise", "early rise of mean GSNR (graded)"),
    ("min_mean_gsnr", "final_mean_gsnr", "--min-mean-gsnr", "final mean GSNR"),
    ("min_control_ratio", "control_ratio", "--min-control-ratio", "control ratio real/shuffled (final)"),
    ("min_same_sign", "same_sign", "--min-same-sign", "mean same-sign fraction (final)"),
)


def _value(values: dict, key: str) -> float | None:
    v = values.get(key)
    return getattr(v, "value", v)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("run_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--min-level",
    type=click.Choice(LEVEL_ORDER),
    default=None,
    help="Fail unless the verdict's level is at least this (bad < watch < good); 'inconclusive' fails any level.",
)
@click.option(
    "--min-integrated-osgr",
    type=float,
    default=None,
    metavar="X",
    help="Fail if the integrated OSGR Σ R·ΔL ÷ Σ ΔL (the verdict's graded value) < X.",
)
@click.option("--min-osgr", type=float, default=None, metavar="X", help="The same as --min-integrated-osgr.")
@click.option(
    "--min-control-separation",
    type=float,
    default=None,
    metavar="Y",
    help="Fail if the real/shuffled separation while the loss falls (graded) < Y, or no control was run.",
)
@click.option(
    "--min-early-rise", type=float, default=None, metavar="F", help="Fail if the early rise of mean GSNR (graded) < F."
)
@click.option("--min-mean-gsnr", type=float, default=None, metavar="X", help="Fail if the final mean GSNR < X.")
@click.option(
    "--min-control-ratio",
    type=float,
    default=None,
    metavar="Y",
    help="Fail if the final real/shuffled mean-GSNR ratio < Y (or no control was run).",
)
@click.option(
    "--min-same-sign", type=float, default=None, metavar="W", help="Fail if the final mean same-sign fraction < W."
)
@click.option("--allow-partial", is_flag=True, help="Accept a run that did not finish (killed or interrupted).")
def check(run_json: Path, min_level: str | None, allow_partial: bool, **thresholds: float | None) -> None:
    """Check a saved run against thresholds, for CI: exit 1 naming each failed one, 0 when all hold.

    At least one threshold (or --min-level) is required. A threshold on a quantity the run did
    not measure (e.g. --min-control-separation without a control) fails, and so does a partial
    run unless --allow-partial: a CI gate should not pass on missing evidence.
    """
    from ..report import load_run, verdict_values
    from ..report.run import run_metadata
    from ..report.verdicts import verdict_object

    if min_level is None and all(v is None for v in thresholds.values()):
        raise click.UsageError(
            "check needs at least one threshold: --min-level LEVEL or a --min-* option "
            "(e.g. `gsnr-diag check run.json --min-level watch`)"
        )
    try:
        run = load_run(run_json)
    except GsnrDiagError as exc:
        raise fail_input(exc) from exc
    values = verdict_values(run)
    verdict = verdict_object(run)
    failures = []
    lines = [f"  verdict: {verdict['level']} — {verdict['headline']}"]
    meta = run_metadata(run)
    if meta.get("partial"):
        why = f" ({meta['stopped']})" if meta.get("stopped") else ""
        if allow_partial:
            lines.append(f"  note: the run did not finish{why}; accepted (--allow-partial)")
        else:
            lines.append(f"  FAIL the run did not finish{why} (pass --allow-partial to accept a partial run)")
            failures.append(f"partial run{why}: it did not finish (--allow-partial accepts it)")
    if min_level is not None:
        level = verdict["level"]
        ok = level in LEVEL_ORDER and LEVEL_ORDER.index(level) >= LEVEL_ORDER.index(min_level)
        lines.append(f"  {'ok  ' if ok else 'FAIL'} verdict level: {level} (required ≥ {min_level}, --min-level)")
        if not ok:
            failures.append(f"--min-level {min_level}: the verdict is {level}")
    for opt, key, flag, label in _CHECKS:
        limit = thresholds.get(opt)
        value = _value(values, key)
        shown = "not measured" if value is None else number(value)
        if limit is None:
            if opt != "min_osgr":
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
    click.echo("all thresholds hold")
