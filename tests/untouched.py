"""The state of a model that gradient_stats must leave exactly as it was."""

from __future__ import annotations

import torch


def model_state(model):
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "modes": {k: m.training for k, m in model.named_modules()},
        "hooks": {
            k: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for k, m in model.named_modules()
        },
        "attrs": {k: sorted(vars(m)) for k, m in model.named_modules()},
        "param_attrs": {k: sorted(vars(p)) for k, p in model.named_parameters()},
        # which tensor object sits in every parameter/buffer slot of every module (a module reachable
        # under two names included)
        "slots": [
            (k, kind, name, id(t))
            for k, m in model.named_modules(remove_duplicate=False)
            for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items()
        ],
    }


def assert_same_state(before, after):
    for k in before["params"]:
        assert torch.equal(before["params"][k], after["params"][k]), k
    assert before["requires_grad"] == after["requires_grad"]
    for k in before["buffers"]:
        assert torch.equal(before["buffers"][k], after["buffers"][k]), k
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None) == (h is None), k
        if g is not None:
            assert torch.equal(g, h), k
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert before["attrs"] == after["attrs"]
    assert before["param_attrs"] == after["param_attrs"]
    assert before["slots"] == after["slots"]


def rng_state():
    import random

    import numpy as np

    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def assert_same_rng(before):
    import numpy as np

    now = rng_state()
    assert torch.equal(before[0], now[0])
    assert before[1] == now[1]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(before[2], now[2]))


def assert_backward_reaches(model, x, loss_fn):
    """An ordinary backward after the measurement still fills .grad of every trainable parameter."""
    saved = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    out = model(*x) if isinstance(x, tuple) else model(x)
    loss_fn(out).backward()
    missing = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for k, p in model.named_parameters():
        p.grad = saved[k]
    assert not missing, f"backward no longer reaches {missing}"
