"""Hugging Face Trainer: ``GSNRTrainerCallback`` records GSNR snapshots on a schedule of optimizer steps.

::

    from gsnr_diag.integrations.transformers import GSNRTrainerCallback

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GSNRTrainerCallback(batch, every=20)])

transformers is optional (``pip install 'gsnr-diag[transformers]'``) and imported only when the
callback class is first used.

**Where the metrics go.** The Trainer calls its callbacks in order, and its own reporters (W&B,
TensorBoard, ...) come before user callbacks, so a value added to ``logs`` in a user's ``on_log``
reaches none of them. The callback therefore hands its metrics to the Trainer's own
``Trainer.log``, which appends them to ``state.log_history`` and calls every reporter's ``on_log``.
It finds the Trainer that is running it on the call stack when training begins (the Trainer
object is necessarily there), or use ``callback.attach(trainer)``.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.nn import functional as F

from ..data import iter_batches
from ..dynamics.monitor import Monitor
from ..dynamics.schedules import Schedule
from ..dynamics.trajectory import Snapshot, Trajectory
from ..errors import LossError
from ._common import RankShard, check_shardable, distributed_world, snapshot_metrics

__all__ = ["GSNRTrainerCallback", "model_loss", "LabelledBatches"]  # noqa: F822 - built on first access

INSTALL_HINT = "pip install 'gsnr-diag[transformers]'"
FAMILIES = ("ForCausalLM", "ForMaskedLM", "ForTokenClassification", "ForSequenceClassification")


def _family(model: Any) -> str | None:
    loss_type = getattr(model, "loss_type", None)
    if loss_type in FAMILIES:
        return loss_type
    if loss_type == "ForConditionalGeneration":
        return None  # encoder-decoder: labels are not the input sequence; pass loss_fn
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "ForCausalLM"
    return next((f for f in FAMILIES if name.endswith(f)), None)


def model_loss(model: Any) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """The model's own training loss as ``loss_fn(output, labels)``: the batch mean of per-sample losses.

    Per sample, as the model computes it for its head: causal LM — cross-entropy of the next token
    (logits shifted by one), masked LM and token classification — cross-entropy per token; each
    averaged over that sample's tokens with label ≠ −100 (the per-sample token mean); sequence
    classification — cross-entropy (one label), MSE (``num_labels == 1``, regression) or BCE with
    logits averaged over labels (``problem_type="multi_label_classification"``). The batch value
    is the mean over samples, so the per-sample gradients are those of each sequence's own mean
    loss. (The model's ``outputs.loss`` instead averages over all tokens of the batch at once, so
    longer sequences weigh more; the two agree when every sequence has as many labelled tokens.)
    A sample with no labelled token would have an undefined mean: refused with ``LossError``.
    """
    family = _family(model)
    if family is None:
        raise LossError(
            f"loss_fn: no default loss for {type(model).__name__}; pass loss_fn(output, labels) returning "
            "the batch mean of per-sample losses"
        )
    config = getattr(model, "config", None)

    def loss_fn(output: Any, labels: torch.Tensor) -> torch.Tensor:
        logits = output.logits if hasattr(output, "logits") else output[0]
        if family == "ForSequenceClassification":
            return _sequence_loss(logits, labels, config)
        if family == "ForCausalLM":
            logits, labels = logits[:, :-1], labels[:, 1:]
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none", ignore_index=-100
        ).reshape(labels.shape)
        valid = (labels != -100).sum(1)
        if bool((valid == 0).any()):
            raise LossError(
                "loss_fn: a sample has no labelled token (every label is -100), so its per-sample token mean "
                "loss is undefined; drop such samples from data"
            )
        return (per_token.sum(1) / valid).mean()

    return loss_fn


def _sequence_loss(logits: torch.Tensor, labels: torch.Tensor, config: Any) -> torch.Tensor:
    problem = getattr(config, "problem_type", None)
    num_labels = getattr(config, "num_labels", logits.shape[-1])
    if problem == "regression" or (problem is None and num_labels == 1):
        return F.mse_loss(logits.squeeze(-1).float(), labels.float().reshape(logits.shape[0], -1).squeeze(-1))
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels.reshape(-1))


class LabelledBatches:
    """``(inputs, labels)`` batches from Hugging Face style dict batches: ``label_key`` is taken out.

    ``data``: a dict of batched tensors (``{"input_ids": [n, T], "attention_mask": ..., "labels": ...}``),
    a ``Dataset`` of such dicts per sample (collated with ``collate_fn``, default PyTorch's), or any
    iterable of dict batches (e.g. a ``DataLoader`` with the Trainer's data collator). Chunked to
    ``batch_size`` samples.
    """

    def __init__(self, data: Any, *, label_key: str = "labels", batch_size: int | None = None, collate_fn=None):
        self.data, self.label_key, self.batch_size, self.collate_fn = data, label_key, batch_size, collate_fn

    def _dicts(self) -> Iterator[Mapping]:
        data = self.data
        if isinstance(data, Mapping):
            yield data
            return
        if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
            data = torch.utils.data.DataLoader(data, batch_size=self.batch_size or 32, collate_fn=self.collate_fn)
        yield from data

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self._dicts()):
            if not isinstance(batch, Mapping) or self.label_key not in batch:
                keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise LossError(f"data: batch {i} has no {self.label_key!r} entry (got {keys}); pass label_key=...")
            x = {k: v for k, v in batch.items() if k != self.label_key and isinstance(v, torch.Tensor)}
            yield from iter_batches((x, batch[self.label_key]), self.batch_size, None)


class _GSNRTrainerCallbackMixin:
    def __init__(
        self,
        data: Any,
        loss_fn: Callable | None = None,
        *,
        every: int | Schedule = 50,
        test_data: Any = None,
        path: str | os.PathLike[str] | None = None,
        batch_size: int | None = None,
        label_key: str = "labels",
        signs: bool = True,
        mode: str = "eval",
        log_layers: bool = True,
        prefix: str = "gsnr/",
    ):
        self.data = data
        self.loss_fn = loss_fn
        self.every = every
        self.test_data = test_data
        self.path = path
        self.batch_size = batch_size
        self.label_key = label_key
        self.signs = signs
        self.mode = mode
        self.log_layers = log_layers
        self.prefix = prefix
        self.monitor: Monitor | None = None
        self.trainer: Any = None
        self._last_step: int | None = None

    @property
    def trajectory(self) -> Trajectory:
        """The snapshots recorded so far."""
        return self.monitor.trajectory if self.monitor is not None else Trajectory()

    def attach(self, trainer: Any) -> Any:
        """Use ``trainer.log`` for the metrics (found automatically when training starts); returns ``trainer``."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return trainer

    def _find_trainer(self) -> Any:
        from transformers import Trainer

        frame = sys._getframe(1)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and self in candidate.callback_handler.callbacks:
                return candidate
            frame = frame.f_back
        return None

    def _make_monitor(self, model: Any) -> Monitor:
        rank, world = distributed_world()
        loss_fn = self.loss_fn if self.loss_fn is not None else model_loss(model)
        wrap = lambda d: None if d is None else LabelledBatches(d, label_key=self.label_key, batch_size=self.batch_size)
        data, test_data = wrap(self.data), wrap(self.test_data)
        if world > 1:
            check_shardable(self.data, world, self.batch_size, "data")
            data = RankShard(data, rank, world, None)
            test_data = None if test_data is None else RankShard(test_data, rank, world, None)
        classifier = self.loss_fn is None and _family(model) == "ForSequenceClassification"
        return Monitor(
            model,
            data,
            loss_fn,
            test_data=test_data,
            every=self.every,
            batch_size=self.batch_size,
            path=self.path if rank == 0 else None,
            signs=self.signs,
            # accuracies only where they mean something (one label per sequence)
            task="classification" if classifier else "regression",
            mode=self.mode,
            metadata={"integration": "transformers", "model": type(model).__name__, "world_size": world},
            distributed=world > 1,
        )

    def _record(self, state: Any, model: Any) -> Snapshot | None:
        step = int(state.global_step)
        if self.monitor is None:
            self.monitor = self._make_monitor(model)
        if step == self._last_step or not self.monitor.should_record(step):
            return None
        self._last_step = step
        snap = self.monitor.record(step, epoch=float(state.epoch or 0.0))
        if state.is_world_process_zero:
            metrics = snapshot_metrics(snap, self.monitor.last_stats, layers=self.log_layers, prefix=self.prefix)
            if self.trainer is not None:
                self.trainer.log(metrics)
            else:
                state.log_history.append({**metrics, "step": step})
        return snap

    # --- TrainerCallback events ---------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None:
            self.trainer = self._find_trainer()
            if self.trainer is None:
                warnings.warn(
                    "GSNRTrainerCallback: the running Trainer was not found, so GSNR metrics go to "
                    "state.log_history only; call callback.attach(trainer) to send them to the reporters",
                    stacklevel=2,
                )
        self._record(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(state, model)


_DOC = """Record GSNR snapshots of the Trainer's model on a schedule of optimizer steps (``state.global_step``).

    Args:
        data: the data measured at each snapshot: a dict of batched tensors, a ``Dataset`` of dict
            samples, or an iterable of dict batches (see :class:`LabelledBatches`); ``label_key`` is the
            target.
        loss_fn: ``loss_fn(model_output, labels)`` returning the batch mean of per-sample losses; default
            :func:`model_loss`, the model's own loss per sample (per-sample token mean for language models).
        every: every k optimizer steps or a schedule ``step -> bool``; step 0 at the start when due.
        test_data: optional held-out data (test loss, generalization gap).
        path: append each snapshot as a JSONL line there (main process only).
        batch_size: chunk size of the measurement (its memory bound).
        signs, mode: as for :class:`~gsnr_diag.Monitor`.
        log_layers: also log ``gsnr/layer/<parameter>`` per parameter tensor.
        prefix: the metric-name prefix.

    The metrics (``gsnr/mean_gsnr``, ``gsnr/osgr``, ``gsnr/same_sign``, ``gsnr/noise_scale``, per-layer
    values, losses) go through ``Trainer.log``, so every reporter in ``report_to`` (W&B, TensorBoard, ...)
    and ``state.log_history`` receive them. Under ``torch.distributed`` every rank measures its share and
    the moments are all-reduced; only the main process logs and writes ``path``.
    """


_CLASSES: dict[type, type] = {}


def __getattr__(name: str) -> Any:
    if name == "GSNRTrainerCallback":
        try:
            from transformers import TrainerCallback
        except ImportError as exc:
            raise ImportError(f"gsnr_diag.integrations.transformers needs transformers: {INSTALL_HINT}") from exc
        if TrainerCallback not in _CLASSES:
            _CLASSES[TrainerCallback] = type(
                "GSNRTrainerCallback",
                (_GSNRTrainerCallbackMixin, TrainerCallback),
                {"__module__": __name__, "__doc__": _DOC, "__qualname__": "GSNRTrainerCallback"},
            )
        return _CLASSES[TrainerCallback]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
