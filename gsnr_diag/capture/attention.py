"""nn.MultiheadAttention: per-sample gradients of its projections, caught in the main pass or from a re-run.

Its projections are bare parameters used inside ``F.multi_head_attention_forward``, so no layer hook
sees their inputs and backprops (and a ``TorchFunctionMode`` sees that function as one call). For
self-attention with packed weights (``nn.TransformerEncoderLayer``) the rule's ``inner`` hook finds,
in the autograd graph of the layer's output, the node of the in-projection product (the child of
W_in) and that of out_proj (the child of W_out): a pre-hook on the first catches the backprop of the
packed projection [q̃ k̃ ṽ] during the main backward pass, and the second's saved input is the
attention output o. No second attention pass is run. Otherwise (cross-attention, separate q/k/v
weights, a graph of another shape) the rule has both ends: the layer's inputs (query, key, value and
the masks) and the backprop δ of its output. From the inputs it forms the projections
q̃ = x_q W_qᵀ + b_q, k̃, ṽ, re-runs the attention core on them (``scaled_dot_product_attention`` with
the masks applied as ``F.multi_head_attention_forward`` does) to get the attention output o (the input
of ``out_proj``), and one ``autograd.grad`` of o with the output gradient δ W_out gives the backprops
δq̃, δk̃, δṽ. Then, as for a Linear on a sequence (eq. 1): g_i(W_q) = Σ_t δq̃_it x_q,itᵀ, …,
g_i(W_out) = Σ_t δ_it o_itᵀ, formed block by block over samples. The attention core never mixes
samples, so row i of every backprop is sample i's. Either way the capture's consistency check
compares Σ_i g_i with the batch gradient on the first chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import _combine, compute_dtype, sample_blocks, samples_moments, shared_buffer
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


def _core(layer: nn.MultiheadAttention, q, k, v, a: dict) -> torch.Tensor:
    """Attention output o ``[B, T, E]`` (before out_proj) from projected q, k, v, with the masks applied as
    ``F.multi_head_attention_forward`` applies them (canonical float masks, key padding merged per head,
    the causal hint used only when no mask must be merged)."""
    B, T, E = q.shape
    S, H = k.shape[1], layer.num_heads
    am, causal = a.get("attn_mask"), bool(a.get("is_causal", False))
    kpm = F._canonical_mask(
        mask=a.get("key_padding_mask"),
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(am),
        other_name="attn_mask",
        target_type=q.dtype,
    )
    if causal and kpm is None and not a.get("need_weights", True):
        am = None
    else:
        am = F._canonical_mask(
            mask=am, mask_name="attn_mask", other_type=None, other_name="", target_type=q.dtype, check_other=False
        )
        causal = causal and kpm is None and am is None
    if am is not None and am.dim() == 2:
        am = am.unsqueeze(0)
    if kpm is not None:
        kpm = kpm.view(B, 1, 1, S).expand(-1, H, -1, -1).reshape(B * H, 1, S)
        am = kpm if am is None else am + kpm
    if am is not None:
        am = am.unsqueeze(0) if am.size(0) == 1 and am.dim() == 3 else am.view(B, H, -1, S)
    heads = [t.view(B, t.shape[1], H, E // H).transpose(1, 2) for t in (q, k, v)]
    o = F.scaled_dot_product_attention(*heads, attn_mask=am, dropout_p=0.0, is_causal=causal)
    return o.transpose(1, 2).reshape(B, T, E)


def _backprops(layer: nn.MultiheadAttention, xs: list, d: torch.Tensor, a: dict, dt: torch.dtype):
    """``(o, [δq̃, δk̃, δṽ])``: the out_proj input and the projections' backprops, all ``[B, ·, E]``."""
    with torch.enable_grad():
        proj = []
        for x, (W, b) in zip(xs, _weights(layer)):
            p = F.linear(x.to(dt), W.detach().to(dt), None if b is None else b.detach().to(dt))
            proj.append(p.requires_grad_(True))
        o = _core(layer, *proj, a)
        d_o = d.to(dt) @ layer.out_proj.weight.detach().to(dt)
        grads = torch.autograd.grad(o, proj, d_o)
    return o.detach(), [g.detach() for g in grads]


_GRAPH_NODES = 512  # the most autograd nodes searched for the projections (the layer's own graph is ~40)


class Inner:
    """What the ``inner`` hook caught of one self-attention call: o (out_proj's input) and the packed backprop.

    Both are seq-first and flattened, ``[T·B, E]`` and ``[T·B, 3E]`` (rows ordered (t, b), as
    ``F.multi_head_attention_forward`` lays them out); the backprop is that of the batch-mean loss.
    """

    def __init__(self, o: torch.Tensor):
        self.o = o
        self.backprop: torch.Tensor | None = None

    def catch(self, grad_outputs):
        self.backprop = grad_outputs[0].detach()


def _product_of(node, weight: torch.Tensor) -> bool:
    """Whether ``node`` multiplies by ``weight``ᵀ (a child TBackward0 of the weight's AccumulateGrad)."""
    for child, _ in node.next_functions:
        if child is not None and child.name() == "TBackward0":
            leaf = child.next_functions[0][0] if child.next_functions else None
            if getattr(leaf, "variable", None) is weight:
                return True
    return False


