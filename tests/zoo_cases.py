"""The reference zoo: one tiny case per torch.nn layer type that owns parameters, and the comparison.

Each case wraps the layer as ``head(tanh(flatten(apply(layer, x))))`` with a Linear head to 3 classes, so
every layer is measured inside a model with a cross-entropy loss. A case can be forced onto each capture path
(``force_path``): ``moment-rule`` (no patch), ``grad-sampler`` (moment rules hidden), ``functorch`` (rules and
samplers hidden: the whole-model vmap fallback), ``loop`` (and vmap failing: the batch-of-one loop).

``compare`` measures the worst error of each statistic against the float64 batch-of-one loop of
tests/reference.py; the zoo tests and benchmarks/zoo_report.py both use it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

N = 10  # samples
BATCH = 4  # chunk size: three chunks, the Chan merge included
CLASSES = 3
PATHS = ("moment-rule", "grad-sampler", "functorch", "loop")

#: torch.nn.modules classes that own no parameters of their own (activations, pooling, padding, losses,
#: containers, dropout, ...) or are abstract bases whose concrete subclasses have cases.
ABSTRACT = {"Module", "Container", "RNNBase", "RNNCellBase"}


def module_classes() -> dict[str, type]:
    """Every public nn.Module subclass exported by torch.nn.modules."""
    mods = torch.nn.modules
    return {
        n: getattr(mods, n)
        for n in sorted(mods.__all__)
        if inspect.isclass(getattr(mods, n, None)) and issubclass(getattr(mods, n), nn.Module)
    }


# --- inputs --------------------------------------------------------------------------------------------
def _inputs(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if kind == "tokens":
        return torch.randint(0, 8, (N, 3), generator=g)
    shape = {
        "vec": (N, 4),
        "seq": (N, 5, 4),
        "img1d": (N, 2, 6),
        "img2d": (N, 2, 5, 5),
        "img3d": (N, 2, 3, 4, 4),
    }[kind]
    return torch.randn(*shape, generator=g, dtype=dtype)


def targets() -> torch.Tensor:
    return torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(8))


class ZooNet(nn.Module):
    """``head(tanh(flatten(apply(layer, x))))``."""

    def __init__(self, layer: nn.Module, apply, example: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.apply_fn = apply
        with torch.no_grad():
            width = apply(layer, example).flatten(1).shape[1]
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.apply_fn(self.layer, x).flatten(1)))


class WithParameterList(nn.Module):
    def __init__(self):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(4, 4) * 0.5), nn.Parameter(torch.randn(4) * 0.1)])

    def forward(self, x):
        return x @ self.ws[0] + self.ws[1]


class WithParameterDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.ws = nn.ParameterDict(
            {"w": nn.Parameter(torch.randn(4, 4) * 0.5), "b": nn.Parameter(torch.randn(4) * 0.1)}
        )

    def forward(self, x):
        return x @ self.ws["w"] + self.ws["b"]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _call(layer, x):
    return _first(layer(x))


def _last_step(layer, x):
    return layer(x)[0][:, -1]


def _self_attention(layer, x):
    return layer(x, x, x)[0]


def _with_memory(layer, x):
    return layer(x, x[:, :2])


def _bilinear(layer, x):
    return layer(x, x[:, :3])


def _log_prob(layer, x):
    return layer.log_prob(x)


def _batchnorm_stats(layer: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so eval mode differs from the identity."""
    g = torch.Generator().manual_seed(3)
    for name in ("running_mean", "running_var"):
        buf = getattr(layer, name, None)
        if isinstance(buf, torch.Tensor) and not isinstance(buf, nn.parameter.UninitializedBuffer):
            buf.copy_(torch.rand(buf.shape, generator=g) + (0.5 if name == "running_var" else -0.5))
    return layer


@dataclass
class Case:
    build: object  # () -> layer
    kind: str  # input kind
    apply: object = _call
    lazy: bool = False
    vmap: tuple = (torch.float32, torch.float64)  # dtypes torch.func.vmap can run it in (else: the loop)
    xfail: dict = field(default_factory=dict)  # path or "*" -> reason
    taken: dict = field(default_factory=dict)  # forced path -> a path the capture may rightly take instead
    slow: bool = False


def _tel(**kw):
    return dict(d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True, **kw)


