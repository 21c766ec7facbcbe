"""nn.MultiheadAttention's moment rule and transformer encoders, against the float64 batch-of-one loop."""

from __future__ import annotations

import pytest
import torch
from fastpath_compare import compare
from torch import nn

N, T, S, E, H, C = 6, 5, 4, 8, 2, 3


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _y(seed=2):
    return torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(seed))


def _padding(seed=3, length=T):
    lengths = torch.randint(2, length + 1, (N,), generator=torch.Generator().manual_seed(seed))
    return torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)  # True = padding


class Attend(nn.Module):
    def __init__(self, batch_first=True, kind="self", mask=None, **kw):
        super().__init__()
        self.batch_first, self.kind, self.mask = batch_first, kind, mask
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw)
        self.out = nn.Linear(E, C)

    def forward(self, x, mem, pad):
        kw = {}
        if self.mask == "padding":
            kw["key_padding_mask"] = pad if self.kind == "self" else pad[:, :S]
        elif self.mask == "causal":
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
            kw["is_causal"] = True
        elif self.mask == "bool":
            kw["attn_mask"] = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        if not self.batch_first:
            x, mem = x.transpose(0, 1), mem.transpose(0, 1)
        if self.kind == "self":
            h, _ = self.attn(x, x, x, **kw)
        elif self.attn._qkv_same_embed_dim:  # cross attention: key = value = memory
            h, _ = self.attn(x, mem, mem, **kw)
        else:  # key and value of their own widths (kdim, vdim)
            h, _ = self.attn(x, mem[..., : self.attn.kdim], mem[..., : self.attn.vdim], **kw)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.out(torch.tanh(h).mean(1))


CASES = {
    "self_batch_first": dict(),
    "self_seq_first": dict(batch_first=False),
    "padding_mask": dict(mask="padding"),
    "causal_mask": dict(mask="causal"),
    "bool_mask_seq_first": dict(mask="bool", batch_first=False),
    "no_bias": dict(bias=False),
    "cross_packed": dict(kind="cross"),
    "cross_kdim_vdim_padding": dict(kind="cross", kdim=5, vdim=3, mask="padding"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_multihead_attention(name):
    kw = dict(CASES[name])
    torch.manual_seed(0)
    model = Attend(**kw).double()
    width = kw.get("kdim", E)
    vdim = kw.get("vdim", E)
    mem = _x(N, S, max(width, vdim), seed=4)
    got = compare(model, dict(x=_x(N, T, E), mem=mem, pad=_padding()), _y(), nn.CrossEntropyLoss())
    assert got.capture_paths["attn"] == "moment-rule"


class Encoder(nn.Module):
    def __init__(self, layers=1):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers > 1 else layer
        self.layers = layers
        self.out = nn.Linear(E, C)

    def forward(self, x, pad):
        if self.layers > 1:
            h = self.enc(x, src_key_padding_mask=pad)
        else:
            h = self.enc(x, src_key_padding_mask=pad)
        return self.out(h.mean(1))


@pytest.mark.parametrize("layers", [1, 2])
def test_transformer_encoder_with_padding_mask_on_the_fast_path(layers):
    torch.manual_seed(0)
    got = compare(Encoder(layers).double(), dict(x=_x(N, T, E), pad=_padding()), _y(), nn.CrossEntropyLoss())
    assert "functorch" not in got.capture_paths.values() and "loop" not in got.capture_paths.values()


def test_transformer_encoder_default_nested_tensor_setting():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor=True (the default)
            self.out = nn.Linear(E, C)

        def forward(self, x, pad):
            return self.out(self.enc(x, src_key_padding_mask=pad).mean(1))

    compare(M().double(), dict(x=_x(N, T, E), pad=_padding()), _y(), nn.CrossEntropyLoss())


def test_attention_dropout_in_train_mode_goes_to_the_fallback():
    from gsnr_diag import gradient_stats

    torch.manual_seed(0)
    model = Attend(dropout=0.5).double()
    x = dict(x=_x(N, T, E), mem=_x(N, S, E), pad=_padding())
    s = gradient_stats(model, [(x, _y())], nn.CrossEntropyLoss(), mode="train")
    assert s.capture_paths["attn"] in ("functorch", "loop")


SELF = [n for n, kw in CASES.items() if kw.get("kind", "self") == "self"]


@pytest.mark.parametrize("name", SELF)
def test_self_attention_backprops_are_caught_in_the_main_pass(name, monkeypatch):
    """Packed self-attention: o and [δq̃ δk̃ δṽ] come from the main pass's graph, no second attention pass."""
    from gsnr_diag.capture import attention

    def no_rerun(*args, **kwargs):
        raise AssertionError("the attention core was re-run")

    monkeypatch.setattr(attention, "_backprops", no_rerun)
    kw = dict(CASES[name])
    torch.manual_seed(0)
    x = dict(x=_x(N, T, E), mem=_x(N, S, E), pad=_padding())
    got = compare(Attend(**kw).double(), x, _y(), nn.CrossEntropyLoss())
    assert got.capture_paths["attn"] == "moment-rule"


class EmbedAttend(nn.Module):
    """Self-attention behind a trainable embedding: later chunks skip its batch weight gradient."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.out = nn.Linear(E, C)

    def forward(self, tokens):
        h = self.emb(tokens)
        return self.out(self.attn(h, h, h, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("upstream", [True, False])
def test_caught_backprops_over_chunks_with_and_without_trainable_layers_upstream(upstream, monkeypatch):
    """Over several chunks, with the batch weight gradient skipped after the first: exact either way.

    Without a trainable layer upstream the main backward stops at the attention's output on later
    chunks, nothing is caught, and the rule re-runs the core; with one, every chunk is caught.
    """
    from gsnr_diag.capture import attention

    reruns = []
    real = attention._backprops
    monkeypatch.setattr(attention, "_backprops", lambda *a, **k: reruns.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = EmbedAttend().double()
    model.emb.weight.requires_grad_(upstream)
    tokens = torch.randint(0, 11, (N * 3, T), generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, C, (N * 3,), generator=torch.Generator().manual_seed(6))
    got = compare(model, tokens, y, nn.CrossEntropyLoss(), batch_size=N)
    assert got.capture_paths["attn"] == "moment-rule"
    assert (len(reruns) == 0) if upstream else (len(reruns) == 2)
