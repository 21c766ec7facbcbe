"""The ``gsnr-diag`` command line: report, render, stats, check.

Exit codes (also in ``gsnr-diag --help``):

* 0 — success; for ``check``, every threshold holds;
* 1 — ``check``: at least one threshold failed (each failure is named); ``compare``: a regression;
* 2 — usage or input error: bad options, a missing or malformed model file or run JSON,
  an exception raised in the user's model file (its traceback is shown), bad data.

Library errors (:class:`~gsnr_diag.errors.GsnrDiagError`) are caught at this boundary (cli/common.py)
and nowhere else. Heavy imports (torch, matplotlib, weasyprint) happen inside the commands so
``gsnr-diag --help`` is instant. Layout: this module holds the click group; one module per job
(commands_report.py: report and render; commands_stats.py; commands_check.py; commands_export.py;
commands_compare.py); run_report.py does the work behind ``report``; modelfile.py loads the user's model file.
"""

from __future__ import annotations

import click

from .commands_check import check
from .commands_compare import compare
from .commands_export import export
from .commands_report import render, report
from .commands_stats import stats
from .common import EXIT_CODES_HELP, EXIT_OK, EXIT_THRESHOLD, EXIT_USAGE

__all__ = ["main", "EXIT_OK", "EXIT_THRESHOLD", "EXIT_USAGE"]


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
    gsnr-diag export RUN_JSON --tensorboard DIR   to TensorBoard / offline W&B (--wandb DIR)
    gsnr-diag compare BASELINE CURRENT            deltas ± SE (exit 1 on a regression)
    """


for _command in (report, render, stats, check, export, compare):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