CASES: dict[str, Case] = {
    "Linear": Case(lambda: nn.Linear(4, 5), "vec"),
    "Linear[out_features=1]": Case(lambda: nn.Linear(4, 1), "vec"),
    "Linear[in_features=1]": Case(lambda: nn.Linear(1, 3), "vec", apply=lambda m, x: m(x[:, :1])),
    "Bilinear": Case(lambda: nn.Bilinear(4, 3, 5), "vec", apply=_bilinear),
    "LazyLinear": Case(lambda: nn.LazyLinear(5), "vec", lazy=True),
    "Conv1d": Case(lambda: nn.Conv1d(2, 3, 3), "img1d"),
    "Conv2d": Case(lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2), "img2d"),
    "Conv3d": Case(lambda: nn.Conv3d(2, 3, (2, 3, 3)), "img3d"),
    "ConvTranspose1d": Case(lambda: nn.ConvTranspose1d(2, 3, 3), "img1d"),
    "ConvTranspose2d": Case(lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), "img2d"),
    "ConvTranspose3d": Case(lambda: nn.ConvTranspose3d(2, 3, (2, 2, 2)), "img3d"),
    "LazyConv1d": Case(lambda: nn.LazyConv1d(3, 3), "img1d", lazy=True),
    "LazyConv2d": Case(lambda: nn.LazyConv2d(3, 3), "img2d", lazy=True),
    "LazyConv3d": Case(lambda: nn.LazyConv3d(3, (2, 3, 3)), "img3d", lazy=True),
    "LazyConvTranspose1d": Case(lambda: nn.LazyConvTranspose1d(3, 3), "img1d", lazy=True),
    "LazyConvTranspose2d": Case(lambda: nn.LazyConvTranspose2d(3, 3), "img2d", lazy=True),
    "LazyConvTranspose3d": Case(lambda: nn.LazyConvTranspose3d(3, (2, 2, 2)), "img3d", lazy=True),
    "Embedding": Case(lambda: nn.Embedding(8, 4), "tokens"),
    # a sampler that gives the padding row a gradient (Opacus') is caught by the consistency check: fallback
    "Embedding[padding_idx]": Case(
        lambda: nn.Embedding(8, 4, padding_idx=0), "tokens", taken={"grad-sampler": "functorch"}
    ),
    "Embedding[sparse=True]": Case(lambda: nn.Embedding(8, 4, sparse=True), "tokens", vmap=()),
    "EmbeddingBag": Case(lambda: nn.EmbeddingBag(8, 4, mode="mean"), "tokens"),
    "BatchNorm1d": Case(lambda: _batchnorm_stats(nn.BatchNorm1d(4)), "vec"),
    "BatchNorm2d": Case(lambda: _batchnorm_stats(nn.BatchNorm2d(2)), "img2d"),
    "BatchNorm3d": Case(lambda: _batchnorm_stats(nn.BatchNorm3d(2)), "img3d"),
    "LazyBatchNorm1d": Case(lambda: nn.LazyBatchNorm1d(), "vec", lazy=True),
    "LazyBatchNorm2d": Case(lambda: nn.LazyBatchNorm2d(), "img2d", lazy=True),
    "LazyBatchNorm3d": Case(lambda: nn.LazyBatchNorm3d(), "img3d", lazy=True),
    "SyncBatchNorm": Case(lambda: _batchnorm_stats(nn.SyncBatchNorm(2)), "img2d"),
    "InstanceNorm1d": Case(lambda: nn.InstanceNorm1d(2, affine=True), "img1d"),
    "InstanceNorm2d": Case(lambda: nn.InstanceNorm2d(2, affine=True), "img2d"),
    "InstanceNorm3d": Case(lambda: nn.InstanceNorm3d(2, affine=True), "img3d"),
    # Lazy instance norms track running statistics (used in eval mode); Opacus' sampler normalizes with the
    # instance statistics, so the consistency check sends them to the fallback
    "LazyInstanceNorm1d": Case(
        lambda: nn.LazyInstanceNorm1d(affine=True), "img1d", lazy=True, taken={"grad-sampler": "functorch"}
    ),
    "LazyInstanceNorm2d": Case(
        lambda: nn.LazyInstanceNorm2d(affine=True), "img2d", lazy=True, taken={"grad-sampler": "functorch"}
    ),
    "LazyInstanceNorm3d": Case(
        lambda: nn.LazyInstanceNorm3d(affine=True), "img3d", lazy=True, taken={"grad-sampler": "functorch"}
    ),
    "GroupNorm": Case(lambda: nn.GroupNorm(1, 2), "img2d"),
    "LayerNorm": Case(lambda: nn.LayerNorm(4), "seq"),
    "RMSNorm": Case(lambda: nn.RMSNorm(4), "seq"),
    "PReLU": Case(lambda: nn.PReLU(2, init=0.1), "img1d"),
    "RNN": Case(lambda: nn.RNN(4, 5, batch_first=True), "seq", apply=_last_step, vmap=()),
    "LSTM": Case(lambda: nn.LSTM(4, 5, batch_first=True), "seq", apply=_last_step, vmap=(torch.float32,)),
    "GRU": Case(lambda: nn.GRU(4, 5, batch_first=True), "seq", apply=_last_step, vmap=()),
    "RNNCell": Case(lambda: nn.RNNCell(4, 5), "vec", vmap=()),
    "LSTMCell": Case(lambda: nn.LSTMCell(4, 5), "vec", vmap=()),
    "GRUCell": Case(lambda: nn.GRUCell(4, 5), "vec", vmap=()),
    "MultiheadAttention": Case(lambda: nn.MultiheadAttention(4, 2, batch_first=True), "seq", apply=_self_attention),
    "TransformerEncoderLayer": Case(lambda: nn.TransformerEncoderLayer(**_tel()), "seq"),
    "TransformerDecoderLayer": Case(lambda: nn.TransformerDecoderLayer(**_tel()), "seq", apply=_with_memory),
    "TransformerEncoder": Case(
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(**_tel()), 1, enable_nested_tensor=False), "seq"
    ),
    "TransformerDecoder": Case(
        lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(**_tel()), 1), "seq", apply=_with_memory
    ),
    "Transformer": Case(
        lambda: nn.Transformer(num_encoder_layers=1, num_decoder_layers=1, **_tel()), "seq", apply=_with_memory
    ),
    "AdaptiveLogSoftmaxWithLoss": Case(
        lambda: nn.AdaptiveLogSoftmaxWithLoss(4, 5, cutoffs=[2], div_value=2.0), "vec", apply=_log_prob
    ),
    # its Linear as a layer; used as the loss (its usual role) in test_zoo_extras.py
    "LinearCrossEntropyLoss": Case(
        lambda: nn.LinearCrossEntropyLoss(4, 5, bias=True), "vec", apply=lambda m, x: m.linear(x)
    ),
    "ParameterList": Case(WithParameterList, "vec"),
    "ParameterDict": Case(WithParameterDict, "vec"),
}


