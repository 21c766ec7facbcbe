"""The reference zoo: every torch.nn layer type that owns parameters, in float32 and float64, on every
capture path it can take, against the float64 batch-of-one loop (tests/zoo_cases.py has the cases)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from reference import reference_stats
from torch import nn
from untouched import assert_same_rng, assert_same_state, model_state, rng_state
from zoo_cases import (
    ABSTRACT,
    BATCH,
    CASES,
    PATHS,
    TOLERANCE,
    build,
    case_class,
    compare,
    expected_paths,
    force_path,
    layer_path,
    layer_paths,
    module_classes,
)

from gsnr_diag import gradient_stats

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _owns_parameters(cls) -> bool | None:
    """Whether a default-constructed instance owns parameters (None: it needs constructor arguments)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(list(cls().parameters()))
        except Exception:
            return None


#: Layer types without parameters of their own that need constructor arguments (so they cannot be checked
#: by construction): pooling, padding, shuffles, folds, unflatten, threshold, local response norms.
PARAMETER_FREE_WITH_ARGUMENTS = {
    *(f"{k}{d}d" for k in ("AdaptiveAvgPool", "AdaptiveMaxPool", "AvgPool", "MaxPool", "LPPool") for d in (1, 2, 3)),
    *(f"{k}{d}d" for k in ("MaxUnpool", "CircularPad", "ConstantPad", "ReflectionPad", "ReplicationPad", "ZeroPad")
      for d in (1, 2, 3)),
    "FractionalMaxPool2d", "FractionalMaxPool3d", "ChannelShuffle", "PixelShuffle", "PixelUnshuffle", "Fold",
    "Unfold", "Unflatten", "Threshold", "LocalResponseNorm", "CrossMapLRN2d",
}  # fmt: skip


def test_every_layer_type_with_parameters_has_a_case():
    covered = {case_class(n) for n in CASES}
    missing, unknown = [], []
    for name, cls in module_classes().items():
        if name in covered or name in ABSTRACT:
            continue
        owns = _owns_parameters(cls)
        if owns is None and name not in PARAMETER_FREE_WITH_ARGUMENTS:
            unknown.append(name)
        elif owns:
            missing.append(name)
    assert not missing, f"torch.nn layer types with parameters and no zoo case: {missing}"
    assert not unknown, (
        f"new torch.nn module types {unknown}: add a zoo case (tests/zoo_cases.py) if they own parameters, "
        "else list them in PARAMETER_FREE_WITH_ARGUMENTS"
    )
    stale = PARAMETER_FREE_WITH_ARGUMENTS - set(module_classes())
    assert not stale, f"listed but no longer in torch.nn.modules: {stale}"


@functools.cache
def _reference(name: str, dtype_name: str):
    model, x, y = build(name, DTYPES[dtype_name])
    return reference_stats(model, x, y, nn.CrossEntropyLoss())  # on a float64 copy of these weights


def _params():
    out = []
    for name, case in CASES.items():
        model, _, _ = build(name, torch.float64)
        for path in layer_paths(name, model):
            for dtype_name in DTYPES:
                marks = []
                reason = case.xfail.get(path) or case.xfail.get("*")
                if reason:
                    marks.append(pytest.mark.xfail(reason=reason, strict=False))
                if case.slow:
                    marks.append(pytest.mark.slow)
                out.append(pytest.param(name, path, dtype_name, marks=marks, id=f"{name}-{path}-{dtype_name}"))
    return out


@pytest.mark.parametrize("name, path, dtype_name", _params())
def test_zoo(name, path, dtype_name):
    dtype = DTYPES[dtype_name]
    model, x, y = build(name, dtype)
    ref = _reference(name, dtype_name)
    before, rng = model_state(model), rng_state()
    with force_path(path):
        got = gradient_stats(model, (x, y), nn.CrossEntropyLoss(), batch_size=BATCH)
    assert_same_state(before, model_state(model))
    assert_same_rng(rng)
    assert layer_path(got) in expected_paths(name, path, dtype), got.capture_paths
    assert got.n == x.shape[0]
    err = compare(got, ref, dtype)
    tol = TOLERANCE[dtype]
    assert err["undefined"] == 0, err
    for stat, limit in tol.items():
        assert err[stat] <= limit, f"{stat}: {err[stat]:.3e} > {limit:.1e} ({err})"


def test_paths_cover_all_four():
    seen = {p for name in CASES for p in layer_paths(name, build(name, torch.float64)[0])}
    assert seen == set(PATHS)
