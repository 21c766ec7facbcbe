"""``gsnr-diag report`` (train, measure, write the report) and ``gsnr-diag render`` (re-render a saved run)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import click

from ..errors import GsnrDiagError
from .common import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    MODEL_FILE_HELP,
    ClickProgress,
    PlainWarnings,
    check_device,
    command_line,
    fail_input,
    library_failure,
    user_code_failure,
    write_outputs,
)
from .outputs import check_outputs

FORCE_HELP = (
    "Write outputs whose name or existing content is another kind of file (never an input file, "
    "which is always refused)."
)

__all__ = ["report", "render"]


@click.command(epilog=MODEL_FILE_HELP + "\n\n" + EXIT_CODES_HELP)
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs [file's EPOCHS, else 10].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate [file's LR, else 0.01].")
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Mini-batch size [file's BATCH_SIZE, else 64]; see --full-batch."
)
@click.option("--full-batch", is_flag=True, help="Full-batch gradient descent (the paper's setting).")
@click.option("--device", default=None, help="Torch device to train on, e.g. cpu, cuda, cuda:1 [cpu].")
@click.option("--seed", type=int, default=None, help="Seed for initialization and batch order [0].")
@click.option(
    "--every",
    type=click.IntRange(min=1),
    default=None,
    help="Record a snapshot every N optimizer steps [auto: log-spaced early, then ~30 in all].",
)
@click.option(
    "--control/--no-control",
    default=None,
    help="Also train on shuffled labels from the same initialization [on for classification].",
)
@click.option(
    "--osgr-sets",
    "osgr_sets",
    type=click.IntRange(min=2),
    default=None,
    metavar="M",
    help="Run the OSGR experiment (Sec. 2.4) with M disjoint training sets [off].",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("report.html"),
    show_default=True,
    help="HTML report to write.",
)
@click.option("--pdf", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write this PDF.")
@click.option(
    "--run-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Save the run here (updated after every snapshot) [OUT with .run.json].",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages; errors only.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def report(
    model_file: Path,
    epochs,
    lr,
    batch_size,
    full_batch,
    device,
    seed,
    every,
    control,
    osgr_sets,
    out: Path,
    pdf: Path | None,
    run_json: Path | None,
    quiet: bool,
    force: bool,
) -> None:
    """Train MODEL_FILE's model, record GSNR along training, and write the report.

    Records a trajectory (monitor), runs the shuffled-label control (on by default for
    classification) and, with --osgr-sets, the OSGR experiment; saves the run JSON as it goes
    (a crash keeps what was measured), then writes the HTML and, with --pdf, the PDF.
    """
    from .modelfile import ModelFileError, UserCodeError, load_model_file

    if full_batch and batch_size is not None:
        raise click.UsageError("--full-batch and --batch-size exclude each other")
    if run_json is None:
        run_json = out.with_name(out.stem + ".run.json")
    outputs = {"--out": (out, "html"), "--pdf": (pdf, "pdf"), "--run-json": (run_json, "run")}
    check_outputs({"MODEL_FILE": model_file}, {k: v for k, v in outputs.items() if v[0] is not None}, force=force)
    saved = [run_json]
    say = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    start = time.perf_counter()
    try:
        mf = load_model_file(model_file)
        from .run_report import resolve_settings, run_report

        settings = resolve_settings(
            mf,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            full_batch=full_batch,
            seed=seed,
            device=device,
            every=every,
            control=control,
            osgr_sets=osgr_sets,
        )
        check_device(settings.device)
        say(
            f"gsnr-diag: {model_file} — {settings.epochs} epochs, lr {settings.lr}, "
            f"batch size {settings.batch_size or 'full'}, device {settings.device}; run saved to {run_json}"
        )
        progress = False if quiet else ClickProgress()
        try:
            with PlainWarnings():
                run = run_report(
                    mf, settings, run_json=run_json, command=command_line(), progress=progress, echo=say, saved=saved
                )
        finally:
            if progress:
                progress.close()
    except UserCodeError as exc:
        _note_kept(saved, run_json)
        user_code_failure(exc)
        return
    except (ModelFileError, GsnrDiagError) as exc:
        _note_kept(saved, run_json)
        raise library_failure(exc, model_file) from exc
    except KeyboardInterrupt:
        if saved[-1].exists():
            click.echo(
                f"\ninterrupted; what was measured is saved in {saved[-1]} "
                f"(render it with: gsnr-diag render {shlex.quote(str(saved[-1]))})",
                err=True,
            )
        else:
            click.echo("\ninterrupted before the first snapshot; nothing was saved", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if saved[-1] != run_json:
        say(
            f"the previous, more complete run in {run_json} was kept; this run is in {saved[-1]} "
            "and the report below is rendered from it"
        )
        out, pdf = _beside(out), _beside(pdf)
    write_outputs(run, out, pdf, say, run_json=saved[-1])
    say(f"done in {time.perf_counter() - start:.0f} s")


def _note_kept(saved: list[Path], run_json: Path) -> None:
    if saved[-1] != run_json:
        click.echo(
            f"gsnr-diag: the previous, more complete run in {run_json} was kept; what this run measured "
            f"before it failed is in {saved[-1]}",
            err=True,
        )


def _beside(path: Path | None) -> Path | None:
    """``report.html`` → ``report.incomplete.html``: a partial rerun's report never replaces a finished one."""
    return None if path is None else path.with_name(path.stem + ".incomplete" + path.suffix)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("run_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="HTML report to write [RUN_JSON with .html].",
)
@click.option("--pdf", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write this PDF.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
@click.option("--force", is_flag=True, help=FORCE_HELP)
def render(run_json: Path, out: Path | None, pdf: Path | None, quiet: bool, force: bool) -> None:
    """Re-render a saved run (from `report --run-json`) without training."""
    from ..report import load_run

    say = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    try:
        run = load_run(run_json)
    except GsnrDiagError as exc:
        raise fail_input(exc) from exc
    if out is None:
        name = run_json.name
        stem = name[: -len(".run.json")] if name.endswith(".run.json") else run_json.stem
        out = run_json.with_name(stem + ".html")
    outputs = {"--out": (out, "html"), "--pdf": (pdf, "pdf")}
    check_outputs({"RUN_JSON": run_json}, {k: v for k, v in outputs.items() if v[0] is not None}, force=force)
    write_outputs(run, out, pdf, say)