def case_class(name: str) -> str:
    return name.split("[")[0]


def build(name: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, x, y) of a case in ``dtype``, with fixed seeds."""
    case = CASES[name]
    torch.manual_seed(0)
    layer = case.build()
    x = _inputs(case.kind, dtype)
    if case.lazy:
        with torch.no_grad():
            case.apply(layer, x[:2].float() if x.is_floating_point() else x[:2])  # materialize the parameters
        if hasattr(layer, "running_mean"):
            _batchnorm_stats(layer)
    layer = layer.to(dtype)
    model = ZooNet(layer, case.apply, x[:2]).to(dtype).eval()
    return model, x, targets()


def layer_paths(name: str, model: nn.Module) -> list[str]:
    """The capture paths a case can take: a rule or sampler only where its layer type has one."""
    from gsnr_diag.capture import find_grad_sampler, find_moment_rule

    layer = model.layer
    paths = []
    if find_moment_rule(layer) is not None:
        paths.append("moment-rule")
    if find_grad_sampler(layer) is not None:
        paths.append("grad-sampler")
    return [*paths, "functorch", "loop"]


@contextlib.contextmanager
def force_path(path: str):
    """Make the capture take ``path`` for every layer that supports it (see the module docstring)."""
    from gsnr_diag.capture import capture as cap

    saved = (cap.find_moment_rule, cap.find_grad_sampler, cap.GradientCapture._per_sample_functorch)
    functional = cap.GradientCapture.FUNCTIONAL_LINEAR

    def no_vmap(self, *args, **kwargs):
        raise RuntimeError("vmap disabled by the zoo")

    try:
        if path in ("grad-sampler", "functorch", "loop"):
            cap.find_moment_rule = lambda layer: None
        if path in ("functorch", "loop"):
            cap.find_grad_sampler = lambda layer: None
            cap.GradientCapture.FUNCTIONAL_LINEAR = False  # a rule-less nn.Linear's F.linear call: no rule either
        if path == "loop":
            cap.GradientCapture._per_sample_functorch = no_vmap
        yield
    finally:
        cap.find_moment_rule, cap.find_grad_sampler, cap.GradientCapture._per_sample_functorch = saved
        cap.GradientCapture.FUNCTIONAL_LINEAR = functional


def expected_paths(name: str, path: str, dtype: torch.dtype) -> list[set[str]]:
    """The path sets the case's layer may take when ``path`` is forced."""
    vmap = lambda p: "loop" if p == "functorch" and dtype not in CASES[name].vmap else p
    options = [path, CASES[name].taken[path]] if path in CASES[name].taken else [path]
    return [{vmap(p)} for p in options]


