"""Models, data and methods shared by the benchmark scripts (not part of the test suite).

Every method does the same job on one batch: the per-sample gradients' Σg, Σg² (float64)
and, where it says so, the per-element positive/negative sign counts that gsnr-diag needs.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

NUM_CLASSES = 10


# --- models -------------------------------------------------------------------------------------
def paper_cnn(p: int = 16) -> nn.Module:
    """MNIST CNN after the paper's Table 2: conv 5×5 (p channels), max-pool, conv 5×5 (p), max-pool, FC."""
    return nn.Sequential(
        nn.Conv2d(1, p, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(p, p, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(p * 7 * 7, NUM_CLASSES),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, NUM_CLASSES))


class SequenceModel(nn.Module):
    """Embedding (vocabulary 5000, dim 64, padding_idx 0) + per-token Linear(64→128) + ReLU + mean pooling + FC."""

    def __init__(self, vocab: int = 5000, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.proj = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, tokens):
        return self.out(torch.relu(self.proj(self.emb(tokens))).mean(1))


class TransformerModel(nn.Module):
    """One nn.TransformerEncoderLayer (d_model 64, 4 heads, feed-forward 128, no dropout) + mean pooling + FC."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(dim, 4, 128, dropout=0.0, batch_first=True)
        self.out = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        return self.out(self.encoder(x).mean(1))


SEQ_LEN = 32


def make(model_name: str, batch: int, seed: int = 0):
    """(model, X, Y) with synthetic data of the model's input shape (float32, eval mode)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if model_name == "cnn":
        model, X = paper_cnn(), torch.randn(batch, 1, 28, 28, generator=g)
    elif model_name == "mlp":
        model, X = mlp(), torch.randn(batch, 784, generator=g)
    elif model_name == "sequence":
        model = SequenceModel()
        X = torch.randint(1, 5000, (batch, SEQ_LEN), generator=g)
        lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (batch,), generator=g)
        X[torch.arange(SEQ_LEN).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # padding
    elif model_name == "transformer":
        model, X = TransformerModel(), torch.randn(batch, SEQ_LEN, 64, generator=g)
    else:
        raise ValueError(model_name)
    Y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return model.eval(), X, Y


# --- the common reduction ------------------------------------------------------------------------
def reduce_samples(g: torch.Tensor, signs: bool = True):
    """Σg, Σg² (float64) and sign counts of per-sample gradients g [B, *shape]."""
    g64 = g.detach().to(torch.float64)
    out = [g64.sum(0), g64.square().sum(0)]
    if signs:
        out += [(g > 0).sum(0), (g < 0).sum(0)]
    return out


# --- methods: each returns step() doing one batch --------------------------------------------------
def method_plain(model, X, Y, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        torch.autograd.grad(loss_fn(model(X), Y), params)

    return step


def method_gsnr(model, X, Y, loss_fn, signs=True, fresh=False):
    """gsnr-diag's per-chunk work: hooks, one backward, moment rules, merge into the float64 Moments.

    ``fresh=False``: every step is one more chunk of a long call (a data set of many batches),
    merged into the same accumulators (Chan's formula). ``fresh=True``: every step starts new
    accumulators (a call on a single batch; the accumulators are allocated every time).
    """
    from gsnr_diag.capture import GradientCapture
    from gsnr_diag.core.moments import Moments

    cap = GradientCapture(model, loss_fn, signs=signs).__enter__()
    moments = Moments(signs=signs)

    def step():
        cap.measure_chunk(X, Y, Moments(signs=signs) if fresh else moments)

    step.capture = cap
    return step


def method_gsnr_e2e(model, X, Y, loss_fn, signs=True):
    """gradient_stats() end to end on one batch (adds data handling, state restore, GradientStats)."""
    from gsnr_diag import gradient_stats

    def step():
        gradient_stats(model, (X, Y), loss_fn, batch_size=int(Y.shape[0]), signs=signs)

    return step


def method_opacus(model, X, Y, loss_fn):
    from opacus import GradSampleModule

    m = copy.deepcopy(model).train()  # Opacus' hooks capture only in train mode (no dropout/BN here)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(m, loss_reduction="mean")
    params = [p for p in m.parameters() if p.requires_grad]

    def step():
        loss = loss_fn(gsm(X), Y)
        loss.backward()
        for p in params:
            reduce_samples(p.grad_sample)
            p.grad_sample = None
            p.grad = None

    return step


def method_functorch(model, X, Y, loss_fn):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, x, y):
        return loss_fn(functional_call(model, (p, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step():
        for g in per_sample(params, X, Y).values():
            reduce_samples(g)

    return step


def _backpack_model(model):
    from backpack import extend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = extend(copy.deepcopy(model))
        lf = extend(nn.CrossEntropyLoss())
    return m, lf


def method_backpack(model, X, Y, loss_fn):
    """BackPACK BatchGrad (per-sample gradients) + the common reduction."""
    from backpack import backpack
    from backpack.extensions import BatchGrad

    m, lf = _backpack_model(model)
    params = [p for p in m.parameters() if p.requires_grad]
    B = int(Y.shape[0])

    def step():
        loss = lf(m(X), Y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with backpack(BatchGrad()):
                loss.backward()
        for p in params:
            if not hasattr(p, "grad_batch"):
                raise RuntimeError(f"BackPACK has no BatchGrad for a parameter of shape {tuple(p.shape)}")
            reduce_samples(p.grad_batch * B)
            del p.grad_batch
            p.grad = None

    return step


def method_backpack_sgs(model, X, Y, loss_fn):
    """BackPACK SumGradSquared: Σg² (and Σg from .grad) only — no sign counts."""
    from backpack import backpack
    from backpack.extensions import SumGradSquared

    m, lf = _backpack_model(model)
    params = [p for p in m.parameters() if p.requires_grad]

    def step():
        loss = lf(m(X), Y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with backpack(SumGradSquared()):
                loss.backward()
        for p in params:
            if not hasattr(p, "sum_grad_squared"):
                raise RuntimeError(f"BackPACK has no SumGradSquared for a parameter of shape {tuple(p.shape)}")
            p.sum_grad_squared.to(torch.float64)
            p.grad.to(torch.float64)
            del p.sum_grad_squared
            p.grad = None

    return step


def method_loop(model, X, Y, loss_fn):
    """Batch-of-one loop, accumulating Σg, Σg², sign counts in float64 as it goes."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        acc = None
        for i in range(int(Y.shape[0])):
            gs = torch.autograd.grad(loss_fn(model(X[i : i + 1]), Y[i : i + 1]), params)
            parts = [reduce_samples(g.unsqueeze(0)) for g in gs]
            acc = parts if acc is None else [[a + b for a, b in zip(pa, pb)] for pa, pb in zip(acc, parts)]

    return step


METHODS = {
    "plain": method_plain,
    "gsnr-diag": method_gsnr,
    "gsnr-diag signs=False": lambda *a: method_gsnr(*a, signs=False),
    "gsnr-diag one batch": lambda *a: method_gsnr(*a, fresh=True),
    "gsnr-diag gradient_stats()": method_gsnr_e2e,
    "opacus": method_opacus,
    "torch.func": method_functorch,
    "backpack BatchGrad": method_backpack,
    "backpack SumGradSquared (no signs)": method_backpack_sgs,
    "loop": method_loop,
}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except Exception:
        return "?"
