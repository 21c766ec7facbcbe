"""The ``gsnr-diag`` command line: report, render, stats, check.

Exit codes (also in ``gsnr-diag --help``):

* 0 — success; for ``check``, every threshold holds;
* 1 — ``check``: at least one threshold failed (each failure is named);
* 2 — usage or input error: bad options, a missing or malformed model file or run JSON,
  an exception raised in the user's model file (its traceback is shown), bad data.

Library errors (:class:`~gsnr_diag.errors.GsnrDiagError`) are caught here, at the boundary,
and nowhere else. Heavy imports (torch, matplotlib, weasyprint) happen inside the commands so
``gsnr-diag --help`` is instant.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..errors import GsnrDiagError

EXIT_OK = 0
EXIT_THRESHOLD = 1
EXIT_USAGE = 2

EXIT_CODES_HELP = """\b
Exit codes:
  0  success (check: every threshold holds)
  1  check: one or more thresholds failed (each is named)
  2  usage or input error: bad option, missing/malformed model file or run
     JSON, an exception inside your model file (your traceback is shown)"""

MODEL_FILE_HELP = """\b
MODEL_FILE is a Python file that defines:
  build_model()   -> a freshly initialized torch.nn.Module      (required)
  load_data()     -> training data, or a pair (train, test)     (required)
                     e.g. tensors (X, Y), a DataLoader, a Dataset
  loss_fn, make_optimizer(params), EPOCHS, LR, BATCH_SIZE,
  TASK ("classification" | "regression")                        (optional)
Command-line options override the constants."""


class InputError(click.ClickException):
    """An input problem: printed as 'Error: ...' with exit code 2."""

    exit_code = EXIT_USAGE


class ThresholdFailed(click.ClickException):
    exit_code = EXIT_THRESHOLD


def _fail_input(exc: BaseException) -> InputError:
    return InputError(str(exc))


def _user_code_failure(exc: Any) -> None:
    """Print the user's own traceback (ours cut away) and exit 2."""
    click.echo(f"Error: {exc.where} raised an exception. Your traceback:\n", err=True)
    click.echo(exc.user_traceback.rstrip(), err=True)
    sys.exit(EXIT_USAGE)


def _command_line() -> str:
    argv = list(sys.argv)
    if argv:
        argv[0] = "gsnr-diag" if argv[0].endswith(("gsnr-diag", "cli.py", "__main__.py")) else argv[0]
    return " ".join(shlex.quote(a) for a in argv)


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gsnr-diag", prog_name="gsnr-diag")
def main() -> None:
    """Gradient signal-to-noise ratio (GSNR) diagnostics: is your network learning features that
    generalize, or memorizing? (Liu et al., ICLR 2020)

    \b
    gsnr-diag report MODEL_FILE --pdf report.pdf   train, measure, write HTML (+PDF)
    gsnr-diag render RUN_JSON                     re-render a saved run
    gsnr-diag stats MODEL_FILE                    per-layer GSNR table now
    gsnr-diag check RUN_JSON --min-...            CI thresholds (exit 1 on failure)
    """


# ----------------------------------------------------------------------------- report


@main.command(epilog=MODEL_FILE_HELP + "\n\n" + EXIT_CODES_HELP)
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs [file's EPOCHS, else 10].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate [file's LR, else 0.01].")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Mini-batch size [file's BATCH_SIZE, else 64]; see --full-batch.")
@click.option("--full-batch", is_flag=True, help="Full-batch gradient descent (the paper's setting).")
@click.option("--device", default=None, help="Torch device to train on, e.g. cpu, cuda, cuda:1 [cpu].")
@click.option("--seed", type=int, default=None, help="Seed for initialization and batch order [0].")
@click.option("--every", type=click.IntRange(min=1), default=None,
              help="Record a snapshot every N optimizer steps [auto: log-spaced early, then ~30 in all].")
@click.option("--control/--no-control", default=None,
              help="Also train on shuffled labels from the same initialization [on for classification].")
