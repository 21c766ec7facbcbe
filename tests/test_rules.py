"""Every moment rule (gsnr_diag/rules.py) against the float64 batch-of-one loop in tests/reference.py.

Each case is a small float64 model whose layer under test must take the ``moment-rule`` path;
mean, variance, GSNR and same-sign fraction of every parameter are compared element-wise
(relative tolerance 1e-5, as the core tests). Also: blocking by ``max_memory_mb`` changes
nothing, a weight used outside its module leaves the rule path and stays exact, the sign
counts' integer products, and float32 precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import reference_stats
from torch import nn

from gsnr_diag import gradient_stats
from gsnr_diag.capture import blocks as rules

RTOL = 1e-5
N = 20
C = 3


def _close(actual, expected, rtol=RTOL, what=""):
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, what
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}: undefined elements differ"
    if not a.size or np.all(np.isnan(b)):
        return
    scale = max(float(np.nanmax(np.abs(b))), 1e-300)
    err = float(np.nanmax(np.abs(a - b)))
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol} x {scale:.3e}"


class Head(nn.Module):
    """layer → activation → flatten (or mean over a sequence) → Linear to C classes."""

    def __init__(self, layer, width, act=nn.Tanh(), pool=None):
        super().__init__()
        self.layer, self.act, self.pool = layer, act, pool
        self.out = nn.LazyLinear(C)

    def forward(self, x):
        h = self.act(self.layer(x))
        h = h.mean(self.pool) if self.pool is not None else h
        return self.out(h.flatten(1))


def _build(layer, x, act=nn.Tanh(), pool=None, seed=0):
    torch.manual_seed(seed)
    model = Head(layer, None, act, pool)
    with torch.no_grad():
        model(x[:2].float() if x.is_floating_point() else x[:2])  # materialize the LazyLinear
    return model.double()


def _compare(model, x, y, rule_modules, *, rtol=RTOL, **kw):
    loss_fn = nn.CrossEntropyLoss()
    ref = reference_stats(model, x, y, loss_fn)
    got = gradient_stats(model, (x, y), loss_fn, **kw)
    for m in rule_modules:
        assert got.capture_paths[m] == "moment-rule", got.capture_paths
    for k in ref["mean"]:
        _close(got.mean[k], ref["mean"][k], rtol, f"mean[{k}]")
        _close(got.var[k], ref["var"][k], rtol, f"var[{k}]")
        defined = ref["var"][k] > 1e-24 * max(1.0, float(np.nanmax(ref["var"][k])))
        _close(got.gsnr[k].numpy()[defined], ref["gsnr"][k][defined], rtol, f"gsnr[{k}]")
        same = got.same_sign[k].numpy()
        trusted = defined & (np.abs(ref["mean"][k]) > 1e-12 * max(1e-300, np.abs(ref["mean"][k]).max()))
        _close(same[trusted], ref["same_sign"][k][trusted], rtol, f"same_sign[{k}]")
    assert got.osgr == pytest.approx(ref["osgr"], rel=10 * rtol)
    return got


def _labels(seed=3):
    return torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(seed))


def _randn(*shape, seed=2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- nn.Linear ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_linear_2d(bias):
    x = _randn(N, 6)
    model = _build(nn.Linear(6, 7, bias=bias), x)
    _compare(model, x, _labels(), ["layer", "out"])


def test_linear_2d_relu_inputs_and_dead_units():
    # non-negative inputs, exact zeros in inputs and backprops (ReLU), a dead input column
    x = _randn(N, 6).relu()
    x[:, 2] = 0
    model = _build(nn.Linear(6, 8), x, act=nn.ReLU())
    _compare(model, x, _labels(), ["layer", "out"])


@pytest.mark.parametrize("shape", [(N, 5, 6), (N, 2, 3, 6), (N, 1, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_extra_dims(shape, bias):
    x = _randn(*shape)
    model = _build(nn.Linear(6, 4, bias=bias), x)
    _compare(model, x, _labels(), ["layer", "out"])


def test_linear_sequence_pooled():
    x = _randn(N, 7, 5)
    model = _build(nn.Linear(5, 4), x, act=nn.ReLU(), pool=1)
    _compare(model, x, _labels(), ["layer"])


# --- convolutions ------------------------------------------------------------------------------
CONVS = {
    "conv1d_stride_dilation_groups": (
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        (N, 4, 11),
    ),
    "conv1d_same_circular_nobias": (
        lambda: nn.Conv1d(4, 6, 4, padding="same", padding_mode="circular", bias=False),
        (N, 4, 9),
    ),
    "conv1d_valid": (lambda: nn.Conv1d(3, 2, 5, padding="valid"), (N, 3, 8)),
    "conv2d_rect_stride_pad_dilation": (
        lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        (N, 3, 7, 6),
    ),
    "conv2d_depthwise_same_reflect": (
        lambda: nn.Conv2d(4, 4, 3, groups=4, padding="same", padding_mode="reflect"),
        (N, 4, 5, 5),
    ),
    "conv2d_groups_nobias": (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False), (N, 4, 6, 5)),
    "conv2d_replicate_stride": (
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="replicate"),
        (N, 2, 6, 6),
    ),
    "conv3d": (
        lambda: nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=1, dilation=(2, 1, 1), groups=2),
        (N, 2, 4, 5, 3),
    ),
    "conv3d_nobias_same": (lambda: nn.Conv3d(1, 2, 3, padding="same", bias=False), (N, 1, 3, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv(name):
    make, shape = CONVS[name]
    x = _randn(*shape)
    model = _build(make(), x)
    _compare(model, x, _labels(), ["layer"])


def test_conv_relu_maxpool_cnn():
    """The paper's CNN shape in miniature: conv, ReLU, max-pool (exact zeros), conv, max-pool, FC."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, C),
    ).double()
    x = _randn(N, 1, 8, 8)
    _compare(model, x, _labels(), ["0", "3", "7"])