def layer_path(stats, prefix: str = "layer") -> set[str]:
    """The paths taken by the case's layer and its submodules."""
    return {p for k, p in stats.capture_paths.items() if k == prefix or k.startswith(prefix + ".")}


# --- comparison ------------------------------------------------------------------------------------------
EPS = {torch.float64: float(np.finfo(np.float64).eps), torch.float32: float(np.finfo(np.float32).eps)}


def compare(got, ref, dtype: torch.dtype) -> dict:
    """Worst error of each statistic against the float64 reference (see benchmarks/zoo_report.py).

    Per parameter tensor, with s = max_j sqrt(ḡ_j² + ρ²_j) its per-sample gradient scale:
    mean: max|Δḡ| / s; var: max|Δρ²| / max ρ²; gsnr: max|Δr| / max r over the conditioned elements
    (reference ρ > 1000·eps·s: elements below are round-off level in this dtype, counted in ``roundoff``);
    same_sign: max |Δ| over conditioned elements with |ḡ| > 1000·eps·s; undefined: elements undefined in
    the reference but not in the result, plus conditioned elements undefined in the result.
    """
    eps = EPS[dtype]
    out = {"mean": 0.0, "var": 0.0, "gsnr": 0.0, "same_sign": 0.0, "undefined": 0, "roundoff": 0}
    for k in ref["mean"]:
        m_ref, v_ref = ref["mean"][k], ref["var"][k]
        m, v = got.mean[k].numpy(), got.var[k].numpy()
        r_ref, r = ref["gsnr"][k], got.gsnr[k].numpy()
        s_ref, s = ref["same_sign"][k], got.same_sign[k].numpy()
        scale = float(np.sqrt(np.max(m_ref**2 + v_ref))) if m_ref.size else 0.0
        if scale == 0.0:
            out["undefined"] += int(np.sum(~np.isnan(r)))
            continue
        out["mean"] = max(out["mean"], float(np.max(np.abs(m - m_ref))) / scale)
        vmax = float(np.max(v_ref))
        if vmax > 0:
            out["var"] = max(out["var"], float(np.max(np.abs(v - v_ref))) / vmax)
        cond = np.sqrt(np.maximum(v_ref, 0)) > 1e3 * eps * scale
        out["roundoff"] += int(np.sum(~cond & (v_ref > 0)))
        out["undefined"] += int(np.sum(np.isnan(r_ref) & ~np.isnan(r))) + int(np.sum(cond & np.isnan(r)))
        both = cond & ~np.isnan(r)
        if both.any():
            rmax = float(np.max(r_ref[both]))
            if rmax > 0:
                out["gsnr"] = max(out["gsnr"], float(np.max(np.abs(r[both] - r_ref[both]))) / rmax)
        sign = cond & (np.abs(m_ref) > 1e3 * eps * scale) & ~np.isnan(s_ref) & ~np.isnan(s)
        if sign.any():
            out["same_sign"] = max(out["same_sign"], float(np.max(np.abs(s[sign] - s_ref[sign]))))
    if not math.isfinite(out["gsnr"]):
        out["gsnr"] = float("inf")
    return out


#: Tolerances of the zoo tests: a few hundred roundings of the dtype, relative to the scales above.
TOLERANCE = {
    torch.float64: {"mean": 1e-10, "var": 1e-9, "gsnr": 1e-8, "same_sign": 1e-12},
    torch.float32: {"mean": 1e-5, "var": 1e-4, "gsnr": 1e-3, "same_sign": 1.0 / N + 1e-9},
}


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