@click.option("--osgr-sets", "osgr_sets", type=click.IntRange(min=2), default=None, metavar="M",
              help="Run the OSGR experiment (Sec. 2.4) with M disjoint training sets [off].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="HTML report to write.")
@click.option("--pdf", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write this PDF.")
@click.option("--run-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save the run here (updated after every snapshot) [OUT with .run.json].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages; errors only.")
def report(model_file: Path, epochs, lr, batch_size, full_batch, device, seed, every, control, osgr_sets,
           out: Path, pdf: Path | None, run_json: Path | None, quiet: bool) -> None:
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
    say = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    start = time.perf_counter()
    try:
        mf = load_model_file(model_file)
        from .run_report import resolve_settings, run_report

        settings = resolve_settings(mf, epochs=epochs, lr=lr, batch_size=batch_size, full_batch=full_batch,
                                    seed=seed, device=device, every=every, control=control, osgr_sets=osgr_sets)
        _check_device(settings.device)
        say(f"gsnr-diag: {model_file} — {settings.epochs} epochs, lr {settings.lr}, "
            f"batch size {settings.batch_size or 'full'}, device {settings.device}; run saved to {run_json}")
        run = run_report(mf, settings, run_json=run_json, command=_command_line(), progress=not quiet, echo=say)
    except UserCodeError as exc:
        _user_code_failure(exc)
        return
    except (ModelFileError, GsnrDiagError) as exc:
        raise _fail_input(exc) from exc
    except KeyboardInterrupt:
        if run_json.exists():
            click.echo(f"\ninterrupted; what was measured is saved in {run_json} "
                       f"(render it with: gsnr-diag render {shlex.quote(str(run_json))})", err=True)
        else:
            click.echo("\ninterrupted before the first snapshot; nothing was saved", err=True)
        sys.exit(130)
    _write_outputs(run, out, pdf, say)
    say(f"done in {time.perf_counter() - start:.0f} s")


def _check_device(device: str) -> None:
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"--device {device!r}: not a torch device ({exc})") from exc
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")


def _write_outputs(run: dict[str, Any], out: Path, pdf: Path | None, say) -> None:
    from ..report import render_html, render_pdf, write_html

    try:
        html = render_html(run)
    except GsnrDiagError as exc:
        raise _fail_input(exc) from exc
    write_html(html, out)
    say(f"HTML report: {out} ({out.stat().st_size / 1024:.0f} KiB)")
    if pdf is not None:
        render_pdf(html, pdf)
        say(f"PDF report:  {pdf} ({pdf.stat().st_size / 1024:.0f} KiB)")


# ----------------------------------------------------------------------------- render


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("run_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML report to write [RUN_JSON with .html].")
@click.option("--pdf", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write this PDF.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
def render(run_json: Path, out: Path | None, pdf: Path | None, quiet: bool) -> None:
    """Re-render a saved run (from `report --run-json`) without training."""
    from ..report import load_run

    say = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    try:
        run = load_run(run_json)
    except GsnrDiagError as exc:
        raise _fail_input(exc) from exc
    if out is None:
        name = run_json.name
        stem = name[: -len(".run.json")] if name.endswith(".run.json") else run_json.stem
        out = run_json.with_name(stem + ".html")
    _write_outputs(run, out, pdf, say)


# ----------------------------------------------------------------------------- stats


@main.command(epilog=MODEL_FILE_HELP + "\n\n" + EXIT_CODES_HELP)
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--weights", type=click.Path(dir_okay=False, exists=False, path_type=Path), default=None,
              help="A state_dict checkpoint (torch.save) to measure at, loaded with weights_only=True "
                   "[measure at initialization].")
@click.option("--device", default="cpu", show_default=True, help="Torch device to measure on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the initialization.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Samples per gradient chunk (the memory bound).")
@click.option("--test", "use_test", is_flag=True, help="Measure on the test set instead of the training set.")
def stats(model_file: Path, weights: Path | None, device: str, seed: int, batch_size: int, use_test: bool) -> None:
    """Print the per-layer GSNR table of MODEL_FILE's model at initialization or at saved weights."""
    from .modelfile import ModelFileError, UserCodeError, load_model_file

    try:
        import torch
        from torch import nn

        from ..measure import gradient_stats
        from .run_report import _infer_task

        mf = load_model_file(model_file)
        _check_device(device)
        torch.manual_seed(seed)
        model = mf.build()
        if weights is not None:
            _load_weights(model, weights)
        model = model.to(device)
        train_data, test_data = mf.data()
        data = train_data
        if use_test:
            if test_data is None:
                raise InputError(f"--test: load_data() in {model_file} returns no test set")
            data = test_data
        loss_fn = mf.loss_fn
        if loss_fn is None:
            task = mf.task or _infer_task(None, data)
            loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
        result = gradient_stats(model, data, loss_fn, batch_size=batch_size)
    except UserCodeError as exc:
        _user_code_failure(exc)
        return
    except (ModelFileError, GsnrDiagError) as exc:
        raise _fail_input(exc) from exc
    where = f"weights {weights}" if weights is not None else f"initialization (seed {seed})"
    click.echo(f"{model_file} at {where}, on the {'test' if use_test else 'training'} set:\n")
    click.echo(result.summary())


def _load_weights(model, path: Path) -> None:
    import pickle

    import torch

    if not path.exists():
        raise InputError(f"--weights {path}: no such file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise InputError(
            f"--weights {path}: cannot be loaded with weights_only=True ({str(exc).splitlines()[0]}); "
            "save a state_dict with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"--weights {path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"--weights {path}: does not match build_model()'s model:\n{exc}") from exc


# ----------------------------------------------------------------------------- check

_CHECKS = (
    ("min_mean_gsnr", "final_mean_gsnr", "--min-mean-gsnr", "final mean GSNR"),
    ("min_control_ratio", "control_ratio", "--min-control-ratio", "control ratio real/shuffled (final)"),
    ("min_osgr", "osgr", "--min-osgr", "OSGR over training (loss-weighted eq. 19)"),
    ("min_same_sign", "same_sign", "--min-same-sign", "mean same-sign fraction (final)"),
)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("run_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--min-mean-gsnr", type=float, default=None, metavar="X", help="Fail if the final mean GSNR < X.")
@click.option("--min-control-ratio", type=float, default=None, metavar="Y",
              help="Fail if the final real/shuffled mean-GSNR ratio < Y (or no control was run).")
@click.option("--min-osgr", type=float, default=None, metavar="Z", help="Fail if the OSGR over training (the report's: eq. 19 weighted by each step's training-loss decrease) < Z.")
@click.option("--min-same-sign", type=float, default=None, metavar="W",
              help="Fail if the final mean same-sign fraction < W.")
def check(run_json: Path, **thresholds: float | None) -> None:
    """Check a saved run against thresholds, for CI: exit 1 naming each failed one, 0 when all hold.

    A threshold on a quantity the run did not measure (e.g. --min-control-ratio without a
    control) fails: a CI gate should not pass on missing evidence.
    """
    from ..report import load_run, verdict_values

    try:
        run = load_run(run_json)
    except GsnrDiagError as exc:
        raise _fail_input(exc) from exc
    values = verdict_values(run)
    failures = []
    lines = []
    for opt, key, flag, label in _CHECKS:
        limit = thresholds.get(opt)
        value = values.get(key)
        shown = "not measured" if value is None else f"{value:.6g}"
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


if __name__ == "__main__":  # pragma: no cover
    main()
