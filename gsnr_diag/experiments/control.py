"""The shuffled-label control (Sec. 3.1, Fig. 5): real vs corrupted labels from one initialization.

Both runs start from the same weights, see the same batch order and are measured on their own
training set; only real labels should show the early rise of mean GSNR. The per-snapshot ratio
mean GSNR(real) / mean GSNR(shuffled) is the control's verdict.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import DataError, ModelError
from ..dynamics.monitor import Monitor
from ..dynamics.trajectory import Trajectory, clean_float
from ..dynamics.training import materialize, train

__all__ = ["ControlResult", "shuffled_label_control", "corrupt_labels", "gsnr_ratio", "control_verdict", "build_seeded"]

# Verdict thresholds on the peak real/shuffled ratio after step 0 (a reading aid, not a test statistic).
CLEAR_RATIO = 2.0
WEAK_RATIO = 1.2
MONITOR_KEYS = ("every", "signs", "monitor_batch_size", "mode")


def corrupt_labels(y: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The paper's p_random: ``fraction`` = 1 → a random permutation of all labels; otherwise a
    random ``round(fraction·n)`` of the labels are replaced by uniformly random classes."""
    if not (0 < fraction <= 1):
        raise DataError(f"label_noise: expected a fraction in (0, 1], got {fraction!r}")
    n = int(y.shape[0])
    if fraction == 1:
        return y[torch.randperm(n, generator=generator)].clone()
    k = int(round(fraction * n))
    idx = torch.randperm(n, generator=generator)[:k]
    classes = int(y.max()) + 1
    out = y.clone()
    out[idx] = torch.randint(0, classes, (k,), generator=generator, dtype=y.dtype)
    return out


