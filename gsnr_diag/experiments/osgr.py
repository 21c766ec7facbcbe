"""The one-step generalization ratio by definition (Sec. 2.4): eq. 23 measured vs eq. 19 predicted.

M copies of one initialization are trained with full-batch gradient descent, copy m on its own
training set D_m of n samples (disjoint), all tested on one shared test set D'. At each step t in
``record_at``:

* LHS (eq. 23): R_t = Σ_m (L'_{t+1}^(m) − L'_t^(m)) / Σ_m (L_{t+1}^(m) − L_t^(m));
* RHS (eq. 19 with the eq. 24 averages over the M sets):
  1 − Σ_j mean_m(ρ²_{m,j,t}) / (n · Σ_j mean_m(ḡ²_{m,j,t})), with ḡ and ρ² measured by
  :func:`~gsnr_diag.gradient_stats` on each D_m at θ_t^(m).

The M gradient-descent runs are vectorized: the parameters are stacked along a leading model
dimension (as ``torch.func.stack_module_state`` does for M modules; here the M copies share one
initialization) and one ``vmap(grad_and_value(functional_call(...)))`` call gives every model's
full-batch gradient and loss. ``vectorize=False`` runs the plain sequential loop (the reference,
and the fallback when a model cannot be vmapped).

Speed (benchmarks/osgr_vectorized.py): vmap turns a convolution with per-model weights into a
grouped convolution, whose backward pass is slow on CPU; on a shared 2-core CPU the vectorized
GD step of the paper's CNN (M = 10) measured 0.68× (n = 64, 1 thread) and 0.23× (n = 256,
2 threads) the speed of the sequential loop; MLPs gained only when each model's step is tiny
(10-32-3 MLP: 1.75× at n = 100, 0.79× at n = 1000; 784-100-10 at n = 64: 0.95×). So
``vectorize=None`` (the default) uses the loop for conv nets on CPU and vmap otherwise; the vmap
path is meant for accelerators, where M small models per step are launch-bound (not measured: no
GPU was lent).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from .._io import clean_float
from ..data import Inputs, call_model, tree_map
from ..dynamics.training import materialize
from ..errors import DataError
from ..measure import gradient_stats
from ..validate import check_loss_fn, check_model
from .control import build_seeded, check_classification, corrupt_labels
from .results import OSGRPool, OSGRResult, pool_osgr

__all__ = ["OSGRResult", "OSGRPool", "osgr_experiment", "osgr_lhs", "osgr_rhs", "pool_osgr"]


# ----------------------------------------------------------------------------- pure math
def osgr_lhs(
    train_before: Sequence[float],
    train_after: Sequence[float],
    test_before: Sequence[float],
    test_after: Sequence[float],
) -> float | None:
    """Eq. 23: Σ_m ΔL'_m / Σ_m ΔL_m over one step; ``None`` when the training loss did not change."""
    d_train = math.fsum(a - b for a, b in zip(train_after, train_before))
    d_test = math.fsum(a - b for a, b in zip(test_after, test_before))
    if d_train == 0 or not math.isfinite(d_train) or not math.isfinite(d_test):
        return None
    return d_test / d_train


def osgr_rhs(
    means: Sequence[dict[str, torch.Tensor]], variances: Sequence[dict[str, torch.Tensor]], n: int
) -> float | None:
    """Eq. 19 with eq. 24: 1 − Σ_j mean_m(ρ²_{m,j}) / (n · Σ_j mean_m(ḡ²_{m,j})).

    ``means[m]``/``variances[m]`` are the per-parameter ḡ and ρ² of model m on its own D_m.
    """
    if not means or len(means) != len(variances):
        raise DataError("osgr_rhs: expected one (mean, var) pair per model")
    M = len(means)
    signal = math.fsum(float(t.to(torch.float64).square().sum()) for m in means for t in m.values()) / M
    noise = math.fsum(float(t.to(torch.float64).sum()) for v in variances for t in v.values()) / M
    if signal <= 0 or not math.isfinite(signal) or not math.isfinite(noise):
        return None
    return 1.0 - noise / (n * signal)


# ----------------------------------------------------------------------------- the experiment
def _call_functional(model: nn.Module, params: dict[str, torch.Tensor], x: Inputs) -> Any:
    if isinstance(x, dict):
        return functional_call(model, params, (), x)
    if isinstance(x, (tuple, list)):
        return functional_call(model, params, tuple(x))
    return functional_call(model, params, (x,))