def inner_hook(layer: nn.MultiheadAttention, args: tuple, output: torch.Tensor) -> Inner | None:
    """In the forward hook: find the in-projection and out_proj nodes of a packed self-attention call.

    ``None`` (the rule re-runs the attention core) unless exactly one node multiplies by W_in and one
    by W_out, and out_proj's saved input has the size of o.
    """
    q = args[0] if args else None
    if not (
        layer._qkv_same_embed_dim
        and len(args) >= 3
        and q is args[1]
        and q is args[2]
        and isinstance(q, torch.Tensor)
        and q.ndim == 3
        and layer.in_proj_weight.requires_grad
        and output.grad_fn is not None
    ):
        return None
    w_in, w_out = layer.in_proj_weight, layer.out_proj.weight
    found_in, found_out, seen, todo = [], [], set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > _GRAPH_NODES:
            return None
        if _product_of(node, w_in):
            found_in.append(node)
            continue  # below it: the graph of the layer's input
        if _product_of(node, w_out):
            found_out.append(node)
        todo.extend(child for child, _ in node.next_functions if child is not None)
    if len(found_in) != 1 or len(found_out) != 1:
        return None
    node_out = found_out[0]
    o = getattr(node_out, "_saved_mat1", None) if node_out.name() == "AddmmBackward0" else None
    if o is None and node_out.name() == "MmBackward0":
        o = getattr(node_out, "_saved_self", None)
    if not isinstance(o, torch.Tensor) or o.numel() != q.numel():
        return None
    inner = Inner(o.detach())
    found_in[0].register_prehook(inner.catch)
    return inner


def _caught(layer: nn.MultiheadAttention, inner, d: torch.Tensor):
    """``(o, [δq̃ δk̃ δṽ] / B)`` batch-first (``[B, T, E]``, ``[B, T, 3E]``) from what :func:`inner_hook` caught
    (the backprop of the batch-mean loss, B times smaller than each sample's own); ``None`` if it caught
    nothing (the main backward pass did not reach the layer's projections)."""
    if not isinstance(inner, Inner) or inner.backprop is None:
        return None
    B, T, E = d.shape
    if inner.backprop.numel() != T * B * 3 * E or inner.o.numel() != T * B * E:
        return None
    packed = inner.backprop.reshape(T, B, 3 * E).transpose(0, 1)  # of the batch mean: B × this is sample i's own
    o = inner.o.reshape(T, B, E).transpose(0, 1)
    return o, packed


def _in_proj_moments(
    layer, xs: list, ds: list, dt, signs: bool, budget: float, scratch: dict | None, packed=None, scale: float = 1.0
) -> dict:
    """Moments of the input projections' weights (packed or separate) and the packed bias.

    ``packed``: [δq̃ δk̃ ṽ] as one ``[B, T, 3E]`` tensor when the backprops are its views (no concatenation).
    ``scale``: the factor from ``ds`` to each sample's own backprop, applied inside the products."""
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
            buf = shared_buffer(scratch, "g", (e - s, *W.shape), dt, W.device)
            if same:  # self-attention: one product for the packed weight, [δq̃ δk̃ δṽ]ᵀ x
                dcat = packed[s:e] if packed is not None else torch.cat([ds[j][s:e] for j in parts], dim=-1)
                x = xs[parts[0]][s:e].to(dt)
                if buf is None:
                    g = torch.bmm(dcat.transpose(1, 2), x).mul_(scale)
                else:  # beta=0: buf's old contents are ignored; the scale is applied inside the product
                    g = torch.baddbmm(buf, dcat.transpose(1, 2), x, beta=0, alpha=scale, out=buf)
            else:
                g = torch.cat([torch.bmm(ds[j][s:e].transpose(1, 2), xs[j][s:e].to(dt)) for j in parts], dim=1)
                g = g.mul_(scale) if scale != 1.0 else g
            acc = _combine(acc, samples_moments(g, signs, scratch))
            del g
        out[W] = acc
    b = layer.in_proj_bias
    if b is not None and b.requires_grad:
        gb = torch.cat([dj.sum(1) for dj in ds], dim=-1).reshape(B, 3 * E)
        out[b] = samples_moments(gb.mul_(scale) if scale != 1.0 else gb, signs)
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
    got = _caught(layer, ctx.inner, d)
    packed, scale = None, 1.0
    if got is None:
        o, ds = _backprops(layer, xs, d, a, dt)
    else:
        o, packed, scale = got[0].to(dt), got[1].to(dt), float(d.shape[0])
        E = layer.embed_dim
        ds = [packed[..., :E], packed[..., E : 2 * E], packed[..., 2 * E :]]
    out = _in_proj_moments(layer, xs, ds, dt, ctx.signs, ctx.budget, ctx.scratch, packed, scale)
    proj = RuleContext([o], d, ctx.signs, ctx.budget, None, ctx.scratch)
    out.update(linear_moments(layer.out_proj, proj) or {})
    return out


multihead_attention_moments.first_output = True  # forward returns (output, attention weights)
multihead_attention_moments.to_batch_first = to_batch_first
multihead_attention_moments.inner = inner_hook  # catches o and the projections' backprop in the main pass
multihead_attention_moments.owns_children = True  # out_proj's parameters are used inside the layer's forward
