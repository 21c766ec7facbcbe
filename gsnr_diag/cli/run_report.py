"""The work behind ``gsnr-diag report``: model file → training with a monitor → control → OSGR → run dict.

The run JSON is saved after every snapshot (atomically), so a crash or Ctrl-C keeps
everything measured so far; the CLI then renders whatever the run holds.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .modelfile import ModelFile, call_user, traceback_enters, user_traceback, UserCodeError
from ..report.run import new_run, save_run

__all__ = ["ReportSettings", "resolve_settings", "run_report", "layer_extras", "DEFAULTS"]

DEFAULTS = {"epochs": 10, "lr": 0.01, "batch_size": 64, "seed": 0, "device": "cpu"}
TARGET_SNAPSHOTS = 30


@dataclass
class ReportSettings:
    epochs: int
    lr: float
    batch_size: int | None
    seed: int
    device: str
    every: int | None  # None = automatic (log-spaced early + ~30 evenly spaced)
    control: bool | None  # None = on for classification
    osgr_sets: int | None
    measure_batch_size: int = 256
    sources: dict[str, str] = field(default_factory=dict)


def resolve_settings(mf: ModelFile, *, epochs=None, lr=None, batch_size=None, full_batch=False, seed=None,
                     device=None, every=None, control=None, osgr_sets=None) -> ReportSettings:
    """CLI options override the file's constants, which override the defaults; record where each came from."""
    sources: dict[str, str] = {}

    def pick(name: str, cli: Any, file_value: Any, file_given: bool) -> Any:
        if cli is not None:
            sources[name] = "command line"
            return cli
        if file_given:
            sources[name] = "model file"
            return file_value
        sources[name] = "default"
        return DEFAULTS[name]

    e = pick("epochs", epochs, mf.epochs, mf.epochs is not None)
    l = pick("lr", lr, mf.lr, mf.lr is not None)  # noqa: E741
    if full_batch:
        sources["batch_size"] = "command line"
        b = None
    else:
        b = pick("batch_size", batch_size, mf.batch_size, mf.batch_size_given)
    s = pick("seed", seed, None, False)
    d = pick("device", device, None, False)
    return ReportSettings(epochs=e, lr=l, batch_size=b, seed=s, device=d, every=every, control=control,
                          osgr_sets=osgr_sets, sources=sources)


def layer_extras(stats: Any) -> dict[str, Any]:
    """Per-layer median GSNR and opposite-sign fraction from a final GradientStats (for the layer table)."""
    import torch

    medians: dict[str, float | None] = {}
    opposite: dict[str, float | None] = {}
    for name, r in stats.gsnr.items():
        ok = r[~torch.isnan(r)]
        medians[name] = float(ok.median()) if ok.numel() else None
    weights = getattr(stats, "_weights", None) or {}
    for name, w in weights.items():
        if w.ndim >= 2 and name in stats.mean:
            w64 = w.detach().to("cpu", torch.float64).flatten()
            g = stats.mean[name].flatten()
            opposite[name] = float(((w64 * g) < 0).double().mean())
    return {"layer_gsnr_median": medians, "layer_opposite_sign": opposite}


def _infer_task(loss_fn: Any, data: Any) -> str:
    import torch
    from torch import nn

    from ..data import iter_batches

    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return "classification"
    if isinstance(loss_fn, (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)):
        return "regression"
    with torch.random.fork_rng(devices=[]):
        for _, y in iter_batches(data, None, None):
            return "regression" if (y.is_floating_point() or y.is_complex()) else "classification"
    return "regression"