class _Vectorized:
    """M models as stacked parameters [M, *shape]; full-batch GD and losses with vmap."""

    def __init__(self, model0: nn.Module, M: int, loss_fn: Callable):
        self.model = model0
        self.loss_fn = loss_fn
        self.names = [k for k, p in model0.named_parameters() if p.requires_grad]
        self.fixed = {k: p.detach() for k, p in model0.named_parameters() if not p.requires_grad}
        self.fixed.update({k: b for k, b in model0.named_buffers()})
        self.params = {
            k: p.detach().unsqueeze(0).repeat(M, *([1] * p.ndim))
            for k, p in model0.named_parameters()
            if p.requires_grad
        }

        def loss_one(p, x, y):
            return loss_fn(_call_functional(model0, {**p, **self.fixed}, x), y)

        self._grad = vmap(grad_and_value(loss_one), randomness="different")
        self._loss = vmap(loss_one, randomness="different")
        self._test_loss = vmap(loss_one, in_dims=(0, None, None), randomness="different")

    def step(self, xs: Inputs, ys: torch.Tensor, lr: float) -> torch.Tensor:
        self.model.train()
        grads, losses = self._grad(self.params, xs, ys)
        self.params = {k: self.params[k] - lr * grads[k] for k in self.names}
        return losses

    def losses(self, xs: Inputs, ys: torch.Tensor, xt: Inputs, yt: torch.Tensor) -> tuple[list[float], list[float]]:
        self.model.eval()
        with torch.no_grad():
            train = self._loss(self.params, xs, ys)
            test = self._test_loss(self.params, xt, yt)
        return train.tolist(), test.tolist()

    def module(self, m: int) -> nn.Module:
        mod = copy.deepcopy(self.model)
        with torch.no_grad():
            for k, p in mod.named_parameters():
                if k in self.params:
                    p.copy_(self.params[k][m])
        return mod


class _Sequential:
    """The plain reference: M deep copies, one autograd backward each per step."""

    def __init__(self, model0: nn.Module, M: int, loss_fn: Callable):
        self.models = [copy.deepcopy(model0) for _ in range(M)]
        self.loss_fn = loss_fn

    def step(self, xs: Inputs, ys: torch.Tensor, lr: float) -> torch.Tensor:
        out = []
        for m, model in enumerate(self.models):
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            loss = self.loss_fn(call_model(model, _take(xs, m)), ys[m])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.copy_(p - lr * g)
            out.append(loss.detach())
        return torch.stack(out)

    def losses(self, xs: Inputs, ys: torch.Tensor, xt: Inputs, yt: torch.Tensor) -> tuple[list[float], list[float]]:
        train, test = [], []
        with torch.no_grad():
            for m, model in enumerate(self.models):
                model.eval()
                train.append(float(self.loss_fn(call_model(model, _take(xs, m)), ys[m])))
                test.append(float(self.loss_fn(call_model(model, xt), yt)))
        return train, test

    def module(self, m: int) -> nn.Module:
        return self.models[m]


def _take(x: Inputs, m: int) -> Inputs:
    return tree_map(lambda t: t[m], x)


