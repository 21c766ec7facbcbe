"""Send a run's GSNR statistics to TensorBoard or to an offline Weights & Biases run.

* :func:`export_tensorboard` writes scalars (every :class:`~gsnr_diag.dynamics.trajectory.Snapshot`
  number, per-layer values) and, at each snapshot, per layer the histogram of log10 of its per-element
  GSNR (``log10_gsnr/<param>``, from the snapshot's ``layer_log10_gsnr_hist``) and a histogram of log10
  of the per-layer mean GSNR, with ``torch.utils.tensorboard.SummaryWriter``.
* :func:`export_wandb` writes the same numbers as the history of an *offline* W&B run
  (``mode="offline"``: nothing is sent; ``wandb sync DIR/wandb/offline-run-*`` uploads it later).
* :class:`TensorBoardLogger` is a ``Monitor(..., on_snapshot=...)`` callable for live logging.

The source is a :class:`~gsnr_diag.Trajectory`, a run/trajectory dict, or a path to a saved run JSON,
a trajectory JSON or a monitor's JSONL. A run with a shuffled-label control exports the control's
shuffled-label trajectory too, as a second run named ``shuffled``. tensorboard and wandb are
optional (``pip install 'gsnr-diag[tensorboard]'`` / ``'gsnr-diag[wandb]'``) and imported lazily.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.histogram import valid_histogram
from ..dynamics.trajectory import Snapshot, Trajectory
from ..errors import ExportError, TrajectoryFormatError

__all__ = [
    "ExportError",
    "TensorBoardLogger",
    "export_tensorboard",
    "export_wandb",
    "snapshot_scalars",
    "load_trajectories",
]

#: Snapshot fields exported as scalars, under these tags.
SCALAR_TAGS = {
    "mean_gsnr": "gsnr/mean_gsnr",
    "gsnr_median": "gsnr/median",
    "gsnr_p90": "gsnr/p90",
    "osgr": "gsnr/osgr",
    "mean_same_sign": "gsnr/same_sign",
    "opposite_sign": "gsnr/opposite_sign",
    "opposite_sign_top10": "gsnr/opposite_sign_top10",
    "delta_g_weight_corr": "gsnr/delta_g_weight_corr",
    "noise_scale": "gsnr/noise_scale",
    "m_coherence": "gsnr/m_coherence",
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "generalization_gap": "loss/generalization_gap",
    "train_accuracy": "accuracy/train",
    "test_accuracy": "accuracy/test",
    "epoch": "epoch",
}
#: Per-layer maps exported as ``<prefix>/<parameter name>``.
LAYER_TAGS = {
    "layer_gsnr": "layer_gsnr",
    "layer_same_sign": "layer_same_sign",
    "layer_noise_scale": "layer_noise_scale",
    "layer_m_coherence": "layer_m_coherence",
}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def snapshot_scalars(snap: Snapshot) -> dict[str, float]:
    """The finite numbers of one snapshot as ``{tag: value}`` (the tags both exporters use)."""
    out = {tag: float(getattr(snap, f)) for f, tag in SCALAR_TAGS.items() if _finite(getattr(snap, f))}
    for f, prefix in LAYER_TAGS.items():
        for layer, v in getattr(snap, f).items():
            if _finite(v):
                out[f"{prefix}/{layer}"] = float(v)
    for k, v in snap.extra.items():
        if _finite(v):
            out[f"extra/{k}"] = float(v)
    return out


def log10_layer_gsnr(snap: Snapshot) -> list[float]:
    """log10 of the per-layer mean GSNR of one snapshot (layers with a positive, finite value)."""
    return [math.log10(v) for v in snap.layer_gsnr.values() if _finite(v) and v > 0]


def load_trajectories(source: Any) -> dict[str, Trajectory]:
    """``{run name: Trajectory}``: ``""`` for the main trajectory, ``"shuffled"`` for a control's shuffled run."""
    import json

    if isinstance(source, Trajectory):
        return {"": source}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        main = Trajectory.load(path)  # raises TrajectoryFormatError naming the file
        out = {"": main}
        if path.suffix != ".jsonl":
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                d = None
            shuffled = _shuffled(d)
            if shuffled is not None:
                out["shuffled"] = shuffled
        return out
    if isinstance(source, dict):
        out = {"": Trajectory.from_dict(source)}
        shuffled = _shuffled(source)
        if shuffled is not None:
            out["shuffled"] = shuffled
        return out
    raise ExportError(
        f"source: expected a Trajectory, a run or trajectory dict, or a path to a JSON/JSONL file; "
        f"got {type(source).__name__}"
    )


def _shuffled(run: Any) -> Trajectory | None:
    control = run.get("control") if isinstance(run, dict) else None
    shuffled = control.get("shuffled") if isinstance(control, dict) else None
    if not isinstance(shuffled, dict):
        return None
    try:
        return Trajectory.from_dict(shuffled)
    except TrajectoryFormatError:
        return None


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch's module imports tensorboard
        raise ExportError(
            "TensorBoard export needs the tensorboard package: pip install 'gsnr-diag[tensorboard]'"
        ) from exc
    return SummaryWriter