def check_classification(y: torch.Tensor, what: str) -> None:
    """Raise :class:`~gsnr_diag.errors.DataError` unless ``y`` holds integer class labels (1-D)."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim != 1:
        raise DataError(
            f"{what} is for classification only: expected 1-D integer class labels, got a {y.dtype} target "
            f"of shape {tuple(y.shape)}. Shuffling regression targets is not a label-noise control."
        )


def build_seeded(build_model: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build_model()`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    if not callable(build_model):
        raise ModelError(f"build_model: expected a callable returning an nn.Module, got {type(build_model).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model()
    if not isinstance(model, nn.Module):
        raise ModelError(f"build_model() returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def gsnr_ratio(real: Trajectory, shuffled: Trajectory) -> tuple[list[int], list[float | None]]:
    """Steps both trajectories recorded and mean GSNR real/shuffled at each (``None`` if undefined)."""
    other = {s.step: s.mean_gsnr for s in shuffled.snapshots}
    steps, ratio = [], []
    for s in real.snapshots:
        if s.step not in other:
            continue
        a, b = s.mean_gsnr, other[s.step]
        steps.append(s.step)
        ratio.append(clean_float(a / b) if a is not None and b is not None and b > 0 else None)
    return steps, ratio


def control_verdict(
    steps: list[int], ratio: list[float | None], real: Trajectory | None = None
) -> tuple[float | None, float | None, str]:
    """(final_ratio, peak_ratio, verdict); the peak is over snapshots after step 0.

    The verdict also says whether the real-label mean GSNR rose above its step-0 value (the
    paper's early rise, Fig. 5) — a large ratio alone can come from a signal already present
    at initialization.
    """
    later = [r for s, r in zip(steps, ratio) if s > 0 and r is not None]
    final = next((r for r in reversed(ratio) if r is not None), None)
    peak = max(later) if later else None
    if peak is None:
        return final, peak, "undetermined: no snapshot after step 0 with a defined ratio"
    summary = f"peak real/shuffled mean-GSNR ratio {peak:.2f}, final {final:.2f}"
    if real is not None and real.snapshots:
        _, values = real.series("mean_gsnr")
        start = values[0]
        top = max((v for v in values if v is not None), default=None)
        if start and top is not None:
            summary += f"; real-label mean GSNR peak/start {top / start:.2f}" + (
                " (rises early)" if top > start * 1.05 else " (no early rise)"
            )
    if peak >= CLEAR_RATIO:
        return final, peak, f"real labels carry a learnable signal: {summary}"
    if peak >= WEAK_RATIO:
        return final, peak, f"weak separation: {summary}"
    return final, peak, f"no separation: {summary}; GSNR does not distinguish real from shuffled labels"


@dataclass
class ControlResult:
    """Outcome of :func:`shuffled_label_control`; ``ratio[i]`` is mean GSNR real/shuffled at ``steps[i]``."""

    real: Trajectory
    shuffled: Trajectory
    steps: list[int]
    ratio: list[float | None]
    final_ratio: float | None
    peak_ratio: float | None
    verdict: str
    label_noise: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "kind": "gsnr-diag-control",
            "real": self.real.to_dict(),
            "shuffled": self.shuffled.to_dict(),
            "steps": list(self.steps),
            "ratio": [clean_float(r) for r in self.ratio],
            "final_ratio": clean_float(self.final_ratio),
            "peak_ratio": clean_float(self.peak_ratio),
            "verdict": self.verdict,
            "label_noise": self.label_noise,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControlResult":
        from ..errors import TrajectoryFormatError

        try:
            if int(d.get("schema_version", 1)) > 1:
                raise TrajectoryFormatError(
                    f"control: schema_version {d['schema_version']} is newer than this gsnr-diag understands (1)"
                )
            return cls(
                real=Trajectory.from_dict(d["real"]),
                shuffled=Trajectory.from_dict(d["shuffled"]),
                steps=[int(s) for s in d["steps"]],
                ratio=[clean_float(r) for r in d["ratio"]],
                final_ratio=clean_float(d.get("final_ratio")),
                peak_ratio=clean_float(d.get("peak_ratio")),
                verdict=str(d.get("verdict", "")),
                label_noise=float(d["label_noise"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TrajectoryFormatError(f"not a ControlResult dict: {exc!r}") from exc


def shuffled_label_control(
    build_model: Callable[[], nn.Module],
    data: Any,
    loss_fn: Callable | None = None,
    *,
    epochs: int,
    lr: float,
    label_noise: float = 1.0,
    seed: int = 0,
    test_data: Any = None,
    **train_kw: Any,
) -> ControlResult:
    """Train the same initial weights on real and on corrupted labels and compare mean GSNR (Fig. 5).

    Args:
        build_model: ``() -> nn.Module``; called once under ``torch.manual_seed(seed)``, the
            shuffled run gets a deep copy of the same initial weights.
        data: classification training data (integer labels), any supported form.
        label_noise: the paper's p_random; 1.0 = a random permutation of all labels.
        seed: seeds the initialization, the label corruption and the batch order (the same
            batch order for both runs).
        test_data: shared held-out data (real labels) for both monitors.
        train_kw: ``batch_size`` and ``progress`` go to :func:`~gsnr_diag.training.train`;
            ``every``, ``signs``, ``mode`` and ``monitor_batch_size`` (the measurement chunk) to the
            :class:`~gsnr_diag.monitor.Monitor`s.
    """
    X, Y = materialize(data)
    check_classification(Y, "shuffled_label_control")
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    if isinstance(loss_fn, (nn.MSELoss, nn.L1Loss)):
        raise DataError("shuffled_label_control is for classification only; got a regression loss")
    unknown = set(train_kw) - set(MONITOR_KEYS) - {"batch_size", "progress"}
    if unknown:
        raise ModelError(f"shuffled_label_control: unknown keyword(s) {sorted(unknown)}")
    monitor_kw = {k: train_kw.pop(k) for k in MONITOR_KEYS if k in train_kw}
    if "monitor_batch_size" in monitor_kw:
        monitor_kw["batch_size"] = monitor_kw.pop("monitor_batch_size")
    Y_bad = corrupt_labels(Y, label_noise, torch.Generator().manual_seed(seed + 1))

    model = build_seeded(build_model, seed)
    twin = copy.deepcopy(model)
    runs = {}
    for label, m, y in (("real", model, Y), ("shuffled", twin, Y_bad)):
        monitor = Monitor(
            m, (X, y), loss_fn, test_data=test_data, task="classification",
            metadata={"label": label, "settings": {"label_noise": label_noise if label != "real" else 0.0}},
            **monitor_kw,
        )
        runs[label] = train(m, (X, y), loss_fn, epochs=epochs, lr=lr, monitor=monitor, seed=seed, **train_kw)
    steps, ratio = gsnr_ratio(runs["real"], runs["shuffled"])
    final, peak, verdict = control_verdict(steps, ratio, runs["real"])
    return ControlResult(runs["real"], runs["shuffled"], steps, ratio, final, peak, verdict, float(label_noise))


