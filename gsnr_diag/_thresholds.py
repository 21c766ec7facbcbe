"""The verdict thresholds: one table read by the report, ``gsnr-diag check``, the control and the plugin.

Each entry is ``(good, watch)``: for a higher-is-better quantity, ``value >= good`` is good and
``value >= watch`` is watch (else bad); for the lower-is-better ones in :data:`LOWER_IS_BETTER`,
``value <= good`` is good and ``value <= watch`` is watch. They are reading aids chosen from the
paper's own scale of effects (a 2× rise of GSNR, OSGR of 0.5 = half of the training-loss decrease
carries over), not statistics tuned to any run; the report states them verbatim.
"""

from __future__ import annotations

VERDICT_THRESHOLDS: dict[str, tuple[float, float]] = {
    # --- graded by the verdict (run-level evidence; docs/VALIDATION.md says how they were checked)
    "integrated_osgr": (0.5, 0.1),  # Σ R̄·ΔL / Σ ΔL over the run (eq. 19 integrated)
    "control_separation": (2.0, 1.2),  # geometric-mean real/shuffled mean GSNR while the training loss falls
    "early_rise": (1.5, 1.1),  # exp(mean log r_t/r_0) over the first half of the training-loss decrease
    # --- single-snapshot quantities (pytest plugin, `check` options, the control's own verdict)
    "peak_rise": (2.0, 1.2),  # peak mean GSNR / its step-0 value
    "final_gsnr_n": (10.0, 1.0),  # final mean GSNR × n (eq. 22: r against 1/n)
    "control_ratio": (2.0, 1.2),  # real-label / shuffled-label mean GSNR
    "osgr": (0.5, 0.1),  # OSGR over training (eq. 19, weighted by the training-loss decrease)
    "realized_ratio": (0.5, 0.1),  # measured test-loss decrease / training-loss decrease
    "same_sign": (0.55, 0.52),  # mean same-sign fraction
}

#: Quantities where smaller is better (none today; the table's convention allows them).
LOWER_IS_BETTER: frozenset[str] = frozenset()


def grade(key: str, value: float | None) -> str:
    """``"good"``, ``"watch"``, ``"bad"`` for ``value`` against ``VERDICT_THRESHOLDS[key]``; ``"n/a"`` for None."""
    if value is None:
        return "n/a"
    good, watch = VERDICT_THRESHOLDS[key]
    if key in LOWER_IS_BETTER:
        return "good" if value <= good else "watch" if value <= watch else "bad"
    return "good" if value >= good else "watch" if value >= watch else "bad"
