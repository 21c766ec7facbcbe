"""The work behind ``gsnr-diag report``: model file → training with a monitor → control → OSGR → run dict.

It orchestrates the library and copies none of it: the monitored training run comes from
:mod:`gsnr_diag.experiments.monitored`, the shuffled-label control from
:mod:`gsnr_diag.experiments.control`, the OSGR experiment from :mod:`gsnr_diag.experiments.osgr`.
The run JSON is saved (atomically) after every real-label snapshot, so a crash or Ctrl-C keeps
everything measured so far; the CLI then renders whatever the run holds.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import environment_info
from .modelfile import ModelFile, ModelFileError, UserCodeError, call_user, traceback_enters, user_traceback
from .runfile import RunFile

__all__ = ["ReportSettings", "resolve_settings", "run_report", "layer_extras", "loader_batches", "DEFAULTS"]

DEFAULTS = {"epochs": 10, "lr": 0.01, "batch_size": 64, "seed": 0, "device": "cpu"}
TARGET_SNAPSHOTS = 30
#: The OSGR experiment's schedule in the CLI: full-batch GD steps and the steps measured (Sec. 2.4).
OSGR_EPOCHS = 21
OSGR_RECORD_AT = (0, 1, 2, 5, 10, 20)


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


def resolve_settings(
    mf: ModelFile,
    *,
    epochs=None,
    lr=None,
    batch_size=None,
    full_batch=False,
    seed=None,
    device=None,
    every=None,
    control=None,
    osgr_sets=None,
) -> ReportSettings:
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
    learning_rate = pick("lr", lr, mf.lr, mf.lr is not None)
    if full_batch:
        sources["batch_size"] = "command line"
        b = None
    else:
        b = pick("batch_size", batch_size, mf.batch_size, mf.batch_size_given)
    s = pick("seed", seed, None, False)
    d = pick("device", device, None, False)
    return ReportSettings(
        epochs=e,
        lr=learning_rate,
        batch_size=b,
        seed=s,
        device=d,
        every=every,
        control=control,
        osgr_sets=osgr_sets,
        sources=sources,
    )


def layer_extras(stats: Any, weights: dict[str, Any]) -> dict[str, Any]:
    """Per-layer median GSNR and opposite-sign fraction (W_j·ḡ_j < 0, Sec. 3.3) for the layer table.

    ``stats`` is the final GradientStats, ``weights`` the model's parameters at that measurement
    (``name -> tensor``); the opposite-sign fraction is given for weight tensors (ndim ≥ 2) only.
    """
    import torch

    medians: dict[str, float | None] = {}
    opposite: dict[str, float | None] = {}
    for name, r in stats.gsnr.items():
        ok = r[~torch.isnan(r)]
        medians[name] = float(ok.median()) if ok.numel() else None
    for name, w in weights.items():
        if w.ndim >= 2 and name in stats.mean:
            w64 = w.detach().to("cpu", torch.float64).flatten()
            g = stats.mean[name].flatten()
            opposite[name] = float(((w64 * g) < 0).double().mean())
    return {"layer_gsnr_median": medians, "layer_opposite_sign": opposite}


def _schedule(total_steps: int, every: int | None):
    from ..dynamics.schedules import linear, report_schedule

    if every is not None:
        return linear(every), f"every {every} steps"
    auto = report_schedule(total_steps, target=TARGET_SNAPSHOTS)
    return auto, repr(auto)


def run_report(
    mf: ModelFile,
    settings: ReportSettings,
    *,
    run_json: Path,
    command: str,
    progress: bool | Callable[[int, int], None] = True,
    echo: Callable[[str], None] = lambda s: None,
    saved: list[Path] | None = None,
) -> dict[str, Any]:
    """Train, monitor, run the control and the OSGR experiment; save and return the run dict.

    ``progress`` goes to :func:`~gsnr_diag.dynamics.training.train` (the CLI passes a click
    progress bar); ``echo`` prints a status line. The run JSON is never made less complete
    (:class:`~gsnr_diag.cli.runfile.RunFile`); ``saved`` (a list) gets the path last written.
    """
    import torch
    from torch import nn

    from ..data import count_samples
    from ..dynamics.monitor import infer_task
    from ..errors import DataError
    from ..experiments.control import partial_control, shuffled_label_control
    from ..experiments.monitored import monitored_run

    torch.manual_seed(settings.seed)
    model = mf.build()
    train_data, test_data = mf.data()
    device = torch.device(settings.device)
    model = model.to(device)
    loss_fn = mf.loss_fn
    task = mf.task or infer_task(loss_fn, train_data)
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
    run_control = (task == "classification") if settings.control is None else settings.control
    if run_control and task != "classification":
        raise DataError(
            "--control: the shuffled-label control needs a classification task; this one is regression "
            "(from TASK, the loss, or float targets)"
        )

    train_data, batch_sampler = loader_batches(train_data, settings)
    n_train = count_samples(train_data)
    steps_per_epoch = 1 if settings.batch_size is None or not n_train else math.ceil(n_train / settings.batch_size)
    if batch_sampler is not None:
        steps_per_epoch = len(batch_sampler)
    if settings.sources.get("batch_size") == "the DataLoader from load_data()":
        echo(f"batch size {settings.batch_size} and sampler: those of the DataLoader (--batch-size overrides)")
    schedule, schedule_text = _schedule(settings.epochs * steps_per_epoch, settings.every)
    env = environment_info()
    loss_name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", "loss_fn")
    run = RunFile(
        run_json,
        {
            "model": f"{mf.name} ({type(model).__name__})",
            "model_file": str(mf.path),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": str(device),
            "task": task,
            "seed": settings.seed,
            "command": command,
            "measure_mode": "eval",
            "total_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "settings": {
                "epochs": settings.epochs,
                "lr": settings.lr,
                "batch_size": settings.batch_size if settings.batch_size is not None else "full batch",
                "optimizer": "make_optimizer() from the model file" if mf.make_optimizer else "SGD (no momentum)",
                "loss": loss_name,
                "snapshots": schedule_text,
                "control": "shuffled labels (all labels permuted)" if run_control else "off",
                "osgr experiment": f"M = {settings.osgr_sets}" if settings.osgr_sets else "off",
                "settings from": ", ".join(f"{k}: {v}" for k, v in settings.sources.items()),
            },
            "versions": env["versions"],
            "platform": env["platform"],
        },
    )

    def user_optimizer(params: list[Any]) -> Any:
        opt = call_user(mf.make_optimizer, f"make_optimizer() in {mf.path.name}", params, user_files=mf.user_files)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ModelFileError(
                f"{mf.path}: make_optimizer(params) returned {type(opt).__name__} {opt!r:.60}; it must return a "
                "torch.optim.Optimizer over the parameters it is given, e.g. torch.optim.SGD(params, lr=LR)",
                example=False,
            )
        return opt

    last_real: dict[str, Any] = {}
    runs: dict[str, Any] = {}

    def on_snapshot(label: str, snapshot: Any, monitor: Any) -> None:
        if snapshot.step == 0 and run_control:
            echo(f"training on {label} labels{' (the control)' if label == 'shuffled' else ''} ...")
        runs[label] = monitor.trajectory
        if label == "real":
            run.trajectory = monitor.trajectory
            last_real["stats"] = monitor.last_stats
        else:  # the control so far: the finished real-label run and the shuffled one up to now
            run.control = partial_control(runs["real"], monitor.trajectory, label_noise=1.0)
        save()

    def save(**kw: Any) -> dict[str, Any]:
        result = run.save(**kw)
        if saved is not None and run.saved_to is not None:
            saved.append(run.saved_to)
        return result

    common = {
        "epochs": settings.epochs,
        "lr": settings.lr,
        "seed": settings.seed,
        "test_data": test_data,
        "make_optimizer": user_optimizer if mf.make_optimizer is not None else None,
        "on_snapshot": on_snapshot,
        "progress": progress,
        **({"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": settings.batch_size}),
    }
    try:
        if run_control:
            run.control = shuffled_label_control(
                model,
                train_data,
                loss_fn,
                label_noise=1.0,
                every=schedule,
                monitor_batch_size=settings.measure_batch_size,
                **common,
            )
        else:
            echo("training ...")
            monitor = monitored_run(
                model,
                train_data,
                loss_fn,
                label="real",
                task=task,
                monitor_kw={"every": schedule, "monitor_batch_size": settings.measure_batch_size},
                **common,
            )
            run.trajectory = monitor.trajectory
        final = last_real.get("stats")
        if final is not None:
            agg = final.aggregates()
            weights = {k: p.detach() for k, p in model.named_parameters() if k in final.mean}
            try:
                agg.update(layer_extras(final, weights))
            except Exception:  # the layer table then shows '–'
                pass
            run.final_stats = agg
        save()
        if settings.osgr_sets:
            echo(f"OSGR experiment with M = {settings.osgr_sets} training sets ...")
            run.osgr = [_run_osgr(mf, train_data, loss_fn, settings, n_train)]
            save()
    except KeyboardInterrupt:
        save(stopped="interrupted (Ctrl-C)")
        raise
    except UserCodeError:
        save(stopped="the model file raised an exception")
        raise
    except Exception as exc:
        if traceback_enters(exc, mf.user_files):
            save(stopped=f"the model file raised {type(exc).__name__}")
            raise UserCodeError(f"code in {mf.path.name}", exc, user_traceback(exc, mf.user_files)) from exc
        save(stopped=f"{type(exc).__name__}: {exc}")
        raise
    stopped = run.trajectory.metadata.get("stopped") if run.trajectory is not None else None
    return save(partial=bool(stopped), stopped=stopped)


def loader_batches(train_data: Any, settings: ReportSettings) -> tuple[Any, Any]:
    """A DataLoader from ``load_data()`` keeps its batch size and sampler unless ``--batch-size`` or
    ``--full-batch`` is given: ``(its dataset, its batch_sampler)``; otherwise ``(train_data, None)``.

    A loader over an IterableDataset (no sampler to reuse) or with its own ``collate_fn`` keeps its batch
    size only. ``settings`` is updated to say where the batch size came from.
    """
    from torch.utils.data import DataLoader, IterableDataset

    if not isinstance(train_data, DataLoader) or settings.sources.get("batch_size") == "command line":
        return train_data, None
    if train_data.batch_size is None:  # automatic batching off: the loader yields whole batches itself
        return train_data, None
    settings.batch_size = train_data.batch_size
    settings.sources["batch_size"] = "the DataLoader from load_data()"
    from torch.utils.data import default_collate

    if isinstance(train_data.dataset, IterableDataset) or train_data.batch_sampler is None:
        return train_data, None
    if train_data.collate_fn is not default_collate:  # its batches are not rows of the dataset: keep the size
        return train_data, None
    return train_data.dataset, train_data.batch_sampler


def _run_osgr(mf: ModelFile, train_data: Any, loss_fn: Any, settings: ReportSettings, n_train: int | None) -> Any:
    """The OSGR experiment (Sec. 2.4) sized from the training set: M disjoint sets of n plus a shared test set."""
    from ..errors import DataError
    from ..experiments.osgr import osgr_experiment

    M = settings.osgr_sets
    if not n_train:
        raise DataError("--osgr-sets: the training data has no known size")
    n = min(200, n_train // (M + 1))
    test_size = min(n_train - M * n, 1000)
    if n < 2 or test_size < 1:
        raise DataError(f"--osgr-sets {M}: {n_train} training samples are too few for {M} sets plus a test set")

    def build():
        return call_user(mf.build_model, f"build_model() in {mf.path.name}", user_files=mf.user_files)

    return osgr_experiment(
        build,
        train_data,
        loss_fn,
        n=n,
        M=M,
        test_size=test_size,
        lr=settings.lr,
        epochs=OSGR_EPOCHS,
        record_at=list(OSGR_RECORD_AT),
        seed=settings.seed,
        measure_batch_size=settings.measure_batch_size,
    )
