"""nn.MultiheadAttention: per-sample gradients of its projections from one re-run of the attention core.

Its projections are bare parameters used inside ``F.multi_head_attention_forward``, so no layer hook
sees their inputs and backprops. The rule has both ends: the layer's inputs (query, key, value and
the masks) and the backprop δ of its output. From the inputs it forms the projections
q̃ = x_q W_qᵀ + b_q, k̃, ṽ, runs ``F.multi_head_attention_forward`` on them with identity projections
(so every mask, causal and padding rule is torch's own) to get the attention output o (the input of
``out_proj``), and one ``autograd.grad`` of o with the output gradient δ W_out gives the backprops
δq̃, δk̃, δṽ. Then, as for a Linear on a sequence (eq. 1): g_i(W_q) = Σ_t δq̃_it x_q,itᵀ, …,
g_i(W_out) = Σ_t δ_it o_itᵀ, formed block by block over samples. The attention core never mixes
samples, so row i of every backprop is sample i's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import _combine, compute_dtype, sample_blocks, samples_moments
from .linear import linear_moments
from .registry import RuleContext, register_moment_rule

_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _bound(activations: list, kwargs: dict) -> dict:
    out = dict(zip(_ARGS, activations))
    out.update(kwargs)
    return out


def to_batch_first(layer: nn.MultiheadAttention, args: tuple):
    """``(args, post)``: sequence-first inputs as ``[B, T, E]`` and ``post`` for the output's backprop."""
    if layer.batch_first or not args or not isinstance(args[0], torch.Tensor) or args[0].ndim != 3:
        return args, None
    n = min(3, len(args))
    seen: dict[int, torch.Tensor] = {}  # keep `key is query` (self-attention) true of the moved tensors
    moved = tuple(seen.setdefault(id(a), a.transpose(0, 1)) if isinstance(a, torch.Tensor) else a for a in args[:n])
    return moved + tuple(args[n:]), lambda g: g.transpose(0, 1)


def _weights(layer: nn.MultiheadAttention):
    """``[(W_q, b_q), (W_k, b_k), (W_v, b_v)]`` as views of the packed parameters where they are packed."""
    E = layer.embed_dim
    b = layer.in_proj_bias
    bs = [None] * 3 if b is None else [b[:E], b[E : 2 * E], b[2 * E :]]
    if layer._qkv_same_embed_dim:
        W = layer.in_proj_weight
        return [(W[:E], bs[0]), (W[E : 2 * E], bs[1]), (W[2 * E :], bs[2])]
    return [(layer.q_proj_weight, bs[0]), (layer.k_proj_weight, bs[1]), (layer.v_proj_weight, bs[2])]


def _backprops(layer: nn.MultiheadAttention, xs: list, d: torch.Tensor, a: dict, dt: torch.dtype):
    """``(o, [δq̃, δk̃, δṽ])``: the out_proj input and the projections' backprops, all ``[B, ·, E]``."""
    E = layer.embed_dim
    with torch.enable_grad():
        proj = [
            F.linear(x.to(dt), W.detach().to(dt), None if b is None else b.detach().to(dt))
            for x, (W, b) in zip(xs, _weights(layer))
        ]
        proj = [p.detach().requires_grad_(True) for p in proj]
        eye = torch.eye(E, dtype=dt, device=d.device)
        o, _ = F.multi_head_attention_forward(
            *(p.transpose(0, 1) for p in proj),
            E,
            layer.num_heads,
            None,
            None,
            None,
            None,
            False,
            0.0,
            eye,
            None,
            training=False,
            key_padding_mask=a.get("key_padding_mask"),
            need_weights=False,
            attn_mask=a.get("attn_mask"),
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            is_causal=bool(a.get("is_causal", False)),
        )
        d_o = (d.to(dt) @ layer.out_proj.weight.detach().to(dt)).transpose(0, 1)
        grads = torch.autograd.grad(o, proj, d_o)
    return o.detach().transpose(0, 1), [g.detach() for g in grads]


def _in_proj_moments(layer, xs: list, ds: list, dt, signs: bool, budget: float) -> dict:
    """Moments of the input projections' weights (packed or separate) and the packed bias."""
    out: dict = {}
    B = int(ds[0].shape[0])
    E = layer.embed_dim
    isz = torch.finfo(dt).bits // 8
    if layer._qkv_same_embed_dim:
        groups = [(layer.in_proj_weight, [0, 1, 2])]
    else:
        groups = [(w, [j]) for j, w in enumerate((layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight))]
    for W, parts in groups:
        if not W.requires_grad:
            continue
        same = all(xs[j] is xs[parts[0]] for j in parts)
        per_sample = W.numel() * (3 * isz + 2) + sum(xs[j][0].numel() + ds[j][0].numel() for j in parts) * isz
        acc = None
        for s, e in sample_blocks(B, per_sample, budget):
            if same:  # self-attention: one product for the packed weight, [δq̃ δk̃ δṽ]ᵀ x
                dcat = torch.cat([ds[j][s:e] for j in parts], dim=-1)
                g = torch.bmm(dcat.transpose(1, 2), xs[parts[0]][s:e].to(dt))
            else:
                g = torch.cat([torch.bmm(ds[j][s:e].transpose(1, 2), xs[j][s:e].to(dt)) for j in parts], dim=1)
            acc = _combine(acc, samples_moments(g, signs))
            del g
        out[W] = acc
    b = layer.in_proj_bias
    if b is not None and b.requires_grad:
        out[b] = samples_moments(torch.cat([dj.sum(1) for dj in ds], dim=-1).reshape(B, 3 * E), signs)
    return out


@register_moment_rule(nn.MultiheadAttention)
def multihead_attention_moments(layer: nn.MultiheadAttention, ctx: RuleContext) -> dict | None:
    """nn.MultiheadAttention (batch_first or not, attn_mask / key_padding_mask / is_causal, packed or kdim/vdim).

    Declines bias_k/bias_v, add_zero_attn, unbatched input and dropout in train mode (its mask
    cannot be replayed); those go to the fallback.
    """
    a = _bound(ctx.activations, ctx.kwargs)
    q, k, v = a.get("query"), a.get("key"), a.get("value")
    d = ctx.backprops
    if not all(isinstance(t, torch.Tensor) and t.ndim == 3 for t in (q, k, v)) or d.ndim != 3:
        return None
    if layer.bias_k is not None or layer.add_zero_attn or (layer.training and layer.dropout > 0):
        return None
    dt = compute_dtype(layer.out_proj.weight)
    xs = [q, k, v]
    if k is q:
        xs[1] = q
    if v is k:
        xs[2] = xs[1]
    o, ds = _backprops(layer, xs, d, a, dt)
    out = _in_proj_moments(layer, xs, ds, dt, ctx.signs, ctx.budget)
    proj = RuleContext([o], d, ctx.signs, ctx.budget, None, ctx.scratch)
    out.update(linear_moments(layer.out_proj, proj) or {})
    return out


multihead_attention_moments.first_output = True  # forward returns (output, attention weights)
multihead_attention_moments.to_batch_first = to_batch_first
multihead_attention_moments.owns_children = True  # out_proj's parameters are used inside the layer's forward