def _schedule(total_steps: int, every: int | None):
    from ..dynamics.monitor import linear, logarithmic

    if every is not None:
        return linear(every), f"every {every} steps"
    k = max(1, math.ceil(total_steps / TARGET_SNAPSHOTS))
    lin = linear(k)
    log = logarithmic(per_decade=5, start=1, end=max(1, k))

    class _Auto:
        def __call__(self, step: int) -> bool:
            return lin(step) or log(step)

        def __repr__(self) -> str:
            return f"auto: log-spaced up to step {k}, then every {k} steps"

    return _Auto(), repr(_Auto())


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_report(
    mf: ModelFile,
    settings: ReportSettings,
    *,
    run_json: Path,
    command: str,
    progress: bool = True,
    echo: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Train, monitor, run the control and the OSGR experiment; save and return the run dict."""
    import torch
    from torch import nn

    from ..dynamics.monitor import Monitor, library_versions
    from ..dynamics.training import train

    torch.manual_seed(settings.seed)
    model = mf.build()
    train_data, test_data = mf.data()
    device = torch.device(settings.device)
    model = model.to(device)
    loss_fn = mf.loss_fn
    task = mf.task or _infer_task(loss_fn, train_data)
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
    run_control = (task == "classification") if settings.control is None else settings.control
    if run_control and task != "classification":
        from ..errors import DataError

        raise DataError("--control: the shuffled-label control needs a classification task; this one is regression "
                        "(from TASK, the loss, or float targets)")

    from ..data import count_samples

    n_train = count_samples(train_data)
    steps_per_epoch = 1 if settings.batch_size is None or not n_train else math.ceil(n_train / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    schedule, schedule_text = _schedule(total_steps, settings.every)

    metadata: dict[str, Any] = {
        "model": f"{mf.name} ({type(model).__name__})",
        "model_file": str(mf.path),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "task": task,
        "seed": settings.seed,
        "command": command,
        "measure_mode": "eval",
        "total_parameters": _param_count(model),
        "settings": {
            "epochs": settings.epochs,
            "lr": settings.lr,
            "batch_size": settings.batch_size if settings.batch_size is not None else "full batch",
            "optimizer": "make_optimizer() from the model file" if mf.make_optimizer else "SGD (no momentum)",
            "loss": type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", "loss_fn"),
            "snapshots": schedule_text,
            "control": "shuffled labels (all labels permuted)" if run_control else "off",
            "osgr experiment": f"M = {settings.osgr_sets}" if settings.osgr_sets else "off",
            "settings from": ", ".join(f"{k}: {v}" for k, v in settings.sources.items()),
        },
        "versions": library_versions(),
    }
    state: dict[str, Any] = {"trajectory": None, "control": None, "osgr": None, "final_stats": None}

    def save(partial: bool = True, stopped: str | None = None) -> dict[str, Any]:
        meta = dict(metadata)
        if partial:
            meta["partial"] = True
        if stopped:
            meta["stopped"] = stopped
        run = new_run(state["trajectory"], control=state["control"], osgr=state["osgr"],
                      final_stats=state["final_stats"], metadata=meta)
        save_run(run, run_json)
        return run

    user_files = mf.user_files

    class SavingMonitor(Monitor):
        """A Monitor that re-saves the run JSON after every snapshot."""

        def record(self, step, **kw):  # type: ignore[override]
            snap = super().record(step, **kw)
            if state.get("live") is self:
                state["trajectory"] = self.trajectory
                save()
            return snap

    def optimizer_for(m):
        if mf.make_optimizer is None:
            return None
        params = [p for p in m.parameters() if p.requires_grad]
        return call_user(mf.make_optimizer, f"make_optimizer() in {mf.path.name}", params, user_files=user_files)

    try:
        if run_control:
            final = _train_with_control(mf, model, train_data, test_data, loss_fn, settings, schedule, state,
                                        SavingMonitor, optimizer_for, progress, echo)
        else:
            monitor = SavingMonitor(model, train_data, loss_fn, test_data=test_data, every=schedule,
                                    batch_size=settings.measure_batch_size, task=task,
                                    metadata={"label": "real"})
            state["live"] = monitor
            echo("training ...")
            train(model, train_data, loss_fn, epochs=settings.epochs, lr=settings.lr, optimizer=optimizer_for(model),
                  batch_size=settings.batch_size, monitor=monitor, seed=settings.seed, progress=progress)
            state["trajectory"] = monitor.trajectory
            final = monitor.last_stats
            if final is not None:
                final._weights = {k: p.detach() for k, p in model.named_parameters() if k in final.mean}  # noqa: SLF001
        if final is not None:
            agg = final.aggregates()
            try:
                agg.update(layer_extras(final))
            except Exception:  # noqa: BLE001 - the layer table degrades to '–'
                pass
            state["final_stats"] = agg
        save()
        if settings.osgr_sets:
            from ..experiments.osgr import osgr_experiment

            echo(f"OSGR experiment with M = {settings.osgr_sets} training sets ...")
            state["osgr"] = [_run_osgr(osgr_experiment, mf, train_data, loss_fn, settings, n_train)]
            save()
    except KeyboardInterrupt:
        save(stopped="interrupted (Ctrl-C)")
        raise
    except UserCodeError:
        save(stopped="the model file raised an exception")
        raise
    except Exception as exc:
        if traceback_enters(exc, user_files):
            save(stopped=f"the model file raised {type(exc).__name__}")
            raise UserCodeError(f"code in {mf.path.name}", exc, user_traceback(exc, user_files)) from exc
        save(stopped=f"{type(exc).__name__}: {exc}")
        raise
    stopped = (state["trajectory"].metadata.get("stopped") if state["trajectory"] is not None
               and hasattr(state["trajectory"], "metadata") else None)
    return save(partial=bool(stopped), stopped=stopped)


def _train_with_control(mf, model, train_data, test_data, loss_fn, settings, schedule, state, SavingMonitor,
                        optimizer_for, progress, echo):
    """The shuffled-label control (Sec. 3.1), with the model file's optimizer and saving after every snapshot.

    Same as :func:`gsnr_diag.experiments.control.shuffled_label_control` (whose helpers it uses:
    identical initial weights, labels permuted with ``seed + 1``, the same batch order), but each
    run trains with ``make_optimizer`` when the file defines one, and the run JSON is updated
    after every snapshot so an interrupted control keeps what it measured.
    """
    import copy

    import torch

    from ..experiments.control import ControlResult, check_classification, control_verdict, corrupt_labels, gsnr_ratio
    from ..dynamics.training import materialize, train

    X, Y = materialize(train_data)
    check_classification(Y, "the shuffled-label control (--control)")
    label_noise = 1.0
    Y_bad = corrupt_labels(Y, label_noise, torch.Generator().manual_seed(settings.seed + 1))
    twin = copy.deepcopy(model)
    runs = {}
    final = None
    for label, m, y in (("real", model, Y), ("shuffled", twin, Y_bad)):
        echo(f"training on {label} labels{' (the control)' if label == 'shuffled' else ''} ...")
        monitor = SavingMonitor(
            m, (X, y), loss_fn, test_data=test_data, every=schedule, batch_size=settings.measure_batch_size,
            task="classification",
            metadata={"label": label, "settings": {"label_noise": label_noise if label != "real" else 0.0}},
        )
        if label == "real":
            state["live"] = monitor
        train(m, (X, y), loss_fn, epochs=settings.epochs, lr=settings.lr, optimizer=optimizer_for(m),
              batch_size=settings.batch_size, monitor=monitor, seed=settings.seed, progress=progress)
        runs[label] = monitor.trajectory
        if label == "real":
            state["trajectory"] = monitor.trajectory
            final = monitor.last_stats
            if final is not None:
                final._weights = {k: p.detach() for k, p in m.named_parameters() if k in final.mean}  # noqa: SLF001
            state["live"] = None
    steps, ratio = gsnr_ratio(runs["real"], runs["shuffled"])
    final_ratio, peak, verdict = control_verdict(steps, ratio)
    state["control"] = ControlResult(runs["real"], runs["shuffled"], steps, ratio, final_ratio, peak, verdict,
                                     label_noise)
    return final


def _run_osgr(osgr_experiment, mf: ModelFile, train_data, loss_fn, settings: ReportSettings, n_train: int | None):
    """The OSGR experiment (Sec. 2.4) sized from the training set: M disjoint sets of n plus a shared test set."""
    from ..errors import DataError

    M = settings.osgr_sets
    if not n_train:
        raise DataError("--osgr-sets: the training data has no known size")
    n = min(200, n_train // (M + 1))
    test_size = min(n_train - M * n, 1000)
    if n < 2 or test_size < 1:
        raise DataError(f"--osgr-sets {M}: {n_train} training samples are too few for {M} sets plus a test set")
    epochs = 21
    record_at = [0, 1, 2, 5, 10, 20]

    def build():
        return call_user(mf.build_model, f"build_model() in {mf.path.name}", user_files=mf.user_files)

    return osgr_experiment(
        build, train_data, loss_fn, n=n, M=M, test_size=test_size, lr=settings.lr, epochs=epochs,
        record_at=record_at, seed=settings.seed, measure_batch_size=settings.measure_batch_size,
    )