def _write_snapshot(writer: Any, snap: Snapshot) -> None:
    for tag, value in snapshot_scalars(snap).items():
        writer.add_scalar(tag, value, global_step=snap.step)
    logs = log10_layer_gsnr(snap)
    if logs:
        import numpy as np

        writer.add_histogram("gsnr/log10_layer_gsnr", np.asarray(logs), global_step=snap.step)
    for layer, h in snap.layer_log10_gsnr_hist.items():
        if valid_histogram(h):
            writer.add_histogram_raw(
                f"log10_gsnr/{layer}",
                min=h["min"],
                max=h["max"],
                num=h["num"],
                sum=h["sum"],
                sum_squares=h["sum_squares"],
                bucket_limits=h["edges"][1:],
                bucket_counts=h["counts"],
                global_step=snap.step,
            )


def export_tensorboard(source: Any, logdir: str | os.PathLike[str]) -> list[Path]:
    """Write the run's snapshots as TensorBoard event files under ``logdir``; returns the run directories.

    Scalars: the tags of :data:`SCALAR_TAGS` (``gsnr/mean_gsnr``, ``gsnr/osgr``, ``gsnr/noise_scale``, ...),
    per-layer ``layer_gsnr/<param>`` etc., ``extra/<name>``; histograms ``log10_gsnr/<param>`` (log10 of the
    per-element GSNR of each parameter tensor) and ``gsnr/log10_layer_gsnr`` (log10 mean GSNR over the
    layers) at each snapshot. Steps are the snapshots' training steps.
    """
    SummaryWriter = _summary_writer()
    runs = load_trajectories(source)
    logdir = Path(logdir)
    written = []
    for name, traj in runs.items():
        target = logdir / name if name else logdir
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"--tensorboard {logdir}: cannot create the log directory ({exc})") from exc
        writer = SummaryWriter(log_dir=str(target))
        try:
            for snap in traj.snapshots:
                _write_snapshot(writer, snap)
        finally:
            writer.close()
        written.append(target)
    return written


class TensorBoardLogger:
    """``Monitor(..., on_snapshot=TensorBoardLogger(logdir))``: each snapshot goes to TensorBoard as recorded.

    The same scalars and histograms as :func:`export_tensorboard`. Call :meth:`close` at the end.
    """

    def __init__(self, logdir: str | os.PathLike[str]):
        self.writer = _summary_writer()(log_dir=str(logdir))

    def __call__(self, snap: Snapshot) -> None:
        _write_snapshot(self.writer, snap)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@contextmanager
def _offline_environment(directory: Path):
    """WANDB_MODE=offline and W&B's own files under ``directory`` for the duration; restored afterwards."""
    keys = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DIR": str(directory),
        "WANDB_CONFIG_DIR": str(directory / ".config"),
        "WANDB_CACHE_DIR": str(directory / ".cache"),
        "WANDB_DATA_DIR": str(directory / ".data"),
    }
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def export_wandb(
    source: Any,
    directory: str | os.PathLike[str],
    *,
    project: str = "gsnr-diag",
    name: str | None = None,
    teardown: bool = False,
) -> list[Path]:
    """Write the run as offline W&B run(s) under ``directory/wandb/``; returns the run directories.

    No network is used (``mode="offline"``); upload later with ``wandb sync <run dir>``. The history
    holds the same keys as :func:`export_tensorboard`'s scalars (logged at the snapshot's step) and a
    ``gsnr/log10_layer_gsnr`` histogram; the trajectory's metadata is the run's config.
    W&B's service writes the run file in the background; ``teardown=True`` (what ``gsnr-diag export``
    does) calls ``wandb.teardown()`` so the files are complete on return — it also finishes any other
    W&B run of this process, so it is off by default.
    """
    try:
        import wandb
    except ImportError as exc:
        raise ExportError("W&B export needs the wandb package: pip install 'gsnr-diag[wandb]'") from exc
    runs = load_trajectories(source)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--wandb {directory}: cannot create the directory ({exc})") from exc
    written = []
    with _offline_environment(directory.resolve()):
        for label, traj in runs.items():
            run_name = name or str(traj.metadata.get("label") or "gsnr-diag")
            if label:
                run_name = f"{run_name}-{label}"
            run = wandb.init(
                project=project,
                name=run_name,
                dir=str(directory.resolve()),
                mode="offline",
                config=_config(traj.metadata),
                reinit="create_new",
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_meta=True),
            )
            try:
                for snap in traj.snapshots:
                    row: dict[str, Any] = dict(snapshot_scalars(snap))
                    logs = log10_layer_gsnr(snap)
                    if logs:
                        row["gsnr/log10_layer_gsnr"] = wandb.Histogram(logs)
                    for layer, h in snap.layer_log10_gsnr_hist.items():
                        if valid_histogram(h):
                            row[f"log10_gsnr/{layer}"] = wandb.Histogram(np_histogram=(h["counts"], h["edges"]))
                    run.log(row, step=int(snap.step))
                run_dir = Path(run.dir).parent  # run.dir is <offline-run-...>/files
            finally:
                run.finish()
            written.append(run_dir)
        if teardown:
            wandb.teardown()
    return written


def _config(metadata: dict[str, Any]) -> dict[str, Any]:
    from .._io import to_plain

    keep = ("model", "n_train", "n_test", "task", "settings", "seed", "label", "param_counts")
    return to_plain({k: metadata[k] for k in keep if k in metadata})
