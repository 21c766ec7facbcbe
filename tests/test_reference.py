"""Every statistic against an independent float64 batch-of-one loop (tests/reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from models import cases
from reference import reference_stats
from torch import nn
from torch.nn import functional as F

from gsnr_diag import gradient_stats

CASES = cases()
RTOL = 1e-5


def _close(actual, expected, rtol=RTOL, what=""):
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    scale = max(np.nanmax(np.abs(b)) if b.size and not np.all(np.isnan(b)) else 0.0, 1e-300)
    assert a.shape == b.shape, what
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}: undefined elements differ"
    err = np.nanmax(np.abs(a - b)) if a.size and not np.all(np.isnan(a)) else 0.0
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol} x {scale:.3e}"


def _float64(name):
    build, X, Y = CASES[name]
    torch.manual_seed(1)
    model = build().double()
    if X.is_floating_point():
        X = X.double()
    return model, X, Y


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch_size", [7, None])
def test_statistics_match_batch_of_one_loop(name, batch_size):
    model, X, Y = _float64(name)
    loss_fn = nn.CrossEntropyLoss()
    ref = reference_stats(model, X, Y, loss_fn)
    got = gradient_stats(model, (X, Y), loss_fn, batch_size=batch_size)
    assert got.n == X.shape[0]
    assert set(got.mean) == set(ref["mean"])
    # Elements whose true gradient is identically 0 but whose computed gradient is rounding
    # noise (the key bias of attention: softmax is invariant to it) have meaningless GSNR.
    noise_floor = 1e-24
    for k in ref["mean"]:
        _close(got.mean[k], ref["mean"][k], what=f"{name} mean[{k}]")
        _close(got.var[k], ref["var"][k], what=f"{name} var[{k}]")
        defined = ref["var"][k] > noise_floor * max(1.0, float(np.nanmax(ref["var"][k])))
        _close(got.gsnr[k].numpy()[defined], ref["gsnr"][k][defined], what=f"{name} gsnr[{k}]")
        same = got.same_sign[k].numpy()
        trusted = defined & (np.abs(ref["mean"][k]) > 1e-12 * max(1e-300, np.abs(ref["mean"][k]).max()))
        _close(same[trusted], ref["same_sign"][k][trusted], what=f"{name} same_sign[{k}]")
    if name != "self_attention":  # see the noise floor above; aggregates include every element
        assert got.mean_gsnr == pytest.approx(ref["mean_gsnr"], rel=RTOL)
        assert got.gsnr_quantiles["median"] == pytest.approx(ref["median"], rel=RTOL)
        assert got.gsnr_quantiles["p90"] == pytest.approx(ref["p90"], rel=RTOL)
        assert got.undefined == ref["undefined"]
        assert got.mean_same_sign == pytest.approx(ref["mean_same_sign"], rel=RTOL)
        for k, v in ref["layer_gsnr"].items():
            assert got.layer_gsnr[k] == pytest.approx(v, rel=RTOL) if v is not None else got.layer_gsnr[k] is None
    assert got.osgr == pytest.approx(ref["osgr"], rel=RTOL)
    assert got.opposite_sign == pytest.approx(ref["opposite_sign"], rel=RTOL)
    assert got.opposite_sign_top10 == pytest.approx(ref["opposite_sign_top10"], rel=RTOL)


def test_capture_paths_recorded():
    paths = {}
    for name in sorted(CASES):
        model, X, Y = _float64(name)
        paths[name] = gradient_stats(model, (X, Y), batch_size=8).capture_paths
    assert paths["bare_parameter"][""] in ("functorch", "loop")
    assert paths["self_attention"]["encoder.self_attn"] == "moment-rule"
    assert paths["mlp"]["0"] == "moment-rule"
    # layouts the per-layer paths cannot handle are detected and go to the fallback
    assert paths["time_first"]["token"] in ("functorch", "loop")
    assert paths["folded_batch"]["part"] in ("functorch", "loop")
    assert paths["reused_functionally"]["inner"] in ("functorch", "loop")
    assert paths["recurrent"]["rnn"] == "loop"
    for name, p in paths.items():
        assert p, name
        assert set(p.values()) <= {"moment-rule", "grad-sampler", "functorch", "loop"}, (name, p)


def test_float32_model_close_to_float64_reference():
    build, X, Y = CASES["cnn"]
    torch.manual_seed(1)
    model = build()
    ref = reference_stats(model, X.double(), Y, nn.CrossEntropyLoss())  # the reference copies to float64
    got = gradient_stats(model, (X, Y), batch_size=5)
    for k in ref["mean"]:
        _close(got.mean[k], ref["mean"][k], rtol=1e-5, what=k)
        _close(got.var[k], ref["var"][k], rtol=1e-4, what=k)
    assert got.mean_gsnr == pytest.approx(ref["mean_gsnr"], rel=1e-3)


def test_mse_regression_and_extra_output_dims():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(20, 3, dtype=torch.float64)
    Y = torch.randn(20, 2, dtype=torch.float64)
    ref = reference_stats(model, X, Y, F.mse_loss)
    got = gradient_stats(model, (X, Y), F.mse_loss, batch_size=6)
    for k in ref["mean"]:
        _close(got.var[k], ref["var"][k], what=k)
    assert got.mean_gsnr == pytest.approx(ref["mean_gsnr"], rel=RTOL)


def test_tuple_and_dict_inputs():
    from models import KeywordInputs, TwoInputs

    torch.manual_seed(0)
    x1, x2 = torch.randn(18, 3, dtype=torch.float64), torch.randn(18, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (18,))
    model = TwoInputs().double()
    ref = reference_stats(model, (x1, x2), y, nn.CrossEntropyLoss())
    batches = [((x1[i : i + 5], x2[i : i + 5]), y[i : i + 5]) for i in range(0, 18, 5)]
    got = gradient_stats(model, batches)
    for k in ref["mean"]:
        _close(got.var[k], ref["var"][k], what=k)
    kw_model = KeywordInputs().double()
    kw_model.load_state_dict(model.state_dict())
    got_kw = gradient_stats(kw_model, [({"image": x1, "extra": x2}, y)], batch_size=4)
    for k in ref["mean"]:
        _close(got_kw.var[k], ref["var"][k], what=k)


def test_dead_units_are_undefined_and_excluded():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].bias[0] = -1e6  # unit 0 never fires: its gradients are exactly 0 for every sample
    X = torch.randn(16, 4, dtype=torch.float64)
    Y = torch.randint(0, 2, (16,))
    got = gradient_stats(model, (X, Y))
    assert torch.isnan(got.gsnr["0.weight"][0]).all()
    assert torch.isnan(got.same_sign["0.weight"][0]).all()
    assert got.undefined >= 4 + 1 + 2  # row 0 of W1, b1[0], column 0 of W2
    ref = reference_stats(model, X, Y, nn.CrossEntropyLoss())
    assert got.undefined == ref["undefined"]
    assert got.mean_gsnr == pytest.approx(ref["mean_gsnr"], rel=RTOL)
    assert math.isfinite(got.mean_gsnr)


def test_epsilon_only_when_asked():
    model = nn.Sequential(nn.Linear(4, 2)).double()
    X = torch.randn(10, 4, dtype=torch.float64)
    Y = torch.randint(0, 2, (10,))
    plain = gradient_stats(model, (X, Y))
    eps = gradient_stats(model, (X, Y), epsilon=1e-3)
    k = "0.weight"
    torch.testing.assert_close(eps.gsnr[k], plain.mean[k] ** 2 / (plain.var[k] + 1e-3))


@pytest.mark.parametrize("batch_size", [1, 5, 24])
def test_opacus_loss_reduction_scaling(batch_size):
    """Opacus samplers get backprops of the batch-mean loss; rescaled by the chunk size they give each
    sample's own gradient: so Σ_i g_i / n equals the full-batch gradient for every chunking, including
    a smaller last chunk, and per-sample variances match the reference (checked above)."""
    build, X, Y = CASES["called_twice"]  # a Linear called twice always goes through Opacus' sampler
    torch.manual_seed(3)
    model = build().double()
    X = X.double()
    s = gradient_stats(model, (X, Y), batch_size=batch_size)
    assert s.capture_paths["shared"] == "grad-sampler"
    loss = nn.CrossEntropyLoss()(model(X), Y)
    full = dict(zip([k for k, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    for k, g in full.items():
        torch.testing.assert_close(s.mean[k], g, rtol=1e-10, atol=1e-14)
    ref = reference_stats(model, X, Y, nn.CrossEntropyLoss())
    _close(s.var["shared.weight"], ref["var"]["shared.weight"], what="shared var")
