"""What the ``gsnr`` fixture returns: measure (``stats``, ``track``, ``control``), record, and check.

Every result measured here, and every result passed to an ``expect*`` method, is recorded for the
terminal summary, ``--gsnr-save`` and ``--gsnr-report``. The comparisons and their messages are in
:mod:`gsnr_diag.plugin.checks`. Imported only once a test asks for the fixture; torch and the
measuring layers are imported inside the methods that use them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .._format import number
from .._io import to_plain
from ..errors import ThresholdError
from . import checks as _checks
from .session import Check, GsnrSession, TestRecord
from .thresholds import SPECS, SRC_CALL, Threshold, check_value, resolve_defaults

__all__ = ["GsnrFixture"]


class GsnrFixture:
    """Measure, record and check GSNR in a test (the object of the ``gsnr`` fixture)."""

    def __init__(self, session: GsnrSession, node: Any) -> None:
        self._session = session
        self._nodeid = node.nodeid
        self.defaults: dict[str, Threshold] = resolve_defaults(node, session.ini_thresholds)

    def __repr__(self) -> str:
        defaults = ", ".join(f"{k}={to_plain(t.value)!r} ({t.source})" for k, t in self.defaults.items())
        return f"<gsnr fixture of {self._nodeid}; default thresholds: {defaults or 'none'}>"

    @property
    def device(self) -> str | None:
        """The ``--gsnr-device`` option (``None``: the model's own device), checked to be usable here."""
        if self._session.device is not None:
            from ..validate import check_device

            check_device(self._session.device, "--gsnr-device")
        return self._session.device

    @property
    def record(self) -> TestRecord:
        return self._session.record_for(self._nodeid)

    # -- measuring ------------------------------------------------------------------------------

    def stats(self, model: Any, data: Any, loss_fn: Any = None, *, label: str | None = None, **kw: Any) -> Any:
        """:func:`gsnr_diag.gradient_stats` on ``--gsnr-device`` (unless ``device=`` is given), recorded."""
        from ..measure import gradient_stats

        if self.device is not None:
            kw.setdefault("device", self.device)
        result = gradient_stats(model, data, loss_fn, **kw)
        self.record.add(result, label)
        return result

    def _build(self, build_model: Any, seed: int | None) -> Any:
        import torch

        if isinstance(build_model, torch.nn.Module):
            model = build_model
        else:
            if not callable(build_model):
                raise TypeError(
                    f"build_model: expected a callable returning an nn.Module, got {type(build_model).__name__}"
                )
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                model = build_model()
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"build_model() returned a {type(model).__name__}, expected a torch.nn.Module")
        if self.device is not None:
            model = model.to(self.device)
        return model

    def track(
        self,
        build_model: Any,
        data: Any,
        loss_fn: Any = None,
        *,
        epochs: int,
        every: Any = 1,
        test_data: Any = None,
        monitor_batch_size: int | None = None,
        signs: bool = True,
        task: str | None = None,
        mode: str = "eval",
        seed: int = 0,
        label: str | None = None,
        **train_kw: Any,
    ) -> Any:
        """Train ``build_model()`` for ``epochs`` with a :class:`~gsnr_diag.dynamics.monitor.Monitor`; the Trajectory.

        ``build_model`` is a callable returning a fresh model (called with torch's RNG seeded by
        ``seed``, so the initialization is reproducible and the test's RNG is left alone) or a
        model. ``every``, ``test_data``, ``signs``, ``task``, ``mode`` and ``monitor_batch_size``
        (the measurement chunk) go to the Monitor; the rest (``lr`` — required —, ``batch_size``,
        ``optimizer``, ``progress``) to :func:`gsnr_diag.dynamics.training.train`, with ``seed`` also
        seeding its batch order. The same keywords as :meth:`control`.
        """
        from ..dynamics.monitor import Monitor
        from ..dynamics.training import train

        model = self._build(build_model, seed)
        monitor = Monitor(
            model,
            data,
            loss_fn,
            test_data=test_data,
            every=every,
            batch_size=monitor_batch_size,
            signs=signs,
            task=task,
            mode=mode,
        )
        train_kw.setdefault("progress", False)
        train_kw.setdefault("seed", seed)
        result = train(model, data, loss_fn, epochs=epochs, monitor=monitor, test_data=test_data, **train_kw)
        if result is None:
            result = monitor.trajectory
        self.record.add(result, label)
        return result

    def control(
        self,
        build_model: Callable[[], Any],
        data: Any,
        loss_fn: Any = None,
        *,
        epochs: int,
        label: str | None = None,
        **kw: Any,
    ) -> Any:
        """:func:`gsnr_diag.experiments.control.shuffled_label_control` (real vs shuffled labels), recorded."""
        from ..experiments.control import shuffled_label_control

        if self.device is not None and "device" not in kw:
            import torch

            device = self.device
            inner = build_model

            def build_model() -> Any:
                model = inner() if not isinstance(inner, torch.nn.Module) else inner
                return model.to(device)

        kw.setdefault("progress", False)
        result = shuffled_label_control(build_model, data, loss_fn, epochs=epochs, **kw)
        self.record.add(result, label)
        return result

    # -- checking -------------------------------------------------------------------------------

    def _threshold(self, key: str, explicit: Any) -> Threshold | None:
        """The explicit argument, else the test's default (marker, then ini option)."""
        if explicit is not None:
            return Threshold(check_value(SPECS[key], explicit, f"{key}"), SRC_CALL)
        return self.defaults.get(key)

    def _no_threshold(self, method: str, keys: list[str]) -> TypeError:
        opts = ", ".join(f"{k}=..." for k in keys)
        inis = ", ".join(SPECS[k].ini for k in keys)
        return TypeError(
            f"gsnr.{method}: no threshold to check. Pass {opts}, or set a default with "
            f"@pytest.mark.gsnr({opts}) or the ini option(s) {inis}"
        )

    def _finish(self, checks: list[Check], lines: list[str]) -> None:
        __tracebackhide__ = True
        self.record.checks.extend(checks)
        if not all(c.passed for c in checks):
            raise ThresholdError("\n".join(lines))

    def expect(
        self,
        result: Any,
        *,
        min_mean_gsnr: float | None = None,
        min_layer_gsnr: float | Mapping[str, float] | None = None,
        min_same_sign: float | None = None,
        min_osgr: float | None = None,
    ) -> None:
        """Assert thresholds on a GradientStats (or a Trajectory's / ControlResult's last snapshot).

        Each threshold not given here falls back to ``@pytest.mark.gsnr(...)``, then to the
        ``gsnr_*`` ini option. ``min_layer_gsnr`` is one number for every parameter tensor or
        ``{glob: number}`` (fnmatch globs of parameter names; every matching glob applies).
        Raises :class:`~gsnr_diag.errors.ThresholdError` (an AssertionError) listing every
        threshold, its source, the measured value and the worst layers.
        """
        __tracebackhide__ = True
        explicit = {
            "min_mean_gsnr": min_mean_gsnr,
            "min_layer_gsnr": min_layer_gsnr,
            "min_same_sign": min_same_sign,
            "min_osgr": min_osgr,
        }
        resolved = {k: self._threshold(k, v) for k, v in explicit.items()}
        resolved = {k: t for k, t in resolved.items() if t is not None}
        if not resolved:
            raise self._no_threshold("expect", list(explicit))
        what, point = _checks.describe(result)
        self.record.add(result)
        self._finish(*_checks.expect_checks(what, point, resolved))

    def expect_rising(self, trajectory: Any, *, factor: float | None = None) -> None:
        """Assert that the peak mean GSNR is at least ``factor`` × its value at the first recorded step.

        The paper's signature of feature learning on real labels (Fig. 5): mean GSNR rises early
        in training. Accepts a Trajectory or a ControlResult (its real-label trajectory).
        """
        __tracebackhide__ = True
        t = self._threshold("factor", factor)
        if t is None:
            raise self._no_threshold("expect_rising", ["factor"])
        self.record.add(trajectory)
        self._finish(*_checks.expect_rising_checks(trajectory, t))

    def expect_no_regression(
        self,
        result: Any,
        *,
        baseline: Any,
        tolerance: float = 0.2,
        sigma: float = 2.0,
        two_sided: bool = False,
        layers: bool = True,
    ) -> None:
        """Assert that no mean GSNR, same-sign fraction or noise scale (overall or per layer) regressed.

        ``baseline``: a path to a saved run / trajectory JSON (e.g. a file written by ``--gsnr-save``), or
        a result (GradientStats, Trajectory, Snapshot, ControlResult, run dict). A regression is a change
        in the harmful direction by more than ``tolerance`` (relative) and, where both sides carry jackknife
        standard errors, more than ``sigma`` SE (:func:`gsnr_diag.report.compare.compare_points`).
        """
        __tracebackhide__ = True
        from .compare import expect_no_regression_checks  # plugin/compare.py

        checks, lines = expect_no_regression_checks(
            result, baseline, tolerance=tolerance, sigma=sigma, two_sided=two_sided, layers=layers
        )
        self.record.add(result)
        self._finish(checks, lines)

    def expect_control(self, control: Any, *, min_ratio: float | None = None, at: str = "final") -> None:
        """Assert that real labels beat shuffled ones: mean-GSNR ratio real/shuffled ≥ ``min_ratio``.

        ``at="final"`` (default, as ``gsnr-diag check --min-control-ratio`` and the report's verdict panel)
        checks the control's ``final_ratio``, ``at="peak"`` its ``peak_ratio`` (largest after step 0).
        """
        __tracebackhide__ = True
        if at not in ("peak", "final"):
            raise ValueError(f"gsnr.expect_control: at must be 'peak' or 'final', got {at!r}")
        t = self._threshold("min_ratio", min_ratio)
        if t is None:
            raise self._no_threshold("expect_control", ["min_ratio"])
        checks, lines = _checks.expect_control_checks(control, t, at)
        self.record.add(control)
        self._finish(checks, lines)

    # -- the report's verdict (run-level evidence, docs/VALIDATION.md) ---------------------------

    def expect_verdict(self, run_or_trajectory: Any, *, at_least: str = "good") -> None:
        """Assert that the report's verdict level is at least ``at_least`` (``"bad"`` < ``"watch"`` < ``"good"``).

        Accepts a Trajectory, a ControlResult (its real-label run with the control), a run dict or the
        path of a saved run JSON. The verdict is the one ``gsnr-diag report`` shows and ``gsnr-diag check
        --min-level`` reads: ``"inconclusive"`` fails every level. The message lists each graded
        indicator with its value, 95% interval and status.
        """
        __tracebackhide__ = True
        from ..report.verdicts import LEVELS

        if at_least not in LEVELS:
            raise ValueError(f"gsnr.expect_verdict: at_least must be one of {list(LEVELS)}, got {at_least!r}")
        run = _as_run(run_or_trajectory)
        from ..report.verdicts import verdict_object

        verdict = verdict_object(run)
        level = verdict["level"]
        passed = level in LEVELS and LEVELS.index(level) >= LEVELS.index(at_least)
        check = Check("expect_verdict", "verdict level", f"at_least = {at_least!r}", None, SRC_CALL, passed, at_least)
        lines = [
            f"gsnr.expect_verdict: the verdict is {level!r}, expected at least {at_least!r}",
            f"  {verdict['headline']}",
        ]
        for ind in verdict["indicators"]:
            iv = ind["interval"]
            shown = number(ind["value"]) if ind["value"] is not None else "not measured"
            band = f" (95%: {number(iv[0])} to {number(iv[1])})" if iv else ""
            lines.append(f"  {ind['status']:<12} {ind['name']}: {shown}{band}")
        if _checks_kind(run_or_trajectory):
            self.record.add(run_or_trajectory)
        self._finish([check], lines)


def _checks_kind(result: Any) -> bool:
    return hasattr(result, "snapshots") or hasattr(result, "shuffled")


def _as_run(x: Any) -> dict[str, Any]:
    """A run dict from a Trajectory, a ControlResult, a run dict or a saved run's path."""
    import os

    from ..report.run import RUN_KIND, load_run, new_run

    if isinstance(x, (str, os.PathLike)):
        return load_run(x)
    if isinstance(x, Mapping) and x.get("kind") == RUN_KIND:
        return dict(x)
    if hasattr(x, "shuffled") and hasattr(x, "real"):  # ControlResult
        return new_run(x.real, control=x)
    if hasattr(x, "snapshots"):  # Trajectory
        return new_run(x)
    raise TypeError(
        "gsnr.expect_verdict: expected a Trajectory, a ControlResult, a run dict or a run JSON path, "
        f"got {type(x).__name__}"
    )