def osgr_experiment(
    build_model: Callable[[], nn.Module],
    data: Any,
    loss_fn: Callable | None = None,
    *,
    n: int,
    M: int = 10,
    test_size: int,
    lr: float = 1e-3,
    epochs: int,
    record_at: Iterable[int],
    label_noise: float = 0.0,
    seed: int = 0,
    vectorize: bool | None = None,
    measure_batch_size: int | None = None,
) -> OSGRResult:
    """Measure OSGR by definition (eq. 23) and by GSNR (eq. 19/24) on M disjoint training sets.

    Args:
        build_model: ``() -> nn.Module``, called once under ``torch.manual_seed(seed)``; all M
            models start from these weights. Models with BatchNorm in train mode cannot be
            vmapped; such models fall back to the sequential loop (with a warning).
        data: a pool of at least ``M·n + test_size`` samples; split at random (``seed``) into M
            disjoint training sets of ``n`` and one shared test set of ``test_size``.
        n: samples per training set (the n of eq. 19).
        lr: the gradient-descent step λ; eq. 19 is a small-λ statement.
        epochs: the length of training in full-batch GD steps; every ``record_at`` value must be
            below it (training stops after the last step a record needs).
        record_at: steps t at which LHS (needs θ_t and θ_{t+1}) and RHS (at θ_t) are measured.
        label_noise: fraction p_random of the labels replaced by random classes, in every training
            set and in the test set alike (classification only): eq. 19 assumes D and D' are drawn
            from one distribution, so the noise defines that distribution.
        vectorize: ``True``: vmap over the M models; ``False``: the sequential reference loop;
            ``None`` (default): vmap, except for models with convolutions on CPU, where the
            grouped convolution vmap produces measured slower than the loop (module docstring).
        measure_batch_size: chunk size for :func:`~gsnr_diag.gradient_stats` (memory bound).
    """
    for name, v, lo in (("n", n, 2), ("M", M, 1), ("test_size", test_size, 1), ("epochs", epochs, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise DataError(f"{name}: expected an int >= {lo}, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise DataError(f"lr: expected a positive number, got {lr!r}")
    record = sorted({int(t) for t in record_at})
    if not record:
        raise DataError("record_at: expected at least one step")
    if record[0] < 0 or record[-1] >= epochs:
        raise DataError(f"record_at: every step must be in [0, epochs-1] = [0, {epochs - 1}], got {record}")
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    check_loss_fn(loss_fn)

    X, Y = materialize(data)
    N = int(Y.shape[0])
    if M * n + test_size > N:
        raise DataError(
            f"data: {N} samples, but M·n + test_size = {M}·{n} + {test_size} = {M * n + test_size} are needed "
            "(M disjoint training sets and one test set)"
        )
    if label_noise and not (0 <= label_noise <= 1):
        raise DataError(f"label_noise: expected a fraction in [0, 1], got {label_noise!r}")
    if label_noise:
        check_classification(Y, "osgr_experiment(label_noise>0)")

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)
    model0 = build_seeded(build_model, seed)
    check_model(model0, "build_model()")
    device = next((p.device for p in model0.parameters()), torch.device("cpu"))
    train_idx = perm[: M * n].reshape(M, n)
    test_idx = perm[M * n : M * n + test_size]
    xs = tree_map(lambda t: t[train_idx].to(device), X)  # [M, n, ...]
    ys = Y[train_idx].clone()
    if label_noise:
        for m in range(M):
            ys[m] = corrupt_labels(ys[m], label_noise, torch.Generator().manual_seed(seed + 1 + m))
    ys = ys.to(device)
    xt = tree_map(lambda t: t[test_idx].to(device), X)
    yt = Y[test_idx].clone()
    if label_noise:  # eq. 19 needs D and D' from one distribution: the test labels get the same noise
        yt = corrupt_labels(yt, label_noise, torch.Generator().manual_seed(seed + 1 + M))
    yt = yt.to(device)

    if vectorize is None:
        has_conv = any(isinstance(mod, nn.modules.conv._ConvNd) for mod in model0.modules())
        vectorize = not (device.type == "cpu" and has_conv)
    runner: _Vectorized | _Sequential
    used_vmap = False
    if vectorize:
        try:
            runner = _Vectorized(model0, M, loss_fn)
            with torch.random.fork_rng(devices=[]):
                runner.losses(xs, ys, xt, yt)  # probe: can this model and loss be vmapped?
                runner.model.train()
                runner._grad(runner.params, xs, ys)
            used_vmap = True
        except Exception as exc:  # vmap refuses some models: fall back, loudly
            warnings.warn(
                f"osgr_experiment: cannot vmap the model ({exc}); using the sequential loop",
                RuntimeWarning,
                stacklevel=2,
            )
            runner = _Sequential(model0, M, loss_fn)
    else:
        runner = _Sequential(model0, M, loss_fn)

    need = set(record) | {t + 1 for t in record}
    losses: dict[int, tuple[list[float], list[float]]] = {}
    rhs: dict[int, float | None] = {}
    rhs_single: dict[int, float | None] = {}
    start = time.perf_counter()
    measure_s = 0.0
    for t in range(record[-1] + 2):
        if t in need:
            losses[t] = runner.losses(xs, ys, xt, yt)
        if t in record:
            t0 = time.perf_counter()
            means, variances, single = [], [], []
            for m in range(M):
                st = gradient_stats(
                    runner.module(m), (_take(xs, m), ys[m]), loss_fn, batch_size=measure_batch_size, signs=False
                )
                means.append(st.mean)
                variances.append(st.var)
                single.append(st.osgr)
            rhs[t] = osgr_rhs(means, variances, n)
            ok = [s for s in single if s is not None]
            rhs_single[t] = sum(ok) / len(ok) if ok else None
            measure_s += time.perf_counter() - t0
        if t == record[-1] + 1:
            break
        step_losses = runner.step(xs, ys, lr)
        if not bool(torch.isfinite(step_losses).all()):
            raise DataError(f"osgr_experiment: the training loss became non-finite at step {t}; lr={lr} is too large")

    lhs = [osgr_lhs(losses[t][0], losses[t + 1][0], losses[t][1], losses[t + 1][1]) for t in record]
    settings = {
        "n": n,
        "M": M,
        "test_size": test_size,
        "lr": lr,
        "epochs": epochs,
        "record_at": record,
        "label_noise": label_noise,
        "seed": seed,
        "model": type(model0).__name__,
        "param_count": sum(p.numel() for p in model0.parameters() if p.requires_grad),
        "loss": type(loss_fn).__name__,
        "algorithm": "full-batch GD",
        "vectorized": used_vmap,
        "seconds": round(time.perf_counter() - start, 3),
        "measure_seconds": round(measure_s, 3),
    }
    mean = lambda xs_: clean_float(sum(xs_) / len(xs_))
    return OSGRResult(
        epochs=record,
        lhs=lhs,
        rhs=[rhs[t] for t in record],
        settings=settings,
        train_loss=[mean(losses[t][0]) for t in record],
        test_loss=[mean(losses[t][1]) for t in record],
        rhs_single=[rhs_single[t] for t in record],
    )