# --- nn.Embedding ------------------------------------------------------------------------------
def _tokens(shape, vocab, seed=5):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
def test_embedding_repeated_tokens_and_padding(padding_idx):
    tokens = _tokens((N, 9), 6)  # 9 tokens over a vocabulary of 6: every sample repeats some
    tokens[:, -2:] = 0  # trailing "padding"
    tokens[0] = 0  # a sample made only of token 0
    emb = nn.Embedding(7, 4, padding_idx=padding_idx)  # row 6 is never used: zero gradient
    model = _build(emb, tokens, act=nn.Tanh(), pool=1)
    _compare(model, tokens, _labels(), ["layer"])


def test_embedding_3d_index_and_1d_index():
    tokens = _tokens((N, 2, 4), 5)
    model = _build(nn.Embedding(5, 3), tokens, act=nn.Identity(), pool=(1, 2))
    _compare(model, tokens, _labels(), ["layer"])
    tokens = _tokens((N,), 5)
    model = _build(nn.Embedding(5, 3), tokens, act=nn.Tanh())
    _compare(model, tokens, _labels(), ["layer"])


class SeqModel(nn.Module):
    """Embedding + per-token Linear + LayerNorm + mean pooling: the benchmark's sequence model."""

    def __init__(self, vocab=13, dim=4, hidden=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.proj = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, C)

    def forward(self, tokens):
        return self.out(self.norm(torch.relu(self.proj(self.emb(tokens)))).mean(1))


def test_sequence_model_all_rules():
    torch.manual_seed(0)
    model = SeqModel().double()
    tokens = _tokens((N, 8), 13)
    _compare(model, tokens, _labels(), ["emb", "proj", "norm", "out"])


