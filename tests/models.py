"""Small test models covering every capture path (shared by the core tests)."""

from __future__ import annotations

import torch
from torch import nn


class BareParameter(nn.Module):
    """A custom module with its own bare nn.Parameter (no Opacus grad sampler)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 3) * 0.5)
        self.b = nn.Parameter(torch.randn(3) * 0.1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.w + self.b))


class TiedLM(nn.Module):
    """Embedding tied to the output projection (the same Parameter in two modules)."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(self.emb(x).mean(1))))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.shared(torch.relu(self.shared(x))))


class EmbeddingLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.token = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.token(self.norm(self.emb(x)))).mean(1))


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x1, x2, scale=None):
        h = torch.relu(self.a(x1) + self.b(x2))
        return self.head(h if scale is None else h * scale)


class KeywordInputs(TwoInputs):
    def forward(self, image, extra):  # type: ignore[override]
        return super().forward(image, extra)


class TimeFirst(nn.Module):
    """A token layer fed [T, B, E] (sequence-first), the layout per-layer samplers cannot see through."""

    def __init__(self):
        super().__init__()
        self.token = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x: [B, T, 4]
        return self.head(torch.relu(self.token(x.transpose(0, 1))).mean(0))


class FoldedBatch(nn.Module):
    """A layer applied to [B·k, d]: the batch folded with another dimension."""

    def __init__(self):
        super().__init__()
        self.part = nn.Linear(4, 5)
        self.head = nn.Linear(15, 3)

    def forward(self, x):  # x: [B, 3, 4]
        b = x.shape[0]
        return self.head(torch.tanh(self.part(x.reshape(b * 3, 4))).reshape(b, 15))


class ReusedFunctionally(nn.Module):
    """A module's weight also used outside the module (F.linear on it)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        return self.head(h + nn.functional.linear(h, self.inner.weight))


class Recurrent(nn.Module):
    """nn.LSTM: no grad sampler, and vmap cannot run it, so the batch-of-one loop."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


def conv1d():
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 10, 3))


def batchnorm_cnn():
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )
    m.train()
    with torch.no_grad():  # give the running statistics non-trivial values
        for _ in range(3):
            m(torch.randn(16, 1, 8, 8) * 2 + 0.5)
    m.eval()
    return m


def frozen_first_layer():
    m = mlp()
    m[0].weight.requires_grad_(False)
    m[0].bias.requires_grad_(False)
    return m


def cases():
    """name -> (model factory, X, Y) with fixed seeds; X, Y small."""
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g)
    ri = lambda hi, *s: torch.randint(0, hi, s, generator=g)
    tokens = ri(10, 24, 5)
    tokens[:3, :2] = 0  # padding tokens
    return {
        "mlp": (mlp, rn(24, 6), ri(3, 24)),
        "cnn": (cnn, rn(24, 1, 8, 8), ri(3, 24)),
        "conv1d": (conv1d, rn(24, 2, 10), ri(3, 24)),
        "embedding_layernorm": (EmbeddingLayerNorm, tokens, ri(3, 24)),
        "self_attention": (SelfAttention, ri(10, 24, 5), ri(3, 24)),
        "batchnorm_cnn": (batchnorm_cnn, rn(24, 1, 8, 8), ri(3, 24)),
        "bare_parameter": (BareParameter, rn(24, 5), ri(2, 24)),
        "frozen_layer": (frozen_first_layer, rn(24, 6), ri(3, 24)),
        "tied_weights": (TiedLM, ri(11, 24, 4), ri(11, 24)),
        "called_twice": (CalledTwice, rn(24, 4), ri(3, 24)),
        "time_first": (TimeFirst, rn(24, 7, 4), ri(3, 24)),  # T = 7 = the chunk size 7 of the tests
        "folded_batch": (FoldedBatch, rn(24, 3, 4), ri(3, 24)),
        "reused_functionally": (ReusedFunctionally, rn(24, 4), ri(3, 24)),
        "recurrent": (Recurrent, rn(24, 5, 4), ri(3, 24)),
    }
