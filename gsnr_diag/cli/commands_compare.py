"""``gsnr-diag compare RUN_A RUN_B``: per-layer and overall deltas with their uncertainty; exit 1 on a regression."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import GsnrDiagError
from .common import EXIT_CODES_HELP, ThresholdFailed, fail_input

__all__ = ["compare"]


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("baseline", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("current", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0),
    default=0.2,
    show_default=True,
    help="Relative change (0.2 = 20%) in the harmful direction that counts as a regression.",
)
@click.option(
    "--sigma",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Where both runs carry jackknife standard errors, a regression must also exceed SIGMA × SE(Δ).",
)
@click.option("--two-sided", is_flag=True, help="Flag large changes in either direction, not only regressions.")
@click.option("--no-layers", is_flag=True, help="Compare the whole-model values only, not each parameter tensor.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the deltas here.")
def compare(
    baseline: Path, current: Path, tolerance: float, sigma: float, two_sided: bool, no_layers: bool, json_out: Path
) -> None:
    """Compare CURRENT against BASELINE (saved runs, trajectory JSON or monitor JSONL) at their last snapshot.

    For mean GSNR, mean same-sign fraction and the noise scale B_simple, overall and per parameter
    tensor: Δ = current − baseline, Δ/|baseline| and, when both runs were measured with
    jackknife_groups=G, SE(Δ) = sqrt(SE_a² + SE_b²) from delete-a-group jackknife standard errors.
    Exit 1 when some value got worse (GSNR or same-sign down, noise scale up) by more than
    --tolerance and more than --sigma SE(Δ); 2 on bad input.
    """
    from .._io import write_json
    from ..report.compare import compare_points, load_comparable

    try:
        a, b = load_comparable(baseline), load_comparable(current)
        result = compare_points(a, b, tolerance=tolerance, sigma=sigma, two_sided=two_sided, layers=not no_layers)
    except GsnrDiagError as exc:
        raise fail_input(exc) from exc
    click.echo(f"baseline: {baseline}\ncurrent:  {current}\n")
    click.echo(result.table())
    if json_out is not None:
        write_json(json_out, result.to_dict())
    if result.regressions:
        names = ", ".join(d.key for d in result.regressions)
        raise ThresholdFailed(f"{len(result.regressions)} regression(s) past --tolerance {tolerance:g}: {names}")
    click.echo("no regression")
