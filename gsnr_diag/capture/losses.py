"""Per-sample losses ℓ_i for eq. 1 when ``loss_fn`` is not a plain batch mean of them.

The capture needs ``loss_fn(output, y) = (1/B) Σ_i ℓ_i`` with ℓ_i the loss of sample i alone. Three common
losses are not that, and would silently give wrong per-sample gradients; they are decomposed exactly:

* ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` with ``reduction="mean"``: PyTorch divides by the total weight
  W = Σ_i W_i of the counted targets (W_i = Σ_t w[y_it] over the targets t of sample i that are not
  ``ignore_index``; w = 1 without ``weight=``). So ℓ_i = Σ_t w[y_it]·l_it (``reduction='none'``) and the
  per-sample gradient of the user's objective L = Σ_i ℓ_i / W is g_i = (n/W)·∇ℓ_i: then ḡ = (1/n) Σ_i g_i = ∇L
  exactly, the gradient of ``loss_fn`` on the whole data set at once, independent of how it is chunked.
  Samples whose every target is ignored contribute nothing to L and are excluded from n; a sample of class
  weight 0 stays in n (its gradient is 0, unless label smoothing gives it one). Probability targets are
  divided by the number of targets (no weights, no ignore_index), so W_i is that count.
* ``reduction="sum"`` (any ``torch.nn`` loss): ℓ_i is the loss of sample i alone, the value ``loss_fn``
  gives on a batch of one; the capture sees ``loss_fn(output, y) / B``. With ``ignore_index``, samples whose
  targets are all ignored are excluded from n.
* any other ``loss_fn`` is checked once per call (:func:`check_batch_mean`): on the probe batch its value must
  equal the mean of its values on each sample alone, else :class:`~gsnr_diag.errors.LossError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.moments import Moments
from ..data import Inputs, tensor_leaves, tree_map
from ..errors import LossError

PYTORCH_IGNORE_INDEX = -100


class LossPlan:
    """``loss_fn`` as the capture calls it, which samples count, and the final scale n/W of the gradients.

    Callable like a loss: ``plan(output, y)`` is the batch mean (1/B) Σ_i ℓ_i of the per-sample losses.
    """

    def __init__(self, loss_fn: Callable):
        self.user_loss = loss_fn
        self.kind = "batch-mean"  # or "class-index" (CrossEntropy/NLL decomposed), "sum"
        self.total_weight = 0.0  # Σ_i W_i over the kept samples
        self.kept = 0
        self.excluded = 0  # samples whose every target is ignored
        standard = getattr(type(loss_fn), "forward", None) in (nn.CrossEntropyLoss.forward, nn.NLLLoss.forward)
        reduction = getattr(loss_fn, "reduction", None)
        if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and standard and reduction in ("mean", "sum"):
            self.kind = "class-index"
        elif isinstance(loss_fn, nn.modules.loss._Loss) and reduction == "sum":
            self.kind = "sum"

    def __call__(self, output: Any, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "class-index":
            if not isinstance(output, torch.Tensor):
                raise LossError(f"loss_fn: {type(self.user_loss).__name__} needs a tensor model output")
            return self.per_sample(output, y).sum() / int(y.shape[0])
        if self.kind == "sum":
            return self.user_loss(output, y) / int(y.shape[0])
        return self.user_loss(output, y)

    def check_batch(self, output: Any, y: torch.Tensor) -> None:
        """Once per call, on the probe batch: the capture's loss is the batch mean of per-sample losses."""
        if self.kind == "class-index" and isinstance(output, torch.Tensor):
            self._check_decomposition(output, y)
        else:
            check_batch_mean(self, output, y)

    # --- which samples count ------------------------------------------------------------
    def _sample_weights(self, y: torch.Tensor) -> torch.Tensor:
        """W_i per sample (float64): the total class weight of its counted targets (PyTorch's mean divides by ΣW_i)."""
        lf = self.user_loss
        batch = int(y.shape[0])
        if y.is_floating_point():  # class probabilities [B, C, d...]: divided by B·Πd, no ignore_index
            per_sample = y[0].numel() // y.shape[1] if y.ndim > 1 else 1
            return torch.full((batch,), float(per_sample), dtype=torch.float64, device=y.device)
        w = (y != lf.ignore_index).to(torch.float64)
        if lf.weight is not None:
            w = w * lf.weight.to(device=y.device, dtype=torch.float64)[y.clamp(0, lf.weight.numel() - 1)]
        return w.reshape(batch, -1).sum(1)

    def _counted(self, y: torch.Tensor) -> torch.Tensor:
        """Samples with at least one target that is not ``ignore_index`` (the others are not in the loss)."""
        if y.is_floating_point():
            return torch.ones(int(y.shape[0]), dtype=torch.bool, device=y.device)
        return (y != self.user_loss.ignore_index).reshape(int(y.shape[0]), -1).any(1)

    def select(self, x: Inputs, y: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        """The samples of a chunk that count (all but fully ignored ones); accumulates Σ W_i."""
        if self.kind != "class-index":
            if not y.is_floating_point() and not y.is_complex() and bool((y == PYTORCH_IGNORE_INDEX).any()):
                raise LossError(
                    f"loss_fn: the targets hold {PYTORCH_IGNORE_INDEX} (PyTorch's default ignore_index); a loss "
                    "that ignores them in its batch mean is not the mean of per-sample losses, and its "
                    "statistics would depend on batch_size. Pass nn.CrossEntropyLoss() or nn.NLLLoss() itself "
                    "(gsnr-diag then excludes the ignored samples from n), or drop those samples"
                )
            return x, y
        w = self._sample_weights(y)
        keep = self._counted(y)
        self.total_weight += float(w.sum())
        self.kept += int(keep.sum())
        self.excluded += int(y.shape[0]) - int(keep.sum())
        if bool(keep.all()):
            return x, y
        idx = keep.nonzero().flatten()
        return tree_map(lambda t: t[idx.to(t.device)], x), y[idx.to(y.device)]

    # --- the decomposed loss --------------------------------------------------------------
    def per_sample(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_i, one per sample: Σ_t w[y_it]·l_it of ``loss_fn`` with ``reduction='none'``."""
        lf = self.user_loss
        if isinstance(lf, nn.CrossEntropyLoss):
            per = F.cross_entropy(
                output,
                y,
                weight=lf.weight,
                ignore_index=lf.ignore_index,
                reduction="none",
                label_smoothing=lf.label_smoothing,
            )
        else:
            per = F.nll_loss(output, y, weight=lf.weight, ignore_index=lf.ignore_index, reduction="none")
        return per.reshape(int(y.shape[0]), -1).sum(1)

    def _check_decomposition(self, output: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            per = self.per_sample(output, y)
            expected = float(self.user_loss(output, y))
            total = float(per.sum())
            got = total if self.user_loss.reduction == "sum" else total / float(self._sample_weights(y).sum())
        if not math.isclose(got, expected, rel_tol=_rtol(per.dtype), abs_tol=1e-30) and math.isfinite(expected):
            raise LossError(
                f"loss_fn: {type(self.user_loss).__name__} gave {expected:.8g} on a chunk but its per-sample "
                f"decomposition gives {got:.8g}; gsnr-diag cannot measure this loss exactly. Pass a loss_fn "
                "that returns the plain batch mean of per-sample losses"
            )

    # --- after the last chunk -------------------------------------------------------------
    def finish(self, moments: Moments, *, skipped: int = 0, distributed: bool = False, group: Any = None) -> None:
        """Scale the moments by n/W (eq. 1 for a weighted mean; see the module docstring)."""
        if self.kind != "class-index" or self.user_loss.reduction != "mean":
            return
        kept, total = float(self.kept), self.total_weight
        if distributed:
            import torch.distributed as dist

            t = torch.tensor([kept, total], dtype=torch.float64, device=next(iter(moments.mean.values())).device)
            dist.all_reduce(t, group=group)
            kept, total = float(t[0]), float(t[1])
        if kept == total or total <= 0:
            return
        if skipped:
            raise LossError(
                "loss_fn: a weighted mean loss (W ≠ n) with skip_nonfinite=True and skipped samples: the "
                "weight of the skipped samples is not known, so the gradients cannot be scaled by n/W exactly"
            )
        scale = kept / total
        for k in moments.mean:
            moments.mean[k].mul_(scale)
            moments.m2[k].mul_(scale * scale)


def _rtol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


def check_batch_mean(loss_fn: Callable, output: Any, y: torch.Tensor) -> None:
    """Raise LossError unless ``loss_fn(output, y)`` equals the mean of its values on each sample alone.

    Run once per call on the layout probe's batch. Outputs without the samples in dimension 0 cannot be
    split into samples and are not checked.
    """
    n = int(y.shape[0])
    leaves = tensor_leaves(output)
    if n < 2 or not leaves or any(t.ndim == 0 or t.shape[0] != n for t in leaves):
        return
    with torch.no_grad():
        try:
            batch = float(loss_fn(output, y))
        except Exception:
            return  # the measurement itself reports a loss_fn that fails on a batch
        try:
            each = [float(loss_fn(tree_map(lambda t: t[i : i + 1], output), y[i : i + 1])) for i in range(n)]
        except Exception as exc:
            raise LossError(
                f"loss_fn: could not be evaluated on the output of a single sample ({type(exc).__name__}: {exc}); "
                "per-sample gradients (eq. 1) need the loss of one sample alone"
            ) from exc
    if not all(map(math.isfinite, [batch, *each])):
        return  # a non-finite loss is the measurement's to report (NonFiniteGradientError or skip_nonfinite)
    mean = sum(each) / n
    scale = sum(abs(v) for v in each) / n + abs(batch)
    if abs(batch - mean) <= _rtol(leaves[0].dtype) * scale + 1e-30:
        return
    raise LossError(
        f"loss_fn: on {n} samples it returned {batch:.8g}, but the mean of its values on each sample alone is "
        f"{mean:.8g}: it is not the batch mean of per-sample losses, so per-sample gradients (eq. 1) would be "
        "wrong. Use reduction='mean' (a sum is n times the mean; or pass a torch.nn loss with reduction='sum', "
        "which gsnr-diag handles); for class weights or ignored targets pass nn.CrossEntropyLoss(weight=..., "
        "ignore_index=...) or nn.NLLLoss(...) itself, which gsnr-diag decomposes exactly; a loss that mixes "
        "samples has no per-sample gradient"
    )
