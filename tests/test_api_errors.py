"""Mistakes made from Python get a GsnrDiagError naming the argument and what to pass, before any work.

One test per case: each checks the exception class and the start of the message, and that the message
says what to pass instead (not a bare torch/Python error from deep inside a measurement).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gsnr_diag import gradient_stats, shuffled_label_control, train
from gsnr_diag.dynamics.monitor import Monitor
from gsnr_diag.errors import ArgumentError, DataError, GsnrDiagError, LossError, ModelError


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g), torch.arange(16) % 2


def batches(x, y):
    yield x[:8], y[:8]
    yield x[8:], y[8:]


# ------------------------------------------------------------------------------------------ device


def test_device_cuda_without_a_gpu(xy, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ArgumentError, match=r"^device='cuda': this PyTorch build \(.*\) has no CUDA support; pass "):
        gradient_stats(mlp(), xy, device="cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # a CUDA build on a machine without a visible GPU
    with pytest.raises(ArgumentError, match=r"^device='cuda:0': no CUDA GPU is visible .* pass device='cpu'"):
        gradient_stats(mlp(), xy, device="cuda:0")


def test_device_cuda_index_beyond_the_visible_gpus(xy, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        ArgumentError, match=r"^device='cuda:3': only 1 CUDA device\(s\) are visible \(cuda:0 to cuda:0\)"
    ):
        gradient_stats(mlp(), xy, device="cuda:3")


def test_device_meta_and_unknown_names(xy):
    with pytest.raises(ArgumentError, match=r"^device='meta': meta tensors hold no values.*pass device='cpu'"):
        gradient_stats(mlp(), xy, device="meta")
    with pytest.raises(ArgumentError, match=r"^device='gpu': not a torch device .*pass e\.g\. 'cpu', 'cuda'"):
        gradient_stats(mlp(), xy, device="gpu")


# ------------------------------------------------------------------------------------------- model


def test_meta_device_model(xy):
    model = mlp().to("meta")
    pattern = r"^model: its tensors are on the meta device \('0\.weight' .*model\.to_empty\(device='cpu'\)"
    with pytest.raises(ModelError, match=pattern):
        gradient_stats(model, xy)
    with pytest.raises(ModelError, match=pattern):
        train(model, xy, epochs=1, lr=0.1, progress=False)
    with pytest.raises(ModelError, match=pattern):
        Monitor(model, xy)


# ----------------------------------------------------------------------------------------- settings


def test_distributed_without_a_process_group(xy):
    assert not torch.distributed.is_initialized()
    with pytest.raises(ArgumentError, match=r"^distributed=True: no process group is initialized; call .*init_process"):
        gradient_stats(mlp(), xy, distributed=True)
    with pytest.raises(ArgumentError, match=r"^process_group: given with distributed=False"):
        gradient_stats(mlp(), xy, process_group=object())
    with pytest.raises(ArgumentError, match=r"^distributed: expected True or False, got 'yes'"):
        gradient_stats(mlp(), xy, distributed="yes")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 0, -1.0, True, "512"])
def test_max_memory_mb_not_finite_or_not_positive(xy, value):
    with pytest.raises(ArgumentError, match=r"^max_memory_mb: expected a finite positive number of megabytes"):
        gradient_stats(mlp(), xy, max_memory_mb=value)


@pytest.mark.parametrize("value", ["0.1", math.nan, math.inf, -1e-3, torch.tensor(0.1)])
def test_epsilon_not_a_finite_non_negative_number(xy, value):
    with pytest.raises(ArgumentError, match=r"^epsilon: expected a finite number >= 0") as info:
        gradient_stats(mlp(), xy, epsilon=value)
    if isinstance(value, str):
        assert "(a str: pass a number, not its text)" in str(info.value)


def test_valid_settings_still_pass(xy):
    stats = gradient_stats(mlp(), xy, epsilon=np.float64(1e-8), max_memory_mb=np.float32(64.0), distributed=False)
    assert stats.n == 16


# ------------------------------------------------------------------------------------------- loss


def test_loss_class_instead_of_an_instance(xy):
    pattern = r"^loss_fn: got the class nn\.CrossEntropyLoss, not a loss function; pass an instance: "
    pattern += r"loss_fn=nn\.CrossEntropyLoss\(\)"
    with pytest.raises(LossError, match=pattern):
        gradient_stats(mlp(), xy, nn.CrossEntropyLoss)
    with pytest.raises(LossError, match=pattern):
        train(mlp(), xy, nn.CrossEntropyLoss, epochs=1, lr=0.1, progress=False)
    with pytest.raises(LossError, match=pattern):
        Monitor(mlp(), xy, nn.CrossEntropyLoss)
    with pytest.raises(LossError, match=pattern):
        shuffled_label_control(mlp, xy, nn.CrossEntropyLoss, epochs=1, lr=0.1, progress=False)


# ------------------------------------------------------------------------------------------- data


def test_numpy_data_says_to_convert(xy):
    x, y = (t.numpy() for t in xy)
    advice = r"torch\.as_tensor\(X, dtype=torch\.float32\), torch\.as_tensor\(Y\)"
    with pytest.raises(DataError, match=r"^data: \(X, Y\) holds arrays that are not torch tensors \(X is a numpy"):
        gradient_stats(mlp(), (x, y))
    with pytest.raises(DataError, match=r"^data: got a numpy\.ndarray of shape \(16, 4\); .*" + advice):
        gradient_stats(mlp(), x)
    with pytest.raises(DataError, match=r"^data: batch 0 is a numpy\.ndarray of shape \(16, 4\); expected a pair"):
        gradient_stats(mlp(), [x])
    with pytest.raises(DataError, match=r"^data: the input x of batch 0 is a numpy\.ndarray of shape .*" + advice):
        gradient_stats(mlp(), [(x, y)])


def test_dict_data_says_what_to_pass(xy):
    x, y = xy
    with pytest.raises(DataError, match=r"^data: got a dict with keys \['x', 'y'\]; split it into \(inputs, targets\)"):
        gradient_stats(mlp(), {"x": x, "y": y})
    with pytest.raises(
        DataError, match=r"^data: batch 0 is a dict with keys \['input', 'labels'\]; split it into"
    ) as e:
        gradient_stats(mlp(), [{"input": x, "labels": y}])
    assert "batch['labels']" in str(e.value)


def test_exhausted_generator(xy):
    gen = batches(*xy)
    assert gradient_stats(mlp(), gen).n == 16  # a fresh generator is read once: fine
    with pytest.raises(DataError, match=r"^data: the generator yielded no batches: .* can be read only once, and this"):
        gradient_stats(mlp(), gen)


def test_generator_where_the_data_is_read_again(xy):
    with pytest.raises(DataError, match=r"^data: a generator can be read only once, but the monitor measures it"):
        Monitor(mlp(), batches(*xy))
    with pytest.raises(DataError, match=r"^test_data: a generator can be read only once, but the monitor evaluates"):
        Monitor(mlp(), xy, test_data=batches(*xy))
    with pytest.raises(DataError, match=r"^data: a generator can be read only once, but full-batch training"):
        train(mlp(), batches(*xy), epochs=2, lr=0.1, progress=False)
    # mini-batch training gathers the data once: a generator is fine there
    train(mlp(), batches(*xy), epochs=1, lr=0.1, batch_size=4, progress=False)


# -------------------------------------------------------------------------------------- optimizer


def test_optimizer_that_owns_none_of_the_parameters(xy):
    model, other = mlp(), mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArgumentError, match=r"^optimizer: it updates none of the model's 4 trainable parameter"):
        train(model, xy, epochs=1, lr=0.1, optimizer=torch.optim.SGD(other.parameters(), lr=0.1), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ArgumentError, match=r"^optimizer: expected a torch\.optim\.Optimizer .*got str"):
        train(model, xy, epochs=1, lr=0.1, optimizer="sgd", progress=False)

    def elsewhere(params):
        return torch.optim.SGD(mlp().parameters(), lr=0.1)

    with pytest.raises(ArgumentError, match=r"^make_optimizer\(params\): it updates none of the model's"):
        shuffled_label_control(mlp, xy, epochs=1, lr=0.1, make_optimizer=elsewhere, progress=False)
    # an optimizer over part of the model (a frozen-body fine-tune) is fine
    train(model, xy, epochs=1, lr=0.1, optimizer=torch.optim.SGD(model[2].parameters(), lr=0.1), progress=False)


def test_every_error_here_is_a_gsnr_diag_error():
    for cls in (ArgumentError, DataError, LossError, ModelError):
        assert issubclass(cls, GsnrDiagError) and issubclass(cls, ValueError)
