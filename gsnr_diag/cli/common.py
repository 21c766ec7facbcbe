"""What every ``gsnr-diag`` command shares: exit codes, help texts, the CLI's errors, the progress bar.

Library errors (:class:`~gsnr_diag.errors.GsnrDiagError`) become :class:`InputError` (exit 2) here,
at the boundary, and nowhere else.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import GsnrDiagError

__all__ = [
    "EXIT_CODES_HELP",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_THRESHOLD",
    "EXIT_USAGE",
    "MODEL_FILE_HELP",
    "ClickProgress",
    "InputError",
    "ThresholdFailed",
    "check_device",
    "command_line",
    "fail_input",
    "library_failure",
    "PlainWarnings",
    "user_code_failure",
    "write_outputs",
]

EXIT_OK = 0
EXIT_THRESHOLD = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\b
Exit codes:
  0  success (check: every threshold holds)
  1  check: one or more thresholds failed (each is named);
     compare: a regression past --tolerance (each is named)
  2  usage or input error: bad option, missing/malformed model file or run
     JSON, an exception inside your model file (your traceback is shown),
     an output path that would replace an input or cannot be written
  130 interrupted (Ctrl-C); report: what was measured is in the run JSON"""

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


def fail_input(exc: BaseException) -> InputError:
    return InputError(str(exc))


def user_code_failure(exc: Any) -> None:
    """Print the user's own traceback (ours cut away) and exit 2."""
    click.echo(f"Error: {exc.where} raised an exception. Your traceback:\n", err=True)
    click.echo(exc.user_traceback.rstrip(), err=True)
    sys.exit(EXIT_USAGE)


def library_failure(exc: BaseException, model_file: Path | None = None) -> InputError:
    """A gsnr-diag error as exit 2; when it wraps an exception raised in ``model_file`` (a failing
    ``forward``), the user's traceback (file and line) is printed under the message first."""
    from .modelfile import user_cause, user_traceback

    if model_file is not None:
        files = (str(Path(model_file).resolve()),)
        cause = user_cause(exc, files)
        if cause is not None and cause is not exc:
            click.echo(f"Error: {exc}\n\nYour traceback:\n", err=True)
            click.echo(user_traceback(cause, files).rstrip(), err=True)
            sys.exit(EXIT_USAGE)
    return fail_input(exc)


class ClickProgress:
    """``train(progress=...)`` as a click progress bar on stderr: a new bar whenever a run starts."""

    def __init__(self, label: str = "training"):
        self.label = label
        self._bar: Any = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None or done == 0:
            self.close()
            self._bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self._bar.__enter__()
            self._done = 0
        self._bar.update(done - self._done)
        self._done = done
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


class PlainWarnings:
    """Within it, Python warnings print as one ``warning: ...`` line on stderr (no file and line of ours)."""

    def __enter__(self) -> PlainWarnings:
        import warnings

        self._saved = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            click.echo(f"warning: {message}", err=True)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc: Any) -> None:
        import warnings

        warnings.showwarning = self._saved


def command_line() -> str:
    argv = list(sys.argv)
    if argv:
        argv[0] = "gsnr-diag" if argv[0].endswith(("gsnr-diag", "cli.py", "__main__.py")) else argv[0]
    return " ".join(shlex.quote(a) for a in argv)


def check_device(device: str) -> None:
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"--device {device!r}: not a torch device ({exc})") from exc
    if d.type == "meta":
        raise InputError(
            f"--device {device}: a meta device holds shapes but no numbers, so nothing can be trained or "
            "measured on it; use cpu or cuda"
        )
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: MPS is not available on this machine")


def write_outputs(run: dict[str, Any], out: Path, pdf: Path | None, say, *, run_json: Path | None = None) -> None:
    """Render ``run`` to ``out`` (and ``pdf``), each written atomically; every failure is exit 2 with a
    message, Ctrl-C exits 130 saying where the run is."""
    from ..report import render_html, render_pdf, write_html

    try:
        html = render_html(run)
        write_html(html, out)
        say(f"HTML report: {out} ({out.stat().st_size / 1024:.0f} KiB)")
        if pdf is not None:
            try:
                render_pdf(html, pdf)
            except (ImportError, OSError) as exc:
                if isinstance(exc, GsnrDiagError):
                    raise
                raise InputError(
                    f"--pdf {pdf}: the PDF could not be made ({type(exc).__name__}: {str(exc)[:200]}); the HTML "
                    f"report {out} was written. weasyprint needs the Pango library (see the README's install notes)"
                ) from None
            say(f"PDF report:  {pdf} ({pdf.stat().st_size / 1024:.0f} KiB)")
    except GsnrDiagError as exc:
        raise fail_input(exc) from exc
    except KeyboardInterrupt:
        where = f"; the run is saved in {run_json} (render it with: gsnr-diag render {shlex.quote(str(run_json))})"
        click.echo("\ninterrupted while writing the report" + (where if run_json else ""), err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:  # weasyprint's own file handling
        raise InputError(f"cannot write the report: {exc}") from exc