# --- normalization layers ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind", ["layernorm", "layernorm_nobias", "layernorm_2d_shape", "groupnorm", "rmsnorm", "batchnorm_eval"]
)
def test_norms(kind):
    if kind.startswith("layernorm"):
        x = _randn(N, 3, 6)
        layer = nn.LayerNorm((3, 6) if kind == "layernorm_2d_shape" else 6, bias=kind != "layernorm_nobias")
    elif kind == "groupnorm":
        x = _randn(N, 4, 3, 3)
        layer = nn.GroupNorm(2, 4)
    elif kind == "rmsnorm":
        if not hasattr(nn, "RMSNorm"):
            pytest.skip("torch without nn.RMSNorm")
        x = _randn(N, 3, 6)
        layer = nn.RMSNorm(6)
    else:
        x = _randn(N, 4, 3)
        layer = nn.BatchNorm1d(4)
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial affine parameters
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    model = _build(layer, x)
    _compare(model, x, _labels(), ["layer"])


# --- machinery ---------------------------------------------------------------------------------
def test_blocking_by_max_memory_changes_nothing():
    """A budget of a few kilobytes forces blocks of one or two samples in every rule."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.LayerNorm(6), nn.Linear(6, C)
    ).double()
    x = _randn(N, 2, 6, 6)
    y = _labels()
    tiny = _compare(model, x, y, ["0", "3", "4", "5"], max_memory_mb=0.002)
    big = gradient_stats(model, (x, y), max_memory_mb=4096)
    for k in big.mean:
        _close(tiny.var[k], big.var[k], 1e-10, k)
    seq = SeqModel().double()
    tokens = _tokens((N, 8), 13)
    _compare(seq, tokens, y, ["emb", "proj"], max_memory_mb=0.0005)


def test_max_memory_mb_validated():
    from gsnr_diag.errors import GsnrDiagError

    x = _randn(N, 6)
    with pytest.raises(GsnrDiagError, match="max_memory_mb"):
        gradient_stats(_build(nn.Linear(6, 3), x), (x, _labels()), max_memory_mb=0)


class UsedOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, C)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = h + x @ self.fc.weight  # the weight again, outside the module's forward
        return self.out(h)


def test_weight_used_outside_its_module_leaves_the_rule_path():
    torch.manual_seed(0)
    model = UsedOutside().double()
    x = _randn(N, 4)
    got = _compare(model, x, _labels(), [])  # one chunk: the whole-model vmap measures every parameter
    assert got.capture_paths["fc"] in ("functorch", "loop")


def test_sign_count_products_int8_and_float_agree():
    d = torch.randn(300, 17)
    a = torch.randn(300, 9).relu()
    d[d.abs() < 0.3] = 0
    g = d.unsqueeze(2) * a.unsqueeze(1)
    want_pos, want_neg = (g > 0).sum(0).double(), (g < 0).sum(0).double()
    saved, faster = dict(rules._INT8_MM_OK), dict(rules._INT8_MM_FASTER)
    try:
        for ok in (True, False):
            rules._INT8_MM_OK["cpu"] = rules._INT8_MM_FASTER["cpu"] = ok
            pos, neg = rules.sign_counts_outer(d, a)
            assert torch.equal(pos, want_pos) and torch.equal(neg, want_neg)
    finally:
        rules._INT8_MM_OK.clear()
        rules._INT8_MM_OK.update(saved)
        rules._INT8_MM_FASTER.clear()
        rules._INT8_MM_FASTER.update(faster)


def test_float32_model_close_to_float64_reference():
    """float32 products (the fast path for float32 models) against the float64 loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, C))
    x = _randn(N, 8)
    ref = reference_stats(model.double(), x, _labels(), nn.CrossEntropyLoss())
    got = gradient_stats(model.float(), (x.float(), _labels()))
    for k in ref["mean"]:
        _close(got.mean[k], ref["mean"][k], 1e-4, k)
        _close(got.var[k], ref["var"][k], 1e-4, k)
        assert np.array_equal(got.same_sign[k].isnan().numpy(), np.isnan(ref["same_sign"][k]))
