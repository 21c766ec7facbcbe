"""``gsnr-diag export``: a saved run to TensorBoard event files and/or an offline W&B run directory."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import GsnrDiagError
from .common import EXIT_CODES_HELP, InputError, fail_input

__all__ = ["export"]


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("run_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--tensorboard",
    "tensorboard_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="LOGDIR",
    help="Write TensorBoard event files (scalars + histograms of log10 layer GSNR) to LOGDIR.",
)
@click.option(
    "--wandb",
    "wandb_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Write an offline Weights & Biases run under DIR/wandb/ (no network; upload later with `wandb sync`).",
)
@click.option("--project", default="gsnr-diag", show_default=True, help="W&B project name of the offline run.")
@click.option("--name", default=None, help="W&B run name (default: the run's label, else 'gsnr-diag').")
def export(
    run_json: Path, tensorboard_dir: Path | None, wandb_dir: Path | None, project: str, name: str | None
) -> None:
    """Export RUN_JSON (a saved run, trajectory JSON or monitor JSONL) to TensorBoard and/or W&B.

    Steps are the snapshots' training steps; tags are gsnr/mean_gsnr, gsnr/osgr, gsnr/same_sign,
    gsnr/noise_scale, gsnr/m_coherence, loss/..., accuracy/..., layer_gsnr/<param>, ... A run with a
    shuffled-label control also exports the shuffled run (TensorBoard: LOGDIR/shuffled).
    """
    from ..integrations.export import export_tensorboard, export_wandb, load_trajectories

    if tensorboard_dir is None and wandb_dir is None:
        raise InputError("nothing to do: give --tensorboard LOGDIR and/or --wandb DIR")
    try:
        runs = load_trajectories(run_json)
        n = sum(len(t) for t in runs.values())
        if tensorboard_dir is not None:
            for target in export_tensorboard(run_json, tensorboard_dir):
                click.echo(f"TensorBoard: {target}  (tensorboard --logdir {tensorboard_dir})")
        if wandb_dir is not None:
            for target in export_wandb(run_json, wandb_dir, project=project, name=name, teardown=True):
                click.echo(f"W&B offline run: {target}  (upload: wandb sync {target})")
    except GsnrDiagError as exc:
        raise fail_input(exc) from exc
    click.echo(f"exported {n} snapshot(s) from {run_json}")
